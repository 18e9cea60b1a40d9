//! Which network addresses a server-side fetch may reach.
//!
//! A URL input is fetched by the API pod from inside the operator's network, so a
//! client could otherwise point it at the cloud metadata service, Redis, Postgres or
//! an admin port (SSRF). Only globally routable unicast addresses are allowed;
//! [`classify`] names the range of anything else so the refusal reads well.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A range that is never fetched from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Forbidden {
    Unspecified,
    Loopback,
    /// RFC 1918 (10/8, 172.16/12, 192.168/16).
    Private,
    /// RFC 6598 shared address space, 100.64/10 (carrier-grade NAT).
    SharedCgnat,
    /// 169.254/16 and fe80::/10, which include the cloud metadata service.
    LinkLocal,
    Multicast,
    Broadcast,
    /// 192.0.2/24, 198.51.100/24, 203.0.113/24, 2001:db8::/32.
    Documentation,
    /// fc00::/7.
    UniqueLocal,
    /// Anything else not globally routable: 0/8, 192.0.0/24, 198.18/15 (benchmarking),
    /// 240/4, fec0::/10, 100::/64, Teredo, ….
    Reserved,
}

impl Forbidden {
    fn describe(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::SharedCgnat => "shared (carrier-grade NAT)",
            Self::LinkLocal => "link-local",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Documentation => "documentation",
            Self::UniqueLocal => "unique-local",
            Self::Reserved => "reserved",
        }
    }
}

impl fmt::Display for Forbidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} addresses are not allowed", self.describe())
    }
}

/// The range `ip` is in, if it is one a fetch must not reach; `None` means public.
pub fn classify(ip: IpAddr) -> Option<Forbidden> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Forbidden> {
    let [a, b, c, _] = ip.octets();
    let class = if ip.is_unspecified() {
        Forbidden::Unspecified
    } else if ip.is_loopback() {
        Forbidden::Loopback
    } else if ip.is_private() {
        Forbidden::Private
    } else if a == 100 && (64..128).contains(&b) {
        Forbidden::SharedCgnat
    } else if ip.is_link_local() {
        Forbidden::LinkLocal
    } else if ip.is_multicast() {
        Forbidden::Multicast
    } else if ip.is_broadcast() {
        Forbidden::Broadcast
    } else if ip.is_documentation() {
        Forbidden::Documentation
    } else if a == 0 || a >= 240 || (a, b, c) == (192, 0, 0) || (a == 198 && (b & 0xfe) == 18) {
        Forbidden::Reserved
    } else {
        return None;
    };
    Some(class)
}

fn classify_v6(ip: Ipv6Addr) -> Option<Forbidden> {
    // Addresses that carry an IPv4 address are judged by it: ::ffff:127.0.0.1 reaches
    // 127.0.0.1 on a dual-stack host.
    if let Some(v4) = embedded_v4(ip) {
        return classify_v4(v4);
    }
    let seg = ip.segments();
    let class = if ip.is_unspecified() {
        Forbidden::Unspecified
    } else if ip.is_loopback() {
        Forbidden::Loopback
    } else if ip.is_multicast() {
        Forbidden::Multicast
    } else if seg[0] & 0xfe00 == 0xfc00 {
        Forbidden::UniqueLocal
    } else if seg[0] & 0xffc0 == 0xfe80 {
        Forbidden::LinkLocal
    } else if seg[0] == 0x2001 && seg[1] == 0x0db8 {
        Forbidden::Documentation
    } else if seg[0] & 0xffc0 == 0xfec0 // deprecated site-local
        || (seg[0] == 0x0100 && seg[1..4] == [0, 0, 0]) // discard-only
        || (seg[0] == 0x2001 && seg[1] == 0) // Teredo: tunnels to an address we cannot see
        || seg[0] & 0xe000 != 0x2000
    // outside 2000::/3, the only range allocated for global unicast
    {
        Forbidden::Reserved
    } else {
        return None;
    };
    Some(class)
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// (`::a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`) or 6to4 (`2002:aabb:ccdd::`) address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let seg = ip.segments();
    let low = Ipv4Addr::new(
        (seg[6] >> 8) as u8,
        seg[6] as u8,
        (seg[7] >> 8) as u8,
        seg[7] as u8,
    );
    if let Some(mapped) = ip.to_ipv4_mapped() {
        Some(mapped)
    } else if (seg[..6] == [0, 0, 0, 0, 0, 0] && !ip.is_unspecified() && !ip.is_loopback())
        || seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
    {
        Some(low)
    } else if seg[0] == 0x2002 {
        Some(Ipv4Addr::new(
            (seg[1] >> 8) as u8,
            seg[1] as u8,
            (seg[2] >> 8) as u8,
            seg[2] as u8,
        ))
    } else {
        None
    }
}

/// Which addresses a fetcher may connect to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AddressPolicy {
    /// Public addresses only. Production always uses this.
    #[default]
    PublicOnly,
    /// Public addresses, plus exactly one socket address named literally in a URL
    /// (`http://127.0.0.1:PORT/…`), never reached through a host name. For tests
    /// only, so they can fetch from a server on loopback while every other loopback
    /// address and port stays refused; production never sets it.
    AlsoAllowForTests(SocketAddr),
}

impl AddressPolicy {
    /// The reason to refuse connecting to `addr`, named literally in a URL.
    pub fn check_literal(self, addr: SocketAddr) -> Option<Forbidden> {
        match self {
            Self::AlsoAllowForTests(allowed) if allowed == addr => None,
            _ => classify(addr.ip()),
        }
    }

    /// The reason to refuse an address a host name resolved to. Host names never
    /// get the test exception, so `localhost` is refused even in tests.
    pub fn check_resolved(self, ip: IpAddr) -> Option<Forbidden> {
        classify(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Option<Forbidden> {
        classify(s.parse().unwrap())
    }

    #[test]
    fn refuses_every_internal_range() {
        use Forbidden::*;
        for (ip, want) in [
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Reserved),
            ("127.0.0.1", Loopback),
            ("127.255.0.9", Loopback),
            ("10.0.0.1", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("100.64.0.1", SharedCgnat),
            ("100.127.255.254", SharedCgnat),
            ("169.254.169.254", LinkLocal),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("255.255.255.255", Broadcast),
            ("192.0.2.1", Documentation),
            ("198.51.100.7", Documentation),
            ("203.0.113.9", Documentation),
            ("192.0.0.8", Reserved),
            ("198.18.0.1", Reserved),
            ("198.19.255.1", Reserved),
            ("240.0.0.1", Reserved),
            ("::", Unspecified),
            ("::1", Loopback),
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:10.1.2.3", Private),
            ("::ffff:169.254.169.254", LinkLocal),
            ("::127.0.0.1", Loopback),
            ("64:ff9b::10.0.0.1", Private),
            ("2002:7f00:0001::", Loopback),
            ("fc00::1", UniqueLocal),
            ("fd12:3456::1", UniqueLocal),
            ("fe80::1", LinkLocal),
            ("fec0::1", Reserved),
            ("ff02::1", Multicast),
            ("2001:db8::1", Documentation),
            ("2001:0:4136:e378::1", Reserved),
            ("100::1", Reserved),
        ] {
            assert_eq!(class(ip), Some(want), "{ip}");
        }
    }

    #[test]
    fn allows_public_addresses() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.215.14",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "198.17.0.1",
            "198.20.0.1",
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
        ] {
            assert_eq!(class(ip), None, "{ip}");
        }
    }

    #[test]
    fn messages_read_well() {
        assert_eq!(
            Forbidden::Loopback.to_string(),
            "loopback addresses are not allowed"
        );
    }

    #[test]
    fn the_test_exception_is_one_literal_socket_address() {
        let allowed: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let policy = AddressPolicy::AlsoAllowForTests(allowed);
        assert_eq!(policy.check_literal(allowed), None);
        assert_eq!(
            policy.check_literal("127.0.0.1:4001".parse().unwrap()),
            Some(Forbidden::Loopback)
        );
        assert_eq!(
            policy.check_resolved(allowed.ip()),
            Some(Forbidden::Loopback)
        );
        assert_eq!(
            AddressPolicy::default().check_literal(allowed),
            Some(Forbidden::Loopback)
        );
    }
}
