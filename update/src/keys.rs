//! Keys: the publisher's signing key (PEM, as openssl writes it) and the
//! public keys a recipe pins (`[update] root_keys`).
//!
//! Ed25519, ECDSA P-256 and RSA keys, as TUF and tough know them. Keys are
//! compared by algorithm and key bytes, not by TUF key id: an id hashes a
//! key's text form, which differs with PEM line wrapping.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tough::schema::key::Key;
use tough::sign::{parse_keypair, Sign};

use crate::UpdateError;

/// A private key that signs the repository's metadata.
#[derive(Debug, Clone)]
pub struct SigningKey {
    path: PathBuf,
    /// What tough parses: PKCS#8 DER (Ed25519, ECDSA) or the PEM (RSA).
    data: Vec<u8>,
    public: PublicKey,
}

impl SigningKey {
    /// Reads a PEM private key (`openssl genpkey -algorithm ed25519`,
    /// `openssl genrsa`, an EC P-256 key in PKCS#8).
    pub fn load(path: &Path) -> Result<SigningKey, UpdateError> {
        let bad = |why: String| UpdateError::Key {
            path: path.to_path_buf(),
            why,
        };
        let raw = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let text = String::from_utf8_lossy(&raw);
        // tough reads Ed25519 and ECDSA keys as DER, RSA as PEM.
        let der = pem_body(&text, "PRIVATE KEY");
        let (data, sign) = match der.as_deref().map(parse_keypair) {
            Some(Ok(k)) => (der.unwrap_or_default(), k.tuf_key()),
            _ => match parse_keypair(&raw) {
                Ok(k) => (raw, k.tuf_key()),
                Err(_) => {
                    return Err(bad(
                        "not a PEM private key tough can sign with (Ed25519, ECDSA P-256 in PKCS#8, or RSA)".into(),
                    ))
                }
            },
        };
        let public = PublicKey::of(&sign).ok_or_else(|| bad("unsupported key type".into()))?;
        Ok(SigningKey {
            path: path.to_path_buf(),
            data,
            public,
        })
    }

    /// Its public half.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Its public half as TUF writes it in root.json.
    pub fn tuf_key(&self) -> Result<Key, UpdateError> {
        parse_keypair(&self.data)
            .map(|k| k.tuf_key())
            .map_err(|e| UpdateError::Key {
                path: self.path.clone(),
                why: e.to_string(),
            })
    }
}

#[tough::async_trait]
impl tough::key_source::KeySource for SigningKey {
    async fn as_sign(&self) -> Result<Box<dyn Sign>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Box::new(parse_keypair(&self.data)?))
    }

    async fn write(
        &self,
        _value: &str,
        _key_id_hex: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Err("kiln never writes keys".into())
    }
}

/// A public key: its algorithm and bytes (SubjectPublicKeyInfo DER for
/// RSA and ECDSA, the raw 32 bytes for Ed25519).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKey {
    /// `ed25519`, `ecdsa` or `rsa`.
    pub kind: String,
    /// The key, hex.
    pub public: String,
}

/// Ed25519's SubjectPublicKeyInfo before its 32 key bytes.
const ED25519_SPKI: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

impl PublicKey {
    /// Reads a PEM public key (`openssl pkey -pubout`).
    pub fn load(path: &Path) -> Result<PublicKey, UpdateError> {
        let bad = |why: String| UpdateError::Key {
            path: path.to_path_buf(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let der = pem_body(&text, "PUBLIC KEY").ok_or_else(|| {
            bad("not a PEM public key (`-----BEGIN PUBLIC KEY-----`, as `openssl pkey -pubout` writes)".into())
        })?;
        let key = match der.strip_prefix(&ED25519_SPKI[..]) {
            Some(raw) if raw.len() == 32 => Key::from_str(&hex::encode(raw)),
            _ => Key::from_str(text.trim()),
        };
        key.ok()
            .as_ref()
            .and_then(PublicKey::of)
            .ok_or_else(|| bad("not an Ed25519, ECDSA P-256 or RSA public key".into()))
    }

    /// The key a TUF key holds.
    pub fn of(key: &Key) -> Option<PublicKey> {
        let (kind, bytes): (&str, &[u8]) = match key {
            Key::Ed25519 { keyval, .. } => ("ed25519", &keyval.public),
            Key::Ecdsa { keyval, .. } | Key::EcdsaOld { keyval, .. } => ("ecdsa", &keyval.public),
            Key::Rsa { keyval, .. } => ("rsa", &keyval.public),
        };
        Some(PublicKey {
            kind: kind.into(),
            public: hex::encode(bytes),
        })
    }
}

impl fmt::Display for PublicKey {
    /// `ed25519 SHA256:1a2b…` (16 hex digits of its sha256).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = hex::encode(Sha256::digest(self.public.as_bytes()));
        write!(f, "{} key {}", self.kind, &d[..16])
    }
}

/// The DER inside `-----BEGIN {label}-----` … `-----END {label}-----`.
fn pem_body(text: &str, label: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let body: String = text[start..stop].split_whitespace().collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::Command;

    /// A private key and its public half written by openssl.
    pub(crate) fn openssl_key(dir: &Path, name: &str, alg: &[&str]) -> (PathBuf, PathBuf) {
        let (key, public) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.pub")),
        );
        let ok = Command::new("openssl")
            .args(["genpkey", "-out"])
            .arg(&key)
            .args(alg)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
            && Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(&key)
                .arg("-out")
                .arg(&public)
                .status()
                .unwrap()
                .success();
        assert!(ok, "openssl genpkey {alg:?}");
        (key, public)
    }

    #[test]
    fn openssl_keys_load_and_match_their_public_halves() {
        let dir = tempfile::tempdir().unwrap();
        for (name, alg) in [
            ("ed", &["-algorithm", "ed25519"][..]),
            (
                "ec",
                &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            ),
            (
                "rsa",
                &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            ),
        ] {
            let (key, public) = openssl_key(dir.path(), name, alg);
            let signing = SigningKey::load(&key).unwrap();
            let pinned = PublicKey::load(&public).unwrap();
            assert_eq!(signing.public(), &pinned, "{name}");
            assert_eq!(PublicKey::of(&signing.tuf_key().unwrap()).unwrap(), pinned);
            // Either half in the other's place is refused.
            assert!(SigningKey::load(&public).is_err(), "{name}");
            assert!(PublicKey::load(&key).is_err(), "{name}");
        }
    }
}
