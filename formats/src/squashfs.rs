//! squashfs 4.0 images from a [`Tree`], written with the `backhand` crate.
//!
//! Compression defaults to zstd: Debian's kernels (bookworm 6.1, trixie
//! 6.12) build squashfs with zlib, lz4, lzo, xz and zstd, and zstd
//! decompresses several times faster than xz for a ratio close to it, which
//! matters for root filesystem reads at boot on small instances and under
//! emulation. It costs one C build (libzstd, bundled by `zstd-sys`); xz
//! would cost liblzma's. gzip (zlib: the one squashfs decompressor every
//! kernel config has; pure-Rust encoder) is the fallback. Output is reproducible: backhand writes sequentially (only its
//! reader is parallel), nodes come from the sorted tree walk, and the
//! superblock time is taken from the tree, never the clock.
//!
//! Data blocks are compressed ahead of backhand, on every core, and
//! optionally kept in a [`BlockStore`] between builds, keyed by the raw
//! block and the compressor: backhand then finds each block already
//! compressed (a custom `CompressionAction` that looks it up), so its
//! serial writer only lays bytes out. The bytes are those backhand's own
//! compressor gives, so the image is the same with or without them.
//!
//! Not supported by backhand's writer: extended attributes (dropped unless
//! [`SquashfsOptions::strict_xattrs`] asks for an error) and the root
//! directory's own mtime (always 0; its mode and owner are kept).

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use backhand::compression::{CompressionAction, CompressionOptions, Compressor, Zstd};
use backhand::kind::Kind;
use backhand::{BackhandError, FilesystemCompressor, FilesystemWriter, NodeHeader};
use sha2::{Digest as _, Sha256};

use crate::tree::{DeviceKind, FileData, Meta, Node, Tree};

/// Errors from writing a squashfs image.
#[derive(Debug, thiserror::Error)]
pub enum SquashfsError {
    /// backhand failed to build the image (its errors carry only a kind).
    #[error("squashfs")]
    Backhand(#[source] std::io::Error),
    /// Writing the image to the output failed.
    #[error("writing squashfs image")]
    Io(#[from] std::io::Error),
    /// The block size is not a power of two from 4 KiB to 1 MiB.
    #[error("block size {0} is not a power of two between 4 KiB and 1 MiB")]
    BadBlockSize(u32),
    /// The zstd level is outside 1..=22.
    #[error("zstd level {0} is outside 1..=22")]
    BadLevel(u32),
    /// squashfs stores `rdev` in 32 bits: 12-bit major, 20-bit minor.
    #[error("{path}: device {major}:{minor} does not fit squashfs's 32-bit device number")]
    DeviceNumber {
        /// Path of the device node in the tree.
        path: PathBuf,
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
    /// A node has extended attributes and `strict_xattrs` is set.
    #[error("{0}: has extended attributes, which the squashfs writer cannot store")]
    Xattrs(PathBuf),
    /// backhand's id table only learns ids from nodes below the root.
    #[error("root directory owner {uid}:{gid} must be 0 or also own something below the root")]
    RootOwner {
        /// Owner user id of the root directory.
        uid: u32,
        /// Owner group id of the root directory.
        gid: u32,
    },
}

impl From<BackhandError> for SquashfsError {
    fn from(e: BackhandError) -> Self {
        match e {
            // A read of a file's data (naming it) or a write of the image.
            BackhandError::StdIo(io) => SquashfsError::Io(io),
            other => SquashfsError::Backhand(other.into()),
        }
    }
}

/// Data compression for the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// zstd at the given level (1..=22; mksquashfs's default is 15).
    Zstd {
        /// zstd compression level.
        level: u32,
    },
    /// zlib at level 9, window 15 (mksquashfs's defaults).
    Gzip,
}

/// How to write the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SquashfsOptions {
    /// Data compression.
    pub compression: Compression,
    /// Data block size: a power of two, 4 KiB to 1 MiB.
    pub block_size: u32,
    /// Superblock modification time; `None` takes the root directory's.
    pub mod_time: Option<u32>,
    /// Fail on extended attributes instead of dropping them.
    pub strict_xattrs: bool,
}

impl Default for SquashfsOptions {
    fn default() -> Self {
        SquashfsOptions {
            compression: Compression::Zstd { level: 15 },
            block_size: backhand::DEFAULT_BLOCK_SIZE,
            mod_time: None,
            strict_xattrs: false,
        }
    }
}

/// Compressed data blocks kept between builds. Keys are sha256 over the
/// compressor, its level and library version, and the raw block; what
/// `get` returns is checked (decompressed and hashed) before use, so a
/// store needs no integrity of its own.
pub trait BlockStore: Sync {
    /// The stored compressed block for `key`, if any.
    fn get(&self, key: &[u8; 32]) -> Option<Vec<u8>>;
    /// Stores the compressed block for `key`.
    fn put(&self, key: &[u8; 32], compressed: &[u8]);
}

/// Blocks compressed ahead of backhand, at most this many at a time:
/// enough to keep every core busy, few enough that memory stays flat
/// whatever the size of the tree (each holds its raw and compressed bytes).
const WINDOW: usize = 64;

/// One raw block backhand will ask to compress, in the order it will.
enum Job<'a> {
    /// `len` bytes of a file from `offset` (a block, or a file's tail).
    Block {
        data: &'a FileData,
        offset: u64,
        len: usize,
    },
    /// Small files packed into one fragment block, in path order.
    Fragment(Vec<&'a FileData>),
}

impl Job<'_> {
    fn raw(&self) -> std::io::Result<Vec<u8>> {
        match self {
            Job::Block { data, offset, len } => {
                let mut buf = vec![0; *len];
                data.read_at(*offset, &mut buf)?;
                Ok(buf)
            }
            Job::Fragment(files) => {
                let mut buf = Vec::new();
                for f in files {
                    buf.extend_from_slice(&f.bytes()?);
                }
                Ok(buf)
            }
        }
    }
}

/// A job's outcome.
enum Ready {
    /// The raw block and its compressed bytes.
    Block { raw: Vec<u8>, compressed: Vec<u8> },
    /// Nothing to hand over: a block of zeros (backhand stores a hole) or
    /// a read that failed (backhand's own read reports it).
    Nothing,
}

/// What producers and backhand's compressor hook share.
struct Pipeline {
    state: Mutex<PipelineState>,
    changed: Condvar,
    jobs: usize,
    level: u32,
}

struct PipelineState {
    /// The first job backhand may still ask for.
    cursor: usize,
    /// The next job a producer takes.
    next: usize,
    ready: HashMap<usize, Ready>,
    /// Set when the write ends (also on error): producers stop.
    done: bool,
}

impl Pipeline {
    /// The compressed block for `bytes` if it is among the next jobs:
    /// jobs before it are dropped (backhand will not ask for them).
    fn take(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let mut st = lock(&self.state);
        let mut i = st.cursor;
        while i < self.jobs && i < st.cursor + WINDOW {
            while !st.ready.contains_key(&i) && !st.done {
                st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            let hit = matches!(st.ready.get(&i), Some(Ready::Block { raw, .. }) if raw == bytes);
            if hit {
                let Some(Ready::Block { compressed, .. }) = st.ready.remove(&i) else {
                    return None;
                };
                for j in st.cursor..i {
                    st.ready.remove(&j);
                }
                st.cursor = i + 1;
                self.changed.notify_all();
                return Some(compressed);
            }
            if st.done {
                return None;
            }
            i += 1;
        }
        None
    }

    /// The next job index for a producer, once the window has room.
    fn next_job(&self) -> Option<usize> {
        let mut st = lock(&self.state);
        loop {
            if st.done || st.next >= self.jobs {
                return None;
            }
            if st.next < st.cursor + WINDOW {
                st.next += 1;
                return Some(st.next - 1);
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn put(&self, i: usize, r: Ready) {
        let mut st = lock(&self.state);
        if i >= st.cursor {
            st.ready.insert(i, r);
        }
        self.changed.notify_all();
    }

    fn finish(&self) {
        lock(&self.state).done = true;
        self.changed.notify_all();
    }
}

/// The pipeline of the write in progress (one at a time, see [`WRITING`]).
static CURRENT: Mutex<Option<Arc<Pipeline>>> = Mutex::new(None);
/// Serialises writes: backhand's compressor hook is a `'static` with no
/// way to tell writes apart.
static WRITING: Mutex<()> = Mutex::new(());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// backhand's compressor, answering data blocks from [`CURRENT`].
struct Precompressed;
static PRECOMPRESSED: Precompressed = Precompressed;

impl CompressionAction for Precompressed {
    type Error = BackhandError;
    type Compressor = Compressor;
    type FilesystemCompressor = FilesystemCompressor;
    type SuperBlock = backhand::SuperBlock;

    fn decompress(
        &self,
        bytes: &[u8],
        out: &mut Vec<u8>,
        compressor: Compressor,
    ) -> Result<(), BackhandError> {
        backhand::compression::DefaultCompressor.decompress(bytes, out, compressor)
    }

    fn compress(
        &self,
        bytes: &[u8],
        fc: FilesystemCompressor,
        block_size: u32,
    ) -> Result<Vec<u8>, BackhandError> {
        let pipeline = lock(&CURRENT).clone();
        if let Some(c) = pipeline.and_then(|p| p.take(bytes)) {
            return Ok(c);
        }
        #[cfg(test)]
        if bytes.len() > METADATA_BLOCK {
            DATA_MISSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        backhand::compression::DefaultCompressor.compress(bytes, fc, block_size)
    }

    fn compression_options(
        &self,
        superblock: &mut backhand::SuperBlock,
        kind: &Kind,
        fs_compressor: FilesystemCompressor,
    ) -> Result<Option<Vec<u8>>, BackhandError> {
        backhand::compression::DefaultCompressor.compression_options(
            superblock,
            kind,
            fs_compressor,
        )
    }
}

/// Data blocks that were not compressed ahead (metadata blocks, at most
/// 8 KiB, never are).
#[cfg(test)]
static DATA_MISSES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
#[cfg(test)]
const METADATA_BLOCK: usize = 8192;

/// The store key of a raw block: compressor, level, library version, data.
fn store_key(level: u32, bytes: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"kiln squashfs block v1 zstd ");
    h.update(zstd_version().to_le_bytes());
    h.update(level.to_le_bytes());
    h.update(bytes);
    h.finalize().into()
}

/// The zstd library version: another may compress differently, so its
/// blocks are not reused.
fn zstd_version() -> u32 {
    zstd::zstd_safe::version_number()
}

/// The blocks backhand will ask to compress, in order: every block of a
/// file of at least one block (the tail too; all-zero blocks become holes
/// and are skipped when read), and fragment blocks of smaller files packed
/// in path order (the tree walk's), a block closed when the next file does
/// not fit. A block guessed wrong is only never asked for.
fn jobs<'a>(walk: &[(PathBuf, &'a Node)], block_size: u32) -> Vec<Job<'a>> {
    let bs = u64::from(block_size);
    let mut jobs = Vec::new();
    let mut fragment: Vec<&FileData> = Vec::new();
    let mut fragment_len = 0;
    for (_, node) in walk {
        let Node::File { data, .. } = node else {
            continue;
        };
        let len = data.len();
        if len >= bs {
            let mut offset = 0;
            while offset < len {
                // At most one block: fits in usize.
                #[allow(clippy::cast_possible_truncation)]
                let n = (len - offset).min(bs) as usize;
                jobs.push(Job::Block {
                    data,
                    offset,
                    len: n,
                });
                offset += bs;
            }
        } else if len > 0 {
            if fragment_len + len > bs {
                jobs.push(Job::Fragment(std::mem::take(&mut fragment)));
                fragment_len = 0;
            }
            fragment.push(data);
            fragment_len += len;
        }
    }
    if !fragment.is_empty() {
        jobs.push(Job::Fragment(fragment));
    }
    jobs
}

/// Compresses jobs as the window allows (or takes them from `store`),
/// the way backhand would.
fn produce(
    pipeline: &Pipeline,
    jobs: &[Job<'_>],
    fc: FilesystemCompressor,
    block_size: u32,
    store: Option<&dyn BlockStore>,
    progress: &(dyn Fn(u64) + Sync),
) {
    let bs = block_size as usize;
    while let Some(i) = pipeline.next_job() {
        let job = &jobs[i];
        let raw = job.raw();
        if let Ok(r) = &raw {
            progress(r.len() as u64);
        }
        let ready = match raw {
            Ok(raw) if matches!(job, Job::Block { .. }) && raw.iter().all(|b| *b == 0) => {
                Ready::Nothing
            }
            Ok(raw) => {
                let key = store_key(pipeline.level, &raw);
                let stored = store
                    .and_then(|st| st.get(&key))
                    .filter(|c| verifies(c, &raw, bs));
                let compressed = stored.or_else(|| {
                    let c = backhand::compression::DefaultCompressor
                        .compress(&raw, fc, block_size)
                        .ok()?;
                    if let Some(st) = store {
                        st.put(&key, &c);
                    }
                    Some(c)
                });
                match compressed {
                    Some(compressed) => Ready::Block { raw, compressed },
                    None => Ready::Nothing,
                }
            }
            Err(_) => Ready::Nothing,
        };
        pipeline.put(i, ready);
    }
}

/// Whether `compressed` (from a store) is `raw` compressed with zstd.
fn verifies(compressed: &[u8], raw: &[u8], block_size: usize) -> bool {
    zstd::bulk::decompress(compressed, block_size).is_ok_and(|d| d == raw)
}

/// squashfs times are 32-bit: later times are clamped to the maximum.
fn time32(t: u64) -> u32 {
    u32::try_from(t).unwrap_or(u32::MAX)
}

fn header(meta: &Meta) -> NodeHeader {
    // Permission bits only: backhand adds the file type from the node kind.
    NodeHeader::new(
        (meta.mode & 0o7777) as u16,
        meta.uid,
        meta.gid,
        time32(meta.mtime),
    )
}

/// Linux's `new_encode_dev`, which the kernel's squashfs decodes.
fn encode_dev(major: u32, minor: u32) -> Option<u32> {
    if major > 0xfff || minor > 0xf_ffff {
        return None;
    }
    Some((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

/// Writes `tree` as a squashfs image to `out` and returns the number of
/// bytes written (the image is padded to 4 KiB, as mksquashfs does).
pub fn write_squashfs<W: Write + Seek>(
    tree: &Tree,
    out: W,
    opts: &SquashfsOptions,
) -> Result<u64, SquashfsError> {
    write_squashfs_with(tree, out, opts, None, &|_| {})
}

/// [`write_squashfs`], reusing and keeping compressed blocks in `store`,
/// and telling `progress` the raw bytes of each block compressed.
pub fn write_squashfs_with<W: Write + Seek>(
    tree: &Tree,
    mut out: W,
    opts: &SquashfsOptions,
    store: Option<&dyn BlockStore>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64, SquashfsError> {
    let bs = opts.block_size;
    if !bs.is_power_of_two() || !(backhand::MIN_BLOCK_SIZE..=backhand::MAX_BLOCK_SIZE).contains(&bs)
    {
        return Err(SquashfsError::BadBlockSize(bs));
    }
    let compressor = match opts.compression {
        Compression::Zstd { level } => {
            if !(1..=22).contains(&level) {
                return Err(SquashfsError::BadLevel(level));
            }
            FilesystemCompressor::new(
                Compressor::Zstd,
                Some(CompressionOptions::Zstd(Zstd {
                    compression_level: level,
                })),
            )?
        }
        Compression::Gzip => FilesystemCompressor::new(Compressor::Gzip, None)?,
    };

    let _writing = lock(&WRITING);
    let Compression::Zstd { level } = opts.compression else {
        return write_inner(tree, &mut out, opts, compressor, false);
    };
    let walk = tree.walk();
    let jobs = jobs(&walk, bs);
    let pipeline = Arc::new(Pipeline {
        state: Mutex::new(PipelineState {
            cursor: 0,
            next: 0,
            ready: HashMap::new(),
            done: false,
        }),
        changed: Condvar::new(),
        jobs: jobs.len(),
        level,
    });
    *lock(&CURRENT) = Some(Arc::clone(&pipeline));
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let result = std::thread::scope(|s| {
        for _ in 0..workers.min(jobs.len()) {
            s.spawn(|| produce(&pipeline, &jobs, compressor, bs, store, progress));
        }
        let result = write_inner(tree, &mut out, opts, compressor, true);
        pipeline.finish();
        result
    });
    *lock(&CURRENT) = None;
    result
}

fn write_inner<W: Write + Seek>(
    tree: &Tree,
    mut out: W,
    opts: &SquashfsOptions,
    compressor: FilesystemCompressor,
    precompressed: bool,
) -> Result<u64, SquashfsError> {
    let bs = opts.block_size;
    let mut fs = FilesystemWriter::default();
    if precompressed {
        fs.set_kind(Kind::new_v4(&PRECOMPRESSED));
    }
    fs.set_block_size(bs);
    fs.set_compressor(compressor);
    let root = &tree.root.meta;
    fs.set_time(opts.mod_time.unwrap_or_else(|| time32(root.mtime)));
    fs.set_root_mode((root.mode & 0o7777) as u16);
    fs.set_root_uid(root.uid);
    fs.set_root_gid(root.gid);
    let walk = tree.walk();
    let id_known = |id: u32| {
        id == 0
            || walk
                .iter()
                .any(|(_, n)| n.meta().uid == id || n.meta().gid == id)
    };
    if !id_known(root.uid) || !id_known(root.gid) {
        return Err(SquashfsError::RootOwner {
            uid: root.uid,
            gid: root.gid,
        });
    }
    if opts.strict_xattrs && !root.xattrs.is_empty() {
        return Err(SquashfsError::Xattrs(PathBuf::from("/")));
    }

    for (path, node) in walk {
        let meta = node.meta();
        if opts.strict_xattrs && !meta.xattrs.is_empty() {
            return Err(SquashfsError::Xattrs(path));
        }
        let h = header(meta);
        match node {
            Node::Dir(_) => fs.push_dir(&path, h)?,
            // Read as backhand writes it, a block at a time.
            Node::File { data, .. } => {
                let reader = Named {
                    path: path.clone(),
                    inner: data.reader(),
                };
                fs.push_file(reader, &path, h)?
            }
            Node::Symlink { target, .. } => fs.push_symlink(target.clone(), &path, h)?,
            Node::Device {
                kind, major, minor, ..
            } => {
                let dev =
                    encode_dev(*major, *minor).ok_or_else(|| SquashfsError::DeviceNumber {
                        path: path.clone(),
                        major: *major,
                        minor: *minor,
                    })?;
                match kind {
                    DeviceKind::Char => fs.push_char_device(dev, &path, h)?,
                    DeviceKind::Block => fs.push_block_device(dev, &path, h)?,
                }
            }
            Node::Fifo { .. } => fs.push_fifo(&path, h)?,
            Node::Socket { .. } => fs.push_socket(&path, h)?,
        }
    }
    let (_, len) = fs.write(&mut out)?;
    out.flush()?;
    Ok(len)
}

/// A file's reader whose errors name the file.
struct Named<R> {
    path: PathBuf,
    inner: R,
}

/// A failed read of a file's data, naming it in the image.
#[derive(Debug, thiserror::Error)]
#[error("{path}")]
struct ReadError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl<R: Read> Read for Named<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).map_err(|source| {
            std::io::Error::new(
                source.kind(),
                ReadError {
                    path: self.path.clone(),
                    source,
                },
            )
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)]
    use super::*;
    use std::io::Cursor;
    use std::path::Path;
    use std::process::Command;

    fn meta(mode: u32, uid: u32, gid: u32, mtime: u64) -> Meta {
        Meta {
            mode,
            uid,
            gid,
            mtime,
            xattrs: Default::default(),
        }
    }

    /// A store in memory that counts what it serves.
    #[derive(Default)]
    struct MemStore {
        blocks: Mutex<HashMap<[u8; 32], Vec<u8>>>,
        hits: std::sync::atomic::AtomicUsize,
    }

    impl BlockStore for MemStore {
        fn get(&self, key: &[u8; 32]) -> Option<Vec<u8>> {
            let b = lock(&self.blocks).get(key).cloned();
            if b.is_some() {
                self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            b
        }
        fn put(&self, key: &[u8; 32], compressed: &[u8]) {
            lock(&self.blocks).insert(*key, compressed.to_vec());
        }
    }

    /// Many more blocks than the window, from files on disk: all are
    /// compressed ahead (memory stays at the window), the image is the one
    /// backhand alone writes, and a file that cannot be read is an error
    /// naming it.
    #[test]
    fn window_slides_over_extents() {
        let dir = tempdir("extents");
        let path = dir.join("layer");
        let raw: Vec<u8> = (0..(WINDOW as u32 * 3 * 4096 + 1234))
            .map(|i| (i / 7 % 13) as u8 ^ (i >> 12) as u8)
            .collect();
        std::fs::write(&path, &raw).unwrap();
        let backing = crate::tree::Backing::new(std::fs::File::open(&path).unwrap(), "layer");
        let mut tree = sample();
        let half = raw.len() as u64 / 2;
        tree.insert(
            Path::new("/data/a"),
            Node::File {
                meta: meta(0o644, 0, 0, 0),
                data: FileData::extent(&backing, 0, half),
            },
        )
        .unwrap();
        tree.insert(
            Path::new("/data/b"),
            Node::File {
                meta: meta(0o644, 0, 0, 0),
                data: FileData::extent(&backing, half, raw.len() as u64 - half),
            },
        )
        .unwrap();
        let opts = SquashfsOptions {
            block_size: 4096,
            ..Default::default()
        };
        let fc = FilesystemCompressor::new(
            Compressor::Zstd,
            Some(CompressionOptions::Zstd(Zstd {
                compression_level: 15,
            })),
        )
        .unwrap();
        let mut plain = Cursor::new(Vec::new());
        write_inner(&tree, &mut plain, &opts, fc, false).unwrap();
        let misses = || DATA_MISSES.load(std::sync::atomic::Ordering::Relaxed);
        let before = misses();
        let counted = std::sync::atomic::AtomicU64::new(0);
        let mut out = Cursor::new(Vec::new());
        let count = |n| {
            counted.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        };
        write_squashfs_with(&tree, &mut out, &opts, None, &count).unwrap();
        assert_eq!(out.into_inner(), plain.into_inner());
        assert_eq!(misses(), before, "a block was compressed late");
        // Every byte of file data was counted once as it was compressed.
        assert_eq!(counted.into_inner(), tree.data_size());

        tree.insert(
            Path::new("/data/c"),
            Node::File {
                meta: meta(0o644, 0, 0, 0),
                data: FileData::extent(&backing, raw.len() as u64 - 10, 20),
            },
        )
        .unwrap();
        let e = write_squashfs(&tree, Cursor::new(Vec::new()), &opts).unwrap_err();
        let mut chain = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            chain = format!("{chain}: {c}");
            cause = c.source();
        }
        assert!(
            chain.contains("/data/c") && chain.contains("layer at offset"),
            "{chain}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Blocks compressed ahead, kept in a store and reused, give exactly
    /// the image backhand's own compressor gives; a damaged stored block
    /// is not used.
    #[test]
    fn stored_blocks_change_nothing() {
        let mut tree = sample();
        // One file at two paths (backhand asks for its blocks twice), and
        // a copy of it in its own buffer (the same blocks again).
        let big = tree.get(Path::new("/usr/big.bin")).unwrap().clone();
        let Node::File { data, .. } = &big else {
            panic!("not a file")
        };
        let copy = Node::file(0o644, data.bytes().unwrap().to_vec());
        tree.insert(Path::new("/usr/big-link.bin"), big).unwrap();
        tree.insert(Path::new("/usr/big-copy.bin"), copy).unwrap();
        // Enough small files for two fragment blocks.
        for i in 0..60u32 {
            let data: Vec<u8> = (0..3000u32).map(|j| (j * 7 + i * 13) as u8).collect();
            tree.insert(
                Path::new(&format!("/small/{i:03}")),
                Node::file(0o644, data),
            )
            .unwrap();
        }
        let opts = SquashfsOptions::default();
        let mut plain = Cursor::new(Vec::new());
        write_inner(
            &tree,
            &mut plain,
            &opts,
            FilesystemCompressor::new(
                Compressor::Zstd,
                Some(CompressionOptions::Zstd(Zstd {
                    compression_level: 15,
                })),
            )
            .unwrap(),
            false,
        )
        .unwrap();
        let store = MemStore::default();
        let misses = || DATA_MISSES.load(std::sync::atomic::Ordering::Relaxed);
        let before = misses();
        let write = |store: &MemStore| {
            let mut out = Cursor::new(Vec::new());
            write_squashfs_with(&tree, &mut out, &opts, Some(store), &|_| {}).unwrap();
            out.into_inner()
        };
        assert_eq!(write(&store), plain.get_ref()[..], "first write");
        // Every data block and fragment block was ready (the counter is
        // shared with tests running alongside, whose writes should find
        // theirs ready too).
        assert_eq!(misses(), before, "a block was compressed late");
        let n = lock(&store.blocks).len();
        assert!(n >= 3, "big.bin's blocks were not stored: {n}");
        let hits = || store.hits.load(std::sync::atomic::Ordering::Relaxed);
        // The copy's blocks may already come from the store.
        let first = hits();
        assert_eq!(write(&store), plain.get_ref()[..], "from the store");
        assert!(hits() - first >= n, "not every stored block was used");
        assert_eq!(misses(), before, "a block was compressed late");
        for v in lock(&store.blocks).values_mut() {
            v[0] ^= 0xff;
        }
        assert_eq!(write(&store), plain.get_ref()[..], "damaged store");
    }

    fn sample() -> Tree {
        let mut t = Tree::new();
        t.root.meta = meta(0o751, 0, 0, 1_700_000_000);
        t.insert(
            Path::new("/usr"),
            Node::Dir(crate::tree::Dir::new(meta(0o755, 0, 0, 1_600_000_000))),
        )
        .unwrap();
        let big: Vec<u8> = (0..400_000u32)
            .map(|i| (i % 251) as u8 ^ (i >> 9) as u8)
            .collect();
        t.insert(
            Path::new("/usr/big.bin"),
            Node::File {
                meta: meta(0o644, 0, 0, 1_600_000_001),
                data: big.into(),
            },
        )
        .unwrap();
        t.insert(
            Path::new("/home/app/secret"),
            Node::File {
                meta: meta(0o4750, 1000, 1001, 1_600_000_002),
                data: b"top secret\n".to_vec().into(),
            },
        )
        .unwrap();
        t.insert(Path::new("/etc/empty"), Node::file(0o600, ""))
            .unwrap();
        t.insert(Path::new("/bin/sh"), Node::symlink("busybox"))
            .unwrap();
        t.insert(
            Path::new("/dev/console"),
            Node::Device {
                meta: meta(0o600, 0, 5, 0),
                kind: DeviceKind::Char,
                major: 5,
                minor: 1,
            },
        )
        .unwrap();
        t.insert(
            Path::new("/dev/nvme"),
            Node::Device {
                meta: meta(0o660, 0, 6, 0),
                kind: DeviceKind::Block,
                major: 259,
                minor: 70_000,
            },
        )
        .unwrap();
        t.insert(
            Path::new("/run/fifo"),
            Node::Fifo {
                meta: meta(0o620, 0, 0, 0),
            },
        )
        .unwrap();
        t.insert(
            Path::new("/run/sock"),
            Node::Socket {
                meta: meta(0o777, 0, 0, 0),
            },
        )
        .unwrap();
        t
    }

    fn image(t: &Tree, opts: &SquashfsOptions) -> Vec<u8> {
        let mut c = Cursor::new(Vec::new());
        let n = write_squashfs(t, &mut c, opts).unwrap();
        let v = c.into_inner();
        assert_eq!(n, v.len() as u64);
        v
    }

    fn unsquashfs() -> bool {
        let ok = Command::new("unsquashfs").arg("-help").output().is_ok();
        if !ok {
            eprintln!("note: unsquashfs not installed, skipping the external check");
        }
        ok
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-sqfs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn same_tree_same_bytes() {
        let t = sample();
        for opts in [
            SquashfsOptions::default(),
            SquashfsOptions {
                compression: Compression::Gzip,
                ..Default::default()
            },
        ] {
            let a = image(&t, &opts);
            assert_eq!(a, image(&t, &opts));
            assert_eq!(&a[..4], b"hsqs");
            // Superblock mkfs_time (offset 8) comes from the root's mtime.
            assert_eq!(&a[8..12], &1_700_000_000u32.to_le_bytes());
        }
    }

    #[test]
    fn bad_options_are_errors() {
        let t = sample();
        let bad_bs = SquashfsOptions {
            block_size: 3000,
            ..Default::default()
        };
        assert!(matches!(
            write_squashfs(&t, Cursor::new(Vec::new()), &bad_bs),
            Err(SquashfsError::BadBlockSize(3000))
        ));
        let bad_level = SquashfsOptions {
            compression: Compression::Zstd { level: 0 },
            ..Default::default()
        };
        assert!(matches!(
            write_squashfs(&t, Cursor::new(Vec::new()), &bad_level),
            Err(SquashfsError::BadLevel(0))
        ));
        let mut dev = Tree::new();
        dev.insert(
            Path::new("/d"),
            Node::device(DeviceKind::Char, 0o600, 5000, 0),
        )
        .unwrap();
        assert!(matches!(
            write_squashfs(&dev, Cursor::new(Vec::new()), &SquashfsOptions::default()),
            Err(SquashfsError::DeviceNumber { .. })
        ));
        let mut x = Tree::new();
        let mut f = Node::file(0o755, "x");
        f.meta_mut()
            .xattrs
            .insert("security.capability".into(), vec![1]);
        x.insert(Path::new("/f"), f).unwrap();
        let strict = SquashfsOptions {
            strict_xattrs: true,
            ..Default::default()
        };
        assert!(matches!(
            write_squashfs(&x, Cursor::new(Vec::new()), &strict),
            Err(SquashfsError::Xattrs(_))
        ));
        assert!(write_squashfs(&x, Cursor::new(Vec::new()), &SquashfsOptions::default()).is_ok());
        let mut owned = Tree::new();
        owned.root.meta.uid = 1000;
        assert!(matches!(
            write_squashfs(&owned, Cursor::new(Vec::new()), &SquashfsOptions::default()),
            Err(SquashfsError::RootOwner { uid: 1000, gid: 0 })
        ));
        // Once a node below carries the id, it is in the table.
        owned
            .insert(
                Path::new("/f"),
                Node::File {
                    meta: meta(0o644, 1000, 0, 0),
                    data: Vec::new().into(),
                },
            )
            .unwrap();
        assert!(
            write_squashfs(&owned, Cursor::new(Vec::new()), &SquashfsOptions::default()).is_ok()
        );
    }

    #[test]
    fn encode_dev_matches_linux() {
        assert_eq!(encode_dev(8, 1), Some(0x801));
        // minor's high bits go above the major.
        assert_eq!(
            encode_dev(259, 0x12345),
            Some(0x45 | (259 << 8) | (0x123 << 20))
        );
        assert_eq!(encode_dev(4096, 0), None);
    }

    #[test]
    fn unsquashfs_lists_entries() {
        if !unsquashfs() {
            return;
        }
        let dir = tempdir("list");
        let img = dir.join("a.sqfs");
        std::fs::write(&img, image(&sample(), &SquashfsOptions::default())).unwrap();
        let o = Command::new("unsquashfs")
            .args(["-lln", "-UTC"])
            .arg(&img)
            .output()
            .or_else(|_| Command::new("unsquashfs").arg("-lln").arg(&img).output())
            .unwrap();
        let o = if o.status.success() {
            o
        } else {
            // Older unsquashfs has no -UTC.
            Command::new("unsquashfs")
                .arg("-lln")
                .arg(&img)
                .output()
                .unwrap()
        };
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8(o.stdout).unwrap();
        let row = |name: &str| -> Vec<String> {
            let full = format!("squashfs-root{name}");
            text.lines()
                .find(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.contains(&full.as_str())
                })
                .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        };
        let root = row("");
        assert_eq!(root[0], "drwxr-x--x");
        assert_eq!(root[1], "0/0");
        let s = row("/home/app/secret");
        assert_eq!(s[0], "-rwsr-x---");
        assert_eq!(s[1], "1000/1001");
        assert_eq!(s[2], "11");
        assert_eq!(row("/usr/big.bin")[2], "400000");
        let l = row("/bin/sh");
        assert_eq!(l[0], "lrwxrwxrwx");
        assert_eq!(l.last().unwrap(), "busybox");
        let c = row("/dev/console");
        assert_eq!(c[0], "crw-------");
        assert_eq!(c[1], "0/5");
        // uid/gid "0/5" then "5,1": joined, as column padding may vary.
        assert!(c.concat().contains("0/55,1"));
        let b = row("/dev/nvme");
        assert_eq!(b[0], "brw-rw----");
        // `unsquashfs -ll` prints rdev as `rdev >> 8, rdev & 0xff`, which
        // is only the real major:minor for minors below 256; extraction and
        // the kernel decode the full `new_encode_dev` value.
        let rdev = encode_dev(259, 70_000).unwrap();
        // Column padding may leave no space after the comma.
        assert!(b
            .concat()
            .contains(&format!("{},{}", rdev >> 8, rdev & 0xff)));
        assert_eq!(row("/run/fifo")[0], "prw--w----");
        assert_eq!(row("/run/sock")[0], "srwxrwxrwx");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unsquashfs_extracts_identical_contents() {
        if !unsquashfs() {
            return;
        }
        let t = sample();
        for (tag, opts) in [
            ("zstd", SquashfsOptions::default()),
            (
                "gzip",
                SquashfsOptions {
                    compression: Compression::Gzip,
                    block_size: 4096,
                    ..Default::default()
                },
            ),
        ] {
            let dir = tempdir(tag);
            let img = dir.join("a.sqfs");
            std::fs::write(&img, image(&t, &opts)).unwrap();
            let out = dir.join("x");
            // Only regular files, dirs and links: devices need privileges.
            let o = Command::new("unsquashfs")
                .arg("-d")
                .arg(&out)
                .arg(&img)
                .args(["usr", "home", "etc", "bin"])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            for (path, node) in t.walk() {
                let on_disk = out.join(path.strip_prefix("/").unwrap());
                match node {
                    Node::File { data, meta } => {
                        assert_eq!(
                            &std::fs::read(&on_disk).unwrap(),
                            &data.bytes().unwrap()[..],
                            "{path:?}"
                        );
                        use std::os::unix::fs::MetadataExt;
                        let m = std::fs::metadata(&on_disk).unwrap();
                        assert_eq!(m.mtime() as u64, meta.mtime, "{path:?}");
                    }
                    Node::Symlink { target, .. } => {
                        assert_eq!(std::fs::read_link(&on_disk).unwrap().as_os_str(), target);
                    }
                    _ => {}
                }
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    /// The Debian kernel itself mounts our zstd and gzip images: a direct
    /// QEMU boot (TCG) of an initramfs (our cpio writer) holding busybox,
    /// the loop and squashfs modules and both images; the init compares a
    /// file against its copy and prints modes and owners. Needs the Debian
    /// archive (apt-get download) unless KILN_TEST_KERNEL_ROOT is set.
    #[test]
    #[ignore = "downloads a Debian kernel and boots QEMU (~15 s)"]
    fn debian_kernel_mounts_images() {
        use crate::uki::testkit::{debian_kernel, module};
        use std::time::Duration;

        if !Path::new("/bin/busybox").exists() {
            eprintln!("note: /bin/busybox missing, skipping");
            return;
        }
        let dir = tempdir("boot");
        let kernel = debian_kernel(&dir).unwrap();
        let t = sample();
        let big = match t.get(Path::new("/usr/big.bin")) {
            Some(Node::File { data, .. }) => data.clone(),
            _ => unreachable!(),
        };
        let zstd = image(&t, &SquashfsOptions::default());
        let gzip = image(
            &t,
            &SquashfsOptions {
                compression: Compression::Gzip,
                ..Default::default()
            },
        );
        let mut ir = Tree::new();
        let add = |ir: &mut Tree, p: &str, mode: u32, data: Vec<u8>| {
            ir.insert(Path::new(p), Node::file(mode, data)).unwrap();
        };
        add(
            &mut ir,
            "/bin/busybox",
            0o755,
            std::fs::read("/bin/busybox").unwrap(),
        );
        add(
            &mut ir,
            "/loop.ko",
            0o644,
            module(&kernel, "drivers/block/loop.ko").unwrap(),
        );
        add(
            &mut ir,
            "/squashfs.ko",
            0o644,
            module(&kernel, "fs/squashfs/squashfs.ko").unwrap(),
        );
        add(&mut ir, "/z.sqfs", 0o644, zstd);
        add(&mut ir, "/g.sqfs", 0o644, gzip);
        add(&mut ir, "/big.bin", 0o644, big.bytes().unwrap().to_vec());
        ir.insert(
            Path::new("/dev/console"),
            Node::device(DeviceKind::Char, 0o600, 5, 1),
        )
        .unwrap();
        let init = r#"#!/bin/busybox sh
b=/bin/busybox
$b mount -t devtmpfs dev /dev
$b insmod /loop.ko
$b insmod /squashfs.ko
for i in z g; do
  $b mkdir -p /mnt/$i
  $b mount -t squashfs -o ro,loop /$i.sqfs /mnt/$i && $b echo "MOUNTED $i"
  $b cmp /big.bin /mnt/$i/usr/big.bin && $b echo "SAME $i"
  $b echo "CAT $i $($b cat /mnt/$i/home/app/secret)"
  $b echo "LINK $i $($b readlink /mnt/$i/bin/sh)"
  for f in / /home/app/secret /dev/console /dev/nvme /run/fifo /run/sock; do
    $b echo "STAT $i $($b stat -c '%A %u:%g %t:%T %Y' /mnt/$i$f) $f"
  done
done
$b echo KILN-SQFS-DONE
$b poweroff -f
"#;
        add(&mut ir, "/init", 0o755, init.as_bytes().to_vec());
        let mut cpio = Vec::new();
        crate::cpio::write_newc(&ir, &mut cpio).unwrap();
        let initrd = dir.join("initrd.cpio");
        std::fs::write(&initrd, &cpio).unwrap();

        let (text, _) = crate::uki::testkit::console_until(
            Command::new("qemu-system-x86_64")
                .args(["-accel", "tcg", "-m", "512", "-nographic", "-no-reboot"])
                .arg("-kernel")
                .arg(kernel.join("vmlinuz"))
                .arg("-initrd")
                .arg(&initrd)
                .args(["-append", "console=ttyS0 panic=-1 quiet"]),
            "KILN-SQFS-DONE",
            Duration::from_secs(120),
        );
        assert!(text.contains("KILN-SQFS-DONE"), "no end marker:\n{text}");
        for i in ["z", "g"] {
            for want in [
                format!("MOUNTED {i}"),
                format!("SAME {i}"),
                format!("CAT {i} top secret"),
                format!("LINK {i} busybox"),
                // Root mtime: backhand has no setter, so it is 0.
                format!("STAT {i} drwxr-x--x 0:0 0:0 0 /\n"),
                format!("STAT {i} -rwsr-x--- 1000:1001 0:0 1600000002 /home/app/secret"),
                format!("STAT {i} crw------- 0:5 5:1 0 /dev/console"),
                // stat prints major:minor in hex: 259 = 0x103, 70000 = 0x11170.
                format!("STAT {i} brw-rw---- 0:6 103:11170 0 /dev/nvme"),
                format!("STAT {i} prw--w---- 0:0 0:0 0 /run/fifo"),
                format!("STAT {i} srwxrwxrwx 0:0 0:0 0 /run/sock"),
            ] {
                assert!(text.contains(&want), "missing {want:?} in:\n{text}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
