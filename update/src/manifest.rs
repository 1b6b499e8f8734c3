//! The update manifest: which build a slot holds (its 4 KiB slot header)
//! and the slot's bytes as a list of content-defined chunks.
//!
//! Chunk boundaries come from the content (FastCDC), not from offsets, so
//! bytes inserted or removed early in the root shift no later boundary:
//! a one-line change to a service leaves most chunks as they were, and a
//! host fetches only the chunks its running slot does not hold.

use kiln_boot::slot::HEADER_LEN;
use kiln_boot::SlotHeader;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;

use crate::UpdateError;

/// The manifest's name in the TUF repository: its only target.
pub const TARGET: &str = "kiln-update.json";

/// The manifest format; a host refuses one it does not know.
pub const FORMAT: u32 = 1;

/// Chunk sizes (bytes): FastCDC's minimum, average and maximum. Small
/// enough that a changed file costs little, large enough that a GiB
/// root's list stays a few MB.
pub const MIN_CHUNK: usize = 16 << 10;
/// See [`MIN_CHUNK`].
pub const AVG_CHUNK: usize = 64 << 10;
/// See [`MIN_CHUNK`].
pub const MAX_CHUNK: usize = 256 << 10;

/// One chunk of the slot's bytes, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// sha256 of its bytes, hex: its name in the chunk store.
    pub sha256: String,
    /// Bytes.
    pub len: u32,
}

/// What an update holds: signed as the TUF repository's only target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The recipe's name and version, as in the header (for people).
    pub name: String,
    /// See `name`.
    pub version: String,
    /// The slot header, hex: written last, after every chunk.
    pub header: String,
    /// The slot's bytes from its start: root, hash tree, UKI.
    pub chunks: Vec<Chunk>,
}

impl Manifest {
    /// Chunks `content` (the slot's first `header.uki_offset +
    /// header.uki_len` bytes), handing each new chunk to `store`.
    pub fn build(
        header: &SlotHeader,
        content: impl Read,
        mut store: impl FnMut(&Chunk, &[u8]) -> Result<(), UpdateError>,
    ) -> Result<Manifest, UpdateError> {
        let len = header.uki_offset + header.uki_len;
        let mut chunks = Vec::new();
        let mut total = 0u64;
        let cdc =
            fastcdc::v2020::StreamCDC::new(content.take(len), MIN_CHUNK, AVG_CHUNK, MAX_CHUNK);
        for c in cdc {
            let c = c.map_err(|e| match e {
                fastcdc::v2020::Error::IoError(e) => UpdateError::Read(e),
                e => UpdateError::Read(std::io::Error::other(e.to_string())),
            })?;
            let chunk = Chunk {
                sha256: hex::encode(Sha256::digest(&c.data)),
                len: u32::try_from(c.length).unwrap_or(u32::MAX),
            };
            store(&chunk, &c.data)?;
            total += c.data.len() as u64;
            chunks.push(chunk);
        }
        if total != len {
            return Err(UpdateError::Read(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the slot holds {total} of its {len} bytes"),
            )));
        }
        Ok(Manifest {
            format: FORMAT,
            name: header.name.clone(),
            version: header.version.clone(),
            header: hex::encode(header.encode()),
            chunks,
        })
    }

    /// Parses a manifest and checks it holds together: a known format, a
    /// valid header naming the same build, chunks adding up to it.
    pub fn parse(data: &[u8]) -> Result<(Manifest, SlotHeader), UpdateError> {
        let bad = |why: String| UpdateError::BadManifest(why);
        let m: Manifest = serde_json::from_slice(data).map_err(|e| bad(e.to_string()))?;
        if m.format != FORMAT {
            return Err(bad(format!(
                "format {} (this kiln reads {FORMAT})",
                m.format
            )));
        }
        let raw = hex::decode(&m.header).map_err(|e| bad(format!("header: {e}")))?;
        let header = (raw.len() == HEADER_LEN)
            .then(|| SlotHeader::decode(&raw))
            .flatten()
            .ok_or_else(|| bad("header: not a valid slot header".into()))?;
        if (header.name.as_str(), header.version.as_str()) != (&m.name, &m.version) {
            return Err(bad(format!(
                "header holds {} {}, manifest says {} {}",
                header.name, header.version, m.name, m.version
            )));
        }
        let mut total = 0u64;
        for c in &m.chunks {
            if c.sha256.len() != 64 || hex::decode(&c.sha256).is_err() || c.len == 0 {
                return Err(bad(format!("chunk {:?} of {} bytes", c.sha256, c.len)));
            }
            total += u64::from(c.len);
        }
        if total != header.uki_offset + header.uki_len {
            return Err(bad(format!(
                "chunks hold {total} bytes, the header {}",
                header.uki_offset + header.uki_len
            )));
        }
        Ok((m, header))
    }

    /// The bytes of the chunks not in `have`, and of all of them.
    pub fn missing_bytes(&self, have: &dyn Fn(&str) -> bool) -> (u64, u64) {
        let mut seen = std::collections::HashSet::new();
        let (mut missing, mut all) = (0, 0);
        for c in &self.chunks {
            all += u64::from(c.len);
            if seen.insert(&c.sha256) && !have(&c.sha256) {
                missing += u64::from(c.len);
            }
        }
        (missing, all)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn header(len: u64, version: &str) -> SlotHeader {
        // The UKI starts 4 KiB aligned.
        let half = len / 2 / 4096 * 4096;
        SlotHeader {
            root_len: half,
            uki_offset: half,
            uki_len: len - half,
            uki_sha256: [1; 32],
            build_id: [2; 32],
            root_hash: [3; 32],
            name: "hello".into(),
            version: version.into(),
            tries: 1,
        }
    }

    /// Bytes that look like a filesystem: varied, not repeating.
    pub(crate) fn content(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    #[test]
    fn an_insertion_changes_few_chunks() {
        let a = content(4 << 20, 7);
        let mut b = a.clone();
        // A line added in the middle shifts everything after it.
        b.splice(2 << 20..2 << 20, b"echo one more line\n".iter().copied());
        let chunk = |data: &[u8], v| {
            Manifest::build(&header(data.len() as u64, v), data, |_, _| Ok(())).unwrap()
        };
        let (ma, mb) = (chunk(&a, "1"), chunk(&b, "2"));
        let have: std::collections::HashSet<_> = ma.chunks.iter().map(|c| &c.sha256).collect();
        let (missing, all) = mb.missing_bytes(&|h| have.iter().any(|x| *x == h));
        assert_eq!(all, b.len() as u64);
        // Only the chunks about the edit are new (FastCDC finds its cut
        // points again within a few chunks).
        assert!(
            missing < 2 * MAX_CHUNK as u64,
            "{missing} of {all} bytes to fetch"
        );
        let (m, h) = Manifest::parse(&serde_json::to_vec(&mb).unwrap()).unwrap();
        assert_eq!((m, h.version.as_str()), (mb, "2"));
    }

    #[test]
    fn inconsistent_manifests_are_refused() {
        let data = content(100_000, 3);
        let m = Manifest::build(&header(100_000, "1"), &data[..], |_, _| Ok(())).unwrap();
        let mut short = m.clone();
        short.chunks.pop();
        let mut other = m.clone();
        other.version = "9".into();
        let mut future = m.clone();
        future.format = 2;
        for (bad, why) in [
            (short, "chunks hold"),
            (other, "manifest says"),
            (future, "format 2"),
        ] {
            let e = Manifest::parse(&serde_json::to_vec(&bad).unwrap()).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
        let e = Manifest::build(&header(200_000, "1"), &data[..], |_, _| Ok(())).unwrap_err();
        let why = std::error::Error::source(&e).map(ToString::to_string);
        assert!(why.unwrap().contains("100000 of its 200000"), "{e}");
    }
}
