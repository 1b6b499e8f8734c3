//! The one seam between the init's logic and the kernel: boot, module
//! loading and container setup call the syscalls through [`Sys`], so what
//! they do can be tested without root against the recording fake.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

/// `MODULE_INIT_COMPRESSED_FILE`: the kernel decompresses the module itself.
pub const MODULE_INIT_COMPRESSED_FILE: libc::c_int = 4;

pub trait Sys {
    fn mount(
        &self,
        src: Option<&str>,
        target: &str,
        fstype: Option<&str>,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) -> io::Result<()>;
    fn mkdir_all(&self, path: &str) -> io::Result<()>;
    fn read_file(&self, path: &str) -> io::Result<Vec<u8>>;
    /// Reads up to `len` bytes at `offset` (fewer at end of file).
    fn read_at(&self, path: &str, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Entry names of a directory, sorted.
    fn list_dir(&self, path: &str) -> io::Result<Vec<String>>;
    fn exists(&self, path: &str) -> bool;
    /// Loads a kernel module file; `EEXIST` counts as success.
    fn finit_module(&self, path: &str, compressed: bool) -> io::Result<()>;
    fn sleep_ms(&self, ms: u64);
    /// mkdir(2) with mode 0755 (less the umask).
    fn mkdir(&self, path: &str) -> io::Result<()>;
    /// Writes `data` to an existing file (a cgroup or proc knob) or a new one.
    fn write_file(&self, path: &str, data: &[u8]) -> io::Result<()>;
    /// What `path` itself is (symlinks not followed); `None` if absent.
    fn kind(&self, path: &str) -> Option<Kind>;
    fn mknod(&self, path: &str, mode: libc::mode_t, major: u32, minor: u32) -> io::Result<()>;
    fn chmod(&self, path: &str, mode: libc::mode_t) -> io::Result<()>;
    fn symlink(&self, target: &str, link: &str) -> io::Result<()>;
    fn sethostname(&self, name: &str) -> io::Result<()>;
    /// `ip link set lo up` in the current network namespace.
    fn loopback_up(&self) -> io::Result<()>;
    fn chdir(&self, path: &str) -> io::Result<()>;
    fn chroot(&self, path: &str) -> io::Result<()>;
    /// pivot_root(2) with the old root stacked on the new one.
    fn pivot_root(&self, new_root: &str, put_old: &str) -> io::Result<()>;
    fn umount(&self, target: &str, flags: libc::c_int) -> io::Result<()>;
    /// The read-only, nosuid, nodev and noexec flags (`MS_*`) of the
    /// mount `path` is on.
    fn mount_flags(&self, path: &str) -> io::Result<libc::c_ulong>;
    /// Attaches `size` bytes of `file` from `offset` (0: to its end)
    /// read-only to a free loop device: its path, `/dev/loopN`.
    fn attach_loop(&self, file: &str, offset: u64, size: u64) -> io::Result<String>;
    /// Maps block device `dev` (data, then hash tree) through dm-verity
    /// as `name`: the verified device's path.
    fn open_verity(&self, name: &str, dev: &str, v: &VerityRoot) -> io::Result<String>;
}

/// A verified root: where its tree starts and its hashes (the rest of a
/// [`crate::dm::Verity`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityRoot {
    pub data_blocks: u64,
    pub root_hash: String,
    pub salt: String,
}

/// `struct loop_info64` of linux/loop.h.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config` of linux/loop.h.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

// The request's type is the C library's (`int` on musl).
const LOOP_CTL_GET_FREE: libc::Ioctl = 0x4C82;
const LOOP_CONFIGURE: libc::Ioctl = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;

fn attach_loop_real(file: &str, offset: u64, size: u64) -> io::Result<String> {
    let ctl = std::fs::File::open("/dev/loop-control")?;
    // SAFETY: an ioctl with no argument on the loop control device.
    let n = check(unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) })?;
    let dev = format!("/dev/loop{n}");
    let loop_dev = std::fs::OpenOptions::new().read(true).open(&dev)?;
    let backing = std::fs::File::open(file)?;
    let config = LoopConfig {
        fd: u32::try_from(backing.as_raw_fd())
            .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?,
        block_size: 0,
        info: LoopInfo64 {
            device: 0,
            inode: 0,
            rdevice: 0,
            offset,
            sizelimit: size,
            number: 0,
            encrypt_type: 0,
            encrypt_key_size: 0,
            // Not AUTOCLEAR: that detaches it when this fd closes, before
            // the mount opens it; the root stays attached for good anyway.
            flags: LO_FLAGS_READ_ONLY,
            file_name: [0; 64],
            crypt_name: [0; 64],
            encrypt_key: [0; 32],
            init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: a valid loop_config the kernel only reads; both fds are open.
    check(unsafe { libc::ioctl(loop_dev.as_raw_fd(), LOOP_CONFIGURE, &config) })?;
    Ok(dev)
}

/// The type of a filesystem entry, as far as setup cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    Other,
}

/// The real kernel.
pub struct RealSys;

/// Converts a Rust string to a C string; interior NULs become an error.
pub fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Maps a `-1` return to the current `errno`.
pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Sys for RealSys {
    fn attach_loop(&self, file: &str, offset: u64, size: u64) -> io::Result<String> {
        attach_loop_real(file, offset, size)
    }

    fn open_verity(&self, name: &str, dev: &str, v: &VerityRoot) -> io::Result<String> {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(dev)?.rdev();
        let verity = crate::dm::Verity {
            dev: (libc::major(rdev), libc::minor(rdev)),
            data_blocks: v.data_blocks,
            // The tree's superblock takes the block after the data.
            hash_start_block: v.data_blocks + 1,
            root_hash: v.root_hash.clone(),
            salt: v.salt.clone(),
        };
        crate::dm::create_verity(name, &verity)
    }

    fn mount_flags(&self, path: &str) -> io::Result<libc::c_ulong> {
        let p = cstr(path)?;
        // SAFETY: a valid C string and a zeroed statvfs to fill.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        check(unsafe { libc::statvfs(p.as_ptr(), &mut st) })?;
        // The ST_ bits of these four are the MS_ ones.
        Ok(st.f_flag & (libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC))
    }

    fn mount(
        &self,
        src: Option<&str>,
        target: &str,
        fstype: Option<&str>,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) -> io::Result<()> {
        mount(src, target, fstype, flags, data)
    }

    fn mkdir_all(&self, path: &str) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn read_file(&self, path: &str) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn read_at(&self, path: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(path)?;
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            let n = f.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    fn list_dir(&self, path: &str) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(path)? {
            let e = e?;
            names.push(String::from_utf8_lossy(e.file_name().as_bytes()).into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn exists(&self, path: &str) -> bool {
        std::path::Path::new(path).exists()
    }

    fn finit_module(&self, path: &str, compressed: bool) -> io::Result<()> {
        let f = std::fs::File::open(path)?;
        let flags = if compressed {
            MODULE_INIT_COMPRESSED_FILE
        } else {
            0
        };
        let params = c"";
        // SAFETY: fd is open for the call's duration and params is a valid C string.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                f.as_raw_fd(),
                params.as_ptr(),
                flags,
            )
        };
        if ret == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    fn sleep_ms(&self, ms: u64) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }

    fn mkdir(&self, path: &str) -> io::Result<()> {
        std::fs::create_dir(path)
    }

    fn write_file(&self, path: &str, data: &[u8]) -> io::Result<()> {
        std::fs::write(path, data)
    }

    fn kind(&self, path: &str) -> Option<Kind> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        Some(if meta.is_dir() {
            Kind::Dir
        } else {
            Kind::Other
        })
    }

    fn mknod(&self, path: &str, mode: libc::mode_t, major: u32, minor: u32) -> io::Result<()> {
        let p = cstr(path)?;
        let dev = libc::makedev(major, minor);
        // SAFETY: p is a valid C string.
        check(unsafe { libc::mknod(p.as_ptr(), mode, dev) }).map(|_| ())
    }

    fn chmod(&self, path: &str, mode: libc::mode_t) -> io::Result<()> {
        let p = cstr(path)?;
        // SAFETY: p is a valid C string.
        check(unsafe { libc::chmod(p.as_ptr(), mode) }).map(|_| ())
    }

    fn symlink(&self, target: &str, link: &str) -> io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }

    fn loopback_up(&self) -> io::Result<()> {
        loopback_up_real()
    }

    fn sethostname(&self, name: &str) -> io::Result<()> {
        // SAFETY: pointer and length describe the borrowed string.
        check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(|_| ())
    }

    fn chdir(&self, path: &str) -> io::Result<()> {
        std::env::set_current_dir(path)
    }

    fn chroot(&self, path: &str) -> io::Result<()> {
        let p = cstr(path)?;
        // SAFETY: p is a valid C string.
        check(unsafe { libc::chroot(p.as_ptr()) }).map(|_| ())
    }

    fn pivot_root(&self, new_root: &str, put_old: &str) -> io::Result<()> {
        let new = cstr(new_root)?;
        let old = cstr(put_old)?;
        // SAFETY: valid C strings alive for the call.
        let r = unsafe { libc::syscall(libc::SYS_pivot_root, new.as_ptr(), old.as_ptr()) };
        if r == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn umount(&self, target: &str, flags: libc::c_int) -> io::Result<()> {
        umount(target, flags)
    }
}

/// mount(2).
/// `struct ifreq` with the flags member of its union.
#[repr(C)]
struct IfreqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    pad: [u8; 22],
}

// IFF_UP is 1: it fits c_short.
#[allow(clippy::cast_possible_truncation)]
fn loopback_up_real() -> io::Result<()> {
    // SAFETY: plain socket creation.
    let fd =
        owned(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    let raw = fd.as_raw_fd();
    let mut req = IfreqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: req is a valid ifreq for both ioctls.
    let r = unsafe {
        if libc::ioctl(raw, libc::SIOCGIFFLAGS as _, &mut req as *mut IfreqFlags) == -1 {
            -1
        } else {
            req.flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(raw, libc::SIOCSIFFLAGS as _, &mut req as *mut IfreqFlags)
        }
    };
    check(r).map(|_| ())
}

pub fn mount(
    src: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = src.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    let p = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string alive for the call.
    check(unsafe { libc::mount(p(&src), target.as_ptr(), p(&fstype), flags, p(&data).cast()) })
        .map(|_| ())
}

/// umount2(2).
pub fn umount(target: &str, flags: libc::c_int) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: t is a valid C string.
    check(unsafe { libc::umount2(t.as_ptr(), flags) }).map(|_| ())
}

/// pipe2 with `O_CLOEXEC`; returns (read, write).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both are fresh descriptors nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// clone3's flag to start the child in the cgroup `cgroup` names (not
/// in libc for musl).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// fork(2) into new namespaces (`flags`, CLONE_NEW*) and straight into the
/// cgroup directory `cgroup`, through clone3: no migration afterwards (a
/// write to cgroup.procs waits for an RCU grace period) and no window in
/// which the child runs outside the cgroup. Returns 0 in the child.
///
/// # Safety
/// As fork: the caller is single-threaded, so the child may run Rust code.
pub unsafe fn clone_into(flags: libc::c_int, cgroup: BorrowedFd<'_>) -> io::Result<libc::pid_t> {
    let mut args: libc::clone_args = std::mem::zeroed();
    // The CLONE_NEW* flags are small positive ints.
    args.flags = u64::try_from(flags).unwrap_or(0) | CLONE_INTO_CGROUP;
    args.exit_signal = libc::SIGCHLD as u64;
    args.cgroup = u64::try_from(cgroup.as_raw_fd()).unwrap_or(0);
    // SAFETY: args is a valid clone_args of the size given; no stack is
    // passed, so the child continues on a copy of this one, as with fork.
    let r = libc::syscall(
        libc::SYS_clone3,
        &raw mut args,
        std::mem::size_of::<libc::clone_args>(),
    );
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    libc::pid_t::try_from(r).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Sets O_NONBLOCK on `fd`.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we hold, integer arguments only.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// Takes ownership of a descriptor a syscall just returned, or its errno.
pub fn owned(ret: libc::c_int) -> io::Result<OwnedFd> {
    let fd = check(ret)?;
    // SAFETY: a non-negative return of an fd-creating syscall is a new
    // descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// write(2) of the whole buffer, retrying on EINTR and short writes.
pub fn write_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: pointer and length describe `data`.
        let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        data = &data[n as usize..];
    }
    Ok(())
}

/// read(2) into `buf`, retrying on EINTR; 0 is end of file.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: pointer and length describe `buf`.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(n as usize);
    }
}

/// Kernel uptime as printed in log lines, e.g. `3.41`; `?` if unreadable.
/// Seconds since boot (CLOCK_BOOTTIME), to the millisecond.
pub fn boot_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    let ms = ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000;
    ms as f64 / 1000.0
}

/// This process's resident memory (`VmRSS`), in KiB.
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

pub fn uptime() -> String {
    match std::fs::read_to_string("/proc/uptime") {
        Ok(s) => s.split_whitespace().next().unwrap_or("?").to_string(),
        Err(_) => "?".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn ifreq_layout() {
        assert_eq!(std::mem::size_of::<IfreqFlags>(), 40);
    }

    #[test]
    fn pipe_is_cloexec_and_ends_when_writer_drops() {
        let (r, w) = pipe().expect("pipe");
        for fd in [&r, &w] {
            // SAFETY: F_GETFD on a descriptor we own.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        }
        write_all(w.as_fd(), b"hi").expect("write");
        drop(w);
        let mut buf = [0u8; 8];
        assert_eq!(read(r.as_fd(), &mut buf).expect("read"), 2);
        assert_eq!(&buf[..2], b"hi");
        assert_eq!(read(r.as_fd(), &mut buf).expect("read"), 0);
    }
}

#[cfg(test)]
pub mod fake {
    //! An in-memory stand-in for [`Sys`](super::Sys) that records what it
    //! was asked to do.
    #![allow(clippy::cast_possible_truncation)]
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::fmt;

    /// Called after a module loads, to make new devices appear.
    pub type OnLoad = Box<dyn Fn(&str, &FakeSys)>;

    /// One recorded call.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Op {
        Mount {
            src: Option<String>,
            target: String,
            fstype: Option<String>,
            flags: libc::c_ulong,
            data: Option<String>,
        },
        MkdirAll(String),
        Mkdir(String),
        Write(String, Vec<u8>),
        Mknod(String, libc::mode_t, u32, u32),
        Chmod(String, libc::mode_t),
        Symlink(String, String),
        Sethostname(String),
        LoopbackUp,
        Chdir(String),
        Chroot(String),
        PivotRoot(String, String),
        Umount(String, libc::c_int),
        AttachLoop(String),
        Verity(String),
    }

    const FLAG_NAMES: [(libc::c_ulong, &str); 10] = [
        (libc::MS_RDONLY, "ro"),
        (libc::MS_NOSUID, "nosuid"),
        (libc::MS_NODEV, "nodev"),
        (libc::MS_NOEXEC, "noexec"),
        (libc::MS_REMOUNT, "remount"),
        (libc::MS_BIND, "bind"),
        (libc::MS_MOVE, "move"),
        (libc::MS_REC, "rec"),
        (libc::MS_PRIVATE, "private"),
        (libc::MS_SLAVE, "slave"),
    ];

    /// Mount flags as names, e.g. `bind,rec`; unknown bits in hex.
    pub fn flag_names(flags: libc::c_ulong) -> String {
        let mut names: Vec<String> = Vec::new();
        let mut rest = flags;
        for (bit, name) in FLAG_NAMES {
            if flags & bit != 0 {
                names.push(name.to_string());
                rest &= !bit;
            }
        }
        if rest != 0 {
            names.push(format!("{rest:#x}"));
        }
        names.join(",")
    }

    /// Compact, for readable assertions: `mount tmpfs /x tmpfs nosuid,nodev mode=755`
    /// (absent values are `-`).
    impl fmt::Display for Op {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".to_string());
            match self {
                Op::Mount {
                    src,
                    target,
                    fstype,
                    flags,
                    data,
                } => write!(
                    f,
                    "mount {} {target} {} {} {}",
                    opt(src),
                    opt(fstype),
                    flag_names(*flags),
                    opt(data)
                ),
                Op::MkdirAll(p) => write!(f, "mkdir -p {p}"),
                Op::Mkdir(p) => write!(f, "mkdir {p}"),
                Op::Write(p, d) => write!(f, "write {p} {}", String::from_utf8_lossy(d)),
                Op::Mknod(p, mode, ma, mi) => write!(f, "mknod {p} {mode:o} {ma}:{mi}"),
                Op::Chmod(p, mode) => write!(f, "chmod {p} {mode:o}"),
                Op::Symlink(t, l) => write!(f, "symlink {l} -> {t}"),
                Op::Sethostname(n) => write!(f, "sethostname {n}"),
                Op::LoopbackUp => write!(f, "ip link set lo up"),
                Op::AttachLoop(p) => write!(f, "losetup -r --find {p}"),
                Op::Verity(p) => write!(f, "veritysetup open {p}"),
                Op::Chdir(p) => write!(f, "chdir {p}"),
                Op::Chroot(p) => write!(f, "chroot {p}"),
                Op::PivotRoot(n, o) => write!(f, "pivot_root {n} {o}"),
                Op::Umount(t, fl) => write!(f, "umount {t} {fl:#x}"),
            }
        }
    }

    #[derive(Default)]
    pub struct FakeSys {
        pub files: RefCell<BTreeMap<String, Vec<u8>>>,
        pub loaded: RefCell<Vec<(String, bool)>>,
        pub ops: RefCell<Vec<Op>>,
        pub fail_load: Vec<String>,
        /// Calls whose path (a mount's target) is this fail with the errno.
        pub fail_at: Option<(String, i32)>,
        pub on_load: Option<OnLoad>,
    }

    impl FakeSys {
        pub fn add(&self, path: &str, data: &[u8]) {
            self.files
                .borrow_mut()
                .insert(path.to_string(), data.to_vec());
        }

        /// Every recorded call, rendered.
        pub fn log(&self) -> Vec<String> {
            self.ops.borrow().iter().map(Op::to_string).collect()
        }

        /// Targets of the recorded mounts, in order.
        pub fn mount_targets(&self) -> Vec<String> {
            self.ops
                .borrow()
                .iter()
                .filter_map(|op| match op {
                    Op::Mount { target, .. } => Some(target.clone()),
                    _ => None,
                })
                .collect()
        }

        fn record(&self, path: &str, op: Op) -> io::Result<()> {
            if let Some((p, errno)) = &self.fail_at {
                if p == path {
                    return Err(io::Error::from_raw_os_error(*errno));
                }
            }
            self.ops.borrow_mut().push(op);
            Ok(())
        }
    }

    fn not_found() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOENT)
    }

    impl Sys for FakeSys {
        fn mount_flags(&self, _path: &str) -> io::Result<libc::c_ulong> {
            Ok(0)
        }

        fn attach_loop(&self, file: &str, offset: u64, size: u64) -> io::Result<String> {
            self.record(file, Op::AttachLoop(format!("{file}@{offset}+{size}")))?;
            Ok("/dev/loop0".to_string())
        }

        fn open_verity(&self, name: &str, dev: &str, v: &VerityRoot) -> io::Result<String> {
            let what = format!("{dev} {name} {} {} {}", v.data_blocks, v.root_hash, v.salt);
            self.record(dev, Op::Verity(what))?;
            Ok("/dev/dm-0".to_string())
        }

        fn mount(
            &self,
            src: Option<&str>,
            target: &str,
            fstype: Option<&str>,
            flags: libc::c_ulong,
            data: Option<&str>,
        ) -> io::Result<()> {
            let op = Op::Mount {
                src: src.map(str::to_string),
                target: target.to_string(),
                fstype: fstype.map(str::to_string),
                flags,
                data: data.map(str::to_string),
            };
            self.record(target, op)
        }
        fn mkdir_all(&self, path: &str) -> io::Result<()> {
            self.record(path, Op::MkdirAll(path.to_string()))
        }
        fn read_file(&self, path: &str) -> io::Result<Vec<u8>> {
            self.files.borrow().get(path).cloned().ok_or_else(not_found)
        }
        fn read_at(&self, path: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
            let f = self.read_file(path)?;
            let start = (offset as usize).min(f.len());
            let end = start.saturating_add(len).min(f.len());
            Ok(f[start..end].to_vec())
        }
        fn list_dir(&self, path: &str) -> io::Result<Vec<String>> {
            let prefix = format!("{}/", path.trim_end_matches('/'));
            let mut out: Vec<String> = self
                .files
                .borrow()
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix))
                .filter_map(|rest| rest.split('/').next())
                .map(str::to_string)
                .collect();
            out.dedup();
            if out.is_empty() {
                return Err(not_found());
            }
            Ok(out)
        }
        fn exists(&self, path: &str) -> bool {
            self.kind(path).is_some()
        }
        fn finit_module(&self, path: &str, compressed: bool) -> io::Result<()> {
            if self.fail_load.iter().any(|f| f == path) {
                return Err(io::Error::from_raw_os_error(libc::ENOEXEC));
            }
            self.loaded
                .borrow_mut()
                .push((path.to_string(), compressed));
            if let Some(cb) = &self.on_load {
                cb(path, self);
            }
            Ok(())
        }
        fn sleep_ms(&self, _ms: u64) {}
        fn mkdir(&self, path: &str) -> io::Result<()> {
            self.record(path, Op::Mkdir(path.to_string()))
        }
        fn write_file(&self, path: &str, data: &[u8]) -> io::Result<()> {
            self.record(path, Op::Write(path.to_string(), data.to_vec()))
        }
        /// Files are the added paths; directories their parents.
        fn kind(&self, path: &str) -> Option<Kind> {
            let files = self.files.borrow();
            let prefix = format!("{path}/");
            if files.keys().any(|k| k.starts_with(&prefix)) {
                Some(Kind::Dir)
            } else {
                files.contains_key(path).then_some(Kind::Other)
            }
        }
        fn mknod(&self, path: &str, mode: libc::mode_t, major: u32, minor: u32) -> io::Result<()> {
            self.record(path, Op::Mknod(path.to_string(), mode, major, minor))
        }
        fn chmod(&self, path: &str, mode: libc::mode_t) -> io::Result<()> {
            self.record(path, Op::Chmod(path.to_string(), mode))
        }
        fn symlink(&self, target: &str, link: &str) -> io::Result<()> {
            self.record(link, Op::Symlink(target.to_string(), link.to_string()))
        }
        fn sethostname(&self, name: &str) -> io::Result<()> {
            self.record(name, Op::Sethostname(name.to_string()))
        }
        fn loopback_up(&self) -> io::Result<()> {
            self.record("lo", Op::LoopbackUp)
        }
        fn chdir(&self, path: &str) -> io::Result<()> {
            self.record(path, Op::Chdir(path.to_string()))
        }
        fn chroot(&self, path: &str) -> io::Result<()> {
            self.record(path, Op::Chroot(path.to_string()))
        }
        fn pivot_root(&self, new_root: &str, put_old: &str) -> io::Result<()> {
            let op = Op::PivotRoot(new_root.to_string(), put_old.to_string());
            self.record(new_root, op)
        }
        fn umount(&self, target: &str, flags: libc::c_int) -> io::Result<()> {
            self.record(target, Op::Umount(target.to_string(), flags))
        }
    }
}
