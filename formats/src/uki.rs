//! Unified Kernel Images: systemd-stub (a PE32+ EFI application) with the
//! kernel, initrd, command line and os-release appended as extra PE
//! sections that the stub finds by name at boot.
//!
//! Only what appending sections needs is parsed: the DOS header's pointer
//! to the PE signature, the COFF header, the PE32+ optional header and the
//! section table. Existing bytes are kept; new section headers go in the
//! slack after the table, new data after everything already in the file.

use std::collections::HashSet;

/// Errors from building a UKI. None of them panics on a malformed stub.
#[derive(Debug, thiserror::Error)]
pub enum UkiError {
    /// The stub ends inside the named structure.
    #[error("stub is truncated: {0}")]
    Truncated(&'static str),
    /// The stub lacks a PE signature or header; says which.
    #[error("stub is not a PE image: {0}")]
    NotPe(&'static str),
    /// The optional header magic (given) is not PE32+.
    #[error("stub is not PE32+ (optional header magic {0:#06x})")]
    NotPe32Plus(u16),
    /// The COFF machine (given) is not x86-64.
    #[error("stub is not for x86-64 (machine {0:#06x})")]
    NotX86_64(u16),
    /// Section or file alignment is not a power of two, or the file alignment exceeds the section alignment.
    #[error("stub has invalid alignment: section {section:#x}, file {file:#x}")]
    BadAlignment {
        /// Section alignment in bytes.
        section: u32,
        /// File alignment in bytes.
        file: u32,
    },
    /// The section table cannot grow before the first section's data.
    #[error("no room for {count} more section headers: need header space up to {needed:#x}, first section data starts at {available:#x}")]
    NoRoomForHeaders {
        /// Number of section headers to add.
        count: usize,
        /// File offset the headers would need to reach.
        needed: u64,
        /// File offset where section data starts.
        available: u64,
    },
    /// A section name is empty or longer than 8 bytes.
    #[error("section name {0:?} must be 1 to 8 bytes")]
    BadSectionName(String),
    /// A section name is given twice or already exists in the stub.
    #[error("section {0} is given twice or already exists in the stub")]
    DuplicateSection(String),
    /// The image would exceed the 4 GiB size PE allows.
    #[error("image would exceed the 4 GiB PE limit")]
    TooLarge,
    /// A section's contents could not be read in full.
    #[error("reading section {0}")]
    Section(String, #[source] std::io::Error),
    /// Writing the image failed.
    #[error("writing the UKI")]
    Io(#[source] std::io::Error),
}

const MACHINE_AMD64: u16 = 0x8664;
const PE32PLUS_MAGIC: u16 = 0x20b;
const COFF_HEADER_LEN: usize = 20;
const SECTION_HEADER_LEN: usize = 40;
/// PE32+ optional header up to and including NumberOfRvaAndSizes.
const OPT_FIXED_LEN: usize = 112;
const IMAGE_SCN_CNT_INITIALIZED_DATA: u32 = 0x0000_0040;
const IMAGE_SCN_MEM_READ: u32 = 0x4000_0000;
/// Data directory index of the certificate (Authenticode) table.
const DIR_SECURITY: usize = 4;

// Offsets inside the PE32+ optional header.
const OPT_SIZE_OF_INIT_DATA: usize = 8;
const OPT_SECTION_ALIGNMENT: usize = 32;
const OPT_FILE_ALIGNMENT: usize = 36;
const OPT_SIZE_OF_IMAGE: usize = 56;
const OPT_SIZE_OF_HEADERS: usize = 60;
const OPT_CHECKSUM: usize = 64;
const OPT_NUM_RVA_AND_SIZES: usize = 108;
const OPT_DATA_DIRS: usize = 112;

fn rd16(b: &[u8], at: usize, what: &'static str) -> Result<u16, UkiError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(UkiError::Truncated(what))
}

fn rd32(b: &[u8], at: usize, what: &'static str) -> Result<u32, UkiError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(UkiError::Truncated(what))
}

fn wr16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn wr32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// One entry of the section table, as far as layout is concerned.
#[derive(Debug, Clone)]
struct Section {
    name: [u8; 8],
    virtual_size: u32,
    virtual_address: u32,
    raw_size: u32,
    raw_ptr: u32,
}

/// The parts of a PE32+ image that appending sections touches.
#[derive(Debug)]
struct Pe {
    coff: usize,
    opt: usize,
    table: usize,
    section_alignment: u32,
    file_alignment: u32,
    sections: Vec<Section>,
    /// File offset and size of the certificate table, if any.
    cert: Option<(u32, u32)>,
}

fn parse(b: &[u8]) -> Result<Pe, UkiError> {
    if b.len() < 0x40 {
        return Err(UkiError::Truncated("DOS header"));
    }
    if &b[..2] != b"MZ" {
        return Err(UkiError::NotPe("no MZ signature"));
    }
    let pe = rd32(b, 0x3c, "DOS header")? as usize;
    if b.get(pe..pe + 4) != Some(b"PE\0\0".as_slice()) {
        return Err(UkiError::NotPe("no PE signature"));
    }
    let coff = pe + 4;
    let machine = rd16(b, coff, "COFF header")?;
    let nsections = rd16(b, coff + 2, "COFF header")? as usize;
    let opt_len = rd16(b, coff + 16, "COFF header")? as usize;
    let opt = coff + COFF_HEADER_LEN;
    // The magic tells the layout, so check it before the machine: a PE32
    // image gets the more useful error.
    let magic = rd16(b, opt, "optional header")?;
    if magic != PE32PLUS_MAGIC {
        return Err(UkiError::NotPe32Plus(magic));
    }
    if machine != MACHINE_AMD64 {
        return Err(UkiError::NotX86_64(machine));
    }
    if opt_len < OPT_FIXED_LEN || b.len() < opt + opt_len {
        return Err(UkiError::Truncated("optional header"));
    }
    let section_alignment = rd32(b, opt + OPT_SECTION_ALIGNMENT, "optional header")?;
    let file_alignment = rd32(b, opt + OPT_FILE_ALIGNMENT, "optional header")?;
    if !section_alignment.is_power_of_two()
        || !file_alignment.is_power_of_two()
        || file_alignment > section_alignment
    {
        return Err(UkiError::BadAlignment {
            section: section_alignment,
            file: file_alignment,
        });
    }
    let ndirs = rd32(b, opt + OPT_NUM_RVA_AND_SIZES, "optional header")? as usize;
    let cert = if ndirs > DIR_SECURITY && OPT_DATA_DIRS + 8 * (DIR_SECURITY + 1) <= opt_len {
        let at = opt + OPT_DATA_DIRS + 8 * DIR_SECURITY;
        let off = rd32(b, at, "data directory")?;
        let size = rd32(b, at + 4, "data directory")?;
        (size != 0).then_some((off, size))
    } else {
        None
    };
    let table = opt + opt_len;
    let mut sections = Vec::with_capacity(nsections);
    for i in 0..nsections {
        let at = table + i * SECTION_HEADER_LEN;
        let raw = b
            .get(at..at + SECTION_HEADER_LEN)
            .ok_or(UkiError::Truncated("section table"))?;
        let mut name = [0u8; 8];
        name.copy_from_slice(&raw[..8]);
        let s = Section {
            name,
            virtual_size: rd32(raw, 8, "section table")?,
            virtual_address: rd32(raw, 12, "section table")?,
            raw_size: rd32(raw, 16, "section table")?,
            raw_ptr: rd32(raw, 20, "section table")?,
        };
        if s.raw_size != 0 && (s.raw_ptr as u64 + s.raw_size as u64) > b.len() as u64 {
            return Err(UkiError::Truncated("section data"));
        }
        sections.push(s);
    }
    Ok(Pe {
        coff,
        opt,
        table,
        section_alignment,
        file_alignment,
        sections,
        cert,
    })
}

/// Appends `sections` (name, bytes) to the systemd-stub PE image `stub` and
/// returns the whole UKI.
///
/// Sections keep the caller's order except that `.linux` (the kernel
/// bzImage, copied unchanged) goes last, as ukify lays them out. A
/// certificate table in the stub is dropped: appending sections invalidates
/// any signature, so the result must be signed afterwards if needed.
pub fn build_uki(stub: &[u8], sections: &[(&str, &[u8])]) -> Result<Vec<u8>, UkiError> {
    let streams: Vec<UkiSection<'_>> = sections
        .iter()
        .map(|(name, data)| UkiSection::bytes(name, data))
        .collect();
    let mut out = std::io::Cursor::new(Vec::new());
    write_uki(stub, streams, &mut out)?;
    Ok(out.into_inner())
}

/// A section to add: its name, length and contents (exactly `len` bytes).
pub struct UkiSection<'a> {
    /// `.linux`, `.initrd`, ...
    pub name: &'a str,
    /// Bytes.
    pub len: u64,
    /// The contents, read once.
    pub data: Box<dyn std::io::Read + 'a>,
}

impl<'a> UkiSection<'a> {
    /// A section from bytes in memory.
    pub fn bytes(name: &'a str, data: &'a [u8]) -> UkiSection<'a> {
        UkiSection {
            name,
            len: data.len() as u64,
            data: Box::new(data),
        }
    }
}

/// The PE image checksum, fed the file in order (the checksum field as
/// zeros): a 16-bit ones'-complement-style sum plus the file length.
#[derive(Default)]
struct Checksum {
    sum: u64,
    odd: Option<u8>,
    len: u64,
}

impl Checksum {
    fn feed(&mut self, mut b: &[u8]) {
        self.len += b.len() as u64;
        if let (Some(lo), Some((&hi, rest))) = (self.odd, b.split_first()) {
            self.add(u16::from_le_bytes([lo, hi]));
            self.odd = None;
            b = rest;
        }
        let mut words = b.chunks_exact(2);
        for w in &mut words {
            self.add(u16::from_le_bytes([w[0], w[1]]));
        }
        if let [last] = words.remainder() {
            self.odd = Some(*last);
        }
    }

    fn add(&mut self, w: u16) {
        self.sum += u64::from(w);
        self.sum = (self.sum & 0xffff) + (self.sum >> 16);
    }

    // `sum` is folded to 16 bits; the PE checksum adds the file length
    // modulo 2^32 by definition.
    #[allow(clippy::cast_possible_truncation)]
    fn finish(mut self) -> u32 {
        if let Some(lo) = self.odd.take() {
            self.add(u16::from(lo));
        }
        let sum = (self.sum & 0xffff) + (self.sum >> 16);
        (sum as u32).wrapping_add(self.len as u32)
    }
}

/// [`build_uki`] streaming: each section is read once, in order, into
/// `out` (a new, empty file or buffer), and memory holds the stub alone.
pub fn write_uki<W: std::io::Write + std::io::Seek>(
    stub: &[u8],
    sections: Vec<UkiSection<'_>>,
    out: &mut W,
) -> Result<(), UkiError> {
    let pe = parse(stub)?;

    let mut names = HashSet::new();
    for s in &pe.sections {
        names.insert(s.name);
    }
    let mut ordered: Vec<([u8; 8], UkiSection<'_>)> = Vec::with_capacity(sections.len());
    for sec in sections {
        let name = sec.name;
        if name.is_empty() || name.len() > 8 {
            return Err(UkiError::BadSectionName(name.to_owned()));
        }
        let mut n = [0u8; 8];
        n[..name.len()].copy_from_slice(name.as_bytes());
        if !names.insert(n) {
            return Err(UkiError::DuplicateSection(name.to_owned()));
        }
        ordered.push((n, sec));
    }
    // Stable: everything else keeps its order, `.linux` moves to the end.
    ordered.sort_by_key(|(_, sec)| sec.name == ".linux");

    // Drop a trailing signature (its offset is a file offset, not an RVA).
    let mut image = stub.to_vec();
    if let Some((off, size)) = pe.cert {
        if off as u64 + size as u64 == image.len() as u64 {
            image.truncate(off as usize);
        }
        let at = pe.opt + OPT_DATA_DIRS + 8 * DIR_SECURITY;
        wr32(&mut image, at, 0);
        wr32(&mut image, at + 4, 0);
    }

    // Room for the new headers: up to where the first section's data starts.
    let table_end = pe.table + pe.sections.len() * SECTION_HEADER_LEN;
    let needed = (table_end + ordered.len() * SECTION_HEADER_LEN) as u64;
    let first_raw = pe
        .sections
        .iter()
        .filter(|s| s.raw_size != 0)
        .map(|s| s.raw_ptr as u64)
        .min()
        .unwrap_or(image.len() as u64);
    if needed > first_raw {
        return Err(UkiError::NoRoomForHeaders {
            count: ordered.len(),
            needed,
            available: first_raw,
        });
    }
    let needed_end = match usize::try_from(needed) {
        Ok(n) if n <= image.len() => n,
        _ => return Err(UkiError::Truncated("headers")),
    };
    // The slack must be unused: a non-zero byte there is data we would clobber.
    if image[table_end..needed_end].iter().any(|&b| b != 0) {
        return Err(UkiError::NoRoomForHeaders {
            count: ordered.len(),
            needed,
            available: table_end as u64,
        });
    }

    let sa = pe.section_alignment as u64;
    let fa = pe.file_alignment as u64;
    let size_of_image = rd32(&image, pe.opt + OPT_SIZE_OF_IMAGE, "optional header")? as u64;
    let mut next_va = pe
        .sections
        .iter()
        .map(|s| s.virtual_address as u64 + s.virtual_size.max(s.raw_size) as u64)
        .max()
        .unwrap_or(0)
        .max(size_of_image);
    next_va = align_up(next_va, sa);
    let data_end = pe
        .sections
        .iter()
        .map(|s| s.raw_ptr as u64 + s.raw_size as u64)
        .max()
        .unwrap_or(0)
        .max(image.len() as u64);
    let mut next_raw = align_up(data_end, fa);

    let mut headers = Vec::with_capacity(ordered.len() * SECTION_HEADER_LEN);
    let mut added_init = 0u64;
    let mut out_len = next_raw;
    let mut placed = Vec::with_capacity(ordered.len());
    for (name, sec) in &ordered {
        let len = sec.len;
        let raw_size = align_up(len, fa);
        let raw_ptr = if len == 0 { 0 } else { next_raw };
        let mut h = [0u8; SECTION_HEADER_LEN];
        h[..8].copy_from_slice(name);
        let fit = |v: u64| u32::try_from(v).map_err(|_| UkiError::TooLarge);
        wr32(&mut h, 8, fit(len)?);
        wr32(&mut h, 12, fit(next_va)?);
        wr32(&mut h, 16, fit(raw_size)?);
        wr32(&mut h, 20, fit(raw_ptr)?);
        wr32(
            &mut h,
            36,
            IMAGE_SCN_CNT_INITIALIZED_DATA | IMAGE_SCN_MEM_READ,
        );
        headers.extend_from_slice(&h);
        placed.push(raw_ptr);
        added_init += raw_size;
        next_raw += raw_size;
        out_len = out_len.max(next_raw);
        next_va = align_up(next_va + len.max(1), sa);
    }
    let fit = |v: u64| u32::try_from(v).map_err(|_| UkiError::TooLarge);
    let new_size_of_image = fit(next_va)?;
    let out_len = fit(out_len)?;

    image[table_end..needed_end].copy_from_slice(&headers);

    let nsec = u16::try_from(pe.sections.len() + ordered.len()).map_err(|_| UkiError::TooLarge)?;
    wr16(&mut image, pe.coff + 2, nsec);
    wr32(&mut image, pe.opt + OPT_SIZE_OF_IMAGE, new_size_of_image);
    let init = rd32(&image, pe.opt + OPT_SIZE_OF_INIT_DATA, "optional header")? as u64;
    wr32(
        &mut image,
        pe.opt + OPT_SIZE_OF_INIT_DATA,
        fit(init + added_init)?,
    );
    // SizeOfHeaders covers the (possibly grown) table, within the slack.
    let size_of_headers = rd32(&image, pe.opt + OPT_SIZE_OF_HEADERS, "optional header")? as u64;
    if needed > size_of_headers {
        wr32(
            &mut image,
            pe.opt + OPT_SIZE_OF_HEADERS,
            fit(align_up(needed, fa).min(first_raw))?,
        );
    }
    let ck_at = pe.opt + OPT_CHECKSUM;
    wr32(&mut image, ck_at, 0);

    // The stub's bytes, then each section at its place, zero-padded.
    let io = UkiError::Io;
    let mut ck = Checksum::default();
    let put = |out: &mut W, b: &[u8], ck: &mut Checksum| -> Result<(), UkiError> {
        ck.feed(b);
        out.write_all(b).map_err(io)
    };
    put(out, &image, &mut ck)?;
    let mut at = image.len() as u64;
    let mut buf = vec![0u8; 1 << 16];
    let zeros = |n: u64, out: &mut W, ck: &mut Checksum| -> Result<(), UkiError> {
        let z = [0u8; 4096];
        let mut left = n;
        while left > 0 {
            let k = usize::try_from(left).map_or(z.len(), |l| l.min(z.len()));
            ck.feed(&z[..k]);
            out.write_all(&z[..k]).map_err(UkiError::Io)?;
            left -= k as u64;
        }
        Ok(())
    };
    for ((_, mut sec), ptr) in ordered.into_iter().zip(placed) {
        if sec.len == 0 {
            continue;
        }
        zeros(ptr - at, out, &mut ck)?;
        at = ptr;
        let mut left = sec.len;
        while left > 0 {
            let k = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
            sec.data
                .read_exact(&mut buf[..k])
                .map_err(|e| UkiError::Section(sec.name.to_owned(), e))?;
            put(out, &buf[..k], &mut ck)?;
            left -= k as u64;
        }
        at += sec.len;
    }
    zeros(u64::from(out_len) - at, out, &mut ck)?;
    let sum = ck.finish();
    out.seek(std::io::SeekFrom::Start(ck_at as u64))
        .map_err(io)?;
    out.write_all(&sum.to_le_bytes()).map_err(io)?;
    out.seek(std::io::SeekFrom::End(0)).map_err(io)?;
    Ok(())
}

/// Test helpers shared with other modules' boot tests.
#[cfg(test)]
pub(crate) mod testkit {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// Runs `cmd` and returns its stdout, or a message on failure.
    pub(crate) fn run(cmd: &mut Command) -> Result<String, String> {
        let o = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "{cmd:?}: {}\n{}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Spawns `cmd` (QEMU) and collects its stdout until `marker` shows up
    /// or `timeout` passes, then kills it. Returns the console text (CRs
    /// removed) and whether the marker was seen.
    pub(crate) fn console_until(
        cmd: &mut Command,
        marker: &str,
        timeout: std::time::Duration,
    ) -> (String, bool) {
        use std::io::Read;
        use std::process::Stdio;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting qemu-system-x86_64");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let start = std::time::Instant::now();
        let mut console = Vec::new();
        let mut found = false;
        while start.elapsed() < timeout {
            match rx.recv_timeout(std::time::Duration::from_millis(500)) {
                Ok(chunk) => console.extend_from_slice(&chunk),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => break,
            }
            if String::from_utf8_lossy(&console).contains(marker) {
                found = true;
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        (String::from_utf8_lossy(&console).replace('\r', ""), found)
    }

    /// An unpacked Debian cloud kernel package: `$KILN_TEST_KERNEL_ROOT`,
    /// or downloaded with apt into `dir`. The returned directory holds
    /// `vmlinuz` (a link to `boot/vmlinuz-*`) and `lib/modules/*/kernel`.
    pub(crate) fn debian_kernel(dir: &Path) -> Result<PathBuf, String> {
        let root = match std::env::var("KILN_TEST_KERNEL_ROOT") {
            Ok(p) => PathBuf::from(p),
            Err(_) => {
                let deps =
                    run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))?;
                let pkg = deps
                    .lines()
                    .filter_map(|l| l.trim().strip_prefix("Depends: "))
                    .find(|p| p.starts_with("linux-image-"))
                    .ok_or("no kernel package in apt-cache depends")?
                    .to_owned();
                run(Command::new("apt-get")
                    .args(["download", &pkg])
                    .current_dir(dir))?;
                let deb = first_entry(dir, |n| n.ends_with(".deb"))?;
                let root = dir.join("deb");
                run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
                root
            }
        };
        let vmlinuz = first_entry(&root.join("boot"), |n| n.starts_with("vmlinuz-"))?;
        let link = dir.join("kernel");
        let _ = std::fs::remove_dir_all(&link);
        std::fs::create_dir_all(&link).map_err(|e| e.to_string())?;
        std::os::unix::fs::symlink(&vmlinuz, link.join("vmlinuz")).map_err(|e| e.to_string())?;
        std::os::unix::fs::symlink(root.join("lib"), link.join("lib"))
            .map_err(|e| e.to_string())?;
        Ok(link)
    }

    /// The module file `rel` (e.g. `fs/squashfs/squashfs.ko`) of the
    /// kernel unpacked by [`debian_kernel`].
    #[cfg(feature = "squashfs")]
    pub(crate) fn module(kernel: &Path, rel: &str) -> Result<Vec<u8>, String> {
        let modules = first_entry(&kernel.join("lib/modules"), |_| true)?;
        let p = modules.join("kernel").join(rel);
        std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))
    }

    fn first_entry(dir: &Path, want: impl Fn(&str) -> bool) -> Result<PathBuf, String> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| want(&n.to_string_lossy())))
            .collect();
        found.sort();
        found
            .pop()
            .ok_or_else(|| format!("nothing suitable in {}", dir.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

    /// A minimal PE32+ image with one section: enough for layout tests
    /// without the Debian stub.
    fn tiny_pe(machine: u16, magic: u16, first_raw: u32) -> Vec<u8> {
        let mut b = vec![0u8; first_raw as usize + 0x200];
        b[..2].copy_from_slice(b"MZ");
        wr32(&mut b, 0x3c, 0x80);
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        let coff = 0x84;
        wr16(&mut b, coff, machine);
        wr16(&mut b, coff + 2, 1);
        wr16(&mut b, coff + 16, 240);
        let opt = coff + 20;
        wr16(&mut b, opt, magic);
        wr32(&mut b, opt + OPT_SECTION_ALIGNMENT, 0x1000);
        wr32(&mut b, opt + OPT_FILE_ALIGNMENT, 0x200);
        wr32(&mut b, opt + OPT_SIZE_OF_IMAGE, 0x2000);
        wr32(&mut b, opt + OPT_SIZE_OF_HEADERS, first_raw);
        wr32(&mut b, opt + OPT_NUM_RVA_AND_SIZES, 16);
        let table = opt + 240;
        b[table..table + 5].copy_from_slice(b".text");
        wr32(&mut b, table + 8, 0x10);
        wr32(&mut b, table + 12, 0x1000);
        wr32(&mut b, table + 16, 0x200);
        wr32(&mut b, table + 20, first_raw);
        b
    }

    fn section_bytes<'a>(img: &'a [u8], name: &str) -> &'a [u8] {
        let pe = parse(img).unwrap();
        let s = pe
            .sections
            .iter()
            .find(|s| {
                s.name.starts_with(name.as_bytes()) && s.name[name.len()..].iter().all(|&c| c == 0)
            })
            .unwrap_or_else(|| panic!("no section {name}"));
        &img[s.raw_ptr as usize..s.raw_ptr as usize + s.virtual_size as usize]
    }

    #[test]
    fn tiny_pe_gets_sections_appended() {
        let stub = tiny_pe(MACHINE_AMD64, PE32PLUS_MAGIC, 0x400);
        let linux = vec![0xabu8; 5000];
        let out = build_uki(
            &stub,
            &[
                (".linux", &linux),
                (".osrel", b"ID=kiln\n"),
                (".cmdline", b"console=ttyS0"),
            ],
        )
        .unwrap();
        let pe = parse(&out).unwrap();
        let names: Vec<_> = pe.sections.iter().map(|s| s.name).collect();
        assert_eq!(&names[1][..6], b".osrel");
        assert_eq!(&names[2][..8], b".cmdline");
        assert_eq!(&names[3][..6], b".linux");
        assert_eq!(pe.sections[1].virtual_address, 0x2000);
        assert_eq!(pe.sections[2].virtual_address, 0x3000);
        assert_eq!(pe.sections[3].virtual_address, 0x4000);
        assert_eq!(pe.sections[3].raw_size, 5120);
        assert_eq!(
            rd32(&out, pe.opt + OPT_SIZE_OF_IMAGE, "").unwrap(),
            0x4000 + 0x2000
        );
        for s in &pe.sections {
            assert_eq!(s.raw_ptr % 0x200, 0);
        }
        assert_eq!(section_bytes(&out, ".linux"), &linux[..]);
        assert_eq!(section_bytes(&out, ".osrel"), b"ID=kiln\n");
        assert_eq!(out.len() % 0x200, 0);
    }

    #[test]
    fn no_room_for_headers_is_an_error() {
        // Table ends at 0x98 + 240 + 40 = 0x1b0; data starts at 0x1c0:
        // room for no more headers than none.
        let stub = tiny_pe(MACHINE_AMD64, PE32PLUS_MAGIC, 0x1c0);
        assert!(matches!(
            build_uki(&stub, &[(".osrel", b"x")]),
            Err(UkiError::NoRoomForHeaders { .. })
        ));
    }

    /// The checksum the streamed writer stores is the whole file's, as a
    /// plain sum over the finished bytes computes it (odd-length sections
    /// included).
    #[test]
    fn stored_checksum_is_the_files() {
        let stub = tiny_pe(MACHINE_AMD64, PE32PLUS_MAGIC, 0x400);
        let uki = build_uki(
            &stub,
            &[
                (".osrel", b"ID=x\n"),
                (".initrd", &[7u8; 1001]),
                (".linux", b"abc"),
            ],
        )
        .unwrap();
        let pe = parse(&uki).unwrap();
        let at = pe.opt + OPT_CHECKSUM;
        let stored = rd32(&uki, at, "").unwrap();
        let mut sum = 0u64;
        for (i, w) in uki.chunks(2).enumerate() {
            if i * 2 == at || i * 2 == at + 2 {
                continue;
            }
            sum += u64::from(u16::from_le_bytes([w[0], *w.get(1).unwrap_or(&0)]));
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(u64::from(stored), sum + uki.len() as u64);
    }

    #[test]
    fn malformed_stubs_are_errors() {
        assert!(matches!(
            build_uki(&[], &[]),
            Err(UkiError::Truncated("DOS header"))
        ));
        assert!(matches!(
            build_uki(&[0u8; 0x100], &[]),
            Err(UkiError::NotPe(_))
        ));
        assert!(matches!(
            build_uki(&tiny_pe(0x14c, PE32PLUS_MAGIC, 0x400), &[]),
            Err(UkiError::NotX86_64(0x14c))
        ));
        assert!(matches!(
            build_uki(&tiny_pe(MACHINE_AMD64, 0x10b, 0x400), &[]),
            Err(UkiError::NotPe32Plus(0x10b))
        ));
        let good = tiny_pe(MACHINE_AMD64, PE32PLUS_MAGIC, 0x400);
        assert!(matches!(
            build_uki(&good, &[("toolongname", b"")]),
            Err(UkiError::BadSectionName(_))
        ));
        assert!(matches!(
            build_uki(&good, &[(".text", b"")]),
            Err(UkiError::DuplicateSection(_))
        ));
        // Every truncation and many single-byte corruptions: errors or
        // images, never a panic.
        for len in 0..good.len() {
            let _ = build_uki(&good[..len], &[(".osrel", b"x")]);
        }
        for at in 0..0x200 {
            for v in [0x00u8, 0xff, 0x80] {
                let mut bad = good.clone();
                bad[at] = v;
                let _ = build_uki(&bad, &[(".osrel", b"x"), (".linux", b"y")]);
            }
        }
    }

    #[test]
    fn checksum_matches_the_debian_stub() {
        let Ok(stub) = std::fs::read(STUB) else {
            eprintln!("note: {STUB} missing, skipping");
            return;
        };
        let pe = parse(&stub).unwrap();
        let stored = rd32(&stub, pe.opt + OPT_CHECKSUM, "").unwrap();
        if stored != 0 {
            let at = pe.opt + OPT_CHECKSUM;
            let mut zeroed = stub.clone();
            zeroed[at..at + 4].fill(0);
            // Fed in pieces of odd length, as sections may come.
            let mut c = Checksum::default();
            for piece in zeroed.chunks(4097) {
                c.feed(piece);
            }
            assert_eq!(c.finish(), stored);
        }
    }

    #[test]
    fn objdump_lists_sections_of_debian_stub_uki() {
        let Ok(stub) = std::fs::read(STUB) else {
            eprintln!("note: {STUB} missing, skipping");
            return;
        };
        let linux: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let initrd = vec![0x5au8; 70_000];
        let osrel = b"ID=kiln\nVERSION_ID=1\n";
        let cmdline = b"console=ttyS0 panic=-1";
        let out = build_uki(
            &stub,
            &[
                (".osrel", osrel),
                (".cmdline", cmdline),
                (".uname", b"6.1.0-test"),
                (".initrd", &initrd),
                (".linux", &linux),
            ],
        )
        .unwrap();
        for (name, data) in [
            (".osrel", &osrel[..]),
            (".cmdline", &cmdline[..]),
            (".initrd", &initrd[..]),
            (".linux", &linux[..]),
        ] {
            assert_eq!(section_bytes(&out, name), data, "{name}");
        }
        // The stub's own sections are untouched.
        assert_eq!(section_bytes(&out, ".sbat"), section_bytes(&stub, ".sbat"));

        let have = Command::new("objdump").arg("--version").output().is_ok();
        if !have {
            eprintln!("note: objdump not installed, skipping the external check");
            return;
        }
        let dir = std::env::temp_dir().join(format!("kiln-uki-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("uki.efi");
        std::fs::write(&path, &out).unwrap();
        let o = Command::new("objdump")
            .arg("-h")
            .arg(&path)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8(o.stdout).unwrap();
        let mut rows = Vec::new();
        for l in text.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() >= 7 && f[0].parse::<u32>().is_ok() {
                rows.push((
                    f[1].to_owned(),
                    u64::from_str_radix(f[2], 16).unwrap(),
                    u64::from_str_radix(f[3], 16).unwrap(),
                ));
            }
        }
        let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(
            &names[names.len() - 5..],
            &[".osrel", ".cmdline", ".uname", ".initrd", ".linux"]
        );
        let sdmagic = rows.iter().find(|r| r.0 == ".sdmagic").unwrap();
        let osrel = rows.iter().find(|r| r.0 == ".osrel").unwrap();
        assert!(osrel.2 >= sdmagic.2 + sdmagic.1);
        let size = |n: &str| rows.iter().find(|r| r.0 == n).unwrap().1;
        assert_eq!(size(".linux"), linux.len() as u64);
        assert_eq!(size(".initrd"), initrd.len() as u64);
        assert_eq!(size(".cmdline"), cmdline.len() as u64);
        for w in rows.windows(2) {
            assert!(w[1].2 >= w[0].2 + w[0].1, "VMAs overlap: {w:?}");
        }
        let p = Command::new("objdump")
            .arg("-p")
            .arg(&path)
            .output()
            .unwrap();
        let ptext = String::from_utf8_lossy(&p.stdout);
        let line = ptext
            .lines()
            .find(|l| l.starts_with("SizeOfImage"))
            .unwrap();
        let soi = u64::from_str_radix(line.split_whitespace().last().unwrap(), 16).unwrap();
        let last = rows.last().unwrap();
        assert_eq!(soi, align_up(last.2 + last.1, 0x200));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Full boot: Debian kernel + busybox initramfs (our cpio writer) in a
    /// UKI on a FAT ESP, booted by OVMF under TCG; the init prints a marker
    /// on the serial console. Needs the Debian archive (apt-get download)
    /// unless KILN_TEST_KERNEL_ROOT is set, and ~15-30 s of emulation.
    #[test]
    #[ignore = "downloads a Debian kernel and boots QEMU/OVMF (30+ s)"]
    fn uki_boots_under_ovmf() {
        use crate::tree::{DeviceKind, Node, Tree};
        use std::path::Path;
        use std::time::{Duration, Instant};

        const CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
        const VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
        const MARKER: &str = "KILN-UKI-BOOT-OK";
        for need in [STUB, CODE, VARS, "/bin/busybox"] {
            if !Path::new(need).exists() {
                eprintln!("note: {need} missing, skipping the boot test");
                return;
            }
        }
        let dir = std::env::temp_dir().join(format!("kiln-uki-boot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = testkit::debian_kernel(&dir).unwrap();
        let kernel = std::fs::read(kernel.join("vmlinuz")).unwrap();

        let mut t = Tree::new();
        t.insert(
            Path::new("/bin/busybox"),
            Node::file(0o755, std::fs::read("/bin/busybox").unwrap()),
        )
        .unwrap();
        let script =
            format!("#!/bin/busybox sh\n/bin/busybox echo {MARKER}\n/bin/busybox poweroff -f\n");
        t.insert(Path::new("/init"), Node::file(0o755, script))
            .unwrap();
        // Without /dev/console the kernel starts init with no stdout.
        t.insert(
            Path::new("/dev/console"),
            Node::device(DeviceKind::Char, 0o600, 5, 1),
        )
        .unwrap();
        let mut initrd = Vec::new();
        crate::cpio::write_newc(&t, &mut initrd).unwrap();

        let stub = std::fs::read(STUB).unwrap();
        let uki = build_uki(
            &stub,
            &[
                (".osrel", b"ID=kiln\nNAME=kiln\n"),
                (".cmdline", b"console=ttyS0 panic=-1"),
                (".initrd", &initrd),
                (".linux", &kernel),
            ],
        )
        .unwrap();
        let efi = dir.join("uki.efi");
        std::fs::write(&efi, &uki).unwrap();
        let esp = dir.join("esp.img");
        use testkit::run;
        run(Command::new("mkfs.fat").arg("-C").arg(&esp).arg("65536")).unwrap();
        run(Command::new("mmd")
            .arg("-i")
            .arg(&esp)
            .args(["::/EFI", "::/EFI/BOOT"]))
        .unwrap();
        run(Command::new("mcopy")
            .arg("-i")
            .arg(&esp)
            .arg(&efi)
            .arg("::/EFI/BOOT/BOOTX64.EFI"))
        .unwrap();
        let vars = dir.join("vars.fd");
        std::fs::copy(VARS, &vars).unwrap();

        let start = Instant::now();
        let (text, found) = testkit::console_until(
            Command::new("qemu-system-x86_64")
                .args(["-accel", "tcg", "-m", "512", "-nographic", "-no-reboot"])
                .arg("-drive")
                .arg(format!("if=pflash,format=raw,readonly=on,file={CODE}"))
                .arg("-drive")
                .arg(format!("if=pflash,format=raw,file={}", vars.display()))
                .arg("-drive")
                .arg(format!("format=raw,file={}", esp.display())),
            MARKER,
            Duration::from_secs(180),
        );
        assert!(
            found,
            "no marker on the console after {:?}:\n{text}",
            start.elapsed()
        );
        eprintln!("booted to init in {:?}", start.elapsed());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
