//! GUID Partition Table: GUIDs, the on-disk structures, and a reader.
//!
//! The reader ([`read_table_at`]) is also kiln-init's, so it takes 512- and
//! 4096-byte logical sectors and only needs a `read_at` closure.
//!
//! Layout written here (512-byte sectors, 128 entries of 128 bytes):
//! LBA 0 protective MBR, LBA 1 primary header, LBA 2..=33 primary entries,
//! ..., LBA N-33..=N-2 backup entries, LBA N-1 backup header.

use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// Bytes per logical sector; kiln only writes 512-byte-sector disks.
pub const SECTOR: u64 = 512;
/// [`SECTOR`] as a buffer length.
// 512 fits every integer type.
#[allow(clippy::cast_possible_truncation)]
const SECTOR_LEN: usize = SECTOR as usize;
/// Number of partition entries in the array.
pub const ENTRY_COUNT: u32 = 128;
/// Size of one partition entry.
pub const ENTRY_SIZE: u32 = 128;
/// Sectors taken by one copy of the entry array (128 * 128 / 512).
pub const ENTRY_SECTORS: u64 = (ENTRY_COUNT as u64 * ENTRY_SIZE as u64) / SECTOR;
/// First LBA a partition may use (MBR + header + entries).
pub const FIRST_USABLE_LBA: u64 = 2 + ENTRY_SECTORS;
/// Sectors reserved at the end of the disk (backup entries + header).
pub const BACKUP_SECTORS: u64 = 1 + ENTRY_SECTORS;
/// Longest partition name in UTF-16 code units.
pub const NAME_UNITS: usize = 36;

const SIGNATURE: &[u8; 8] = b"EFI PART";
const REVISION: u32 = 0x0001_0000;
const HEADER_SIZE: u32 = 92;

/// Errors from GUID parsing and GPT encoding/decoding.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    /// A GUID string is not in the hyphenated 8-4-4-4-12 hex form.
    #[error("invalid GUID `{0}`: expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx")]
    BadGuid(String),
    /// A partition name is longer than the 36 UTF-16 units GPT stores.
    #[error("partition name `{0}` is longer than 36 UTF-16 code units")]
    NameTooLong(String),
    /// More partitions than the 128 entries of the table.
    #[error("too many partitions: {0} (at most 128)")]
    TooManyPartitions(usize),
    /// The disk (in sectors) cannot hold both tables and one usable sector.
    #[error("disk of {0} sectors is too small for a GPT")]
    DiskTooSmall(u64),
    /// Neither the primary nor the backup header is valid; says why.
    #[error("no valid GPT header: {0}")]
    BadHeader(String),
    /// The partition entry array does not match the header's CRC32.
    #[error("partition entry array CRC mismatch")]
    BadEntriesCrc,
    /// Reading the disk failed.
    #[error("reading GPT")]
    Io(#[from] std::io::Error),
}

/// A 128-bit GUID, stored in canonical (string) byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Guid(pub [u8; 16]);

/// EFI System Partition type.
pub const ESP_TYPE: Guid = Guid([
    0xc1, 0x2a, 0x73, 0x28, 0xf8, 0x1f, 0x11, 0xd2, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
]);
/// Discoverable Partitions Specification: Linux root (x86-64).
pub const LINUX_ROOT_X86_64_TYPE: Guid = Guid([
    0x4f, 0x68, 0xbc, 0xe3, 0xe8, 0xcd, 0x4d, 0xb1, 0x96, 0xe7, 0xfb, 0xca, 0xf9, 0x84, 0xb7, 0x09,
]);

impl Guid {
    /// The all-zero GUID (marks an unused partition entry).
    pub const NIL: Guid = Guid([0; 16]);

    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (either case).
    pub fn parse(s: &str) -> Result<Guid, GptError> {
        let bad = || GptError::BadGuid(s.to_string());
        let b = s.as_bytes();
        if b.len() != 36 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        let mut n = 0;
        let mut i = 0;
        while i < 36 {
            if matches!(i, 8 | 13 | 18 | 23) {
                if b[i] != b'-' {
                    return Err(bad());
                }
                i += 1;
                continue;
            }
            let hi = hex(b[i]).ok_or_else(bad)?;
            let lo = hex(b[i + 1]).ok_or_else(bad)?;
            out[n] = hi << 4 | lo;
            n += 1;
            i += 2;
        }
        Ok(Guid(out))
    }

    /// A stable GUID derived from `namespace` and `data`: the first 16
    /// bytes of SHA-256 over both, with RFC 4122 version 4 and variant bits
    /// set (as systemd does for derived ids) so tools accept it. The
    /// namespace is length-prefixed so ("ab","c") and ("a","bc") differ.
    pub fn derive(namespace: &str, data: &[u8]) -> Guid {
        let mut h = Sha256::new();
        h.update((namespace.len() as u64).to_le_bytes());
        h.update(namespace.as_bytes());
        h.update(data);
        let digest = h.finalize();
        let mut g = [0u8; 16];
        g.copy_from_slice(&digest[..16]);
        g[6] = (g[6] & 0x0f) | 0x40;
        g[8] = (g[8] & 0x3f) | 0x80;
        Guid(g)
    }

    /// The GPT on-disk form: the first three fields little-endian.
    pub fn to_gpt_bytes(&self) -> [u8; 16] {
        let mut o = self.0;
        o[0..4].reverse();
        o[4..6].reverse();
        o[6..8].reverse();
        o
    }

    /// Inverse of [`Guid::to_gpt_bytes`].
    pub fn from_gpt_bytes(b: &[u8; 16]) -> Guid {
        // The swap is an involution.
        Guid(Guid(*b).to_gpt_bytes())
    }
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl FromStr for Guid {
    type Err = GptError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Guid::parse(s)
    }
}

/// One partition entry as written to or read from the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionEntry {
    /// Partition type GUID.
    pub type_guid: Guid,
    /// Unique partition GUID.
    pub guid: Guid,
    /// First sector (LBA) of the partition.
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
    /// GPT attribute bits.
    pub attributes: u64,
    /// Partition label.
    pub name: String,
}

/// A used entry found by [`read_partitions`]; `index` is 1-based like
/// `sgdisk` and Linux partition numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// 1-based entry number.
    pub index: u32,
    /// The entry itself.
    pub entry: PartitionEntry,
}

/// The encoded table: what goes at the start and at the end of the disk.
pub struct GptImage {
    /// LBA 0..=33: protective MBR, primary header, primary entries.
    pub head: Vec<u8>,
    /// The last 33 sectors: backup entries then backup header.
    pub tail: Vec<u8>,
}

fn encode_name(name: &str) -> Result<[u8; 72], GptError> {
    let units: Vec<u16> = name.encode_utf16().collect();
    if units.len() > NAME_UNITS {
        return Err(GptError::NameTooLong(name.to_string()));
    }
    let mut out = [0u8; 72];
    for (i, u) in units.iter().enumerate() {
        out[i * 2..i * 2 + 2].copy_from_slice(&u.to_le_bytes());
    }
    Ok(out)
}

fn encode_entries(entries: &[PartitionEntry]) -> Result<Vec<u8>, GptError> {
    if entries.len() > ENTRY_COUNT as usize {
        return Err(GptError::TooManyPartitions(entries.len()));
    }
    let mut out = vec![0u8; (ENTRY_COUNT * ENTRY_SIZE) as usize];
    for (i, e) in entries.iter().enumerate() {
        let b = &mut out[i * ENTRY_SIZE as usize..(i + 1) * ENTRY_SIZE as usize];
        b[0..16].copy_from_slice(&e.type_guid.to_gpt_bytes());
        b[16..32].copy_from_slice(&e.guid.to_gpt_bytes());
        b[32..40].copy_from_slice(&e.first_lba.to_le_bytes());
        b[40..48].copy_from_slice(&e.last_lba.to_le_bytes());
        b[48..56].copy_from_slice(&e.attributes.to_le_bytes());
        b[56..128].copy_from_slice(&encode_name(&e.name)?);
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn encode_header(
    disk_guid: Guid,
    my_lba: u64,
    alternate_lba: u64,
    first_usable: u64,
    last_usable: u64,
    entries_lba: u64,
    entries_crc: u32,
) -> [u8; SECTOR_LEN] {
    let mut h = [0u8; SECTOR_LEN];
    h[0..8].copy_from_slice(SIGNATURE);
    h[8..12].copy_from_slice(&REVISION.to_le_bytes());
    h[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
    // 16..20: header CRC, filled in last; 20..24 reserved.
    h[24..32].copy_from_slice(&my_lba.to_le_bytes());
    h[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
    h[40..48].copy_from_slice(&first_usable.to_le_bytes());
    h[48..56].copy_from_slice(&last_usable.to_le_bytes());
    h[56..72].copy_from_slice(&disk_guid.to_gpt_bytes());
    h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    h[80..84].copy_from_slice(&ENTRY_COUNT.to_le_bytes());
    h[84..88].copy_from_slice(&ENTRY_SIZE.to_le_bytes());
    h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[..HEADER_SIZE as usize]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The protective MBR: one 0xEE partition covering the disk (capped at
/// 2^32-1 sectors as the UEFI spec requires).
pub fn protective_mbr(total_sectors: u64) -> [u8; SECTOR_LEN] {
    let mut m = [0u8; SECTOR_LEN];
    let p = &mut m[446..462];
    p[0] = 0x00; // not bootable
    p[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS of LBA 1
    p[4] = 0xEE;
    p[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
    p[8..12].copy_from_slice(&1u32.to_le_bytes());
    let len = u32::try_from(total_sectors.saturating_sub(1)).unwrap_or(u32::MAX);
    p[12..16].copy_from_slice(&len.to_le_bytes());
    m[510] = 0x55;
    m[511] = 0xAA;
    m
}

/// Last LBA a partition may use on a disk of `total_sectors`.
pub fn last_usable_lba(total_sectors: u64) -> u64 {
    total_sectors.saturating_sub(BACKUP_SECTORS + 1)
}

/// Encodes the full table (MBR, primary and backup GPT) for a disk of
/// `total_sectors` 512-byte sectors. Entries are written in the given order.
pub fn encode(
    disk_guid: Guid,
    total_sectors: u64,
    entries: &[PartitionEntry],
) -> Result<GptImage, GptError> {
    if total_sectors < FIRST_USABLE_LBA + BACKUP_SECTORS + 1 {
        return Err(GptError::DiskTooSmall(total_sectors));
    }
    let array = encode_entries(entries)?;
    let crc = crc32fast::hash(&array);
    let last = total_sectors - 1;
    let first_usable = FIRST_USABLE_LBA;
    let last_usable = last_usable_lba(total_sectors);
    let primary = encode_header(disk_guid, 1, last, first_usable, last_usable, 2, crc);
    let backup_entries_lba = last - ENTRY_SECTORS;
    let backup = encode_header(
        disk_guid,
        last,
        1,
        first_usable,
        last_usable,
        backup_entries_lba,
        crc,
    );
    // 34 and 33 sectors: constants.
    #[allow(clippy::cast_possible_truncation)]
    let mut head = Vec::with_capacity((FIRST_USABLE_LBA * SECTOR) as usize);
    head.extend_from_slice(&protective_mbr(total_sectors));
    head.extend_from_slice(&primary);
    head.extend_from_slice(&array);
    #[allow(clippy::cast_possible_truncation)]
    let mut tail = Vec::with_capacity((BACKUP_SECTORS * SECTOR) as usize);
    tail.extend_from_slice(&array);
    tail.extend_from_slice(&backup);
    Ok(GptImage { head, tail })
}

/// Logical sector sizes the reader tries, in this order.
pub const SECTOR_SIZES: [u64; 2] = [512, 4096];
/// Largest entry array the reader accepts (16384 entries of 128 bytes):
/// bounds what a crafted header can make PID 1 allocate.
const MAX_ENTRIES_BYTES: u64 = 2 << 20;

/// A GPT as read from a disk by [`read_table_at`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// The disk GUID.
    pub disk_guid: Guid,
    /// Logical sector size the table was found with (512 or 4096); the
    /// partitions' LBAs count sectors of this size.
    pub sector_size: u64,
    /// The used entries, in table order.
    pub partitions: Vec<PartitionInfo>,
}

/// A parsed, CRC-checked header.
struct Header {
    disk_guid: Guid,
    entries_lba: u64,
    count: u32,
    entry_size: u32,
    entries_crc: u32,
}

impl Header {
    /// Bytes of the entry array; at most [`MAX_ENTRIES_BYTES`].
    fn entries_len(&self) -> usize {
        self.count as usize * self.entry_size as usize
    }
}

fn parse_header(h: &[u8; SECTOR_LEN], expect_lba: u64) -> Result<Header, String> {
    if &h[0..8] != SIGNATURE {
        return Err("missing `EFI PART` signature".into());
    }
    let size = u32::from_le_bytes(h[12..16].try_into().unwrap_or_default());
    if size < HEADER_SIZE || u64::from(size) > SECTOR {
        return Err(format!("header size {size}"));
    }
    let stored = u32::from_le_bytes(h[16..20].try_into().unwrap_or_default());
    let mut copy = *h;
    copy[16..20].fill(0);
    if crc32fast::hash(&copy[..size as usize]) != stored {
        return Err("header CRC mismatch".into());
    }
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or_default());
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap_or_default());
    // Also what tells 512- from 4096-byte sectors apart when both could fit.
    if u64_at(24) != expect_lba {
        return Err(format!(
            "header at LBA {expect_lba} claims LBA {}",
            u64_at(24)
        ));
    }
    let mut g = [0u8; 16];
    g.copy_from_slice(&h[56..72]);
    let count = u32_at(80);
    let entry_size = u32_at(84);
    if !(128..=4096).contains(&entry_size)
        || entry_size % 8 != 0
        || u64::from(count) * u64::from(entry_size) > MAX_ENTRIES_BYTES
    {
        return Err(format!("entry geometry {count} x {entry_size}"));
    }
    Ok(Header {
        disk_guid: Guid::from_gpt_bytes(&g),
        entries_lba: u64_at(72),
        count,
        entry_size,
        entries_crc: u32_at(88),
    })
}

/// The used entries of a CRC-checked array of `entry_size`-byte entries.
fn parse_entries(array: &[u8], entry_size: u32) -> Vec<PartitionInfo> {
    let mut out = Vec::new();
    for (i, e) in array.chunks_exact(entry_size as usize).enumerate() {
        // Fewer than the header's u32 count.
        #[allow(clippy::cast_possible_truncation)]
        let index = i as u32 + 1;
        let mut t = [0u8; 16];
        t.copy_from_slice(&e[0..16]);
        let type_guid = Guid::from_gpt_bytes(&t);
        if type_guid == Guid::NIL {
            continue;
        }
        let mut u = [0u8; 16];
        u.copy_from_slice(&e[16..32]);
        let u64_at = |o: usize| u64::from_le_bytes(e[o..o + 8].try_into().unwrap_or_default());
        let units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        out.push(PartitionInfo {
            index,
            entry: PartitionEntry {
                type_guid,
                guid: Guid::from_gpt_bytes(&u),
                first_lba: u64_at(32),
                last_lba: u64_at(40),
                attributes: u64_at(48),
                name: String::from_utf16_lossy(&units),
            },
        });
    }
    out
}

/// Why one header copy was not used.
enum Miss {
    /// No signature there (or the disk ends first).
    Absent,
    /// A header, but damaged; says why.
    Bad(String),
    /// A valid header whose entry array fails its CRC.
    EntriesCrc,
    /// Reading failed for another reason than the disk ending.
    Io(std::io::Error),
}

/// The table whose header is at `lba` with `sector`-byte sectors.
fn read_copy<F>(read_at: &mut F, sector: u64, lba: u64) -> Result<Table, Miss>
where
    F: FnMut(u64, &mut [u8]) -> std::io::Result<()>,
{
    let eof_is = |miss: Miss| {
        move |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => miss,
            _ => Miss::Io(e),
        }
    };
    let mut h = [0u8; SECTOR_LEN];
    let at = lba.checked_mul(sector).ok_or(Miss::Absent)?;
    read_at(at, &mut h).map_err(eof_is(Miss::Absent))?;
    if &h[0..8] != SIGNATURE {
        return Err(Miss::Absent);
    }
    let header = parse_header(&h, lba).map_err(Miss::Bad)?;
    let at = header
        .entries_lba
        .checked_mul(sector)
        .ok_or_else(|| Miss::Bad("entry array LBA out of range".into()))?;
    let mut array = vec![0u8; header.entries_len()];
    read_at(at, &mut array).map_err(eof_is(Miss::Bad(
        "entry array past the end of the disk".into(),
    )))?;
    if crc32fast::hash(&array) != header.entries_crc {
        return Err(Miss::EntriesCrc);
    }
    Ok(Table {
        disk_guid: header.disk_guid,
        sector_size: sector,
        partitions: parse_entries(&array, header.entry_size),
    })
}

/// Reads a GPT through `read_at(offset, buf)`, which fills `buf` from byte
/// `offset` of the disk (`UnexpectedEof` past its end). The logical sector
/// size is whichever of [`SECTOR_SIZES`] has a header at LBA 1. Header and
/// entry CRCs are checked; a damaged primary table falls back to the backup
/// at the last LBA, which needs `disk_len` (bytes).
pub fn read_table_at<F>(disk_len: Option<u64>, mut read_at: F) -> Result<Table, GptError>
where
    F: FnMut(u64, &mut [u8]) -> std::io::Result<()>,
{
    let mut bad = Vec::new();
    let mut entries_crc = false;
    for sector in SECTOR_SIZES {
        let backup = disk_len
            .and_then(|l| (l / sector).checked_sub(1))
            .filter(|&b| b > 1);
        for (which, lba) in [("primary", Some(1)), ("backup", backup)] {
            let Some(lba) = lba else { continue };
            match read_copy(&mut read_at, sector, lba) {
                Ok(t) => return Ok(t),
                Err(Miss::Absent) => {}
                Err(Miss::Bad(why)) => bad.push(format!("{which} ({sector}-byte sectors): {why}")),
                Err(Miss::EntriesCrc) => entries_crc = true,
                Err(Miss::Io(e)) => return Err(GptError::Io(e)),
            }
        }
    }
    if entries_crc {
        Err(GptError::BadEntriesCrc)
    } else if bad.is_empty() {
        Err(GptError::BadHeader(
            "no `EFI PART` signature (512- or 4096-byte sectors)".into(),
        ))
    } else {
        Err(GptError::BadHeader(bad.join("; ")))
    }
}

/// Reads the disk GUID and used partition entries: [`read_table_at`] over
/// a seekable reader, whose length lets it use the backup table.
pub fn read_table<R: Read + Seek>(r: &mut R) -> Result<(Guid, Vec<PartitionInfo>), GptError> {
    let len = r.seek(SeekFrom::End(0))?;
    let t = read_table_at(Some(len), |off, buf| {
        r.seek(SeekFrom::Start(off))?;
        r.read_exact(buf)
    })?;
    Ok((t.disk_guid, t.partitions))
}

/// The used partition entries of a GPT disk (see [`read_table`]).
/// For an in-memory image pass `&mut std::io::Cursor::new(bytes)`.
pub fn read_partitions<R: Read + Seek>(r: &mut R) -> Result<Vec<PartitionInfo>, GptError> {
    read_table(r).map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)]
    use super::*;
    use std::io::Cursor;

    #[test]
    fn guid_display_and_parse_round_trip() {
        assert_eq!(ESP_TYPE.to_string(), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(
            Guid::parse("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709").unwrap(),
            LINUX_ROOT_X86_64_TYPE
        );
        let g: Guid = "00112233-4455-6677-8899-aabbccddeeff".parse().unwrap();
        assert_eq!(g.to_string(), "00112233-4455-6677-8899-aabbccddeeff");
    }

    #[test]
    fn guid_parse_rejects_garbage() {
        for s in [
            "",
            "c12a7328f81f11d2ba4b00a0c93ec93b",
            "c12a7328-f81f-11d2-ba4b-00a0c93ec93",
            "c12a7328-f81f-11d2-ba4b-00a0c93ec93bb",
            "c12a7328_f81f-11d2-ba4b-00a0c93ec93b",
            "g12a7328-f81f-11d2-ba4b-00a0c93ec93b",
            "c12a7328-f81f-11d2-ba4b-00a0c93ec9é",
        ] {
            assert!(Guid::parse(s).is_err(), "{s:?} accepted");
        }
    }

    #[test]
    fn gpt_byte_order_is_mixed_endian() {
        // Known on-disk bytes of the ESP type GUID.
        assert_eq!(
            ESP_TYPE.to_gpt_bytes(),
            [
                0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
                0xc9, 0x3b
            ]
        );
        assert_eq!(Guid::from_gpt_bytes(&ESP_TYPE.to_gpt_bytes()), ESP_TYPE);
    }

    #[test]
    fn derive_is_stable_and_versioned() {
        let a = Guid::derive("kiln/disk", b"x");
        assert_eq!(a, Guid::derive("kiln/disk", b"x"));
        assert_ne!(a, Guid::derive("kiln/disk", b"y"));
        assert_ne!(Guid::derive("ab", b"c"), Guid::derive("a", b"bc"));
        let s = a.to_string();
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"));
    }

    #[test]
    fn encode_then_read_back() {
        let total = 8192;
        let entries = vec![
            PartitionEntry {
                type_guid: ESP_TYPE,
                guid: Guid::derive("t", b"1"),
                first_lba: 2048,
                last_lba: 4095,
                attributes: 0,
                name: "esp".into(),
            },
            PartitionEntry {
                type_guid: LINUX_ROOT_X86_64_TYPE,
                guid: Guid::derive("t", b"2"),
                first_lba: 4096,
                last_lba: 6143,
                attributes: 1 << 60,
                name: "root-ä".into(),
            },
        ];
        let img = encode(Guid::derive("t", b"disk"), total, &entries).unwrap();
        let mut disk = vec![0u8; (total * SECTOR) as usize];
        disk[..img.head.len()].copy_from_slice(&img.head);
        let tail_at = disk.len() - img.tail.len();
        disk[tail_at..].copy_from_slice(&img.tail);
        let (g, parts) = read_table(&mut Cursor::new(&disk)).unwrap();
        assert_eq!(g, Guid::derive("t", b"disk"));
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].index, 1);
        assert_eq!(parts[1].entry, entries[1]);

        // Damage the primary header: the backup still answers.
        disk[SECTOR as usize + 30] ^= 0xff;
        let parts2 = read_partitions(&mut Cursor::new(&disk)).unwrap();
        assert_eq!(parts2.len(), 2);
        // Damage the backup too: a typed error, no panic.
        let last = disk.len() - 512;
        disk[last] = 0;
        assert!(matches!(
            read_partitions(&mut Cursor::new(&disk)),
            Err(GptError::BadHeader(_))
        ));
    }

    #[test]
    fn name_too_long_and_small_disk_are_errors() {
        let e = PartitionEntry {
            type_guid: ESP_TYPE,
            guid: Guid::NIL,
            first_lba: 34,
            last_lba: 40,
            attributes: 0,
            name: "x".repeat(37),
        };
        assert!(matches!(
            encode(Guid::NIL, 8192, &[e]),
            Err(GptError::NameTooLong(_))
        ));
        assert!(matches!(
            encode(Guid::NIL, 60, &[]),
            Err(GptError::DiskTooSmall(60))
        ));
    }

    #[test]
    fn reader_rejects_short_or_garbage_input() {
        assert!(read_partitions(&mut Cursor::new(vec![0u8; 100])).is_err());
        assert!(read_partitions(&mut Cursor::new(vec![0u8; 1 << 20])).is_err());
    }

    /// A disk of `total` `sector`-byte sectors with both tables, laid out
    /// like [`encode`] does but for any sector size (the encoder only
    /// writes 512). A [`Guid::NIL`] type leaves its slot unused.
    fn synthetic_disk(sector: u64, total: u64, entries: &[PartitionEntry]) -> Vec<u8> {
        let array = encode_entries(entries).unwrap();
        let crc = crc32fast::hash(&array);
        let array_sectors = array.len() as u64 / sector;
        let last = total - 1;
        let (first_usable, last_usable) = (2 + array_sectors, last - array_sectors - 1);
        let backup_array = last - array_sectors;
        let g = Guid::derive("t", b"disk");
        let primary = encode_header(g, 1, last, first_usable, last_usable, 2, crc);
        let backup = encode_header(g, last, 1, first_usable, last_usable, backup_array, crc);
        let mut disk = vec![0u8; (total * sector) as usize];
        let mut put = |lba: u64, b: &[u8]| {
            let at = (lba * sector) as usize;
            disk[at..at + b.len()].copy_from_slice(b);
        };
        put(0, &protective_mbr(total));
        put(1, &primary);
        put(2, &array);
        put(backup_array, &array);
        put(last, &backup);
        disk
    }

    /// `read_at` over a byte slice, as a block device behaves.
    fn reader(disk: &[u8]) -> impl FnMut(u64, &mut [u8]) -> std::io::Result<()> + '_ {
        move |off, buf| {
            let s = usize::try_from(off).unwrap_or(usize::MAX);
            let src = disk
                .get(s..s.saturating_add(buf.len()))
                .ok_or(std::io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    /// ESP, an unused slot, then a root partition with a known GUID.
    fn three_slots(sector: u64) -> Vec<PartitionEntry> {
        let mib = (1 << 20) / sector;
        vec![
            PartitionEntry {
                type_guid: ESP_TYPE,
                guid: Guid::derive("t", b"1"),
                first_lba: mib,
                last_lba: 2 * mib - 1,
                attributes: 0,
                name: "esp".into(),
            },
            PartitionEntry {
                type_guid: Guid::NIL,
                guid: Guid::NIL,
                first_lba: 0,
                last_lba: 0,
                attributes: 0,
                name: String::new(),
            },
            PartitionEntry {
                type_guid: LINUX_ROOT_X86_64_TYPE,
                guid: Guid::parse(ROOT_GUID).unwrap(),
                first_lba: 2 * mib,
                last_lba: 3 * mib - 1,
                attributes: 1 << 60,
                name: "root".into(),
            },
        ]
    }

    const ROOT_GUID: &str = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";

    #[test]
    fn synthetic_512_disk_is_what_the_encoder_writes() {
        let total = 8192;
        let entries = three_slots(512);
        let img = encode(Guid::derive("t", b"disk"), total, &entries).unwrap();
        let disk = synthetic_disk(512, total, &entries);
        assert_eq!(&disk[..img.head.len()], &img.head[..]);
        assert_eq!(&disk[disk.len() - img.tail.len()..], &img.tail[..]);
    }

    #[test]
    fn reads_512_and_4096_byte_sector_disks() {
        for sector in SECTOR_SIZES {
            let entries = three_slots(sector);
            let total = 4 * (1 << 20) / sector;
            let disk = synthetic_disk(sector, total, &entries);
            for len in [Some(disk.len() as u64), None] {
                let t = read_table_at(len, reader(&disk)).unwrap();
                assert_eq!(t.sector_size, sector);
                assert_eq!(t.disk_guid, Guid::derive("t", b"disk"));
                // The unused second slot is skipped; numbering keeps it.
                let idx: Vec<u32> = t.partitions.iter().map(|p| p.index).collect();
                assert_eq!(idx, [1, 3]);
                assert_eq!(t.partitions[0].entry, entries[0]);
                assert_eq!(t.partitions[1].entry, entries[2]);
                assert_eq!(t.partitions[1].entry.guid.to_string(), ROOT_GUID);
            }
        }
    }

    #[test]
    fn damaged_primary_falls_back_to_backup_at_either_sector_size() {
        for sector in SECTOR_SIZES {
            let total = 4 * (1 << 20) / sector;
            let mut disk = synthetic_disk(sector, total, &three_slots(sector));
            let len = Some(disk.len() as u64);
            // Header CRC: without the disk length there is no backup to use.
            disk[sector as usize + 40] ^= 1;
            let t = read_table_at(len, reader(&disk)).unwrap();
            assert_eq!((t.sector_size, t.partitions.len()), (sector, 2));
            let e = read_table_at(None, reader(&disk)).unwrap_err();
            assert!(
                matches!(&e, GptError::BadHeader(m) if m.contains("header CRC mismatch")),
                "{e}"
            );
            disk[sector as usize + 40] ^= 1;
            // Entry array CRC: likewise.
            disk[2 * sector as usize + 20] ^= 1;
            assert_eq!(
                read_table_at(len, reader(&disk)).unwrap().partitions.len(),
                2
            );
            assert!(matches!(
                read_table_at(None, reader(&disk)),
                Err(GptError::BadEntriesCrc)
            ));
            // Both arrays damaged.
            let backup_array = (total - 1 - 16384 / sector) * sector;
            disk[backup_array as usize + 20] ^= 1;
            assert!(matches!(
                read_table_at(len, reader(&disk)),
                Err(GptError::BadEntriesCrc)
            ));
        }
    }

    #[test]
    fn hostile_headers_are_errors_not_panics() {
        let disk = synthetic_disk(512, 8192, &three_slots(512));
        let len = Some(disk.len() as u64);
        // Any single damaged byte of the primary header: backup or error.
        for i in 0..512 {
            let mut d = disk.clone();
            d[512 + i] ^= 0xa5;
            assert!(read_table_at(len, reader(&d)).is_ok(), "byte {i}");
            let _ = read_table_at(None, reader(&d));
        }
        // A CRC-valid header asking for a huge entry array.
        let mut d = disk.clone();
        d[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
        d[512 + 16..512 + 20].fill(0);
        let crc = crc32fast::hash(&d[512..512 + 92]);
        d[512 + 16..512 + 20].copy_from_slice(&crc.to_le_bytes());
        let e = read_table_at(None, reader(&d)).unwrap_err();
        assert!(
            matches!(&e, GptError::BadHeader(m) if m.contains("geometry")),
            "{e}"
        );
        // Entry array past the end of the disk.
        assert!(read_table_at(None, reader(&disk[..4096])).is_err());
        // Errors other than the disk ending are the caller's to see.
        let failing = |_: u64, _: &mut [u8]| Err(std::io::Error::other("EIO"));
        assert!(matches!(read_table_at(len, failing), Err(GptError::Io(_))));
        assert!(read_table_at(None, reader(&[])).is_err());
    }

    #[test]
    fn reads_what_sgdisk_writes() {
        use std::process::Command;
        if Command::new("sgdisk").arg("--version").output().is_err() {
            eprintln!("note: sgdisk not installed; skipping cross-check");
            return;
        }
        let dir = std::env::temp_dir().join(format!("kiln-gpt-sgdisk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.raw");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let out = Command::new("sgdisk")
            .args(["-n", "1:2048:+1M", "-n", "2:0:0", "-c", "2:root"])
            .arg(format!("-u2:{ROOT_GUID}"))
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let parts = read_partitions(&mut std::fs::File::open(&img).unwrap()).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].index, 2);
        assert_eq!(parts[1].entry.guid.to_string(), ROOT_GUID);
        assert_eq!(parts[1].entry.name, "root");
        assert_eq!(parts[0].entry.first_lba, 2048);
    }
}
