//! Applying layer tarballs to an in-memory [`Tree`] with OCI whiteout
//! semantics, never touching the host filesystem.
//!
//! A layer is applied in two passes over its parsed entries:
//! 1. deletions: every `.wh.NAME` removes NAME and every `.wh..wh..opq`
//!    empties its directory, both against the tree as the LOWER layers left
//!    it, so entries of this layer survive whatever their order in the tar;
//! 2. additions, in tar order, where later entries replace earlier ones.
//!
//! Nothing is ever resolved through a symlink: a parent path that crosses a
//! symlink in the tree is rejected rather than followed.

use crate::cache::Digest;
use kiln_formats::tree::{Backing, DeviceKind, Dir, FileData, Meta, Node, Tree};
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::Arc;

/// How a layer's tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip-compressed tar.
    Gzip,
    /// xz-compressed tar.
    Xz,
    /// zstd-compressed tar.
    Zstd,
}

impl Compression {
    /// Guesses the compression from the stream's magic bytes (for sources
    /// such as docker-archive that do not say).
    pub fn sniff(data: &[u8]) -> Compression {
        if data.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if data.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Compression::Xz
        } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// One layer: a (possibly compressed) tar stream and where it came from.
#[derive(Debug, Clone)]
pub struct Layer {
    /// What the layer belongs to, for errors: an image reference, or
    /// `debian:PACKAGE=VERSION`.
    pub source: String,
    /// Digest of the blob the layer came from (OCI layer blob, or the .deb).
    pub digest: Digest,
    /// How the tar stream is compressed.
    pub compression: Compression,
    /// The (possibly compressed) tar stream.
    pub data: LayerData,
}

/// Where a layer's (possibly compressed) tar stream is.
#[derive(Debug, Clone)]
pub enum LayerData {
    /// In memory.
    Memory(Arc<Vec<u8>>),
    /// `len` bytes from `offset` of a file: a blob in the cache or a layout.
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Where the stream starts.
        offset: u64,
        /// The stream's length.
        len: u64,
    },
}

impl From<Vec<u8>> for LayerData {
    fn from(v: Vec<u8>) -> Self {
        LayerData::Memory(Arc::new(v))
    }
}

impl LayerData {
    /// A whole file.
    pub fn file(path: std::path::PathBuf, len: u64) -> Self {
        LayerData::File {
            path,
            offset: 0,
            len,
        }
    }

    /// The stream's length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            LayerData::Memory(v) => v.len() as u64,
            LayerData::File { len, .. } => *len,
        }
    }

    /// Whether the stream is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stream, from its first byte.
    pub fn open(&self) -> std::io::Result<Box<dyn Read + '_>> {
        match self {
            LayerData::Memory(v) => Ok(Box::new(&v[..])),
            LayerData::File { path, offset, len } => {
                use std::io::{Seek, SeekFrom};
                let mut f = std::fs::File::open(path).map_err(|e| named_io(path, e))?;
                f.seek(SeekFrom::Start(*offset))
                    .map_err(|e| named_io(path, e))?;
                Ok(Box::new(
                    std::io::BufReader::with_capacity(1 << 16, f).take(*len),
                ))
            }
        }
    }
}

/// An I/O error that names its file.
#[derive(Debug, thiserror::Error)]
#[error("{}", path.display())]
struct NamedIo {
    path: std::path::PathBuf,
    source: std::io::Error,
}

fn named_io(path: &std::path::Path, source: std::io::Error) -> std::io::Error {
    std::io::Error::new(
        source.kind(),
        NamedIo {
            path: path.to_path_buf(),
            source,
        },
    )
}

/// Errors from applying a layer to a tree.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// A tar entry is unsafe or cannot be applied (path escaping the root, unsupported type, ...).
    #[error("{source_name} layer {digest}: {path}: {reason}")]
    Unsafe {
        /// The layer's source (image reference or `debian:PACKAGE=VERSION`).
        source_name: String,
        /// Digest of the layer's blob.
        digest: Digest,
        /// Path of the entry in the tar.
        path: String,
        /// Why it is refused.
        reason: String,
    },
    /// The layer cannot be decompressed or read as tar.
    #[error("{source_name} layer {digest}: {message}")]
    Read {
        /// The layer's source (image reference or `debian:PACKAGE=VERSION`).
        source_name: String,
        /// Digest of the layer's blob.
        digest: Digest,
        /// What went wrong.
        message: String,
    },
}

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// What one tar entry turns into.
enum Kind {
    Node(Node),
    Hardlink(Vec<OsString>),
    Whiteout(OsString),
    Opaque,
}

struct Entry {
    /// The path as written in the tar, for errors.
    raw: String,
    /// Normal components; empty for the root itself.
    comps: Vec<OsString>,
    kind: Kind,
}

/// A layer read into memory and checked, ready to apply: reading (the
/// costly decompression) can run on any thread, applying is ordered.
pub struct Parsed {
    source: String,
    digest: Digest,
    entries: Vec<Entry>,
}

impl Parsed {
    /// Absolute paths the layer adds, in archive order (`/` itself, and
    /// whiteouts, left out).
    pub fn paths(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| matches!(e.kind, Kind::Node(_) | Kind::Hardlink(_)) && !e.comps.is_empty())
            .map(|e| {
                let mut p = String::new();
                for c in &e.comps {
                    p.push('/');
                    p.push_str(&c.to_string_lossy());
                }
                p
            })
            .collect()
    }
}

/// Applies `layer` on top of `tree`.
pub fn apply(tree: &mut Tree, layer: &Layer) -> Result<(), LayerError> {
    apply_parsed(tree, &parse(layer)?)
}

/// Applies a layer read by [`parse`] on top of `tree`.
pub fn apply_parsed(tree: &mut Tree, parsed: &Parsed) -> Result<(), LayerError> {
    let entries = &parsed.entries;
    let unsafe_at = |e: &Entry, reason: &str| LayerError::Unsafe {
        source_name: parsed.source.clone(),
        digest: parsed.digest,
        path: e.raw.clone(),
        reason: reason.to_string(),
    };

    // Pass 1: deletions against the lower layers. Anything below a symlink
    // is simply not found (the tree never follows links); pass 2 rejects it.
    for e in entries {
        match &e.kind {
            Kind::Whiteout(name) => {
                if let Some(dir) = dir_at_mut(tree, &e.comps) {
                    dir.entries.remove(name);
                }
            }
            Kind::Opaque => {
                if let Some(dir) = dir_at_mut(tree, &e.comps) {
                    dir.entries.clear();
                }
            }
            _ => {}
        }
    }

    // Pass 2: validation and additions in order.
    for e in entries {
        match &e.kind {
            Kind::Whiteout(_) | Kind::Opaque => {
                check_parents(tree, &e.comps).map_err(|r| unsafe_at(e, r))?;
            }
            Kind::Node(node) => {
                let Some((last, parents)) = e.comps.split_last() else {
                    // The root itself (`./`): only its metadata can change.
                    match node {
                        Node::Dir(d) => tree.root.meta = d.meta.clone(),
                        _ => return Err(unsafe_at(e, "the root replaced by a non-directory")),
                    }
                    continue;
                };
                check_parents(tree, parents).map_err(|r| unsafe_at(e, r))?;
                let dir = parent_dir_mut(tree, parents).map_err(|r| unsafe_at(e, r))?;
                place(dir, last, node.clone());
            }
            Kind::Hardlink(target) => {
                let Some((last, parents)) = e.comps.split_last() else {
                    return Err(unsafe_at(e, "a hardlink cannot replace the root"));
                };
                check_parents(tree, parents).map_err(|r| unsafe_at(e, r))?;
                let node = match node_at(tree, target) {
                    Some(n @ Node::File { .. }) => n.clone(),
                    Some(_) => return Err(unsafe_at(e, "hardlink target is not a regular file")),
                    None => return Err(unsafe_at(e, "hardlink target does not exist")),
                };
                let dir = parent_dir_mut(tree, parents).map_err(|r| unsafe_at(e, r))?;
                place(dir, last, node);
            }
        }
    }
    Ok(())
}

/// Puts `node` into `dir` as `name`: a directory over a directory keeps its
/// children and takes the new metadata; anything else replaces outright.
fn place(dir: &mut Dir, name: &OsStr, node: Node) {
    if let (Some(Node::Dir(old)), Node::Dir(new)) = (dir.entries.get_mut(name), &node) {
        old.meta = new.meta.clone();
        return;
    }
    dir.entries.insert(name.to_os_string(), node);
}

/// `Err` if an existing component of `parents` is a symlink or not a
/// directory; missing components are fine (they will be created).
fn check_parents(tree: &Tree, parents: &[OsString]) -> Result<(), &'static str> {
    let mut dir = &tree.root;
    for c in parents {
        match dir.entries.get(c) {
            None => return Ok(()),
            Some(Node::Dir(d)) => dir = d,
            Some(Node::Symlink { .. }) => return Err("parent path passes through a symlink"),
            Some(_) => return Err("a parent is not a directory"),
        }
    }
    Ok(())
}

/// The directory at `parents`, creating missing ones `0755 root`.
fn parent_dir_mut<'a>(
    tree: &'a mut Tree,
    parents: &[OsString],
) -> Result<&'a mut Dir, &'static str> {
    let mut dir = &mut tree.root;
    for c in parents {
        let node = dir
            .entries
            .entry(c.clone())
            .or_insert_with(|| Node::dir(0o755));
        dir = node.as_dir_mut().ok_or("a parent is not a directory")?;
    }
    Ok(dir)
}

fn dir_at_mut<'a>(tree: &'a mut Tree, comps: &[OsString]) -> Option<&'a mut Dir> {
    let mut dir = &mut tree.root;
    for c in comps {
        dir = dir.entries.get_mut(c)?.as_dir_mut()?;
    }
    Some(dir)
}

fn node_at<'a>(tree: &'a Tree, comps: &[OsString]) -> Option<&'a Node> {
    let (last, parents) = comps.split_last()?;
    let mut dir = &tree.root;
    for c in parents {
        dir = dir.entries.get(c)?.as_dir()?;
    }
    dir.entries.get(last)
}

/// Splits a tar path into normal components. A leading `./` is allowed;
/// absolute paths and `..` anywhere are not.
fn normalise(raw: &[u8]) -> Result<Vec<OsString>, &'static str> {
    let mut p = raw;
    while let Some(rest) = p.strip_prefix(b"./") {
        p = rest;
    }
    if p.starts_with(b"/") {
        return Err("absolute path");
    }
    let mut out = Vec::new();
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("path contains `..`"),
            _ => out.push(OsString::from_vec(c.to_vec())),
        }
    }
    Ok(out)
}

/// The layer's tar stream, decompressed.
pub fn decompress(layer: &Layer) -> Result<Box<dyn Read + '_>, std::io::Error> {
    decompress_stream(layer.compression, layer.data.open()?)
}

/// `stream` decompressed as `c` says.
pub fn decompress_stream<'a>(
    c: Compression,
    stream: impl Read + 'a,
) -> Result<Box<dyn Read + 'a>, std::io::Error> {
    Ok(match c {
        Compression::None => Box::new(stream),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(stream)),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(stream)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(stream)?),
    })
}

/// Reads every entry of the layer into memory, validating paths.
pub fn parse(layer: &Layer) -> Result<Parsed, LayerError> {
    let mut reader = decompress(layer).map_err(|e| LayerError::Read {
        source_name: layer.source.clone(),
        digest: layer.digest,
        message: format!("decompressing: {}", crate::error_chain(&e)),
    })?;
    parse_stream(&layer.source, layer.digest, &mut reader, None)
}

/// Reads the entries of a plain tar stream, validating paths. With a
/// `backing` (the file the stream is, from its first byte), file contents
/// are not read into memory but become extents of it. Bytes after the
/// end-of-archive marker are left in `reader`.
pub fn parse_stream<R: Read>(
    source: &str,
    digest: Digest,
    reader: &mut R,
    backing: Option<&Arc<Backing>>,
) -> Result<Parsed, LayerError> {
    Ok(Parsed {
        source: source.to_string(),
        digest,
        entries: parse_entries(source, digest, reader, backing)?,
    })
}

fn parse_entries<R: Read>(
    source: &str,
    digest: Digest,
    reader: &mut R,
    backing: Option<&Arc<Backing>>,
) -> Result<Vec<Entry>, LayerError> {
    let read_err = |message: String| LayerError::Read {
        source_name: source.to_string(),
        digest,
        message,
    };
    let unsafe_err = |path: &str, reason: &str| LayerError::Unsafe {
        source_name: source.to_string(),
        digest,
        path: path.to_string(),
        reason: reason.to_string(),
    };
    let mut archive = tar::Archive::new(reader);
    let iter = archive
        .entries()
        .map_err(|e| read_err(format!("reading tar: {e}")))?;
    let mut out = Vec::new();
    for entry in iter {
        let mut entry = entry.map_err(|e| read_err(format!("reading tar: {e}")))?;
        let ty = entry.header().entry_type();
        if ty.is_pax_global_extensions() {
            continue;
        }
        let raw_bytes = entry.path_bytes().into_owned();
        let raw = String::from_utf8_lossy(&raw_bytes).into_owned();
        let hdr_err = |e: std::io::Error| read_err(format!("{raw}: bad tar header: {e}"));
        let mut comps = normalise(&raw_bytes).map_err(|r| unsafe_err(&raw, r))?;

        // A whiteout marker is only meaningful as the final component.
        let (parents, last) = match comps.split_last() {
            Some((l, p)) => (p, Some(l.as_bytes())),
            None => (&comps[..], None),
        };
        if parents.iter().any(|c| c.as_bytes().starts_with(WHITEOUT)) {
            return Err(unsafe_err(&raw, "whiteout name used as a directory"));
        }
        if let Some(name) = last.filter(|n| n.starts_with(WHITEOUT)) {
            let kind = if name == OPAQUE {
                Kind::Opaque
            } else {
                let victim = &name[WHITEOUT.len()..];
                if victim.is_empty()
                    || victim == b"."
                    || victim == b".."
                    || victim.contains(&b'/')
                    || victim.starts_with(WHITEOUT)
                {
                    return Err(unsafe_err(&raw, "invalid whiteout name"));
                }
                Kind::Whiteout(OsString::from_vec(victim.to_vec()))
            };
            comps.pop();
            out.push(Entry { raw, comps, kind });
            continue;
        }

        let meta = entry_meta(&mut entry).map_err(hdr_err)?;
        let kind = match ty {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let data = match backing {
                    // Left unread: the archive skips it on the next entry.
                    Some(b) => FileData::extent(b, entry.raw_file_position(), entry.size()),
                    None => {
                        let mut data = Vec::with_capacity(entry.size().min(1 << 30) as usize);
                        entry
                            .read_to_end(&mut data)
                            .map_err(|e| read_err(format!("{raw}: reading data: {e}")))?;
                        data.into()
                    }
                };
                Kind::Node(Node::File { meta, data })
            }
            tar::EntryType::Directory => Kind::Node(Node::Dir(Dir::new(meta))),
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| read_err(format!("{raw}: symlink without a target")))?;
                Kind::Node(Node::Symlink {
                    meta,
                    target: OsString::from_vec(target.into_owned()),
                })
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| read_err(format!("{raw}: hardlink without a target")))?;
                let t = normalise(&target).map_err(|r| {
                    unsafe_err(
                        &raw,
                        &format!(
                            "hardlink target {:?}: {r}",
                            String::from_utf8_lossy(&target)
                        ),
                    )
                })?;
                if t.is_empty() {
                    return Err(unsafe_err(&raw, "hardlink to the root"));
                }
                Kind::Hardlink(t)
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                let h = entry.header();
                let major = h.device_major().map_err(hdr_err)?.unwrap_or(0);
                let minor = h.device_minor().map_err(hdr_err)?.unwrap_or(0);
                let kind = if ty == tar::EntryType::Char {
                    DeviceKind::Char
                } else {
                    DeviceKind::Block
                };
                Kind::Node(Node::Device {
                    meta,
                    kind,
                    major,
                    minor,
                })
            }
            tar::EntryType::Fifo => Kind::Node(Node::Fifo { meta }),
            other => {
                return Err(read_err(format!(
                    "{raw}: unsupported tar entry type {:?}",
                    other.as_byte() as char
                )))
            }
        };
        out.push(Entry { raw, comps, kind });
    }
    Ok(out)
}

/// Mode, owner, mtime and xattrs from the header, with PAX overrides.
fn entry_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> std::io::Result<Meta> {
    let h = entry.header();
    let mut uid = h.uid()?;
    let mut gid = h.gid()?;
    let mut mtime = h.mtime()?;
    let mode = h.mode()? & 0o7777;
    let mut xattrs = BTreeMap::new();
    if let Some(pax) = entry.pax_extensions()? {
        for ext in pax {
            let ext = ext?;
            let key = ext.key_bytes();
            let num = || {
                let v = ext.value().ok()?;
                // PAX times may carry a fraction: whole seconds are enough.
                v.split('.').next()?.parse::<u64>().ok()
            };
            match key {
                b"uid" => uid = num().unwrap_or(uid),
                b"gid" => gid = num().unwrap_or(gid),
                b"mtime" => mtime = num().unwrap_or(mtime),
                _ => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        xattrs.insert(
                            OsString::from_vec(name.to_vec()),
                            ext.value_bytes().to_vec(),
                        );
                    }
                }
            }
        }
    }
    let id = |v: u64, what: &str| {
        u32::try_from(v).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{what} {v} out of range"),
            )
        })
    };
    Ok(Meta {
        mode,
        uid: id(uid, "uid")?,
        gid: id(gid, "gid")?,
        mtime,
        xattrs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Builds tar streams in tests.
    struct T(tar::Builder<Vec<u8>>);

    impl T {
        fn new() -> Self {
            T(tar::Builder::new(Vec::new()))
        }
        fn hdr(ty: tar::EntryType, mode: u32, size: u64) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(ty);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1000);
            h.set_size(size);
            h
        }
        fn file(mut self, path: &str, data: &str) -> Self {
            let mut h = Self::hdr(tar::EntryType::Regular, 0o644, data.len() as u64);
            self.0.append_data(&mut h, path, data.as_bytes()).unwrap();
            self
        }
        fn file_owned(mut self, path: &str, data: &str, uid: u64, mode: u32) -> Self {
            let mut h = Self::hdr(tar::EntryType::Regular, mode, data.len() as u64);
            h.set_uid(uid);
            h.set_gid(uid + 1);
            self.0.append_data(&mut h, path, data.as_bytes()).unwrap();
            self
        }
        fn dir(mut self, path: &str, mode: u32) -> Self {
            let mut h = Self::hdr(tar::EntryType::Directory, mode, 0);
            self.0.append_data(&mut h, path, &[][..]).unwrap();
            self
        }
        fn link(mut self, ty: tar::EntryType, path: &str, target: &str) -> Self {
            let mut h = Self::hdr(ty, 0o777, 0);
            self.0.append_link(&mut h, path, target).unwrap();
            self
        }
        fn symlink(self, path: &str, target: &str) -> Self {
            self.link(tar::EntryType::Symlink, path, target)
        }
        fn hardlink(self, path: &str, target: &str) -> Self {
            self.link(tar::EntryType::Link, path, target)
        }
        /// Writes a header with a raw name, bypassing the builder's checks
        /// (it refuses `..`, as it should).
        fn raw(mut self, ty: tar::EntryType, path: &str, link: Option<&str>) -> Self {
            let mut h = Self::hdr(ty, 0o644, 0);
            let old = h.as_old_mut();
            old.name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(l) = link {
                old.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_cksum();
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        fn layer(self) -> Layer {
            let data = self.0.into_inner().unwrap();
            Layer {
                source: "test/image:1".into(),
                digest: Digest::of(&data),
                compression: Compression::None,
                data: data.into(),
            }
        }
    }

    fn file_data(t: &Tree, p: &str) -> Option<String> {
        match t.get(Path::new(p))? {
            Node::File { data, .. } => {
                Some(String::from_utf8(data.bytes().unwrap().to_vec()).unwrap())
            }
            _ => None,
        }
    }

    fn build(layers: &[Layer]) -> Result<Tree, LayerError> {
        let mut t = Tree::new();
        for l in layers {
            apply(&mut t, l)?;
        }
        Ok(t)
    }

    #[test]
    fn plain_extract() {
        let t = build(&[T::new()
            .dir("./etc/", 0o755)
            .file_owned("./etc/passwd", "root", 7, 0o4750)
            .symlink("bin", "usr/bin")
            .file("usr/bin/sh", "sh")
            .layer()])
        .unwrap();
        let n = t.get(Path::new("/etc/passwd")).unwrap();
        assert_eq!(n.meta().uid, 7);
        assert_eq!(n.meta().gid, 8);
        assert_eq!(n.meta().mode, 0o4750);
        assert_eq!(n.meta().mtime, 1000);
        assert_eq!(
            t.get(Path::new("/bin")),
            Some(&Node::Symlink {
                meta: Meta {
                    mode: 0o777,
                    uid: 0,
                    gid: 0,
                    mtime: 1000,
                    xattrs: BTreeMap::new()
                },
                target: "usr/bin".into()
            })
        );
        // The implicit parent is 0755 root, mtime 0.
        assert_eq!(t.get(Path::new("/usr")).unwrap().meta(), &Meta::root(0o755));
        assert_eq!(file_data(&t, "/usr/bin/sh").as_deref(), Some("sh"));
    }

    #[test]
    fn devices_fifos_xattrs_and_long_names() {
        let mut b = T::new();
        let mut h = T::hdr(tar::EntryType::Char, 0o666, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        b.0.append_data(&mut h, "dev/null", &[][..]).unwrap();
        let mut h = T::hdr(tar::EntryType::Fifo, 0o600, 0);
        b.0.append_data(&mut h, "run/fifo", &[][..]).unwrap();
        b.0.append_pax_extensions([
            ("SCHILY.xattr.security.capability", &b"\x01\x02"[..]),
            ("uid", b"70000"),
        ])
        .unwrap();
        let mut h = T::hdr(tar::EntryType::Regular, 0o755, 1);
        b.0.append_data(&mut h, "usr/bin/ping", &b"p"[..]).unwrap();
        let long = format!("a/{}/file", "x".repeat(200));
        b = b.file(&long, "long");
        let t = build(&[b.layer()]).unwrap();
        assert!(matches!(
            t.get(Path::new("/dev/null")),
            Some(Node::Device {
                kind: DeviceKind::Char,
                major: 1,
                minor: 3,
                ..
            })
        ));
        assert!(matches!(
            t.get(Path::new("/run/fifo")),
            Some(Node::Fifo { .. })
        ));
        let ping = t.get(Path::new("/usr/bin/ping")).unwrap().meta();
        assert_eq!(ping.uid, 70000);
        assert_eq!(
            ping.xattrs.get(OsStr::new("security.capability")).unwrap(),
            b"\x01\x02"
        );
        assert_eq!(file_data(&t, &long).as_deref(), Some("long"));
    }

    #[test]
    fn later_entries_override() {
        let t = build(&[
            T::new()
                .file("a/f", "1")
                .file("a/g", "g")
                .dir("d", 0o700)
                .file("d/keep", "k")
                .dir("x", 0o755)
                .file("x/y", "y")
                .layer(),
            T::new()
                .file("a/f", "2")
                .dir("d", 0o750)
                .file("x", "now a file")
                .layer(),
        ])
        .unwrap();
        assert_eq!(file_data(&t, "/a/f").as_deref(), Some("2"));
        assert_eq!(file_data(&t, "/a/g").as_deref(), Some("g"));
        // Dir over dir: metadata replaced, children kept.
        assert_eq!(t.get(Path::new("/d")).unwrap().meta().mode, 0o750);
        assert_eq!(file_data(&t, "/d/keep").as_deref(), Some("k"));
        // A file replacing a dir removes the dir and its children.
        assert_eq!(file_data(&t, "/x").as_deref(), Some("now a file"));
        assert!(t.get(Path::new("/x/y")).is_none());
    }

    #[test]
    fn whiteout_deletes_lower_and_never_appears() {
        let t = build(&[
            T::new()
                .file("a/f", "1")
                .file("a/g", "g")
                .dir("b", 0o755)
                .file("b/c", "c")
                .layer(),
            T::new()
                .file("a/.wh.f", "")
                .file(".wh.b", "")
                .file("a/.wh.missing", "")
                .layer(),
        ])
        .unwrap();
        assert!(t.get(Path::new("/a/f")).is_none());
        assert!(t.get(Path::new("/b")).is_none());
        assert_eq!(file_data(&t, "/a/g").as_deref(), Some("g"));
        assert!(t
            .walk()
            .iter()
            .all(|(p, _)| !p.to_string_lossy().contains(".wh.")));
    }

    #[test]
    fn whiteout_then_recreate_in_same_layer() {
        let t = build(&[
            T::new().dir("d", 0o755).file("d/old", "o").layer(),
            T::new()
                .file(".wh.d", "")
                .dir("d", 0o700)
                .file("d/new", "n")
                .layer(),
        ])
        .unwrap();
        assert!(t.get(Path::new("/d/old")).is_none());
        assert_eq!(file_data(&t, "/d/new").as_deref(), Some("n"));
        assert_eq!(t.get(Path::new("/d")).unwrap().meta().mode, 0o700);
    }

    #[test]
    fn opaque_hides_lower_children_only() {
        let t = build(&[
            T::new()
                .file("d/lower1", "1")
                .file("d/sub/lower2", "2")
                .file("e/stay", "s")
                .layer(),
            // Same-layer entries both before and after the marker survive.
            T::new()
                .file("d/before", "b")
                .dir("d", 0o711)
                .file("d/.wh..wh..opq", "")
                .file("d/after", "a")
                .layer(),
        ])
        .unwrap();
        assert!(t.get(Path::new("/d/lower1")).is_none());
        assert!(t.get(Path::new("/d/sub")).is_none());
        assert_eq!(file_data(&t, "/d/before").as_deref(), Some("b"));
        assert_eq!(file_data(&t, "/d/after").as_deref(), Some("a"));
        assert_eq!(t.get(Path::new("/d")).unwrap().meta().mode, 0o711);
        assert_eq!(file_data(&t, "/e/stay").as_deref(), Some("s"));
        assert!(t.get(Path::new("/d/.wh..wh..opq")).is_none());
    }

    #[test]
    fn hardlinks_share_data() {
        let t = build(&[
            T::new().file_owned("bin/busybox", "bb", 0, 0o755).layer(),
            T::new()
                .hardlink("bin/sh", "bin/busybox")
                .file("x/f", "f")
                .hardlink("./x/g", "./x/f")
                .layer(),
        ])
        .unwrap();
        let (Some(Node::File { data: a, meta }), Some(Node::File { data: b, .. })) = (
            t.get(Path::new("/bin/busybox")),
            t.get(Path::new("/bin/sh")),
        ) else {
            panic!("not files")
        };
        assert_eq!(a.identity(), b.identity());
        assert_eq!(meta.mode, 0o755);
        assert_eq!(file_data(&t, "/x/g").as_deref(), Some("f"));
    }

    fn rejected(layers: &[Layer], needle: &str) {
        match build(layers) {
            Err(e @ LayerError::Unsafe { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("test/image:1"), "{msg}");
                assert!(msg.contains("sha256:"), "{msg}");
                assert!(msg.contains(needle), "{msg} lacks {needle}");
            }
            other => panic!("expected rejection, got {other:?}"),
        }
    }

    #[test]
    fn unsafe_paths_are_rejected() {
        use tar::EntryType::{Link, Regular};
        rejected(
            &[T::new().raw(Regular, "a/../../etc/x", None).layer()],
            "..",
        );
        rejected(&[T::new().raw(Regular, "/etc/x", None).layer()], "absolute");
        rejected(
            &[T::new().raw(Regular, ".//etc/x", None).layer()],
            "absolute",
        );
        rejected(
            &[T::new().file("f", "").raw(Link, "g", Some("../f")).layer()],
            "..",
        );
        rejected(
            &[T::new().raw(Link, "g", Some("nothere")).layer()],
            "does not exist",
        );
        rejected(
            &[T::new().dir("d", 0o755).raw(Link, "g", Some("d")).layer()],
            "not a regular file",
        );
        rejected(
            &[T::new().raw(Regular, "a/.wh..", None).layer()],
            "invalid whiteout",
        );
        rejected(&[T::new().raw(Regular, "a/.wh..", None).layer()], "a/.wh..");
        rejected(
            &[T::new().raw(Regular, "a/.wh.", None).layer()],
            "invalid whiteout",
        );
        rejected(
            &[T::new().raw(Regular, "a/.wh.b/c", None).layer()],
            "whiteout name",
        );
    }

    #[test]
    fn symlink_parent_is_not_followed() {
        let lower = T::new()
            .symlink("etc", "/")
            .symlink("lib", "../../x")
            .layer();
        rejected(
            &[lower.clone(), T::new().file("etc/x", "evil").layer()],
            "symlink",
        );
        rejected(
            &[lower.clone(), T::new().file("etc/.wh.passwd", "").layer()],
            "symlink",
        );
        rejected(
            &[lower.clone(), T::new().file("lib/.wh..wh..opq", "").layer()],
            "symlink",
        );
        rejected(
            &[
                lower.clone(),
                T::new().file("f", "").hardlink("lib/y", "f").layer(),
            ],
            "symlink",
        );
        rejected(
            &[T::new().symlink("s", "/").file("s/x", "").layer()],
            "symlink",
        );
        // Replacing the symlink with a directory first is fine.
        let t = build(&[
            lower,
            T::new().dir("etc", 0o755).file("etc/x", "ok").layer(),
        ])
        .unwrap();
        assert_eq!(file_data(&t, "/etc/x").as_deref(), Some("ok"));
    }

    #[test]
    fn compressed_layers() {
        use std::io::Write;
        let base = T::new().file("hello", "world").layer();
        let LayerData::Memory(tar) = &base.data else {
            panic!("in memory")
        };
        let tar = tar.to_vec();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::stream::encode_all(&tar[..], 3).unwrap();
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(&tar).unwrap();
        let xz = xz.finish().unwrap();
        for (c, data) in [
            (Compression::Gzip, gz),
            (Compression::Zstd, zst),
            (Compression::Xz, xz),
        ] {
            assert_eq!(Compression::sniff(&data), c);
            let l = Layer {
                compression: c,
                data: data.into(),
                ..base.clone()
            };
            let t = build(&[l]).unwrap();
            assert_eq!(file_data(&t, "/hello").as_deref(), Some("world"), "{c:?}");
        }
        assert_eq!(Compression::sniff(&tar), Compression::None);
    }

    #[test]
    fn corrupt_stream_is_a_read_error() {
        let l = Layer {
            compression: Compression::Gzip,
            ..T::new().file("a", "b").layer()
        };
        let e = build(&[l]).unwrap_err();
        assert!(matches!(e, LayerError::Read { .. }), "{e}");
        assert!(e.to_string().contains("test/image:1"));
    }
}
