//! Signing keys of published stores: ed25519 (RFC 8032, through
//! `ed25519-dalek`), written as text so an operator can read, copy and
//! paste them.
//!
//! - A public key is `ed25519:` followed by the 32-byte key in base64: the
//!   form `--trust` and `trust = [...]` take, and the form `btm key
//!   generate` prints.
//! - A secret key file holds one line, `ed25519-secret:` and the 32-byte
//!   seed in base64, and must be readable by its owner only.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::Signer;

const PUBLIC_PREFIX: &str = "ed25519:";
const SECRET_PREFIX: &str = "ed25519-secret:";

/// A bad key, key file or signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not a public key in the `ed25519:BASE64` form.
    #[error("'{0}' is not a public key (expected ed25519: and 44 base64 characters, as `btm key generate` prints)")]
    BadPublic(String),
    /// The secret key file cannot be used.
    #[error("signing key {path}: {detail}")]
    BadSecret {
        /// The file.
        path: String,
        /// Why.
        detail: String,
    },
    /// A signature that is malformed or does not verify.
    #[error("bad signature")]
    BadSignature,
}

/// A key that verifies signatures.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", STANDARD.encode(self.0.as_bytes()))
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        let bad = || KeyError::BadPublic(s.to_owned());
        let b64 = s.trim().strip_prefix(PUBLIC_PREFIX).ok_or_else(bad)?;
        PublicKey::from_base64(b64).ok_or_else(bad)
    }
}

impl PublicKey {
    /// The key from the base64 of its 32 bytes; `None` if it is not one.
    pub fn from_base64(b64: &str) -> Option<Self> {
        let bytes: [u8; 32] = STANDARD.decode(b64).ok()?.try_into().ok()?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .ok()
            .map(PublicKey)
    }

    /// The base64 of its 32 bytes (without the `ed25519:` prefix).
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.as_bytes())
    }

    /// Whether `sig` (base64 of 64 bytes) signs `message` with this key.
    /// Strict verification: no malleable or small-order signatures.
    pub fn verify(&self, message: &[u8], sig: &str) -> Result<(), KeyError> {
        let bytes: [u8; 64] = STANDARD
            .decode(sig)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(KeyError::BadSignature)?;
        let sig = ed25519_dalek::Signature::from_bytes(&bytes);
        self.0
            .verify_strict(message, &sig)
            .map_err(|_| KeyError::BadSignature)
    }
}

/// A key that signs. Cloned only into the store that publishes with it
/// ([`crate::public::Publishing`]), which lives as long as the command.
#[derive(Clone)]
pub struct SigningKey(ed25519_dalek::SigningKey);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        write!(f, "SigningKey({})", self.public())
    }
}

impl SigningKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| KeyError::BadSecret {
            path: "(new key)".into(),
            detail: format!("no randomness from the operating system: {e}"),
        })?;
        Ok(SigningKey(ed25519_dalek::SigningKey::from_bytes(&seed)))
    }

    /// The key from its 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// Its public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The base64 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> String {
        STANDARD.encode(self.0.sign(message).to_bytes())
    }

    /// Read a key file. One that others may read is refused: a leaked
    /// publishing key lets anyone sign snapshots in the publisher's name.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let bad = |detail: String| KeyError::BadSecret {
            path: path.display().to_string(),
            detail,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if meta.mode() & 0o077 != 0 {
            return Err(bad(format!(
                "mode {:o} lets others read it; chmod 600 it",
                meta.mode() & 0o777
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let seed: [u8; 32] = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .and_then(|b64| STANDARD.decode(b64).ok())
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                bad("not a btm signing key (make one with `btm key generate FILE`)".into())
            })?;
        Ok(SigningKey::from_seed(seed))
    }

    /// Write the key to `path`, mode 0600, which must not exist yet: a
    /// key is never overwritten (it may be the only copy of a
    /// publisher's identity).
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let bad = |detail: String| KeyError::BadSecret {
            path: path.display().to_string(),
            detail,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    bad("already exists; a key is never overwritten".into())
                }
                _ => bad(e.to_string()),
            })?;
        let line = format!("{SECRET_PREFIX}{}\n", STANDARD.encode(self.0.to_bytes()));
        f.write_all(line.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| bad(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_saved_key_loads_and_is_never_overwritten() {
        let dir = tempfile::tempdir().expect("must succeed");
        let path = dir.path().join("k");
        let key = SigningKey::generate().expect("must succeed");
        key.save(&path).expect("must succeed");
        assert_eq!(
            SigningKey::load(&path).expect("must succeed").public(),
            key.public()
        );
        let again = SigningKey::generate()
            .expect("must succeed")
            .save(&path)
            .expect_err("must fail");
        assert!(again.to_string().contains("never overwritten"), "{again}");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .expect("must succeed");
        let open = SigningKey::load(&path).expect_err("must fail").to_string();
        assert!(open.contains("chmod 600"), "{open}");
    }

    #[test]
    fn bad_public_keys_are_named() {
        for s in ["", "ed25519:", "ed25519:abc", "rsa:AAAA", "ed25519:!!!!"] {
            let e = s.parse::<PublicKey>().expect_err("must fail");
            assert!(e.to_string().contains("is not a public key"), "{e}");
        }
    }

    proptest! {
        #[test]
        fn signatures_verify_only_for_their_key_and_message(
            seed in any::<[u8; 32]>(),
            other in any::<[u8; 32]>(),
            msg in prop::collection::vec(any::<u8>(), 0..200),
            flip in any::<usize>(),
        ) {
            let key = SigningKey::from_seed(seed);
            let public: PublicKey = key.public().to_string().parse().expect("must succeed");
            let sig = key.sign(&msg);
            prop_assert!(public.verify(&msg, &sig).is_ok());
            if other != seed {
                prop_assert!(SigningKey::from_seed(other).public().verify(&msg, &sig).is_err());
            }
            let mut changed = msg.clone();
            if changed.is_empty() { changed.push(1) } else { let i = flip % changed.len(); changed[i] ^= 1 }
            prop_assert!(public.verify(&changed, &sig).is_err());
            prop_assert!(public.verify(&msg, "not base64").is_err());
        }
    }
}
