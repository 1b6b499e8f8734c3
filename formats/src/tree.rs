//! An in-memory filesystem tree: what layer application produces and what
//! the filesystem encoders (squashfs, cpio) consume.
//!
//! Directory entries live in a `BTreeMap`, so every walk is sorted and every
//! encoder that follows the walk is reproducible. File contents are
//! [`FileData`]: shared bytes, or a range of a file on disk (a cached,
//! unpacked layer) read only when an encoder streams it, so a tree of
//! gigabytes costs memory for its metadata only.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// Errors from tree manipulation. Paths are tree-absolute.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    /// A path has `..` or other non-normal components, or is not below the root.
    #[error("{0}: path is not normal (`..`, or not below the root)")]
    BadPath(PathBuf),
    /// A parent component of the path is not a directory.
    #[error("{0}: a parent is not a directory")]
    NotADirectory(PathBuf),
    /// The path does not exist in the tree.
    #[error("{0}: no such entry")]
    NotFound(PathBuf),
}

/// Ownership, permissions and times shared by every node kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid/setgid/sticky (`0o7777`); the file
    /// type is the node's variant, never these bits.
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Seconds since the epoch; taken from layer metadata or the recipe.
    pub mtime: u64,
    /// Extended attributes: name to value.
    pub xattrs: BTreeMap<OsString, Vec<u8>>,
}

impl Meta {
    /// Root-owned metadata with the given permissions and mtime 0.
    pub fn root(mode: u32) -> Self {
        Meta {
            mode: mode & 0o7777,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: BTreeMap::new(),
        }
    }
}

/// Device node kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// Character device.
    Char,
    /// Block device.
    Block,
}

/// One filesystem object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory.
    Dir(Dir),
    /// A regular file.
    File {
        /// Ownership, permissions and times.
        meta: Meta,
        /// File contents.
        data: FileData,
    },
    /// A symbolic link.
    Symlink {
        /// Ownership, permissions and times.
        meta: Meta,
        /// Link target, stored as given.
        target: OsString,
    },
    /// A character or block device node.
    Device {
        /// Ownership, permissions and times.
        meta: Meta,
        /// Character or block device.
        kind: DeviceKind,
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo {
        /// Ownership, permissions and times.
        meta: Meta,
    },
    /// A Unix domain socket.
    Socket {
        /// Ownership, permissions and times.
        meta: Meta,
    },
}

impl Node {
    /// The node's metadata, whatever its kind.
    pub fn meta(&self) -> &Meta {
        match self {
            Node::Dir(d) => &d.meta,
            Node::File { meta, .. }
            | Node::Symlink { meta, .. }
            | Node::Device { meta, .. }
            | Node::Fifo { meta }
            | Node::Socket { meta } => meta,
        }
    }

    /// Mutable access to the node's metadata.
    pub fn meta_mut(&mut self) -> &mut Meta {
        match self {
            Node::Dir(d) => &mut d.meta,
            Node::File { meta, .. }
            | Node::Symlink { meta, .. }
            | Node::Device { meta, .. }
            | Node::Fifo { meta }
            | Node::Socket { meta } => meta,
        }
    }

    /// A regular file owned by root.
    pub fn file(mode: u32, data: impl Into<Vec<u8>>) -> Self {
        Node::File {
            meta: Meta::root(mode),
            data: FileData::from(data.into()),
        }
    }

    /// A symlink owned by root.
    pub fn symlink(target: impl Into<OsString>) -> Self {
        Node::Symlink {
            meta: Meta::root(0o777),
            target: target.into(),
        }
    }

    /// A device node owned by root.
    pub fn device(kind: DeviceKind, mode: u32, major: u32, minor: u32) -> Self {
        Node::Device {
            meta: Meta::root(mode),
            kind,
            major,
            minor,
        }
    }

    /// An empty directory owned by root.
    pub fn dir(mode: u32) -> Self {
        Node::Dir(Dir::new(Meta::root(mode)))
    }

    /// The directory, if this node is one.
    pub fn as_dir(&self) -> Option<&Dir> {
        match self {
            Node::Dir(d) => Some(d),
            _ => None,
        }
    }

    /// The directory, mutably, if this node is one.
    pub fn as_dir_mut(&mut self) -> Option<&mut Dir> {
        match self {
            Node::Dir(d) => Some(d),
            _ => None,
        }
    }
}

/// An open file that [`FileData`] extents are read from, named for errors.
#[derive(Debug)]
pub struct Backing {
    file: File,
    name: String,
}

impl Backing {
    /// Extents of `file`, which `name` identifies in errors.
    pub fn new(file: File, name: impl Into<String>) -> Arc<Self> {
        Arc::new(Backing {
            file,
            name: name.into(),
        })
    }
}

/// A failed read of an extent, naming its backing file.
#[derive(Debug, thiserror::Error)]
#[error("reading {name} at offset {offset}")]
pub struct ExtentError {
    name: String,
    offset: u64,
    #[source]
    source: io::Error,
}

/// A regular file's contents: bytes in memory, or `len` bytes at `offset`
/// of a [`Backing`] file. Clones share, so hardlinks and copies of a node
/// cost nothing more.
#[derive(Clone)]
pub struct FileData(Repr);

#[derive(Clone)]
enum Repr {
    Memory(Arc<Vec<u8>>),
    Extent {
        backing: Arc<Backing>,
        offset: u64,
        len: u64,
    },
}

impl From<Vec<u8>> for FileData {
    fn from(v: Vec<u8>) -> Self {
        FileData(Repr::Memory(Arc::new(v)))
    }
}

impl FileData {
    /// `len` bytes of `backing` from `offset`; nothing is read yet.
    pub fn extent(backing: &Arc<Backing>, offset: u64, len: u64) -> Self {
        FileData(Repr::Extent {
            backing: Arc::clone(backing),
            offset,
            len,
        })
    }

    /// The size in bytes.
    pub fn len(&self) -> u64 {
        match &self.0 {
            Repr::Memory(v) => v.len() as u64,
            Repr::Extent { len, .. } => *len,
        }
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` from byte `pos` of the contents; reading past the end
    /// is an `UnexpectedEof` error.
    pub fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = pos.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len()) {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        match &self.0 {
            Repr::Memory(v) => {
                // In range: checked against len above.
                let at = usize::try_from(pos).map_err(|_| io::ErrorKind::UnexpectedEof)?;
                buf.copy_from_slice(&v[at..at + buf.len()]);
                Ok(())
            }
            Repr::Extent {
                backing, offset, ..
            } => backing
                .file
                .read_exact_at(buf, offset + pos)
                .map_err(|source| {
                    io::Error::new(
                        source.kind(),
                        ExtentError {
                            name: backing.name.clone(),
                            offset: offset + pos,
                            source,
                        },
                    )
                }),
        }
    }

    /// The whole contents (borrowed when in memory, read otherwise).
    pub fn bytes(&self) -> io::Result<Cow<'_, [u8]>> {
        match &self.0 {
            Repr::Memory(v) => Ok(Cow::Borrowed(v.as_slice())),
            Repr::Extent { len, .. } => {
                let n = usize::try_from(*len).map_err(|_| io::ErrorKind::OutOfMemory)?;
                let mut buf = vec![0; n];
                self.read_at(0, &mut buf)?;
                Ok(Cow::Owned(buf))
            }
        }
    }

    /// The contents as a sequential reader.
    pub fn reader(&self) -> DataReader<'_> {
        DataReader { data: self, pos: 0 }
    }

    /// Identifies the bytes: equal for clones of one `FileData`, so an
    /// encoder can treat them as one file.
    pub fn identity(&self) -> (usize, u64) {
        match &self.0 {
            Repr::Memory(v) => (Arc::as_ptr(v) as usize, 0),
            Repr::Extent {
                backing, offset, ..
            } => (Arc::as_ptr(backing) as usize, *offset),
        }
    }
}

impl std::fmt::Debug for FileData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Repr::Memory(v) => write!(f, "FileData({} bytes in memory)", v.len()),
            Repr::Extent {
                backing,
                offset,
                len,
            } => write!(f, "FileData({len} bytes of {} at {offset})", backing.name),
        }
    }
}

/// Equal contents; a read error makes them unequal.
impl PartialEq for FileData {
    fn eq(&self, other: &Self) -> bool {
        self.identity() == other.identity()
            || (self.len() == other.len()
                && matches!((self.bytes(), other.bytes()), (Ok(a), Ok(b)) if a == b))
    }
}

impl Eq for FileData {}

/// Reads a [`FileData`] from start to end.
pub struct DataReader<'a> {
    data: &'a FileData,
    pos: u64,
}

impl Read for DataReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.data.len() - self.pos;
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        self.data.read_at(self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A directory: metadata plus sorted children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dir {
    /// The directory's own metadata.
    pub meta: Meta,
    /// Children by name, sorted.
    pub entries: BTreeMap<OsString, Node>,
}

impl Dir {
    /// An empty directory with the given metadata.
    pub fn new(meta: Meta) -> Self {
        Dir {
            meta,
            entries: BTreeMap::new(),
        }
    }
}

/// A whole filesystem rooted at `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// The root directory.
    pub root: Dir,
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

/// Splits a path into its normal components, ignoring a leading `/` and `.`.
/// Rejects `..` so that no caller can address anything above the root.
pub fn components(path: &Path) -> Result<Vec<&OsStr>, TreeError> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(TreeError::BadPath(path.to_path_buf()))
            }
        }
    }
    Ok(out)
}

impl Tree {
    /// An empty tree whose root is `0755 root:root`.
    pub fn new() -> Self {
        Tree {
            root: Dir::new(Meta::root(0o755)),
        }
    }

    /// The node at `path` (`/` is the root directory itself).
    pub fn get(&self, path: &Path) -> Option<&Node> {
        let comps = components(path).ok()?;
        let (last, parents) = comps.split_last()?;
        let mut dir = &self.root;
        for c in parents {
            dir = dir.entries.get(*c)?.as_dir()?;
        }
        dir.entries.get(*last)
    }

    /// Mutable access to the node at `path`, if it exists.
    pub fn get_mut(&mut self, path: &Path) -> Option<&mut Node> {
        let comps = components(path).ok()?;
        let (last, parents) = comps.split_last()?;
        let mut dir = &mut self.root;
        for c in parents {
            dir = dir.entries.get_mut(*c)?.as_dir_mut()?;
        }
        dir.entries.get_mut(*last)
    }

    /// The directory at `path`, `/` included.
    pub fn dir(&self, path: &Path) -> Option<&Dir> {
        let comps = components(path).ok()?;
        let mut dir = &self.root;
        for c in comps {
            dir = dir.entries.get(c)?.as_dir()?;
        }
        Some(dir)
    }

    /// The directory at `path`, creating missing directories with `meta`.
    /// Fails if an existing component is not a directory (symlinks are not
    /// followed: callers that want link resolution do it themselves).
    pub fn mkdir_p(&mut self, path: &Path, meta: &Meta) -> Result<&mut Dir, TreeError> {
        let comps = components(path)?;
        let mut dir = &mut self.root;
        for c in comps {
            let node = dir
                .entries
                .entry(c.to_os_string())
                .or_insert_with(|| Node::Dir(Dir::new(meta.clone())));
            dir = node
                .as_dir_mut()
                .ok_or_else(|| TreeError::NotADirectory(path.to_path_buf()))?;
        }
        Ok(dir)
    }

    /// Puts `node` at `path`, replacing what was there. Missing parents are
    /// created `0755 root:root`. Returns the replaced node, if any.
    pub fn insert(&mut self, path: &Path, node: Node) -> Result<Option<Node>, TreeError> {
        let comps = components(path)?;
        let Some((last, parents)) = comps.split_last() else {
            // Replacing the root itself: only a directory makes sense.
            return match node {
                Node::Dir(d) => Ok(Some(Node::Dir(std::mem::replace(&mut self.root, d)))),
                _ => Err(TreeError::NotADirectory(path.to_path_buf())),
            };
        };
        let parent: PathBuf = parents.iter().collect();
        let dir = self.mkdir_p(&parent, &Meta::root(0o755))?;
        Ok(dir.entries.insert(last.to_os_string(), node))
    }

    /// Removes and returns the node at `path`.
    pub fn remove(&mut self, path: &Path) -> Result<Node, TreeError> {
        let comps = components(path)?;
        let (last, parents) = comps
            .split_last()
            .ok_or_else(|| TreeError::BadPath(path.to_path_buf()))?;
        let mut dir = &mut self.root;
        for c in parents {
            dir = dir
                .entries
                .get_mut(*c)
                .and_then(Node::as_dir_mut)
                .ok_or_else(|| TreeError::NotFound(path.to_path_buf()))?;
        }
        dir.entries
            .remove(*last)
            .ok_or_else(|| TreeError::NotFound(path.to_path_buf()))
    }

    /// Every node below the root in depth-first, sorted order (a parent
    /// before its children), with its tree-absolute path.
    pub fn walk(&self) -> Vec<(PathBuf, &Node)> {
        fn go<'a>(dir: &'a Dir, at: &Path, out: &mut Vec<(PathBuf, &'a Node)>) {
            for (name, node) in &dir.entries {
                let p = at.join(name);
                out.push((p.clone(), node));
                if let Node::Dir(d) = node {
                    go(d, &p, out);
                }
            }
        }
        let mut out = Vec::new();
        go(&self.root, Path::new("/"), &mut out);
        out
    }

    /// Total bytes of regular-file data (shared data counted each time).
    pub fn data_size(&self) -> u64 {
        self.walk()
            .iter()
            .map(|(_, n)| match n {
                Node::File { data, .. } => data.len(),
                _ => 0,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_creates_parents_and_walk_is_sorted() {
        let mut t = Tree::new();
        t.insert(Path::new("/b/z"), Node::file(0o644, "z")).unwrap();
        t.insert(Path::new("/a"), Node::file(0o600, "a")).unwrap();
        t.insert(Path::new("b/c"), Node::symlink("z")).unwrap();
        let paths: Vec<_> = t.walk().into_iter().map(|(p, _)| p).collect();
        assert_eq!(
            paths,
            vec![
                PathBuf::from("/a"),
                PathBuf::from("/b"),
                PathBuf::from("/b/c"),
                PathBuf::from("/b/z")
            ]
        );
        assert_eq!(t.get(Path::new("/b")).unwrap().meta().mode, 0o755);
    }

    #[test]
    fn dotdot_is_rejected() {
        let mut t = Tree::new();
        assert_eq!(
            t.insert(Path::new("/a/../../etc"), Node::file(0o644, "")),
            Err(TreeError::BadPath(PathBuf::from("/a/../../etc")))
        );
        assert!(t.get(Path::new("../x")).is_none());
    }

    #[test]
    fn file_as_parent_is_an_error() {
        let mut t = Tree::new();
        t.insert(Path::new("/f"), Node::file(0o644, "")).unwrap();
        assert!(matches!(
            t.insert(Path::new("/f/g"), Node::file(0o644, "")),
            Err(TreeError::NotADirectory(_))
        ));
    }

    #[test]
    fn extents_read_their_range_and_name_their_file() {
        let dir = std::env::temp_dir().join(format!("kiln-tree-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("backing");
        std::fs::write(&path, b"0123456789").unwrap();
        let b = Backing::new(File::open(&path).unwrap(), "layer.tar");
        let d = FileData::extent(&b, 2, 5);
        assert_eq!(d.len(), 5);
        assert_eq!(&d.bytes().unwrap()[..], b"23456");
        let mut all = Vec::new();
        d.reader().read_to_end(&mut all).unwrap();
        assert_eq!(all, b"23456");
        assert_eq!(d, FileData::from(b"23456".to_vec()));
        assert_ne!(d, FileData::extent(&b, 3, 5));
        // Past the end of the extent, and past the end of the file.
        assert!(d.read_at(4, &mut [0; 2]).is_err());
        let long = FileData::extent(&b, 8, 5);
        let e = long.bytes().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("layer.tar at offset 8"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn remove_returns_node() {
        let mut t = Tree::new();
        t.insert(Path::new("/d/f"), Node::file(0o644, "x")).unwrap();
        assert!(matches!(t.remove(Path::new("/d/f")), Ok(Node::File { .. })));
        assert!(t.get(Path::new("/d/f")).is_none());
        assert!(matches!(
            t.remove(Path::new("/d/f")),
            Err(TreeError::NotFound(_))
        ));
    }
}
