//! Just enough GPT to read a disk's partitions and rewrite their
//! attribute bits, both copies, over any block device (UEFI's Block I/O,
//! a Linux block device, an image file). 512-byte sectors.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// Bytes per sector.
pub const SECTOR: usize = 512;
const SIGNATURE: &[u8; 8] = b"EFI PART";
const HEADER_SIZE: usize = 92;
/// Entries beyond this are not looked at (kiln writes 128).
const MAX_ENTRIES: u32 = 1024;

/// Sector-addressed storage.
pub trait BlockDev {
    /// The device's error.
    type Error;
    /// Reads whole sectors from `lba` into `buf`.
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
    /// Writes whole sectors at `lba`.
    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), Self::Error>;
    /// Makes what was written durable.
    fn flush(&mut self) -> Result<(), Self::Error>;
    /// The last sector's address.
    fn last_lba(&self) -> u64;
}

/// Why a table cannot be read or written.
#[derive(Debug, PartialEq, Eq)]
pub enum Error<E> {
    /// The device failed.
    Io(E),
    /// Neither header (nor its entries) is valid.
    NoTable,
    /// No partition has that index.
    NoPartition,
}

impl<E: core::fmt::Display> core::fmt::Display for Error<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::NoTable => f.write_str("no valid GPT (neither copy)"),
            Error::NoPartition => f.write_str("no such partition"),
        }
    }
}

/// One used partition entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based, as Linux numbers partitions.
    pub number: u32,
    /// Text order (as written `xxxxxxxx-...`).
    pub type_guid: [u8; 16],
    /// Unique partition GUID, text order.
    pub guid: [u8; 16],
    /// First sector.
    pub first_lba: u64,
    /// Last sector (inclusive).
    pub last_lba: u64,
    /// Attribute bits.
    pub attributes: u64,
    /// GPT name.
    pub name: String,
}

impl Partition {
    /// Bytes the partition spans.
    pub fn len(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR as u64
    }
    /// Whether it spans no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// On-disk (mixed-endian) GUID bytes ↔ text order.
pub fn guid_from_disk(d: &[u8]) -> [u8; 16] {
    let mut g = [0u8; 16];
    g.copy_from_slice(&d[..16]);
    g[..4].reverse();
    g[4..6].reverse();
    g[6..8].reverse();
    g
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// A header's fields that matter here, and its sector as read.
#[derive(Debug, Clone)]
struct Header {
    sector: Vec<u8>,
    my_lba: u64,
    entries_lba: u64,
    count: u32,
    entry_size: u32,
}

impl Header {
    fn parse(sector: &[u8], at: u64) -> Option<Header> {
        if &sector[..8] != SIGNATURE {
            return None;
        }
        let size = u32_at(sector, 12) as usize;
        if !(HEADER_SIZE..=SECTOR).contains(&size) {
            return None;
        }
        let mut h = sector[..size].to_vec();
        h[16..20].fill(0);
        if crc32fast::hash(&h) != u32_at(sector, 16) {
            return None;
        }
        let header = Header {
            sector: sector.to_vec(),
            my_lba: u64_at(sector, 24),
            entries_lba: u64_at(sector, 72),
            count: u32_at(sector, 80),
            entry_size: u32_at(sector, 84),
        };
        let sane = header.my_lba == at
            && header.count > 0
            && header.count <= MAX_ENTRIES
            && header.entry_size >= 128
            && header.entry_size.is_multiple_of(8)
            && header.entry_size <= 1024;
        sane.then_some(header)
    }

    fn entries_len(&self) -> usize {
        (self.count as usize * self.entry_size as usize).next_multiple_of(SECTOR)
    }

    fn entries_crc(&self) -> u32 {
        u32_at(&self.sector, 88)
    }

    /// This header for `entries` (their CRC set, its own CRC redone).
    fn with_entries(&self, entries: &[u8]) -> Vec<u8> {
        let mut s = self.sector.clone();
        let n = self.count as usize * self.entry_size as usize;
        s[88..92].copy_from_slice(&crc32fast::hash(&entries[..n]).to_le_bytes());
        s[16..20].fill(0);
        let size = u32_at(&s, 12) as usize;
        let crc = crc32fast::hash(&s[..size]);
        s[16..20].copy_from_slice(&crc.to_le_bytes());
        s
    }

    /// The other copy's header, made from this one (when that one is
    /// damaged): positions swapped, entries before the backup header.
    fn mirrored(&self, last_lba: u64) -> Header {
        let mut s = self.sector.clone();
        let backup = self.my_lba != 1;
        let (my, alt) = if backup { (1, last_lba) } else { (last_lba, 1) };
        let entries_sectors = (self.entries_len() / SECTOR) as u64;
        let entries_lba = if backup {
            2
        } else {
            last_lba - entries_sectors
        };
        s[24..32].copy_from_slice(&my.to_le_bytes());
        s[32..40].copy_from_slice(&alt.to_le_bytes());
        s[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        Header {
            sector: s,
            my_lba: my,
            entries_lba,
            ..*self
        }
    }
}

/// A disk's partition table, read from whichever copy is intact.
#[derive(Debug, Clone)]
pub struct Table {
    primary: Header,
    backup: Header,
    /// The entry array, whole sectors.
    entries: Vec<u8>,
}

impl Table {
    /// Reads the table, from the backup copy if the primary is damaged.
    pub fn read<D: BlockDev>(dev: &mut D) -> Result<Table, Error<D::Error>> {
        let last = dev.last_lba();
        let primary = read_copy(dev, 1)?;
        let backup = read_copy(dev, last)?;
        match (primary, backup) {
            (Some((p, entries)), Some((b, _))) => Ok(Table {
                primary: p,
                backup: b,
                entries,
            }),
            (Some((p, entries)), None) => Ok(Table {
                backup: p.mirrored(last),
                primary: p,
                entries,
            }),
            (None, Some((b, entries))) => Ok(Table {
                primary: b.mirrored(last),
                backup: b,
                entries,
            }),
            (None, None) => Err(Error::NoTable),
        }
    }

    /// The used entries, in table order.
    pub fn partitions(&self) -> Vec<Partition> {
        let size = self.primary.entry_size as usize;
        (0..self.primary.count)
            .filter_map(|n| {
                let i = n as usize;
                let e = &self.entries[i * size..(i + 1) * size];
                if e[..16].iter().all(|&b| b == 0) {
                    return None;
                }
                let name: Vec<u16> = e[56..128]
                    .chunks(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .take_while(|&c| c != 0)
                    .collect();
                Some(Partition {
                    number: n + 1,
                    type_guid: guid_from_disk(&e[..16]),
                    guid: guid_from_disk(&e[16..32]),
                    first_lba: u64_at(e, 32),
                    last_lba: u64_at(e, 40),
                    attributes: u64_at(e, 48),
                    name: String::from_utf16_lossy(&name),
                })
            })
            .collect()
    }

    /// Sets partition `number`'s attribute bits (in memory; see [`write`]).
    ///
    /// [`write`]: Table::write
    pub fn set_attributes<E>(&mut self, number: u32, attributes: u64) -> Result<(), Error<E>> {
        let i = number.checked_sub(1).ok_or(Error::NoPartition)? as usize;
        if i >= self.primary.count as usize {
            return Err(Error::NoPartition);
        }
        let at = i * self.primary.entry_size as usize + 48;
        self.entries[at..at + 8].copy_from_slice(&attributes.to_le_bytes());
        Ok(())
    }

    /// For a disk grown since the table was written (a cloud disk larger
    /// than its image): moves the backup copy to the device's end and
    /// extends partition `number` to the last usable sector, its end
    /// aligned down to `align` sectors. Its new last sector, if it grew
    /// (in memory; see [`write`]).
    ///
    /// [`write`]: Table::write
    pub fn grow_to_end(&mut self, number: u32, disk_last_lba: u64, align: u64) -> Option<u64> {
        let entries_sectors = (self.primary.entries_len() / SECTOR) as u64;
        let last_usable = disk_last_lba.checked_sub(entries_sectors + 1)?;
        let i = number.checked_sub(1)? as usize;
        if i >= self.primary.count as usize {
            return None;
        }
        let at = i * self.primary.entry_size as usize;
        let entry = &self.entries[at..at + self.primary.entry_size as usize];
        let last = u64_at(entry, 40);
        let align = align.max(1);
        let new_last = ((last_usable + 1) / align * align).checked_sub(1)?;
        // Only ever outwards, past where the backup copy was.
        if new_last <= last || disk_last_lba <= u64_at(&self.primary.sector, 32) {
            return None;
        }
        let p = &mut self.primary.sector;
        p[32..40].copy_from_slice(&disk_last_lba.to_le_bytes());
        p[48..56].copy_from_slice(&last_usable.to_le_bytes());
        self.backup = self.primary.mirrored(disk_last_lba);
        self.entries[at + 40..at + 48].copy_from_slice(&new_last.to_le_bytes());
        Some(new_last)
    }

    /// Writes both copies: the primary's entries and header, then the
    /// backup's. Cut short anywhere, one copy stays whole (old or new),
    /// and a reader takes the other.
    pub fn write<D: BlockDev>(&self, dev: &mut D) -> Result<(), Error<D::Error>> {
        for h in [&self.primary, &self.backup] {
            dev.write(h.entries_lba, &self.entries).map_err(Error::Io)?;
            dev.flush().map_err(Error::Io)?;
            dev.write(h.my_lba, &h.with_entries(&self.entries))
                .map_err(Error::Io)?;
            dev.flush().map_err(Error::Io)?;
        }
        Ok(())
    }
}

/// A header and its entry array.
type Copy = (Header, Vec<u8>);

/// A header at `lba` and its entries, if both are intact.
fn read_copy<D: BlockDev>(dev: &mut D, lba: u64) -> Result<Option<Copy>, Error<D::Error>> {
    let mut sector = vec![0u8; SECTOR];
    dev.read(lba, &mut sector).map_err(Error::Io)?;
    let Some(h) = Header::parse(&sector, lba) else {
        return Ok(None);
    };
    let mut entries = vec![0u8; h.entries_len()];
    dev.read(h.entries_lba, &mut entries).map_err(Error::Io)?;
    let n = h.count as usize * h.entry_size as usize;
    if crc32fast::hash(&entries[..n]) != h.entries_crc() {
        return Ok(None);
    }
    Ok(Some((h, entries)))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    /// A disk image in memory.
    pub struct Mem(pub Vec<u8>);

    impl BlockDev for Mem {
        type Error = &'static str;
        fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
            let at = usize::try_from(lba).map_err(|_| "sector out of range")? * SECTOR;
            let src = self.0.get(at..at + buf.len()).ok_or("read past the end")?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), Self::Error> {
            let at = usize::try_from(lba).map_err(|_| "sector out of range")? * SECTOR;
            let dst = self
                .0
                .get_mut(at..at + buf.len())
                .ok_or("write past the end")?;
            dst.copy_from_slice(buf);
            Ok(())
        }
        fn flush(&mut self) -> Result<(), Self::Error> {
            Ok(())
        }
        fn last_lba(&self) -> u64 {
            (self.0.len() / SECTOR) as u64 - 1
        }
    }

    /// A 4 MiB disk with two partitions, as sgdisk writes it.
    fn sgdisk_disk() -> Option<Vec<u8>> {
        let dir = std::env::temp_dir().join(std::format!("kiln-boot-gpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let img = dir.join("disk.img");
        std::fs::write(&img, vec![0u8; 4 << 20]).ok()?;
        let ok = std::process::Command::new("sgdisk")
            .args([
                "-n1:2048:4095",
                "-c1:esp",
                "-n2:4096:6143",
                "-c2:slot-a",
                "-t2:555c9764-dac5-47ac-ba44-d5ea243fadeb",
                "-A2:set:48",
                "-A2:set:56",
            ])
            .arg(&img)
            .output()
            .ok()?
            .status
            .success();
        let d = std::fs::read(&img).ok();
        let _ = std::fs::remove_dir_all(&dir);
        ok.then_some(d?)
    }

    fn verify(disk: &[u8]) -> std::process::Output {
        let dir = std::env::temp_dir().join(std::format!("kiln-boot-v-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        std::fs::write(&img, disk).unwrap();
        let out = std::process::Command::new("sgdisk")
            .arg("-v")
            .arg(&img)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        out
    }

    #[test]
    fn reads_and_rewrites_what_sgdisk_wrote() {
        let Some(disk) = sgdisk_disk() else {
            panic!("sgdisk is needed (apt-get install gdisk)");
        };
        let mut dev = Mem(disk);
        let mut t = Table::read(&mut dev).unwrap();
        let parts = t.partitions();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].name, "slot-a");
        assert_eq!(parts[1].type_guid, crate::SLOT_TYPE);
        assert_eq!(parts[1].number, 2);
        assert_eq!(parts[1].len(), 2048 * 512);
        let state = crate::SlotState::from_attributes(parts[1].attributes);
        assert_eq!((state.priority, state.successful), (1, true));

        let armed = crate::SlotState {
            priority: 2,
            tries: 3,
            successful: false,
        };
        t.set_attributes::<()>(2, armed.to_attributes(parts[1].attributes))
            .unwrap();
        t.write(&mut dev).unwrap();
        // sgdisk finds both copies valid and agreeing.
        let v = verify(&dev.0);
        let text = std::string::String::from_utf8_lossy(&v.stdout);
        assert!(text.contains("No problems found"), "{text}");
        let again = Table::read(&mut dev).unwrap().partitions();
        assert_eq!(
            crate::SlotState::from_attributes(again[1].attributes),
            armed
        );

        // The primary damaged: read from the backup, and writing heals it.
        dev.0[512 + 30] ^= 0xff;
        let t = Table::read(&mut dev).unwrap();
        assert_eq!(t.partitions(), again);
        t.write(&mut dev).unwrap();
        let text = std::string::String::from_utf8_lossy(&verify(&dev.0).stdout).into_owned();
        assert!(text.contains("No problems found"), "{text}");
        // The backup's entries damaged: the same from the primary.
        let last_entries = dev.0.len() - 33 * 512;
        dev.0[last_entries + 5] ^= 0xff;
        let t = Table::read(&mut dev).unwrap();
        assert_eq!(t.partitions(), again);
        t.write(&mut dev).unwrap();
        let text = std::string::String::from_utf8_lossy(&verify(&dev.0).stdout).into_owned();
        assert!(text.contains("No problems found"), "{text}");
        // The disk grown by 1 MiB: the backup moves to the new end, the
        // last partition grows to it (MiB aligned), sgdisk agrees.
        let old_len = dev.0.len();
        dev.0.resize(old_len + (1 << 20), 0);
        let mut t = Table::read(&mut dev).unwrap();
        let last = dev.last_lba();
        assert_eq!(t.grow_to_end(2, last, 2048), Some(8191));
        assert_eq!(t.grow_to_end(2, last, 2048), None);
        t.write(&mut dev).unwrap();
        let text = std::string::String::from_utf8_lossy(&verify(&dev.0).stdout).into_owned();
        assert!(text.contains("No problems found"), "{text}");
        assert_eq!(
            Table::read(&mut dev).unwrap().partitions()[1].last_lba,
            8191
        );
        // Both gone: no table.
        let mut blank = Mem(vec![0u8; 1 << 20]);
        assert!(matches!(Table::read(&mut blank), Err(Error::NoTable)));
        assert!(matches!(
            Table::read(&mut dev).unwrap().set_attributes::<()>(0, 0),
            Err(Error::NoPartition)
        ));
    }
}
