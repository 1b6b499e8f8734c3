//! Kernels that do not come from a Debian package: a bzImage on disk (with
//! an optional modules directory or tarball), or an OCI image in LinuxKit's
//! kernel layout. Both produce a [`Tree`] laid out like a kernel package
//! (`/boot/vmlinuz-RELEASE` plus `/lib/modules/RELEASE/...`), so the caller
//! reads it with [`crate::kernel::Kernel::from_tree`].
//!
//! A modules source (directory, tarball, or LinuxKit's `/kernel.tar`) may be
//! laid out in any of three ways:
//! - a root filesystem: `lib/modules/RELEASE/...` or `usr/lib/modules/RELEASE/...`;
//! - the contents of `lib/modules`: `RELEASE/...` at the top level;
//! - the contents of `lib/modules/RELEASE`: `kernel/...`, `modules.*` at the
//!   top level; the release then comes from the bzImage header.
//!
//! If several release directories are present, the one the bzImage header
//! names is taken. When the header names a release, the modules must be for
//! that release: a mismatch means modules whose vermagic the kernel refuses.
//!
//! Directories are read without following any symlink (links are kept as
//! links); tarballs go through [`layers::apply`], so the same path-safety
//! rules as for image layers hold. Files read from a directory become
//! `root:root` with mtime 0, so the output does not depend on the checkout.

use crate::cache::Digest;
use crate::layers::{self, Compression, Layer, LayerError};
use crate::oci::{self, OciError};
use kiln_formats::tree::{Dir, Meta, Node, Tree, TreeError};
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors from reading a kernel from a bzImage file or an OCI image.
#[derive(Debug, thiserror::Error)]
pub enum KernelSourceError {
    /// Reading a file or directory failed.
    #[error("{}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The kernel file is not a bzImage.
    #[error("{what}: not a bzImage ({reason})")]
    NotBzImage {
        /// The kernel file.
        what: String,
        /// Why not.
        reason: String,
    },
    /// The modules directory or tarball cannot be used.
    #[error("{what}: {reason}")]
    Modules {
        /// The modules source.
        what: String,
        /// Why not.
        reason: String,
    },
    #[error(
        "{kernel}: no kernel release: the bzImage header names none and the modules do not either"
    )]
    /// Neither the bzImage header nor the modules name a kernel release.
    NoRelease {
        /// The kernel file.
        kernel: String,
    },
    #[error(
        "{kernel} is release {kernel_release} but {modules} holds modules for {modules_release}"
    )]
    /// The modules are for another release than the bzImage header names.
    ReleaseMismatch {
        /// The kernel file.
        kernel: String,
        /// Release the bzImage header names.
        kernel_release: String,
        /// The modules source.
        modules: String,
        /// Release the modules are for.
        modules_release: String,
    },
    /// A LinuxKit-style kernel image lacks `/kernel` or has an unusable file.
    #[error("{reference}: {path}: {reason}")]
    Image {
        /// The image reference.
        reference: String,
        /// The path in the image.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading a modules tarball or image layer failed.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// Pulling the kernel image failed.
    #[error(transparent)]
    Oci(#[from] OciError),
    /// Building the kernel tree failed.
    #[error("{what}")]
    Tree {
        /// What was being added.
        what: String,
        /// The underlying error.
        source: TreeError,
    },
}

/// Offset of the "HdrS" magic in the setup header.
const HDRS_AT: usize = 0x202;
/// Offset of the `kernel_version` field (u16, relative to 0x200).
const KERNEL_VERSION_AT: usize = 0x20E;
/// `__NEW_UTS_LEN`: the longest release string the kernel has.
const MAX_RELEASE: usize = 64;

/// The kernel release (`uname -r`) a bzImage names in its setup header, or
/// `None` if the header carries no version string. `what` names the file in
/// errors.
pub fn bzimage_release(what: &str, image: &[u8]) -> Result<Option<String>, KernelSourceError> {
    let bad = |reason: String| KernelSourceError::NotBzImage {
        what: what.to_string(),
        reason,
    };
    if image.len() < KERNEL_VERSION_AT + 2 {
        return Err(bad(format!("truncated: {} bytes", image.len())));
    }
    if &image[HDRS_AT..HDRS_AT + 4] != b"HdrS" {
        return Err(bad("no HdrS signature".into()));
    }
    let ptr = u16::from_le_bytes([image[KERNEL_VERSION_AT], image[KERNEL_VERSION_AT + 1]]);
    if ptr == 0 {
        return Ok(None);
    }
    let at = 0x200 + ptr as usize;
    let rest = image
        .get(at..)
        .ok_or_else(|| bad(format!("kernel_version points past the end (0x{at:x})")))?;
    let end = rest
        .iter()
        .take(512)
        .position(|&b| b == 0)
        .ok_or_else(|| bad(format!("version string at 0x{at:x} is not NUL-terminated")))?;
    let version = std::str::from_utf8(&rest[..end])
        .map_err(|_| bad(format!("version string at 0x{at:x} is not UTF-8")))?;
    match version.split_ascii_whitespace().next() {
        None => Ok(None),
        Some(r) if valid_release(r) => Ok(Some(r.to_string())),
        Some(r) => Err(bad(format!(
            "version string names an invalid release {r:?}"
        ))),
    }
}

/// A release is used as a file name: one printable path component.
fn valid_release(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= MAX_RELEASE
        && r != "."
        && r != ".."
        && r.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

/// A kernel from files: `path` is a bzImage, `modules` an optional
/// directory or tarball (plain, gzip, xz or zstd, detected by content)
/// laid out as the module docs describe. Relative paths are taken from
/// `recipe_dir`. Without modules the release is read from the bzImage
/// header and the tree holds the kernel alone.
pub fn from_path(
    recipe_dir: &Path,
    path: &str,
    modules: Option<&str>,
) -> Result<Tree, KernelSourceError> {
    let kernel_path = recipe_dir.join(path);
    let image = std::fs::read(&kernel_path).map_err(|source| KernelSourceError::Io {
        path: kernel_path.clone(),
        source,
    })?;
    let kernel_what = kernel_path.display().to_string();
    let header = bzimage_release(&kernel_what, &image)?;
    let modules = match modules {
        None => None,
        Some(m) => {
            let p = recipe_dir.join(m);
            Some((p.display().to_string(), read_modules(&p)?))
        }
    };
    assemble(&kernel_what, Arc::new(image), header, modules)
}

/// A kernel from an OCI image in LinuxKit's layout: `/kernel` (bzImage),
/// `/kernel.tar` (modules, any layout the module docs accept; optional, as
/// for a kernel with everything built in). `/System.map` and `/ucode.cpio`
/// are ignored.
pub fn from_image(image: &oci::Image) -> Result<Tree, KernelSourceError> {
    let reference = image.reference.as_str();
    let mut fs = Tree::new();
    for l in &image.layers {
        layers::apply(&mut fs, l)?;
    }
    let file = |path: &str| -> Result<Option<Arc<Vec<u8>>>, KernelSourceError> {
        match fs.get(Path::new(path)) {
            None => Ok(None),
            Some(Node::File { data, .. }) => data
                .bytes()
                .map(|b| Some(Arc::new(b.into_owned())))
                .map_err(|source| KernelSourceError::Io {
                    path: format!("{reference}:{path}").into(),
                    source,
                }),
            Some(_) => Err(KernelSourceError::Image {
                reference: reference.to_string(),
                path: path.to_string(),
                reason: "not a regular file".into(),
            }),
        }
    };
    let kernel = file("/kernel")?.ok_or_else(|| KernelSourceError::Image {
        reference: reference.to_string(),
        path: "/kernel".into(),
        reason: "missing: not a LinuxKit-style kernel image".into(),
    })?;
    let kernel_what = format!("{reference}:/kernel");
    let header = bzimage_release(&kernel_what, &kernel)?;
    let modules = match file("/kernel.tar")? {
        None => None,
        Some(data) => {
            let what = format!("{reference}:/kernel.tar");
            let tree = tar_tree(&what, data)?;
            Some((what, tree))
        }
    };
    drop(fs);
    assemble(&kernel_what, kernel, header, modules)
}

/// Reads a modules directory or tarball into a staging tree.
fn read_modules(path: &Path) -> Result<Tree, KernelSourceError> {
    let io = |source| KernelSourceError::Io {
        path: path.to_path_buf(),
        source,
    };
    // The named path itself may be a symlink: the user chose it.
    let md = std::fs::metadata(path).map_err(io)?;
    if md.is_dir() {
        Ok(Tree {
            root: read_dir(path, &md)?,
        })
    } else {
        let data = std::fs::read(path).map_err(io)?;
        tar_tree(&path.display().to_string(), Arc::new(data))
    }
}

/// Unpacks a (possibly compressed) tarball into a new tree.
fn tar_tree(what: &str, data: Arc<Vec<u8>>) -> Result<Tree, KernelSourceError> {
    let layer = Layer {
        source: what.to_string(),
        digest: Digest::of(&data),
        compression: Compression::sniff(&data),
        data: layers::LayerData::Memory(data),
    };
    let mut tree = Tree::new();
    layers::apply(&mut tree, &layer)?;
    Ok(tree)
}

/// Reads `path` recursively. Symlinks are recorded, never followed.
fn read_dir(path: &Path, md: &std::fs::Metadata) -> Result<Dir, KernelSourceError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| KernelSourceError::Io { path: p, source }
    };
    let mut dir = Dir::new(Meta::root(md.permissions().mode()));
    for entry in std::fs::read_dir(path).map_err(io(path))? {
        let entry = entry.map_err(io(path))?;
        let p = entry.path();
        let md = std::fs::symlink_metadata(&p).map_err(io(&p))?;
        let ft = md.file_type();
        let node = if ft.is_symlink() {
            Node::Symlink {
                meta: Meta::root(0o777),
                target: std::fs::read_link(&p).map_err(io(&p))?.into_os_string(),
            }
        } else if ft.is_dir() {
            Node::Dir(read_dir(&p, &md)?)
        } else if ft.is_file() {
            Node::file(md.permissions().mode(), std::fs::read(&p).map_err(io(&p))?)
        } else {
            return Err(KernelSourceError::Modules {
                what: p.display().to_string(),
                reason: "not a regular file, directory or symlink".into(),
            });
        };
        dir.entries.insert(entry.file_name(), node);
    }
    Ok(dir)
}

/// Does this directory look like `lib/modules/RELEASE` itself?
fn is_release_dir(d: &Dir) -> bool {
    d.entries.iter().any(|(name, node)| {
        let n = name.to_string_lossy();
        (n == "kernel" && matches!(node, Node::Dir(_)))
            || (n.starts_with("modules.") && matches!(node, Node::File { .. }))
    })
}

/// Finds the release directory in a staging tree (see the module docs for
/// the layouts) and takes it out: `(release, directory)`.
fn take_release(
    mut tree: Tree,
    header: Option<&str>,
    kernel_what: &str,
    what: &str,
) -> Result<(String, Dir), KernelSourceError> {
    let bad = |reason: String| KernelSourceError::Modules {
        what: what.to_string(),
        reason,
    };
    // Candidate release directories as (parent path, name).
    let mut found: Vec<(PathBuf, OsString)> = Vec::new();
    let mut rooted = false;
    for parent in ["/usr/lib/modules", "/lib/modules"] {
        if let Some(d) = tree.dir(Path::new(parent)) {
            rooted = true;
            found.extend(
                d.entries
                    .iter()
                    .filter(|(_, n)| matches!(n, Node::Dir(_)))
                    .map(|(name, _)| (PathBuf::from(parent), name.clone())),
            );
        }
    }
    if !rooted {
        if is_release_dir(&tree.root) {
            let release =
                header
                    .map(str::to_string)
                    .ok_or_else(|| KernelSourceError::NoRelease {
                        kernel: kernel_what.to_string(),
                    })?;
            return Ok((release, tree.root));
        }
        found.extend(
            tree.root
                .entries
                .iter()
                .filter(|(_, n)| matches!(n, Node::Dir(_)))
                .map(|(name, _)| (PathBuf::from("/"), name.clone())),
        );
    }
    let names = || {
        found
            .iter()
            .map(|(p, n)| p.join(n).display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (parent, name) = match found.as_slice() {
        [] => {
            return Err(bad(
                "holds no kernel release directory (expected lib/modules/RELEASE/, RELEASE/, \
                 or the contents of one)"
                    .into(),
            ))
        }
        [one] => one.clone(),
        _ => {
            let matching: Vec<_> = found
                .iter()
                .filter(|(_, n)| header.is_some_and(|h| n == h))
                .collect();
            match matching.as_slice() {
                [one] => (*one).clone(),
                _ => {
                    return Err(bad(format!(
                        "holds several kernel releases ({}); the bzImage header names {}",
                        names(),
                        header.unwrap_or("none")
                    )))
                }
            }
        }
    };
    let release = name
        .to_str()
        .filter(|r| valid_release(r))
        .ok_or_else(|| bad(format!("{name:?} is not a valid kernel release name")))?
        .to_string();
    if let Some(h) = header.filter(|h| *h != release) {
        return Err(KernelSourceError::ReleaseMismatch {
            kernel: kernel_what.to_string(),
            kernel_release: h.to_string(),
            modules: what.to_string(),
            modules_release: release,
        });
    }
    let node = tree
        .remove(&parent.join(&name))
        .map_err(|source| KernelSourceError::Tree {
            what: what.to_string(),
            source,
        })?;
    match node {
        Node::Dir(d) => Ok((release, d)),
        _ => Err(bad(format!("{release} is not a directory"))),
    }
}

/// The result tree: `/boot/vmlinuz-RELEASE` and `/lib/modules/RELEASE`.
fn assemble(
    kernel_what: &str,
    image: Arc<Vec<u8>>,
    header: Option<String>,
    modules: Option<(String, Tree)>,
) -> Result<Tree, KernelSourceError> {
    let (release, modules) = match modules {
        Some((what, staging)) => {
            let (r, d) = take_release(staging, header.as_deref(), kernel_what, &what)?;
            (r, Some(d))
        }
        None => (
            header.ok_or_else(|| KernelSourceError::NoRelease {
                kernel: kernel_what.to_string(),
            })?,
            None,
        ),
    };
    let tree_err = |source| KernelSourceError::Tree {
        what: kernel_what.to_string(),
        source,
    };
    let mut tree = Tree::new();
    tree.insert(
        &Path::new("/boot").join(format!("vmlinuz-{release}")),
        Node::File {
            meta: Meta::root(0o644),
            data: Arc::unwrap_or_clone(image).into(),
        },
    )
    .map_err(tree_err)?;
    if let Some(d) = modules {
        tree.insert(&Path::new("/lib/modules").join(&release), Node::Dir(d))
            .map_err(tree_err)?;
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use crate::kernel::Kernel;

    /// Pulls `reference` and reads it as a LinuxKit kernel image.
    async fn pulled(reference: &str, cache: &Cache) -> Result<Tree, KernelSourceError> {
        let image = oci::pull(reference, cache, &Default::default()).await?;
        from_image(&image)
    }
    use std::io::Write;

    const REL: &str = "6.1.0-test-amd64";

    /// A bzImage-shaped blob: boot flag, "HdrS", and a version string at
    /// 0x200 + `kernel_version` when `version` is given.
    fn fake_bzimage(version: Option<&str>) -> Vec<u8> {
        let mut b = vec![0u8; 0x1000];
        b[..2].copy_from_slice(b"MZ");
        b[0x1FE..0x200].copy_from_slice(&[0x55, 0xAA]);
        b[HDRS_AT..HDRS_AT + 4].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
        if let Some(v) = version {
            b[KERNEL_VERSION_AT..KERNEL_VERSION_AT + 2].copy_from_slice(&0x200u16.to_le_bytes());
            b[0x400..0x400 + v.len()].copy_from_slice(v.as_bytes());
        }
        b
    }

    fn header_version() -> String {
        format!("{REL} (builder@host) #1 SMP PREEMPT_DYNAMIC Debian 6.1.0-1")
    }

    /// Writes a module directory laid out as `prefix/kernel/...`, with the
    /// `build` and `source` symlinks Debian ships (pointing outside).
    fn write_modules(root: &Path, prefix: &str) {
        let d = root.join(prefix);
        std::fs::create_dir_all(d.join("kernel/fs/squashfs")).unwrap();
        std::fs::write(d.join("kernel/fs/squashfs/squashfs.ko.xz"), b"ko").unwrap();
        std::fs::write(d.join("modules.builtin"), b"kernel/fs/ext4/ext4.ko\n").unwrap();
        std::os::unix::fs::symlink("/usr/src/linux-headers", d.join("build")).unwrap();
        std::os::unix::fs::symlink("../../../../etc", d.join("source")).unwrap();
    }

    fn check_tree(t: &Tree) {
        let k = Kernel::from_tree(t).unwrap();
        assert_eq!(k.release, REL);
        assert_eq!(&k.image[HDRS_AT..HDRS_AT + 4], b"HdrS");
        assert_eq!(k.module_names().collect::<Vec<_>>(), vec!["squashfs"]);
        assert!(k.is_builtin("ext4"));
        let m = format!("/lib/modules/{REL}");
        match t.get(Path::new(&format!("{m}/source"))) {
            Some(Node::Symlink { target, .. }) => assert_eq!(target, "../../../../etc"),
            other => panic!("source link not kept: {other:?}"),
        }
        assert!(matches!(
            t.get(Path::new(&format!("{m}/build"))),
            Some(Node::Symlink { .. })
        ));
        // Nothing but the kernel and its modules.
        let top: Vec<_> = t.root.entries.keys().collect();
        assert_eq!(top, vec!["boot", "lib"]);
    }

    fn tar_of_dir(dir: &Path) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        b.follow_symlinks(false);
        b.append_dir_all(".", dir).unwrap();
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    /// A GNU header owned by root, mtime 0, size 0.
    fn gnu_header() -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        h
    }

    /// A tar whose entries' names are written as they are (no validation).
    fn raw_tar(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, ty, link) in entries {
            let mut h = tar::Header::new_old();
            h.set_uid(0);
            h.set_gid(0);
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(*ty);
            h.set_mode(0o644);
            h.set_size(0);
            h.set_cksum();
            b.append(&h, &[][..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn header_release() {
        let img = fake_bzimage(Some(&header_version()));
        assert_eq!(bzimage_release("k", &img).unwrap().as_deref(), Some(REL));
        assert_eq!(bzimage_release("k", &fake_bzimage(None)).unwrap(), None);

        let e = bzimage_release("vmlinuz", b"not a kernel at all").unwrap_err();
        assert!(
            e.to_string().contains("vmlinuz: not a bzImage (truncated"),
            "{e}"
        );
        let e = bzimage_release("vmlinuz", &vec![0u8; 0x1000]).unwrap_err();
        assert_eq!(e.to_string(), "vmlinuz: not a bzImage (no HdrS signature)");

        let mut past = fake_bzimage(None);
        past[KERNEL_VERSION_AT..KERNEL_VERSION_AT + 2].copy_from_slice(&0xF000u16.to_le_bytes());
        let e = bzimage_release("k", &past).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");

        let mut unterminated = fake_bzimage(None);
        unterminated[KERNEL_VERSION_AT..KERNEL_VERSION_AT + 2]
            .copy_from_slice(&0x200u16.to_le_bytes());
        unterminated[0x400..0x800].fill(b'x');
        let e = bzimage_release("k", &unterminated).unwrap_err();
        assert!(e.to_string().contains("not NUL-terminated"), "{e}");

        let e = bzimage_release("k", &fake_bzimage(Some("../../etc x"))).unwrap_err();
        assert!(e.to_string().contains("invalid release"), "{e}");
        assert_eq!(
            bzimage_release("k", &fake_bzimage(Some("  "))).unwrap(),
            None
        );
    }

    #[test]
    fn kernel_alone_takes_the_header_release() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("bzImage"),
            fake_bzimage(Some(&header_version())),
        )
        .unwrap();
        // Relative to the recipe directory.
        let t = from_path(d.path(), "bzImage", None).unwrap();
        let k = Kernel::from_tree(&t).unwrap();
        assert_eq!(k.release, REL);
        let (files, idx) = k.initramfs_modules(&[], &[]).unwrap();
        assert!(files.is_empty() && idx.modules.is_empty());
        // Absolute path, recipe dir ignored.
        let abs = d.path().join("bzImage");
        assert!(from_path(Path::new("/nonexistent"), abs.to_str().unwrap(), None).is_ok());

        std::fs::write(d.path().join("none"), fake_bzimage(None)).unwrap();
        let e = from_path(d.path(), "none", None).unwrap_err();
        assert!(matches!(e, KernelSourceError::NoRelease { .. }), "{e}");
        std::fs::write(d.path().join("vmlinuz"), b"MZ").unwrap();
        let e = from_path(d.path(), "vmlinuz", None).unwrap_err();
        assert!(e.to_string().contains("vmlinuz: not a bzImage"), "{e}");
        let e = from_path(d.path(), "missing", None).unwrap_err();
        assert!(matches!(e, KernelSourceError::Io { .. }), "{e}");
    }

    #[test]
    fn module_directories_in_every_layout() {
        let d = tempfile::tempdir().unwrap();
        let kernel = d.path().join("bzImage");
        std::fs::write(&kernel, fake_bzimage(Some(&header_version()))).unwrap();
        let nohdr = d.path().join("nohdr");
        std::fs::write(&nohdr, fake_bzimage(None)).unwrap();
        for (layout, prefix) in [
            ("root", format!("lib/modules/{REL}")),
            ("usr", format!("usr/lib/modules/{REL}")),
            ("libmodules", REL.to_string()),
            ("reldir", String::new()),
        ] {
            write_modules(&d.path().join(layout), &prefix);
            let t = from_path(d.path(), "bzImage", Some(layout)).unwrap();
            check_tree(&t);
            if layout != "reldir" {
                // The release comes from the directory when the header is silent.
                check_tree(&from_path(d.path(), "nohdr", Some(layout)).unwrap());
            } else {
                let e = from_path(d.path(), "nohdr", Some(layout)).unwrap_err();
                assert!(matches!(e, KernelSourceError::NoRelease { .. }), "{e}");
            }
        }
        // A second release: the header picks one, without a header it is ambiguous.
        write_modules(&d.path().join("root"), "lib/modules/5.10.0-old");
        check_tree(&from_path(d.path(), "bzImage", Some("root")).unwrap());
        let e = from_path(d.path(), "nohdr", Some("root")).unwrap_err();
        assert!(e.to_string().contains("several kernel releases"), "{e}");
        assert!(e.to_string().contains("5.10.0-old"), "{e}");
        // Modules for another kernel.
        write_modules(&d.path().join("other"), "lib/modules/5.10.0-old");
        let e = from_path(d.path(), "bzImage", Some("other")).unwrap_err();
        assert!(
            matches!(e, KernelSourceError::ReleaseMismatch { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("5.10.0-old"), "{e}");
        // Nothing usable.
        std::fs::create_dir(d.path().join("empty")).unwrap();
        let e = from_path(d.path(), "bzImage", Some("empty")).unwrap_err();
        assert!(e.to_string().contains("no kernel release directory"), "{e}");
    }

    #[test]
    fn symlinked_directories_are_not_followed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("bzImage"),
            fake_bzimage(Some(&header_version())),
        )
        .unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"s").unwrap();
        write_modules(&d.path().join("m"), &format!("lib/modules/{REL}"));
        std::os::unix::fs::symlink(
            &outside,
            d.path().join(format!("m/lib/modules/{REL}/kernel/x")),
        )
        .unwrap();
        let t = from_path(d.path(), "bzImage", Some("m")).unwrap();
        let x = format!("/lib/modules/{REL}/kernel/x");
        assert!(matches!(t.get(Path::new(&x)), Some(Node::Symlink { .. })));
        assert!(t.get(Path::new(&format!("{x}/secret"))).is_none());
    }

    #[test]
    fn module_tarballs() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("bzImage"),
            fake_bzimage(Some(&header_version())),
        )
        .unwrap();
        for (layout, prefix) in [
            ("root", format!("lib/modules/{REL}")),
            ("libmodules", REL.to_string()),
            ("reldir", String::new()),
        ] {
            write_modules(&d.path().join(layout), &prefix);
            let tar = tar_of_dir(&d.path().join(layout));
            let xz = liblzma::encode_all(&tar[..], 1).unwrap();
            let zst = zstd::encode_all(&tar[..], 1).unwrap();
            for (ext, data) in [
                ("tar", tar.clone()),
                ("tar.gz", gzip(&tar)),
                ("tar.xz", xz),
                ("tar.zst", zst),
            ] {
                let name = format!("{layout}.{ext}");
                std::fs::write(d.path().join(&name), data).unwrap();
                check_tree(&from_path(d.path(), "bzImage", Some(&name)).unwrap());
            }
        }
    }

    #[test]
    fn escaping_tar_paths_are_rejected() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("bzImage"),
            fake_bzimage(Some(&header_version())),
        )
        .unwrap();
        use tar::EntryType::{Regular, Symlink};
        let dotdot = format!("lib/modules/{REL}/../../../../etc/passwd");
        let via_link = format!("lib/modules/{REL}/x/passwd");
        let link = format!("lib/modules/{REL}/x");
        for (name, tar, needle) in [
            ("dotdot.tar", raw_tar(&[(&dotdot, Regular, "")]), ".."),
            (
                "abs.tar.gz",
                gzip(&raw_tar(&[("/etc/passwd", Regular, "")])),
                "absolute",
            ),
            (
                "link.tar",
                raw_tar(&[(&link, Symlink, "/etc"), (&via_link, Regular, "")]),
                "symlink",
            ),
        ] {
            std::fs::write(d.path().join(name), tar).unwrap();
            let e = from_path(d.path(), "bzImage", Some(name)).unwrap_err();
            assert!(
                matches!(e, KernelSourceError::Layer(LayerError::Unsafe { .. })),
                "{e}"
            );
            assert!(e.to_string().contains(name), "{e}");
            assert!(e.to_string().contains(needle), "{e}");
        }
    }

    // ---- OCI images in LinuxKit's layout ----

    fn sha256(data: &[u8]) -> String {
        format!("sha256:{}", Digest::of(data).hex())
    }

    /// Writes a one-layer OCI image layout whose filesystem is `layer_tar`.
    fn write_layout(dir: &Path, layer_tar: &[u8]) {
        let layer = gzip(layer_tar);
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [sha256(layer_tar)]},
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(&config), "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha256(&layer), "size": layer.len(),
            }],
        }))
        .unwrap();
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        for b in [&layer, &config, &manifest] {
            std::fs::write(blobs.join(Digest::of(b).hex()), b).unwrap();
        }
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(&manifest), "size": manifest.len(),
        }]});
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    }

    /// A LinuxKit-style image filesystem: `(path, contents)` files at the top.
    fn linuxkit_fs(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = gnu_header();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[tokio::test]
    async fn linuxkit_image() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(d.path().join("cache")).unwrap();
        write_modules(&d.path().join("m"), &format!("lib/modules/{REL}"));
        let modules = tar_of_dir(&d.path().join("m"));
        let kernel = fake_bzimage(Some(&header_version()));
        // kernel.tar compressed, to show it is sniffed.
        let fs = linuxkit_fs(&[
            ("kernel", &kernel),
            ("kernel.tar", &gzip(&modules)),
            ("System.map", b"ffffffff81000000 T _text\n"),
        ]);
        let layout = d.path().join("img");
        write_layout(&layout, &fs);
        let reference = format!("oci-layout:{}", layout.display());
        check_tree(&pulled(&reference, &cache).await.unwrap());

        // Without kernel.tar: the kernel alone.
        let layout = d.path().join("bare");
        write_layout(&layout, &linuxkit_fs(&[("kernel", &kernel)]));
        let t = pulled(&format!("oci-layout:{}", layout.display()), &cache)
            .await
            .unwrap();
        assert_eq!(Kernel::from_tree(&t).unwrap().release, REL);

        // No /kernel.
        let layout = d.path().join("nokernel");
        write_layout(&layout, &linuxkit_fs(&[("kernel.tar", &modules)]));
        let e = pulled(&format!("oci-layout:{}", layout.display()), &cache)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("/kernel: missing"), "{e}");

        // An escaping kernel.tar is rejected, naming it.
        let evil = raw_tar(&[("../../etc/passwd", tar::EntryType::Regular, "")]);
        let layout = d.path().join("evil");
        write_layout(
            &layout,
            &linuxkit_fs(&[("kernel", &kernel), ("kernel.tar", &evil)]),
        );
        let e = pulled(&format!("oci-layout:{}", layout.display()), &cache)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("/kernel.tar"), "{e}");
        assert!(
            matches!(e, KernelSourceError::Layer(LayerError::Unsafe { .. })),
            "{e}"
        );
    }

    // ---- the real Debian kernel ----

    /// Writes a tree's directory to disk: directories, files, symlinks.
    fn write_dir(dir: &Dir, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for (name, node) in &dir.entries {
            let p = to.join(name);
            match node {
                Node::Dir(d) => write_dir(d, &p),
                Node::File { data, .. } => std::fs::write(&p, data.bytes().unwrap()).unwrap(),
                Node::Symlink { target, .. } => std::os::unix::fs::symlink(target, &p).unwrap(),
                _ => {}
            }
        }
    }

    /// Appends a tree's directory to a tar below `at`.
    fn tar_dir(b: &mut tar::Builder<Vec<u8>>, dir: &Dir, at: &Path) {
        for (name, node) in &dir.entries {
            let p = at.join(name);
            let mut h = gnu_header();
            h.set_mode(node.meta().mode);
            match node {
                Node::Dir(d) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    b.append_data(&mut h, &p, &[][..]).unwrap();
                    tar_dir(b, d, &p);
                }
                Node::File { data, .. } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(data.len());
                    b.append_data(&mut h, &p, &data.bytes().unwrap()[..])
                        .unwrap();
                }
                Node::Symlink { target, .. } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    b.append_link(&mut h, &p, target).unwrap();
                }
                _ => {}
            }
        }
    }

    /// The trixie cloud kernel through the verified archive client, used as
    /// a bzImage plus modules directory and as a LinuxKit image.
    #[tokio::test]
    async fn network_trixie_kernel_from_path_and_image() {
        use crate::debian::tests as dt;
        let layer = dt::trixie_cloud_kernel().await;
        let mut deb_tree = Tree::new();
        layers::apply(&mut deb_tree, &layer).unwrap();
        let reference = Kernel::from_tree(&deb_tree).unwrap();
        let (want_files, want_idx) = reference.initramfs_modules(&[], &[]).unwrap();
        assert!(!want_files.is_empty());
        let want: Vec<&str> = want_files.iter().map(|(p, _)| p.as_str()).collect();

        // The header names the same release as the package's file name.
        assert_eq!(
            bzimage_release("vmlinuz", &reference.image)
                .unwrap()
                .as_deref(),
            Some(reference.release.as_str())
        );

        let d = tempfile::tempdir().unwrap();
        let vmlinuz = d.path().join(format!("vmlinuz-{}", reference.release));
        std::fs::write(&vmlinuz, &reference.image[..]).unwrap();
        let modules = ["/usr/lib/modules", "/lib/modules"]
            .iter()
            .find_map(|p| deb_tree.dir(Path::new(p)))
            .unwrap();
        write_dir(modules, &d.path().join("modules"));

        let check = |t: &Tree| {
            let k = Kernel::from_tree(t).unwrap();
            assert_eq!(k.release, reference.release);
            assert_eq!(k.image, reference.image);
            let (files, idx) = k.initramfs_modules(&[], &[]).unwrap();
            let got: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
            assert_eq!(got, want);
            assert_eq!(idx, want_idx);
        };
        let vm = vmlinuz.file_name().unwrap().to_str().unwrap();
        check(&from_path(d.path(), vm, Some("modules")).unwrap());
        let alone = from_path(d.path(), vm, None).unwrap();
        assert_eq!(
            Kernel::from_tree(&alone).unwrap().release,
            reference.release
        );

        // LinuxKit layout: /kernel and /kernel.tar holding lib/modules/REL.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = gnu_header();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        b.append_data(&mut h, "lib/modules", &[][..]).unwrap();
        tar_dir(&mut b, modules, Path::new("lib/modules"));
        let kernel_tar = b.into_inner().unwrap();
        let fs = linuxkit_fs(&[("kernel", &reference.image), ("kernel.tar", &kernel_tar)]);
        let layout = d.path().join("layout");
        write_layout(&layout, &fs);
        let cache = Cache::open(d.path().join("cache")).unwrap();
        check(
            &pulled(&format!("oci-layout:{}", layout.display()), &cache)
                .await
                .unwrap(),
        );
    }
}
