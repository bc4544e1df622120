//! `TopicName`: a topic name parsed and checked once at the edge, trusted everywhere after.
//!
//! Names are 1..=max bytes of `[A-Za-z0-9_.:-]`. The check is ASCII-only on purpose: no
//! Unicode look-alikes, no case folding, nothing a log line or a metric label must escape.

use std::fmt;
use std::sync::Arc;

/// A valid topic name. Cloning is a reference-count increment.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic name must not be empty")]
    Empty,
    #[error("topic name is {len} bytes long, the maximum is {max}")]
    TooLong { len: usize, max: usize },
    #[error("topic name may contain only A-Z a-z 0-9 _ . : - characters")]
    BadCharacter,
}

impl TopicName {
    /// Checks `name` against the naming rules.
    pub fn parse(name: &str, max_len: usize) -> Result<TopicName, TopicError> {
        Self::check(name, max_len)?;
        Ok(TopicName(Arc::from(name)))
    }

    /// The same check as `parse`, without allocating.
    pub fn check(name: &str, max_len: usize) -> Result<(), TopicError> {
        if name.is_empty() {
            return Err(TopicError::Empty);
        }
        if name.len() > max_len {
            return Err(TopicError::TooLong {
                len: name.len(),
                max: max_len,
            });
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        {
            return Err(TopicError::BadCharacter);
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::borrow::Borrow<str> for TopicName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["a", "cache_metrics", "orders.eu-1:created", "A9", "x-y_z.w:v"] {
            assert!(TopicName::parse(ok, 128).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_empty_long_and_odd_characters() {
        assert_eq!(TopicName::parse("", 128), Err(TopicError::Empty));
        assert_eq!(
            TopicName::parse("abcd", 3),
            Err(TopicError::TooLong { len: 4, max: 3 })
        );
        for bad in ["a b", "a/b", "é", "a\0", "a\n", "*", "a#", "\u{200b}"] {
            assert_eq!(
                TopicName::parse(bad, 128),
                Err(TopicError::BadCharacter),
                "{bad:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn valid_names_roundtrip(name in "[A-Za-z0-9_.:-]{1,128}") {
            let t = TopicName::parse(&name, 128).unwrap();
            prop_assert_eq!(t.as_str(), name.as_str());
        }

        #[test]
        fn arbitrary_input_never_panics_and_accepts_only_the_alphabet(name in any::<String>(), max in 1usize..200) {
            let ok = TopicName::parse(&name, max).is_ok();
            let expected = !name.is_empty()
                && name.len() <= max
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
            prop_assert_eq!(ok, expected);
        }
    }
}
