//! Reading files from a FAT12, FAT16 or FAT32 volume (a config drive, as
//! `cloud-localds` or `mkfs.vfat` + `mcopy` make them) without mounting
//! it: the volume label, then files by path, long names included. Only
//! what a config drive needs: small files, bounded reads, every cluster
//! number checked.

use std::io::{self, Read, Seek, SeekFrom};

/// The largest file read (a config drive's are small).
const MAX_FILE: u32 = 1 << 20;
/// The most directory bytes read in one directory.
const MAX_DIR: u64 = 1 << 20;

const ATTR_DIR: u8 = 0x10;
const ATTR_LABEL: u8 = 0x08;
const ATTR_LFN: u8 = 0x0f;

/// Where a volume's root directory is.
enum Root {
    /// FAT12/16: a fixed region, (byte offset, length).
    Fixed(u64, u64),
    /// FAT32: a cluster chain.
    Cluster(u32),
}

/// An opened volume.
pub struct Fat<R> {
    r: R,
    /// 12, 16 or 32.
    bits: u8,
    fat_start: u64,
    data_start: u64,
    cluster_bytes: u64,
    /// Clusters 2 ..= `last_cluster` hold data.
    last_cluster: u32,
    root: Root,
    /// The label (the root's label entry, else the boot sector's), as
    /// written.
    pub label: String,
}

fn u16_le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// One directory entry: its name (long if it has one), first cluster,
/// size, and whether it is a directory.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    name: String,
    cluster: u32,
    size: u32,
    dir: bool,
}

/// The checksum of a short name that its long-name entries carry.
fn short_checksum(name: &[u8]) -> u8 {
    name.iter()
        .fold(0u8, |sum, &c| sum.rotate_right(1).wrapping_add(c))
}

/// The entries of a directory's bytes, and the label if one is there.
fn parse_dir(data: &[u8]) -> (Vec<Entry>, Option<String>) {
    let mut out = Vec::new();
    let mut label = None;
    // Long-name pieces seen before the short entry: (order, checksum, text).
    let mut long: Vec<(u8, u8, Vec<u16>)> = Vec::new();
    for e in data.chunks_exact(32) {
        match e[0] {
            0 => break,
            0xe5 => {
                long.clear();
                continue;
            }
            _ => {}
        }
        let attr = e[11];
        if attr & 0x3f == ATTR_LFN {
            let units = [1..11, 14..26, 28..32]
                .into_iter()
                .flat_map(|r| {
                    e[r].chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                })
                .collect();
            long.push((e[0] & 0x1f, e[13], units));
            continue;
        }
        let pieces = std::mem::take(&mut long);
        if attr & ATTR_LABEL != 0 {
            let text = String::from_utf8_lossy(&e[..11]).trim_end().to_string();
            label.get_or_insert(text);
            continue;
        }
        let short = &e[..11];
        if short[0] == b'.' {
            continue;
        }
        let sum = short_checksum(short);
        let name = if !pieces.is_empty() && pieces.iter().all(|p| p.1 == sum) {
            let mut pieces = pieces;
            pieces.sort_by_key(|p| p.0);
            let units: Vec<u16> = pieces
                .into_iter()
                .flat_map(|p| p.2)
                .take_while(|&u| u != 0)
                .collect();
            String::from_utf16_lossy(&units)
        } else {
            let base = String::from_utf8_lossy(&short[..8]).trim_end().to_string();
            let ext = String::from_utf8_lossy(&short[8..]).trim_end().to_string();
            if ext.is_empty() {
                base
            } else {
                format!("{base}.{ext}")
            }
        };
        out.push(Entry {
            name,
            cluster: (u32::from(u16_le(e, 20)) << 16) | u32::from(u16_le(e, 26)),
            size: u32_le(e, 28),
            dir: attr & ATTR_DIR != 0,
        });
    }
    (out, label)
}

impl<R: Read + Seek> Fat<R> {
    /// Reads the boot sector and the root's label; `None` if this is no
    /// FAT volume.
    pub fn open(mut r: R) -> io::Result<Option<Fat<R>>> {
        let mut b = [0u8; 512];
        r.seek(SeekFrom::Start(0))?;
        if r.read_exact(&mut b).is_err() || b[510..] != [0x55, 0xaa] {
            return Ok(None);
        }
        let sector = u64::from(u16_le(&b, 11));
        let per_cluster = u64::from(b[13]);
        let reserved = u64::from(u16_le(&b, 14));
        let fats = u64::from(b[16]);
        let root_entries = u64::from(u16_le(&b, 17));
        let total = match u16_le(&b, 19) {
            0 => u64::from(u32_le(&b, 32)),
            n => u64::from(n),
        };
        let fat_sectors = match u16_le(&b, 22) {
            0 => u64::from(u32_le(&b, 36)),
            n => u64::from(n),
        };
        if !matches!(sector, 512 | 1024 | 2048 | 4096)
            || !per_cluster.is_power_of_two()
            || reserved == 0
            || fats == 0
            || fat_sectors == 0
        {
            return Ok(None);
        }
        let root_sectors = (root_entries * 32).div_ceil(sector);
        let meta = reserved + fats * fat_sectors + root_sectors;
        let Some(clusters) = total.checked_sub(meta).map(|d| d / per_cluster) else {
            return Ok(None);
        };
        // Microsoft's rule: the cluster count alone decides the type.
        let bits = match clusters {
            0 => return Ok(None),
            1..4085 => 12,
            4085..65525 => 16,
            _ => 32,
        };
        let root = if bits == 32 {
            Root::Cluster(u32_le(&b, 44))
        } else {
            Root::Fixed((reserved + fats * fat_sectors) * sector, root_entries * 32)
        };
        let at = if bits == 32 { 71 } else { 43 };
        let boot_label = if b[at - 5] == 0x29 {
            String::from_utf8_lossy(&b[at..at + 11])
                .trim_end()
                .to_string()
        } else {
            String::new()
        };
        let mut fat = Fat {
            r,
            bits,
            fat_start: reserved * sector,
            data_start: meta * sector,
            cluster_bytes: per_cluster * sector,
            last_cluster: u32::try_from(clusters + 1).map_err(|_| invalid("too many clusters"))?,
            root,
            label: boot_label,
        };
        let (_, label) = fat.root_dir()?;
        if let Some(l) = label {
            fat.label = l;
        }
        Ok(Some(fat))
    }

    /// The FAT's entry for `cluster`: the next one, or `None` at the end
    /// of the chain.
    fn next(&mut self, cluster: u32) -> io::Result<Option<u32>> {
        let c = u64::from(cluster);
        let (at, len) = match self.bits {
            12 => (c + c / 2, 2),
            16 => (c * 2, 2),
            _ => (c * 4, 4),
        };
        let mut b = [0u8; 4];
        self.r.seek(SeekFrom::Start(self.fat_start + at))?;
        self.r.read_exact(&mut b[..len])?;
        let (value, end) = match self.bits {
            12 => {
                let v = u32::from(u16_le(&b, 0));
                (if cluster % 2 == 1 { v >> 4 } else { v & 0xfff }, 0xff8)
            }
            16 => (u32::from(u16_le(&b, 0)), 0xfff8),
            _ => (u32_le(&b, 0) & 0x0fff_ffff, 0x0fff_fff8),
        };
        if value >= end {
            return Ok(None);
        }
        Ok(Some(value))
    }

    /// Up to `max` bytes of the chain from `first` (`len`: exactly this
    /// many, which must fit; `None`: the whole chain).
    fn chain(&mut self, first: u32, len: Option<u64>, max: u64) -> io::Result<Vec<u8>> {
        let want = len.unwrap_or(max);
        if len.is_some_and(|l| l > max) {
            return Err(invalid("too large"));
        }
        let mut out = Vec::new();
        let mut cluster = Some(first);
        while (out.len() as u64) < want {
            let Some(c) = cluster else {
                if len.is_some() {
                    return Err(invalid("cluster chain shorter than the file"));
                }
                break;
            };
            if c < 2 || c > self.last_cluster {
                return Err(invalid("cluster out of range"));
            }
            let take = self.cluster_bytes.min(want - out.len() as u64);
            let mut buf = vec![0u8; usize::try_from(take).map_err(|_| invalid("too large"))?];
            self.r.seek(SeekFrom::Start(
                self.data_start + u64::from(c - 2) * self.cluster_bytes,
            ))?;
            self.r.read_exact(&mut buf)?;
            out.extend_from_slice(&buf);
            cluster = self.next(c)?;
        }
        Ok(out)
    }

    fn root_dir(&mut self) -> io::Result<(Vec<Entry>, Option<String>)> {
        let data = match self.root {
            Root::Fixed(at, len) => {
                let mut buf = vec![0u8; usize::try_from(len.min(MAX_DIR)).unwrap_or(0)];
                self.r.seek(SeekFrom::Start(at))?;
                self.r.read_exact(&mut buf)?;
                buf
            }
            Root::Cluster(c) => self.chain(c, None, MAX_DIR)?,
        };
        Ok(parse_dir(&data))
    }

    /// The file at `path` (`a/b/c`, names compared without case, as FAT
    /// does), if there is one.
    pub fn file(&mut self, path: &str) -> io::Result<Option<Vec<u8>>> {
        let (mut entries, _) = self.root_dir()?;
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for (i, part) in parts.iter().enumerate() {
            let Some(e) = entries
                .into_iter()
                .find(|e| e.name.eq_ignore_ascii_case(part))
            else {
                return Ok(None);
            };
            if i + 1 == parts.len() {
                if e.dir {
                    return Ok(None);
                }
                if e.size > MAX_FILE {
                    return Err(invalid("too large"));
                }
                if e.size == 0 {
                    return Ok(Some(Vec::new()));
                }
                return self
                    .chain(e.cluster, Some(u64::from(e.size)), u64::from(MAX_FILE))
                    .map(Some);
            }
            if !e.dir {
                return Ok(None);
            }
            entries = parse_dir(&self.chain(e.cluster, None, MAX_DIR)?).0;
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A FAT volume made by the standard tools (`mkfs.vfat`, `mcopy`):
    /// `size` KiB, FAT `bits`, with `files` (directories made as needed).
    /// `None` when the tools are missing.
    fn volume(label: &str, bits: u8, size_kib: u32, files: &[(&str, &[u8])]) -> Option<Vec<u8>> {
        let dir =
            std::env::temp_dir().join(format!("kiln-fat-{}-{label}-{bits}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).ok()?;
        let img = dir.join("v.img");
        let ok = Command::new("mkfs.vfat")
            .args(["-C", "-F", &bits.to_string(), "-n", label])
            .arg(&img)
            .arg(size_kib.to_string())
            .output()
            .ok()?
            .status
            .success();
        if !ok {
            return None;
        }
        for (path, data) in files {
            let src = dir.join("src");
            std::fs::write(&src, data).ok()?;
            let parts: Vec<&str> = path.split('/').collect();
            for n in 1..parts.len() {
                let _ = Command::new("mmd")
                    .arg("-i")
                    .arg(&img)
                    .arg(format!("::/{}", parts[..n].join("/")))
                    .output();
            }
            let ok = Command::new("mcopy")
                .arg("-i")
                .arg(&img)
                .arg(&src)
                .arg(format!("::/{path}"))
                .output()
                .ok()?
                .status
                .success();
            assert!(ok, "mcopy {path}");
        }
        let bytes = std::fs::read(&img).ok();
        let _ = std::fs::remove_dir_all(&dir);
        bytes
    }

    #[test]
    fn reads_config_drives_written_by_mkfs_vfat_and_mcopy() {
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        for (bits, kib) in [(12, 1440), (16, 16 * 1024), (32, 40 * 1024)] {
            let Some(img) = volume(
                "cidata",
                bits,
                kib,
                &[
                    ("meta-data", b"local-hostname: box\n"),
                    ("user-data", b"#cloud-config\n"),
                    ("openstack/latest/meta_data.json", b"{}"),
                    ("big.bin", &big),
                    ("empty", b""),
                ],
            ) else {
                eprintln!("skipped: mkfs.vfat or mcopy missing");
                return;
            };
            let mut fat = Fat::open(std::io::Cursor::new(img)).unwrap().unwrap();
            assert_eq!(fat.bits, bits);
            assert_eq!(fat.label.to_ascii_lowercase(), "cidata");
            assert_eq!(
                fat.file("meta-data").unwrap().unwrap(),
                b"local-hostname: box\n"
            );
            assert_eq!(fat.file("USER-DATA").unwrap().unwrap(), b"#cloud-config\n");
            assert_eq!(
                fat.file("openstack/latest/meta_data.json")
                    .unwrap()
                    .unwrap(),
                b"{}"
            );
            // Many clusters, followed through the FAT.
            assert_eq!(fat.file("big.bin").unwrap().unwrap(), big);
            assert_eq!(fat.file("empty").unwrap().unwrap(), b"");
            assert_eq!(fat.file("nothere").unwrap(), None);
            assert_eq!(fat.file("openstack").unwrap(), None);
            assert_eq!(fat.file("meta-data/x").unwrap(), None);
        }
    }

    #[test]
    fn hostile_volumes_are_refused() {
        let Some(img) = volume("config-2", 12, 1440, &[("user_data", b"hello")]) else {
            return;
        };
        assert!(Fat::open(std::io::Cursor::new(vec![0u8; 4096]))
            .unwrap()
            .is_none());
        // A file claiming more than 1 MiB, and one whose first cluster is
        // past the end: errors, not reads.
        let root = {
            let f = Fat::open(std::io::Cursor::new(img.clone()))
                .unwrap()
                .unwrap();
            match f.root {
                Root::Fixed(at, _) => usize::try_from(at).unwrap(),
                Root::Cluster(_) => unreachable!("FAT12"),
            }
        };
        let find = |img: &[u8]| {
            (root..root + 512)
                .step_by(32)
                .find(|&at| {
                    img[at + 11] & 0x3f != ATTR_LFN
                        && img[at + 11] & ATTR_LABEL == 0
                        && img[at] != 0
                })
                .unwrap()
        };
        let mut huge = img.clone();
        let at = find(&huge);
        huge[at + 28..at + 32].copy_from_slice(&(2u32 << 20).to_le_bytes());
        let mut fat = Fat::open(std::io::Cursor::new(huge)).unwrap().unwrap();
        assert!(fat.file("user_data").is_err());
        let mut wild = img;
        wild[at + 26..at + 28].copy_from_slice(&0xff0u16.to_le_bytes());
        let mut fat = Fat::open(std::io::Cursor::new(wild)).unwrap().unwrap();
        assert!(fat.file("user_data").is_err());
    }

    #[test]
    fn long_names_need_their_checksum() {
        // "a.txt" as a long name over a short name whose checksum differs.
        let mut dir = vec![0u8; 96];
        dir[0] = 0x41;
        for (i, c) in "a.txt".encode_utf16().enumerate() {
            dir[1 + i * 2..3 + i * 2].copy_from_slice(&c.to_le_bytes());
        }
        dir[11] = ATTR_LFN;
        dir[13] = short_checksum(b"A       TXT");
        dir[32..43].copy_from_slice(b"A       TXT");
        let (e, _) = parse_dir(&dir);
        assert_eq!(e[0].name, "a.txt");
        dir[13] ^= 1;
        let (e, _) = parse_dir(&dir);
        assert_eq!(e[0].name, "A.TXT");
    }
}
