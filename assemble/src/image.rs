//! From a validated recipe to a disk image: resolve and fetch every input
//! (pinned by digest), build the container root trees and the host root,
//! encode the filesystems, the initramfs and the UKI, lay out the disk and
//! write it atomically.

use crate::cache::{Cache, CacheError, Digest};
use crate::debian::{self, Archive, DebianError, Package};
use crate::kernel::{Kernel, KernelError};
use crate::kernel_source::{self, KernelSourceError};
use crate::layers::{self, Layer, LayerError};
use crate::oci::{self, ImageConfig, OciError};
use crate::recipe::{self, ContainerSpec, ImageSource, Validated};
use crate::users::{self, UserError};
use kiln_formats::gpt::{Guid, ESP_TYPE, LINUX_ROOT_X86_64_TYPE};
use kiln_formats::tree::{Meta, Node, Tree, TreeError};
use kiln_formats::{cpio, disk, fat, squashfs, uki};
use kiln_init::config::{
    self as initcfg, Bind, BootConfig, Container, FileEntry, HostConfig, Net, WhenDone,
};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Debian(#[from] DebianError),
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    KernelSource(#[from] KernelSourceError),
    #[error("{recipe}: container {container}: {source}")]
    User {
        recipe: PathBuf,
        container: String,
        source: UserError,
    },
    #[error("{recipe}: {what}: {message}")]
    Input {
        recipe: PathBuf,
        what: String,
        message: String,
    },
    #[error("{what}: {source}")]
    Tree { what: String, source: TreeError },
    #[error("encoding {what}: {message}")]
    Encode { what: &'static str, message: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// Receives progress messages; the CLI shows them, tests ignore them.
pub trait Progress: Send + Sync {
    /// A new step begins.
    fn step(&self, message: &str);
}

/// Progress sink that shows nothing.
pub struct Silent;
impl Progress for Silent {
    fn step(&self, _: &str) {}
}

pub struct BuildOptions {
    pub cache: Cache,
    /// OpenPGP keyring that signs the Debian archive.
    pub keyring: PathBuf,
    /// The static kiln-init binary placed in the initramfs as /init.
    pub init: Arc<Vec<u8>>,
    pub progress: Arc<dyn Progress>,
}

/// Every input, pinned: what a lock file and an SBOM are made from.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub name: String,
    pub version: String,
    pub kernel: PinnedKernel,
    pub stub: Vec<Package>,
    pub containers: Vec<PinnedImage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PinnedKernel {
    /// Where it came from: `debian:SUITE:PACKAGE`, `path:FILE` or an image.
    pub source: String,
    pub release: String,
    pub packages: Vec<Package>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PinnedImage {
    pub container: String,
    pub source: String,
    /// Manifest digest for OCI sources.
    pub manifest: Option<String>,
    /// Debian packages for `{ debian = [...] }` sources.
    pub packages: Vec<Package>,
}

/// What a build wrote.
#[derive(Debug, Clone)]
pub struct Built {
    pub images: Vec<PathBuf>,
    pub plan_path: PathBuf,
    pub plan: Plan,
    pub root_size: u64,
    pub esp_size: u64,
}

const ROOT_NAMESPACE: &str = "kiln root partition";
const ESP_NAMESPACE: &str = "kiln esp partition";
const DISK_NAMESPACE: &str = "kiln disk";
const STUB_PACKAGE: &str = "systemd-boot-efi";
const STUB_PATH: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";
/// Docker's PATH when an image sets none.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Directories the init mounts over in the host root.
const HOST_MOUNTPOINTS: &[&str] = &["/proc", "/sys", "/dev", "/run", "/tmp", "/var/log"];
/// Directories the init mounts over in each container root.
const CONTAINER_MOUNTPOINTS: &[&str] = &["/proc", "/sys", "/dev", "/tmp", "/run"];

/// Opened Debian suites, by (mirror, suite).
struct Archives<'a> {
    opts: &'a BuildOptions,
    open: BTreeMap<(String, String), Archive>,
}

impl Archives<'_> {
    async fn get(&mut self, mirror: &str, suite: &str) -> Result<&Archive, BuildError> {
        let key = (mirror.to_string(), suite.to_string());
        if !self.open.contains_key(&key) {
            self.opts
                .progress
                .step(&format!("verifying Debian {suite} index"));
            let a = Archive::open(mirror, suite, &self.opts.keyring, &self.opts.cache).await?;
            self.open.insert(key.clone(), a);
        }
        Ok(&self.open[&key])
    }
}

/// Fetches `packages` and applies their data.tar layers to a new tree.
async fn debian_tree(
    archive: &Archive,
    packages: &[Package],
    progress: &dyn Progress,
) -> Result<Tree, BuildError> {
    let mut tree = Tree::new();
    for p in packages {
        progress.step(&format!("fetching {} {}", p.name, p.version));
        let deb = archive.fetch(p).await?;
        let layer = debian::deb_layer(&format!("debian:{}={}", p.name, p.version), p.sha256, &deb)?;
        layers::apply(&mut tree, &layer)?;
    }
    Ok(tree)
}

fn apply_all(tree: &mut Tree, layers: &[Layer]) -> Result<(), BuildError> {
    for l in layers {
        layers::apply(tree, l)?;
    }
    Ok(())
}

/// Builds every output format of `recipe` into `out_dir`.
pub async fn build(
    recipe: &Validated,
    out_dir: &Path,
    opts: &BuildOptions,
) -> Result<Built, BuildError> {
    let progress = opts.progress.as_ref();
    let mut archives = Archives {
        opts,
        open: BTreeMap::new(),
    };
    let r = &recipe.recipe;
    let suite = r
        .kernel
        .suite
        .as_ref()
        .map(|s| s.get_ref().clone())
        .unwrap_or_else(|| recipe::DEFAULT_SUITE.to_string());
    let mirror = r
        .kernel
        .mirror
        .as_ref()
        .map(|s| s.get_ref().clone())
        .unwrap_or_else(|| recipe::DEFAULT_MIRROR.to_string());

    // Kernel.
    let (kernel, kernel_packages, kernel_source) = if let Some(pkg) = &r.kernel.debian {
        let archive = archives.get(&mirror, &suite).await?;
        let closure = archive
            .resolve(std::slice::from_ref(pkg.get_ref()))
            .map_err(|e| BuildError::Input {
                recipe: recipe.path.clone(),
                what: "kernel.debian".into(),
                message: e.to_string(),
            })?;
        // The metapackage pulls in tools (kmod, initramfs-tools...) that
        // an appliance does not need: keep only kernel image packages.
        let pkgs: Vec<Package> = closure
            .into_iter()
            .filter(|p| p.name.starts_with("linux-image-") || p.name == *pkg.get_ref())
            .collect();
        let tree = debian_tree(archive, &pkgs, progress).await?;
        let source = format!("debian:{suite}:{}", pkg.get_ref());
        (Kernel::from_tree(&tree)?, pkgs, source)
    } else if let Some(path) = &r.kernel.path {
        progress.step(&format!("reading kernel {}", path.get_ref()));
        let modules = r.kernel.modules.as_ref().map(|m| m.get_ref().as_str());
        let tree = kernel_source::from_path(recipe.dir(), path.get_ref(), modules)?;
        (
            Kernel::from_tree(&tree)?,
            Vec::new(),
            format!("path:{}", path.get_ref()),
        )
    } else if let Some(image) = &r.kernel.image {
        progress.step(&format!("pulling kernel image {}", image.get_ref()));
        let reference = resolve_local_ref(recipe, image.get_ref());
        let tree = kernel_source::from_image(&reference, &opts.cache).await?;
        (
            Kernel::from_tree(&tree)?,
            Vec::new(),
            image.get_ref().clone(),
        )
    } else {
        // Validation requires exactly one source; kept for robustness.
        return Err(BuildError::Input {
            recipe: recipe.path.clone(),
            what: "kernel".into(),
            message: "no kernel source (debian, image or path)".into(),
        });
    };

    // systemd-stub from the same suite, for the UKI.
    let archive = archives.get(&mirror, &suite).await?;
    let stub_pkg: Vec<Package> = archive
        .resolve(&[STUB_PACKAGE.to_string()])?
        .into_iter()
        .filter(|p| p.name == STUB_PACKAGE)
        .collect();
    let stub_tree = debian_tree(archive, &stub_pkg, progress).await?;
    let stub = match stub_tree.get(Path::new(STUB_PATH)) {
        Some(Node::File { data, .. }) => data.clone(),
        _ => {
            return Err(BuildError::Input {
                recipe: recipe.path.clone(),
                what: STUB_PACKAGE.into(),
                message: format!("package has no {STUB_PATH}"),
            })
        }
    };

    // Containers.
    let mut host = Tree::new();
    let mut host_config = HostConfig {
        hostname: recipe.hostname(),
        when_done: if recipe.poweroff_when_done() {
            WhenDone::Poweroff
        } else {
            WhenDone::Stay
        },
        files: Vec::new(),
        onboot: Vec::new(),
        services: Vec::new(),
    };
    let mut pinned = Vec::new();
    let n_onboot = r.onboot.len();
    for (i, spec) in recipe.containers().enumerate() {
        let name = spec.name.get_ref().clone();
        let (mut rootfs, config, pin) =
            container_tree(recipe, spec, &mut archives, &suite, &mirror, opts).await?;
        let c = container_config(recipe, spec, &mut rootfs, &config)?;
        host.insert(Path::new(&c.rootfs), Node::Dir(rootfs.root))
            .map_err(|source| BuildError::Tree {
                what: format!("container {name}"),
                source,
            })?;
        if i < n_onboot {
            host_config.onboot.push(c);
        } else {
            host_config.services.push(c);
        }
        pinned.push(pin);
    }

    // Recipe files, baked into the host root.
    for f in &r.files {
        let contents = match (&f.contents, &f.source) {
            (Some(c), _) => c.clone().into_bytes(),
            (None, Some(src)) => {
                let p = recipe.dir().join(src.get_ref());
                fs::read(&p).map_err(|source| BuildError::Io { path: p, source })?
            }
            (None, None) => Vec::new(),
        };
        let mode = f
            .mode
            .as_ref()
            .and_then(|m| u32::from_str_radix(m.get_ref(), 8).ok())
            .unwrap_or(0o644);
        let entry = FileEntry {
            path: f.path.get_ref().clone(),
            contents,
            mode,
            uid: f.uid.unwrap_or(0),
            gid: f.gid.unwrap_or(0),
        };
        let mut node = Node::file(entry.mode, entry.contents.clone());
        node.meta_mut().uid = entry.uid;
        node.meta_mut().gid = entry.gid;
        host.insert(Path::new(&entry.path), node)
            .map_err(|source| BuildError::Tree {
                what: format!("[[file]] {}", entry.path),
                source,
            })?;
        host_config.files.push(entry);
    }
    for dir in HOST_MOUNTPOINTS
        .iter()
        .chain(&[initcfg::CONTAINERS_DIR, "/kiln"])
    {
        host.mkdir_p(Path::new(dir), &Meta::root(0o755))
            .map_err(|source| BuildError::Tree {
                what: format!("host directory {dir}"),
                source,
            })?;
    }
    let config_json =
        serde_json::to_vec_pretty(&host_config).map_err(|e| encode_err("config", e))?;
    host.insert(
        Path::new(initcfg::HOST_CONFIG_PATH),
        Node::file(0o644, config_json),
    )
    .map_err(|source| BuildError::Tree {
        what: "init config".into(),
        source,
    })?;

    // Root filesystem.
    progress.step("writing root filesystem (squashfs)");
    let mut root_fs = Cursor::new(Vec::new());
    squashfs::write_squashfs(&host, &mut root_fs, &squashfs::SquashfsOptions::default())
        .map_err(|e| encode_err("root squashfs", e))?;
    let root_fs = root_fs.into_inner();
    let root_guid = Guid::derive(ROOT_NAMESPACE, &Digest::of(&root_fs).0);

    // Initramfs: the init, its boot config and the kernel modules.
    progress.step("writing initramfs");
    let (modules, index) = kernel.initramfs_modules(&[])?;
    let boot = BootConfig {
        root_partuuid: root_guid.to_string(),
        root_fstype: "squashfs".into(),
        kernel_release: kernel.release.clone(),
        modules: index,
    };
    let mut initrd_tree = Tree::new();
    for dir in ["/dev", "/proc", "/sys", "/sysroot", "/run", "/tmp"] {
        initrd_tree
            .mkdir_p(Path::new(dir), &Meta::root(0o755))
            .map_err(|source| BuildError::Tree {
                what: "initramfs".into(),
                source,
            })?;
    }
    // The kernel opens /dev/console for PID 1 before devtmpfs is mounted.
    initrd_tree
        .insert(
            Path::new("/dev/console"),
            Node::device(kiln_formats::tree::DeviceKind::Char, 0o600, 5, 1),
        )
        .map_err(|source| BuildError::Tree {
            what: "initramfs".into(),
            source,
        })?;
    let boot_json = serde_json::to_vec_pretty(&boot).map_err(|e| encode_err("boot config", e))?;
    let initrd_files = [
        (
            "/init".to_string(),
            Node::File {
                meta: Meta::root(0o755),
                data: opts.init.clone(),
            },
        ),
        (
            initcfg::BOOT_CONFIG_PATH.to_string(),
            Node::file(0o644, boot_json),
        ),
    ];
    for (path, node) in initrd_files
        .into_iter()
        .chain(modules.into_iter().map(|(p, data)| {
            (
                p,
                Node::File {
                    meta: Meta::root(0o644),
                    data,
                },
            )
        }))
    {
        initrd_tree
            .insert(Path::new(&path), node)
            .map_err(|source| BuildError::Tree {
                what: format!("initramfs {path}"),
                source,
            })?;
    }
    let mut initrd = Vec::new();
    cpio::write_newc(&initrd_tree, &mut initrd).map_err(|e| encode_err("initramfs", e))?;

    // Unified kernel image.
    progress.step("writing unified kernel image");
    let osrel = format!(
        "ID=kiln\nNAME=kiln\nPRETTY_NAME=\"{} {} (kiln)\"\nIMAGE_ID={}\nIMAGE_VERSION={}\n",
        recipe.name(),
        r.version.get_ref(),
        recipe.name(),
        r.version.get_ref()
    );
    let cmdline = recipe.cmdline();
    let efi = uki::build_uki(
        &stub,
        &[
            (".osrel", osrel.as_bytes()),
            (".cmdline", cmdline.as_bytes()),
            (".uname", kernel.release.as_bytes()),
            (".initrd", &initrd),
            (".linux", &kernel.image),
        ],
    )
    .map_err(|e| encode_err("UKI", e))?;

    // EFI system partition.
    progress.step("writing EFI system partition");
    let mut esp_tree = Tree::new();
    esp_tree
        .insert(Path::new("/EFI/BOOT/BOOTX64.EFI"), Node::file(0o644, efi))
        .map_err(|source| BuildError::Tree {
            what: "ESP".into(),
            source,
        })?;
    let esp_size = esp_size(esp_tree.data_size());
    let vol = Guid::derive(ESP_NAMESPACE, &root_guid.0).0;
    let volume_id = u32::from_le_bytes([vol[0], vol[1], vol[2], vol[3]]);
    let esp = fat::build_fat32(&esp_tree, esp_size, volume_id, "KILN-ESP")
        .map_err(|e| encode_err("ESP", e))?;
    let esp_guid = Guid::derive(ESP_NAMESPACE, &Digest::of(&esp).0);

    // Disk.
    let mut ids = esp_guid.0.to_vec();
    ids.extend_from_slice(&root_guid.0);
    let layout = disk::Layout {
        disk_guid: Guid::derive(DISK_NAMESPACE, &ids),
        size: recipe.disk_size,
        partitions: vec![
            disk::PartitionSpec {
                name: "esp".into(),
                type_guid: ESP_TYPE,
                guid: esp_guid,
                size: esp.len() as u64,
                attributes: 0,
            },
            disk::PartitionSpec {
                name: "root-a".into(),
                type_guid: LINUX_ROOT_X86_64_TYPE,
                guid: root_guid,
                size: round_up(root_fs.len() as u64, 1 << 20),
                attributes: 0,
            },
        ],
    };
    disk::place(&layout).map_err(|e| BuildError::Input {
        recipe: recipe.path.clone(),
        what: "disk.size".into(),
        message: format!(
            "{e} (root filesystem {} MiB, ESP {} MiB)",
            root_fs.len() >> 20,
            esp.len() >> 20
        ),
    })?;

    fs::create_dir_all(out_dir).map_err(|source| BuildError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let plan = Plan {
        name: recipe.name().to_string(),
        version: r.version.get_ref().clone(),
        kernel: PinnedKernel {
            source: kernel_source,
            release: kernel.release.clone(),
            packages: kernel_packages,
        },
        stub: stub_pkg,
        containers: pinned,
    };
    let mut images = Vec::new();
    for format in &recipe.formats {
        let path = out_dir.join(format!("{}.{format}", recipe.name()));
        progress.step(&format!("writing {}", path.display()));
        write_atomically(&path, |f| {
            disk::write_raw(&layout, vec![Box::new(&esp[..]), Box::new(&root_fs[..])], f)
                .map(|_| ())
                .map_err(|e| io::Error::other(e.to_string()))
        })?;
        images.push(path);
    }
    let plan_path = out_dir.join(format!("{}.plan.json", recipe.name()));
    let plan_json = serde_json::to_vec_pretty(&plan).map_err(|e| encode_err("plan", e))?;
    write_atomically(&plan_path, |f| f.write_all(&plan_json))?;
    Ok(Built {
        images,
        plan_path,
        plan,
        root_size: root_fs.len() as u64,
        esp_size: esp.len() as u64,
    })
}

fn encode_err(what: &'static str, e: impl std::fmt::Display) -> BuildError {
    BuildError::Encode {
        what,
        message: e.to_string(),
    }
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// FAT32 needs at least 65525 clusters; 64 MiB keeps 512-byte clusters
/// comfortable and leaves room for a second UKI later.
fn esp_size(content: u64) -> u64 {
    round_up((content + content / 4 + (8 << 20)).max(64 << 20), 1 << 20)
}

/// Writes `path` through a temp file in the same directory, renamed into
/// place only once complete: a failed build leaves nothing at `path`.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut fs::File) -> io::Result<()>,
) -> Result<(), BuildError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let io_err = |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    };
    let result = (|| {
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        write(&mut f)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err)
}

/// The root tree and image config of one container, plus what pins it.
async fn container_tree(
    recipe: &Validated,
    spec: &ContainerSpec,
    archives: &mut Archives<'_>,
    default_suite: &str,
    mirror: &str,
    opts: &BuildOptions,
) -> Result<(Tree, ImageConfig, PinnedImage), BuildError> {
    let name = spec.name.get_ref().clone();
    match spec.image.get_ref() {
        ImageSource::Debian { packages, suite } => {
            let suite = suite.as_deref().unwrap_or(default_suite);
            let archive = archives.get(mirror, suite).await?;
            let closure = archive.resolve(packages).map_err(|e| BuildError::Input {
                recipe: recipe.path.clone(),
                what: format!("container {name}: image"),
                message: e.to_string(),
            })?;
            let mut tree = debian_tree(archive, &closure, opts.progress.as_ref()).await?;
            merge_usr(&mut tree).map_err(|source| BuildError::Tree {
                what: format!("container {name}: merging /usr"),
                source,
            })?;
            Ok((
                tree,
                ImageConfig::default(),
                PinnedImage {
                    container: name,
                    source: format!("debian:{suite}:{}", packages.join(",")),
                    manifest: None,
                    packages: closure,
                },
            ))
        }
        ImageSource::Ref(reference) => {
            opts.progress.step(&format!("pulling {reference}"));
            let source = resolve_local_ref(recipe, reference);
            let image = oci::pull(&source, &opts.cache).await?;
            let mut tree = Tree::new();
            apply_all(&mut tree, &image.layers)?;
            Ok((
                tree,
                image.config.clone(),
                PinnedImage {
                    container: name,
                    source: reference.clone(),
                    manifest: Some(image.manifest_digest.to_string()),
                    packages: Vec::new(),
                },
            ))
        }
    }
}

/// Debian's merged /usr layout, as base-files sets it up on a real system:
/// `/bin`, `/sbin` and `/lib*` become symlinks into `/usr`, with whatever a
/// package shipped there (older suites) moved below `/usr`.
fn merge_usr(tree: &mut Tree) -> Result<(), TreeError> {
    for dir in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let top = PathBuf::from("/").join(dir);
        let usr = PathBuf::from("/usr").join(dir);
        match tree.get(&top) {
            Some(Node::Dir(_)) => {
                let Ok(Node::Dir(moved)) = tree.remove(&top) else {
                    continue;
                };
                let target = tree.mkdir_p(&usr, &moved.meta)?;
                for (name, node) in moved.entries {
                    target.entries.entry(name).or_insert(node);
                }
            }
            Some(_) => continue,
            None if tree.get(&usr).is_none() && matches!(dir, "lib32" | "libx32") => continue,
            None => {}
        }
        tree.insert(&top, Node::symlink(format!("usr/{dir}")))?;
    }
    Ok(())
}

/// `oci-layout:` and `docker-archive:` paths are relative to the recipe.
fn resolve_local_ref(recipe: &Validated, reference: &str) -> String {
    for prefix in ["oci-layout:", "docker-archive:"] {
        if let Some(rest) = reference.strip_prefix(prefix) {
            if !rest.starts_with('/') {
                return format!("{prefix}{}", recipe.dir().join(rest).display());
            }
        }
    }
    reference.to_string()
}

/// The init's view of one container; adds the mount points it needs to
/// `rootfs` (which is read-only at run time).
fn container_config(
    recipe: &Validated,
    spec: &ContainerSpec,
    rootfs: &mut Tree,
    image: &ImageConfig,
) -> Result<Container, BuildError> {
    let name = spec.name.get_ref().clone();
    let input_err = |message: String| BuildError::Input {
        recipe: recipe.path.clone(),
        what: format!("container {name}"),
        message,
    };

    let args: Vec<String> = match &spec.command {
        Some(c) => c.clone(),
        None => image.entrypoint.iter().chain(&image.cmd).cloned().collect(),
    };
    if args.is_empty() {
        return Err(input_err(
            "no `command` given and the image has no Entrypoint or Cmd".into(),
        ));
    }

    let user_spec = spec
        .user
        .as_ref()
        .map(|u| u.get_ref().clone())
        .unwrap_or_else(|| image.user.clone());
    let id = users::resolve(rootfs, &user_spec).map_err(|source| BuildError::User {
        recipe: recipe.path.clone(),
        container: name.clone(),
        source,
    })?;

    // Image Env, then the recipe's over it; PATH and HOME as Docker does.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for kv in &image.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if env.insert(k.to_string(), v.to_string()).is_none() {
            order.push(k.to_string());
        }
    }
    for (k, v) in &spec.env {
        if env.insert(k.clone(), v.clone()).is_none() {
            order.push(k.clone());
        }
    }
    let mut env_list: Vec<String> = order.iter().map(|k| format!("{k}={}", env[k])).collect();
    if !env.contains_key("PATH") {
        env_list.insert(0, DEFAULT_PATH.to_string());
    }
    if !env.contains_key("HOME") {
        env_list.push(format!(
            "HOME={}",
            id.home.clone().unwrap_or_else(|| "/".into())
        ));
    }

    let cwd = spec
        .cwd
        .as_ref()
        .map(|c| c.get_ref().clone())
        .or_else(|| Some(image.working_dir.clone()).filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    let binds: Vec<Bind> = spec
        .binds
        .iter()
        .map(|b| {
            recipe::parse_bind(b.get_ref()).map(|b| Bind {
                source: b.source,
                target: b.target,
                readonly: b.readonly,
            })
        })
        .collect::<Result<_, _>>()
        .map_err(input_err)?;

    // Mount points must exist in the read-only root.
    let bind_targets: Vec<(String, bool)> = binds
        .iter()
        .map(|b| {
            let file_source = recipe
                .recipe
                .files
                .iter()
                .any(|f| f.path.get_ref() == &b.source);
            (b.target.clone(), file_source)
        })
        .collect();
    for dir in CONTAINER_MOUNTPOINTS
        .iter()
        .map(|d| (d.to_string(), false))
        .chain(bind_targets)
        .chain([(cwd.clone(), false)])
    {
        let (path, is_file) = dir;
        match rootfs.get(Path::new(&path)) {
            Some(Node::Dir(_)) => {}
            Some(Node::File { .. }) if is_file => {}
            Some(_) => {
                return Err(input_err(format!(
                    "{path} in the image is not a {} (it is needed as a mount point)",
                    if is_file { "file" } else { "directory" }
                )))
            }
            None if is_file => {
                rootfs
                    .insert(Path::new(&path), Node::file(0o644, Vec::new()))
                    .map_err(|e| input_err(e.to_string()))?;
            }
            None => {
                rootfs
                    .mkdir_p(Path::new(&path), &Meta::root(0o755))
                    .map_err(|e| input_err(e.to_string()))?;
            }
        }
    }

    let net = match spec.net.as_ref().map(|n| n.get_ref().as_str()) {
        Some("none") => Net::None,
        _ => Net::Host,
    };
    Ok(Container {
        rootfs: format!("{}/{name}/rootfs", initcfg::CONTAINERS_DIR),
        name,
        args,
        env: env_list,
        cwd,
        uid: id.uid,
        gid: id.gid,
        groups: id.groups,
        net,
        binds,
        capabilities: initcfg::DEFAULT_CAPABILITIES
            .iter()
            .map(|c| c.to_string())
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_usr_moves_top_level_dirs_into_usr() {
        let mut t = Tree::new();
        t.insert(Path::new("/bin/sh"), Node::file(0o755, "old"))
            .unwrap();
        t.insert(Path::new("/usr/bin/sh"), Node::file(0o755, "new"))
            .unwrap();
        t.insert(Path::new("/bin/only-top"), Node::file(0o755, "x"))
            .unwrap();
        t.insert(Path::new("/usr/lib/libc.so"), Node::file(0o644, "c"))
            .unwrap();
        merge_usr(&mut t).unwrap();
        assert_eq!(t.get(Path::new("/bin")), Some(&Node::symlink("usr/bin")));
        assert_eq!(t.get(Path::new("/lib")), Some(&Node::symlink("usr/lib")));
        // /usr wins where both exist; nothing from /bin is lost.
        assert_eq!(
            t.get(Path::new("/usr/bin/sh")),
            Some(&Node::file(0o755, "new"))
        );
        assert!(t.get(Path::new("/usr/bin/only-top")).is_some());
        assert!(t.get(Path::new("/lib32")).is_none());
    }

    #[test]
    fn esp_has_room_and_is_mib_aligned() {
        assert_eq!(esp_size(0), 64 << 20);
        let big = esp_size(100 << 20);
        assert!(big >= (100 << 20) + (8 << 20));
        assert_eq!(big % (1 << 20), 0);
    }

    #[test]
    fn atomic_write_leaves_nothing_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.raw");
        let r = write_atomically(&p, |f| {
            f.write_all(b"partial")?;
            Err(io::Error::other("boom"))
        });
        assert!(r.is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        write_atomically(&p, |f| f.write_all(b"whole")).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"whole");
    }
}
