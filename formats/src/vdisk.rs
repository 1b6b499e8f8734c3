//! Virtual disk containers around a raw disk image: qcow2, VHD (fixed and
//! dynamic), streamOptimized VMDK, and the sparse gzip'd tar Google
//! Compute Engine imports. Each writer reads the raw image once, in
//! order, skipping its holes without reading them (`SEEK_DATA`), and
//! stores only blocks that hold a nonzero byte where the format allows.
//! Metadata that depends on what was stored (tables, maps) is written
//! last, with a seek back: memory holds tables, never disk data.
//!
//! Everything is deterministic: identifiers and times come from the
//! caller ([`Identity`]).

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

/// What a format stamps into its headers, derived from the build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// 16 bytes naming the disk (VHD's unique id, VMDK's CID).
    pub id: [u8; 16],
    /// Seconds since 1970 for every timestamp.
    pub time: u64,
}

/// The data regions of `f`'s first `size` bytes, as (offset, length):
/// what `SEEK_DATA`/`SEEK_HOLE` report (the whole file where the
/// filesystem cannot tell).
fn data_extents(f: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{seek, SeekFrom as RSeek};
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < size {
        let start = match seek(f, RSeek::Data(at)) {
            Ok(s) => s,
            // No data after `at`.
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL) if at == 0 => return Ok(vec![(0, size)]),
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match seek(f, RSeek::Hole(start)) {
            Ok(e) => e.min(size),
            Err(e) => return Err(e.into()),
        };
        out.push((start, end - start));
        at = end;
    }
    Ok(out)
}

/// Calls `each(index, bytes)` for every `block`-byte block of `raw`'s
/// first `size` bytes that holds a nonzero byte, in order (the last block
/// zero-padded). Holes are skipped without reading.
fn nonzero_blocks(
    raw: &File,
    size: u64,
    block: u64,
    each: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let len = usize::try_from(block).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut buf = vec![0u8; len];
    let mut next = 0u64;
    for (start, n) in data_extents(raw, size)? {
        let first = (start / block).max(next);
        let last = (start + n).div_ceil(block);
        for b in first..last {
            let at = b * block;
            let want = usize::try_from(block.min(size - at)).unwrap_or(len);
            buf[want..].fill(0);
            raw.read_exact_at(&mut buf[..want], at)?;
            if buf.iter().any(|&x| x != 0) {
                each(b, &buf)?;
            }
        }
        next = last;
    }
    Ok(())
}

/// Writes `data` at `at`, leaving its all-zero 64 KiB pieces unwritten:
/// holes in a new file, so it stays sparse.
fn write_sparse(out: &File, data: &[u8], at: u64) -> io::Result<()> {
    for (i, piece) in data.chunks(64 << 10).enumerate() {
        if piece.iter().any(|&b| b != 0) {
            out.write_all_at(piece, at + (i as u64) * (64 << 10))?;
        }
    }
    Ok(())
}

fn be16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
fn be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
fn le32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn le64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn too_large() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "disk too large for the format")
}

// ---- qcow2 ----

const QCOW2_CLUSTER_BITS: u32 = 16;
const QCOW2_CLUSTER: u64 = 1 << QCOW2_CLUSTER_BITS;
/// Refcount and L1/L2 entry flag: the cluster is used exactly once.
const QCOW2_COPIED: u64 = 1 << 63;

/// Bit 62 of an L2 entry: a compressed cluster.
const QCOW2_COMPRESSED: u64 = 1 << 62;
/// Where a compressed cluster's sector count starts in its L2 entry:
/// 62 - (cluster_bits - 8).
const QCOW2_CSIZE_SHIFT: u32 = 62 - (QCOW2_CLUSTER_BITS - 8);

/// A cluster compressed as qcow2 stores it (raw deflate, a window QEMU's
/// 4 KiB inflate can read); `None` when that saves less than a sector.
fn qcow2_compress(data: &[u8]) -> io::Result<Option<Vec<u8>>> {
    use flate2::{Compress, Compression, FlushCompress, Status};
    let mut c = Compress::new_with_window_bits(Compression::new(6), false, 12);
    let mut out = Vec::with_capacity(data.len());
    match c.compress_vec(data, &mut out, FlushCompress::Finish) {
        Ok(Status::StreamEnd) if out.len() + 512 < data.len() => Ok(Some(out)),
        Ok(_) => Ok(None),
        Err(e) => Err(io::Error::other(e)),
    }
}

/// Writes `raw` (its first `size` bytes) as qcow2 version 3 with 64 KiB
/// clusters and 16-bit refcounts; all-zero clusters are not stored, and
/// with `compress` the others are stored deflated where that is smaller
/// (packed back to back, as `qemu-img convert -c` does).
pub fn write_qcow2(raw: &File, size: u64, out: &mut File, compress: bool) -> io::Result<()> {
    let c = QCOW2_CLUSTER;
    let l2_entries = c / 8;
    let guest_clusters = size.div_ceil(c);
    let l1_size = guest_clusters.div_ceil(l2_entries);
    let extents = data_extents(raw, size)?;
    // L2 tables only where data may be.
    let mut l2_of: Vec<Option<u64>> =
        vec![None; usize::try_from(l1_size).map_err(|_| too_large())?];
    let mut l2_count = 0u64;
    for &(start, n) in &extents {
        for t in start / (c * l2_entries)..(start + n).div_ceil(c * l2_entries) {
            let slot = &mut l2_of[usize::try_from(t).map_err(|_| too_large())?];
            if slot.is_none() {
                *slot = Some(l2_count);
                l2_count += 1;
            }
        }
    }
    let data_max: u64 = extents
        .iter()
        .map(|&(s, n)| (s + n).div_ceil(c) - s / c)
        .sum();
    let l1_clusters = (l1_size * 8).div_ceil(c).max(1);
    // Refcount blocks and table sized for every cluster that may be used.
    let per_block = c / 2;
    let mut rc_blocks = 1u64;
    let mut rc_table = 1u64;
    loop {
        let total = 1 + l1_clusters + rc_table + rc_blocks + l2_count + data_max;
        let blocks = total.div_ceil(per_block);
        let table = (blocks * 8).div_ceil(c);
        if blocks <= rc_blocks && table <= rc_table {
            break;
        }
        rc_blocks = blocks.max(rc_blocks);
        rc_table = table.max(rc_table);
    }
    let l1_at = 1;
    let rc_table_at = l1_at + l1_clusters;
    let rc_blocks_at = rc_table_at + rc_table;
    let l2_at = rc_blocks_at + rc_blocks;
    let first_data = l2_at + l2_count;
    // Where the next data goes, in bytes (compressed data packs tightly).
    let mut at = first_data * c;
    // References to host clusters past the metadata, by index from it.
    let mut refs: Vec<u16> = Vec::new();
    let count = |from: u64, to: u64, refs: &mut Vec<u16>| {
        for cl in from / c..to.div_ceil(c) {
            let i = usize::try_from(cl - first_data).unwrap_or(usize::MAX);
            if refs.len() <= i {
                refs.resize(i + 1, 0);
            }
            refs[i] = refs[i].saturating_add(1);
        }
    };

    let mut l2 = vec![0u64; usize::try_from(l2_count * l2_entries).map_err(|_| too_large())?];
    nonzero_blocks(raw, size, c, &mut |b, data| {
        let table = l2_of[usize::try_from(b / l2_entries).map_err(|_| too_large())?]
            .ok_or_else(|| io::Error::other("data outside the extents"))?;
        let slot = usize::try_from(table * l2_entries + b % l2_entries).map_err(|_| too_large())?;
        let packed = if compress {
            qcow2_compress(data)?
        } else {
            None
        };
        if let Some(z) = packed {
            let extra = (at + z.len() as u64 - 1) / 512 - at / 512;
            out.write_all_at(&z, at)?;
            l2[slot] = QCOW2_COMPRESSED | (extra << QCOW2_CSIZE_SHIFT) | at;
            // What QEMU counts: through the end of the last sector used.
            count(at, (at / 512 + extra + 1) * 512, &mut refs);
            at += z.len() as u64;
        } else {
            // A whole cluster of its own: aligned, referenced once.
            at = at.div_ceil(c) * c;
            out.write_all_at(data, at)?;
            l2[slot] = at | QCOW2_COPIED;
            count(at, at + c, &mut refs);
            at += c;
        }
        Ok(())
    })?;
    let used = first_data + refs.len() as u64;

    // Header.
    let mut h = vec![0u8; usize::try_from(c).unwrap_or(0)];
    h[..4].copy_from_slice(b"QFI\xfb");
    be32(&mut h, 4, 3);
    be32(&mut h, 20, QCOW2_CLUSTER_BITS);
    be64(&mut h, 24, size);
    be32(&mut h, 36, u32::try_from(l1_size).map_err(|_| too_large())?);
    be64(&mut h, 40, l1_at * c);
    be64(&mut h, 48, rc_table_at * c);
    be32(
        &mut h,
        56,
        u32::try_from(rc_table).map_err(|_| too_large())?,
    );
    be32(&mut h, 96, 4); // refcount_order: 16 bits
    be32(&mut h, 100, 104); // header length
                            // 104..112: the end of header extensions (type 0, length 0).
    out.write_all_at(&h, 0)?;

    let table_bytes = |entries: &[u64], clusters: u64| -> Vec<u8> {
        let mut b = vec![0u8; usize::try_from(clusters * c).unwrap_or(0)];
        for (i, e) in entries.iter().enumerate() {
            be64(&mut b, i * 8, *e);
        }
        b
    };
    let l1: Vec<u64> = l2_of
        .iter()
        .map(|t| t.map_or(0, |t| ((l2_at + t) * c) | QCOW2_COPIED))
        .collect();
    out.write_all_at(&table_bytes(&l1, l1_clusters), l1_at * c)?;
    let rct: Vec<u64> = (0..rc_blocks).map(|i| (rc_blocks_at + i) * c).collect();
    out.write_all_at(&table_bytes(&rct, rc_table), rc_table_at * c)?;
    let mut rcb = vec![0u8; usize::try_from(rc_blocks * c).map_err(|_| too_large())?];
    let meta = usize::try_from(first_data).map_err(|_| too_large())?;
    for i in 0..meta {
        be16(&mut rcb, i * 2, 1);
    }
    for (i, r) in refs.iter().enumerate() {
        be16(&mut rcb, (meta + i) * 2, *r);
    }
    out.write_all_at(&rcb, rc_blocks_at * c)?;
    for t in 0..l2_count {
        let from = usize::try_from(t * l2_entries).map_err(|_| too_large())?;
        let entries = &l2[from..from + usize::try_from(l2_entries).unwrap_or(0)];
        out.write_all_at(&table_bytes(entries, 1), (l2_at + t) * c)?;
    }
    // Whole clusters; compressed data may end inside the last one.
    out.set_len(used * c)?;
    out.flush()
}

// ---- VHD ----

/// The VHD epoch, 2000-01-01T00:00:00Z, in Unix seconds.
const VHD_EPOCH: u64 = 946_684_800;
const VHD_FIXED: u32 = 2;
const VHD_DYNAMIC: u32 = 3;
/// Dynamic VHD block size (the spec's default).
const VHD_BLOCK: u64 = 2 << 20;

/// The CHS geometry of the VHD specification's appendix for `size` bytes.
fn vhd_geometry(size: u64) -> (u16, u8, u8) {
    let total = (size / 512).min(65535 * 16 * 255);
    let (spt, heads, cth) = if total >= 65535 * 16 * 63 {
        (255u64, 16u64, total / 255)
    } else {
        let mut spt = 17;
        let mut cth = total / spt;
        let mut heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = total / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = total / spt;
        }
        (spt, heads, cth)
    };
    // In range by construction: at most 65535 cylinders, 16 heads, 255.
    (
        u16::try_from(cth / heads).unwrap_or(u16::MAX),
        u8::try_from(heads).unwrap_or(16),
        u8::try_from(spt).unwrap_or(255),
    )
}

/// One's complement of the byte sum: VHD's checksum.
fn vhd_checksum(b: &[u8]) -> u32 {
    !b.iter().fold(0u32, |s, &x| s.wrapping_add(u32::from(x)))
}

/// The 512-byte footer (also the dynamic disk's first sector).
fn vhd_footer(size: u64, kind: u32, data_offset: u64, id: &Identity) -> [u8; 512] {
    let mut f = [0u8; 512];
    f[..8].copy_from_slice(b"conectix");
    be32(&mut f, 8, 2); // features: reserved bit, always set
    be32(&mut f, 12, 0x0001_0000);
    be64(&mut f, 16, data_offset);
    let time = u32::try_from(id.time.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX);
    be32(&mut f, 24, time);
    // Readers size a disk by its CHS geometry or by its current size
    // depending on the creator: Hyper-V's ("win ") says current size, the
    // exact one (QEMU reads an unknown creator by geometry, which rounds
    // down).
    f[28..32].copy_from_slice(b"win ");
    be32(&mut f, 32, 0x0001_0000);
    f[36..40].copy_from_slice(b"Wi2k");
    be64(&mut f, 40, size);
    be64(&mut f, 48, size);
    let (c, h, s) = vhd_geometry(size);
    be16(&mut f, 56, c);
    f[58] = h;
    f[59] = s;
    be32(&mut f, 60, kind);
    f[68..84].copy_from_slice(&id.id);
    let sum = vhd_checksum(&f);
    be32(&mut f, 64, sum);
    f
}

/// Writes a fixed VHD: the raw bytes (sparse where `raw` is), then the
/// footer. Azure's rule: the size must be a whole number of MiB.
pub fn write_vhd_fixed(raw: &File, size: u64, out: &mut File, id: &Identity) -> io::Result<()> {
    if !size.is_multiple_of(1 << 20) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a fixed VHD's size must be a whole number of MiB",
        ));
    }
    nonzero_blocks(raw, size, 64 << 10, &mut |b, data| {
        out.write_all_at(data, b << 16)
    })?;
    out.write_all_at(&vhd_footer(size, VHD_FIXED, u64::MAX, id), size)?;
    out.set_len(size + 512)?;
    out.flush()
}

/// Writes a dynamic VHD with 2 MiB blocks; all-zero blocks are not
/// stored.
pub fn write_vhd_dynamic(raw: &File, size: u64, out: &mut File, id: &Identity) -> io::Result<()> {
    let blocks = size.div_ceil(VHD_BLOCK);
    let entries = u32::try_from(blocks).map_err(|_| too_large())?;
    let footer = vhd_footer(size, VHD_DYNAMIC, 512, id);
    let bat_at = 512 + 1024;
    let bat_len = (blocks * 4).div_ceil(512) * 512;
    let mut bat = vec![0xffu8; usize::try_from(bat_len).map_err(|_| too_large())?];
    // Each block: its sector bitmap (every sector present), then data.
    let bitmap = vec![0xffu8; 512];
    let mut next = bat_at + bat_len;
    nonzero_blocks(raw, size, VHD_BLOCK, &mut |b, data| {
        let sector = u32::try_from(next / 512).map_err(|_| too_large())?;
        be32(
            &mut bat,
            usize::try_from(b * 4).map_err(|_| too_large())?,
            sector,
        );
        out.write_all_at(&bitmap, next)?;
        write_sparse(out, data, next + 512)?;
        next += 512 + VHD_BLOCK;
        Ok(())
    })?;
    let mut dh = [0u8; 1024];
    dh[..8].copy_from_slice(b"cxsparse");
    be64(&mut dh, 8, u64::MAX);
    be64(&mut dh, 16, bat_at);
    be32(&mut dh, 24, 0x0001_0000);
    be32(&mut dh, 28, entries);
    be32(&mut dh, 32, u32::try_from(VHD_BLOCK).unwrap_or(0));
    let sum = vhd_checksum(&dh);
    be32(&mut dh, 36, sum);
    out.write_all_at(&footer, 0)?;
    out.write_all_at(&dh, 512)?;
    out.write_all_at(&bat, bat_at)?;
    out.write_all_at(&footer, next)?;
    out.set_len(next + 512)?;
    out.flush()
}

// ---- VMDK (streamOptimized) ----

/// Sectors per grain (64 KiB) and grain table entries per table.
const VMDK_GRAIN: u64 = 128;
const VMDK_GT_ENTRIES: u64 = 512;
const VMDK_MARKER_EOS: u32 = 0;
const VMDK_MARKER_GT: u32 = 1;
const VMDK_MARKER_GD: u32 = 2;
const VMDK_MARKER_FOOTER: u32 = 3;
/// Where the grains start (sectors): header, descriptor, then grain 0.
const VMDK_OVERHEAD: u64 = 128;
const VMDK_DESCRIPTOR_SECTORS: u64 = 20;

/// The sparse extent header; `gd` is the grain directory's sector (the
/// header says "at the end", the footer where).
fn vmdk_header(capacity: u64, gd: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..4].copy_from_slice(b"KDMV");
    le32(&mut h, 4, 3);
    // Valid newline test, compressed grains, markers.
    le32(&mut h, 8, 1 | (1 << 16) | (1 << 17));
    le64(&mut h, 12, capacity);
    le64(&mut h, 20, VMDK_GRAIN);
    le64(&mut h, 28, 1);
    le64(&mut h, 36, VMDK_DESCRIPTOR_SECTORS);
    le32(&mut h, 44, u32::try_from(VMDK_GT_ENTRIES).unwrap_or(0));
    le64(&mut h, 56, gd);
    le64(&mut h, 64, VMDK_OVERHEAD);
    h[73] = b'\n';
    h[74] = b' ';
    h[75] = b'\r';
    h[76] = b'\n';
    h[77..79].copy_from_slice(&1u16.to_le_bytes()); // deflate
    h
}

/// A metadata marker sector: `sectors` of `kind` follow it.
fn vmdk_marker(sectors: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    le64(&mut m, 0, sectors);
    le32(&mut m, 12, kind);
    m
}

/// Writes a streamOptimized VMDK (what VMware and AWS VM Import take):
/// each nonzero 64 KiB grain zlib-compressed behind its marker, a grain
/// table after each 32 MiB with data, then the grain directory, the
/// footer and the end-of-stream marker. `name` is the extent's file name
/// in the descriptor.
pub fn write_vmdk_stream(
    raw: &File,
    size: u64,
    out: &mut File,
    id: &Identity,
    name: &str,
) -> io::Result<()> {
    use flate2::{write::ZlibEncoder, Compression};
    let grain = VMDK_GRAIN * 512;
    let capacity = size.div_ceil(512);
    let tables = capacity.div_ceil(VMDK_GRAIN * VMDK_GT_ENTRIES);
    let cid = u32::from_le_bytes([id.id[0], id.id[1], id.id[2], id.id[3]]);
    let (cyl, heads, sectors) = (capacity / (255 * 63), 255, 63);
    let descriptor = format!(
        "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\n\
         # Extent description\nRW {capacity} SPARSE \"{name}\"\n\n\
         # The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"4\"\nddb.adapterType = \"lsilogic\"\n\
         ddb.geometry.cylinders = \"{}\"\nddb.geometry.heads = \"{heads}\"\nddb.geometry.sectors = \"{sectors}\"\n\
         ddb.longContentID = \"{}\"\nddb.uuid = \"{}\"\n",
        cyl.min(65535),
        id.id.iter().take(16).map(|b| format!("{b:02x}")).collect::<String>(),
        id.id
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    let desc_len = VMDK_DESCRIPTOR_SECTORS * 512;
    if descriptor.len() as u64 > desc_len {
        return Err(io::Error::other("VMDK descriptor too long"));
    }
    let mut head = vec![0u8; usize::try_from(VMDK_OVERHEAD * 512).unwrap_or(0)];
    head[..512].copy_from_slice(&vmdk_header(capacity, u64::MAX));
    head[512..512 + descriptor.len()].copy_from_slice(descriptor.as_bytes());
    out.write_all_at(&head, 0)?;

    let mut at = VMDK_OVERHEAD; // next free sector
    let mut gd = vec![0u32; usize::try_from(tables).map_err(|_| too_large())?];
    let mut gt = vec![0u32; usize::try_from(VMDK_GT_ENTRIES).unwrap_or(0)];
    let mut gt_index: Option<u64> = None;
    let sector_u32 = |s: u64| u32::try_from(s).map_err(|_| too_large());
    // Writes the pending grain table, if any, and records it.
    let flush_gt =
        |gt: &mut Vec<u32>, index: u64, at: &mut u64, gd: &mut Vec<u32>| -> io::Result<()> {
            let sectors = (VMDK_GT_ENTRIES * 4).div_ceil(512);
            out.write_all_at(&vmdk_marker(sectors, VMDK_MARKER_GT), *at * 512)?;
            let mut bytes = vec![0u8; usize::try_from(sectors * 512).unwrap_or(0)];
            for (i, e) in gt.iter().enumerate() {
                le32(&mut bytes, i * 4, *e);
            }
            out.write_all_at(&bytes, (*at + 1) * 512)?;
            gd[usize::try_from(index).map_err(|_| too_large())?] = sector_u32(*at + 1)?;
            *at += 1 + sectors;
            gt.iter_mut().for_each(|e| *e = 0);
            Ok(())
        };
    nonzero_blocks(raw, size, grain, &mut |g, data| {
        let table = g / VMDK_GT_ENTRIES;
        if let Some(t) = gt_index.filter(|&t| t != table) {
            flush_gt(&mut gt, t, &mut at, &mut gd)?;
        }
        gt_index = Some(table);
        let mut z = ZlibEncoder::new(Vec::with_capacity(data.len() / 2), Compression::new(6));
        z.write_all(data)?;
        let packed = z.finish()?;
        let mut rec = Vec::with_capacity(12 + packed.len() + 512);
        rec.extend_from_slice(&(g * VMDK_GRAIN).to_le_bytes());
        rec.extend_from_slice(
            &u32::try_from(packed.len())
                .map_err(|_| too_large())?
                .to_le_bytes(),
        );
        rec.extend_from_slice(&packed);
        rec.resize(rec.len().div_ceil(512) * 512, 0);
        out.write_all_at(&rec, at * 512)?;
        gt[usize::try_from(g % VMDK_GT_ENTRIES).unwrap_or(0)] = sector_u32(at)?;
        at += rec.len() as u64 / 512;
        Ok(())
    })?;
    if let Some(t) = gt_index {
        flush_gt(&mut gt, t, &mut at, &mut gd)?;
    }
    // Grain directory, footer (the header with the directory's place),
    // end of stream.
    let gd_sectors = (tables * 4).div_ceil(512);
    out.write_all_at(&vmdk_marker(gd_sectors, VMDK_MARKER_GD), at * 512)?;
    let mut bytes = vec![0u8; usize::try_from(gd_sectors * 512).map_err(|_| too_large())?];
    for (i, e) in gd.iter().enumerate() {
        le32(&mut bytes, i * 4, *e);
    }
    out.write_all_at(&bytes, (at + 1) * 512)?;
    let gd_at = at + 1;
    at += 1 + gd_sectors;
    out.write_all_at(&vmdk_marker(1, VMDK_MARKER_FOOTER), at * 512)?;
    out.write_all_at(&vmdk_header(capacity, gd_at), (at + 1) * 512)?;
    at += 2;
    out.write_all_at(&vmdk_marker(0, VMDK_MARKER_EOS), at * 512)?;
    out.set_len((at + 1) * 512)?;
    out.flush()
}

// ---- GCE: disk.raw in a sparse, gzip'd tar ----

/// One octal numeric field of a tar header (base-256 when too large).
fn tar_number(b: &mut [u8], v: u64) {
    let digits = b.len() - 1;
    if v < 1u64 << (3 * digits) {
        let s = format!("{v:0digits$o}");
        b[..digits].copy_from_slice(s.as_bytes());
        b[digits] = 0;
    } else {
        b.fill(0);
        b[0] = 0x80;
        let n = b.len();
        b[n - 8..].copy_from_slice(&v.to_be_bytes());
    }
}

/// Writes `disk.raw` as Google Compute Engine imports it: one file in an
/// old-GNU tar with a sparse map (only data regions stored), gzip'd.
pub fn write_gce_tar_gz(raw: &File, size: u64, out: &mut File, id: &Identity) -> io::Result<()> {
    use flate2::{Compression, GzBuilder};
    // Data regions in 64 KiB blocks: runs of nonzero blocks.
    let block = 64 << 10;
    let mut regions: Vec<(u64, u64)> = Vec::new();
    nonzero_blocks(raw, size, block, &mut |b, _| {
        let start = b * block;
        let len = block.min(size - start);
        match regions.last_mut() {
            Some((s, n)) if *s + *n == start => *n += len,
            _ => regions.push((start, len)),
        }
        Ok(())
    })?;
    // GNU tar ends the map with an empty region at the end of a file
    // whose end is a hole.
    if regions.last().is_none_or(|&(s, n)| s + n < size) {
        regions.push((size, 0));
    }
    let stored: u64 = regions.iter().map(|r| r.1).sum();

    let mut header = [0u8; 512];
    header[..8].copy_from_slice(b"disk.raw");
    tar_number(&mut header[100..108], 0o644);
    tar_number(&mut header[108..116], 0);
    tar_number(&mut header[116..124], 0);
    tar_number(&mut header[124..136], stored);
    tar_number(&mut header[136..148], id.time);
    header[156] = b'S';
    header[257..265].copy_from_slice(b"ustar  \0");
    header[265..269].copy_from_slice(b"root");
    header[297..301].copy_from_slice(b"root");
    let entry = |b: &mut [u8], (off, n): (u64, u64)| {
        tar_number(&mut b[..12], off);
        tar_number(&mut b[12..24], n);
    };
    for (i, r) in regions.iter().take(4).enumerate() {
        entry(&mut header[386 + i * 24..386 + (i + 1) * 24], *r);
    }
    header[482] = u8::from(regions.len() > 4);
    tar_number(&mut header[483..495], size);
    header[148..156].fill(b' ');
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    header[148..156].copy_from_slice(s.as_bytes());

    let mtime = u32::try_from(id.time).unwrap_or(0);
    let mut gz = GzBuilder::new()
        .mtime(mtime)
        .operating_system(3)
        .write(io::BufWriter::new(&mut *out), Compression::new(6));
    gz.write_all(&header)?;
    let rest: Vec<&(u64, u64)> = regions.iter().skip(4).collect();
    for (k, chunk) in rest.chunks(21).enumerate() {
        let mut ext = [0u8; 512];
        for (i, r) in chunk.iter().enumerate() {
            entry(&mut ext[i * 24..(i + 1) * 24], **r);
        }
        ext[504] = u8::from((k + 1) * 21 < rest.len());
        gz.write_all(&ext)?;
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    for &(start, n) in &regions {
        let mut at = start;
        while at < start + n {
            let take = usize::try_from((start + n - at).min(buf.len() as u64)).unwrap_or(0);
            raw.read_exact_at(&mut buf[..take], at)?;
            gz.write_all(&buf[..take])?;
            at += take as u64;
            written += take as u64;
        }
    }
    let pad = usize::try_from((512 - written % 512) % 512).unwrap_or(0);
    gz.write_all(&vec![0u8; pad])?;
    // End of archive, and GNU tar's 10 KiB record.
    let so_far = 512 * (1 + rest.len().div_ceil(21) as u64) + written + pad as u64;
    let end = (so_far + 1024).div_ceil(10240) * 10240;
    gz.write_all(&vec![0u8; usize::try_from(end - so_far).unwrap_or(0)])?;
    gz.finish()?.flush()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)]
    use super::*;
    use std::process::Command;

    const MIB: u64 = 1 << 20;

    /// A sparse raw image of `size` with a few data regions, including
    /// its last bytes (as a GPT's backup header).
    fn raw_image(dir: &std::path::Path, size: u64) -> (std::path::PathBuf, File) {
        let path = dir.join("disk.raw");
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        for (at, n, seed) in [
            (0u64, 4096u64, 1u8),
            (MIB + 12345, 300_000, 7),
            (40 * MIB, 3 * MIB, 9),
            (size - 512, 512, 3),
        ] {
            let data: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(seed) | 1).collect();
            f.write_all_at(&data, at).unwrap();
        }
        (path, File::open(dir.join("disk.raw")).unwrap())
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-vdisk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn qemu_img(args: &[&str]) -> Option<(bool, String)> {
        let o = Command::new("qemu-img").args(args).output().ok()?;
        Some((
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ))
    }

    const ID: Identity = Identity {
        id: [7; 16],
        time: 1_700_000_000,
    };

    /// Each container checks clean with qemu-img and holds the raw
    /// image's bytes exactly.
    #[test]
    fn containers_match_the_raw_image_by_qemu_img() {
        let dir = scratch("all");
        let size = 64 * MIB;
        let (raw_path, raw) = raw_image(&dir, size);
        let raw_s = raw_path.to_str().unwrap();
        for (fmt, file, driver) in [
            ("qcow2", "d.qcow2", "qcow2"),
            ("qcow2-compressed", "dc.qcow2", "qcow2"),
            ("vhd", "d.vhd", "vpc"),
            ("vhd-dynamic", "d-dynamic.vhd", "vpc"),
            ("vmdk", "d.vmdk", "vmdk"),
        ] {
            let path = dir.join(file);
            let mut out = File::create(&path).unwrap();
            match fmt {
                "qcow2" => write_qcow2(&raw, size, &mut out, false).unwrap(),
                "qcow2-compressed" => write_qcow2(&raw, size, &mut out, true).unwrap(),
                "vhd" => write_vhd_fixed(&raw, size, &mut out, &ID).unwrap(),
                "vhd-dynamic" => write_vhd_dynamic(&raw, size, &mut out, &ID).unwrap(),
                _ => write_vmdk_stream(&raw, size, &mut out, &ID, file).unwrap(),
            }
            let p = path.to_str().unwrap();
            let (ok, info) = qemu_img(&["info", "-f", driver, p])
                .expect("qemu-img (scripts/install-deps.sh installs qemu-utils)");
            assert!(ok, "{fmt}: {info}");
            assert!(
                info.contains(&format!("virtual size: 64 MiB ({size} bytes)")),
                "{fmt}: {info}"
            );
            if driver != "vpc" {
                let (ok, check) = qemu_img(&["check", "-f", driver, p]).unwrap();
                assert!(ok && check.contains("No errors"), "{fmt}: {check}");
            }
            let (ok, cmp) = qemu_img(&["compare", "-f", driver, "-F", "raw", p, raw_s]).unwrap();
            assert!(ok && cmp.contains("identical"), "{fmt}: {cmp}");
            // Holes stay holes: far less than the disk is stored.
            if fmt != "vhd" {
                assert!(std::fs::metadata(&path).unwrap().len() < 16 * MIB, "{fmt}");
            }
            if fmt == "qcow2-compressed" {
                let plain = std::fs::metadata(dir.join("d.qcow2")).unwrap().len();
                assert!(std::fs::metadata(&path).unwrap().len() < plain / 2, "{fmt}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// GNU tar unpacks `tgz`'s disk.raw (sparse) to `raw`'s bytes.
    fn assert_untars_to(tgz: &std::path::Path, raw: &std::path::Path) {
        let x = tgz.with_extension("x");
        std::fs::create_dir_all(&x).unwrap();
        let st = Command::new("tar")
            .arg("-xSzf")
            .arg(tgz)
            .arg("-C")
            .arg(&x)
            .status()
            .unwrap();
        assert!(st.success());
        assert!(std::fs::read(x.join("disk.raw")).unwrap() == std::fs::read(raw).unwrap());
    }

    #[test]
    fn gce_tar_restores_the_raw_image() {
        let dir = scratch("gce");
        let size = 64 * MIB;
        let (raw_path, raw) = raw_image(&dir, size);
        let tgz = dir.join("d.tar.gz");
        write_gce_tar_gz(&raw, size, &mut File::create(&tgz).unwrap(), &ID).unwrap();
        let list = Command::new("tar").arg("-tvzf").arg(&tgz).output().unwrap();
        let text = String::from_utf8_lossy(&list.stdout);
        assert!(list.status.success(), "{text}");
        assert!(
            text.contains(&size.to_string()) && text.trim_end().ends_with("disk.raw"),
            "{text}"
        );
        assert_untars_to(&tgz, &raw_path);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn many_regions_use_extension_headers() {
        let dir = scratch("gce-many");
        let size = 16 * MIB;
        let path = dir.join("disk.raw");
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        for i in 0..60u64 {
            f.write_all_at(&[i as u8 | 1; 100], i * 256 * 1024).unwrap();
        }
        let raw = File::open(&path).unwrap();
        let tgz = dir.join("d.tar.gz");
        write_gce_tar_gz(&raw, size, &mut File::create(&tgz).unwrap(), &ID).unwrap();
        assert_untars_to(&tgz, &path);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn vhd_geometry_as_the_spec_computes_it() {
        // 64 MiB: 131072 sectors, 17 sectors per track first, then 31.
        assert_eq!(vhd_geometry(64 * MIB), (963, 8, 17));
        assert_eq!(vhd_geometry(1 << 40), (65535, 16, 255));
        let f = vhd_footer(64 * MIB, VHD_FIXED, u64::MAX, &ID);
        // The checksum makes the byte sum (with it zeroed) its complement.
        let mut z = f;
        z[64..68].fill(0);
        assert_eq!(vhd_checksum(&z).to_be_bytes(), f[64..68]);
    }
}
