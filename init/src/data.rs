//! The data partition of an A/B disk, at every boot: grown to the disk's
//! end if the disk is larger than the image was (a cloud disk), mounted
//! at /var/lib/kiln, and its ext4 grown online to fill the partition.
//! Nothing is ever formatted here: a data partition without an ext4 is
//! left alone.

use kiln_boot::gpt::{BlockDev, Table};
use kiln_init::config::DATA_DIR;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// `BLKPG` and its partition-resize operation (linux/blkpg.h).
const BLKPG: libc::Ioctl = 0x1269;
const BLKPG_RESIZE_PARTITION: libc::c_int = 3;
/// `EXT4_IOC_RESIZE_FS`: `_IOW('f', 16, __u64)`.
const EXT4_IOC_RESIZE_FS: libc::Ioctl = 0x4008_6610;
/// Partitions end on whole MiB.
const ALIGN_SECTORS: u64 = 2048;

#[repr(C)]
struct BlkpgPartition {
    start: libc::c_longlong,
    length: libc::c_longlong,
    pno: libc::c_int,
    devname: [u8; 64],
    volname: [u8; 64],
}

#[repr(C)]
struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut libc::c_void,
}

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

/// Sets the data partition of `disk` (`/dev/vda`, whose partition nodes
/// `node(number)` names) up: what was done, for the log.
pub fn set_up(disk: &str, node: &dyn Fn(u32) -> Option<String>) -> io::Result<String> {
    let mut dev = kiln_boot::disk::FileDisk::open(disk, true)?;
    let mut table = Table::read(&mut dev).map_err(|e| other(e.to_string()))?;
    let part = table
        .partitions()
        .into_iter()
        .find(|p| p.type_guid == kiln_boot::DATA_TYPE)
        .ok_or_else(|| other(format!("{disk} has no data partition")))?;
    let mut notes = Vec::new();
    let mut last = part.last_lba;
    if let Some(new_last) = table.grow_to_end(part.number, dev.last_lba(), ALIGN_SECTORS) {
        table.write(&mut dev).map_err(|e| other(e.to_string()))?;
        resize_partition(disk, part.number, part.first_lba, new_last)?;
        notes.push(format!(
            "partition grown from {} to {} MiB",
            part.len() >> 20,
            ((new_last + 1 - part.first_lba) * 512) >> 20
        ));
        last = new_last;
    }
    let path = node(part.number)
        .ok_or_else(|| other(format!("no node for partition {} of {disk}", part.number)))?;
    let fs = std::fs::File::open(&path)?;
    let mut sb = [0u8; 1024];
    fs.read_exact_at(&mut sb, 1024)?;
    if u16::from_le_bytes([sb[56], sb[57]]) != 0xef53 {
        return Err(other(format!("{path} holds no ext4: left alone")));
    }
    let block = 1024u64 << u32::from_le_bytes([sb[24], sb[25], sb[26], sb[27]]).min(6);
    let blocks = u64::from(u32::from_le_bytes([sb[4], sb[5], sb[6], sb[7]]));
    drop(fs);
    crate::sys::mount(
        Some(&path),
        DATA_DIR,
        Some("ext4"),
        libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )?;
    let want = (last + 1 - part.first_lba) * 512 / block;
    if want > blocks {
        let dir = std::fs::File::open(DATA_DIR)?;
        // SAFETY: the ioctl reads one u64 the pointer refers to.
        let r = unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_RESIZE_FS, &want) };
        if r < 0 {
            let e = io::Error::last_os_error();
            notes.push(format!("growing its ext4 failed: {e}"));
        } else {
            notes.push(format!(
                "ext4 grown from {} to {} MiB",
                (blocks * block) >> 20,
                (want * block) >> 20
            ));
        }
    }
    let mut line = format!("data: {path} (ext4) mounted on {DATA_DIR}");
    if !notes.is_empty() {
        line.push_str(&format!("; {}", notes.join("; ")));
    }
    Ok(line)
}

/// Tells the kernel partition `number` of `disk` now ends at `last`.
fn resize_partition(disk: &str, number: u32, first: u64, last: u64) -> io::Result<()> {
    let f = std::fs::File::open(disk)?;
    let bytes = |sectors: u64| libc::c_longlong::try_from(sectors * 512).unwrap_or(0);
    let mut part = BlkpgPartition {
        start: bytes(first),
        length: bytes(last + 1 - first),
        pno: libc::c_int::try_from(number).unwrap_or(0),
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: libc::c_int::try_from(std::mem::size_of::<BlkpgPartition>()).unwrap_or(0),
        data: (&raw mut part).cast(),
    };
    // SAFETY: `arg` points at a live blkpg_partition of the stated size.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKPG, &mut arg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Without a data partition, /var/lib/kiln is a tmpfs: volumes work, and
/// are gone at the next boot.
pub fn tmpfs() -> io::Result<()> {
    crate::sys::mount(
        Some("tmpfs"),
        DATA_DIR,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=755"),
    )
}
