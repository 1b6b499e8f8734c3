//! A disk layout as data, its placement, and a streaming raw-disk writer.
//!
//! Partitions start on 1 MiB boundaries in the order given; the GPT is
//! written first and last, partition data streamed in between. Zero runs
//! are skipped with a seek so output files stay sparse.

use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};

use crate::gpt::{self, GptError, Guid, PartitionEntry, SECTOR};

/// Partition alignment.
pub const ALIGN: u64 = 1 << 20;
/// Copy buffer; also the granularity of zero-run detection.
const CHUNK: usize = 64 << 10;

/// Errors from placing or writing a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The disk size is not a whole number of 512-byte sectors.
    #[error("disk size {0} is not a multiple of 512 bytes")]
    UnalignedDiskSize(u64),
    /// A partition was given size 0.
    #[error("partition `{0}` has size 0")]
    EmptyPartition(String),
    /// The partitions (with GPT overhead and alignment) do not fit on the disk.
    #[error("partitions need {need} bytes but the disk is {size} bytes")]
    DoesNotFit {
        /// Bytes the layout needs.
        need: u64,
        /// Disk size in bytes.
        size: u64,
    },
    /// The number of content streams differs from the number of partitions.
    #[error("{partitions} partitions given but {contents} contents")]
    ContentsMismatch {
        /// Number of partitions in the layout.
        partitions: usize,
        /// Number of content streams given.
        contents: usize,
    },
    /// A partition's content stream is longer than the partition.
    #[error("data for partition `{name}` is larger than its {size} bytes")]
    ContentTooLarge {
        /// Partition name.
        name: String,
        /// Partition size in bytes.
        size: u64,
    },
    /// Reading a partition's content stream failed.
    #[error("reading data for partition `{name}`")]
    Read {
        /// Partition name.
        name: String,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// Writing to the disk output failed.
    #[error("writing disk")]
    Write(#[source] std::io::Error),
    /// Encoding the partition table failed.
    #[error(transparent)]
    Gpt(#[from] GptError),
}

/// One partition of a [`Layout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionSpec {
    /// GPT partition label (at most 36 UTF-16 units).
    pub name: String,
    /// GPT partition type GUID.
    pub type_guid: Guid,
    /// Unique partition GUID.
    pub guid: Guid,
    /// Bytes; rounded up to whole sectors.
    pub size: u64,
    /// GPT attribute bits (e.g. bit 0 required, 48–56 boot state).
    pub attributes: u64,
}

/// A whole disk: its GUID, total size in bytes, and partitions in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Disk GUID written to the GPT header.
    pub disk_guid: Guid,
    /// Disk size in bytes (a multiple of 512).
    pub size: u64,
    /// Partitions, in on-disk order.
    pub partitions: Vec<PartitionSpec>,
}

/// Where one partition landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// GPT partition label.
    pub name: String,
    /// First sector (LBA) of the partition.
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
}

impl Placed {
    /// Byte offset of the partition on the disk.
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }
    /// Never true: partitions have at least one sector.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The computed placement of a [`Layout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Disk size in 512-byte sectors.
    pub total_sectors: u64,
    /// Placed partitions, in layout order.
    pub partitions: Vec<Placed>,
}

/// Places partitions in order, each starting on a 1 MiB boundary.
pub fn place(layout: &Layout) -> Result<Placement, DiskError> {
    if !layout.size.is_multiple_of(SECTOR) {
        return Err(DiskError::UnalignedDiskSize(layout.size));
    }
    if layout.partitions.len() > gpt::ENTRY_COUNT as usize {
        return Err(GptError::TooManyPartitions(layout.partitions.len()).into());
    }
    let total_sectors = layout.size / SECTOR;
    let min_disk = (gpt::FIRST_USABLE_LBA + gpt::BACKUP_SECTORS) * SECTOR;
    let mut next = ALIGN; // byte offset of the next partition
    let mut out = Vec::with_capacity(layout.partitions.len());
    for p in &layout.partitions {
        if p.size == 0 {
            return Err(DiskError::EmptyPartition(p.name.clone()));
        }
        let too_big = || DiskError::DoesNotFit {
            need: u64::MAX,
            size: layout.size,
        };
        let start = next.checked_next_multiple_of(ALIGN).ok_or_else(too_big)?;
        let sectors = p.size.div_ceil(SECTOR);
        let end = sectors
            .checked_mul(SECTOR)
            .and_then(|b| b.checked_add(start))
            .ok_or_else(too_big)?;
        out.push(Placed {
            name: p.name.clone(),
            first_lba: start / SECTOR,
            last_lba: end / SECTOR - 1,
        });
        next = end;
    }
    let need = next
        .max(min_disk)
        .saturating_add(gpt::BACKUP_SECTORS * SECTOR);
    if need > layout.size {
        return Err(DiskError::DoesNotFit {
            need,
            size: layout.size,
        });
    }
    Ok(Placement {
        total_sectors,
        partitions: out,
    })
}

/// The GPT entries for a placed layout.
fn entries(layout: &Layout, placement: &Placement) -> Vec<PartitionEntry> {
    layout
        .partitions
        .iter()
        .zip(&placement.partitions)
        .map(|(s, p)| PartitionEntry {
            type_guid: s.type_guid,
            guid: s.guid,
            first_lba: p.first_lba,
            last_lba: p.last_lba,
            attributes: s.attributes,
            name: s.name.clone(),
        })
        .collect()
}

/// Fills `buf` as far as the reader allows; returns bytes read (short only
/// at end of input).
fn fill(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes a raw disk image. `contents` holds one reader per partition, in
/// layout order, each at most its partition's size; shorter data is padded
/// with zeros. `out` must read as zeros wherever nothing is written (a new
/// file or an empty `Cursor`): all-zero chunks are skipped by seeking, so a
/// file output is sparse. The final length is exactly `layout.size`.
pub fn write_raw<W: Write + Seek>(
    layout: &Layout,
    contents: Vec<Box<dyn Read + '_>>,
    mut out: W,
) -> Result<Placement, DiskError> {
    let placement = place(layout)?;
    if contents.len() != layout.partitions.len() {
        return Err(DiskError::ContentsMismatch {
            partitions: layout.partitions.len(),
            contents: contents.len(),
        });
    }
    let table = gpt::encode(
        layout.disk_guid,
        placement.total_sectors,
        &entries(layout, &placement),
    )?;
    let w = DiskError::Write;
    out.seek(SeekFrom::Start(0)).map_err(w)?;
    out.write_all(&table.head).map_err(w)?;

    let mut buf = vec![0u8; CHUNK];
    for (placed, mut src) in placement.partitions.iter().zip(contents) {
        let mut pos = placed.offset();
        let end = pos + placed.len();
        let read_err = |source| DiskError::Read {
            name: placed.name.clone(),
            source,
        };
        loop {
            let n = fill(&mut src, &mut buf).map_err(read_err)?;
            if n == 0 {
                break;
            }
            if pos + n as u64 > end {
                return Err(DiskError::ContentTooLarge {
                    name: placed.name.clone(),
                    size: placed.len(),
                });
            }
            if buf[..n].iter().any(|&b| b != 0) {
                out.seek(SeekFrom::Start(pos)).map_err(w)?;
                out.write_all(&buf[..n]).map_err(w)?;
            }
            pos += n as u64;
            if n < buf.len() {
                break;
            }
        }
        // A reader that ended exactly at the partition end may still hold
        // more: probe one byte so oversize data is never silently cut.
        if pos == end {
            let mut probe = [0u8; 1];
            if fill(&mut src, &mut probe).map_err(read_err)? != 0 {
                return Err(DiskError::ContentTooLarge {
                    name: placed.name.clone(),
                    size: placed.len(),
                });
            }
        }
    }

    let tail_at = layout.size - table.tail.len() as u64;
    out.seek(SeekFrom::Start(tail_at)).map_err(w)?;
    out.write_all(&table.tail).map_err(w)?;
    out.flush().map_err(w)?;
    Ok(placement)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)]
    use super::*;
    use crate::fat::testutil::{noise, run, scratch, tool};
    use crate::gpt::{read_table, ESP_TYPE, LINUX_ROOT_X86_64_TYPE};
    use std::ffi::OsStr;
    use std::io::Cursor;

    const MIB: u64 = 1 << 20;

    fn layout(sizes: &[u64], disk: u64) -> Layout {
        Layout {
            disk_guid: Guid::derive("test/disk", b"d"),
            size: disk,
            partitions: sizes
                .iter()
                .enumerate()
                .map(|(i, &s)| PartitionSpec {
                    name: format!("p{i}"),
                    type_guid: if i == 0 {
                        ESP_TYPE
                    } else {
                        LINUX_ROOT_X86_64_TYPE
                    },
                    guid: Guid::derive("test/part", &[i as u8]),
                    size: s,
                    attributes: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn placement_aligns_to_mib() {
        let p = place(&layout(&[3 * MIB, 1000, 2 * MIB], 16 * MIB)).unwrap();
        assert_eq!(p.partitions[0].first_lba, 2048);
        assert_eq!(p.partitions[0].last_lba, 2048 + 3 * 2048 - 1);
        assert_eq!(p.partitions[1].first_lba, 4 * 2048);
        assert_eq!(p.partitions[1].len(), 1024);
        assert_eq!(p.partitions[2].first_lba, 5 * 2048);
    }

    #[test]
    fn placement_errors() {
        assert!(matches!(
            place(&layout(&[15 * MIB], 16 * MIB)),
            Err(DiskError::DoesNotFit { .. })
        ));
        assert!(matches!(
            place(&layout(&[MIB], 16 * MIB + 1)),
            Err(DiskError::UnalignedDiskSize(_))
        ));
        assert!(matches!(
            place(&layout(&[0], 16 * MIB)),
            Err(DiskError::EmptyPartition(_))
        ));
        assert!(matches!(
            place(&layout(&[u64::MAX - 10], 16 * MIB)),
            Err(DiskError::DoesNotFit { .. })
        ));
        // 1 MiB head + 14 MiB + backup GPT fits in 16 MiB.
        assert!(place(&layout(&[14 * MIB], 16 * MIB)).is_ok());
    }

    #[test]
    fn write_pads_and_rejects_oversize() {
        let l = layout(&[MIB, MIB], 8 * MIB);
        let mut out = Cursor::new(Vec::new());
        let data: Vec<Box<dyn Read>> = vec![
            Box::new(Cursor::new(vec![7u8; 1000])),
            Box::new(Cursor::new(vec![9u8; MIB as usize])),
        ];
        let p = write_raw(&l, data, &mut out).unwrap();
        let disk = out.into_inner();
        assert_eq!(disk.len() as u64, 8 * MIB);
        let off = p.partitions[0].offset() as usize;
        assert_eq!(&disk[off..off + 1000], &[7u8; 1000][..]);
        assert!(disk[off + 1000..off + MIB as usize].iter().all(|&b| b == 0));
        let (g, parts) = read_table(&mut Cursor::new(&disk)).unwrap();
        assert_eq!(g, l.disk_guid);
        assert_eq!(parts[1].entry.guid, l.partitions[1].guid);

        let data: Vec<Box<dyn Read>> = vec![
            Box::new(Cursor::new(vec![1u8; 10])),
            Box::new(Cursor::new(vec![1u8; MIB as usize + 1])),
        ];
        match write_raw(&l, data, Cursor::new(Vec::new())) {
            Err(DiskError::ContentTooLarge { name, .. }) => assert_eq!(name, "p1"),
            other => panic!("{other:?}"),
        }
        let data: Vec<Box<dyn Read>> = vec![Box::new(std::io::empty())];
        assert!(matches!(
            write_raw(&l, data, Cursor::new(Vec::new())),
            Err(DiskError::ContentsMismatch { .. })
        ));
    }

    /// The ESP + root disk used by the tool tests.
    fn sample(esp: &crate::fat::FatImage, root: &[u8]) -> (Layout, Vec<Box<dyn Read + 'static>>) {
        let l = Layout {
            disk_guid: Guid::derive("kiln/test/disk", b"sample"),
            size: 96 * MIB,
            partitions: vec![
                PartitionSpec {
                    name: "esp".into(),
                    type_guid: ESP_TYPE,
                    guid: Guid::derive("kiln/test/part", b"esp"),
                    size: esp.size(),
                    attributes: 0,
                },
                PartitionSpec {
                    name: "root-a".into(),
                    type_guid: LINUX_ROOT_X86_64_TYPE,
                    guid: Guid::derive("kiln/test/part", b"root"),
                    size: 20 * MIB,
                    attributes: (1 << 56) | (15 << 48),
                },
            ],
        };
        let c: Vec<Box<dyn Read>> = vec![
            Box::new(crate::fat::FatImage::reader(esp.clone())),
            Box::new(Cursor::new(root.to_vec())),
        ];
        (l, c)
    }

    fn esp_image() -> crate::fat::FatImage {
        let mut t = crate::tree::Tree::new();
        t.insert(
            std::path::Path::new("/EFI/BOOT/BOOTX64.EFI"),
            crate::tree::Node::file(0o644, noise(5 << 20, 3)),
        )
        .unwrap();
        t.insert(
            std::path::Path::new("/loader/entries/kiln.conf"),
            crate::tree::Node::file(0o644, b"title kiln\n".to_vec()),
        )
        .unwrap();
        crate::fat::plan_fat32(&t, 64 * MIB, 0xE5E5_0001, "ESP").unwrap()
    }

    #[test]
    fn sgdisk_and_fsck_accept_written_disk() {
        let esp = esp_image();
        let root = noise(3 << 20, 9);
        let dir = scratch("disk");
        let path = dir.join("disk.raw");
        let (l, c) = sample(&esp, &root);
        let placed = write_raw(&l, c, std::fs::File::create(&path).unwrap()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), l.size);

        // Same input twice: identical bytes.
        let (l2, c2) = sample(&esp, &root);
        let mut again = Cursor::new(Vec::new());
        write_raw(&l2, c2, &mut again).unwrap();
        let disk = std::fs::read(&path).unwrap();
        assert!(disk == again.into_inner(), "output is not deterministic");

        // Our reader sees the GUIDs and offsets we asked for.
        let parts = gpt::read_partitions(&mut Cursor::new(&disk)).unwrap();
        assert_eq!(parts.len(), 2);
        for (p, (spec, at)) in parts
            .iter()
            .zip(l.partitions.iter().zip(&placed.partitions))
        {
            assert_eq!(p.entry.guid, spec.guid);
            assert_eq!(p.entry.type_guid, spec.type_guid);
            assert_eq!(p.entry.first_lba, at.first_lba);
            assert_eq!(p.entry.name, spec.name);
            assert_eq!(p.entry.attributes, spec.attributes);
        }
        let r = placed.partitions[1].offset() as usize;
        assert_eq!(&disk[r..r + root.len()], &root[..]);

        if let Some(sgdisk) = tool("sgdisk") {
            let (ok, out) = run(&sgdisk, &[OsStr::new("-v"), path.as_os_str()]);
            assert!(ok && out.contains("No problems found"), "sgdisk -v:\n{out}");
            let (ok, out) = run(&sgdisk, &[OsStr::new("-p"), path.as_os_str()]);
            assert!(ok, "{out}");
            let up = l.disk_guid.to_string().to_uppercase();
            assert!(
                out.contains(&format!("Disk identifier (GUID): {up}")),
                "{out}"
            );
            assert!(
                out.contains("   1            2048          133119   64.0 MiB    EF00  esp"),
                "{out}"
            );
            assert!(
                out.contains("   2          133120          174079   20.0 MiB    8304  root-a"),
                "{out}"
            );
            let (ok, out) = run(
                &sgdisk,
                &[OsStr::new("-i"), OsStr::new("2"), path.as_os_str()],
            );
            let g = l.partitions[1].guid.to_string().to_uppercase();
            assert!(
                ok && out.contains(&format!("Partition unique GUID: {g}")),
                "{out}"
            );
        } else {
            eprintln!("note: sgdisk not installed; skipping GPT validation");
        }

        if let Some(fsck) = tool("fsck.fat") {
            let p = &placed.partitions[0];
            let esp_path = dir.join("esp.img");
            let off = p.offset() as usize;
            std::fs::write(&esp_path, &disk[off..off + p.len() as usize]).unwrap();
            let (ok, out) = run(&fsck, &[OsStr::new("-n"), esp_path.as_os_str()]);
            assert!(ok, "fsck.fat on extracted ESP:\n{out}");
        } else {
            eprintln!("note: fsck.fat not installed; skipping ESP validation");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// OVMF under QEMU finds the ESP on our disk and runs systemd-boot from
    /// `EFI/BOOT/BOOTX64.EFI`, which reads our loader entries.
    #[test]
    fn ovmf_boots_bootx64_from_written_disk() {
        let code = std::path::Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd");
        let vars = std::path::Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd");
        let sdboot = std::path::Path::new("/usr/lib/systemd/boot/efi/systemd-bootx64.efi");
        let stub = std::path::Path::new("/usr/lib/systemd/boot/efi/linuxx64.efi.stub");
        let Some(qemu) = tool("qemu-system-x86_64") else {
            eprintln!("note: qemu-system-x86_64 not installed; skipping boot test");
            return;
        };
        if !code.is_file() || !vars.is_file() || !sdboot.is_file() || !stub.is_file() {
            eprintln!("note: OVMF or systemd-boot not installed; skipping boot test");
            return;
        }
        let dir = scratch("boot");
        let mut t = crate::tree::Tree::new();
        let mut put = |p: &str, d: Vec<u8>| {
            t.insert(std::path::Path::new(p), crate::tree::Node::file(0o644, d))
                .unwrap();
        };
        put("/EFI/BOOT/BOOTX64.EFI", std::fs::read(sdboot).unwrap());
        // systemd-boot hides entries whose EFI binary is missing, so point
        // the entry at a real PE (the stub fails later, without a kernel).
        put(
            "/EFI/Linux/kiln-probe-image.efi",
            std::fs::read(stub).unwrap(),
        );
        put("/loader/loader.conf", b"timeout 2\n".to_vec());
        put(
            "/loader/entries/kiln-probe.conf",
            b"title kiln-probe-entry\nefi /EFI/Linux/kiln-probe-image.efi\n".to_vec(),
        );
        let esp = crate::fat::plan_fat32(&t, 64 * MIB, 0xB007_0001, "ESP").unwrap();
        let (l, c) = sample(&esp, b"root");
        let disk = dir.join("disk.raw");
        write_raw(&l, c, std::fs::File::create(&disk).unwrap()).unwrap();
        let vars_copy = dir.join("vars.fd");
        std::fs::copy(vars, &vars_copy).unwrap();

        let pflash = |f: &std::path::Path, ro: bool| {
            format!(
                "if=pflash,format=raw,{}file={}",
                if ro { "readonly=on," } else { "" },
                f.display()
            )
        };
        let mut child = std::process::Command::new(qemu)
            .args([
                "-accel",
                "tcg",
                "-m",
                "256",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args(["-serial", "stdio", "-monitor", "none", "-net", "none"])
            .args([
                "-drive",
                &pflash(code, true),
                "-drive",
                &pflash(&vars_copy, false),
            ])
            .arg("-drive")
            .arg(format!("file={},format=raw", disk.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn qemu");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let mut stdout = child.stdout.take().expect("stdout");
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        // The menu shows the entry's title: systemd-boot ran from our ESP
        // and read a long-named file in a nested directory.
        let marker = "kiln-probe-entry";
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        let found = loop {
            let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
            if text.contains(marker) {
                break true;
            }
            if std::time::Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        };
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
        assert!(
            found,
            "systemd-boot did not start from our ESP; console:\n{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
