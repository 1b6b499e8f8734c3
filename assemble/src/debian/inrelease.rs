//! `InRelease`: an OpenPGP cleartext-signed Release file.

use super::DebianError;
use crate::cache::Digest;
use pgp::composed::{CleartextSignedMessage, Deserializable, SignedPublicKey};
use std::collections::BTreeMap;

/// Checks `text`'s cleartext signature against the binary `keyring`
/// (concatenated public keys) and returns the signed text. At least one
/// signature must verify with a keyring primary key, or with a
/// signing-capable subkey whose binding to such a key verifies; signatures
/// by unknown keys (Debian signs with several) are ignored.
pub fn verify_inrelease(text: &str, keyring: &[u8]) -> Result<String, DebianError> {
    let keys: Vec<SignedPublicKey> = SignedPublicKey::from_bytes_many(keyring)
        .map_err(|e| DebianError::BadKeyring(e.to_string()))?
        .filter_map(Result::ok)
        .collect();
    if keys.is_empty() {
        return Err(DebianError::BadKeyring("no public keys".into()));
    }
    let (msg, _headers) = CleartextSignedMessage::from_string(text)
        .map_err(|e| DebianError::Signature(format!("not a cleartext-signed message: {e}")))?;
    for key in &keys {
        if msg.verify(&key.primary_key).is_ok() {
            return Ok(msg.signed_text());
        }
        for sub in &key.public_subkeys {
            let can_sign = sub.signatures.iter().any(|s| {
                s.typ() == Some(pgp::packet::SignatureType::SubkeyBinding) && s.key_flags().sign()
            });
            let revoked = sub
                .signatures
                .iter()
                .any(|s| s.typ() == Some(pgp::packet::SignatureType::SubkeyRevocation));
            if !can_sign || revoked {
                continue;
            }
            // Check the (cheaper to skip) message signature first, the
            // binding only for a subkey that actually signed.
            if msg.verify(&sub.key).is_ok() && sub.verify_bindings(&key.primary_key).is_ok() {
                return Ok(msg.signed_text());
            }
        }
    }
    Err(DebianError::Signature(format!(
        "none of {} signature(s) verifies with a keyring key",
        msg.signatures().len()
    )))
}

/// The fields of a Release file we use.
#[derive(Debug, Default)]
pub struct Release {
    pub suite: Option<String>,
    pub codename: Option<String>,
    /// `Date:` in seconds since the epoch: when the archive was published.
    pub date: Option<u64>,
    /// Path relative to `dists/SUITE/` → (sha256, size).
    pub sha256: BTreeMap<String, (Digest, u64)>,
}

impl Release {
    pub fn parse(text: &str) -> Result<Release, DebianError> {
        let paras = super::index::paragraphs(text);
        let p = paras
            .first()
            .ok_or_else(|| DebianError::Release("empty".into()))?;
        let mut r = Release {
            suite: p.get("Suite").cloned(),
            codename: p.get("Codename").cloned(),
            date: p.get("Date").and_then(|d| parse_date(d)),
            ..Release::default()
        };
        let list = p
            .get("SHA256")
            .ok_or_else(|| DebianError::Release("no SHA256 field".into()))?;
        for line in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let mut it = line.split_whitespace();
            let (Some(h), Some(size), Some(path), None) =
                (it.next(), it.next(), it.next(), it.next())
            else {
                return Err(DebianError::Release(format!("bad SHA256 line {line:?}")));
            };
            let d = Digest::from_hex(h)
                .map_err(|_| DebianError::Release(format!("bad SHA256 line {line:?}")))?;
            let size = size
                .parse()
                .map_err(|_| DebianError::Release(format!("bad SHA256 line {line:?}")))?;
            r.sha256.insert(path.to_string(), (d, size));
        }
        Ok(r)
    }
}

/// Parses an RFC 2822 date in UTC as Release files write it:
/// `Sat, 08 Nov 2025 09:05:39 UTC`.
pub fn parse_date(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s.split_once(", ").map_or(s, |(_, rest)| rest);
    let mut it = s.split_whitespace();
    let day: u64 = it.next()?.parse().ok()?;
    let month = match it.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = it.next()?.parse().ok()?;
    let mut hms = it.next()?.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if !matches!(it.next(), Some("UTC" | "GMT" | "+0000") | None) || !(1..=31).contains(&day) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days)
        .ok()
        .map(|d| d * 86_400 + h * 3600 + m * 60 + sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_dates() {
        assert_eq!(parse_date("Thu, 01 Jan 1970 00:00:00 UTC"), Some(0));
        assert_eq!(
            parse_date("Sat, 08 Nov 2025 09:05:39 UTC"),
            Some(1_762_592_739)
        );
        assert_eq!(
            parse_date("Tue, 29 Feb 2028 12:00:00 UTC"),
            Some(1_835_438_400)
        );
        assert_eq!(parse_date("yesterday"), None);
        assert_eq!(parse_date("Sat, 08 Nov 2025 09:05:39 CET"), None);
    }

    #[test]
    fn release_parsing() {
        let t = "Origin: Debian\nSuite: stable\nCodename: trixie\nMD5Sum:\n 00 1 x\nSHA256:\n \
                 0000000000000000000000000000000000000000000000000000000000000001 12 main/binary-amd64/Packages.xz\n \
                 0000000000000000000000000000000000000000000000000000000000000002 34 main/binary-amd64/Release\n";
        let r = Release::parse(t).unwrap();
        assert_eq!(r.codename.as_deref(), Some("trixie"));
        assert_eq!(r.sha256.len(), 2);
        assert_eq!(r.sha256["main/binary-amd64/Packages.xz"].1, 12);
        assert!(Release::parse("Suite: x\nSHA256:\n zz 1 a\n").is_err());
        assert!(Release::parse("Suite: x\n").is_err());
    }

    #[test]
    fn garbage_is_rejected() {
        let keyring = match std::fs::read(super::super::DEFAULT_KEYRING) {
            Ok(k) => k,
            Err(_) => {
                eprintln!("note: no Debian keyring installed, skipping");
                return;
            }
        };
        assert!(matches!(
            verify_inrelease("Suite: x\n", &keyring),
            Err(DebianError::Signature(_))
        ));
        assert!(matches!(
            verify_inrelease("x", b"not a keyring"),
            Err(DebianError::BadKeyring(_))
        ));
    }

    /// The real trixie InRelease verifies; any change to the signed text
    /// makes it fail.
    #[tokio::test]
    async fn network_real_inrelease_and_tampered() {
        let keyring = std::fs::read(super::super::DEFAULT_KEYRING).unwrap();
        let url = format!(
            "{}/dists/{}/InRelease",
            super::super::DEFAULT_MIRROR,
            super::super::DEFAULT_SUITE
        );
        let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
        let signed = verify_inrelease(&text, &keyring).unwrap();
        assert!(signed.contains("Codename: trixie"));

        let tampered = text.replacen("Codename: trixie", "Codename: trixiE", 1);
        assert_ne!(tampered, text);
        assert!(matches!(
            verify_inrelease(&tampered, &keyring),
            Err(DebianError::Signature(_))
        ));
        // Change one hash digit in the SHA256 list.
        let i = text.find("main/binary-amd64/Packages.xz").unwrap();
        let line_start = text[..i].rfind('\n').unwrap() + 2;
        let mut bytes = text.clone().into_bytes();
        bytes[line_start] = if bytes[line_start] == b'0' {
            b'1'
        } else {
            b'0'
        };
        let tampered = String::from_utf8(bytes).unwrap();
        assert!(verify_inrelease(&tampered, &keyring).is_err());
        // Subkey path: only the bookworm archive key (its signing subkey signed).
        let bookworm = keyring_only(&keyring, "Archive Automatic Signing Key (12/bookworm)");
        verify_inrelease(&text, &bookworm).unwrap();
        // Primary key path: the trixie release key signs with its primary.
        let release = keyring_only(&keyring, "Stable Release Key (13/trixie)");
        verify_inrelease(&text, &release).unwrap();
        // Keys that did not sign this file reject the genuine text.
        let bullseye = keyring_only(&keyring, "11/bullseye");
        assert!(matches!(
            verify_inrelease(&text, &bullseye),
            Err(DebianError::Signature(_))
        ));
    }

    /// The keyring's keys whose user id contains `uid`, serialised back.
    fn keyring_only(keyring: &[u8], uid: &str) -> Vec<u8> {
        use pgp::ser::Serialize;
        let mut out = Vec::new();
        let mut n = 0;
        for k in SignedPublicKey::from_bytes_many(keyring).unwrap() {
            let k = k.unwrap();
            let ids = k
                .details
                .users
                .iter()
                .map(|u| String::from_utf8_lossy(u.id.id()).into_owned())
                .collect::<Vec<_>>()
                .join(",");
            if ids.contains(uid) {
                k.to_writer(&mut out).unwrap();
                n += 1;
            }
        }
        assert!(n > 0, "no key with uid {uid:?}");
        out
    }
}
