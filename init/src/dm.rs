//! Device-mapper through its ioctls (linux/dm-ioctl.h): the verified
//! root. Debian's kernel has no `CONFIG_DM_INIT` (`dm-mod.create=` does
//! nothing) and the image carries no veritysetup, so the init creates
//! the device, loads a one-target table and resumes it itself.

use std::io;
use std::os::fd::AsRawFd;

/// `sizeof(struct dm_ioctl)`.
const HEADER_SIZE: u32 = 312;
const HEADER: usize = HEADER_SIZE as usize;
/// `sizeof(struct dm_target_spec)`.
const SPEC: usize = 40;
const NAME_LEN: usize = 128;
/// The interface version this speaks; the kernel takes any same-major
/// client no newer than itself.
const VERSION: [u32; 3] = [4, 0, 0];
const READONLY_FLAG: u32 = 1 << 0;

/// The commands used (`DM_*_CMD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    DevCreate = 3,
    DevRemove = 4,
    /// The live table's status (dm-verity's: `V` valid, `C` corrupted).
    TableStatus = 12,
    /// With no suspend flag: resume, making a loaded table live.
    DevSuspend = 6,
    TableLoad = 9,
}

impl Cmd {
    /// `_IOWR(0xfd, cmd, struct dm_ioctl)`.
    fn request(self) -> u32 {
        (3 << 30) | (HEADER_SIZE << 16) | (0xfd << 8) | self as u32
    }
}

/// A dm-verity target over one device holding the data, then (from
/// `hash_start_block`, in 4 KiB blocks) the hash tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verity {
    /// `major:minor` of the device with data and tree.
    pub dev: (u32, u32),
    pub data_blocks: u64,
    /// Where the tree's top level starts (after its superblock).
    pub hash_start_block: u64,
    /// Hex.
    pub root_hash: String,
    /// Hex.
    pub salt: String,
}

impl Verity {
    /// Sectors the mapped device spans.
    fn sectors(&self) -> u64 {
        self.data_blocks * 8
    }

    /// The target's parameters (format 1, sha256, 4 KiB blocks). A
    /// corrupt block reads as EIO; the init watches the target's status
    /// for what else to do (see [`corrupted`]).
    fn params(&self) -> String {
        let (ma, mi) = self.dev;
        format!(
            "1 {ma}:{mi} {ma}:{mi} 4096 4096 {} {} sha256 {} {}",
            self.data_blocks, self.hash_start_block, self.root_hash, self.salt
        )
    }
}

/// A `struct dm_ioctl` for `name`, with `payload` after it.
fn message(name: &str, flags: u32, target_count: u32, payload: &[u8]) -> io::Result<Vec<u8>> {
    if name.is_empty() || name.len() >= NAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "device-mapper name must be 1-127 bytes",
        ));
    }
    let mut b = vec![0u8; HEADER + payload.len()];
    for (i, v) in VERSION.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    let size = u32::try_from(b.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    b[12..16].copy_from_slice(&size.to_ne_bytes());
    b[16..20].copy_from_slice(&HEADER_SIZE.to_ne_bytes());
    b[20..24].copy_from_slice(&target_count.to_ne_bytes());
    b[28..32].copy_from_slice(&flags.to_ne_bytes());
    b[48..48 + name.len()].copy_from_slice(name.as_bytes());
    b[HEADER..].copy_from_slice(payload);
    Ok(b)
}

/// The one-target table for `DM_TABLE_LOAD`: a `struct dm_target_spec`
/// and its NUL-terminated parameters, padded to 8 bytes.
fn table(target: &str, sectors: u64, params: &str) -> io::Result<Vec<u8>> {
    let len = (SPEC + params.len() + 1).next_multiple_of(8);
    let next = u32::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let mut b = vec![0u8; len];
    b[8..16].copy_from_slice(&sectors.to_ne_bytes());
    b[20..24].copy_from_slice(&next.to_ne_bytes());
    b[24..24 + target.len()].copy_from_slice(target.as_bytes());
    b[SPEC..SPEC + params.len()].copy_from_slice(params.as_bytes());
    Ok(b)
}

/// The `dev` field of a reply: the device's number, huge-encoded.
fn reply_dev(b: &[u8]) -> (u32, u32) {
    let mut d = [0u8; 8];
    d.copy_from_slice(&b[40..48]);
    // The kernel's huge encoding is the C library's for these sizes.
    let dev = u64::from_ne_bytes(d);
    (libc::major(dev), libc::minor(dev))
}

fn call(ctl: &std::fs::File, cmd: Cmd, buf: &mut [u8]) -> io::Result<()> {
    // SAFETY: `buf` starts with a dm_ioctl whose data_size is buf's length,
    // so the kernel reads and writes within it.
    let r = unsafe {
        libc::ioctl(
            ctl.as_raw_fd(),
            cmd.request() as libc::Ioctl,
            buf.as_mut_ptr(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Creates the read-only verity device `name`: its path, `/dev/dm-N`.
/// Needs dm-verity loaded (which makes /dev/mapper/control).
pub fn create_verity(name: &str, v: &Verity) -> io::Result<String> {
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")?;
    let mut create = message(name, 0, 0, &[])?;
    call(&ctl, Cmd::DevCreate, &mut create)?;
    let (_, minor) = reply_dev(&create);
    let loaded = table("verity", v.sectors(), &v.params())
        .and_then(|t| message(name, READONLY_FLAG, 1, &t))
        .and_then(|mut load| call(&ctl, Cmd::TableLoad, &mut load))
        .and_then(|()| message(name, 0, 0, &[]))
        .and_then(|mut resume| call(&ctl, Cmd::DevSuspend, &mut resume));
    if let Err(e) = loaded {
        // Nothing half-made stays behind.
        if let Ok(mut remove) = message(name, 0, 0, &[]) {
            let _ = call(&ctl, Cmd::DevRemove, &mut remove);
        }
        return Err(e);
    }
    Ok(format!("/dev/dm-{minor}"))
}

/// Whether verity device `name` has met a block that failed
/// verification (its status says `C`).
pub fn corrupted(name: &str) -> io::Result<bool> {
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")?;
    // Room for the reply: a target spec and its short status line.
    let mut m = message(name, 0, 0, &[0u8; 512])?;
    call(&ctl, Cmd::TableStatus, &mut m)?;
    Ok(status_says_corrupted(&m))
}

/// Reads dm-verity's status out of a `DM_TABLE_STATUS` reply.
fn status_says_corrupted(reply: &[u8]) -> bool {
    let u32_at = |at: usize| {
        reply
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_ne_bytes) as usize
    };
    let (start, count) = (u32_at(16), u32_at(20));
    count > 0 && reply.get(start + SPEC) == Some(&b'C')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn request_numbers_match_the_header() {
        // DM_DEV_CREATE, DM_TABLE_LOAD and DM_DEV_SUSPEND as the C macros
        // expand on x86_64.
        assert_eq!(Cmd::DevCreate.request(), 0xc138_fd03);
        assert_eq!(Cmd::TableLoad.request(), 0xc138_fd09);
        assert_eq!(Cmd::DevSuspend.request(), 0xc138_fd06);
        assert_eq!(Cmd::TableStatus.request(), 0xc138_fd0c);
    }

    #[test]
    fn message_layout() {
        let t = table("verity", 16, "x").unwrap();
        let m = message("kiln-root", READONLY_FLAG, 1, &t).unwrap();
        assert_eq!(u32_at(&m, 0), 4);
        assert_eq!(u32_at(&m, 12) as usize, m.len());
        assert_eq!(u32_at(&m, 16) as usize, HEADER);
        assert_eq!(u32_at(&m, 20), 1);
        assert_eq!(u32_at(&m, 28), READONLY_FLAG);
        assert_eq!(&m[48..57], b"kiln-root");
        assert_eq!(m[57], 0);
        // The target: 16 sectors from 0, "verity", then "x\0", padded.
        let spec = &m[HEADER..];
        assert_eq!(u64::from_ne_bytes(spec[8..16].try_into().unwrap()), 16);
        assert_eq!(u32_at(spec, 20) as usize, spec.len());
        assert_eq!(spec.len() % 8, 0);
        assert_eq!(&spec[24..31], b"verity\0");
        assert_eq!(&spec[SPEC..SPEC + 2], b"x\0");
        assert!(message("", 0, 0, &[]).is_err());
        assert!(message(&"n".repeat(128), 0, 0, &[]).is_err());
    }

    #[test]
    fn verity_params() {
        let v = Verity {
            dev: (254, 2),
            data_blocks: 100,
            hash_start_block: 101,
            root_hash: "ab".into(),
            salt: "cd".into(),
        };
        assert_eq!(v.params(), "1 254:2 254:2 4096 4096 100 101 sha256 ab cd");
        assert_eq!(v.sectors(), 800);
    }

    #[test]
    fn status_reply() {
        // As the kernel answers: data_start past the header, one target,
        // its spec, then the status line.
        let reply = |status: &[u8]| {
            let mut t = table("verity", 8, "").unwrap();
            t.truncate(SPEC);
            t.extend_from_slice(status);
            t.push(0);
            message("kiln-root", 0, 1, &t).unwrap()
        };
        assert!(status_says_corrupted(&reply(b"C")));
        assert!(!status_says_corrupted(&reply(b"V")));
        let none = message("kiln-root", 0, 0, &[]).unwrap();
        assert!(!status_says_corrupted(&none));
    }

    #[test]
    fn reply_dev_decodes_huge_numbers() {
        let mut b = vec![0u8; HEADER];
        // major 253, minor 0x12345: (minor & 0xff) | major << 8 | (minor & !0xff) << 12
        let dev: u64 = 0x45 | (253 << 8) | (0x12300 << 12);
        b[40..48].copy_from_slice(&dev.to_ne_bytes());
        assert_eq!(reply_dev(&b), (253, 0x12345));
    }
}
