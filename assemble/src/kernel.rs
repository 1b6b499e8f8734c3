//! From a kernel package's files to the module set an initramfs ships.
//!
//! Debian's kernel .debs carry no `modules.dep`/`modules.alias`: what the
//! init needs (dependencies, device aliases) is read from each module's
//! ELF `.modinfo` section. Modules are shipped as they are (`.ko.xz` stays
//! compressed: the kernel decompresses on `finit_module`).

use kiln_formats::tree::{Dir, FileData, Node, Tree};
use kiln_init::config::{ModuleIndex, ModuleInfo};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors from finding the kernel and its modules in a kernel tree.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The tree has no `/boot/vmlinuz-*`.
    #[error("no /boot/vmlinuz-* in the kernel package")]
    NoKernel,
    /// The tree has several `/boot/vmlinuz-*`; lists them.
    #[error("several kernels in /boot: {}", .0.join(", "))]
    Ambiguous(Vec<String>),
    /// A module file cannot be decompressed or its `.modinfo` read.
    #[error("module {path}: {message}")]
    Module {
        /// The module file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A module depends on one the kernel package does not ship.
    #[error("module {module} depends on {dependency}, which the kernel package does not ship")]
    MissingDependency {
        /// The module wanted.
        module: String,
        /// The missing dependency.
        dependency: String,
    },
    /// A file of the kernel package cannot be read from the cache.
    #[error("reading {path}")]
    Read {
        /// The file in the package.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A module asked for is neither shipped nor built in.
    #[error("module {0} is neither shipped by the kernel package nor built in")]
    Unknown(String),
}

/// Modules for the virtual and cloud hardware an appliance boots on:
/// QEMU/KVM virtio, NVMe (EC2 Nitro, GCP), ENA, gVNIC, AHCI, Xen,
/// Hyper-V, VMware's and common physical NICs.
pub const HARDWARE_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_pci",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_blk",
    "virtio_net",
    "virtio_scsi",
    "virtio_console",
    "virtio_rng",
    "nvme",
    "nvme_core",
    "ena",
    "ahci",
    "libahci",
    "sd_mod",
    // CD-ROMs, for the ISO form.
    "sr_mod",
    "cdrom",
    "xen_blkfront",
    "xen_netfront",
    "hv_vmbus",
    "hv_storvsc",
    "hv_netvsc",
    // More NICs: Google's gVNIC, VMware's, AWS's older SR-IOV function,
    // and Intel's physical ones (absent from cloud kernels). Azure's
    // Mellanox functions are left out (1 MB): hv_netvsc works alone.
    "gve",
    "vmxnet3",
    "ixgbevf",
    "e1000",
    "e1000e",
    "igb",
    // The ACPI power button, which the init reads through evdev.
    "button",
    "evdev",
];

/// Filesystems a root or overlay may use.
pub const FILESYSTEM_MODULES: &[&str] = &["squashfs", "erofs", "overlay"];

/// Modules loaded whatever the hardware: the root's filesystem, and
/// evdev (a handler with no device alias) for the power button.
pub const ALWAYS_MODULES: &[&str] = &["squashfs", "evdev"];

const SUFFIXES: &[&str] = &[".ko", ".ko.xz", ".ko.zst"];

/// A module file found in the package.
#[derive(Debug, Clone)]
struct ModuleFile {
    /// Path below `modules/RELEASE/`, e.g. `kernel/fs/squashfs/squashfs.ko.xz`.
    rel: String,
    data: FileData,
}

/// The `.modinfo` facts the init needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    /// Module name from `name=`, if present.
    pub name: Option<String>,
    /// Module names from `depends=`.
    pub depends: Vec<String>,
    /// Glob patterns from `alias=`.
    pub aliases: Vec<String>,
}

/// A kernel image and its loadable modules.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `uname -r`, from the `vmlinuz-RELEASE` file name.
    pub release: String,
    /// The bzImage (an EFI stub on Debian).
    pub image: Arc<Vec<u8>>,
    /// Normalised module name → file.
    modules: BTreeMap<String, ModuleFile>,
    /// Built-in modules, when the package ships `modules.builtin`.
    builtin: Option<BTreeSet<String>>,
}

/// A package file's bytes.
fn read<'a>(path: &str, data: &'a FileData) -> Result<std::borrow::Cow<'a, [u8]>, KernelError> {
    data.bytes().map_err(|source| KernelError::Read {
        path: path.to_string(),
        source,
    })
}

/// Module names use `_` and `-` interchangeably; the kernel uses `_`.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// `squashfs.ko.xz` → `squashfs`.
fn module_stem(file: &str) -> Option<&str> {
    SUFFIXES.iter().find_map(|s| file.strip_suffix(s))
}

impl Kernel {
    /// Finds the kernel image and modules in a tree holding a kernel
    /// package (merged-/usr `/usr/lib/modules` or classic `/lib/modules`).
    pub fn from_tree(tree: &Tree) -> Result<Kernel, KernelError> {
        let boot = tree.dir(Path::new("/boot")).ok_or(KernelError::NoKernel)?;
        let images: Vec<(String, &FileData)> = boot
            .entries
            .iter()
            .filter_map(|(name, node)| {
                let rel = name.to_str()?.strip_prefix("vmlinuz-")?;
                match node {
                    Node::File { data, .. } if !rel.is_empty() => Some((rel.to_string(), data)),
                    _ => None,
                }
            })
            .collect();
        let (release, image) = match images.as_slice() {
            [] => return Err(KernelError::NoKernel),
            [(r, d)] => (
                r.clone(),
                Arc::new(read(&format!("/boot/vmlinuz-{r}"), d)?.into_owned()),
            ),
            more => {
                return Err(KernelError::Ambiguous(
                    more.iter().map(|(r, _)| r.clone()).collect(),
                ))
            }
        };
        let mut modules = BTreeMap::new();
        let mut builtin = None;
        // A kernel without modules is valid (everything built in).
        let dir = ["/usr/lib/modules", "/lib/modules"]
            .iter()
            .find_map(|d| tree.dir(&Path::new(d).join(&release)));
        if let Some(dir) = dir {
            collect(dir, &mut PathBuf::new(), &mut modules);
            if let Some(Node::File { data, .. }) =
                dir.entries.get(std::ffi::OsStr::new("modules.builtin"))
            {
                builtin = Some(
                    String::from_utf8_lossy(&read("modules.builtin", data)?)
                        .lines()
                        .filter_map(|l| l.trim().rsplit('/').next().and_then(module_stem))
                        .map(normalize)
                        .collect(),
                );
            }
        }
        Ok(Kernel {
            release,
            image,
            modules,
            builtin,
        })
    }

    /// Names of every loadable module in the package.
    pub fn module_names(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }

    /// Reads one module's `.modinfo`.
    pub fn modinfo(&self, name: &str) -> Result<Option<ModInfo>, KernelError> {
        let Some(f) = self.modules.get(&normalize(name)) else {
            return Ok(None);
        };
        read_modinfo(&f.rel, &read(&f.rel, &f.data)?).map(Some)
    }

    /// Whether `name` is listed in the package's `modules.builtin`.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin
            .as_ref()
            .is_some_and(|b| b.contains(&normalize(name)))
    }

    /// The module files for the initramfs and the index the init loads
    /// them by: hardware and filesystem modules present in this kernel, plus
    /// `extra`, plus everything they depend on. Paths are
    /// `/lib/modules/RELEASE/...` as shipped, sorted.
    ///
    /// `extra` modules load at every boot; `on_demand` ones are shipped
    /// for the init to load when it needs them (the bridge's, say).
    ///
    /// A default module this kernel lacks is skipped (built in, or not
    /// configured). A missing `extra` or `on_demand` module is an error
    /// unless it is known built in or the package ships no
    /// `modules.builtin` to tell.
    #[allow(clippy::type_complexity)]
    pub fn initramfs_modules(
        &self,
        extra: &[&str],
        on_demand: &[&str],
    ) -> Result<(Vec<(String, FileData)>, ModuleIndex), KernelError> {
        let extra: Vec<String> = extra.iter().map(|e| normalize(e)).collect();
        let mut queue = VecDeque::new();
        for name in HARDWARE_MODULES
            .iter()
            .chain(FILESYSTEM_MODULES)
            .map(|n| n.to_string())
        {
            if self.modules.contains_key(&name) {
                queue.push_back(name);
            }
        }
        let on_demand: Vec<String> = on_demand.iter().map(|e| normalize(e)).collect();
        for name in extra.iter().chain(&on_demand) {
            if self.modules.contains_key(name) {
                queue.push_back(name.clone());
            } else if self.builtin.is_some() && !self.is_builtin(name) {
                return Err(KernelError::Unknown(name.clone()));
            }
        }
        let mut index = ModuleIndex::default();
        let mut files = Vec::new();
        while let Some(name) = queue.pop_front() {
            if index.modules.contains_key(&name) {
                continue;
            }
            let Some(f) = self.modules.get(&name) else {
                continue;
            };
            // Shipped decompressed: the kernel's xz takes a large share of
            // an emulated boot, and the initramfs is compressed as a whole
            // anyway where it matters.
            let elf = module_elf(&f.rel, &read(&f.rel, &f.data)?)?.into_owned();
            let info = modinfo_from_elf(&f.rel, &elf)?;
            let depends: Vec<String> = info.depends.iter().map(|d| normalize(d)).collect();
            for d in &depends {
                if !self.modules.contains_key(d) {
                    if self.is_builtin(d) {
                        continue;
                    }
                    return Err(KernelError::MissingDependency {
                        module: name.clone(),
                        dependency: d.clone(),
                    });
                }
                queue.push_back(d.clone());
            }
            let rel = module_stem(&f.rel).map_or(f.rel.clone(), |stem| format!("{stem}.ko"));
            let path = format!("/lib/modules/{}/{rel}", self.release);
            files.push((path.clone(), FileData::from(elf)));
            let mut aliases = info.aliases;
            aliases.sort();
            aliases.dedup();
            index.modules.insert(
                name,
                ModuleInfo {
                    path,
                    depends,
                    aliases,
                },
            );
        }
        for name in ALWAYS_MODULES.iter().map(|s| s.to_string()).chain(extra) {
            if index.modules.contains_key(&name) && !index.always.contains(&name) {
                index.always.push(name);
            }
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((files, index))
    }
}

/// Collects module files below `dir` by normalised name; the first in
/// sorted path order wins if a name repeats.
fn collect(dir: &Dir, at: &mut PathBuf, out: &mut BTreeMap<String, ModuleFile>) {
    for (name, node) in &dir.entries {
        at.push(name);
        match node {
            Node::Dir(d) => collect(d, at, out),
            Node::File { data, .. } => {
                if let Some(stem) = name.to_str().and_then(module_stem) {
                    out.entry(normalize(stem)).or_insert_with(|| ModuleFile {
                        rel: at.to_string_lossy().into_owned(),
                        data: data.clone(),
                    });
                }
            }
            _ => {}
        }
        at.pop();
    }
}

/// Decompresses (by file suffix) and parses a module's `.modinfo`.
pub fn read_modinfo(path: &str, data: &[u8]) -> Result<ModInfo, KernelError> {
    modinfo_from_elf(path, &module_elf(path, data)?)
}

/// `.modinfo` of a module's (decompressed) ELF.
fn modinfo_from_elf(path: &str, elf: &[u8]) -> Result<ModInfo, KernelError> {
    let err = |message: String| KernelError::Module {
        path: path.to_string(),
        message,
    };
    let section = elf_section(elf, ".modinfo").map_err(err)?;
    let section = section.ok_or_else(|| err("no .modinfo section".into()))?;
    modinfo_entries(section)
}

/// A module file's ELF, decompressed by its suffix (`.ko.xz`, `.ko.zst`).
fn module_elf<'a>(path: &str, data: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>, KernelError> {
    let err = |message: String| KernelError::Module {
        path: path.to_string(),
        message,
    };
    Ok(if path.ends_with(".ko.xz") {
        liblzma::decode_all(data)
            .map_err(|e| err(format!("xz: {e}")))?
            .into()
    } else if path.ends_with(".ko.zst") {
        let mut v = Vec::new();
        zstd::Decoder::new(data)
            .and_then(|mut d| d.read_to_end(&mut v))
            .map_err(|e| err(format!("zstd: {e}")))?;
        v.into()
    } else {
        data.into()
    })
}

fn modinfo_entries(section: &[u8]) -> Result<ModInfo, KernelError> {
    let mut info = ModInfo::default();
    for entry in section.split(|b| *b == 0).filter(|e| !e.is_empty()) {
        let Ok(entry) = std::str::from_utf8(entry) else {
            continue; // binary-ish values are of no interest here
        };
        let Some((k, v)) = entry.split_once('=') else {
            continue;
        };
        match k {
            "name" => info.name = Some(v.to_string()),
            "depends" => info.depends.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(String::from),
            ),
            "alias" => info.aliases.push(v.to_string()),
            _ => {}
        }
    }
    Ok(info)
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The contents of the named section of a little-endian ELF64 file.
fn elf_section<'a>(elf: &'a [u8], want: &str) -> Result<Option<&'a [u8]>, String> {
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not a little-endian ELF64 file".into());
    }
    let trunc = || "truncated ELF header".to_string();
    let shoff = usize::try_from(le_u64(elf, 0x28).ok_or_else(trunc)?)
        .map_err(|_| "section header offset out of range".to_string())?;
    let shentsize = le_u16(elf, 0x3A).ok_or_else(trunc)? as usize;
    let shnum = le_u16(elf, 0x3C).ok_or_else(trunc)? as usize;
    let shstrndx = le_u16(elf, 0x3E).ok_or_else(trunc)? as usize;
    if shentsize < 64 {
        return Err("bad section header size".into());
    }
    // (name offset, file offset, size) of section `i`.
    let header = |i: usize| -> Result<(usize, usize, usize), String> {
        let at = shoff
            .checked_add(i.checked_mul(shentsize).ok_or("overflow")?)
            .ok_or("overflow")?;
        let bad = || format!("section header {i} out of bounds");
        let name = le_u32(elf, at).ok_or_else(bad)? as usize;
        let off = usize::try_from(le_u64(elf, at + 24).ok_or_else(bad)?).map_err(|_| bad())?;
        let size = usize::try_from(le_u64(elf, at + 32).ok_or_else(bad)?).map_err(|_| bad())?;
        Ok((name, off, size))
    };
    let data = |off: usize, size: usize| -> Result<&'a [u8], String> {
        off.checked_add(size)
            .and_then(|end| elf.get(off..end))
            .ok_or_else(|| "section data out of bounds".to_string())
    };
    let (_, stroff, strsize) = header(shstrndx)?;
    let strtab = data(stroff, strsize)?;
    for i in 0..shnum {
        let (name, off, size) = header(i)?;
        let Some(n) = strtab.get(name..) else {
            continue;
        };
        let n = n.split(|b| *b == 0).next().unwrap_or(&[]);
        if n == want.as_bytes() {
            return data(off, size).map(Some);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_formats::tree::Meta;

    /// A minimal ELF64 with a `.modinfo` section holding `entries`.
    fn fake_module(entries: &[&str]) -> Vec<u8> {
        let mut modinfo = Vec::new();
        for e in entries {
            modinfo.extend_from_slice(e.as_bytes());
            modinfo.push(0);
        }
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        let modinfo_off = f.len();
        f.extend_from_slice(&modinfo);
        let str_off = f.len();
        f.extend_from_slice(shstrtab);
        while !f.len().is_multiple_of(8) {
            f.push(0);
        }
        let shoff = f.len();
        let mut sh = |name: u32, typ: u32, off: usize, size: usize| {
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&typ.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            f.extend_from_slice(&h);
        };
        sh(0, 0, 0, 0);
        sh(1, 1, modinfo_off, modinfo.len());
        sh(10, 3, str_off, shstrtab.len());
        f[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        f[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        f[0x3C..0x3E].copy_from_slice(&3u16.to_le_bytes());
        f[0x3E..0x40].copy_from_slice(&2u16.to_le_bytes());
        f
    }

    fn synthetic_tree(extra_files: &[(&str, Vec<u8>)]) -> Tree {
        let rel = "6.12.0-1-cloud-amd64";
        let mut t = Tree::new();
        t.insert(
            Path::new(&format!("/boot/vmlinuz-{rel}")),
            Node::file(0o644, b"MZkernel".to_vec()),
        )
        .unwrap();
        let m = format!("/usr/lib/modules/{rel}/kernel");
        let files: Vec<(String, Vec<u8>)> = vec![
            (
                format!("{m}/drivers/virtio/virtio.ko.xz"),
                liblzma::encode_all(&fake_module(&["name=virtio", "depends="])[..], 6).unwrap(),
            ),
            (
                format!("{m}/drivers/virtio/virtio_ring.ko.zst"),
                zstd::encode_all(&fake_module(&["name=virtio_ring", "depends=virtio"])[..], 3)
                    .unwrap(),
            ),
            (
                format!("{m}/drivers/block/virtio_blk.ko"),
                fake_module(&[
                    "alias=virtio:d00000002v*",
                    "depends=virtio,virtio_ring",
                    "name=virtio_blk",
                ]),
            ),
            (
                format!("{m}/fs/squashfs/squashfs.ko"),
                fake_module(&["name=squashfs", "depends=", "alias=fs-squashfs"]),
            ),
            (
                format!("{m}/drivers/net/dummy.ko"),
                fake_module(&["name=dummy", "depends=", "alias=rtnl-link-dummy"]),
            ),
            (
                format!("{m}/drivers/md/dm-verity.ko"),
                fake_module(&["name=dm_verity", "depends=dm-bufio"]),
            ),
        ];
        for (p, d) in files {
            t.insert(Path::new(&p), Node::file(0o644, d)).unwrap();
        }
        for (p, d) in extra_files {
            t.insert(
                Path::new(&format!("/usr/lib/modules/{rel}/{p}")),
                Node::file(0o644, d.clone()),
            )
            .unwrap();
        }
        t
    }

    #[test]
    fn modinfo_from_elf() {
        let m = fake_module(&[
            "license=GPL",
            "name=foo",
            "depends=a,b-c",
            "alias=x*",
            "alias=y",
        ]);
        let i = read_modinfo("foo.ko", &m).unwrap();
        assert_eq!(i.name.as_deref(), Some("foo"));
        assert_eq!(i.depends, vec!["a", "b-c"]);
        assert_eq!(i.aliases, vec!["x*", "y"]);
        assert!(read_modinfo("foo.ko", b"\x7fELF").is_err());
        assert!(read_modinfo("foo.ko", b"nope").is_err());
        assert!(read_modinfo("foo.ko.xz", &m).is_err());
        let mut cut = m.clone();
        cut.truncate(m.len() - 30); // into the last section header's size
        assert!(read_modinfo("foo.ko", &cut).is_err());
    }

    #[test]
    fn selection_and_closure_on_synthetic_kernel() {
        let t = synthetic_tree(&[]);
        let k = Kernel::from_tree(&t).unwrap();
        assert_eq!(k.release, "6.12.0-1-cloud-amd64");
        assert_eq!(&k.image[..], b"MZkernel");
        let (files, idx) = k.initramfs_modules(&["dummy"], &[]).unwrap();
        let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        let r = "/lib/modules/6.12.0-1-cloud-amd64/kernel";
        assert_eq!(
            paths,
            vec![
                format!("{r}/drivers/block/virtio_blk.ko"),
                format!("{r}/drivers/net/dummy.ko"),
                format!("{r}/drivers/virtio/virtio.ko"),
                format!("{r}/drivers/virtio/virtio_ring.ko"),
                format!("{r}/fs/squashfs/squashfs.ko"),
            ]
        );
        assert_eq!(idx.always, vec!["squashfs", "dummy"]);
        assert_eq!(
            idx.modules["virtio_blk"].depends,
            vec!["virtio", "virtio_ring"]
        );
        assert_eq!(
            idx.modules["virtio_blk"].aliases,
            vec!["virtio:d00000002v*"]
        );
        // Shipped decompressed, whatever the package's compression.
        for (path, data) in &files {
            assert!(data.bytes().unwrap().starts_with(b"\x7fELF"), "{path}");
        }
        // Unknown extra with no modules.builtin to tell: skipped.
        assert!(k.initramfs_modules(&["nothere"], &[]).is_ok());
        // A dependency that is missing is an error.
        assert!(matches!(
            k.initramfs_modules(&["dm-verity"], &[]),
            Err(KernelError::MissingDependency { .. })
        ));
    }

    #[test]
    fn builtin_list_is_honoured() {
        let t = synthetic_tree(&[(
            "modules.builtin",
            b"kernel/fs/ext4/ext4.ko\nkernel/drivers/md/dm-bufio.ko\n".to_vec(),
        )]);
        let k = Kernel::from_tree(&t).unwrap();
        // dm-bufio is built in: dm_verity's dependency is satisfied.
        let (_, idx) = k.initramfs_modules(&["dm_verity", "ext4"], &[]).unwrap();
        assert!(idx.modules.contains_key("dm_verity"));
        assert!(!idx.always.contains(&"ext4".to_string()));
        assert!(matches!(
            k.initramfs_modules(&["nothere"], &[]),
            Err(KernelError::Unknown(_))
        ));
    }

    #[test]
    fn kernel_errors() {
        assert!(matches!(
            Kernel::from_tree(&Tree::new()),
            Err(KernelError::NoKernel)
        ));
        let mut t = synthetic_tree(&[]);
        t.insert(
            Path::new("/boot/vmlinuz-other"),
            Node::file(0o644, b"x".to_vec()),
        )
        .unwrap();
        assert!(matches!(
            Kernel::from_tree(&t),
            Err(KernelError::Ambiguous(_))
        ));
        let mut t = Tree::new();
        t.mkdir_p(Path::new("/boot"), &Meta::root(0o755)).unwrap();
        assert!(matches!(Kernel::from_tree(&t), Err(KernelError::NoKernel)));
    }

    /// Builds a tree from a tar stream: regular files, directories,
    /// symlinks and hard links (as copies) only.
    fn tree_from_tar(tar: &[u8]) -> Tree {
        let mut t = Tree::new();
        let mut a = tar::Archive::new(tar);
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let path = PathBuf::from("/").join(&*e.path().unwrap());
            let mode = e.header().mode().unwrap();
            match e.header().entry_type() {
                tar::EntryType::Directory => {
                    t.mkdir_p(&path, &Meta::root(mode)).unwrap();
                }
                tar::EntryType::Regular => {
                    let mut d = Vec::new();
                    e.read_to_end(&mut d).unwrap();
                    t.insert(&path, Node::file(mode, d)).unwrap();
                }
                tar::EntryType::Symlink => {
                    let target = e.link_name().unwrap().unwrap().into_owned();
                    t.insert(&path, Node::symlink(target)).unwrap();
                }
                tar::EntryType::Link => {
                    let target = PathBuf::from("/").join(e.link_name().unwrap().unwrap());
                    let n = t.get(&target).unwrap().clone();
                    t.insert(&path, n).unwrap();
                }
                _ => {}
            }
        }
        t
    }

    /// The real trixie cloud kernel, through the verified archive client.
    #[tokio::test]
    async fn network_trixie_cloud_kernel() {
        use crate::debian::tests as dt;
        let layer = dt::trixie_cloud_kernel().await;
        let tree = tree_from_tar(&dt::layer_tar(&layer));
        let k = Kernel::from_tree(&tree).unwrap();
        assert!(k.release.starts_with("6.12"), "{}", k.release);
        assert!(k.release.ends_with("-cloud-amd64"), "{}", k.release);
        // bzImage: "HdrS" setup header magic at 0x202.
        assert_eq!(&k.image[0x202..0x206], b"HdrS");

        let (files, idx) = k.initramfs_modules(&["dm-verity"], &[]).unwrap();
        // virtio_blk's dependencies are in the set unless built in (trixie
        // builds virtio, virtio_ring and virtio_pci into the cloud kernel;
        // bookworm ships them as modules).
        let blk = &idx.modules["virtio_blk"];
        assert!(
            blk.aliases.iter().any(|a| a == "virtio:d00000002v*"),
            "{blk:?}"
        );
        for m in ["virtio", "virtio_ring", "virtio_pci"] {
            let loadable = idx.modules.contains_key(m);
            assert!(
                loadable || k.is_builtin(m),
                "{m} neither shipped nor built in"
            );
            if loadable && m != "virtio_pci" {
                assert!(blk.depends.contains(&m.to_string()), "{blk:?}");
            }
        }
        let pci_alias = "pci:v00001AF4d*sv*sd*bc*sc*i*";
        match idx.modules.get("virtio_pci") {
            Some(pci) => assert!(pci.aliases.iter().any(|a| a == pci_alias), "{pci:?}"),
            None => assert!(k.is_builtin("virtio_pci")),
        }
        // Loadable drivers carry their PCI aliases (ENA: Amazon's vendor id).
        assert!(idx.modules["ena"]
            .aliases
            .iter()
            .any(|a| a.starts_with("pci:v00001D0Fd")));
        assert!(idx.modules.contains_key("erofs"));
        assert!(idx.modules.contains_key("overlay"));
        assert!(idx.modules.contains_key("sd_mod"));
        assert!(idx.modules.contains_key("squashfs"));
        assert!(idx.modules.contains_key("dm_verity"));
        assert_eq!(idx.always[0], "squashfs");
        assert!(idx.always.contains(&"dm_verity".to_string()));
        // Every dependency is in the set, every path is shipped.
        let shipped: BTreeSet<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        for (name, m) in &idx.modules {
            assert!(shipped.contains(m.path.as_str()), "{name}");
            // Shipped decompressed.
            assert!(m.path.ends_with(".ko"), "{}", m.path);
            for d in &m.depends {
                assert!(idx.modules.contains_key(d), "{name} needs {d}");
            }
        }
        assert_eq!(files.len(), idx.modules.len());
        for (path, data) in &files {
            assert!(data.bytes().unwrap().starts_with(b"\x7fELF"), "{path}");
        }
    }
}
