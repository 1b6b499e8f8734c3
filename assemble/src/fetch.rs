//! Plan → cache: every pinned input downloaded (in parallel) and verified,
//! then read back as trees and images. Needs no network when the cache
//! already holds everything the plan pins.

use crate::cache::Cache;
use crate::debian::{self, DebianError, Mirror, Package};
use crate::kernel::{Kernel, KernelError};
use crate::kernel_source::{self, KernelSourceError};
use crate::layers::{self, LayerError};
use crate::oci::{self, Image, ImageConfig, OciError, RegistryOptions};
use crate::plan::{Pin, Plan, STUB_PACKAGE};
use crate::progress::{Event, Progress};
use crate::recipe::{KernelSource, Recipe};
use kiln_formats::tree::{Node, Tree, TreeError};
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
    progress: &dyn Progress,
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
            bytes: image.layers.iter().map(|l| l.data.len() as u64).sum(),
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
    let mut trees = unpack(cache, jobs, plan.images.len() + 2)?;

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
        Some(Node::File { data, .. }) => data.clone(),
        _ => {
            return Err(FetchError::NoStub {
                package: STUB_PACKAGE.into(),
                path: crate::arch::TARGET.stub_path,
            })
        }
    };

    let mut images = Vec::new();
    for ((c, config), tree) in recipe.containers.iter().zip(configs).zip(trees.drain(2..)) {
        let mut tree = tree;
        if matches!(c.image.value, crate::recipe::ImageSource::Debian { .. }) {
            merge_usr(&mut tree).map_err(|source| FetchError::Tree {
                what: format!("container {}: merging /usr", c.name.value),
                source,
            })?;
        }
        images.push(ContainerImage { tree, config });
    }
    Ok(Inputs {
        kernel,
        stub,
        images,
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
fn unpack(cache: &Cache, jobs: Vec<(usize, Source)>, n: usize) -> Result<Vec<Tree>, FetchError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<layers::Parsed, FetchError>>>> =
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
    for ((tree, _), r) in jobs.iter().zip(results) {
        let parsed = r
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .expect("every job index was taken by a worker")?;
        layers::apply_parsed(&mut trees[*tree], &parsed)?;
    }
    Ok(trees)
}

fn read_layer(cache: &Cache, source: &Source) -> Result<layers::Parsed, FetchError> {
    let layer = match source {
        Source::Deb(p) => {
            let what = format!("{} {}", p.name, p.version);
            let deb = cache
                .get(&p.sha256)
                .map_err(|e| FetchError::Debian {
                    input: what.clone(),
                    source: e.into(),
                })?
                .ok_or_else(|| FetchError::Debian {
                    input: what.clone(),
                    source: DebianError::Http {
                        url: p.filename.clone(),
                        message: "vanished from the cache during the build".into(),
                    },
                })?;
            debian::deb_layer(&format!("{}={}", p.name, p.version), p.sha256, &deb).map_err(
                |source| FetchError::Debian {
                    input: what,
                    source,
                },
            )?
        }
        Source::Layer(l) => l.clone(),
    };
    Ok(layers::parse(&fast_layer(cache, layer)?)?)
}

/// Layers in a slow compression (xz, gzip) are decompressed once and kept
/// in the cache as zstd, keyed by the digest of the blob they came from;
/// later builds read the zstd copy (verified by its own digest).
fn fast_layer(cache: &Cache, layer: layers::Layer) -> Result<layers::Layer, FetchError> {
    use layers::Compression;
    if matches!(layer.compression, Compression::None | Compression::Zstd) {
        return Ok(layer);
    }
    let key = layer.digest.to_string();
    let cached = cache
        .read_ref(ZSTD_TAR_REF, &key)
        .and_then(|d| d.parse().ok())
        .and_then(|d| cache.get(&d).ok().flatten());
    if let Some(data) = cached {
        return Ok(layers::Layer {
            compression: Compression::Zstd,
            data: Arc::new(data),
            ..layer
        });
    }
    let read_err = |message: String| LayerError::Read {
        source_name: layer.source.clone(),
        digest: layer.digest,
        message,
    };
    let mut tar = Vec::new();
    std::io::Read::read_to_end(
        &mut layers::decompress(&layer).map_err(|e| read_err(format!("decompressing: {e}")))?,
        &mut tar,
    )
    .map_err(|e| read_err(format!("decompressing: {e}")))?;
    // Only a speed-up: a failure to store it is not an error.
    if let Ok(zst) = zstd::encode_all(&tar[..], ZSTD_TAR_LEVEL) {
        if let Ok(d) = cache.put_new(&zst) {
            let _ = cache.write_ref(ZSTD_TAR_REF, &key, &d.to_string());
        }
    }
    Ok(layers::Layer {
        compression: Compression::None,
        data: Arc::new(tar),
        ..layer
    })
}

/// Cache record kind: blob digest → digest of its tar as zstd.
const ZSTD_TAR_REF: &str = "zstd-tar";
/// The fastest level: written once per blob, read at about 1 GB/s.
const ZSTD_TAR_LEVEL: i32 = 1;

/// Downloads every missing .deb, `PARALLEL_DOWNLOADS` at a time.
async fn download_debs(
    debs: &[(String, Package)],
    cache: &Cache,
    offline: bool,
    progress: &dyn Progress,
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
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let r = mirror.fetch(&pkg).await.map(|_| ());
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
