//! The pipeline, stage by stage: plan (pinned inputs) → fetch → host tree
//! → filesystems (root squashfs, initramfs, UKI, ESP) → disk layout →
//! outputs, written together or not at all.

use crate::arch::TARGET;
use crate::cache::{Cache, Digest};
use crate::fetch::{self, FetchError, Inputs};
use crate::host::{self, Host, HostError};
use crate::kernel::{Kernel, KernelError};
use crate::oci::RegistryOptions;
use crate::output::{self, OutputError, Pending};
use crate::plan::Plan;
use crate::progress::{Event, Progress, Stage, StageTimer, Task};
use crate::recipe::{Format, Recipe, RecipeError, UpdateMode};
use kiln_formats::gpt::{Guid, ESP_TYPE};
use kiln_formats::tree::{Backing, FileData, Meta, Node, Tree, TreeError};
use kiln_formats::{cpio, disk, fat, iso, squashfs, uki, vdisk, verity};
use kiln_init::config::{self as initcfg, BootConfig};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors from building an image from a plan.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The recipe is invalid.
    #[error(transparent)]
    Recipe(#[from] Box<RecipeError>),
    /// Fetching the inputs failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// Assembling the host root failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// Finding the kernel or its modules failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// Adding to a tree failed.
    #[error("{what}")]
    Tree {
        /// What was being added.
        what: String,
        /// The underlying error.
        source: TreeError,
    },
    /// Encoding a filesystem, the UKI or the disk failed.
    #[error("encoding {what}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The encoder's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Writing the output files failed.
    #[error(transparent)]
    Output(#[from] OutputError),
}

impl BuildError {
    /// Whether the recipe (or the command line) is at fault: exit status 2.
    pub fn is_recipe_error(&self) -> bool {
        matches!(
            self,
            BuildError::Recipe(_)
                | BuildError::Host(HostError::Recipe(_))
                | BuildError::Output(OutputError::NotADirectory(_))
        )
    }
}

/// What a build needs besides the recipe and plan.
pub struct BuildOptions {
    /// The content-addressed cache for downloads and derived data.
    pub cache: Cache,
    /// How to reach container registries.
    pub registry: RegistryOptions,
    /// The static kiln-init binary placed in the initramfs as /init.
    pub init: Arc<Vec<u8>>,
    /// The static kiln-update, the update service an image with
    /// `[update] source` runs.
    pub updater: &'static [u8],
    /// kiln-boot, the UEFI slot chooser an A/B disk's ESP boots.
    pub chooser: &'static [u8],
    /// Receives stage and download progress.
    pub progress: Arc<dyn Progress>,
    /// Runs maintainer scripts (`None`: images that need them fail).
    pub sandbox: Option<kiln_sandbox::Sandbox>,
}

/// What a build wrote.
#[derive(Debug, Clone)]
pub struct Built {
    /// Image files, in the recipe's format order.
    pub images: Vec<PathBuf>,
    /// The plan written next to the images (`NAME.plan.json`).
    pub plan_path: PathBuf,
    /// Kernel release (`uname -r`) of the image's kernel.
    pub kernel_release: String,
    /// Root filesystem size in bytes.
    pub root_size: u64,
    /// EFI system partition size in bytes.
    pub esp_size: u64,
}

const ROOT_NAMESPACE: &str = "kiln root partition";
const ESP_NAMESPACE: &str = "kiln esp partition";
const DISK_NAMESPACE: &str = "kiln disk";
const VERITY_NAMESPACE: &str = "kiln verity";
const DATA_NAMESPACE: &str = "kiln data";

/// Runs the stages after the plan: fetch, trees, encode, write. `out_dir`
/// must have passed [`output::prepare_dir`].
pub async fn build(
    recipe: &Recipe,
    plan: &Plan,
    out_dir: &Path,
    opts: &BuildOptions,
) -> Result<Built, BuildError> {
    let progress = opts.progress.as_ref();

    let t = StageTimer::start(progress, Stage::Fetch);
    let Inputs {
        kernel,
        stub,
        images,
    } = fetch::fetch(
        recipe,
        plan,
        &opts.cache,
        &opts.registry,
        &opts.progress,
        opts.sandbox.as_ref(),
    )
    .await?;
    t.end();

    let t = StageTimer::start(progress, Stage::Trees);
    let host = host::assemble(recipe, images, opts.updater, plan.source_date_epoch)?;
    t.end();

    let t = StageTimer::start(progress, Stage::Encode);
    let fs = encode(recipe, plan, &host, &kernel, &stub, out_dir, opts)?;
    t.end();

    let t = StageTimer::start(progress, Stage::Write);
    let built = write_outputs(recipe, plan, &fs, out_dir, progress)?;
    t.end();
    Ok(Built {
        kernel_release: kernel.release.clone(),
        ..built
    })
}

/// The encoded filesystems and the disk layout that places them.
pub struct Filesystems {
    /// The encoded root filesystem, in a temp file beside the outputs
    /// (removed when this is dropped): it can be as large as the image.
    pub root: Pending,
    /// The squashfs's size in bytes.
    pub root_len: u64,
    /// What a root partition (or the ISO's root file) holds: the squashfs
    /// then, if verified, its dm-verity tree; bytes.
    pub root_image_len: u64,
    /// On an A/B disk, what slot A holds besides the root.
    pub slot: Option<SlotImage>,
    /// On an A/B disk, the data partition's empty ext4.
    pub data_fs: Option<kiln_formats::ext4::Ext4Options>,
    /// The EFI system partition (FAT32), planned: read it with
    /// [`fat::FatImage::reader`].
    pub esp: fat::FatImage,
    /// The disk layout placing both.
    pub layout: disk::Layout,
    /// The kernel (bzImage), for the kernel+initrd form.
    pub kernel_image: std::sync::Arc<Vec<u8>>,
    /// The kernel command line.
    pub cmdline: String,
    /// The initramfs holding the root too, when a diskless form is wanted.
    pub diskless: Option<Tree>,
    /// What a UKI is made of besides its initramfs and kernel: the stub,
    /// `.osrel` and `.uname`.
    pub uki_parts: (Vec<u8>, String, String),
    /// For the `iso` form: its volume id and its ESP (holding a UKI that
    /// finds the root in the ISO by that id).
    pub iso: Option<(String, fat::FatImage)>,
}

/// Slot A's contents besides the root (and its tree) at its start.
pub struct SlotImage {
    /// The partition's size.
    pub size: u64,
    /// The UKI.
    pub uki: Vec<u8>,
    /// Where the UKI starts in the slot.
    pub uki_offset: u64,
    /// The slot header, in the last 4 KiB.
    pub header: Vec<u8>,
}

/// Slot A from its start: the root, the UKI, the header, zeros between.
fn slot_reader<'a>(
    fs: &'a Filesystems,
    slot: &'a SlotImage,
) -> Result<impl std::io::Read + 'a, BuildError> {
    use std::io::Read;
    let root = root_reader(fs)?.take(fs.root_image_len);
    let zeros = |n: u64| std::io::repeat(0).take(n);
    let header_at = slot.size - slot.header.len() as u64;
    let uki_end = slot.uki_offset + slot.uki.len() as u64;
    Ok(root
        .chain(zeros(slot.uki_offset - fs.root_image_len))
        .chain(&slot.uki[..])
        .chain(zeros(header_at - uki_end))
        .chain(&slot.header[..]))
}

/// Sectors of the backup GPT at a disk's end, in bytes.
const BACKUP_GPT: u64 = 33 * 512;
/// The smallest data partition.
const MIN_DATA: u64 = 32 << 20;
/// The data partition's ext4 as built (the init grows it to the partition).
const DATA_FS_BLOCKS: u32 = 8192;

/// The initramfs: the init, its boot config (`root` says where the root
/// is, `verity` how it is verified), the modules (`extra` loaded at every boot, `on_demand` shipped),
/// and the root filesystem itself when given.
fn initramfs_tree(
    kernel: &Kernel,
    init: &[u8],
    root: initcfg::RootSource,
    verity: Option<&initcfg::RootVerity>,
    extra: &[&str],
    on_demand: &[&str],
    root_file: Option<FileData>,
) -> Result<Tree, BuildError> {
    let mut extra = extra.to_vec();
    if verity.is_some() {
        extra.extend(initcfg::VERITY_MODULES);
    }
    let (modules, index) = kernel.initramfs_modules(&extra, on_demand)?;
    let boot = BootConfig {
        root,
        root_fstype: "squashfs".into(),
        kernel_release: kernel.release.clone(),
        modules: index,
        verity: verity.cloned(),
    };
    let mut initrd_tree = Tree::new();
    for dir in initcfg::INITRAMFS_DIRS {
        initrd_tree
            .mkdir_p(Path::new(dir), &Meta::root(0o755))
            .map_err(tree_err("initramfs"))?;
    }
    // The kernel opens /dev/console for PID 1 before devtmpfs is mounted.
    initrd_tree
        .insert(
            Path::new("/dev/console"),
            Node::device(kiln_formats::tree::DeviceKind::Char, 0o600, 5, 1),
        )
        .map_err(tree_err("initramfs"))?;
    let boot_json = serde_json::to_vec_pretty(&boot).unwrap_or_else(|e| {
        // Strings, numbers and maps only: serialising cannot fail.
        unreachable!("boot config serialises: {e}")
    });
    let mut initrd_files = vec![
        (
            "/init".to_string(),
            Node::File {
                meta: Meta::root(0o755),
                data: init.to_vec().into(),
            },
        ),
        (
            initcfg::BOOT_CONFIG_PATH.to_string(),
            Node::file(0o644, boot_json),
        ),
    ];
    if let Some(data) = root_file {
        initrd_files.push((
            initcfg::INITRAMFS_ROOT.to_string(),
            Node::File {
                meta: Meta::root(0o444),
                data,
            },
        ));
    }
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
            .map_err(tree_err("initramfs"))?;
    }
    Ok(initrd_tree)
}

fn encode_err(
    what: &'static str,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> BuildError {
    move |source| BuildError::Encode { what, source }
}

fn tree_err(what: &str) -> impl FnOnce(TreeError) -> BuildError + '_ {
    move |source| BuildError::Tree {
        what: what.to_string(),
        source,
    }
}

/// Host tree and kernel → root squashfs, initramfs, UKI, ESP and layout.
pub fn encode(
    recipe: &Recipe,
    plan: &Plan,
    host: &Host,
    kernel: &Kernel,
    stub: &[u8],
    out_dir: &Path,
    opts: &BuildOptions,
) -> Result<Filesystems, BuildError> {
    let (init, cache, progress) = (&opts.init, &opts.cache, opts.progress.as_ref());
    let step = |m: &str| {
        progress.event(&Event::Step {
            message: m.to_string(),
        })
    };
    step("root filesystem (squashfs)");
    let root_path = out_dir.join(format!("{}.root", recipe.name()));
    let mut root = Pending::create(&root_path)?;
    let sq_opts = squashfs::SquashfsOptions {
        compression: squashfs::Compression::Zstd {
            level: recipe.output.root_compression.value.zstd_level,
        },
        mod_time: Some(u32::try_from(plan.source_date_epoch).unwrap_or(u32::MAX)),
        ..squashfs::SquashfsOptions::default()
    };
    let root_len = squashfs::write_squashfs_with(
        &host.tree,
        std::io::BufWriter::new(root.file()),
        &sq_opts,
        Some(cache),
        &|n| progress.bytes(Task::Compress, n),
    )
    .map_err(|e| encode_err("root squashfs")(Box::new(e)))?;
    // backhand seeks back over duplicate file data: what lies past the
    // image's end is overwritten leftovers, not part of it.
    let root_digest = root
        .file()
        .set_len(root_len)
        .and_then(|()| file_digest(root.file()))
        .map_err(|source| OutputError::Write {
            path: root_path.clone(),
            source,
        })?;
    let root_guid = Guid::derive(ROOT_NAMESPACE, &root_digest.0);
    let formats = &recipe.output.formats.value;
    let device_root = formats.iter().any(|f| f.is_disk() || *f == Format::Iso);
    let (verity, root_image_len) = if recipe.disk.verity && device_root {
        step("dm-verity hash tree");
        let (v, len) =
            append_hash_tree(&mut root, root_len, &root_digest, recipe.disk.verity_error).map_err(
                |source| OutputError::Write {
                    path: root_path.clone(),
                    source,
                },
            )?;
        (Some(v), len)
    } else {
        (None, root_len)
    };

    // Initramfs: the init, its boot config and the kernel modules.
    step("initramfs");
    let bridge = recipe
        .containers
        .iter()
        .any(|c| c.net == initcfg::Net::Bridge);
    let ab = recipe.disk.update == UpdateMode::Ab;
    let mut on_demand: Vec<&str> = Vec::new();
    if bridge {
        on_demand.extend(initcfg::BRIDGE_MODULES);
    }
    if ab {
        on_demand.extend(initcfg::WATCHDOG_MODULES);
    }
    let on_demand = &on_demand[..];
    let disk_root = if ab {
        initcfg::RootSource::Slot {
            build_id: hex(&root_digest.0),
        }
    } else {
        initcfg::RootSource::Partition(root_guid.to_string())
    };
    let disk_initrd = initramfs_tree(
        kernel,
        init,
        disk_root,
        verity.as_ref().map(|(v, _)| v),
        &[],
        on_demand,
        None,
    )?;
    let mut initrd = Vec::new();
    cpio::write_newc(&disk_initrd, &mut initrd)
        .map_err(|e| encode_err("initramfs")(Box::new(e)))?;
    // The forms without a disk carry the root in their initramfs.
    let diskless = if formats.iter().any(|f| f.diskless()) {
        let file = root
            .file()
            .try_clone()
            .map_err(|source| OutputError::Write {
                path: root_path.clone(),
                source,
            })?;
        let backing = Backing::new(file, root_path.display().to_string());
        Some(initramfs_tree(
            kernel,
            init,
            initcfg::RootSource::Initramfs(initcfg::INITRAMFS_ROOT.into()),
            None,
            &initcfg::INITRAMFS_ROOT_MODULES,
            on_demand,
            Some(FileData::extent(&backing, 0, root_len)),
        )?)
    } else {
        None
    };

    // Unified kernel image.
    step("unified kernel image");
    let version = &recipe.version.value;
    let osrel = format!(
        "ID=kiln\nNAME=kiln\nPRETTY_NAME=\"{} {version} (kiln)\"\nIMAGE_ID={}\nIMAGE_VERSION={version}\n",
        recipe.name(),
        recipe.name(),
    );
    let cmdline = &recipe.kernel.cmdline.value;
    // A verified root's UKIs pin its hash.
    let mut device_cmdline = match &verity {
        Some((_, root_hash)) => {
            format!("{cmdline} {}={}", initcfg::ROOT_HASH_KEY, hex(root_hash))
        }
        None => cmdline.clone(),
    };
    // A panicking slot must restart to lose a try, not hang.
    if ab && !cmdline.split_whitespace().any(|w| w.starts_with("panic=")) {
        device_cmdline.push_str(" panic=5");
    }
    let uki_with = |initrd: &[u8]| {
        uki::build_uki(
            stub,
            &[
                (".osrel", osrel.as_bytes()),
                (".cmdline", device_cmdline.as_bytes()),
                (".uname", kernel.release.as_bytes()),
                (".initrd", initrd),
                (".linux", &kernel.image),
            ],
        )
        .map_err(|e| encode_err("UKI")(Box::new(e)))
    };
    let efi = uki_with(&initrd)?;
    // The ISO's own UKI: the root is a file of the volume it names.
    let iso = if formats.contains(&Format::Iso) {
        let volume_id = format!(
            "KILN_{}",
            root_guid.to_string().replace('-', "")[..16].to_uppercase()
        );
        let tree = initramfs_tree(
            kernel,
            init,
            initcfg::RootSource::Iso {
                volume_id: volume_id.clone(),
                path: initcfg::ISO_ROOT.into(),
            },
            verity.as_ref().map(|(v, _)| v),
            &initcfg::INITRAMFS_ROOT_MODULES,
            on_demand,
            None,
        )?;
        let mut bytes = Vec::new();
        cpio::write_newc(&tree, &mut bytes).map_err(|e| encode_err("initramfs")(Box::new(e)))?;
        let uki = uki_with(&bytes)?;
        let mut esp_tree = Tree::new();
        esp_tree
            .insert(Path::new(TARGET.efi_boot_path), Node::file(0o644, uki))
            .map_err(tree_err("ISO ESP"))?;
        let size = esp_size(esp_tree.data_size());
        let vol = Guid::derive(ESP_NAMESPACE, volume_id.as_bytes()).0;
        let esp = fat::plan_fat32(
            &esp_tree,
            size,
            u32::from_le_bytes([vol[0], vol[1], vol[2], vol[3]]),
            "KILN-ESP",
        )
        .map_err(|e| encode_err("ISO ESP")(Box::new(e)))?;
        Some((volume_id, esp))
    } else {
        None
    };

    // A/B: the UKI goes into slot A, after the root; the ESP boots the
    // chooser.
    let (esp_file, slot) = if ab {
        let uki_offset = round_up(root_image_len, verity::BLOCK);
        let needed = uki_offset + efi.len() as u64 + kiln_boot::slot::HEADER_LEN as u64;
        let size = match &recipe.disk.slot_size {
            Some(s) if s.value < needed => {
                return Err(recipe
                    .error(
                        &s.loc,
                        format!(
                            "the root, its hash tree and the UKI need {} MiB; slot_size is {} MiB",
                            needed.div_ceil(1 << 20),
                            s.value >> 20
                        ),
                    )
                    .into())
            }
            Some(s) => s.value,
            // Room for a later build twice this one's size.
            None => round_up(2 * needed, 1 << 20),
        };
        let header = kiln_boot::SlotHeader {
            root_len: root_image_len,
            uki_offset,
            uki_len: efi.len() as u64,
            uki_sha256: sha2_256(&efi),
            build_id: root_digest.0,
            root_hash: verity.as_ref().map_or([0; 32], |(_, h)| *h),
            name: recipe.name().to_string(),
            version: recipe.version.value.clone(),
            tries: recipe.update.tries,
        };
        let slot = SlotImage {
            size,
            uki: efi,
            header: header.encode(),
            uki_offset,
        };
        (opts.chooser.to_vec(), Some(slot))
    } else {
        (efi, None)
    };

    // EFI system partition.
    step("EFI system partition");
    let mut esp_tree = Tree::new();
    esp_tree
        .insert(Path::new(TARGET.efi_boot_path), Node::file(0o644, esp_file))
        .map_err(tree_err("ESP"))?;
    let esp_size = esp_size(esp_tree.data_size());
    let vol = Guid::derive(ESP_NAMESPACE, &root_guid.0).0;
    let volume_id = u32::from_le_bytes([vol[0], vol[1], vol[2], vol[3]]);
    // Planned, not materialised: streamed (hashed here, written later), so
    // its mostly empty space costs no memory.
    let esp = fat::plan_fat32(&esp_tree, esp_size, volume_id, "KILN-ESP")
        .map_err(|e| encode_err("ESP")(Box::new(e)))?;
    let esp_digest = crate::cache::Hashing::new(fat::FatImage::reader(&esp))
        .finish()
        .map_err(|e| encode_err("ESP")(Box::new(e)))?;
    let esp_guid = Guid::derive(ESP_NAMESPACE, &esp_digest.0);

    // Disk.
    let mut ids = esp_guid.0.to_vec();
    ids.extend_from_slice(&root_guid.0);
    let esp_part = disk::PartitionSpec {
        name: "esp".into(),
        type_guid: ESP_TYPE,
        guid: esp_guid,
        size: esp.size(),
        attributes: 0,
    };
    let disk_size = recipe.disk.size.value;
    let partitions = match &slot {
        None => vec![
            esp_part,
            disk::PartitionSpec {
                name: "root-a".into(),
                type_guid: TARGET.root_type,
                guid: root_guid,
                size: round_up(root_image_len, 1 << 20),
                attributes: 0,
            },
        ],
        Some(slot) => {
            // The data partition takes the rest, in whole MiB.
            let used = disk::ALIGN + esp.size() + 2 * slot.size;
            let room = disk_size.saturating_sub(used + BACKUP_GPT) / disk::ALIGN * disk::ALIGN;
            if room < MIN_DATA {
                return Err(recipe
                    .error(
                        &recipe.disk.size.loc,
                        format!(
                            "an A/B disk needs {} MiB: the ESP {} MiB, two slots of {} MiB (the root, its hash tree and the UKI, twice over: see slot_size) and {} MiB of data; raise disk.size or lower disk.slot_size",
                            (used + MIN_DATA + BACKUP_GPT).div_ceil(1 << 20),
                            esp.size() >> 20,
                            slot.size >> 20,
                            MIN_DATA >> 20,
                        ),
                    )
                    .into());
            }
            let good = kiln_boot::SlotState {
                priority: 1,
                tries: 0,
                successful: true,
            };
            let part = |name: &str, type_guid: [u8; 16], size, attributes| disk::PartitionSpec {
                name: name.into(),
                type_guid: Guid(type_guid),
                guid: Guid::derive(
                    ROOT_NAMESPACE,
                    &[&root_digest.0[..], name.as_bytes()].concat(),
                ),
                size,
                attributes,
            };
            vec![
                esp_part,
                part(
                    "slot-a",
                    kiln_boot::SLOT_TYPE,
                    slot.size,
                    good.to_attributes(0),
                ),
                part("slot-b", kiln_boot::SLOT_TYPE, slot.size, 0),
                part("data", kiln_boot::DATA_TYPE, room, 0),
            ]
        }
    };
    let layout = disk::Layout {
        disk_guid: Guid::derive(DISK_NAMESPACE, &ids),
        size: disk_size,
        partitions,
    };
    if let Err(e) = disk::place(&layout) {
        return Err(recipe
            .error(
                &recipe.disk.size.loc,
                format!(
                    "{e}: the root filesystem is {} MiB and the ESP {} MiB; raise disk.size",
                    root_image_len.div_ceil(1 << 20),
                    esp.size() >> 20
                ),
            )
            .into());
    }
    let data_fs = slot.as_ref().map(|_| {
        let id = |what: &str| {
            Guid::derive(
                DATA_NAMESPACE,
                &[&root_digest.0[..], what.as_bytes()].concat(),
            )
            .0
        };
        kiln_formats::ext4::Ext4Options {
            blocks: DATA_FS_BLOCKS,
            uuid: id("uuid"),
            hash_seed: id("hash seed"),
            time: u32::try_from(plan.source_date_epoch).unwrap_or(u32::MAX),
            label: "kiln-data".into(),
        }
    });
    Ok(Filesystems {
        root,
        root_len,
        root_image_len,
        slot,
        data_fs,
        esp,
        layout,
        kernel_image: kernel.image.clone(),
        cmdline: cmdline.clone(),
        diskless,
        iso,
        uki_parts: (stub.to_vec(), osrel, kernel.release.clone()),
    })
}

/// Writes every format and the plan beside them, all or nothing.
fn write_outputs(
    recipe: &Recipe,
    plan: &Plan,
    fs: &Filesystems,
    out_dir: &Path,
    progress: &dyn Progress,
) -> Result<Built, BuildError> {
    let mut pending = Vec::new();
    let mut images = Vec::new();
    let formats = &recipe.output.formats.value;
    // The raw disk first: every other disk format encodes it. Written
    // where it is wanted, else to a temp file that goes when this returns.
    let mut raw = None;
    if formats.iter().any(|f| f.is_disk()) {
        let raw_path = out_dir.join(Format::Raw.file_name(recipe.name()));
        let mut p = Pending::create(&raw_path)?;
        disk::write_raw(
            &fs.layout,
            match &fs.slot {
                None => vec![
                    Box::new(fat::FatImage::reader(&fs.esp)),
                    Box::new(root_reader(fs)?),
                ],
                // Slot B starts empty, the data partition with a small
                // ext4 the init grows.
                Some(slot) => {
                    let data: Box<dyn std::io::Read> = match &fs.data_fs {
                        Some(o) => Box::new(
                            kiln_formats::ext4::empty_ext4(o)
                                .map_err(|e| encode_err("data ext4")(Box::new(e)))?,
                        ),
                        None => Box::new(std::io::empty()),
                    };
                    vec![
                        Box::new(fat::FatImage::reader(&fs.esp)),
                        Box::new(slot_reader(fs, slot)?),
                        Box::new(std::io::empty()),
                        data,
                    ]
                }
            },
            p.file(),
        )
        .map_err(|e| write_err(&raw_path)(std::io::Error::other(e)))?;
        let source = p.file().try_clone().map_err(write_err(&raw_path))?;
        raw = Some((p, source));
    }
    for format in formats {
        let path = out_dir.join(format.file_name(recipe.name()));
        let written = match format {
            Format::Raw => {
                images.push(path);
                continue;
            }
            Format::Iso => vec![(path.clone(), iso_output(fs, plan, &path)?)],
            Format::Uki => vec![(path.clone(), uki_output(recipe, fs, out_dir, &path)?)],
            Format::KernelInitrd => kernel_initrd_outputs(recipe, fs, out_dir, &path)?,
            _ => {
                let Some((_, source)) = &raw else { continue };
                vec![(
                    path.clone(),
                    disk_output(recipe, plan, fs, *format, source, &path)?,
                )]
            }
        };
        for (path, p) in written {
            images.push(path);
            pending.push(p);
        }
    }
    if let (true, Some((p, _))) = (formats.contains(&Format::Raw), raw) {
        pending.push(p);
    }
    let plan_path = out_dir.join(format!("{}.plan.json", recipe.name()));
    let mut p = Pending::create(&plan_path)?;
    let json = serde_json::to_vec_pretty(plan).unwrap_or_else(|e| {
        // Strings, numbers and lists only: serialising cannot fail.
        unreachable!("plan serialises: {e}")
    });
    p.file()
        .write_all(&json)
        .map_err(|source| OutputError::Write {
            path: plan_path.clone(),
            source,
        })?;
    pending.push(p);
    output::commit(pending)?;
    for path in &images {
        let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        progress.event(&Event::Output {
            path: path.display().to_string(),
            bytes,
        });
    }
    Ok(Built {
        images,
        plan_path,
        kernel_release: String::new(),
        root_size: fs.root_len,
        esp_size: fs.esp.size(),
    })
}

/// An error writing output `path`.
fn write_err(path: &Path) -> impl Fn(std::io::Error) -> BuildError {
    let path = path.to_path_buf();
    move |source| {
        BuildError::Output(OutputError::Write {
            path: path.clone(),
            source,
        })
    }
}

/// A disk format encoding the raw disk `source`.
fn disk_output(
    recipe: &Recipe,
    plan: &Plan,
    fs: &Filesystems,
    format: Format,
    source: &std::fs::File,
    path: &Path,
) -> Result<Pending, BuildError> {
    let size = fs.layout.size;
    let id = vdisk::Identity {
        id: fs.layout.disk_guid.0,
        time: plan.source_date_epoch,
    };
    let mut p = Pending::create(path)?;
    let out = p.file();
    match format {
        Format::Qcow2 => vdisk::write_qcow2(source, size, out, recipe.output.qcow2_compress),
        Format::Vhd => vdisk::write_vhd_fixed(source, size, out, &id),
        Format::VhdDynamic => vdisk::write_vhd_dynamic(source, size, out, &id),
        Format::Vmdk => {
            vdisk::write_vmdk_stream(source, size, out, &id, &format.file_name(recipe.name()))
        }
        Format::Gce => vdisk::write_gce_tar_gz(source, size, out, &id),
        Format::Raw | Format::KernelInitrd | Format::Uki | Format::Iso => Ok(()),
    }
    .map_err(write_err(path))?;
    Ok(p)
}

/// The hybrid ISO: its ESP and the root file.
fn iso_output(fs: &Filesystems, plan: &Plan, path: &Path) -> Result<Pending, BuildError> {
    let Some((volume_id, esp)) = &fs.iso else {
        return Err(write_err(path)(std::io::Error::other(
            "no ISO ESP was made",
        )));
    };
    let mut p = Pending::create(path)?;
    let spec = iso::IsoSpec {
        volume_id: volume_id.clone(),
        time: plan.source_date_epoch,
        disk_guid: Guid::derive(DISK_NAMESPACE, volume_id.as_bytes()),
        esp_guid: Guid::derive(ESP_NAMESPACE, volume_id.as_bytes()),
        esp: Box::new(fat::FatImage::reader(esp)),
        esp_len: esp.size(),
        files: vec![iso::IsoFile {
            path: initcfg::ISO_ROOT.into(),
            len: fs.root_image_len,
            data: Box::new(root_reader(fs)?),
        }],
    };
    iso::write_iso(spec, &mut std::io::BufWriter::new(p.file()))
        .map_err(|e| write_err(path)(std::io::Error::other(e)))?;
    Ok(p)
}

/// The initramfs holding the root (the diskless forms').
fn diskless_tree<'a>(fs: &'a Filesystems, path: &Path) -> Result<&'a Tree, BuildError> {
    fs.diskless
        .as_ref()
        .ok_or_else(|| write_err(path)(std::io::Error::other("no diskless initramfs was made")))
}

/// The UKI alone, streamed: the initramfs (the root inside) goes to a
/// temp file, then from there into the UKI.
fn uki_output(
    recipe: &Recipe,
    fs: &Filesystems,
    out_dir: &Path,
    path: &Path,
) -> Result<Pending, BuildError> {
    let tree = diskless_tree(fs, path)?;
    let tmp = out_dir.join(format!("{}.uki-initrd", recipe.name()));
    let mut t = Pending::create(&tmp)?;
    cpio::write_newc(tree, std::io::BufWriter::new(t.file()))
        .map_err(|e| write_err(&tmp)(std::io::Error::other(e)))?;
    let initrd = t.file().try_clone().map_err(write_err(&tmp))?;
    let len = initrd.metadata().map_err(write_err(&tmp))?.len();
    let (stub, osrel, uname) = &fs.uki_parts;
    let sections = vec![
        uki::UkiSection::bytes(".osrel", osrel.as_bytes()),
        uki::UkiSection::bytes(".cmdline", fs.cmdline.as_bytes()),
        uki::UkiSection::bytes(".uname", uname.as_bytes()),
        uki::UkiSection {
            name: ".initrd",
            len,
            data: Box::new(std::io::BufReader::new(ReadAtStart(initrd, 0))),
        },
        uki::UkiSection::bytes(".linux", &fs.kernel_image[..]),
    ];
    let mut p = Pending::create(path)?;
    uki::write_uki(stub, sections, &mut std::io::BufWriter::new(p.file()))
        .map_err(|e| write_err(path)(std::io::Error::other(e)))?;
    Ok(p)
}

/// NAME-kernel, NAME-initrd.img (the root streamed in from its temp
/// file) and NAME-cmdline.
fn kernel_initrd_outputs(
    recipe: &Recipe,
    fs: &Filesystems,
    out_dir: &Path,
    path: &Path,
) -> Result<Vec<(PathBuf, Pending)>, BuildError> {
    let tree = diskless_tree(fs, path)?;
    let name = recipe.name();
    let mut out = Vec::new();
    for (file, bytes) in [
        (path.to_path_buf(), &fs.kernel_image[..]),
        (
            out_dir.join(format!("{name}-cmdline")),
            format!("{}\n", fs.cmdline).as_bytes(),
        ),
    ] {
        let mut p = Pending::create(&file)?;
        p.file().write_all(bytes).map_err(write_err(&file))?;
        out.push((file, p));
    }
    let initrd = out_dir.join(format!("{name}-initrd.img"));
    let mut p = Pending::create(&initrd)?;
    cpio::write_newc(tree, std::io::BufWriter::new(p.file()))
        .map_err(|e| write_err(&initrd)(std::io::Error::other(e)))?;
    out.push((initrd, p));
    Ok(out)
}

/// Reads a file from an offset with `pread`, whatever its fd's position.
struct ReadAtStart(std::fs::File, u64);

impl std::io::Read for ReadAtStart {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(&self.0, buf, self.1)?;
        self.1 += n as u64;
        Ok(n)
    }
}

/// A reader of the root filesystem from its start.
fn root_reader(fs: &Filesystems) -> Result<std::fs::File, BuildError> {
    std::fs::File::open(&fs.root.tmp).map_err(|source| {
        BuildError::Output(OutputError::Write {
            path: fs.root.path.clone(),
            source,
        })
    })
}

/// Pads the root squashfs (`len` bytes) to whole 4 KiB blocks and
/// appends its dm-verity tree, salted from the root's digest: what the
/// init needs to verify it, its root hash and the new length.
fn append_hash_tree(
    root: &mut Pending,
    len: u64,
    digest: &Digest,
    on_error: initcfg::VerityError,
) -> std::io::Result<((initcfg::RootVerity, [u8; 32]), u64)> {
    use sha2::Digest as _;
    use std::io::Seek;
    let data_len = round_up(len, verity::BLOCK).max(2 * verity::BLOCK);
    let salt: [u8; 32] = sha2::Sha256::new()
        .chain_update(b"kiln verity salt\0")
        .chain_update(digest.0)
        .finalize()
        .into();
    let uuid = Guid::derive(VERITY_NAMESPACE, &digest.0).0;
    let file = root.file();
    file.set_len(data_len)?;
    let mut data = std::io::BufReader::new(ReadAtStart(file.try_clone()?, 0));
    file.seek(std::io::SeekFrom::Start(data_len))?;
    let mut out = std::io::BufWriter::new(file);
    let tree = verity::write_hash_tree(&mut data, data_len, &salt, uuid, &mut out)?;
    out.flush()?;
    let verity = initcfg::RootVerity {
        data_blocks: tree.data_blocks,
        salt: hex(&salt),
        on_error,
    };
    Ok(((verity, tree.root), data_len + tree.len))
}

fn sha2_256(b: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(b).into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The sha256 of a whole file, read from its start.
fn file_digest(f: &mut std::fs::File) -> std::io::Result<Digest> {
    use sha2::Digest as _;
    use std::io::{Read, Seek};
    f.seek(std::io::SeekFrom::Start(0))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Digest(hasher.finalize().into()))
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// FAT32 needs at least 65525 clusters; 64 MiB keeps 512-byte clusters
/// comfortable and leaves room for a second UKI later.
fn esp_size(content: u64) -> u64 {
    round_up((content + content / 4 + (8 << 20)).max(64 << 20), 1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esp_has_room_and_is_mib_aligned() {
        assert_eq!(esp_size(0), 64 << 20);
        let big = esp_size(100 << 20);
        assert!(big >= (100 << 20) + (8 << 20));
        assert_eq!(big % (1 << 20), 0);
    }
}
