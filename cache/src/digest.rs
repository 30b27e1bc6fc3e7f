//! Digests: 32-byte blake3 outputs, printed as lowercase hex, and the one domain-separated way to
//! hash structured bytes ([`hash_bytes`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A blake3 digest: the name of a stage key, an object (output tree) or a file's content.
/// Displays as 64 lowercase hex characters; serializes as that string.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Wraps raw digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Digest(bytes)
    }

    /// The raw bytes, e.g. to feed into another hash.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 12 hex characters: enough to name an entry in listings and plans.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(12);
        s
    }

    /// The full 64-character lowercase hex form (same as `to_string()`).
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl From<blake3::Hash> for Digest {
    fn from(hash: blake3::Hash) -> Self {
        Digest(*hash.as_bytes())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// A string that is not 64 hex characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not a digest: expected 64 hex characters")]
pub struct ParseDigestError {
    /// The rejected input.
    pub input: String,
}

impl FromStr for Digest {
    type Err = ParseDigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseDigestError { input: s.to_string() };
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(err());
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_value(pair[0]).ok_or_else(err)?;
            let lo = hex_value(pair[1]).ok_or_else(err)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(Digest(out))
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Hashes a sequence of byte strings under a domain-separation `context` (blake3 `derive_key`
/// mode). Each part is prefixed by its length as a u64 little-endian, so `["ab"]` and
/// `["a", "b"]` never collide, and two contexts never produce comparable digests.
///
/// The context should be a fixed, globally unique string such as `"newt 2026 stage key v1"`.
pub fn hash_bytes(context: &str, parts: &[&[u8]]) -> Digest {
    let mut hasher = blake3::Hasher::new_derive_key(context);
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_64_lowercase_hex_and_parses_back() {
        let d = hash_bytes("newt-cache test", &[b"x"]);
        let s = d.to_string();
        assert_eq!(s.len(), 64);
        assert!(s.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_eq!(s.parse::<Digest>().unwrap(), d);
        assert_eq!(s.to_uppercase().parse::<Digest>().unwrap(), d);
        assert_eq!(d.short(), s[..12]);
    }

    #[test]
    fn malformed_hex_is_rejected() {
        let good = hash_bytes("newt-cache test", &[]).to_string();
        assert!(good[..63].parse::<Digest>().is_err());
        assert!(format!("{good}0").parse::<Digest>().is_err());
        assert!(format!("g{}", &good[1..]).parse::<Digest>().is_err());
        assert!("".parse::<Digest>().is_err());
    }

    #[test]
    fn serde_uses_the_hex_string() {
        let d = hash_bytes("newt-cache test", &[b"serde"]);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{d}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"abc\"").is_err());
    }

    #[test]
    fn hash_bytes_is_derive_key_over_length_prefixed_parts() {
        let mut expected = blake3::Hasher::new_derive_key("ctx");
        for part in [&b"ab"[..], &b""[..], &b"c"[..]] {
            expected.update(&(part.len() as u64).to_le_bytes()).update(part);
        }
        assert_eq!(hash_bytes("ctx", &[b"ab", b"", b"c"]), expected.finalize().into());
    }

    #[test]
    fn key_hashes_are_domain_separated() {
        let parts: &[&[u8]] = &[b"learning_rate", b"0.0002"];
        assert_ne!(hash_bytes("newt a", parts), hash_bytes("newt b", parts));
        // Length prefixes: moving a boundary between parts changes the digest.
        assert_ne!(hash_bytes("c", &[b"ab", b"c"]), hash_bytes("c", &[b"a", b"bc"]));
        assert_ne!(hash_bytes("c", &[b"abc"]), hash_bytes("c", &[b"ab", b"c"]));
        // An empty part is not the same as no part.
        assert_ne!(hash_bytes("c", &[]), hash_bytes("c", &[b""]));
        // derive_key mode never equals the plain hash of the same bytes.
        assert_ne!(hash_bytes("c", &[b"x"]), Digest::from(blake3::hash(b"x")));
    }
}
