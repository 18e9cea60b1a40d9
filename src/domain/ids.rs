//! Typed identifiers: a job id can never be passed where a tenant id is expected.
//!
//! All are UUIDs on the wire and in Postgres (seed 003 calls job ids UUIDs); the
//! type, not a string prefix, carries what the id names. Parsing is the only way
//! to make one from outside input, so a malformed id is rejected at the door.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new, time-ordered id (UUIDv7 keeps b-tree inserts local).
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub const fn from_uuid(id: Uuid) -> Self {
                Self(id)
            }

            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

typed_id!(
    /// A tenant: the unit of isolation. Every tenant-owned row carries one.
    TenantId
);
typed_id!(
    /// A person who signs in with email and password.
    UserId
);
typed_id!(
    /// An API key (the id, never the secret).
    ApiKeyId
);
typed_id!(
    /// A browser session; the cookie's JWT names it so logout can revoke it.
    SessionId
);
typed_id!(
    /// A job; also the `prompt_id` submitted to ComfyUI.
    JobId
);
typed_id!(
    /// An input file a tenant uploaded or asked us to fetch.
    InputId
);
typed_id!(
    /// A file a job produced.
    OutputId
);
typed_id!(
    /// A worker pod.
    WorkerId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let id = JobId::new();
        assert_eq!(id.to_string().parse::<JobId>().unwrap(), id);
        assert!("../etc".parse::<JobId>().is_err());
    }
}
