//! Just enough GPT reading to find a partition by its unique GUID.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum GptError {
    #[error("no GPT header")]
    NoHeader,
    #[error("GPT header checksum mismatch")]
    BadHeaderCrc,
    #[error("GPT header fields out of range")]
    BadHeader,
    #[error("GPT partition entries checksum mismatch")]
    BadEntriesCrc,
}

/// One used partition entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based, as in device names (`vda2` is number 2).
    pub number: u32,
    /// Unique partition GUID, lowercase hyphenated.
    pub guid: String,
    pub first_lba: u64,
    pub last_lba: u64,
}

/// Where the partition entries are, from a validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub entries_lba: u64,
    pub num_entries: u32,
    pub entry_size: u32,
    entries_crc: u32,
}

impl Header {
    /// Bytes of the entry array.
    pub fn entries_len(&self) -> usize {
        self.num_entries as usize * self.entry_size as usize
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// CRC-32 (IEEE, reflected), as GPT uses. Bitwise: tables would cost size.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Parses the header sector (LBA 1).
pub fn parse_header(sector: &[u8]) -> Result<Header, GptError> {
    if sector.len() < 92 || &sector[0..8] != b"EFI PART" {
        return Err(GptError::NoHeader);
    }
    let size = u32_at(sector, 12) as usize;
    if !(92..=sector.len()).contains(&size) {
        return Err(GptError::BadHeader);
    }
    let mut copy = sector[..size].to_vec();
    copy[16..20].fill(0);
    if crc32(&copy) != u32_at(sector, 16) {
        return Err(GptError::BadHeaderCrc);
    }
    let h = Header {
        entries_lba: u64_at(sector, 72),
        num_entries: u32_at(sector, 80),
        entry_size: u32_at(sector, 84),
        entries_crc: u32_at(sector, 88),
    };
    // Bound what we will read: 128-byte multiples, at most 1 MiB of entries.
    if h.entry_size < 128 || h.entry_size & 7 != 0 || h.entries_len() > 1 << 20 {
        return Err(GptError::BadHeader);
    }
    Ok(h)
}

/// Formats a GPT GUID (first three fields little-endian) as text.
pub fn guid_string(b: &[u8]) -> String {
    let mut s = String::with_capacity(36);
    let order = [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15];
    for (i, &idx) in order.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{:02x}", b[idx]));
    }
    s
}

/// Parses the entry array; unused (all-zero type) entries are skipped.
pub fn parse_entries(h: &Header, data: &[u8]) -> Result<Vec<Partition>, GptError> {
    if data.len() < h.entries_len() {
        return Err(GptError::BadHeader);
    }
    let data = &data[..h.entries_len()];
    if crc32(data) != h.entries_crc {
        return Err(GptError::BadEntriesCrc);
    }
    let mut out = Vec::new();
    for (i, e) in data.chunks_exact(h.entry_size as usize).enumerate() {
        // Fewer than h.num_entries entries, a u32.
        #[allow(clippy::cast_possible_truncation)]
        let number = i as u32 + 1;
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        out.push(Partition {
            number,
            guid: guid_string(&e[16..32]),
            first_lba: u64_at(e, 32),
            last_lba: u64_at(e, 40),
        });
    }
    Ok(out)
}

/// Reads a disk's partitions with `read_at(offset, len)`, trying 512- then
/// 4096-byte logical sectors.
pub fn read_partitions(
    read_at: &dyn Fn(u64, usize) -> std::io::Result<Vec<u8>>,
) -> Result<Vec<Partition>, GptError> {
    let mut last = GptError::NoHeader;
    for sector in [512u64, 4096] {
        // 512 or 4096.
        #[allow(clippy::cast_possible_truncation)]
        let len = sector as usize;
        let Ok(hdr) = read_at(sector, len) else {
            continue;
        };
        let h = match parse_header(&hdr) {
            Ok(h) => h,
            Err(e) => {
                if e != GptError::NoHeader {
                    last = e;
                }
                continue;
            }
        };
        let Some(off) = h.entries_lba.checked_mul(sector) else {
            return Err(GptError::BadHeader);
        };
        let Ok(entries) = read_at(off, h.entries_len()) else {
            return Err(GptError::BadHeader);
        };
        return parse_entries(&h, &entries);
    }
    Err(last)
}

#[cfg(test)]
pub mod tests {
    #![allow(clippy::cast_possible_truncation)]
    use super::*;

    /// A synthetic GPT disk image: 34 sectors of header and entries, with
    /// the given (type byte, unique GUID bytes in on-disk order) slots; type 0
    /// leaves the slot unused.
    pub fn synthetic_disk(parts: &[(u8, [u8; 16])]) -> Vec<u8> {
        let mut disk = vec![0u8; 512 * 40];
        let mut entries = vec![0u8; 128 * 128];
        for (i, (ty, guid)) in parts.iter().enumerate() {
            let e = &mut entries[i * 128..(i + 1) * 128];
            if *ty == 0 {
                continue;
            }
            e[0] = *ty;
            e[16..32].copy_from_slice(guid);
            e[32..40].copy_from_slice(&(34u64 + i as u64).to_le_bytes());
            e[40..48].copy_from_slice(&(34u64 + i as u64).to_le_bytes());
        }
        let h = &mut disk[512..1024];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32(&entries).to_le_bytes());
        let c = crc32(&h[..92]);
        h[16..20].copy_from_slice(&c.to_le_bytes());
        disk[1024..1024 + entries.len()].copy_from_slice(&entries);
        disk
    }

    fn reader(disk: &[u8]) -> impl Fn(u64, usize) -> std::io::Result<Vec<u8>> + '_ {
        move |off, len| {
            let s = (off as usize).min(disk.len());
            let e = s.saturating_add(len).min(disk.len());
            Ok(disk[s..e].to_vec())
        }
    }

    // 6ba7b810-9dad-11d1-80b4-00c04fd430c8 in GPT's on-disk byte order.
    pub const GUID_BYTES: [u8; 16] = [
        0x10, 0xb8, 0xa7, 0x6b, 0xad, 0x9d, 0xd1, 0x11, 0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4, 0x30,
        0xc8,
    ];
    pub const GUID_TEXT: &str = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn finds_partitions() {
        // The second slot is unused, so numbering skips it.
        let disk = synthetic_disk(&[(1, [7; 16]), (0, [0; 16]), (1, GUID_BYTES)]);
        let parts = read_partitions(&reader(&disk)).expect("gpt");
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].number, 1);
        assert_eq!(parts[1].number, 3);
        assert_eq!(parts[1].guid, GUID_TEXT);
        assert_eq!(parts[1].first_lba, 36);
    }

    #[test]
    fn rejects_corruption() {
        let mut disk = synthetic_disk(&[(1, GUID_BYTES)]);
        assert!(read_partitions(&reader(&disk)).is_ok());
        disk[1024 + 20] ^= 1;
        assert_eq!(
            read_partitions(&reader(&disk)),
            Err(GptError::BadEntriesCrc)
        );
        disk[512 + 40] ^= 1;
        assert_eq!(read_partitions(&reader(&disk)), Err(GptError::BadHeaderCrc));
        assert_eq!(
            read_partitions(&reader(&[0u8; 8192])),
            Err(GptError::NoHeader)
        );
        assert_eq!(read_partitions(&reader(&[])), Err(GptError::NoHeader));
    }

    #[test]
    fn matches_sgdisk_when_available() {
        use std::process::Command;
        let ok = Command::new("sgdisk").arg("--version").output().is_ok();
        if !ok {
            eprintln!("note: sgdisk not installed; skipping cross-check");
            return;
        }
        let dir = std::env::temp_dir().join(format!("kiln-init-gpt-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let img = dir.join("disk.raw");
        let f = std::fs::File::create(&img).expect("create");
        f.set_len(4 << 20).expect("size");
        drop(f);
        let st = Command::new("sgdisk")
            .args([
                "-n",
                "1:2048:+1M",
                "-n",
                "2:0:0",
                "-u",
                &format!("2:{GUID_TEXT}"),
            ])
            .arg(&img)
            .output()
            .expect("sgdisk");
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let disk = std::fs::read(&img).expect("read");
        let parts = read_partitions(&reader(&disk)).expect("gpt");
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].number, 2);
        assert_eq!(parts[1].guid, GUID_TEXT);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
