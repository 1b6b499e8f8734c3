//! A/B disks offline (a VM's disk while it is off): a newer build of the
//! same recipe written into the inactive slot, verified and armed; and
//! rollback to the other slot. The running (active) slot is the one the
//! chooser would boot now; nothing here writes to it, only the boot bits
//! of both.

use kiln_boot::disk::{self, FileDisk, SlotInfo, SlotWriter};
use kiln_boot::gpt::{BlockDev, SECTOR};
use kiln_boot::slot::{self, HEADER_LEN};
use kiln_boot::{choose, Slot, SlotHeader, SlotState};
use std::cmp::Ordering;
use std::io;
use std::path::{Path, PathBuf};

/// Why an offline A/B operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum AbError {
    /// Reading or writing a disk failed.
    #[error("{}", path.display())]
    Io {
        /// The disk or image.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The file is an encoded disk (qcow2, VMDK, VHD), not a raw one.
    #[error("{} is a {format} image: update and rollback work on raw disks (qemu-img convert -O raw first)", path.display())]
    NotRaw {
        /// The file.
        path: PathBuf,
        /// Its format.
        format: &'static str,
    },
    /// No slot-a and slot-b partitions.
    #[error("{}: not an A/B disk (no slot-a and slot-b partitions); build it with [disk] update = \"ab\"", .0.display())]
    NotAb(PathBuf),
    /// No slot holds a valid image.
    #[error("{}: no slot holds a valid image", .0.display())]
    NoImage(PathBuf),
    /// The update is a build of another recipe.
    #[error("the update is a build of {new:?}, the disk runs {running:?}: an update must be a build of the same recipe")]
    OtherRecipe {
        /// The update's recipe name.
        new: String,
        /// The running slot's.
        running: String,
    },
    /// The update is not newer than what runs.
    #[error(
        "version {new} is not newer than {running}, which the disk runs (versions order as semver)"
    )]
    NotNewer {
        /// The update's version.
        new: String,
        /// The running slot's.
        running: String,
    },
    /// The update does not fit the slot.
    #[error("the update needs {need} MiB (root, hash tree and UKI) but slot {slot} is {have} MiB: rebuild the disk with a larger [disk] slot_size")]
    TooBig {
        /// Needed, MiB (rounded up).
        need: u64,
        /// The slot's size, MiB.
        have: u64,
        /// The slot.
        slot: char,
    },
    /// Rollback with no image in the other slot.
    #[error("slot {0} holds no image to roll back to")]
    NothingToRollBackTo(char),
    /// What was written did not read back the same.
    #[error(
        "slot {0} did not read back as written: the disk is faulty; the slot is left unbootable"
    )]
    Verify(char),
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> AbError + '_ {
    move |source| AbError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Refuses encoded disk images by their magic.
fn check_raw(path: &Path) -> Result<(), AbError> {
    use std::io::Read;
    let mut head = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(io_err(path))?;
    let format = match &head[..n] {
        b"QFI\xfb" => "qcow2",
        b"KDMV" => "VMDK",
        _ => return Ok(()),
    };
    Err(AbError::NotRaw {
        path: path.to_path_buf(),
        format,
    })
}

/// A disk's slots, and which one runs (the chooser's pick).
pub struct Disk {
    path: PathBuf,
    dev: FileDisk,
    /// Slot A then slot B.
    pub slots: Vec<SlotInfo>,
}

impl Disk {
    /// Opens an A/B disk image.
    pub fn open(path: &Path, write: bool) -> Result<Disk, AbError> {
        check_raw(path)?;
        let text = path.display().to_string();
        let mut dev = FileDisk::open(&text, write).map_err(io_err(path))?;
        let (_, slots) = disk::read(&mut dev).map_err(io_err(path))?;
        if slots.iter().map(|s| s.slot).collect::<Vec<_>>() != [Slot::A, Slot::B] {
            return Err(AbError::NotAb(path.to_path_buf()));
        }
        Ok(Disk {
            path: path.to_path_buf(),
            dev,
            slots,
        })
    }

    /// The slot the chooser would boot now.
    pub fn active(&self) -> Result<&SlotInfo, AbError> {
        let candidates: Vec<(Slot, SlotState, bool)> = self
            .slots
            .iter()
            .map(|s| (s.slot, s.state, s.header.is_some()))
            .collect();
        let c = choose(&candidates).ok_or_else(|| AbError::NoImage(self.path.clone()))?;
        self.slot(c.slot)
    }

    fn slot(&self, slot: Slot) -> Result<&SlotInfo, AbError> {
        self.slots
            .iter()
            .find(|s| s.slot == slot)
            .ok_or_else(|| AbError::NotAb(self.path.clone()))
    }

    fn reread(&mut self) -> Result<(), AbError> {
        let (_, slots) = disk::read(&mut self.dev).map_err(io_err(&self.path))?;
        self.slots = slots;
        Ok(())
    }

    fn set_state(&mut self, number: u32, state: SlotState) -> Result<(), AbError> {
        disk::set_state(&mut self.dev, number, state).map_err(io_err(&self.path))
    }
}

/// What an update did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The slot written and armed.
    pub slot: Slot,
    /// The version it holds, and the one that ran.
    pub version: String,
    /// See `version`.
    pub previous: String,
    /// Boots it gets to be judged healthy.
    pub tries: u8,
}

/// Applies `image` (a newer build of the same recipe, as `kiln build`
/// wrote it) to the inactive slot of `disk`: disarmed, written, read back
/// and compared, its header written last, then armed to boot next.
/// Cut short anywhere, the disk still boots what it ran.
pub fn update(disk_path: &Path, image: &Path) -> Result<Applied, AbError> {
    let mut disk = Disk::open(disk_path, true)?;
    let mut src = Disk::open(image, false)?;
    let from = src.active()?.clone();
    let new = from
        .header
        .clone()
        .ok_or_else(|| AbError::NoImage(image.to_path_buf()))?;
    let active = disk.active()?.clone();
    let running = active
        .header
        .clone()
        .ok_or_else(|| AbError::NoImage(disk_path.to_path_buf()))?;
    if new.name != running.name {
        return Err(AbError::OtherRecipe {
            new: new.name,
            running: running.name,
        });
    }
    if kiln_boot::version::compare(&new.version, &running.version) != Some(Ordering::Greater) {
        return Err(AbError::NotNewer {
            new: new.version,
            running: running.version,
        });
    }
    let target = disk.slot(active.slot.other())?.clone();
    let need = new.uki_offset + new.uki_len + HEADER_LEN as u64;
    if need > target.len {
        return Err(AbError::TooBig {
            need: need.div_ceil(1 << 20),
            have: target.len >> 20,
            slot: target.slot.letter(),
        });
    }
    let len = new.uki_offset + new.uki_len;
    let wr = io_err(disk_path);
    let mut slot =
        SlotWriter::begin(&mut disk.dev, &disk.slots, active.number, len).map_err(&wr)?;
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).map_or(CHUNK, |left| left.min(CHUNK));
        let n_read = n.next_multiple_of(SECTOR);
        src.dev
            .read(from.first_lba + done / SECTOR as u64, &mut buf[..n_read])
            .map_err(io_err(image))?;
        slot.write(&buf[..n]).map_err(&wr)?;
        done += n as u64;
    }
    let armed = slot.finish(&new).map_err(|e| match e.kind() {
        io::ErrorKind::InvalidData => AbError::Verify(target.slot.letter()),
        _ => wr(e),
    })?;
    Ok(Applied {
        slot: target.slot,
        version: new.version,
        previous: running.version,
        tries: armed.tries,
    })
}

/// The slot `image` boots: its header and its bytes (root, hash tree,
/// UKI), to publish as an update.
pub fn slot_content(image: &Path) -> Result<(SlotHeader, impl io::Read), AbError> {
    let disk = Disk::open(image, false)?;
    let slot = disk.active()?;
    let header = slot
        .header
        .clone()
        .ok_or_else(|| AbError::NoImage(image.to_path_buf()))?;
    let mut file = std::fs::File::open(image).map_err(io_err(image))?;
    io::Seek::seek(
        &mut file,
        io::SeekFrom::Start(slot.first_lba * SECTOR as u64),
    )
    .map_err(io_err(image))?;
    let len = header.uki_offset + header.uki_len;
    Ok((header, io::Read::take(file, len)))
}

/// Makes the other slot boot next: the new active slot.
pub fn rollback(disk_path: &Path) -> Result<Slot, AbError> {
    let mut disk = Disk::open(disk_path, true)?;
    let active = disk.active()?.clone();
    let target = disk.slot(active.slot.other())?.clone();
    let Some(header) = &target.header else {
        return Err(AbError::NothingToRollBackTo(target.slot.letter()));
    };
    let (t, a) = slot::prefer(target.state, active.state, header.tries);
    disk.set_state(target.number, t)?;
    disk.set_state(active.number, a)?;
    disk.reread()?;
    Ok(target.slot)
}

const CHUNK: usize = 1 << 20;

/// One line per slot: `a (hello 1.0.0): good` and which boots next.
pub fn describe(disk: &Disk) -> Vec<String> {
    let next = disk.active().ok().map(|s| s.slot);
    disk.slots
        .iter()
        .map(|s| {
            let mark = if Some(s.slot) == next {
                "  <- boots next"
            } else {
                ""
            };
            format!("{}{mark}", disk::describe(s, false))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_disks_are_refused() {
        let dir = std::env::temp_dir().join(format!("kiln-ab-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let q = dir.join("x.qcow2");
        std::fs::write(&q, b"QFI\xfb\0\0\0\x03").unwrap();
        let e = Disk::open(&q, false).err().unwrap();
        assert!(e.to_string().contains("qemu-img convert -O raw"), "{e}");
        let blank = dir.join("blank.raw");
        std::fs::write(&blank, vec![0u8; 1 << 20]).unwrap();
        assert!(Disk::open(&blank, false).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
