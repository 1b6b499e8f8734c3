//! cpio "newc" (magic `070701`) archives, the format the Linux kernel
//! unpacks as an initramfs.
//!
//! The writer streams: each entry's header and data go straight to the
//! output, so nothing but the tree itself is held in memory. Entries follow
//! [`Tree::walk`] (sorted, parents before children), preceded by `.` for the
//! root directory so that its mode and owner are applied too, and followed
//! by the `TRAILER!!!` entry.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::tree::{DeviceKind, Dir, Meta, Node, Tree};

/// Errors from writing a cpio archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// Writing the archive to the output failed.
    #[error("writing cpio archive")]
    Io(#[from] io::Error),
    /// newc stores sizes in 32 bits.
    #[error("{0}: {1} bytes is too large for a cpio newc entry (max 4 GiB - 1)")]
    TooLarge(PathBuf, u64),
    /// Names are NUL-terminated in the archive.
    #[error("{0}: name contains a NUL byte")]
    NulInName(PathBuf),
}

const S_IFSOCK: u32 = 0o140000;
const S_IFLNK: u32 = 0o120000;
const S_IFREG: u32 = 0o100000;
const S_IFBLK: u32 = 0o060000;
const S_IFDIR: u32 = 0o040000;
const S_IFCHR: u32 = 0o020000;
const S_IFIFO: u32 = 0o010000;

/// The fields of one newc header that vary between entries.
struct Header<'a> {
    ino: u32,
    mode: u32,
    meta: &'a Meta,
    nlink: u32,
    size: u32,
    rdev_major: u32,
    rdev_minor: u32,
}

/// Writes `tree` as a newc archive to `out`.
///
/// Inode numbers are assigned in walk order starting at 1 (the root), so the
/// same tree always yields the same bytes. Every regular file is its own
/// inode (`nlink` 1): the kernel only links entries with `nlink >= 2`, so
/// shared data is written once per path. Times beyond 2106 are clamped to
/// the 32-bit maximum the format can hold.
pub fn write_newc<W: Write>(tree: &Tree, mut out: W) -> Result<(), CpioError> {
    let mut ino: u32 = 1;
    let root_meta = &tree.root.meta;
    write_entry(
        &mut out,
        Path::new("."),
        &Header {
            ino,
            mode: S_IFDIR | (root_meta.mode & 0o7777),
            meta: root_meta,
            nlink: dir_nlink(&tree.root),
            size: 0,
            rdev_major: 0,
            rdev_minor: 0,
        },
        &mut &[][..],
    )?;

    for (path, node) in tree.walk() {
        ino = ino.wrapping_add(1);
        // Archive names are relative: the kernel and `cpio -i` both unpack
        // relative to the target root.
        let rel = path.strip_prefix("/").unwrap_or(&path);
        let meta = node.meta();
        let perm = meta.mode & 0o7777;
        // File bodies stream from where they are (extents are read as
        // they are copied): an initramfs holding a whole root stays out of
        // memory.
        let mut reader;
        let mut bytes: &[u8] = &[];
        let (mode, nlink, len, rdev): (u32, u32, u64, (u32, u32)) = match node {
            Node::Dir(d) => (S_IFDIR | perm, dir_nlink(d), 0, (0, 0)),
            Node::File { data, .. } => (S_IFREG | perm, 1, data.len(), (0, 0)),
            Node::Symlink { target, .. } => {
                bytes = target.as_bytes();
                (S_IFLNK | perm, 1, bytes.len() as u64, (0, 0))
            }
            Node::Device {
                kind, major, minor, ..
            } => {
                let ty = match kind {
                    DeviceKind::Char => S_IFCHR,
                    DeviceKind::Block => S_IFBLK,
                };
                (ty | perm, 1, 0, (*major, *minor))
            }
            Node::Fifo { .. } => (S_IFIFO | perm, 1, 0, (0, 0)),
            Node::Socket { .. } => (S_IFSOCK | perm, 1, 0, (0, 0)),
        };
        let size = u32::try_from(len).map_err(|_| CpioError::TooLarge(path.clone(), len))?;
        let data: &mut dyn Read = match node {
            Node::File { data, .. } => {
                reader = data.reader();
                &mut reader
            }
            _ => &mut bytes,
        };
        write_entry(
            &mut out,
            rel,
            &Header {
                ino,
                mode,
                meta,
                nlink,
                size,
                rdev_major: rdev.0,
                rdev_minor: rdev.1,
            },
            data,
        )?;
    }

    let trailer = Meta::root(0);
    write_entry(
        &mut out,
        Path::new("TRAILER!!!"),
        &Header {
            ino: 0,
            mode: 0,
            meta: &trailer,
            nlink: 1,
            size: 0,
            rdev_major: 0,
            rdev_minor: 0,
        },
        &mut &[][..],
    )?;
    out.flush()?;
    Ok(())
}

/// A directory's link count: itself, its `.` and one `..` per subdirectory.
fn dir_nlink(d: &Dir) -> u32 {
    let subdirs = d
        .entries
        .values()
        .filter(|n| matches!(n, Node::Dir(_)))
        .count();
    u32::try_from(subdirs).unwrap_or(u32::MAX - 2) + 2
}

fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

fn write_entry<W: Write>(
    out: &mut W,
    name: &Path,
    h: &Header<'_>,
    data: &mut dyn Read,
) -> Result<(), CpioError> {
    let name_bytes = OsStr::as_bytes(name.as_os_str());
    if name_bytes.contains(&0) {
        return Err(CpioError::NulInName(name.to_path_buf()));
    }
    let namesize = u32::try_from(name_bytes.len() + 1)
        .map_err(|_| CpioError::TooLarge(name.to_path_buf(), name_bytes.len() as u64))?;
    let mtime = u32::try_from(h.meta.mtime).unwrap_or(u32::MAX);
    // 13 fields of 8 hex digits: ino mode uid gid nlink mtime filesize
    // devmajor devminor rdevmajor rdevminor namesize check.
    let header = format!(
        "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
        h.ino,
        h.mode,
        h.meta.uid,
        h.meta.gid,
        h.nlink,
        mtime,
        h.size,
        0,
        0,
        h.rdev_major,
        h.rdev_minor,
        namesize,
        0
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name_bytes)?;
    out.write_all(&[0])?;
    // Header (110 bytes) plus name is padded to a multiple of 4.
    out.write_all(&[0; 3][..pad4(header.len() + name_bytes.len() + 1)])?;
    let copied = std::io::copy(&mut data.take(u64::from(h.size)), out)?;
    if copied != u64::from(h.size) {
        return Err(CpioError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    out.write_all(&[0; 3][..pad4(h.size as usize)])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sample() -> Tree {
        let mut t = Tree::new();
        t.root.meta.mode = 0o750;
        t.root.meta.mtime = 1_600_000_000;
        t.insert(
            Path::new("/bin/hello"),
            Node::file(0o755, "#!/bin/sh\necho hi\n"),
        )
        .unwrap();
        t.insert(
            Path::new("/etc/odd"),
            Node::File {
                meta: Meta {
                    mode: 0o4711,
                    uid: 1000,
                    gid: 100,
                    mtime: 1_234_567_890,
                    xattrs: Default::default(),
                },
                data: vec![7u8; 5].into(),
            },
        )
        .unwrap();
        t.insert(Path::new("/etc/empty"), Node::file(0o600, ""))
            .unwrap();
        t.insert(Path::new("/sbin/init"), Node::symlink("../bin/hello"))
            .unwrap();
        t.insert(
            Path::new("/dev/console"),
            Node::device(DeviceKind::Char, 0o600, 5, 1),
        )
        .unwrap();
        t.insert(
            Path::new("/dev/vda"),
            Node::device(DeviceKind::Block, 0o660, 254, 300),
        )
        .unwrap();
        t.insert(
            Path::new("/run/fifo"),
            Node::Fifo {
                meta: Meta::root(0o644),
            },
        )
        .unwrap();
        t
    }

    fn archive(t: &Tree) -> Vec<u8> {
        let mut v = Vec::new();
        write_newc(t, &mut v).unwrap();
        v
    }

    fn have(tool: &str) -> bool {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            eprintln!("note: `{tool}` not installed, skipping the external check");
        }
        found
    }

    #[test]
    fn layout_is_aligned_and_ends_with_trailer() {
        let v = archive(&sample());
        assert_eq!(v.len() % 4, 0);
        assert!(v.starts_with(b"070701"));
        // The first entry is the root, carrying its mode (dir | 0750).
        assert_eq!(&v[14..22], b"000041E8");
        let tail = b"TRAILER!!!\0";
        assert!(v.windows(tail.len()).any(|w| w == tail));
        assert_eq!(archive(&sample()), v, "output is deterministic");
    }

    #[test]
    fn empty_tree_is_root_plus_trailer() {
        let v = archive(&Tree::new());
        // 110 + "." NUL padded to 112, then 110 + "TRAILER!!!" NUL = 121 -> 124.
        assert_eq!(v.len(), 112 + 124);
    }

    #[test]
    fn nul_in_name_is_an_error() {
        use std::os::unix::ffi::OsStringExt;
        let mut t = Tree::new();
        t.root.entries.insert(
            std::ffi::OsString::from_vec(b"a\0b".to_vec()),
            Node::file(0o644, ""),
        );
        assert!(matches!(
            write_newc(&t, Vec::new()),
            Err(CpioError::NulInName(_))
        ));
    }

    #[test]
    fn cpio_tool_lists_entries() {
        if !have("cpio") {
            return;
        }
        let v = archive(&sample());
        let dir = tempdir("list");
        let path = dir.join("a.cpio");
        std::fs::write(&path, &v).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("cpio -itvn < {}", path.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8(out.stdout).unwrap();
        let line = |name: &str| -> Vec<String> {
            listing
                .lines()
                .find(|l| l.ends_with(&format!(" {name}")) || l.contains(&format!(" {name} -> ")))
                .unwrap_or_else(|| panic!("{name} missing from:\n{listing}"))
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(line(".")[0], "drwxr-x---");
        assert_eq!(line("bin/hello")[0], "-rwxr-xr-x");
        let odd = line("etc/odd");
        assert_eq!(odd[0], "-rws--x--x");
        assert_eq!((odd[2].as_str(), odd[3].as_str()), ("1000", "100"));
        assert_eq!(odd[4], "5");
        let link = line("sbin/init");
        assert_eq!(link[0], "lrwxrwxrwx");
        assert_eq!(link.last().unwrap(), "../bin/hello");
        let con = line("dev/console");
        assert_eq!(con[0], "crw-------");
        assert_eq!((con[4].as_str(), con[5].as_str()), ("5,", "1"));
        let vda = line("dev/vda");
        assert_eq!(vda[0], "brw-rw----");
        assert_eq!((vda[4].as_str(), vda[5].as_str()), ("254,", "300"));
        assert_eq!(line("run/fifo")[0], "prw-r--r--");
        // Parents come before their children.
        let names: Vec<&str> = listing
            .lines()
            .map(|l| l.split_whitespace().last().unwrap())
            .collect();
        let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
        assert!(pos("bin") < pos("bin/hello"));
        assert!(pos("etc") < pos("etc/odd"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cpio_tool_extracts_contents() {
        if !have("cpio") {
            return;
        }
        let t = sample();
        let dir = tempdir("extract");
        let path = dir.join("a.cpio");
        std::fs::write(&path, archive(&t)).unwrap();
        let root = dir.join("root");
        std::fs::create_dir(&root).unwrap();
        // Devices need privileges: extraction of those may fail when not
        // root, so only the status of what we check matters.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd {} && cpio -idm --no-absolute-filenames --no-preserve-owner < {}",
                root.display(),
                path.display()
            ))
            .output()
            .unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(
            std::fs::read(root.join("bin/hello")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(std::fs::read(root.join("etc/odd")).unwrap(), vec![7u8; 5]);
        assert_eq!(std::fs::read(root.join("etc/empty")).unwrap(), b"");
        let m = std::fs::metadata(root.join("etc/odd")).unwrap();
        assert_eq!(m.mtime(), 1_234_567_890);
        assert_eq!(
            std::fs::metadata(root.join("bin/hello"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o755
        );
        assert_eq!(
            std::fs::read_link(root.join("sbin/init")).unwrap(),
            Path::new("../bin/hello")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-cpio-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
