//! A FAT32 writer for EFI System Partitions.
//!
//! The image is planned up front as a list of byte segments (boot sectors,
//! the two FATs, directory clusters, file data shared with the [`Tree`]),
//! with zeros in between, so it can be streamed without materialising
//! hundreds of MiB. Clusters are allocated sequentially in sorted
//! depth-first order, so every file and directory is contiguous and the
//! output depends only on the tree, the size, the volume id and the label.
//!
//! Names that are not already upper-case 8.3 get VFAT long-name entries;
//! their short aliases are generated deterministically (`BASIS~N.EXT`).

use std::borrow::Borrow;
use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::tree::{Dir, FileData, Node, Tree};

const SECTOR: u64 = 512;
const RESERVED_SECTORS: u32 = 32;
const NUM_FATS: u32 = 2;
const ROOT_CLUSTER: u32 = 2;
const FSINFO_SECTOR: usize = 1;
const BACKUP_BOOT_SECTOR: usize = 6;
/// FAT32 needs at least this many clusters (Microsoft's FAT spec); a small
/// margin keeps us clear of readers that disagree by one.
const MIN_CLUSTERS: u64 = 65525 + 16;
/// Highest cluster count FAT32 allows (entries up to 0x0FFFFFF6).
const MAX_CLUSTERS: u64 = 0x0FFF_FFF4;
const END_OF_CHAIN: u32 = 0x0FFF_FFFF;
const DIR_ENTRY: usize = 32;
const MAX_DIR_ENTRIES: usize = 65536;
const ATTR_DIR: u8 = 0x10;
const ATTR_ARCHIVE: u8 = 0x20;
const ATTR_VOLUME: u8 = 0x08;
const ATTR_LFN: u8 = 0x0F;

/// Errors from building a FAT image. Paths are tree-absolute.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FatError {
    /// A tree node other than a directory or regular file (symlink, device, ...).
    #[error("{0}: only directories and regular files can go on a FAT filesystem")]
    UnsupportedNode(PathBuf),
    /// A name FAT cannot store.
    #[error("{0}: name is not valid on FAT (empty, reserved character, trailing dot/space, non-UTF-8 or over 255 characters)")]
    InvalidName(PathBuf),
    /// Two entries in one directory differ only by case.
    #[error("{0}: another entry has the same name ignoring case")]
    DuplicateName(PathBuf),
    /// A directory needs more than 65536 entries (long-name slots included).
    #[error("{0}: directory has more than 65536 FAT entries")]
    TooManyEntries(PathBuf),
    /// A file is 4 GiB or larger.
    #[error("{0}: FAT files are at most 4 GiB - 1")]
    FileTooLarge(PathBuf),
    /// The volume label is not a valid short name of at most 11 ASCII characters.
    #[error("volume label `{0}` is invalid (at most 11 ASCII characters allowed in short names)")]
    InvalidLabel(String),
    /// The image size in bytes is not a multiple of 512.
    #[error("size {0} is not a multiple of 512 bytes")]
    UnalignedSize(u64),
    /// The image size in bytes is below FAT32's minimum cluster count.
    #[error("size {0} is too small for FAT32 (about 33 MiB at least)")]
    TooSmall(u64),
    /// The image size in bytes needs more sectors or clusters than FAT32 allows.
    #[error("size {0} is too large for this FAT32 writer")]
    TooLarge(u64),
    /// The contents need more clusters than the image has.
    #[error("contents need {need} clusters of {cluster_size} bytes but only {have} exist")]
    NoSpace {
        /// Clusters the contents need.
        need: u64,
        /// Data clusters the image has.
        have: u64,
        /// Cluster size in bytes.
        cluster_size: u64,
    },
}

/// Cluster geometry of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Total size in 512-byte sectors.
    pub total_sectors: u32,
    /// Sectors per cluster (1 to 64).
    pub sectors_per_cluster: u32,
    /// Size of one FAT copy in sectors.
    pub fat_sectors: u32,
    /// Number of data clusters (numbered from 2).
    pub clusters: u32,
}

impl Geometry {
    /// Picks the cluster size for `size` bytes: 4 KiB when that still gives
    /// FAT32's minimum cluster count, smaller for small volumes, larger
    /// only for volumes too big for 4 KiB clusters.
    // total <= u32::MAX is checked first; spc <= 64, fat_sectors < total and
    // clusters <= MAX_CLUSTERS, so every narrowing below is lossless.
    #[allow(clippy::cast_possible_truncation)]
    pub fn for_size(size: u64) -> Result<Geometry, FatError> {
        if !size.is_multiple_of(SECTOR) {
            return Err(FatError::UnalignedSize(size));
        }
        let total = size / SECTOR;
        if total > u32::MAX as u64 {
            return Err(FatError::TooLarge(size));
        }
        let mut too_large = false;
        for spc in [8u64, 4, 2, 1, 16, 32, 64] {
            let Some(data) = total.checked_sub(RESERVED_SECTORS as u64) else {
                break;
            };
            // Size the FAT as if it had no cost: slightly generous, never short.
            let fat_sectors = ((data / spc + 2) * 4).div_ceil(SECTOR);
            // Whole clusters per FAT keep the data area cluster-aligned
            // (the reserved area is 32 sectors, a multiple of any spc <= 32).
            let fat_sectors = fat_sectors.next_multiple_of(spc);
            let Some(data) = data.checked_sub(NUM_FATS as u64 * fat_sectors) else {
                continue;
            };
            let clusters = data / spc;
            if clusters > MAX_CLUSTERS {
                too_large = true;
                continue;
            }
            if clusters >= MIN_CLUSTERS {
                return Ok(Geometry {
                    total_sectors: total as u32,
                    sectors_per_cluster: spc as u32,
                    fat_sectors: fat_sectors as u32,
                    clusters: clusters as u32,
                });
            }
        }
        if too_large {
            Err(FatError::TooLarge(size))
        } else {
            Err(FatError::TooSmall(size))
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.sectors_per_cluster as u64 * SECTOR
    }

    fn data_start(&self) -> u64 {
        (RESERVED_SECTORS as u64 + NUM_FATS as u64 * self.fat_sectors as u64) * SECTOR
    }

    /// Byte offset of cluster `c` (>= 2) in the image.
    pub fn cluster_offset(&self, c: u32) -> u64 {
        self.data_start() + (c as u64 - 2) * self.cluster_size()
    }
}

/// A planned FAT32 image: non-overlapping data segments in offset order,
/// zeros elsewhere. Cheap to hold: file data is shared with the tree.
#[derive(Debug, Clone)]
pub struct FatImage {
    size: u64,
    geometry: Geometry,
    segments: Vec<(u64, FileData)>,
}

impl FatImage {
    /// Total image size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The geometry the image was built with.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// A reader over the image bytes; pass `&image` to borrow or `image`
    /// to get a `'static` reader (e.g. for [`crate::disk::write_raw`]).
    pub fn reader<B: Borrow<FatImage>>(image: B) -> FatReader<B> {
        FatReader {
            image,
            pos: 0,
            seg: 0,
        }
    }

    /// The whole image in memory.
    pub fn to_vec(&self) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        FatImage::reader(self).read_to_end(&mut out)?;
        Ok(out)
    }
}

/// Streams a [`FatImage`].
pub struct FatReader<B: Borrow<FatImage>> {
    image: B,
    pos: u64,
    seg: usize,
}

impl<B: Borrow<FatImage>> Read for FatReader<B> {
    // `from` is inside the current segment's data and `n` at most
    // `buf.len()`: both are in-memory lengths.
    #[allow(clippy::cast_possible_truncation)]
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let img = self.image.borrow();
        if buf.is_empty() || self.pos >= img.size {
            return Ok(0);
        }
        let segs = &img.segments;
        while self.seg < segs.len() && segs[self.seg].0 + segs[self.seg].1.len() <= self.pos {
            self.seg += 1;
        }
        let max = (buf.len() as u64).min(img.size - self.pos);
        let n = match segs.get(self.seg) {
            Some((start, data)) if *start <= self.pos => {
                let from = self.pos - start;
                let n = max.min(data.len() - from) as usize;
                data.read_at(from, &mut buf[..n])?;
                n
            }
            next => {
                let until = next.map_or(img.size, |(s, _)| *s);
                let n = max.min(until - self.pos) as usize;
                buf[..n].fill(0);
                n
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}

/// Plans a FAT32 image of exactly `size` bytes holding `tree` without
/// copying file data; stream it with [`FatImage::reader`].
pub fn plan_fat32(
    tree: &Tree,
    size: u64,
    volume_id: u32,
    label: &str,
) -> Result<FatImage, FatError> {
    let label = encode_label(label)?;
    let geometry = Geometry::for_size(size)?;
    let mut p = Planner {
        geo: geometry,
        next: ROOT_CLUSTER,
        chains: Vec::new(),
        segments: Vec::new(),
    };
    p.dir(&tree.root, Path::new("/"), None, label.as_ref())?;
    let used = (p.next - ROOT_CLUSTER) as u64;
    if used > geometry.clusters as u64 {
        return Err(FatError::NoSpace {
            need: used,
            have: geometry.clusters as u64,
            cluster_size: geometry.cluster_size(),
        });
    }

    let fat = FileData::from(encode_fat(&geometry, &p.chains));
    let fat_bytes = geometry.fat_sectors as u64 * SECTOR;
    let reserved = encode_reserved(&geometry, volume_id, label, p.next - ROOT_CLUSTER, p.next);
    let mut segments = p.segments;
    segments.push((0, FileData::from(reserved)));
    for i in 0..NUM_FATS as u64 {
        segments.push((
            RESERVED_SECTORS as u64 * SECTOR + i * fat_bytes,
            fat.clone(),
        ));
    }
    segments.retain(|(_, d)| !d.is_empty());
    segments.sort_by_key(|(o, _)| *o);
    Ok(FatImage {
        size,
        geometry,
        segments,
    })
}

fn encode_label(label: &str) -> Result<Option<[u8; 11]>, FatError> {
    if label.is_empty() {
        return Ok(None);
    }
    let up = label.to_ascii_uppercase();
    let ok =
        up.len() <= 11 && up.bytes().all(|b| b == b' ' || short_char_ok(b)) && !up.starts_with(' ');
    if !ok {
        return Err(FatError::InvalidLabel(label.to_string()));
    }
    let mut out = [b' '; 11];
    out[..up.len()].copy_from_slice(up.as_bytes());
    Ok(Some(out))
}

/// Characters allowed in a short (8.3) name, upper case only.
fn short_char_ok(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'()-@^_`{}~".contains(&b)
}

struct Planner {
    geo: Geometry,
    next: u32,
    /// (first cluster, length) of every allocated chain.
    chains: Vec<(u32, u32)>,
    segments: Vec<(u64, FileData)>,
}

/// One directory entry before encoding.
struct Named<'a> {
    name: &'a std::ffi::OsStr,
    node: &'a Node,
    short: [u8; 11],
    long: Option<Vec<u16>>,
}

impl Planner {
    /// Reserves `n` clusters; returns the first (0 when `n` is 0). Running
    /// past the volume is caught once planning ends.
    // `next` is checked against clusters + 2 <= MAX_CLUSTERS + 2 before it
    // is narrowed, and `n` is below it.
    #[allow(clippy::cast_possible_truncation)]
    fn alloc(&mut self, n: u64) -> Result<u32, FatError> {
        if n == 0 {
            return Ok(0);
        }
        let first = self.next;
        let next = first as u64 + n;
        if next > self.geo.clusters as u64 + 2 {
            return Err(FatError::NoSpace {
                need: next - 2,
                have: self.geo.clusters as u64,
                cluster_size: self.geo.cluster_size(),
            });
        }
        self.next = next as u32;
        self.chains.push((first, n as u32));
        Ok(first)
    }

    /// Lays out `dir` (at `path`) and everything below it; returns its
    /// first cluster. `parent` is None for the root.
    fn dir(
        &mut self,
        dir: &Dir,
        path: &Path,
        parent: Option<u32>,
        label: Option<&[u8; 11]>,
    ) -> Result<u32, FatError> {
        let named = name_entries(dir, path)?;
        let fixed = if parent.is_some() {
            2
        } else {
            label.is_some() as usize
        };
        let slots: usize = fixed
            + named
                .iter()
                .map(|n| 1 + n.long.as_ref().map_or(0, |l| l.len().div_ceil(13)))
                .sum::<usize>();
        if slots > MAX_DIR_ENTRIES {
            return Err(FatError::TooManyEntries(path.to_path_buf()));
        }
        let cs = self.geo.cluster_size();
        let clusters = ((slots * DIR_ENTRY) as u64).div_ceil(cs).max(1);
        let me = self.alloc(clusters)?;

        // At most 65536 entries of 32 bytes, rounded up to a cluster.
        #[allow(clippy::cast_possible_truncation)]
        let mut bytes = Vec::with_capacity((clusters * cs) as usize);
        let stamp = dos_time(dir.meta.mtime);
        match (parent, label) {
            (Some(up), _) => {
                let dot = *b".          ";
                let dotdot = *b"..         ";
                // `..` of a first-level directory points at cluster 0.
                let up = if up == ROOT_CLUSTER { 0 } else { up };
                bytes.extend_from_slice(&short_entry(&dot, ATTR_DIR, me, 0, stamp));
                bytes.extend_from_slice(&short_entry(&dotdot, ATTR_DIR, up, 0, stamp));
            }
            (None, Some(l)) => bytes.extend_from_slice(&short_entry(l, ATTR_VOLUME, 0, 0, stamp)),
            (None, None) => {}
        }
        for n in &named {
            let (name, node) = (&n.short, n.node);
            let child_path = path.join(n.name);
            let stamp = dos_time(node.meta().mtime);
            let (attr, first, len) = match node {
                Node::File { data, .. } => {
                    let len = u32::try_from(data.len())
                        .map_err(|_| FatError::FileTooLarge(child_path.clone()))?;
                    let first = self.alloc((len as u64).div_ceil(cs))?;
                    if first != 0 {
                        self.segments
                            .push((self.geo.cluster_offset(first), data.clone()));
                    }
                    (ATTR_ARCHIVE, first, len)
                }
                Node::Dir(d) => (ATTR_DIR, self.dir(d, &child_path, Some(me), None)?, 0),
                _ => return Err(FatError::UnsupportedNode(child_path)),
            };
            if let Some(long) = &n.long {
                bytes.extend_from_slice(&lfn_entries(long, name));
            }
            bytes.extend_from_slice(&short_entry(name, attr, first, len, stamp));
        }
        self.segments
            .push((self.geo.cluster_offset(me), FileData::from(bytes)));
        Ok(me)
    }
}

/// Validates names and assigns short aliases, in the directory's sorted
/// order. Names that are valid upper-case 8.3 keep that name and get no
/// long entry; every other name gets one.
fn name_entries<'a>(dir: &'a Dir, path: &Path) -> Result<Vec<Named<'a>>, FatError> {
    let mut used: HashSet<[u8; 11]> = HashSet::new();
    let mut folded: HashSet<String> = HashSet::new();
    let mut out = Vec::with_capacity(dir.entries.len());
    for (name, node) in &dir.entries {
        let child = path.join(name);
        if !matches!(node, Node::File { .. } | Node::Dir(_)) {
            return Err(FatError::UnsupportedNode(child));
        }
        let s = name
            .to_str()
            .filter(|s| long_name_ok(s))
            .ok_or_else(|| FatError::InvalidName(child.clone()))?;
        if !folded.insert(s.to_uppercase()) {
            return Err(FatError::DuplicateName(child));
        }
        let exact = exact_short(s);
        if let Some(sn) = exact {
            used.insert(sn);
        }
        out.push(Named {
            name,
            node,
            short: exact.unwrap_or([0; 11]),
            long: if exact.is_some() {
                None
            } else {
                Some(s.encode_utf16().collect())
            },
        });
    }
    for n in out.iter_mut().filter(|n| n.long.is_some()) {
        let long = String::from_utf16_lossy(n.long.as_deref().unwrap_or(&[]));
        n.short = alias(&long, &mut used).ok_or_else(|| FatError::InvalidName(path.join(&long)))?;
    }
    Ok(out)
}

fn long_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.encode_utf16().count() <= 255
        && !s.ends_with(['.', ' '])
        && !s
            .chars()
            .any(|c| (c as u32) < 0x20 || "\"*/:<>?\\|".contains(c))
}

/// The 11-byte short name if `s` already is an upper-case 8.3 name.
fn exact_short(s: &str) -> Option<[u8; 11]> {
    let (base, ext) = match s.split_once('.') {
        Some((b, e)) => (b, e),
        None => (s, ""),
    };
    let ok = |p: &str, max: usize| p.len() <= max && p.bytes().all(short_char_ok);
    if base.is_empty() || !ok(base, 8) || !ok(ext, 3) || (s.contains('.') && ext.is_empty()) {
        return None;
    }
    let mut out = [b' '; 11];
    out[..base.len()].copy_from_slice(base.as_bytes());
    out[8..8 + ext.len()].copy_from_slice(ext.as_bytes());
    Some(out)
}

/// A unique short alias for a long name: the upper-cased basis if it maps
/// cleanly and is free, else `BASIS~N`. Returns None only if every tail up
/// to ~999999 is taken.
fn alias(long: &str, used: &mut HashSet<[u8; 11]>) -> Option<[u8; 11]> {
    let mut lossy = false;
    let mut conv = |part: &str| -> Vec<u8> {
        let mut v = Vec::new();
        for c in part.chars() {
            if c == ' ' || c == '.' {
                lossy = true;
                continue;
            }
            let u = c.to_ascii_uppercase();
            if u.is_ascii() && short_char_ok(u as u8) {
                v.push(u as u8);
            } else {
                lossy = true;
                v.push(b'_');
            }
        }
        v
    };
    let trimmed = long.trim_start_matches('.');
    let (base, ext) = match trimmed.rfind('.') {
        Some(i) if i > 0 => (&trimmed[..i], &trimmed[i + 1..]),
        _ => (trimmed, ""),
    };
    let mut b = conv(base);
    let e = conv(ext);
    if trimmed.len() != long.len() {
        lossy = true;
    }
    if b.is_empty() {
        b.push(b'_');
        lossy = true;
    }
    let mut out = [b' '; 11];
    let e3 = &e[..e.len().min(3)];
    out[8..8 + e3.len()].copy_from_slice(e3);
    if !lossy && b.len() <= 8 && e.len() <= 3 {
        out[..b.len()].copy_from_slice(&b);
        if used.insert(out) {
            return Some(out);
        }
    }
    for n in 1..1_000_000u32 {
        let tail = format!("~{n}");
        let keep = b.len().min(8 - tail.len());
        let mut cand = out;
        cand[..8].fill(b' ');
        cand[..keep].copy_from_slice(&b[..keep]);
        cand[keep..keep + tail.len()].copy_from_slice(tail.as_bytes());
        if used.insert(cand) {
            return Some(cand);
        }
    }
    None
}

fn lfn_checksum(short: &[u8; 11]) -> u8 {
    short.iter().fold(0u8, |s, &b| {
        ((s & 1) << 7).wrapping_add(s >> 1).wrapping_add(b)
    })
}

/// VFAT long-name entries for `long`, in on-disk order (last part first).
fn lfn_entries(long: &[u16], short: &[u8; 11]) -> Vec<u8> {
    let sum = lfn_checksum(short);
    let parts = long.len().div_ceil(13);
    let mut out = Vec::with_capacity(parts * DIR_ENTRY);
    for i in (0..parts).rev() {
        // 13 units: the name, then one NUL terminator if room, then 0xFFFF.
        let mut units = [0xFFFFu16; 13];
        let chunk = &long[i * 13..long.len().min(i * 13 + 13)];
        units[..chunk.len()].copy_from_slice(chunk);
        if chunk.len() < 13 {
            units[chunk.len()] = 0;
        }
        let mut e = [0u8; DIR_ENTRY];
        // At most 20 parts: names are at most 255 UTF-16 units.
        #[allow(clippy::cast_possible_truncation)]
        let seq = i as u8 + 1;
        e[0] = seq | if i + 1 == parts { 0x40 } else { 0 };
        e[11] = ATTR_LFN;
        e[13] = sum;
        let put = |e: &mut [u8; DIR_ENTRY], at: usize, us: &[u16]| {
            for (k, u) in us.iter().enumerate() {
                e[at + 2 * k..at + 2 * k + 2].copy_from_slice(&u.to_le_bytes());
            }
        };
        put(&mut e, 1, &units[0..5]);
        put(&mut e, 14, &units[5..11]);
        put(&mut e, 28, &units[11..13]);
        out.extend_from_slice(&e);
    }
    out
}

// The cluster number is split into its 16-bit halves on purpose.
#[allow(clippy::cast_possible_truncation)]
fn short_entry(name: &[u8; 11], attr: u8, cluster: u32, size: u32, stamp: (u16, u16)) -> [u8; 32] {
    let (date, time) = stamp;
    let mut e = [0u8; DIR_ENTRY];
    e[0..11].copy_from_slice(name);
    e[11] = attr;
    e[14..16].copy_from_slice(&time.to_le_bytes()); // creation
    e[16..18].copy_from_slice(&date.to_le_bytes());
    e[18..20].copy_from_slice(&date.to_le_bytes()); // last access
    e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
    e[22..24].copy_from_slice(&time.to_le_bytes()); // write
    e[24..26].copy_from_slice(&date.to_le_bytes());
    e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    e
}

/// DOS (date, time) for Unix seconds, clamped to 1980..=2107 (UTC).
// The year is clamped to 1980..=2107 before packing, and month, day,
// hours, minutes, seconds are small.
#[allow(clippy::cast_possible_truncation)]
fn dos_time(secs: u64) -> (u16, u16) {
    let (y, m, d, h, mi, s) = crate::civil(secs);
    if y < 1980 {
        return ((1 << 5) | 1, 0);
    }
    if y > 2107 {
        return ((127 << 9) | (12 << 5) | 31, (23 << 11) | (59 << 5) | 29);
    }
    let date = (((y - 1980) as u16) << 9) | ((m as u16) << 5) | d as u16;
    let time = ((h as u16) << 11) | ((mi as u16) << 5) | (s / 2) as u16;
    (date, time)
}

// The FAT is at most 4 bytes per cluster of MAX_CLUSTERS + 2 (1 GiB).
#[allow(clippy::cast_possible_truncation)]
fn encode_fat(geo: &Geometry, chains: &[(u32, u32)]) -> Vec<u8> {
    let mut fat = vec![0u8; (geo.fat_sectors as u64 * SECTOR) as usize];
    let mut set = |c: u32, v: u32| {
        let at = c as usize * 4;
        fat[at..at + 4].copy_from_slice(&v.to_le_bytes());
    };
    set(0, 0x0FFF_FF00 | 0xF8);
    set(1, END_OF_CHAIN); // clean-shutdown and no-error bits set
    for &(first, len) in chains {
        for c in first..first + len - 1 {
            set(c, c + 1);
        }
        set(first + len - 1, END_OF_CHAIN);
    }
    fat
}

/// Reserved region: boot sector, FSInfo, and their backups at 6 and 7.
// Narrows only constants (512, 32, 2, 1, 6) and sectors_per_cluster <= 64.
#[allow(clippy::cast_possible_truncation)]
fn encode_reserved(
    geo: &Geometry,
    volume_id: u32,
    label: Option<[u8; 11]>,
    used: u32,
    next_free: u32,
) -> Vec<u8> {
    let mut r = vec![0u8; (RESERVED_SECTORS as u64 * SECTOR) as usize];
    let mut bs = [0u8; 512];
    bs[0..3].copy_from_slice(&[0xEB, 0x58, 0x90]);
    bs[3..11].copy_from_slice(b"MSWIN4.1");
    bs[11..13].copy_from_slice(&(SECTOR as u16).to_le_bytes());
    bs[13] = geo.sectors_per_cluster as u8;
    bs[14..16].copy_from_slice(&(RESERVED_SECTORS as u16).to_le_bytes());
    bs[16] = NUM_FATS as u8;
    bs[21] = 0xF8; // fixed disk
                   // 32 sectors x 64 heads: a 1 MiB "cylinder", so mtools geometry checks pass.
    bs[24..26].copy_from_slice(&32u16.to_le_bytes());
    bs[26..28].copy_from_slice(&64u16.to_le_bytes());
    bs[32..36].copy_from_slice(&geo.total_sectors.to_le_bytes());
    bs[36..40].copy_from_slice(&geo.fat_sectors.to_le_bytes());
    bs[44..48].copy_from_slice(&ROOT_CLUSTER.to_le_bytes());
    bs[48..50].copy_from_slice(&(FSINFO_SECTOR as u16).to_le_bytes());
    bs[50..52].copy_from_slice(&(BACKUP_BOOT_SECTOR as u16).to_le_bytes());
    bs[64] = 0x80;
    bs[66] = 0x29;
    bs[67..71].copy_from_slice(&volume_id.to_le_bytes());
    bs[71..82].copy_from_slice(&label.unwrap_or(*b"NO NAME    "));
    bs[82..90].copy_from_slice(b"FAT32   ");
    bs[510] = 0x55;
    bs[511] = 0xAA;

    let mut fsi = [0u8; 512];
    fsi[0..4].copy_from_slice(&0x4161_5252u32.to_le_bytes());
    fsi[484..488].copy_from_slice(&0x6141_7272u32.to_le_bytes());
    fsi[488..492].copy_from_slice(&(geo.clusters - used).to_le_bytes());
    fsi[492..496].copy_from_slice(&next_free.to_le_bytes());
    fsi[508..512].copy_from_slice(&0xAA55_0000u32.to_le_bytes());

    for base in [0, BACKUP_BOOT_SECTOR] {
        r[base * 512..base * 512 + 512].copy_from_slice(&bs);
        let f = (base + FSINFO_SECTOR) * 512;
        r[f..f + 512].copy_from_slice(&fsi);
    }
    r
}

/// Helpers for tests that validate images with the standard tools.
#[cfg(test)]
pub(crate) mod testutil {
    #![allow(clippy::cast_possible_truncation)]
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// Full path of `tool` if installed (PATH, then the sbin dirs).
    pub fn tool(name: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    }

    /// A fresh scratch directory unique to this test.
    pub fn scratch(test: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-fmt-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    /// Runs a tool; returns (success, stdout+stderr).
    pub fn run(tool: &Path, args: &[&std::ffi::OsStr]) -> (bool, String) {
        let out = Command::new(tool).args(args).output().expect("spawn tool");
        let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), s)
    }

    /// Deterministic pseudo-random bytes (xorshift), so big files are not
    /// all-zero and misplaced clusters show.
    pub fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)]
    use super::testutil::{noise, run, scratch, tool};
    use super::*;
    use crate::tree::Meta;
    use std::ffi::OsStr;

    const MIB: u64 = 1 << 20;

    fn esp_tree() -> Tree {
        let mut t = Tree::new();
        let mut put = |p: &str, d: Vec<u8>| {
            t.insert(Path::new(p), Node::file(0o644, d)).unwrap();
        };
        put("/EFI/BOOT/BOOTX64.EFI", noise(40_000_123, 1));
        put(
            "/loader/loader.conf",
            b"timeout 0\ndefault kiln-*\n".to_vec(),
        );
        put("/loader/entries/kiln-a+3.conf", b"title a\n".to_vec());
        put("/loader/entries/kiln-b+0-3.conf", b"title b\n".to_vec());
        put(
            "/EFI/Linux/kiln-1.2.3-very-long-unified-kernel-image-name.efi",
            noise(3 * 1024 * 1024 + 7, 2),
        );
        put("/a/b/c/d/e/deep.txt", b"deep".to_vec());
        put("/empty", Vec::new());
        put("/Mixed Case Name.Text", b"mixed".to_vec());
        put("/.hidden", b"dot".to_vec());
        put("/caf\u{e9}.txt", b"unicode".to_vec());
        put("/README", b"exact 8.3".to_vec());
        put("/readme.txt", b"lower".to_vec());
        put("/README~1", b"collides with an alias".to_vec());
        for i in 0..300 {
            put(
                &format!("/many/file-number-{i:04}.data"),
                format!("{i}").into_bytes(),
            );
        }
        t.mkdir_p(Path::new("/emptydir"), &Meta::root(0o755))
            .unwrap();
        // A known mtime: 2024-02-29 12:34:56 UTC.
        if let Some(n) = t.get_mut(Path::new("/README")) {
            n.meta_mut().mtime = 1_709_210_096;
        }
        t
    }

    #[test]
    fn geometry_is_fat32_for_common_sizes() {
        for mib in [34, 64, 100, 128, 256, 512, 2048] {
            let g = Geometry::for_size(mib * MIB).unwrap();
            assert!(g.clusters as u64 >= 65525, "{mib} MiB: {g:?}");
            let need = (g.clusters as u64 + 2) * 4;
            assert!(g.fat_sectors as u64 * 512 >= need);
            let data_start = RESERVED_SECTORS + 2 * g.fat_sectors;
            if g.sectors_per_cluster <= 32 {
                assert_eq!(data_start % g.sectors_per_cluster, 0, "{mib} MiB");
            }
        }
        assert_eq!(
            Geometry::for_size(512 * MIB).unwrap().sectors_per_cluster,
            8
        );
        assert_eq!(Geometry::for_size(64 * MIB).unwrap().sectors_per_cluster, 1);
        assert_eq!(
            Geometry::for_size(32 * MIB),
            Err(FatError::TooSmall(32 * MIB))
        );
        assert_eq!(
            Geometry::for_size(64 * MIB + 1),
            Err(FatError::UnalignedSize(64 * MIB + 1))
        );
        assert_eq!(Geometry::for_size(0), Err(FatError::TooSmall(0)));
    }

    #[test]
    fn short_names_and_aliases() {
        assert_eq!(exact_short("BOOTX64.EFI"), Some(*b"BOOTX64 EFI"));
        assert_eq!(exact_short("EFI"), Some(*b"EFI        "));
        assert_eq!(exact_short("efi"), None);
        assert_eq!(exact_short("A.B.C"), None);
        assert_eq!(exact_short("LONGNAME9"), None);
        assert_eq!(exact_short("X."), None);
        let mut used = HashSet::new();
        assert_eq!(alias("loader", &mut used), Some(*b"LOADER     "));
        assert_eq!(alias("Loader", &mut used), Some(*b"LOADER~1   "));
        assert_eq!(alias("kiln-a+3.conf", &mut used), Some(*b"KILN-A~1CON"));
        assert_eq!(alias("kiln-b+3.conf", &mut used), Some(*b"KILN-B~1CON"));
        assert_eq!(alias(".hidden", &mut used), Some(*b"HIDDEN~1   "));
        assert_eq!(alias("+", &mut used), Some(*b"_~1        "));
        for _ in 0..20 {
            alias("many files here", &mut used).unwrap();
        }
        assert!(used.contains(b"MANYFI~9   "));
        assert!(used.contains(b"MANYF~10   "));
    }

    #[test]
    fn lfn_checksum_known_value() {
        // Checksum rule: rotate right then add, over the 11 bytes.
        let mut s = 0u8;
        for &b in b"BOOTX64 EFI" {
            s = s.rotate_right(1).wrapping_add(b);
        }
        assert_eq!(lfn_checksum(b"BOOTX64 EFI"), s);
    }

    #[test]
    fn dos_time_conversion() {
        assert_eq!(dos_time(0), (0x21, 0));
        // 2024-02-29 12:34:56
        assert_eq!(
            dos_time(1_709_210_096),
            ((44 << 9) | (2 << 5) | 29, (12 << 11) | (34 << 5) | 28)
        );
        assert_eq!(dos_time(u64::MAX / 2).0 >> 9, 127);
    }

    #[test]
    fn rejects_bad_input() {
        let mut t = Tree::new();
        t.insert(Path::new("/link"), Node::symlink("x")).unwrap();
        assert_eq!(
            plan_fat32(&t, 64 * MIB, 1, "").unwrap_err(),
            FatError::UnsupportedNode(PathBuf::from("/link"))
        );
        let mut t = Tree::new();
        t.insert(Path::new("/d/a.txt"), Node::file(0o644, ""))
            .unwrap();
        t.insert(Path::new("/d/A.TXT"), Node::file(0o644, ""))
            .unwrap();
        assert!(matches!(
            plan_fat32(&t, 64 * MIB, 1, ""),
            Err(FatError::DuplicateName(_))
        ));
        for bad in ["a:b", "trailing.", "q?", "tab\t"] {
            let mut t = Tree::new();
            t.insert(&Path::new("/").join(bad), Node::file(0o644, ""))
                .unwrap();
            assert!(
                matches!(
                    plan_fat32(&t, 64 * MIB, 1, ""),
                    Err(FatError::InvalidName(_))
                ),
                "{bad}"
            );
        }
        let mut t = Tree::new();
        t.insert(Path::new("/big"), Node::file(0o644, vec![1u8; 40 << 20]))
            .unwrap();
        assert!(matches!(
            plan_fat32(&t, 40 * MIB, 1, ""),
            Err(FatError::NoSpace { .. })
        ));
        assert!(matches!(
            plan_fat32(&Tree::new(), 64 * MIB, 1, "bad:label"),
            Err(FatError::InvalidLabel(_))
        ));
        assert!(matches!(
            plan_fat32(&Tree::new(), 64 * MIB, 1, "TWELVE CHARS"),
            Err(FatError::InvalidLabel(_))
        ));
    }

    #[test]
    fn deterministic_and_streaming_matches_vec() {
        let t = esp_tree();
        let a = plan_fat32(&t, 64 * MIB, 0x1234_5678, "ESP").unwrap();
        let b = plan_fat32(&t, 64 * MIB, 0x1234_5678, "ESP").unwrap();
        let av = a.to_vec().unwrap();
        assert_eq!(av, b.to_vec().unwrap());
        assert_eq!(av.len() as u64, 64 * MIB);
        let mut streamed = Vec::new();
        // Odd buffer sizes exercise segment boundaries.
        let mut r = FatImage::reader(&a);
        let mut buf = vec![0u8; 4099];
        loop {
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            streamed.extend_from_slice(&buf[..n]);
        }
        assert_eq!(streamed, av);
    }

    #[test]
    fn large_file_is_contiguous() {
        let t = esp_tree();
        let img = plan_fat32(&t, 64 * MIB, 7, "").unwrap();
        let data = match t.get(Path::new("/EFI/BOOT/BOOTX64.EFI")).unwrap() {
            Node::File { data, .. } => data.clone(),
            _ => unreachable!(),
        };
        let v = img.to_vec().unwrap();
        // Contiguous: the whole file appears verbatim somewhere in the image.
        let seg = img
            .segments
            .iter()
            .find(|(_, d)| d.identity() == data.identity())
            .unwrap();
        let off = seg.0 as usize;
        let bytes = data.bytes().unwrap();
        assert_eq!(&v[off..off + bytes.len()], &bytes[..]);
    }

    fn check_with_tools(size: u64, label: &str) {
        let (Some(fsck), Some(mcopy), Some(mdir)) = (tool("fsck.fat"), tool("mcopy"), tool("mdir"))
        else {
            eprintln!("note: fsck.fat/mtools not installed; skipping tool validation");
            return;
        };
        let dir = scratch(&format!("fat-{}", size / MIB));
        let img = dir.join("esp.img");
        let t = esp_tree();
        let bytes = plan_fat32(&t, size, 0xCAFE_F00D, label)
            .unwrap()
            .to_vec()
            .unwrap();
        std::fs::write(&img, bytes).unwrap();

        let (ok, out) = run(
            &fsck,
            &[OsStr::new("-n"), OsStr::new("-V"), img.as_os_str()],
        );
        assert!(ok, "fsck.fat failed:\n{out}");
        assert!(
            !out.contains("differ") && !out.contains("Free cluster summary"),
            "{out}"
        );

        for (path, node) in t.walk() {
            let Node::File { data, .. } = node else {
                continue;
            };
            let got = dir.join("out");
            let _ = std::fs::remove_file(&got);
            let src = format!("::{}", path.display());
            let (ok, out) = run(
                &mcopy,
                &[
                    OsStr::new("-i"),
                    img.as_os_str(),
                    OsStr::new(&src),
                    got.as_os_str(),
                ],
            );
            assert!(ok, "mcopy {src}: {out}");
            assert!(
                std::fs::read(&got).unwrap() == data.bytes().unwrap()[..],
                "{src} differs"
            );
        }
        let (ok, out) = run(
            &mdir,
            &[
                OsStr::new("-i"),
                img.as_os_str(),
                OsStr::new("::/loader/entries"),
            ],
        );
        assert!(
            ok && out.contains("kiln-a+3.conf") && out.contains("kiln-b+0-3.conf"),
            "{out}"
        );
        if !label.is_empty() {
            let (_, out) = run(
                &mdir,
                &[OsStr::new("-i"), img.as_os_str(), OsStr::new("::/")],
            );
            assert!(
                out.contains(&format!(
                    "Volume in drive : is {}",
                    label.to_ascii_uppercase()
                )),
                "{out}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn fsck_and_mtools_accept_64mib() {
        check_with_tools(64 * MIB, "KILN-ESP");
    }

    #[test]
    fn fsck_and_mtools_accept_512mib() {
        check_with_tools(512 * MIB, "");
    }
}
