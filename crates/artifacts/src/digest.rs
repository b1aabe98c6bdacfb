//! sha256 digests: of files, and of labelled build inputs (the key of a content-addressed build).

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A sha256 digest, shown and serialized as 64 lowercase hex characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest([u8; 32]);

impl Digest {
    pub fn of_bytes(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 16 hex characters: enough to name a directory, short enough to read.
    pub fn short(&self) -> String {
        self.hex()[..16].to_owned()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl TryFrom<String> for Digest {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.hex()
    }
}

impl std::str::FromStr for Digest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.strip_prefix("sha256:").unwrap_or(s);
        let bytes = hex::decode(s).map_err(|e| format!("not a sha256 digest {s:?}: {e}"))?;
        let arr: [u8; 32] =
            bytes.try_into().map_err(|_| format!("not a sha256 digest {s:?}: expected 64 hex characters"))?;
        Ok(Digest(arr))
    }
}

/// sha256 of a file's contents, streamed.
pub fn sha256_file(path: &Path) -> io::Result<Digest> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Digest(hasher.finalize().into()))
}

/// Hashes named inputs into one key. Each field is length-prefixed so that
/// `("ab", "c")` and `("a", "bc")` give different keys.
#[derive(Clone, Default)]
pub struct DigestBuilder {
    hasher: Sha256,
}

impl DigestBuilder {
    pub fn new(domain: &str) -> Self {
        let mut b = DigestBuilder { hasher: Sha256::new() };
        b.bytes("domain", domain.as_bytes());
        b
    }

    pub fn bytes(&mut self, label: &str, value: &[u8]) -> &mut Self {
        for part in [label.as_bytes(), value] {
            self.hasher.update((part.len() as u64).to_le_bytes());
            self.hasher.update(part);
        }
        self
    }

    pub fn str(&mut self, label: &str, value: &str) -> &mut Self {
        self.bytes(label, value.as_bytes())
    }

    pub fn digest(&mut self, label: &str, value: &Digest) -> &mut Self {
        self.bytes(label, &value.0)
    }

    pub fn finish(&self) -> Digest {
        Digest(self.hasher.clone().finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        assert_eq!(Digest::of_bytes(b"abc").hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn file_digest_matches_bytes_digest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"hello world").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), Digest::of_bytes(b"hello world"));
    }

    #[test]
    fn builder_fields_are_unambiguous() {
        let a = DigestBuilder::new("t").str("x", "ab").str("y", "c").finish();
        let b = DigestBuilder::new("t").str("x", "a").str("y", "bc").finish();
        assert_ne!(a, b);
    }

    #[test]
    fn parse_roundtrip_and_reject_garbage() {
        let d = Digest::of_bytes(b"x");
        assert_eq!(d.hex().parse::<Digest>().unwrap(), d);
        assert_eq!(format!("sha256:{}", d.hex()).parse::<Digest>().unwrap(), d);
        assert!("abc".parse::<Digest>().is_err());
        assert!("zz".repeat(32).parse::<Digest>().is_err());
    }
}
