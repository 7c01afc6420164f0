//! Short random identifiers: 8 characters of base62 (`[0-9A-Za-z]`), ~47.6 bits.
//!
//! Minted from the OS's random source, validated on parse, so an ID read from a path or a
//! command line can be trusted to be a plain file name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The number of characters of every ID.
pub const ID_LEN: usize = 8;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a string is not an ID.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{input:?} is not a {kind}: expected {ID_LEN} characters of [0-9A-Za-z]")]
pub struct IdParseError {
    input: String,
    kind: &'static str,
}

fn mint_chars() -> [u8; ID_LEN] {
    let mut out = [0u8; ID_LEN];
    let mut filled = 0;
    while filled < ID_LEN {
        let mut random = [0u8; 16];
        getrandom::fill(&mut random).expect("the OS random source failed");
        // 248 = 4 * 62: bytes at or above it would bias the first characters.
        for b in random.into_iter().filter(|&b| b < 248) {
            if filled == ID_LEN {
                break;
            }
            out[filled] = ALPHABET[usize::from(b % 62)];
            filled += 1;
        }
    }
    out
}

fn validate(input: &str, kind: &'static str) -> Result<[u8; ID_LEN], IdParseError> {
    let bytes = input.as_bytes();
    if bytes.len() == ID_LEN && bytes.iter().all(u8::is_ascii_alphanumeric) {
        let mut out = [0u8; ID_LEN];
        out.copy_from_slice(bytes);
        Ok(out)
    } else {
        Err(IdParseError {
            input: input.chars().take(64).collect(),
            kind,
        })
    }
}

macro_rules! base62_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; ID_LEN]);

        impl $name {
            /// A fresh random ID.
            pub fn mint() -> Self {
                $name(mint_chars())
            }

            /// Parse and validate an ID.
            pub fn parse(input: &str) -> Result<Self, IdParseError> {
                validate(input, $kind).map($name)
            }

            /// The ID's characters.
            pub fn as_str(&self) -> &str {
                // Only ASCII alphanumerics are ever stored.
                std::str::from_utf8(&self.0).unwrap_or_default()
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

base62_id!(
    /// The ID of a base disk: also its file name under `bases/` (`<id>.ext4`).
    BaseDiskId,
    "base disk ID"
);
base62_id!(
    /// The ID of a box: also its directory under `boxes/`.
    BoxId,
    "box ID"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_ids_parse_back_and_differ() {
        let ids: Vec<BoxId> = (0..1000).map(|_| BoxId::mint()).collect();
        for id in &ids {
            assert_eq!(BoxId::parse(id.as_str()).unwrap(), *id);
            assert_eq!(id.as_str().len(), ID_LEN);
        }
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }

    #[test]
    fn invalid_ids_are_refused() {
        for bad in [
            "",
            "abc",
            "aB3xQ9mP1",
            "aB3x-9mP",
            "../../xx",
            "aB3xQ9m\u{e9}",
            "aB3xQ9m ",
        ] {
            let err = BaseDiskId::parse(bad).unwrap_err();
            assert!(err.to_string().contains("base disk ID"), "{err}");
        }
        assert_eq!(BaseDiskId::parse("aB3xQ9mP").unwrap().as_str(), "aB3xQ9mP");
    }

    #[test]
    fn every_character_of_the_alphabet_is_minted() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..500 {
            seen.extend(BaseDiskId::mint().as_str().bytes());
        }
        assert_eq!(seen.len(), 62);
    }
}
