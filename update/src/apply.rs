//! Applying an update to an A/B disk: the inactive slot written from the
//! manifest's chunks, each taken from the running slot when it holds it
//! and fetched otherwise, every one checked against its sha256.

use std::collections::HashMap;

use kiln_boot::disk::{self, FileDisk, SlotInfo, SlotWriter};
use kiln_boot::gpt::BlockDev;
use kiln_boot::SlotHeader;
use sha2::{Digest, Sha256};

use crate::manifest::{Chunk, Manifest, AVG_CHUNK, MAX_CHUNK, MIN_CHUNK};
use crate::UpdateError;

/// What an update did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The slot written and armed (`a` or `b`).
    pub slot: char,
    /// The version it holds, and the one running.
    pub version: String,
    /// See `version`.
    pub previous: String,
    /// Boots it gets to be judged healthy.
    pub tries: u8,
    /// Bytes fetched, and bytes copied from the running slot.
    pub fetched: u64,
    /// See `fetched`.
    pub reused: u64,
}

/// Where each chunk of a slot's bytes lies (by sha256): the running slot
/// chunked as a publisher would chunk it.
pub fn index(
    disk: &mut FileDisk,
    slot: &SlotInfo,
) -> Result<HashMap<String, (u64, u32)>, std::io::Error> {
    let Some(h) = &slot.header else {
        return Ok(HashMap::new());
    };
    let reader = SlotReader {
        disk,
        start: slot.first_lba * kiln_boot::gpt::SECTOR as u64,
        at: 0,
    };
    let mut out = HashMap::new();
    let cdc = fastcdc::v2020::StreamCDC::new(
        std::io::Read::take(reader, h.uki_offset + h.uki_len),
        MIN_CHUNK,
        AVG_CHUNK,
        MAX_CHUNK,
    );
    for c in cdc {
        let c = c.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(e) => e,
            e => std::io::Error::other(e.to_string()),
        })?;
        let len = u32::try_from(c.length).unwrap_or(u32::MAX);
        out.insert(hex::encode(Sha256::digest(&c.data)), (c.offset, len));
    }
    Ok(out)
}

struct SlotReader<'a> {
    disk: &'a mut FileDisk,
    start: u64,
    at: u64,
}

impl std::io::Read for SlotReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.disk.read_bytes(self.start + self.at, buf)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// Applies `manifest` (its header already parsed) to the disk at
/// `disk_path`: refused unless it is a newer build of the recipe the
/// running slot holds (`running`: its partition number, or the slot the
/// chooser picks). `fetch` gets a chunk the running slot lacks.
pub fn apply(
    disk_path: &str,
    running: Option<u32>,
    manifest: &Manifest,
    header: &SlotHeader,
    fetch: &mut dyn FnMut(&Chunk) -> Result<Vec<u8>, UpdateError>,
) -> Result<Applied, UpdateError> {
    let io = |source| UpdateError::Disk {
        disk: disk_path.to_string(),
        source,
    };
    let mut dev = FileDisk::open(disk_path, true).map_err(io)?;
    let (_, slots) = disk::read(&mut dev).map_err(io)?;
    let active = match running {
        Some(n) => slots.iter().find(|s| s.number == n),
        None => {
            let c: Vec<_> = slots
                .iter()
                .map(|s| (s.slot, s.state, s.header.is_some()))
                .collect();
            kiln_boot::choose(&c).and_then(|c| slots.iter().find(|s| s.slot == c.slot))
        }
    }
    .cloned()
    .ok_or_else(|| io(std::io::Error::other("no slot with a build to update")))?;
    let current = active
        .header
        .clone()
        .ok_or_else(|| io(std::io::Error::other("no slot with a build to update")))?;
    if current.name != header.name
        || kiln_boot::version::compare(&header.version, &current.version)
            != Some(std::cmp::Ordering::Greater)
    {
        return Err(UpdateError::NotAnUpdate {
            disk: disk_path.to_string(),
            running: format!("{} {}", current.name, current.version),
            new: format!("{} {}", header.name, header.version),
        });
    }
    let have = index(&mut dev, &active).map_err(io)?;
    let from = active.first_lba * kiln_boot::gpt::SECTOR as u64;
    let len = header.uki_offset + header.uki_len;
    // Read before the writer borrows the disk: the running slot never
    // changes while the other is written.
    let copy = FileDisk::open(disk_path, false).map_err(io)?;
    let mut w = SlotWriter::begin(&mut dev, &slots, active.number, len).map_err(io)?;
    let slot = w.target().slot.letter();
    let (mut fetched, mut reused) = (0, 0);
    let mut buf = Vec::new();
    for c in &manifest.chunks {
        let data = match have.get(&c.sha256) {
            Some(&(offset, n)) if n == c.len => {
                buf.resize(n as usize, 0);
                copy.read_exact_bytes(from + offset, &mut buf).map_err(io)?;
                reused += u64::from(n);
                &buf
            }
            _ => {
                buf = fetch(c)?;
                fetched += buf.len() as u64;
                &buf
            }
        };
        if hex::encode(Sha256::digest(data)) != c.sha256 || data.len() != c.len as usize {
            return Err(UpdateError::CorruptChunk {
                url: c.sha256.clone(),
                actual: hex::encode(Sha256::digest(data)),
            });
        }
        w.write(data).map_err(io)?;
    }
    let armed = w.finish(header).map_err(io)?;
    dev.flush().map_err(io)?;
    Ok(Applied {
        slot,
        version: header.version.clone(),
        previous: current.version,
        tries: armed.tries,
        fetched,
        reused,
    })
}
