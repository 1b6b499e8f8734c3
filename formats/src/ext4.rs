//! A small empty ext4 filesystem, as `mke2fs -t ext4 -O meta_bg,^resize_inode,
//! ^flex_bg,^metadata_csum,^64bit -N 8192 -J size=4 -m 0` makes it: one block
//! group of 4 KiB blocks, a 4 MiB journal, root and lost+found. It is meant
//! to be grown where it lands (the data partition, by the init with
//! `EXT4_IOC_RESIZE_FS`): meta_bg lets the kernel add group descriptors
//! without reserved GDT blocks, to any size.

use std::io::{self, Read};

/// Block size, as the on-disk fields hold it and as a buffer length.
const BLOCK_SIZE: u32 = 4096;
const BLOCK: usize = BLOCK_SIZE as usize;
const BLOCKS_PER_GROUP: u32 = 32768;
const INODES: u32 = 8192;
const INODE_BYTES: u16 = 256;
const INODE_SIZE: usize = INODE_BYTES as usize;
const INODE_TABLE_BLOCKS: u32 = INODES * INODE_BYTES as u32 / BLOCK_SIZE;
/// Fixed block positions (as mke2fs places them).
const GDT_BLOCK: u32 = 1;
const BLOCK_BITMAP: u32 = 2;
const INODE_BITMAP: u32 = 3;
const INODE_TABLE: u32 = 4;
const ROOT_BLOCK: u32 = INODE_TABLE + INODE_TABLE_BLOCKS;
const LPF_BLOCK: u32 = ROOT_BLOCK + 1;
const LPF_BLOCKS: u16 = 4;
const JOURNAL_BLOCK: u32 = LPF_BLOCK + LPF_BLOCKS as u32;
const JOURNAL_BLOCKS: u16 = 1024;
/// Blocks in use: everything up to the journal's end.
const USED_BLOCKS: u32 = JOURNAL_BLOCK + JOURNAL_BLOCKS as u32;
/// Metadata blocks (all used ones but the directories').
const OVERHEAD: u32 = USED_BLOCKS - 1 - LPF_BLOCKS as u32;

const ROOT_INO: u32 = 2;
const JOURNAL_INO: u32 = 8;
const LPF_INO: u32 = 11;

/// The smallest and largest sizes written (blocks): one group.
pub const MIN_BLOCKS: u32 = 2048;
/// See [`MIN_BLOCKS`].
pub const MAX_BLOCKS: u32 = BLOCKS_PER_GROUP;

/// What varies between filesystems.
#[derive(Debug, Clone)]
pub struct Ext4Options {
    /// Size in 4 KiB blocks, [`MIN_BLOCKS`] to [`MAX_BLOCKS`].
    pub blocks: u32,
    /// Filesystem UUID (text order).
    pub uuid: [u8; 16],
    /// Directory hash seed.
    pub hash_seed: [u8; 16],
    /// Every timestamp (seconds since the epoch).
    pub time: u32,
    /// Volume label, at most 16 bytes.
    pub label: String,
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// An inode's 60-byte `i_block`: an extent header and one extent.
fn extent(start: u32, len: u16) -> [u8; 60] {
    let mut b = [0u8; 60];
    put16(&mut b, 0, 0xf30a);
    put16(&mut b, 2, 1); // entries
    put16(&mut b, 4, 4); // max
    put16(&mut b, 12 + 4, len);
    put32(&mut b, 12 + 8, start);
    b
}

/// A 256-byte inode.
fn inode(mode: u16, size: u32, links: u16, time: u32, data: Option<(u32, u16)>) -> Vec<u8> {
    let mut b = vec![0u8; INODE_SIZE];
    put16(&mut b, 0, mode);
    put32(&mut b, 4, size);
    for at in [8, 12, 16] {
        put32(&mut b, at, time);
    }
    put16(&mut b, 26, links);
    if let Some((start, len)) = data {
        put32(&mut b, 28, u32::from(len) * (BLOCK_SIZE / 512));
        put32(&mut b, 32, 0x80000); // EXT4_EXTENTS_FL
        b[40..100].copy_from_slice(&extent(start, len));
    }
    put16(&mut b, 128, 32); // i_extra_isize
    put32(&mut b, 144, time); // i_crtime
    b
}

/// Directory entries packed into one block; the last fills it.
fn dir_block(entries: &[(u32, &str)]) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    let mut at = 0;
    for (i, (ino, name)) in entries.iter().enumerate() {
        let len = (8 + name.len()).next_multiple_of(4);
        let rec = if i + 1 == entries.len() {
            BLOCK - at
        } else {
            len
        };
        put32(&mut b, at, *ino);
        put16(&mut b, at + 4, u16::try_from(rec).unwrap_or(0));
        b[at + 6] = u8::try_from(name.len()).unwrap_or(0);
        b[at + 7] = 2; // directory
        b[at + 8..at + 8 + name.len()].copy_from_slice(name.as_bytes());
        at += rec;
    }
    b
}

/// An empty directory block (more room for lost+found).
fn empty_dir_block() -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    put16(&mut b, 4, 4096);
    b
}

/// A bitmap block with the first `used` bits set, and the bits past
/// `valid` (padding beyond the group's end) set too.
fn bitmap(used: u32, valid: u32) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    for bit in (0..used).chain(valid..(BLOCK_SIZE * 8)) {
        b[(bit / 8) as usize] |= 1 << (bit % 8);
    }
    b
}

fn superblock(o: &Ext4Options) -> Vec<u8> {
    let free_blocks = o.blocks - USED_BLOCKS;
    let free_inodes = INODES - LPF_INO;
    let mut s = vec![0u8; 1024];
    put32(&mut s, 0, INODES);
    put32(&mut s, 4, o.blocks);
    put32(&mut s, 12, free_blocks);
    put32(&mut s, 16, free_inodes);
    put32(&mut s, 24, 2); // 4 KiB blocks
    put32(&mut s, 28, 2);
    put32(&mut s, 32, BLOCKS_PER_GROUP);
    put32(&mut s, 36, BLOCKS_PER_GROUP);
    put32(&mut s, 40, INODES);
    put32(&mut s, 48, o.time); // s_wtime
    put16(&mut s, 54, 0xffff); // no mount-count checks
    put16(&mut s, 56, 0xef53);
    put16(&mut s, 58, 1); // clean
    put16(&mut s, 60, 1); // errors: continue
    put32(&mut s, 64, o.time); // s_lastcheck
    put32(&mut s, 76, 1); // dynamic revision
    put32(&mut s, 84, LPF_INO); // first non-reserved inode
    put16(&mut s, 88, INODE_BYTES);
    // has_journal, ext_attr, dir_index
    put32(&mut s, 92, 0x04 | 0x08 | 0x20);
    // filetype, meta_bg, extents
    put32(&mut s, 96, 0x02 | 0x10 | 0x40);
    // sparse_super, large_file, huge_file, dir_nlink, extra_isize
    put32(&mut s, 100, 0x01 | 0x02 | 0x08 | 0x20 | 0x40);
    s[104..120].copy_from_slice(&o.uuid);
    let label = o.label.as_bytes();
    let n = label.len().min(16);
    s[120..120 + n].copy_from_slice(&label[..n]);
    put32(&mut s, 224, JOURNAL_INO);
    s[236..252].copy_from_slice(&o.hash_seed);
    s[252] = 1; // half_md4
    s[253] = 1; // s_jnl_blocks holds the journal inode's blocks
    put32(&mut s, 256, 0x0c); // user_xattr, acl
    put32(&mut s, 264, o.time); // s_mkfs_time
    s[268..328].copy_from_slice(&extent(JOURNAL_BLOCK, JOURNAL_BLOCKS));
    put32(&mut s, 332, u32::from(JOURNAL_BLOCKS) * BLOCK_SIZE); // s_jnl_blocks[16]: size
    put16(&mut s, 348, 32); // s_min_extra_isize
    put16(&mut s, 350, 32); // s_want_extra_isize
    put32(&mut s, 352, 1); // signed directory hash
    put32(&mut s, 0x248, OVERHEAD); // s_overhead_clusters
    s
}

fn group_descriptor(o: &Ext4Options) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    put32(&mut b, 0, BLOCK_BITMAP);
    put32(&mut b, 4, INODE_BITMAP);
    put32(&mut b, 8, INODE_TABLE);
    put16(
        &mut b,
        12,
        u16::try_from(o.blocks - USED_BLOCKS).unwrap_or(0),
    );
    put16(&mut b, 14, u16::try_from(INODES - LPF_INO).unwrap_or(0));
    put16(&mut b, 16, 2); // directories
    put16(&mut b, 18, 0x4); // EXT4_BG_BLOCK_ZEROED
    b
}

/// The journal's superblock (jbd2 v2, big-endian), empty and clean.
fn journal_superblock(o: &Ext4Options) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    for (at, v) in [
        (0, 0xc03b_3998u32),
        (4, 4), // superblock v2
        (12, BLOCK_SIZE),
        (16, u32::from(JOURNAL_BLOCKS)),
        (20, 1), // first log block
        (24, 1), // sequence
        (64, 1), // users
    ] {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    b[48..64].copy_from_slice(&o.uuid);
    b
}

/// The filesystem's blocks that are not all zeros, by number.
fn blocks(o: &Ext4Options) -> io::Result<Vec<(u32, Vec<u8>)>> {
    if !(MIN_BLOCKS..=MAX_BLOCKS).contains(&o.blocks) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "an ext4 of {} blocks: {MIN_BLOCKS} to {MAX_BLOCKS} are written",
                o.blocks
            ),
        ));
    }
    let t = o.time;
    let mut block0 = vec![0u8; BLOCK];
    block0[1024..2048].copy_from_slice(&superblock(o));
    let mut table = vec![0u8; INODE_TABLE_BLOCKS as usize * BLOCK];
    let mut set = |ino: u32, bytes: Vec<u8>| {
        let at = (ino as usize - 1) * INODE_SIZE;
        table[at..at + INODE_SIZE].copy_from_slice(&bytes);
    };
    // The bad-blocks inode: times only, as mke2fs leaves it.
    let mut bad = vec![0u8; INODE_SIZE];
    for at in [8, 12, 16] {
        put32(&mut bad, at, t);
    }
    set(1, bad);
    set(
        ROOT_INO,
        inode(0o40755, BLOCK_SIZE, 3, t, Some((ROOT_BLOCK, 1))),
    );
    set(
        JOURNAL_INO,
        inode(
            0o100600,
            u32::from(JOURNAL_BLOCKS) * BLOCK_SIZE,
            1,
            t,
            Some((JOURNAL_BLOCK, JOURNAL_BLOCKS)),
        ),
    );
    set(
        LPF_INO,
        inode(
            0o40700,
            u32::from(LPF_BLOCKS) * BLOCK_SIZE,
            2,
            t,
            Some((LPF_BLOCK, LPF_BLOCKS)),
        ),
    );
    let mut out = vec![
        (0, block0),
        (GDT_BLOCK, group_descriptor(o)),
        (BLOCK_BITMAP, bitmap(USED_BLOCKS, o.blocks)),
        (INODE_BITMAP, bitmap(LPF_INO, INODES)),
    ];
    for (i, chunk) in (INODE_TABLE..).zip(table.chunks(BLOCK)) {
        if chunk.iter().any(|&b| b != 0) {
            out.push((i, chunk.to_vec()));
        }
    }
    out.push((
        ROOT_BLOCK,
        dir_block(&[(ROOT_INO, "."), (ROOT_INO, ".."), (LPF_INO, "lost+found")]),
    ));
    out.push((LPF_BLOCK, dir_block(&[(LPF_INO, "."), (ROOT_INO, "..")])));
    for i in 1..u32::from(LPF_BLOCKS) {
        out.push((LPF_BLOCK + i, empty_dir_block()));
    }
    out.push((JOURNAL_BLOCK, journal_superblock(o)));
    Ok(out)
}

/// The whole filesystem as a reader (`blocks` × 4 KiB; zeros between the
/// metadata, which a sparse writer skips).
pub fn empty_ext4(o: &Ext4Options) -> io::Result<impl Read> {
    let blocks = blocks(o)?;
    Ok(Ext4Reader {
        blocks,
        next: 0,
        total: o.blocks,
        pos: 0,
        cur: Vec::new(),
    })
}

struct Ext4Reader {
    blocks: Vec<(u32, Vec<u8>)>,
    next: usize,
    total: u32,
    pos: u32,
    cur: Vec<u8>,
}

impl Read for Ext4Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cur.is_empty() {
            if self.pos == self.total {
                return Ok(0);
            }
            self.cur = match self.blocks.get(self.next) {
                Some((n, data)) if *n == self.pos => {
                    self.next += 1;
                    data.clone()
                }
                _ => vec![0u8; BLOCK],
            };
            self.pos += 1;
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur.drain(..n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn opts(blocks: u32) -> Ext4Options {
        Ext4Options {
            blocks,
            uuid: *b"0123456789abcdef",
            hash_seed: [7; 16],
            time: 1_700_000_000,
            label: "kiln-data".into(),
        }
    }

    fn write(path: &std::path::Path, o: &Ext4Options) {
        let mut data = Vec::new();
        empty_ext4(o).unwrap().read_to_end(&mut data).unwrap();
        assert_eq!(data.len(), o.blocks as usize * BLOCK);
        std::fs::write(path, data).unwrap();
    }

    fn fsck(path: &std::path::Path) -> (bool, String) {
        let r = Command::new("e2fsck")
            .arg("-fn")
            .arg(path)
            .output()
            .expect("e2fsck (apt-get install e2fsprogs)");
        (
            r.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            ),
        )
    }

    /// e2fsck finds nothing to fix, dumpe2fs reads what mke2fs would
    /// make, and resize2fs grows it (to several groups, past what one
    /// descriptor block holds needs meta_bg) with e2fsck still clean.
    #[test]
    fn e2fsprogs_accept_and_grow_it() {
        let dir = std::env::temp_dir().join(format!("kiln-ext4-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for blocks in [MIN_BLOCKS, 8192, MAX_BLOCKS] {
            let img = dir.join(format!("fs-{blocks}.img"));
            write(&img, &opts(blocks));
            let (ok, out) = fsck(&img);
            assert!(ok, "e2fsck -fn on {blocks} blocks:\n{out}");
        }
        let img = dir.join("fs-8192.img");
        let d = Command::new("dumpe2fs")
            .arg("-h")
            .arg(&img)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&d.stdout);
        for want in [
            "has_journal ext_attr dir_index filetype meta_bg extent sparse_super large_file huge_file dir_nlink extra_isize",
            "Filesystem volume name:   kiln-data",
            "Block count:              8192",
            "Free blocks:              6647",
            "Free inodes:              8181",
            "Total journal blocks:     1024",
        ] {
            assert!(text.contains(want), "{want}\n{text}");
        }
        let ls = Command::new("debugfs")
            .args(["-R", "ls -l /"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&ls.stdout).contains("lost+found"));
        // Grown to 1 GiB (8 groups) offline, as the kernel grows it online.
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.set_len(1 << 30).unwrap();
        let r = Command::new("resize2fs").arg(&img).output().unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let (ok, out) = fsck(&img);
        assert!(ok, "e2fsck -fn after resize2fs:\n{out}");
        assert!(empty_ext4(&opts(MIN_BLOCKS - 1)).is_err());
        assert!(empty_ext4(&opts(MAX_BLOCKS + 1)).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
