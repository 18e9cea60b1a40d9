//! What the bench reads from the operating system: the pod's CPU time and memory
//! (`/proc/<pid>/stat`, `/proc/<pid>/status`, summed over the process and its
//! direct children, so nginx's master + workers count as one server), the machine,
//! and the open-file limit that 10,000 sockets need.

use std::time::Instant;

use serde::Serialize;

/// CPU time and resident memory of a server, at one instant.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    pub cpu_ticks: u64,
    pub rss_kib: u64,
    pub at: Option<Instant>,
}

/// The processes that make up the server under test.
#[derive(Clone, Debug)]
pub struct ServerProcs {
    pids: Vec<u32>,
}

impl ServerProcs {
    /// `pids` and, for each, its direct children (read now, once).
    pub fn with_children(pids: &[u32]) -> Self {
        let mut all: Vec<u32> = pids.to_vec();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                    continue;
                };
                if let Some(stat) = read_stat(pid)
                    && pids.contains(&stat.ppid)
                    && !all.contains(&pid)
                {
                    all.push(pid);
                }
            }
        }
        Self { pids: all }
    }

    /// Exactly these processes (the bench itself, without the pod it started).
    pub fn only(pids: &[u32]) -> Self {
        Self {
            pids: pids.to_vec(),
        }
    }

    pub fn sample(&self) -> ProcSample {
        let mut s = ProcSample {
            at: Some(Instant::now()),
            ..ProcSample::default()
        };
        for &pid in &self.pids {
            if let Some(stat) = read_stat(pid) {
                s.cpu_ticks += stat.utime + stat.stime;
            }
            s.rss_kib += read_rss_kib(pid).unwrap_or(0);
        }
        s
    }
}

/// CPU use between two samples, in percent of one core (200 = both of two cores).
pub fn cpu_percent(from: &ProcSample, to: &ProcSample) -> f64 {
    let (Some(a), Some(b)) = (from.at, to.at) else {
        return 0.0;
    };
    let secs = b.duration_since(a).as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    let ticks = to.cpu_ticks.saturating_sub(from.cpu_ticks) as f64;
    ticks / clock_ticks_per_second() / secs * 100.0
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
}

fn read_stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Fields of `/proc/<pid>/stat` after the command name, which is in parentheses and
/// may itself contain spaces and parentheses.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state(3) ppid(4) … utime(14) stime(15), numbered as in proc(5).
    Some(Stat {
        ppid: fields.get(1)?.parse().ok()?,
        utime: fields.get(11)?.parse().ok()?,
        stime: fields.get(12)?.parse().ok()?,
    })
}

fn read_rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field_kib(&text, "VmRSS:")
}

fn status_field_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The machine a run was measured on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_mib: u64,
    pub kernel: String,
    pub cpu_model: String,
    /// 1-, 5- and 15-minute load averages when the run started: the machine may be
    /// shared, and this says how busy it was.
    pub load_average: [f64; 3],
}

impl Machine {
    pub fn read() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let meminfo = read("/proc/meminfo");
        let load: Vec<f64> = read("/proc/loadavg")
            .split_whitespace()
            .take(3)
            .filter_map(|s| s.parse().ok())
            .collect();
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_mib: status_field_kib(&meminfo, "MemTotal:").unwrap_or(0) / 1024,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu_model: read("/proc/cpuinfo")
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
                .unwrap_or_default(),
            load_average: [0, 1, 2].map(|i| load.get(i).copied().unwrap_or(0.0)),
        }
    }
}

/// Raises this process's open-file limit to its hard limit (children inherit it).
/// Returns the soft limit in force afterwards.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to / read from the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_a_tricky_command_name() {
        let line = "4242 (my (odd) name) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0 123 456789 1234 18446744073709551615";
        let stat = parse_stat(line).unwrap();
        assert_eq!((stat.ppid, stat.utime, stat.stime), (17, 250, 75));
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn status_fields_in_kib() {
        let status = "Name:\tx\nVmHWM:\t  9000 kB\nVmRSS:\t  8123 kB\n";
        assert_eq!(status_field_kib(status, "VmRSS:"), Some(8123));
        assert_eq!(status_field_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn this_process_is_measurable() {
        let me = ServerProcs::with_children(&[std::process::id()]);
        let a = me.sample();
        assert!(a.rss_kib > 0);
        let mut x = 0u64;
        for i in 0..3_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = me.sample();
        assert!(cpu_percent(&a, &b) >= 0.0);
        assert_eq!(cpu_percent(&ProcSample::default(), &b), 0.0);
        let m = Machine::read();
        assert!(m.cores >= 1 && m.memory_mib > 0 && !m.kernel.is_empty());
    }
}
