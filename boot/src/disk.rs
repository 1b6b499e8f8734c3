//! A/B disks as files (a disk image, or a block device in the guest):
//! their slots read, their boot bits written in both GPT copies. For the
//! init and the builder (`std` feature); the chooser has its own disk.

extern crate std;

use crate::gpt::{BlockDev, Partition, Table, SECTOR};
use crate::slot::HEADER_LEN;
use crate::{Slot, SlotHeader, SlotState};
use std::format;
use std::io;
use std::os::unix::fs::FileExt;
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

/// A disk (or image file) as sectors.
pub struct FileDisk {
    file: std::fs::File,
    sectors: u64,
}

impl FileDisk {
    /// Opens `path` for reading and, if `write`, writing.
    pub fn open(path: &str, write: bool) -> io::Result<FileDisk> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)?;
        // A block device's length is where seeking to its end lands.
        let len = io::Seek::seek(&mut &file, io::SeekFrom::End(0))?;
        Ok(FileDisk {
            file,
            sectors: len / SECTOR as u64,
        })
    }
}

impl FileDisk {
    /// Reads what there is at byte `offset` (0 at the end).
    pub fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    /// Reads exactly `buf.len()` bytes at byte `offset`.
    pub fn read_exact_bytes(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

impl BlockDev for FileDisk {
    type Error = io::Error;
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, lba * SECTOR as u64)
    }
    fn write(&mut self, lba: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, lba * SECTOR as u64)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn last_lba(&self) -> u64 {
        self.sectors.saturating_sub(1)
    }
}

fn gpt_err(e: crate::gpt::Error<io::Error>) -> io::Error {
    match e {
        crate::gpt::Error::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

/// A slot as the disk's table and header say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// Which slot.
    pub slot: Slot,
    /// Its partition number.
    pub number: u32,
    /// Its partition's first sector and size in bytes.
    pub first_lba: u64,
    /// Bytes.
    pub len: u64,
    /// Its boot bits.
    pub state: SlotState,
    /// What it holds, if it holds a valid image.
    pub header: Option<SlotHeader>,
}

/// Both slots of the A/B disk `disk`.
pub fn read(disk: &mut FileDisk) -> io::Result<(Table, Vec<SlotInfo>)> {
    let table = Table::read(disk).map_err(gpt_err)?;
    let mut out = Vec::new();
    for p in table.partitions() {
        if p.type_guid != crate::SLOT_TYPE {
            continue;
        }
        let Some(slot) = Slot::from_partition_name(&p.name) else {
            continue;
        };
        out.push(SlotInfo {
            slot,
            number: p.number,
            first_lba: p.first_lba,
            len: p.len(),
            state: SlotState::from_attributes(p.attributes),
            header: header(disk, &p),
        });
    }
    out.sort_by_key(|s| s.slot);
    Ok((table, out))
}

/// The partition's slot header, if valid and fitting.
pub fn header(disk: &mut FileDisk, p: &Partition) -> Option<SlotHeader> {
    let mut b = vec![0u8; crate::slot::HEADER_LEN];
    let lba = (p.last_lba + 1).checked_sub((b.len() / SECTOR) as u64)?;
    disk.read(lba, &mut b).ok()?;
    SlotHeader::decode(&b).filter(|h| h.fits(p.len()))
}

/// Writes `state` into partition `number`'s boot bits, both GPT copies.
pub fn set_state(disk: &mut FileDisk, number: u32, state: SlotState) -> io::Result<()> {
    let mut table = Table::read(disk).map_err(gpt_err)?;
    let p = table
        .partitions()
        .into_iter()
        .find(|p| p.number == number)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no partition {number}")))?;
    table
        .set_attributes(number, state.to_attributes(p.attributes))
        .map_err(gpt_err)?;
    table.write(disk).map_err(gpt_err)
}

/// Marks partition `number` of `disk` good: it booted healthy.
pub fn mark_good(disk: &str, number: u32) -> io::Result<()> {
    let mut d = FileDisk::open(disk, true)?;
    let (_, slots) = read(&mut d)?;
    let s = slots
        .iter()
        .find(|s| s.number == number)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the slot is gone"))?;
    set_state(&mut d, number, s.state.marked_good())
}

/// Marks partition `number` of `disk` failed (no tries, not successful):
/// its root is corrupt. Whether the other slot can boot instead.
pub fn mark_failed(disk: &str, number: u32) -> io::Result<bool> {
    let mut d = FileDisk::open(disk, true)?;
    let (_, slots) = read(&mut d)?;
    let me = slots.iter().find(|s| s.number == number);
    let other = slots.iter().find(|s| s.number != number);
    let failed = SlotState {
        tries: 0,
        successful: false,
        ..me.map(|s| s.state).unwrap_or_default()
    };
    set_state(&mut d, number, failed)?;
    Ok(other.is_some_and(|o| o.header.is_some() && o.state.bootable()))
}

/// Writes a build into a slot that is not running: disarmed and its
/// header zeroed first, its bytes in order, read back and compared, the
/// header last, then armed to boot next. Cut short anywhere (power loss,
/// a killed process), the disk still boots the slot it ran.
pub struct SlotWriter<'a> {
    disk: &'a mut FileDisk,
    target: SlotInfo,
    active: SlotInfo,
    at: u64,
    hash: sha2::Sha256,
}

impl<'a> SlotWriter<'a> {
    /// Starts writing the slot other than `active` (a partition number)
    /// with `len` bytes (refused if they and a header do not fit).
    pub fn begin(
        disk: &'a mut FileDisk,
        slots: &[SlotInfo],
        active: u32,
        len: u64,
    ) -> io::Result<SlotWriter<'a>> {
        let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        let me = slots.iter().find(|s| s.number == active);
        let other = slots.iter().find(|s| s.number != active);
        let (Some(active), Some(target)) = (me, other) else {
            return Err(invalid("the disk has no second slot".into()));
        };
        if len + HEADER_LEN as u64 > target.len {
            return Err(invalid(format!(
                "the update needs {} MiB and slot {} has {} MiB",
                (len + HEADER_LEN as u64).div_ceil(1 << 20),
                target.slot.letter(),
                target.len >> 20
            )));
        }
        // Unbootable while written: no priority, no header.
        set_state(disk, target.number, SlotState::default())?;
        disk.write(header_lba(target), &[0u8; HEADER_LEN])?;
        disk.flush()?;
        Ok(SlotWriter {
            disk,
            target: target.clone(),
            active: active.clone(),
            at: 0,
            hash: sha2::Sha256::default(),
        })
    }

    /// The slot being written.
    pub fn target(&self) -> &SlotInfo {
        &self.target
    }

    /// Appends `data`.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        use sha2::Digest;
        if self.at + data.len() as u64 + HEADER_LEN as u64 > self.target.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "more bytes than the slot holds",
            ));
        }
        let start = self.target.first_lba * SECTOR as u64 + self.at;
        self.disk.file.write_all_at(data, start)?;
        self.hash.update(data);
        self.at += data.len() as u64;
        Ok(())
    }

    /// Checks what was written, writes `header` and arms the slot: its
    /// new state.
    pub fn finish(self, header: &SlotHeader) -> io::Result<SlotState> {
        use sha2::Digest;
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        let len = header.uki_offset + header.uki_len;
        if self.at != len {
            return Err(bad(format!(
                "{} bytes written, the header describes {len}",
                self.at
            )));
        }
        self.disk.flush()?;
        let start = self.target.first_lba * SECTOR as u64;
        let mut back = sha2::Sha256::default();
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done).map_or(buf.len(), |l| l.min(buf.len()));
            self.disk.file.read_exact_at(&mut buf[..n], start + done)?;
            back.update(&buf[..n]);
            done += n as u64;
        }
        if back.finalize() != self.hash.finalize() {
            return Err(bad(format!(
                "slot {} reads back other bytes than were written",
                self.target.slot.letter()
            )));
        }
        self.disk
            .write(header_lba(&self.target), &header.encode())?;
        self.disk.flush()?;
        let (armed, other) = crate::slot::arm(self.active.state, header.tries);
        set_state(self.disk, self.target.number, armed)?;
        set_state(self.disk, self.active.number, other)?;
        Ok(armed)
    }
}

fn header_lba(s: &SlotInfo) -> u64 {
    s.first_lba + (s.len - HEADER_LEN as u64) / SECTOR as u64
}

/// One line on a slot for the console: `a (hello 1.0.0): good`.
/// `booted`: this boot runs it (a slot on trial whose tries are used up
/// is then on its last try, not failed).
pub fn describe(s: &SlotInfo, booted: bool) -> String {
    let what = match &s.header {
        Some(h) => format!("{} {}", h.name, h.version),
        None => "empty".to_string(),
    };
    let state = if s.header.is_none() {
        "no image".to_string()
    } else if s.state.successful {
        "good".to_string()
    } else if booted && s.state.tries == 0 {
        "on trial, last try".to_string()
    } else if s.state.failed() {
        "failed".to_string()
    } else {
        format!("on trial, {} tries left", s.state.tries)
    };
    format!("{} ({what}): {state}", s.slot.letter())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk file with two slot partitions (sgdisk's), A holding a header.
    fn disk(dir: &std::path::Path) -> (String, SlotHeader) {
        let path = dir.join("disk.img");
        std::fs::write(&path, vec![0u8; 8192 * 512]).unwrap();
        let ok = std::process::Command::new("sgdisk")
            .args([
                "-n1:2048:4095",
                "-c1:slot-a",
                "-t1:555c9764-dac5-47ac-ba44-d5ea243fadeb",
                "-A1:set:48",
                "-A1:set:56",
                "-n2:4096:6143",
                "-c2:slot-b",
                "-t2:555c9764-dac5-47ac-ba44-d5ea243fadeb",
            ])
            .arg(&path)
            .output()
            .expect("sgdisk (apt-get install gdisk)")
            .status
            .success();
        assert!(ok);
        let h = SlotHeader {
            root_len: 4096,
            uki_offset: 4096,
            uki_len: 100,
            uki_sha256: [0; 32],
            build_id: [7; 32],
            root_hash: [0; 32],
            name: "t".into(),
            version: "1".into(),
            tries: 3,
        };
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&h.encode(), 4096 * 512 - 4096).unwrap();
        (path.display().to_string(), h)
    }

    #[test]
    fn a_slot_write_cut_short_leaves_the_running_slot_booting() {
        let dir = std::env::temp_dir().join(format!("kiln-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, old) = disk(&dir);
        let mut d = FileDisk::open(&path, true).unwrap();
        let next = |d: &mut FileDisk| {
            let (_, s) = read(d).unwrap();
            let c: Vec<_> = s
                .iter()
                .map(|s| (s.slot, s.state, s.header.is_some()))
                .collect();
            (crate::choose(&c).unwrap().slot, s)
        };
        let (_, slots) = next(&mut d);
        let new = SlotHeader {
            version: "2".into(),
            build_id: [8; 32],
            uki_offset: 8192,
            uki_len: 300_000,
            tries: 2,
            ..old.clone()
        };
        let len = new.uki_offset + new.uki_len;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        // Cut short (power lost, the process killed): never finished.
        {
            let mut w = SlotWriter::begin(&mut d, &slots, 1, len).unwrap();
            assert_eq!(w.target().slot, Slot::B);
            w.write(&bytes[..100_000]).unwrap();
        }
        let (boots, s) = next(&mut d);
        assert_eq!((boots, s[1].header.is_none()), (Slot::A, true));
        // Fewer bytes than the header describes: nothing armed.
        {
            let mut w = SlotWriter::begin(&mut d, &slots, 1, len).unwrap();
            w.write(&bytes[..100_000]).unwrap();
            assert!(w.finish(&new).is_err());
        }
        assert_eq!(next(&mut d).0, Slot::A);
        // Too much for the slot (1 MiB with its header): refused at once.
        assert!(SlotWriter::begin(&mut d, &slots, 1, 2048 * 512).is_err());
        // Whole: B boots next, on trial for the new build's tries.
        let mut w = SlotWriter::begin(&mut d, &slots, 1, len).unwrap();
        w.write(&bytes).unwrap();
        let armed = w.finish(&new).unwrap();
        assert_eq!((armed.tries, armed.successful), (2, false));
        let (boots, s) = next(&mut d);
        assert_eq!((boots, s[1].header.as_ref()), (Slot::B, Some(&new)));
        assert_eq!(s[0].header.as_ref(), Some(&old));
        let mut back = vec![0u8; bytes.len()];
        d.read_exact_bytes(s[1].first_lba * 512, &mut back).unwrap();
        assert!(back == bytes);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reads_slots_and_writes_their_bits() {
        let dir = std::env::temp_dir().join(format!("kiln-slots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, h) = disk(&dir);
        let mut d = FileDisk::open(&path, true).unwrap();
        let (_, slots) = read(&mut d).unwrap();
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[0].header, Some(h));
        assert_eq!(slots[1].header, None);
        assert_eq!(describe(&slots[0], true), "a (t 1): good");
        assert_eq!(describe(&slots[1], false), "b (empty): no image");
        let trial = SlotState {
            priority: 2,
            tries: 1,
            successful: false,
        };
        set_state(&mut d, 1, trial).unwrap();
        let (_, slots) = read(&mut d).unwrap();
        assert_eq!(slots[0].state, trial);
        assert_eq!(
            describe(&slots[0], false),
            "a (t 1): on trial, 1 tries left"
        );
        let last = SlotState { tries: 0, ..trial };
        set_state(&mut d, 1, last).unwrap();
        let (_, slots) = read(&mut d).unwrap();
        assert_eq!(describe(&slots[0], true), "a (t 1): on trial, last try");
        assert_eq!(describe(&slots[0], false), "a (t 1): failed");
        // sgdisk agrees the table (both copies) is sound.
        let v = std::process::Command::new("sgdisk")
            .arg("-v")
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&v.stdout);
        assert!(text.contains("No problems found"), "{text}");
        assert!(set_state(&mut d, 9, trial).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
