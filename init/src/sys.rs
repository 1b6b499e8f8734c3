//! A narrow wrapper over the syscalls the boot logic needs, so module
//! loading and root discovery can be tested without root against a fake.

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
}

/// mount(2).
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

/// chroot(2).
pub fn chroot(path: &str) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: p is a valid C string.
    check(unsafe { libc::chroot(p.as_ptr()) }).map(|_| ())
}

/// mknod(2).
pub fn mknod(path: &str, mode: libc::mode_t, major: u32, minor: u32) -> io::Result<()> {
    let p = cstr(path)?;
    let dev = libc::makedev(major, minor);
    // SAFETY: p is a valid C string.
    check(unsafe { libc::mknod(p.as_ptr(), mode, dev) }).map(|_| ())
}

/// sethostname(2).
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe the borrowed string.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(|_| ())
}

/// pipe2 with `O_CLOEXEC`; returns (read, write).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both are fresh descriptors nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
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
    //! An in-memory stand-in for [`Sys`](super::Sys).
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// Called after a module loads, to make new devices appear.
    pub type OnLoad = Box<dyn Fn(&str, &FakeSys)>;

    #[derive(Default)]
    pub struct FakeSys {
        pub files: RefCell<BTreeMap<String, Vec<u8>>>,
        pub loaded: RefCell<Vec<(String, bool)>>,
        pub mounts: RefCell<Vec<(String, String, String)>>,
        pub fail_load: Vec<String>,
        pub on_load: Option<OnLoad>,
    }

    impl FakeSys {
        pub fn add(&self, path: &str, data: &[u8]) {
            self.files
                .borrow_mut()
                .insert(path.to_string(), data.to_vec());
        }
    }

    fn not_found() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOENT)
    }

    impl Sys for FakeSys {
        fn mount(
            &self,
            src: Option<&str>,
            target: &str,
            fstype: Option<&str>,
            _flags: libc::c_ulong,
            _data: Option<&str>,
        ) -> io::Result<()> {
            self.mounts.borrow_mut().push((
                src.unwrap_or("").to_string(),
                target.to_string(),
                fstype.unwrap_or("").to_string(),
            ));
            Ok(())
        }
        fn mkdir_all(&self, _path: &str) -> io::Result<()> {
            Ok(())
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
            let files = self.files.borrow();
            let prefix = format!("{path}/");
            files.contains_key(path) || files.keys().any(|k| k.starts_with(&prefix))
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
    }
}
