//! Reading files from an ISO 9660 image (a config drive) without mounting
//! it: the volume label, then files by path through the Joliet tree (or
//! the plain one, names lower-cased and without `;1`). Only what a config
//! drive needs: small files, no multi-extent, bounded reads.

use std::io::{self, Read, Seek, SeekFrom};

const SECTOR: u64 = 2048;
/// The same, for offsets into a buffer.
const SECTOR_BYTES: usize = 2048;
/// The largest file read (a config drive's are small).
const MAX_FILE: u32 = 1 << 20;
/// Directory records parsed at most in one directory.
const MAX_DIR: u32 = 1 << 20;

/// An opened image: which tree to read, and its label.
pub struct Iso<R> {
    r: R,
    /// Root directory: extent and length.
    root: (u32, u32),
    joliet: bool,
    pub label: String,
}

fn u32_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl<R: Read + Seek> Iso<R> {
    /// Reads the volume descriptors; `None` if this is no ISO 9660 image.
    pub fn open(mut r: R) -> io::Result<Option<Iso<R>>> {
        let mut pvd = None;
        let mut svd = None;
        for n in 16..32u64 {
            let mut d = [0u8; 2048];
            r.seek(SeekFrom::Start(n * SECTOR))?;
            if r.read_exact(&mut d).is_err() || &d[1..6] != b"CD001" {
                return Ok(None);
            }
            match d[0] {
                1 if pvd.is_none() => pvd = Some(d),
                // Joliet: a supplementary descriptor with a UCS-2 escape.
                2 if d[88] == b'%' && d[89] == b'/' && matches!(d[90], b'@' | b'C' | b'E') => {
                    svd = Some(d)
                }
                255 => break,
                _ => {}
            }
        }
        let Some(pvd) = pvd else { return Ok(None) };
        let label = String::from_utf8_lossy(&pvd[40..72]).trim().to_string();
        let (d, joliet) = match &svd {
            Some(s) => (s, true),
            None => (&pvd, false),
        };
        let root = (u32_le(d, 156 + 2), u32_le(d, 156 + 10));
        Ok(Some(Iso {
            r,
            root,
            joliet,
            label,
        }))
    }

    fn read(&mut self, extent: u32, len: u32, max: u32) -> io::Result<Vec<u8>> {
        if len > max {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "too large"));
        }
        let mut buf = vec![0u8; len as usize];
        self.r.seek(SeekFrom::Start(u64::from(extent) * SECTOR))?;
        self.r.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn name(&self, raw: &[u8]) -> String {
        let name = if self.joliet {
            let units: Vec<u16> = raw
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16_lossy(&units)
        } else {
            String::from_utf8_lossy(raw).to_ascii_lowercase()
        };
        let name = name.split(';').next().unwrap_or("").to_string();
        name.strip_suffix('.').map(str::to_string).unwrap_or(name)
    }

    /// The entries of a directory: (name, extent, length, is a directory).
    fn list(&mut self, dir: (u32, u32)) -> io::Result<Vec<(String, u32, u32, bool)>> {
        let data = self.read(dir.0, dir.1, MAX_DIR)?;
        let mut out = Vec::new();
        let mut at = 0usize;
        while at < data.len() {
            let len = usize::from(data[at]);
            if len == 0 {
                // Records never cross a sector: the rest of this one is padding.
                at = (at / SECTOR_BYTES + 1) * SECTOR_BYTES;
                continue;
            }
            let Some(rec) = data.get(at..at + len).filter(|r| r.len() >= 34) else {
                break;
            };
            let name_len = usize::from(rec[32]);
            if let Some(raw) = rec.get(33..33 + name_len) {
                // "\0" and "\1" are the directory itself and its parent.
                if !(name_len == 1 && raw[0] <= 1) {
                    out.push((
                        self.name(raw),
                        u32_le(rec, 2),
                        u32_le(rec, 10),
                        rec[25] & 2 != 0,
                    ));
                }
            }
            at += len;
        }
        Ok(out)
    }

    /// Where the file at `path` is: (byte offset, length), if there is
    /// one. Names compare without case.
    pub fn extent(&mut self, path: &str) -> io::Result<Option<(u64, u64)>> {
        let mut dir = self.root;
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for (i, part) in parts.iter().enumerate() {
            let entries = self.list(dir)?;
            let Some(&(_, extent, len, is_dir)) =
                entries.iter().find(|e| e.0.eq_ignore_ascii_case(part))
            else {
                return Ok(None);
            };
            if i + 1 == parts.len() {
                return Ok((!is_dir).then(|| (u64::from(extent) * SECTOR, u64::from(len))));
            }
            if !is_dir {
                return Ok(None);
            }
            dir = (extent, len);
        }
        Ok(None)
    }

    /// The file at `path` (`a/b/c`), if there is one.
    pub fn file(&mut self, path: &str) -> io::Result<Option<Vec<u8>>> {
        let mut dir = self.root;
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let entries = self.list(dir)?;
            let Some(&(_, extent, len, is_dir)) = entries.iter().find(|e| e.0 == *part) else {
                return Ok(None);
            };
            if last {
                return if is_dir {
                    Ok(None)
                } else {
                    self.read(extent, len, MAX_FILE).map(Some)
                };
            }
            if !is_dir {
                return Ok(None);
            }
            dir = (extent, len);
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Builds an image with xorriso (the standard tool) from `files`.
    fn image(label: &str, joliet: bool, files: &[(&str, &str)]) -> Option<Vec<u8>> {
        let dir =
            std::env::temp_dir().join(format!("kiln-iso-{label}-{joliet}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (p, c) in files {
            let f = dir.join("tree").join(p);
            std::fs::create_dir_all(f.parent()?).ok()?;
            std::fs::write(f, c).ok()?;
        }
        let out = dir.join("x.iso");
        let mut cmd = Command::new("xorriso");
        cmd.args(["-as", "mkisofs", "-quiet", "-V", label]);
        if joliet {
            cmd.args(["-J", "-r"]);
        }
        let ok = cmd
            .arg("-o")
            .arg(&out)
            .arg(dir.join("tree"))
            .status()
            .ok()?
            .success();
        let data = ok.then(|| std::fs::read(&out).ok()).flatten();
        let _ = std::fs::remove_dir_all(&dir);
        data
    }

    #[test]
    fn reads_config_drives_written_by_xorriso() {
        let files = [
            ("meta-data", "local-hostname: a\n"),
            ("user-data", "hello\n"),
            ("openstack/latest/meta_data.json", "{}"),
        ];
        for joliet in [true, false] {
            let Some(img) = image("cidata", joliet, &files) else {
                panic!("xorriso is needed (scripts/install-deps.sh installs it)");
            };
            let mut iso = Iso::open(std::io::Cursor::new(img)).unwrap().unwrap();
            assert_eq!(iso.label, "cidata");
            // Plain ISO 9660 level 1 names are 8.3: only Joliet keeps them.
            if joliet {
                assert_eq!(
                    iso.file("meta-data").unwrap().unwrap(),
                    b"local-hostname: a\n"
                );
                assert_eq!(iso.file("user-data").unwrap().unwrap(), b"hello\n");
                assert_eq!(
                    iso.file("openstack/latest/meta_data.json")
                        .unwrap()
                        .unwrap(),
                    b"{}"
                );
            }
            assert!(iso.file("nope").unwrap().is_none());
            assert!(iso.file("openstack").unwrap().is_none());
        }
        // Not an ISO at all.
        assert!(Iso::open(std::io::Cursor::new(vec![0u8; 40000]))
            .unwrap()
            .is_none());
        assert!(Iso::open(std::io::Cursor::new(vec![0u8; 100]))
            .unwrap()
            .is_none());
    }
}
