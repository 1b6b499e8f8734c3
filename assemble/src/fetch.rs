//! Plan → cache: every pinned input downloaded (in parallel) and verified,
//! then read back as trees and images. Needs no network when the cache
//! already holds everything the plan pins.

use crate::cache::Cache;
use crate::debian::dpkg::{self, Control, Installed};
use crate::debian::sysusers;
use crate::debian::{DebianError, Mirror, Package};
use crate::kernel::{Kernel, KernelError};
use crate::kernel_source::{self, KernelSourceError};
use crate::layers::{self, LayerError};
use crate::oci::{self, Image, ImageConfig, OciError, RegistryOptions};
use crate::plan::{Pin, Plan, STUB_PACKAGE};
use crate::progress::{Event, Progress, Task};
use crate::recipe::{KernelSource, Recipe};
use kiln_formats::tree::{Backing, Node, Tree, TreeError};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Downloads in flight at once.
const PARALLEL_DOWNLOADS: usize = 6;

/// Errors from fetching and unpacking the plan's inputs.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Fetching or unpacking a Debian package failed.
    #[error("{input}")]
    Debian {
        /// The recipe input the package belongs to.
        input: String,
        /// The underlying error.
        source: DebianError,
    },
    /// Pulling a container image failed.
    #[error(transparent)]
    Oci(#[from] OciError),
    /// Reading a layer failed.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// Extracting the kernel failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// Fetching or building the kernel from source failed.
    #[error(transparent)]
    KernelSource(#[from] KernelSourceError),
    /// Assembling a tree from layers failed.
    #[error("{what}")]
    Tree {
        /// What was being assembled.
        what: String,
        /// The underlying error.
        source: TreeError,
    },
    /// The plan lacks a pin the input needs (a hand-edited or stale plan).
    #[error("{input}: the plan pins no {what}")]
    Incomplete {
        /// The recipe input.
        input: String,
        /// What is not pinned.
        what: &'static str,
    },
    /// Configuring a Debian image failed.
    #[error(transparent)]
    Configure(#[from] Box<crate::configure::ConfigureError>),
    /// Making a Debian image's users and groups failed.
    #[error("container {container}: users and groups")]
    Users {
        /// The container.
        container: String,
        /// The underlying error.
        source: crate::debian::sysusers::UsersError,
    },
    /// Reading an input from the cache failed.
    #[error("{what}")]
    Read {
        /// What was read.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Writing to the cache failed.
    #[error("{what}")]
    Cache {
        /// What was written.
        what: String,
        /// The underlying error.
        source: crate::cache::CacheError,
    },
    /// A cached input no longer matches its digest (it is removed, so the
    /// next build fetches it again).
    #[error("{what} is damaged: expected {expected}, got {actual}; it was removed, build again to fetch it")]
    Corrupt {
        /// The input.
        what: String,
        /// Its pinned digest.
        expected: crate::cache::Digest,
        /// The digest of what the cache held.
        actual: crate::cache::Digest,
    },
    /// The stub package does not contain the systemd-stub EFI binary.
    #[error("{package}: has no {path}")]
    NoStub {
        /// The package searched.
        package: String,
        /// The path expected in it.
        path: &'static str,
    },
}

/// A container's image: its root tree and the runtime config it came with.
#[derive(Debug)]
pub struct ContainerImage {
    /// The image's root filesystem, layers applied.
    pub tree: Tree,
    /// The image's runtime config (entrypoint, env, user, ...).
    pub config: ImageConfig,
}

/// Everything the plan pins, fetched and unpacked.
#[derive(Debug)]
pub struct Inputs {
    /// The kernel image and its modules.
    pub kernel: Kernel,
    /// systemd-stub's EFI binary.
    pub stub: Arc<Vec<u8>>,
    /// In recipe container order.
    pub images: Vec<ContainerImage>,
}

/// Fetches and unpacks every input of `plan`.
pub async fn fetch(
    recipe: &Recipe,
    plan: &Plan,
    cache: &Cache,
    registry: &RegistryOptions,
    progress: &Arc<dyn Progress>,
    sandbox: Option<&kiln_sandbox::Sandbox>,
) -> Result<Inputs, FetchError> {
    // Every .deb first, all at once: they are independent.
    let mut debs: Vec<(String, Package)> = Vec::new();
    let pins = [("kernel", &plan.kernel), ("stub", &plan.stub)];
    let image_pins: Vec<(String, Pin)> = plan
        .images
        .iter()
        .map(|i| (i.container.clone(), i.pin.clone()))
        .collect();
    for (input, pin) in pins
        .iter()
        .map(|(n, p)| (n.to_string(), *p))
        .chain(image_pins.iter().map(|(n, p)| (n.clone(), p)))
    {
        for p in &pin.packages {
            let mirror = pin.mirror.clone().ok_or(FetchError::Incomplete {
                input: input.clone(),
                what: "mirror",
            })?;
            debs.push((mirror, p.clone()));
        }
    }
    debs.sort_by(|a, b| (&a.1.sha256, &a.0).cmp(&(&b.1.sha256, &b.0)));
    debs.dedup_by(|a, b| a.1.sha256 == b.1.sha256);
    download_debs(&debs, cache, registry.offline, progress).await?;
    let progress = progress.as_ref();

    // OCI images (registry, layout, archive) in parallel.
    let mut pulls = tokio::task::JoinSet::new();
    let kernel_image = match &recipe.kernel.source.value {
        KernelSource::Image(r) => Some(r.source()),
        _ => None,
    };
    let oci_sources: Vec<(usize, String, crate::cache::Digest)> = recipe
        .containers
        .iter()
        .zip(&plan.images)
        .enumerate()
        .filter_map(|(i, (c, pin))| match &c.image.value {
            crate::recipe::ImageSource::Oci(r) => pin.pin.digest.map(|d| (i, r.source(), d)),
            _ => None,
        })
        .chain(
            kernel_image
                .iter()
                .filter_map(|s| plan.kernel.digest.map(|d| (usize::MAX, s.clone(), d))),
        )
        .collect();
    for (i, source, digest) in oci_sources {
        let cache = cache.clone();
        let registry = registry.clone();
        pulls.spawn(async move {
            let image = oci::pull_pinned(&source, digest, &cache, &registry).await;
            (i, image)
        });
    }
    let mut pulled: BTreeMap<usize, Image> = BTreeMap::new();
    while let Some(done) = pulls.join_next().await {
        let (i, image) = done.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let image = image?;
        progress.event(&Event::Input {
            what: image.reference.clone(),
            bytes: image.layers.iter().map(|l| l.data.len()).sum(),
            cached: true,
        });
        pulled.insert(i, image);
    }

    // Every tree's layers are read (decompressed, checked) on all cores,
    // then applied in order. Trees: 0 kernel, 1 stub, 2.. containers.
    const KERNEL: usize = 0;
    const STUB: usize = 1;
    let mut jobs: Vec<(usize, Source)> = Vec::new();
    if let KernelSource::Debian(..) = &recipe.kernel.source.value {
        jobs.extend(deb_jobs(KERNEL, &plan.kernel));
    }
    jobs.extend(deb_jobs(STUB, &plan.stub));
    let mut configs = Vec::new();
    for (i, pin) in plan.images.iter().enumerate() {
        match pulled.remove(&i) {
            Some(image) => {
                jobs.extend(image.layers.into_iter().map(|l| (i + 2, Source::Layer(l))));
                configs.push(image.config);
            }
            None => {
                jobs.extend(deb_jobs(i + 2, &pin.pin));
                configs.push(ImageConfig::default());
            }
        }
    }
    let (mut trees, mut installed) = unpack(cache, jobs, plan.images.len() + 2)?;

    let kernel = match &recipe.kernel.source.value {
        KernelSource::Debian(..) => Kernel::from_tree(&trees[KERNEL])?,
        KernelSource::Image(_) => {
            let image = pulled.remove(&usize::MAX).ok_or(FetchError::Incomplete {
                input: "kernel".into(),
                what: "image digest",
            })?;
            Kernel::from_tree(&kernel_source::from_image(&image)?)?
        }
        KernelSource::Path { image, modules } => {
            let tree = kernel_source::from_path(
                recipe.dir(),
                &image.display().to_string(),
                modules.as_ref().map(|m| m.display().to_string()).as_deref(),
            )?;
            Kernel::from_tree(&tree)?
        }
    };

    let stub = match trees[STUB].get(Path::new(crate::arch::TARGET.stub_path)) {
        Some(Node::File { data, .. }) => Arc::new(
            data.bytes()
                .map_err(|source| FetchError::Read {
                    what: format!("{STUB_PACKAGE}: {}", crate::arch::TARGET.stub_path),
                    source,
                })?
                .into_owned(),
        ),
        _ => {
            return Err(FetchError::NoStub {
                package: STUB_PACKAGE.into(),
                path: crate::arch::TARGET.stub_path,
            })
        }
    };

    let mut images = Vec::new();
    for ((((c, config), tree), installed), pin) in recipe
        .containers
        .iter()
        .zip(configs)
        .zip(trees.drain(2..))
        .zip(installed.drain(2..))
        .zip(&plan.images)
    {
        let mut tree = tree;
        // The recipe's files for this image, before its scripts run.
        let mut file_key = String::new();
        for f in recipe.files.iter().filter(|f| {
            f.container
                .as_ref()
                .is_some_and(|n| n.value == c.name.value)
        }) {
            let node = file_node(f, plan.source_date_epoch).map_err(|(path, source)| {
                FetchError::Read {
                    what: path.display().to_string(),
                    source,
                }
            })?;
            if let Node::File { data, .. } = &node {
                let bytes = data.bytes().map_err(|source| FetchError::Read {
                    what: f.path.value.clone(),
                    source,
                })?;
                file_key.push_str(&format!(
                    "{} {:o} {}:{} {}\n",
                    f.path.value,
                    f.mode,
                    f.uid,
                    f.gid,
                    crate::cache::Digest::of(&bytes)
                ));
            }
            tree.insert(Path::new(&f.path.value), node)
                .map_err(|source| FetchError::Tree {
                    what: format!("container {}: [[file]] {}", c.name.value, f.path.value),
                    source,
                })?;
        }
        if let crate::recipe::ImageSource::Debian { scripts, .. } = c.image.value {
            let tree_err = |what: &str| {
                let what = format!("container {}: {what}", c.name.value);
                move |source| FetchError::Tree { what, source }
            };
            merge_usr(&mut tree).map_err(tree_err("merging /usr"))?;
            dpkg::write(&mut tree, &installed, plan.source_date_epoch)
                .map_err(tree_err("dpkg's database"))?;
            sysusers::apply(&mut tree, plan.source_date_epoch).map_err(|source| {
                FetchError::Users {
                    container: c.name.value.clone(),
                    source,
                }
            })?;
            if scripts {
                let debs: Vec<_> = pin.pin.packages.iter().map(|p| p.sha256).collect();
                let image = crate::configure::Unpacked {
                    container: &c.name.value,
                    tree: &tree,
                    installed: &installed,
                    debs: &debs,
                    files: &file_key,
                    epoch: plan.source_date_epoch,
                };
                tree = crate::configure::configure(&image, cache, sandbox).map_err(Box::new)?;
            }
        }
        images.push(ContainerImage { tree, config });
    }
    Ok(Inputs {
        kernel,
        stub,
        images,
    })
}

/// The tree node of a recipe `[[file]]` (a source file is streamed from
/// disk when the root is written); a read error names the file.
pub(crate) fn file_node(
    f: &crate::recipe::FileSpec,
    mtime: u64,
) -> Result<Node, (std::path::PathBuf, std::io::Error)> {
    let data = match &f.contents {
        crate::recipe::FileContents::Inline(c) => kiln_formats::tree::FileData::from(c.clone()),
        crate::recipe::FileContents::Source(p) => {
            let io = |e| (p.value.clone(), e);
            let file = std::fs::File::open(&p.value).map_err(io)?;
            let len = file.metadata().map_err(io)?.len();
            kiln_formats::tree::FileData::extent(
                &Backing::new(file, p.value.display().to_string()),
                0,
                len,
            )
        }
    };
    Ok(Node::File {
        meta: kiln_formats::tree::Meta {
            mode: f.mode & 0o7777,
            uid: f.uid,
            gid: f.gid,
            mtime,
            xattrs: Default::default(),
        },
        data,
    })
}

/// Where one layer of a tree comes from.
enum Source {
    /// A cached .deb: its data.tar.
    Deb(Package),
    /// An image layer already in memory.
    Layer(layers::Layer),
}

fn deb_jobs(tree: usize, pin: &Pin) -> impl Iterator<Item = (usize, Source)> + '_ {
    pin.packages
        .iter()
        .map(move |p| (tree, Source::Deb(p.clone())))
}

/// Reads every job's layer on all cores, then applies them in job order to
/// `n` trees.
/// A layer read, and the control files of the .deb it came from.
type LayerRead = (layers::Parsed, Option<Control>);

fn unpack(
    cache: &Cache,
    jobs: Vec<(usize, Source)>,
    n: usize,
) -> Result<(Vec<Tree>, Vec<Vec<Installed>>), FetchError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<LayerRead, FetchError>>>> =
        jobs.iter().map(|_| Mutex::new(None)).collect();
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(jobs.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((_, source)) = jobs.get(i) else {
                    break;
                };
                let r = read_layer(cache, source);
                *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            });
        }
    });
    let mut trees: Vec<Tree> = (0..n).map(|_| Tree::new()).collect();
    let mut installed: Vec<Vec<Installed>> = (0..n).map(|_| Vec::new()).collect();
    for ((tree, _), r) in jobs.iter().zip(results) {
        let (parsed, control) = r
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .expect("every job index was taken by a worker")?;
        layers::apply_parsed(&mut trees[*tree], &parsed)?;
        if let Some(control) = control {
            installed[*tree].push(Installed {
                control,
                paths: parsed.paths(),
            });
        }
    }
    Ok((trees, installed))
}

/// Cache record kind: blob digest → digest of its tar, decompressed.
const TAR_REF: &str = "tar";

/// Reads one layer's entries. Every layer is kept in the cache as a plain
/// tar (decompressed once, keyed by the digest of the blob it came from),
/// and its files become extents of that tar: the tree holds no file data,
/// so memory does not grow with the image.
fn read_layer(cache: &Cache, source: &Source) -> Result<LayerRead, FetchError> {
    let (name, digest) = match source {
        Source::Deb(p) => (format!("debian:{}={}", p.name, p.version), p.sha256),
        Source::Layer(l) => (l.source.clone(), l.digest),
    };
    // A .deb's control files are kept beside its unpacked data.
    let control = match source {
        Source::Deb(_) => match cached_control(cache, &digest) {
            Some(c) => Some(c),
            None => return unpack_deb(cache, &name, source_pkg(source)),
        },
        Source::Layer(_) => None,
    };
    // An uncompressed blob in the cache is its own plain tar.
    if let Source::Layer(layers::Layer {
        compression: layers::Compression::None,
        data: layers::LayerData::File {
            path, offset: 0, ..
        },
        ..
    }) = source
    {
        return Ok((parse_plain(&name, digest, path, &digest)?, None));
    }
    if let Some(tar) = cache
        .read_ref(TAR_REF, &digest.to_string())
        .and_then(|d| d.parse::<crate::cache::Digest>().ok())
    {
        let path = cache.blob_path(&tar);
        match parse_plain(&name, digest, &path, &tar) {
            Ok(parsed) => return Ok((parsed, control)),
            // Damaged or gone: made again below.
            Err(_) => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    match source {
        Source::Deb(p) => unpack_deb(cache, &name, p),
        Source::Layer(l) => {
            let read_err = |e: std::io::Error| FetchError::Read {
                what: format!("{name} layer {digest}"),
                source: e,
            };
            let mut raw = crate::cache::Hashing::new(l.data.open().map_err(read_err)?);
            let (parsed, tar) = store_plain(cache, &name, digest, l.compression, &mut raw)?;
            // A blob read from disk is checked again as it is unpacked.
            if matches!(l.data, layers::LayerData::File { .. }) {
                let actual = raw.finish().map_err(read_err)?;
                if actual != digest {
                    return Err(FetchError::Corrupt {
                        what: format!("{name} layer"),
                        expected: digest,
                        actual,
                    });
                }
            }
            commit_plain(cache, digest, tar)?;
            Ok((parsed, None))
        }
    }
}

fn source_pkg(source: &Source) -> &Package {
    match source {
        Source::Deb(p) => p,
        Source::Layer(_) => unreachable!("only called for .debs"),
    }
}

/// Cache record kind: .deb digest → digest of its control.tar, decompressed.
const CONTROL_REF: &str = "deb-control";

fn cached_control(cache: &Cache, deb: &crate::cache::Digest) -> Option<Control> {
    let d: crate::cache::Digest = cache
        .read_ref(CONTROL_REF, &deb.to_string())?
        .parse()
        .ok()?;
    let tar = cache.get(&d).ok()??;
    Control::from_tar(&tar[..]).ok()
}

/// Reads a cached .deb as a stream, unpacking its data.tar into the cache
/// and checking the whole .deb against its pinned digest.
fn unpack_deb(cache: &Cache, name: &str, p: &Package) -> Result<LayerRead, FetchError> {
    let what = format!("{} {}", p.name, p.version);
    let pkg = format!("{}={}", p.name, p.version);
    let path = cache.blob_path(&p.sha256);
    let file = std::fs::File::open(&path).map_err(|e| FetchError::Read {
        what: format!("{what}: {}", path.display()),
        source: e,
    })?;
    let deb_err = |message: String| FetchError::Debian {
        input: what.clone(),
        source: DebianError::Deb {
            package: pkg.clone(),
            message,
        },
    };
    let mut deb = crate::debian::ar::Stream::new(crate::cache::Hashing::new(
        std::io::BufReader::with_capacity(1 << 16, file),
    ));
    let mut first = true;
    let mut found = None;
    let mut control = None;
    while let Some((member, size)) = deb.next_header().map_err(&deb_err)? {
        if std::mem::take(&mut first) {
            let mut version = vec![0; usize::try_from(size.min(16)).unwrap_or(16)];
            std::io::Read::read_exact(deb.inner(), &mut version)
                .map_err(|e| deb_err(format!("reading: {e}")))?;
            if member != "debian-binary" || !version.starts_with(b"2.") {
                return Err(deb_err("not a Debian 2.x binary package".into()));
            }
            deb.skip(size - version.len() as u64).map_err(&deb_err)?;
            continue;
        }
        if let Some(c) = member.strip_prefix("control.tar") {
            let compression = match c {
                "" => layers::Compression::None,
                ".gz" => layers::Compression::Gzip,
                ".xz" => layers::Compression::Xz,
                ".zst" => layers::Compression::Zstd,
                _ => return Err(deb_err(format!("unknown member {member}"))),
            };
            let mut tar = Vec::new();
            let mut stream = std::io::Read::take(deb.inner(), size);
            layers::decompress_stream(compression, &mut stream)
                .and_then(|mut r| std::io::Read::read_to_end(&mut r, &mut tar))
                .and_then(|_| std::io::copy(&mut stream, &mut std::io::sink()))
                .map_err(|e| deb_err(format!("reading {member}: {e}")))?;
            // Members are padded to even length; control.tar is never last.
            if size % 2 == 1 {
                std::io::Read::read_exact(deb.inner(), &mut [0])
                    .map_err(|e| deb_err(format!("reading: {e}")))?;
            }
            let parsed = Control::from_tar(&tar[..])
                .map_err(|e| deb_err(format!("reading {member}: {e}")))?;
            control = Some((parsed, tar));
            continue;
        }
        let compression = match member.as_str() {
            "data.tar" => layers::Compression::None,
            "data.tar.gz" => layers::Compression::Gzip,
            "data.tar.xz" => layers::Compression::Xz,
            "data.tar.zst" => layers::Compression::Zstd,
            _ => {
                deb.skip(size).map_err(&deb_err)?;
                continue;
            }
        };
        let mut member = std::io::Read::take(deb.inner(), size);
        found = Some(store_plain(
            cache,
            name,
            p.sha256,
            compression,
            &mut member,
        )?);
        std::io::copy(&mut member, &mut std::io::sink())
            .map_err(|e| deb_err(format!("reading: {e}")))?;
        break;
    }
    let Some((parsed, tar)) = found else {
        return Err(deb_err("no data.tar member".into()));
    };
    let actual = deb
        .inner()
        .finish()
        .map_err(|e| deb_err(format!("reading: {e}")))?;
    if actual != p.sha256 {
        // Fetched again by the next build.
        let _ = std::fs::remove_file(&path);
        return Err(FetchError::Corrupt {
            what: format!("{what}: the cached .deb"),
            expected: p.sha256,
            actual,
        });
    }
    let Some((control, control_tar)) = control else {
        return Err(deb_err("no control.tar member".into()));
    };
    commit_plain(cache, p.sha256, tar)?;
    // Only a speed-up for the next build: a failure to keep it is not one.
    if let Ok(d) = cache.put_new(&control_tar) {
        let _ = cache.write_ref(CONTROL_REF, &p.sha256.to_string(), &d.to_string());
    }
    Ok((parsed, Some(control)))
}

/// Decompresses `raw` into a new cache blob while reading its entries,
/// whose files are extents of that blob. Not committed yet: the caller
/// first checks where `raw` came from.
pub(crate) fn store_plain(
    cache: &Cache,
    name: &str,
    digest: crate::cache::Digest,
    compression: layers::Compression,
    raw: &mut dyn std::io::Read,
) -> Result<(layers::Parsed, crate::cache::BlobWriter), FetchError> {
    let read_err = |e: std::io::Error| FetchError::Read {
        what: format!("{name} layer {digest}"),
        source: e,
    };
    let mut out = cache.blob_writer().map_err(|source| FetchError::Cache {
        what: format!("{name} layer {digest}"),
        source,
    })?;
    let backing = Backing::new(
        std::fs::File::open(out.temp_path()).map_err(read_err)?,
        format!("{name} layer {digest} (unpacked)"),
    );
    let stream = layers::decompress_stream(compression, raw).map_err(read_err)?;
    let mut tee = Tee {
        inner: stream,
        out: &mut out,
    };
    let parsed = layers::parse_stream(name, digest, &mut tee, Some(&backing))?;
    std::io::copy(&mut tee, &mut std::io::sink()).map_err(read_err)?;
    Ok((parsed, out))
}

fn commit_plain(
    cache: &Cache,
    digest: crate::cache::Digest,
    tar: crate::cache::BlobWriter,
) -> Result<(), FetchError> {
    commit_ref(cache, TAR_REF, &digest.to_string(), tar)
}

/// Stores `tar` and records it under (`kind`, `key`).
pub(crate) fn commit_ref(
    cache: &Cache,
    kind: &str,
    key: &str,
    tar: crate::cache::BlobWriter,
) -> Result<(), FetchError> {
    let cache_err = |source| FetchError::Cache {
        what: format!("{kind} {key}"),
        source,
    };
    let (tar, _) = tar.commit(None).map_err(cache_err)?;
    cache
        .write_ref(kind, key, &tar.to_string())
        .map_err(cache_err)
}

/// Reads a plain tar in the cache, checking it against `expected`.
pub(crate) fn parse_plain(
    name: &str,
    digest: crate::cache::Digest,
    path: &Path,
    expected: &crate::cache::Digest,
) -> Result<layers::Parsed, FetchError> {
    let read_err = |e: std::io::Error| FetchError::Read {
        what: format!("{name} layer {digest}: {}", path.display()),
        source: e,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let backing = Backing::new(
        file.try_clone().map_err(read_err)?,
        path.display().to_string(),
    );
    let mut r = crate::cache::Hashing::new(std::io::BufReader::with_capacity(1 << 16, file));
    let parsed = layers::parse_stream(name, digest, &mut r, Some(&backing))?;
    let actual = r.finish().map_err(read_err)?;
    if actual != *expected {
        return Err(FetchError::Corrupt {
            what: format!("{name} layer {digest}: {}", path.display()),
            expected: *expected,
            actual,
        });
    }
    Ok(parsed)
}

/// Copies what is read from `inner` to `out`.
struct Tee<'a, R> {
    inner: R,
    out: &'a mut crate::cache::BlobWriter,
}

impl<R: std::io::Read> std::io::Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        std::io::Write::write_all(self.out, &buf[..n])?;
        Ok(n)
    }
}

/// Downloads every missing .deb, `PARALLEL_DOWNLOADS` at a time.
async fn download_debs(
    debs: &[(String, Package)],
    cache: &Cache,
    offline: bool,
    progress: &Arc<dyn Progress>,
) -> Result<(), FetchError> {
    let mut mirrors: BTreeMap<String, Mirror> = BTreeMap::new();
    for (url, _) in debs {
        if !mirrors.contains_key(url) {
            let m = Mirror::new(url, cache, offline).map_err(|source| FetchError::Debian {
                input: url.clone(),
                source,
            })?;
            mirrors.insert(url.clone(), m);
        }
    }
    let sem = Arc::new(tokio::sync::Semaphore::new(PARALLEL_DOWNLOADS));
    let mut set = tokio::task::JoinSet::new();
    for (url, pkg) in debs {
        let mirror = mirrors[url].clone();
        if mirror.is_cached(pkg) {
            progress.event(&Event::Input {
                what: format!("{} {}", pkg.name, pkg.version),
                bytes: pkg.size,
                cached: true,
            });
            continue;
        }
        let pkg = pkg.clone();
        let sem = Arc::clone(&sem);
        let progress = Arc::clone(progress);
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let r = mirror
                .download(&pkg, &|n| progress.bytes(Task::Download, n))
                .await;
            (pkg, r)
        });
    }
    while let Some(done) = set.join_next().await {
        let (pkg, r) = done.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        r.map_err(|source| FetchError::Debian {
            input: format!("{} {}", pkg.name, pkg.version),
            source,
        })?;
        progress.event(&Event::Input {
            what: format!("{} {}", pkg.name, pkg.version),
            bytes: pkg.size,
            cached: false,
        });
    }
    Ok(())
}

/// Debian's merged /usr layout, as base-files sets it up on a real system:
/// `/bin`, `/sbin` and `/lib*` become symlinks into `/usr`, with whatever a
/// package shipped there (older suites) moved below `/usr`.
pub fn merge_usr(tree: &mut Tree) -> Result<(), TreeError> {
    use std::path::PathBuf;
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
}
