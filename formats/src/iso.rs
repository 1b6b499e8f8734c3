//! A bootable ISO 9660 image: El Torito with one UEFI entry (an ESP image
//! in the ISO), files in a plain ISO 9660 tree (level 2 names), and, on
//! the same bytes, a GPT naming the ESP so the image also boots written
//! to a USB stick (hybrid). Written in one pass: system area (protective
//! MBR and GPT), volume descriptors, path tables, directories, boot
//! catalog, then the ESP and the files streamed from readers, then the
//! backup GPT.

use crate::civil;
use crate::gpt::{self, Guid, PartitionEntry, ESP_TYPE};
use std::io::{self, Read, Write};

/// ISO 9660 sector size.
pub const SECTOR: u64 = 2048;
const SECTOR_BYTES: usize = 2048;
/// Volume descriptors start after the 32 KiB system area.
const FIRST_VD: u64 = 16;

/// Errors from [`write_iso`].
#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    /// A file or directory name ISO 9660 cannot hold.
    #[error("name {0:?} is not an ISO 9660 name (A-Z, 0-9, _ and one '.', at most 30)")]
    BadName(String),
    /// A file of 4 GiB or more (one extent holds less).
    #[error("file {0} is 4 GiB or more")]
    TooLarge(String),
    /// The volume id is not 1 to 32 d-characters.
    #[error("volume id {0:?} is not 1 to 32 of A-Z, 0-9 and _")]
    BadVolumeId(String),
    /// The partition table could not be encoded.
    #[error(transparent)]
    Gpt(#[from] gpt::GptError),
    /// Reading an input or writing the image failed.
    #[error("writing the ISO image")]
    Io(#[from] io::Error),
    /// An input gave fewer or more bytes than its stated length.
    #[error("{0}: not the length it was given")]
    Length(String),
}

/// One file of the image: its path (`KILN/ROOT.IMG`), length and contents.
pub struct IsoFile<'a> {
    /// Upper-case path; one directory level at most.
    pub path: String,
    /// Bytes.
    pub len: u64,
    /// Its contents, exactly `len` bytes.
    pub data: Box<dyn Read + 'a>,
}

/// What the image is made of.
pub struct IsoSpec<'a> {
    /// The volume id (d-characters), how a booted system finds it.
    pub volume_id: String,
    /// Seconds since 1970 for every date.
    pub time: u64,
    /// The GPT's disk GUID and the ESP partition's GUID.
    pub disk_guid: Guid,
    /// See [`IsoSpec::disk_guid`].
    pub esp_guid: Guid,
    /// The EFI system partition image (FAT), `esp_len` bytes.
    pub esp: Box<dyn Read + 'a>,
    /// Its length.
    pub esp_len: u64,
    /// The files, at most one directory deep.
    pub files: Vec<IsoFile<'a>>,
}

fn both16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    b[at + 2..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn both32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    b[at + 4..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn u32_of(v: u64) -> Result<u32, IsoError> {
    u32::try_from(v).map_err(|_| IsoError::Length("image larger than ISO 9660 allows".into()))
}

/// The 7-byte date of a directory record.
fn dir_date(secs: u64) -> [u8; 7] {
    let (y, mo, d, h, mi, s) = civil(secs);
    let b = |v: u32| u8::try_from(v).unwrap_or(0);
    [
        u8::try_from((y - 1900).clamp(0, 255)).unwrap_or(0),
        b(mo),
        b(d),
        b(h),
        b(mi),
        b(s),
        0,
    ]
}

/// The 17-byte date of a volume descriptor.
fn vd_date(secs: u64) -> [u8; 17] {
    let (y, mo, d, h, mi, s) = civil(secs);
    let text = format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}00");
    let mut out = [0u8; 17];
    out[..16].copy_from_slice(&text.as_bytes()[..16]);
    out
}

/// A directory record; `name` raw (`\0` for `.`, `\1` for `..`).
fn dir_record(name: &[u8], extent: u32, len: u32, dir: bool, time: u64) -> Vec<u8> {
    let n = name.len();
    let total = 33 + n + (1 - n % 2);
    let mut r = vec![0u8; total];
    r[0] = u8::try_from(total).unwrap_or(0);
    both32(&mut r, 2, extent);
    both32(&mut r, 10, len);
    r[18..25].copy_from_slice(&dir_date(time));
    r[25] = if dir { 2 } else { 0 };
    both16(&mut r, 28, 1);
    r[32] = u8::try_from(n).unwrap_or(0);
    r[33..33 + n].copy_from_slice(name);
    r
}

fn check_name(name: &str, file: bool) -> Result<(), IsoError> {
    let ok = !name.is_empty()
        && name.len() <= 30
        && name.matches('.').count() <= usize::from(file)
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(IsoError::BadName(name.to_string()))
    }
}

/// A directory's records: `.`, `..`, then `entries` (name, extent, len,
/// is a directory), sorted by name, none crossing a sector.
fn dir_bytes(me: u32, parent: u32, entries: &[(String, u32, u32, bool)], time: u64) -> Vec<u8> {
    let mut out = Vec::new();
    // Every directory here is one sector long.
    let one: u32 = 2048;
    let mut records = vec![
        dir_record(&[0], me, one, true, time),
        dir_record(&[1], parent, one, true, time),
    ];
    let mut sorted: Vec<&(String, u32, u32, bool)> = entries.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, extent, len, dir) in sorted {
        let id = if *dir {
            name.clone()
        } else {
            format!("{name};1")
        };
        records.push(dir_record(id.as_bytes(), *extent, *len, *dir, time));
    }
    for r in records {
        let used = out.len() % SECTOR_BYTES;
        if used + r.len() > SECTOR_BYTES {
            out.resize(out.len() + SECTOR_BYTES - used, 0);
        }
        out.extend_from_slice(&r);
    }
    out
}

fn sectors(len: u64) -> u64 {
    len.div_ceil(SECTOR)
}

/// Copies exactly `len` bytes from `r` to `w`, then zeros to the next
/// sector.
fn copy_padded(name: &str, r: &mut dyn Read, len: u64, w: &mut dyn Write) -> Result<(), IsoError> {
    let copied = io::copy(&mut r.take(len), w)?;
    let mut probe = [0u8; 1];
    if copied != len || r.read(&mut probe)? != 0 {
        return Err(IsoError::Length(name.to_string()));
    }
    let pad = sectors(len) * SECTOR - len;
    w.write_all(&vec![0u8; usize::try_from(pad).unwrap_or(0)])?;
    Ok(())
}

/// Writes the image; returns its length in bytes.
pub fn write_iso(spec: IsoSpec<'_>, out: &mut dyn Write) -> Result<u64, IsoError> {
    let IsoSpec {
        volume_id,
        time,
        disk_guid,
        esp_guid,
        mut esp,
        esp_len,
        files,
    } = spec;
    if volume_id.is_empty()
        || volume_id.len() > 32
        || !volume_id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(IsoError::BadVolumeId(volume_id));
    }
    // Directories: the root and each first-level one, in name order.
    let mut dirs: Vec<String> = Vec::new();
    for f in &files {
        let parts: Vec<&str> = f.path.split('/').collect();
        match parts[..] {
            [name] => check_name(name, true)?,
            [dir, name] => {
                check_name(dir, false)?;
                check_name(name, true)?;
                if !dirs.iter().any(|d| d == dir) {
                    dirs.push(dir.to_string());
                }
            }
            _ => return Err(IsoError::BadName(f.path.clone())),
        }
        if f.len >= 1 << 32 {
            return Err(IsoError::TooLarge(f.path.clone()));
        }
    }
    dirs.sort();

    // Sector plan.
    let pvd = FIRST_VD;
    let boot_vd = pvd + 1;
    let terminator = boot_vd + 1;
    let l_path = terminator + 1;
    let m_path = l_path + 1;
    let root_dir = m_path + 1;
    // Every directory fits one sector here (few entries).
    let dir_at = |i: usize| root_dir + 1 + i as u64;
    let catalog = root_dir + 1 + dirs.len() as u64;
    let esp_at = catalog + 1;
    let mut next = esp_at + sectors(esp_len);
    let mut file_at = Vec::new();
    for f in &files {
        file_at.push(next);
        next += sectors(f.len);
    }
    let volume_sectors = next;
    // The image's end: whole 2048-byte sectors, then the backup GPT's 33
    // 512-byte sectors, rounded to a sector.
    let gpt_tail_512 = gpt::BACKUP_SECTORS;
    let total_bytes = (volume_sectors * SECTOR + gpt_tail_512 * 512).div_ceil(SECTOR) * SECTOR;
    let total_512 = total_bytes / 512;

    // Directory contents.
    let s32 = |v: u64| u32_of(v);
    let mut root_entries = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        root_entries.push((d.clone(), s32(dir_at(i))?, s32(SECTOR)?, true));
    }
    let mut sub: Vec<Vec<(String, u32, u32, bool)>> = vec![Vec::new(); dirs.len()];
    for (f, at) in files.iter().zip(&file_at) {
        let entry = |name: &str| -> Result<_, IsoError> {
            Ok((name.to_string(), s32(*at)?, s32(f.len)?, false))
        };
        match f.path.split_once('/') {
            None => root_entries.push(entry(&f.path)?),
            Some((d, name)) => {
                let i = dirs.iter().position(|x| x == d).unwrap_or(0);
                sub[i].push(entry(name)?);
            }
        }
    }
    let root_bytes = dir_bytes(s32(root_dir)?, s32(root_dir)?, &root_entries, time);
    if root_bytes.len() > SECTOR_BYTES {
        return Err(IsoError::BadName("too many entries in the root".into()));
    }

    // Path tables: the root (1), then the directories under it.
    let path_table = |big: bool| -> Result<Vec<u8>, IsoError> {
        let mut t = Vec::new();
        let mut rec = |name: &[u8], extent: u64, parent: u16| -> Result<(), IsoError> {
            t.push(u8::try_from(name.len()).unwrap_or(0));
            t.push(0);
            let e = s32(extent)?;
            t.extend_from_slice(&if big {
                e.to_be_bytes()
            } else {
                e.to_le_bytes()
            });
            t.extend_from_slice(&if big {
                parent.to_be_bytes()
            } else {
                parent.to_le_bytes()
            });
            t.extend_from_slice(name);
            if name.len() % 2 == 1 {
                t.push(0);
            }
            Ok(())
        };
        rec(&[0], root_dir, 1)?;
        for (i, d) in dirs.iter().enumerate() {
            rec(d.as_bytes(), dir_at(i), 1)?;
        }
        Ok(t)
    };
    let l_table = path_table(false)?;
    let m_table = path_table(true)?;

    // The system area: protective MBR and the GPT (512-byte sectors),
    // naming the ESP inside the ISO.
    let esp_first = esp_at * (SECTOR / 512);
    let table = gpt::encode(
        disk_guid,
        total_512,
        &[PartitionEntry {
            type_guid: ESP_TYPE,
            guid: esp_guid,
            first_lba: esp_first,
            last_lba: esp_first + esp_len.div_ceil(512) - 1,
            attributes: 0,
            name: "esp".into(),
        }],
    )?;
    let mut system = vec![0u8; usize::try_from(FIRST_VD * SECTOR).unwrap_or(0)];
    system[..table.head.len()].copy_from_slice(&table.head);
    out.write_all(&system)?;

    // Primary volume descriptor.
    let mut d = vec![0u8; SECTOR_BYTES];
    d[0] = 1;
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    d[8..40].fill(b' ');
    d[40..72].fill(b' ');
    d[40..40 + volume_id.len()].copy_from_slice(volume_id.as_bytes());
    both32(&mut d, 80, s32(volume_sectors)?);
    both16(&mut d, 120, 1);
    both16(&mut d, 124, 1);
    both16(&mut d, 128, 2048);
    both32(&mut d, 132, s32(l_table.len() as u64)?);
    d[140..144].copy_from_slice(&s32(l_path)?.to_le_bytes());
    d[148..152].copy_from_slice(&s32(m_path)?.to_be_bytes());
    let root_rec = dir_record(&[0], s32(root_dir)?, s32(SECTOR)?, true, time);
    d[156..190].copy_from_slice(&root_rec);
    d[190..813].fill(b' ');
    d[574..578].copy_from_slice(b"KILN");
    let date = vd_date(time);
    d[813..830].copy_from_slice(&date);
    d[830..847].copy_from_slice(&date);
    d[847..864].copy_from_slice(b"0000000000000000\0");
    d[864..881].copy_from_slice(&date);
    d[881] = 1;
    out.write_all(&d)?;

    // El Torito boot record.
    let mut b = vec![0u8; SECTOR_BYTES];
    b[1..6].copy_from_slice(b"CD001");
    b[6] = 1;
    b[7..30].copy_from_slice(b"EL TORITO SPECIFICATION");
    b[71..75].copy_from_slice(&s32(catalog)?.to_le_bytes());
    out.write_all(&b)?;

    // Terminator.
    let mut t = vec![0u8; SECTOR_BYTES];
    t[0] = 255;
    t[1..6].copy_from_slice(b"CD001");
    t[6] = 1;
    out.write_all(&t)?;

    for table in [&l_table, &m_table] {
        let mut s = table.clone();
        s.resize(SECTOR_BYTES, 0);
        out.write_all(&s)?;
    }
    let mut root_sector = root_bytes;
    root_sector.resize(SECTOR_BYTES, 0);
    out.write_all(&root_sector)?;
    for (i, entries) in sub.iter().enumerate() {
        let mut s = dir_bytes(s32(dir_at(i))?, s32(root_dir)?, entries, time);
        if s.len() > SECTOR_BYTES {
            return Err(IsoError::BadName(format!(
                "too many entries in {}",
                dirs[i]
            )));
        }
        s.resize(SECTOR_BYTES, 0);
        out.write_all(&s)?;
    }

    // Boot catalog: a validation entry for EFI, one bootable no-emulation
    // entry. A sector count under 2 tells UEFI firmware the image runs
    // to the end of the volume: a FAT32 ESP is larger than the 16-bit
    // count allows.
    let mut c = vec![0u8; SECTOR_BYTES];
    c[0] = 1;
    c[1] = 0xef;
    c[4..8].copy_from_slice(b"KILN");
    c[30] = 0x55;
    c[31] = 0xaa;
    let sum = c[..32].chunks_exact(2).fold(0u16, |s, w| {
        s.wrapping_add(u16::from_le_bytes([w[0], w[1]]))
    });
    c[28..30].copy_from_slice(&0u16.wrapping_sub(sum).to_le_bytes());
    c[32] = 0x88;
    let count = u16::try_from(esp_len.div_ceil(512)).unwrap_or(1);
    c[38..40].copy_from_slice(&count.to_le_bytes());
    c[40..44].copy_from_slice(&s32(esp_at)?.to_le_bytes());
    out.write_all(&c)?;

    copy_padded("ESP", &mut esp, esp_len, out)?;
    for mut f in files {
        copy_padded(&f.path, &mut f.data, f.len, out)?;
    }
    // Zeros up to the backup GPT at the very end.
    let written = volume_sectors * SECTOR;
    let tail_at = total_bytes - table.tail.len() as u64;
    io::copy(&mut io::repeat(0).take(tail_at - written), out)?;
    out.write_all(&table.tail)?;
    out.flush()?;
    Ok(total_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil(1_700_000_000), (2023, 11, 14, 22, 13, 20));
        assert_eq!(&vd_date(951_782_400)[..16], b"2000022900000000");
    }

    /// xorriso reads the tree, the files and the El Torito entry; the GPT
    /// is valid and names the ESP where the catalog points.
    #[test]
    fn xorriso_reads_it() {
        let dir = std::env::temp_dir().join(format!("kiln-iso-w-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let esp = vec![0xabu8; 3 << 20];
        let root: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let spec = IsoSpec {
            volume_id: "KILN_TEST".into(),
            time: 1_700_000_000,
            disk_guid: Guid::derive("t", b"d"),
            esp_guid: Guid::derive("t", b"e"),
            esp: Box::new(&esp[..]),
            esp_len: esp.len() as u64,
            files: vec![
                IsoFile {
                    path: "KILN/ROOT.IMG".into(),
                    len: root.len() as u64,
                    data: Box::new(&root[..]),
                },
                IsoFile {
                    path: "README.TXT".into(),
                    len: 3,
                    data: Box::new(&b"hi\n"[..]),
                },
            ],
        };
        let path = dir.join("t.iso");
        let mut f = std::fs::File::create(&path).unwrap();
        let len = write_iso(spec, &mut f).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        let x = |args: &[&str]| {
            let o = Command::new("xorriso")
                .arg("-indev")
                .arg(&path)
                .args(args)
                .output()
                .expect("xorriso (scripts/install-deps.sh installs it)");
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        };
        let report = x(&["-report_el_torito", "plain"]);
        assert!(
            report.contains("El Torito boot img :   1  UEFI  y   none"),
            "{report}"
        );
        assert!(report.contains("Volume id    : 'KILN_TEST'"), "{report}");
        let out = dir.join("root.out");
        let got = x(&[
            "-osirrox",
            "on",
            "-extract",
            "/KILN/ROOT.IMG",
            out.to_str().unwrap(),
        ]);
        assert!(out.exists(), "{got}\n{}", x(&["-find", "/"]));
        assert_eq!(std::fs::read(&out).unwrap(), root);
        let sg = Command::new("sgdisk")
            .arg("-v")
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&sg.stdout);
        assert!(text.contains("No problems found"), "{text}");
        let p = Command::new("sgdisk")
            .arg("-i1")
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&p.stdout).to_string();
        // The ESP: where the catalog points (sector 2048-byte N is 512-byte 4N).
        assert!(text.contains("EFI system partition"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
