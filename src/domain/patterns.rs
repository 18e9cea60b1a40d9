//! Event patterns of the cloud pub/sub dialect (seed 002): `job.completed`, `job.*`, `*`.
//!
//! Matching happens in the pod, against the envelope's `type` meta, because Redis
//! `PSUBSCRIBE` patterns are expensive (DESIGN §9); a client's subscribe message is
//! parsed into a [`PatternSet`] once, at the door.

use std::fmt;
use std::str::FromStr;

/// Longest pattern accepted; event names are short, anything longer is a mistake.
pub const MAX_PATTERN_LEN: usize = 64;
/// Most patterns one connection may hold.
pub const MAX_PATTERNS: usize = 64;

/// One parsed pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EventPattern {
    /// `*`: every event.
    All,
    /// `job.*`: every event whose name starts with `job.`; holds `job.`.
    Prefix(String),
    /// `job.completed`: exactly that event.
    Exact(String),
}

/// Why a pattern was refused; shown to the client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPattern {
    #[error("pattern is empty")]
    Empty,
    #[error("pattern is longer than {MAX_PATTERN_LEN} characters")]
    TooLong,
    #[error("pattern {0:?} has a character other than a-z, 0-9, '_', '-', '.' or '*'")]
    Character(String),
    #[error("pattern {0:?} has an empty segment")]
    EmptySegment(String),
    #[error("pattern {0:?}: '*' may only be the whole pattern or its last segment")]
    Wildcard(String),
    #[error("more than {MAX_PATTERNS} patterns")]
    TooMany,
}

impl EventPattern {
    pub fn parse(s: &str) -> Result<Self, InvalidPattern> {
        if s.is_empty() {
            return Err(InvalidPattern::Empty);
        }
        if s.len() > MAX_PATTERN_LEN {
            return Err(InvalidPattern::TooLong);
        }
        if !s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.' | b'*')
        }) {
            return Err(InvalidPattern::Character(s.to_owned()));
        }
        if s == "*" {
            return Ok(Self::All);
        }
        let segments: Vec<&str> = s.split('.').collect();
        if segments.iter().any(|seg| seg.is_empty()) {
            return Err(InvalidPattern::EmptySegment(s.to_owned()));
        }
        let (last, init) = segments.split_last().expect("split yields one segment");
        if init.iter().any(|seg| seg.contains('*')) || (last.contains('*') && *last != "*") {
            return Err(InvalidPattern::Wildcard(s.to_owned()));
        }
        if *last == "*" {
            // Keep the dot so `job.*` does not match `jobs.x`.
            Ok(Self::Prefix(s[..s.len() - 1].to_owned()))
        } else {
            Ok(Self::Exact(s.to_owned()))
        }
    }

    pub fn matches(&self, event_type: &str) -> bool {
        match self {
            Self::All => true,
            Self::Prefix(prefix) => {
                event_type.len() > prefix.len() && event_type.starts_with(prefix.as_str())
            }
            Self::Exact(name) => name == event_type,
        }
    }
}

impl FromStr for EventPattern {
    type Err = InvalidPattern;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for EventPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("*"),
            Self::Prefix(prefix) => write!(f, "{prefix}*"),
            Self::Exact(name) => f.write_str(name),
        }
    }
}

/// A connection's subscriptions: deduplicated, at most [`MAX_PATTERNS`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PatternSet {
    /// A short list scanned linearly: with ≤ 64 entries that beats hashing, and
    /// keeps the subscription order for echoing back in `subscribed`.
    patterns: Vec<EventPattern>,
}

impl PatternSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a whole subscribe request: all valid or nothing changes.
    pub fn parse_all<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, InvalidPattern> {
        let mut set = Self::new();
        set.extend_parsed(items)?;
        Ok(set)
    }

    /// Adds every pattern of `items`; on any error the set is left unchanged.
    pub fn extend_parsed<'a>(
        &mut self,
        items: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), InvalidPattern> {
        let mut next = self.clone();
        for item in items {
            next.insert(EventPattern::parse(item)?)?;
        }
        *self = next;
        Ok(())
    }

    /// Adds a pattern; `Ok(false)` if it was already there.
    pub fn insert(&mut self, pattern: EventPattern) -> Result<bool, InvalidPattern> {
        if self.patterns.contains(&pattern) {
            return Ok(false);
        }
        if self.patterns.len() >= MAX_PATTERNS {
            return Err(InvalidPattern::TooMany);
        }
        self.patterns.push(pattern);
        Ok(true)
    }

    pub fn remove(&mut self, pattern: &EventPattern) -> bool {
        let before = self.patterns.len();
        self.patterns.retain(|p| p != pattern);
        self.patterns.len() != before
    }

    pub fn matches(&self, event_type: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(event_type))
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &EventPattern> {
        self.patterns.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matching_table() {
        // (pattern, event, matches)
        let table = [
            ("job.completed", "job.completed", true),
            ("job.completed", "job.failed", false),
            ("job.completed", "job.completed.x", false),
            ("job.completed", "job", false),
            ("job.*", "job.completed", true),
            ("job.*", "job.failed", true),
            ("job.*", "job.progress", true),
            ("job.*", "job.a.b", true),
            ("job.*", "job", false),
            ("job.*", "job.", false),
            ("job.*", "jobs.completed", false),
            ("job.*", "input.ready", false),
            ("input.*", "input.ready", true),
            ("input.*", "input.failed", true),
            ("input.*", "model.ready", false),
            ("model.*", "model.ready", true),
            ("*", "job.completed", true),
            ("*", "model.ready", true),
            ("*", "anything", true),
            ("a.b.*", "a.b.c", true),
            ("a.b.*", "a.bc", false),
        ];
        for (pattern, event, expected) in table {
            let p = EventPattern::parse(pattern).unwrap();
            assert_eq!(p.matches(event), expected, "{pattern} vs {event}");
            assert_eq!(p.to_string(), pattern);
        }
    }

    #[test]
    fn rejects_malformed_patterns() {
        use InvalidPattern::*;
        type Expect = fn(&InvalidPattern) -> bool;
        let cases: &[(&str, Expect)] = &[
            ("", |e| *e == Empty),
            ("**", |e| matches!(e, Wildcard(_))),
            ("job.**", |e| matches!(e, Wildcard(_))),
            ("job.*.x", |e| matches!(e, Wildcard(_))),
            ("*.completed", |e| matches!(e, Wildcard(_))),
            ("job*", |e| matches!(e, Wildcard(_))),
            ("job.c*", |e| matches!(e, Wildcard(_))),
            ("job..x", |e| matches!(e, EmptySegment(_))),
            (".job", |e| matches!(e, EmptySegment(_))),
            ("job.", |e| matches!(e, EmptySegment(_))),
            ("job. completed", |e| matches!(e, Character(_))),
            (" job.*", |e| matches!(e, Character(_))),
            ("job.*\n", |e| matches!(e, Character(_))),
            ("Job.Completed", |e| matches!(e, Character(_))),
            ("job/completed", |e| matches!(e, Character(_))),
            ("job.?", |e| matches!(e, Character(_))),
            ("job.完了", |e| matches!(e, Character(_))),
        ];
        for (input, expected) in cases {
            let err = EventPattern::parse(input).unwrap_err();
            assert!(expected(&err), "{input:?} gave {err:?}");
        }
        assert_eq!(
            EventPattern::parse(&"a".repeat(MAX_PATTERN_LEN + 1)).unwrap_err(),
            TooLong
        );
        assert!(EventPattern::parse(&"a".repeat(MAX_PATTERN_LEN)).is_ok());
    }

    #[test]
    fn pattern_set_deduplicates_bounds_and_is_atomic() {
        let mut set = PatternSet::parse_all(["job.completed", "job.*", "job.completed"]).unwrap();
        assert_eq!(set.len(), 2);
        assert!(set.matches("job.failed"));
        assert!(!set.matches("model.ready"));
        // One bad item leaves the set as it was.
        assert!(set.extend_parsed(["model.*", "bad pattern"]).is_err());
        assert_eq!(set.len(), 2);
        assert!(set.remove(&EventPattern::parse("job.*").unwrap()));
        assert!(!set.matches("job.failed"));
        assert!(set.matches("job.completed"));

        let names: Vec<String> = (0..MAX_PATTERNS).map(|i| format!("e{i}")).collect();
        let mut full = PatternSet::parse_all(names.iter().map(String::as_str)).unwrap();
        assert_eq!(full.insert(EventPattern::All), Err(InvalidPattern::TooMany));
        // A duplicate is not "one more".
        assert_eq!(full.insert(EventPattern::parse("e0").unwrap()), Ok(false));
        assert!(PatternSet::new().is_empty());
        assert!(!PatternSet::new().matches("job.completed"));
    }
}
