//! Content digests: `sha256:<hex>` for OCI content, `blake3:<hex>` for boxlet's own.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// Length in bytes of every digest the store knows (both algorithms give 32 bytes).
pub const DIGEST_LEN: usize = 32;

/// A hash algorithm the store names blobs by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// SHA-256, the algorithm of OCI descriptors.
    Sha256,
    /// BLAKE3, for content boxlet makes itself (base disks, built images).
    Blake3,
}

impl Algorithm {
    /// Every algorithm, in the order the store lists them.
    pub const ALL: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Blake3];

    /// The name used in digests and as the directory under `blobs/`.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Blake3 => "blake3",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A digest: an algorithm and its 32-byte hash. Written `alg:hex` (lowercase hex), the
/// OCI form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    alg: Algorithm,
    hash: [u8; DIGEST_LEN],
}

/// Why a string is not a digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{input:?} is not a digest: {reason} (expected sha256:<64 hex> or blake3:<64 hex>)")]
pub struct DigestParseError {
    input: String,
    reason: &'static str,
}

impl Digest {
    /// A digest from its parts.
    pub fn new(alg: Algorithm, hash: [u8; DIGEST_LEN]) -> Self {
        Digest { alg, hash }
    }

    /// The digest of `data`, in one call.
    pub fn of(alg: Algorithm, data: &[u8]) -> Self {
        let mut h = Hasher::new(alg);
        h.update(data);
        h.finish()
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The raw hash.
    pub fn hash(&self) -> &[u8; DIGEST_LEN] {
        &self.hash
    }

    /// The hash as 64 lowercase hex characters (no algorithm prefix).
    pub fn hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(DIGEST_LEN * 2);
        for b in self.hash {
            s.push(HEX[usize::from(b >> 4)] as char);
            s.push(HEX[usize::from(b & 15)] as char);
        }
        s
    }
}

impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| DigestParseError {
            input: input.chars().take(100).collect(),
            reason,
        };
        let (alg, hex) = input.split_once(':').ok_or_else(|| err("no ':'"))?;
        let alg = Algorithm::from_name(alg).ok_or_else(|| err("unknown algorithm"))?;
        let hex = hex.as_bytes();
        if hex.len() != DIGEST_LEN * 2 {
            return Err(err("the hash is not 64 hex characters"));
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut hash = [0u8; DIGEST_LEN];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            let (Some(hi), Some(lo)) = (nibble(pair[0]), nibble(pair[1])) else {
                return Err(err("the hash is not lowercase hex"));
            };
            hash[i] = hi << 4 | lo;
        }
        Ok(Digest { alg, hash })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.alg, self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An incremental hasher for either algorithm.
#[derive(Clone)]
pub enum Hasher {
    /// SHA-256 state.
    Sha256(sha2::Sha256),
    /// BLAKE3 state (boxed: it is ~2 KiB).
    Blake3(Box<blake3::Hasher>),
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hasher({})", self.algorithm())
    }
}

impl Hasher {
    /// A fresh hasher.
    pub fn new(alg: Algorithm) -> Self {
        match alg {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    /// The algorithm of this hasher.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Hasher::Sha256(_) => Algorithm::Sha256,
            Hasher::Blake3(_) => Algorithm::Blake3,
        }
    }

    /// Feed bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest::new(Algorithm::Sha256, h.finalize().into()),
            Hasher::Blake3(h) => Digest::new(Algorithm::Blake3, *h.finalize().as_bytes()),
        }
    }
}

/// A hasher is a sink: `io::copy(&mut file, &mut hasher)` hashes a file.
impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answers_and_round_trip() {
        let d = Digest::of(Algorithm::Sha256, b"abc");
        assert_eq!(
            d.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let b = Digest::of(Algorithm::Blake3, b"abc");
        assert_eq!(
            b.to_string(),
            "blake3:6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert_eq!(b.to_string().parse::<Digest>().unwrap(), b);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
    }

    #[test]
    fn bad_digests_are_refused_with_the_input_named() {
        let hex = "a".repeat(64);
        for bad in [
            String::new(),
            "sha256".into(),
            format!("md5:{hex}"),
            format!("sha256:{}", &hex[1..]),
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha256:{}g", &hex[1..]),
            format!("sha256:{hex}a"),
            format!("sha256:../{}", &hex[3..]),
        ] {
            let err = bad.parse::<Digest>().unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = s.parse::<Digest>();
        }

        #[test]
        fn incremental_equals_one_shot(data in proptest::collection::vec(0u8.., 0..4096), cut in 0usize..4096) {
            for alg in Algorithm::ALL {
                let cut = cut.min(data.len());
                let mut h = Hasher::new(alg);
                h.update(&data[..cut]);
                h.update(&data[cut..]);
                proptest::prop_assert_eq!(h.finish(), Digest::of(alg, &data));
            }
        }
    }
}
