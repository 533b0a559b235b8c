//! The environment key: validated once, where it enters, and carried as a
//! [`Key`] from then on.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::field::{FieldError, validate_dns_label};

/// The longest key we accept: leaves room in 63-character object names.
pub const MAX_KEY_LEN: usize = 40;

/// An environment key: a DNS label of at most [`MAX_KEY_LEN`] characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Key(String);

impl Key {
    /// Checks `s`; the error names `field`.
    pub fn parse(field: &str, s: &str) -> Result<Key, FieldError> {
        validate_dns_label(field, s, MAX_KEY_LEN)?;
        Ok(Key(s.to_string()))
    }

    /// A fresh key: 13 base32 characters, 65 bits from the OS's random source.
    pub fn generate() -> Key {
        const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
        let mut bytes = [0u8; 13];
        // The OS random source failing is not something we can recover from.
        getrandom::fill(&mut bytes).expect("OS random source unavailable");
        let mut key: String = bytes.iter().map(|b| ALPHABET[(b & 31) as usize] as char).collect();
        // First character a letter keeps the key readable as an identifier too:
        // 12 chars × 5 bits + log2(26) ≈ 64.7 bits.
        let first = (bytes[0] % 26 + b'a') as char;
        key.replace_range(0..1, &first.to_string());
        Key(key)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Key {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

// Maps keyed by `Key` can be looked up by `&str`: Key's order and equality are its string's.
impl std::borrow::Borrow<str> for Key {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Key {
    type Error = FieldError;
    fn try_from(s: String) -> Result<Key, FieldError> {
        Key::parse("key", &s)
    }
}

impl From<Key> for String {
    fn from(k: Key) -> String {
        k.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for _ in 0..100 {
            let k = Key::generate();
            assert_eq!(k.len(), 13);
            Key::parse("key", &k).unwrap();
        }
        assert_ne!(Key::generate(), Key::generate());
        for bad in ["", "A", "-a", "a-", "a_b", &"a".repeat(41)] {
            assert_eq!(Key::parse("key", bad).unwrap_err().field, "key");
        }
        Key::parse("key", &"a".repeat(40)).unwrap();
        // A stored record with a bad key does not load.
        assert!(serde_json::from_str::<Key>("\"Bad\"").is_err());
        assert_eq!(serde_json::to_string(&Key::parse("key", "ok").unwrap()).unwrap(), "\"ok\"");
    }
}
