//! Recipe → plan: every input pinned by digest, before anything is fetched.
//!
//! The plan is what the lock file holds (TOML beside the recipe) and what
//! `NAME.plan.json` records beside the image. With a lock, pins are reused
//! and only inputs the recipe added or changed are resolved (as Cargo does);
//! [`LockMode::Locked`] refuses to resolve anything, [`LockMode::Update`]
//! re-resolves the named inputs (or all). Local sources (a kernel file, an
//! OCI layout, a docker archive) are always read again and their digest
//! compared with the pin, since the user owns them.

use crate::cache::{Cache, Digest};
use crate::debian::{Archive, DebianError, Package};
use crate::oci::{self, OciError, RegistryOptions};
use crate::progress::{Event, Progress};
use crate::recipe::{DebianSuite, ImageRef, ImageSource, KernelSource, Loc, Recipe, RecipeError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Version of the lock file format; bumped when its meaning changes.
pub const LOCK_VERSION: u32 = 1;
/// Debian package holding systemd-stub, the UKI's EFI stub.
pub const STUB_PACKAGE: &str = "systemd-boot-efi";

/// Every input of a build, pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Lock file format version ([`LOCK_VERSION`]).
    pub lock_version: u32,
    /// The recipe's name.
    pub name: String,
    /// Seconds since the epoch that every timestamp in the image derives
    /// from: the newest Debian archive date among the inputs (or the
    /// `SOURCE_DATE_EPOCH` environment variable).
    pub source_date_epoch: u64,
    /// Debian suites whose signed index the pins came from.
    #[serde(default, rename = "suite", skip_serializing_if = "Vec::is_empty")]
    pub suites: Vec<PinnedSuite>,
    /// The kernel package (or file or image).
    pub kernel: Pin,
    /// systemd-stub's package, from the kernel's suite.
    pub stub: Pin,
    /// One per container, in recipe order (onboot, then services).
    #[serde(default, rename = "image", skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImagePin>,
}

/// A Debian suite as verified when the plan was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedSuite {
    /// Mirror base URL.
    pub mirror: String,
    /// Suite name (e.g. `trixie`).
    pub suite: String,
    /// Digest of the verified InRelease file.
    pub inrelease: Digest,
    /// Its `Date:`.
    pub date: u64,
}

/// One pinned input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// What the recipe asked for, e.g. `debian:trixie:busybox-static`,
    /// `127.0.0.1:5000/app:1`, `oci-layout:img:v1`, `path:vmlinuz`.
    pub source: String,
    /// Debian mirror the packages come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    /// Manifest digest (registry, layout), image ID (docker archive) or
    /// file sha256 (kernel path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// Debian packages, the whole dependency closure, sorted by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<Package>,
}

/// A container's pinned image, as the lock file records it: its name and
/// the pin's fields in one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePin {
    /// The container's name in the recipe.
    pub container: String,
    /// The image's pin.
    #[serde(flatten)]
    pub pin: Pin,
}

/// How an existing lock is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockMode {
    /// Keep its pins; resolve only what is new or changed.
    Reuse,
    /// Keep its pins; anything new or changed is an error.
    Locked,
    /// Resolve these inputs again (container names, `kernel`, `stub`); all
    /// when empty.
    Update(Vec<String>),
}

impl LockMode {
    fn updates(&self, name: &str) -> bool {
        match self {
            LockMode::Update(names) => names.is_empty() || names.iter().any(|n| n == name),
            _ => false,
        }
    }
}

/// One difference between the lock and the new plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `kernel`, `stub` or a container name.
    pub input: String,
    /// What changed, in words.
    pub what: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.input, self.what)
    }
}

/// Errors from resolving a recipe into a plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The recipe is invalid.
    #[error(transparent)]
    Recipe(#[from] Box<RecipeError>),
    /// Resolving Debian packages for an input failed.
    #[error("{input}")]
    Debian {
        /// The input (`kernel`, `stub` or a container name).
        input: String,
        /// The underlying error.
        source: DebianError,
    },
    /// Resolving a container image failed.
    #[error(transparent)]
    Oci(#[from] OciError),
    /// Reading the lock file or a kernel file failed.
    #[error("reading {}", path.display())]
    Io {
        /// The file read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The lock file cannot be parsed or has an unknown version.
    #[error("lock file {}: {message}", path.display())]
    BadLock {
        /// The lock file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// With `--locked`, the lock does not match the recipe.
    #[error("--locked: the lock does not match the recipe:\n  {}\nrun `kiln lock` (or build without --locked) to update it", changes.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("\n  "))]
    LockedDrift {
        /// The differences.
        changes: Vec<Change>,
    },
}

impl PlanError {
    /// Whether the recipe or the command line is at fault (exit status 2).
    pub fn is_recipe_error(&self) -> bool {
        match self {
            PlanError::Recipe(_) | PlanError::BadLock { .. } | PlanError::LockedDrift { .. } => {
                true
            }
            PlanError::Debian { source, .. } => source.is_recipe_error(),
            _ => false,
        }
    }
}

/// What resolution needs besides the recipe.
pub struct ResolveOptions<'a> {
    /// The cache for downloads and verified indexes.
    pub cache: &'a Cache,
    /// OpenPGP keyring that signs the Debian archive.
    pub keyring: &'a Path,
    /// How to reach container registries.
    pub registry: &'a RegistryOptions,
    /// The existing lock, if any.
    pub lock: Option<&'a Plan>,
    /// How the existing lock is used.
    pub mode: LockMode,
    /// Receives progress events.
    pub progress: &'a dyn Progress,
}

/// A resolved plan and how it differs from the lock it started from.
#[derive(Debug)]
pub struct Resolved {
    /// The new plan.
    pub plan: Plan,
    /// How it differs from the lock it started from.
    pub changes: Vec<Change>,
}

/// The lock's key for a Debian package set.
fn debian_source(suite: &DebianSuite, packages: &[String]) -> String {
    let mut sorted = packages.to_vec();
    sorted.sort();
    if suite.mirror == crate::recipe::DEFAULT_MIRROR {
        format!("debian:{}:{}", suite.suite, sorted.join(","))
    } else {
        format!(
            "debian:{}#{}:{}",
            suite.mirror,
            suite.suite,
            sorted.join(",")
        )
    }
}

/// A path as the lock records it: relative to the recipe when below it,
/// so a lock stays valid in another checkout.
fn portable(recipe: &Recipe, p: &Path) -> String {
    p.strip_prefix(recipe.dir())
        .unwrap_or(p)
        .display()
        .to_string()
}

fn image_source(recipe: &Recipe, r: &ImageRef) -> String {
    match r {
        ImageRef::Registry(s) => s.clone(),
        ImageRef::OciLayout { dir, tag: None } => format!("oci-layout:{}", portable(recipe, dir)),
        ImageRef::OciLayout { dir, tag: Some(t) } => {
            format!("oci-layout:{}:{t}", portable(recipe, dir))
        }
        ImageRef::DockerArchive(f) => format!("docker-archive:{}", portable(recipe, f)),
    }
}

/// The lock key of the kernel source.
pub fn kernel_source_key(recipe: &Recipe) -> String {
    match &recipe.kernel.source.value {
        KernelSource::Debian(suite, pkg) => debian_source(suite, std::slice::from_ref(pkg)),
        KernelSource::Image(r) => image_source(recipe, r),
        KernelSource::Path { image, modules } => match modules {
            None => format!("path:{}", portable(recipe, image)),
            Some(m) => format!("path:{}+{}", portable(recipe, image), portable(recipe, m)),
        },
    }
}

/// Opened Debian suites, by (mirror, suite).
struct Archives<'a> {
    opts: &'a ResolveOptions<'a>,
    open: BTreeMap<DebianSuite, Archive>,
}

impl Archives<'_> {
    async fn get(&mut self, input: &str, s: &DebianSuite) -> Result<&Archive, PlanError> {
        if !self.open.contains_key(s) {
            self.opts.progress.event(&Event::Step {
                message: format!("verifying Debian {} index", s.suite),
            });
            let a = Archive::open(
                &s.mirror,
                &s.suite,
                self.opts.keyring,
                self.opts.cache,
                self.opts.registry.offline,
            )
            .await
            .map_err(|source| PlanError::Debian {
                input: input.to_string(),
                source,
            })?;
            self.open.insert(s.clone(), a);
        }
        Ok(&self.open[s])
    }
}

fn describe_packages(old: &[Package], new: &[Package]) -> Vec<String> {
    let old: BTreeMap<&str, &str> = old
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str()))
        .collect();
    let new: BTreeMap<&str, &str> = new
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str()))
        .collect();
    let mut out = Vec::new();
    for (name, v) in &new {
        match old.get(name) {
            None => out.push(format!("{name} {v} added")),
            Some(o) if o != v => out.push(format!("{name} {o} -> {v}")),
            _ => {}
        }
    }
    for (name, v) in &old {
        if !new.contains_key(name) {
            out.push(format!("{name} {v} removed"));
        }
    }
    out
}

/// How `new` differs from `old` (None: not in the lock).
fn diff(input: &str, old: Option<&Pin>, new: &Pin) -> Vec<Change> {
    let change = |what: String| Change {
        input: input.to_string(),
        what,
    };
    let Some(old) = old else {
        return vec![change(format!("{} added", new.source))];
    };
    if old.source != new.source {
        return vec![change(format!("{} -> {}", old.source, new.source))];
    }
    let mut out = Vec::new();
    if old.digest != new.digest {
        let show = |d: Option<Digest>| d.map_or("none".to_string(), |d| d.to_string());
        out.push(change(format!(
            "{} {} -> {}",
            new.source,
            show(old.digest),
            show(new.digest)
        )));
    }
    out.extend(
        describe_packages(&old.packages, &new.packages)
            .into_iter()
            .map(change),
    );
    out
}

/// A .deb from disk named by a recipe, read at every resolve (it may have
/// changed) and put in the cache, where the fetch stage finds it.
#[derive(Debug, Clone)]
struct LocalDeb {
    package: Package,
    /// Its Pre-Depends and Depends: the first alternative of each group.
    depends: Vec<String>,
}

/// Local .debs by path as written in the recipe.
type LocalDebs = BTreeMap<String, LocalDeb>;

fn local_debs(recipe: &Recipe, cache: &Cache) -> Result<LocalDebs, PlanError> {
    let mut out = LocalDebs::new();
    for c in &recipe.containers {
        let ImageSource::Debian { debs, .. } = &c.image.value else {
            continue;
        };
        for d in debs {
            if out.contains_key(d) {
                continue;
            }
            let bad = |msg: String| -> PlanError {
                recipe
                    .error(&c.image.loc, format!("debs: {d}: {msg}"))
                    .into()
            };
            let path = recipe.dir().join(d);
            let data = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
            let control = crate::debian::read_control(&data).map_err(bad)?;
            let field = |f: &str| control.field(f).ok_or_else(|| bad(format!("no {f} field")));
            let sha256 = Digest::of(&data);
            cache.put(&sha256, &data).map_err(|e| PlanError::Io {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
            let depends = ["Pre-Depends", "Depends"]
                .iter()
                .filter_map(|f| control.field(f))
                .flat_map(|v| {
                    v.split(',')
                        .filter_map(|g| g.split('|').next())
                        .map(|a| a.trim().to_string())
                        .filter(|a| !a.is_empty())
                        .collect::<Vec<_>>()
                })
                .collect();
            out.insert(
                d.clone(),
                LocalDeb {
                    package: Package {
                        name: field("Package")?,
                        version: field("Version")?,
                        architecture: field("Architecture")?,
                        filename: format!("local:{d}"),
                        sha256,
                        size: data.len() as u64,
                    },
                    depends,
                },
            );
        }
    }
    Ok(out)
}

/// Resolves every input of `recipe` to a pin.
pub async fn resolve(recipe: &Recipe, opts: &ResolveOptions<'_>) -> Result<Resolved, PlanError> {
    let mut archives = Archives {
        opts,
        open: BTreeMap::new(),
    };
    let lock = opts.lock;
    // Read every time: a local file may have changed under the lock.
    let local = local_debs(recipe, opts.cache)?;
    if opts.mode == LockMode::Locked {
        locked_precheck(recipe, lock, &local)?;
    }
    let mut changes = Vec::new();

    // Kernel.
    let key = kernel_source_key(recipe);
    let locked = lock.map(|l| &l.kernel).filter(|p| p.source == key);
    let kernel = match &recipe.kernel.source.value {
        KernelSource::Debian(suite, pkg) => match locked {
            Some(p) if !opts.mode.updates("kernel") => p.clone(),
            _ => {
                let archive = archives.get("kernel", suite).await?;
                let closure = archive
                    .resolve(std::slice::from_ref(pkg))
                    .map_err(|e| recipe_or(recipe, &recipe.kernel.source.loc, "kernel", e))?;
                // The metapackage pulls in tools (kmod, initramfs-tools...)
                // that an appliance does not need: keep kernel images only.
                let packages = closure
                    .into_iter()
                    .filter(|p| p.name.starts_with("linux-image-") || p.name == *pkg)
                    .collect();
                Pin {
                    source: key.clone(),
                    mirror: Some(suite.mirror.clone()),
                    digest: None,
                    packages,
                }
            }
        },
        KernelSource::Image(r) => {
            let digest = oci_digest(r, locked, opts.mode.updates("kernel"), opts).await?;
            Pin {
                source: key.clone(),
                mirror: None,
                digest: Some(digest),
                packages: Vec::new(),
            }
        }
        KernelSource::Path { image, .. } => {
            let data = std::fs::read(image).map_err(|source| PlanError::Io {
                path: image.clone(),
                source,
            })?;
            Pin {
                source: key.clone(),
                mirror: None,
                digest: Some(Digest::of(&data)),
                packages: Vec::new(),
            }
        }
    };
    changes.extend(diff("kernel", locked, &kernel));

    let stub_suite = stub_suite(recipe);
    let stub_key = debian_source(&stub_suite, &[STUB_PACKAGE.to_string()]);
    let locked = lock.map(|l| &l.stub).filter(|p| p.source == stub_key);
    let stub = match locked {
        Some(p) if !opts.mode.updates("stub") => p.clone(),
        _ => {
            let archive = archives.get("stub", &stub_suite).await?;
            let packages = archive
                .resolve(&[STUB_PACKAGE.to_string()])
                .map_err(|source| PlanError::Debian {
                    input: "stub".into(),
                    source,
                })?
                .into_iter()
                .filter(|p| p.name == STUB_PACKAGE)
                .collect();
            Pin {
                source: stub_key,
                mirror: Some(stub_suite.mirror.clone()),
                digest: None,
                packages,
            }
        }
    };
    changes.extend(diff("stub", locked, &stub));

    // Containers.
    let mut images = Vec::new();
    for c in &recipe.containers {
        let name = c.name.value.as_str();
        let locked_entry = lock.and_then(|l| l.images.iter().find(|i| i.container == name));
        let pin = match &c.image.value {
            ImageSource::Debian {
                suite,
                packages,
                scripts,
                debs,
            } => {
                let source = container_source(recipe, c, &local);
                let locked = locked_entry
                    .map(|i| i.pin.clone())
                    .filter(|p| p.source == source);
                let pin = match locked {
                    Some(p) if !opts.mode.updates(name) => p,
                    _ => {
                        let archive = archives.get(name, suite).await?;
                        // Maintainer scripts may assume the Essential
                        // packages (Debian Policy 3.8), as apt's images have.
                        let mut roots = packages.clone();
                        if *scripts {
                            roots.extend(archive.essential());
                        }
                        // Local packages bring their dependencies, not
                        // themselves, from the archive.
                        let mine: Vec<&LocalDeb> =
                            debs.iter().filter_map(|d| local.get(d)).collect();
                        roots.extend(mine.iter().flat_map(|l| l.depends.iter().cloned()).filter(
                            |dep| {
                                let n = dep.split([' ', '(', ':']).next().unwrap_or(dep);
                                !mine.iter().any(|l| l.package.name == n)
                            },
                        ));
                        let mut closure = archive
                            .resolve(&roots)
                            .map_err(|e| recipe_or(recipe, &c.image.loc, name, e))?;
                        closure.retain(|p| !mine.iter().any(|l| l.package.name == p.name));
                        closure.extend(mine.iter().map(|l| l.package.clone()));
                        closure.sort_by(|a, b| a.name.cmp(&b.name));
                        Pin {
                            source: source.clone(),
                            mirror: Some(suite.mirror.clone()),
                            digest: None,
                            packages: closure,
                        }
                    }
                };
                pin
            }
            ImageSource::Oci(r) => {
                let source = container_source(recipe, c, &local);
                let locked = locked_entry
                    .map(|i| i.pin.clone())
                    .filter(|p| p.source == source);
                let digest = oci_digest(r, locked.as_ref(), opts.mode.updates(name), opts).await?;
                Pin {
                    source,
                    mirror: None,
                    digest: Some(digest),
                    packages: Vec::new(),
                }
            }
        };
        let old = locked_entry.map(|i| i.pin.clone());
        changes.extend(diff(name, old.as_ref(), &pin));
        images.push(ImagePin {
            container: name.to_string(),
            pin,
        });
    }
    if let Some(l) = lock {
        for old in &l.images {
            if !recipe
                .containers
                .iter()
                .any(|c| c.name.value == old.container)
            {
                changes.push(Change {
                    input: old.container.clone(),
                    what: "removed".into(),
                });
            }
        }
    }

    // Local sources are read again even when locked: they may have moved.
    if opts.mode == LockMode::Locked && !changes.is_empty() {
        return Err(PlanError::LockedDrift { changes });
    }

    // Suites the pins came from: freshly verified ones, else the lock's.
    let mut suites: Vec<PinnedSuite> = Vec::new();
    let mut used: Vec<DebianSuite> = Vec::new();
    if let KernelSource::Debian(s, _) = &recipe.kernel.source.value {
        used.push(s.clone());
    }
    used.push(stub_suite.clone());
    for c in &recipe.containers {
        if let ImageSource::Debian { suite, .. } = &c.image.value {
            used.push(suite.clone());
        }
    }
    used.sort();
    used.dedup();
    for s in &used {
        if let Some(a) = archives.open.get(s) {
            suites.push(PinnedSuite {
                mirror: s.mirror.clone(),
                suite: s.suite.clone(),
                inrelease: a.inrelease_digest(),
                date: a.date().unwrap_or(0),
            });
        } else if let Some(old) = lock.and_then(|l| {
            l.suites
                .iter()
                .find(|p| p.mirror == s.mirror && p.suite == s.suite)
        }) {
            suites.push(old.clone());
        }
    }
    let newest = suites.iter().map(|s| s.date).max().unwrap_or(0);
    let source_date_epoch = match std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        Some(e) => e,
        None => lock.map(|l| l.source_date_epoch).unwrap_or(0).max(newest),
    };

    Ok(Resolved {
        plan: Plan {
            lock_version: LOCK_VERSION,
            name: recipe.name().to_string(),
            source_date_epoch,
            suites,
            kernel,
            stub,
            images,
        },
        changes,
    })
}

/// systemd-stub comes from the kernel's suite (or the default one).
fn stub_suite(recipe: &Recipe) -> DebianSuite {
    match &recipe.kernel.source.value {
        KernelSource::Debian(s, _) => s.clone(),
        _ => DebianSuite {
            mirror: crate::recipe::DEFAULT_MIRROR.into(),
            suite: crate::recipe::DEFAULT_SUITE.into(),
        },
    }
}

/// The lock key of a container's image.
fn container_source(
    recipe: &Recipe,
    c: &crate::recipe::ContainerSpec,
    local: &LocalDebs,
) -> String {
    match &c.image.value {
        ImageSource::Debian {
            suite,
            packages,
            scripts,
            debs,
        } => {
            let mut s = debian_source(suite, packages);
            // Configured images also hold the Essential set: another pin.
            if *scripts {
                s.push_str(" (configured)");
            }
            // A local .deb that changed is another input.
            let mut debs = debs.clone();
            debs.sort();
            for d in debs {
                let digest = local.get(&d).map(|l| l.package.sha256.to_string());
                s.push_str(&format!(" +{d}@{}", digest.unwrap_or_default()));
            }
            s
        }
        ImageSource::Oci(r) => image_source(recipe, r),
    }
}

/// With `--locked`, what the lock does not pin is reported before anything
/// is resolved, so a locked build never reaches the network for it.
fn locked_precheck(
    recipe: &Recipe,
    lock: Option<&Plan>,
    local: &LocalDebs,
) -> Result<(), PlanError> {
    let change = |input: &str, what: String| Change {
        input: input.to_string(),
        what,
    };
    let Some(lock) = lock else {
        return Err(PlanError::LockedDrift {
            changes: vec![change("lock", "no lock file: run `kiln lock` first".into())],
        });
    };
    let mut changes = Vec::new();
    let wanted = [
        ("kernel", &lock.kernel, kernel_source_key(recipe)),
        (
            "stub",
            &lock.stub,
            debian_source(&stub_suite(recipe), &[STUB_PACKAGE.to_string()]),
        ),
    ];
    for (input, pin, key) in wanted {
        if pin.source != key {
            changes.push(change(input, format!("{} -> {key}", pin.source)));
        }
    }
    for c in &recipe.containers {
        let name = c.name.value.as_str();
        let source = container_source(recipe, c, local);
        match lock.images.iter().find(|i| i.container == name) {
            None => changes.push(change(name, format!("{source} added"))),
            Some(i) if i.pin.source != source => {
                changes.push(change(name, format!("{} -> {source}", i.pin.source)))
            }
            Some(_) => {}
        }
    }
    for old in &lock.images {
        if !recipe
            .containers
            .iter()
            .any(|c| c.name.value == old.container)
        {
            changes.push(change(&old.container, "removed".into()));
        }
    }
    if changes.is_empty() {
        Ok(())
    } else {
        Err(PlanError::LockedDrift { changes })
    }
}

/// A Debian resolution failure: the recipe's fault when a package cannot
/// be satisfied (located at the field that asked for it).
fn recipe_or(recipe: &Recipe, loc: &Loc, input: &str, e: DebianError) -> PlanError {
    if e.is_recipe_error() {
        PlanError::Recipe(recipe.error(loc, e.to_string()))
    } else {
        PlanError::Debian {
            input: input.to_string(),
            source: e,
        }
    }
}

/// The digest an OCI source pins to: the lock's for a registry (unless
/// updating), always read again for local sources.
async fn oci_digest(
    r: &ImageRef,
    locked: Option<&Pin>,
    update: bool,
    opts: &ResolveOptions<'_>,
) -> Result<Digest, PlanError> {
    if let (
        ImageRef::Registry(_),
        Some(Pin {
            digest: Some(d), ..
        }),
        false,
    ) = (r, locked, update)
    {
        return Ok(*d);
    }
    opts.progress.event(&Event::Step {
        message: format!("resolving {}", r.source()),
    });
    Ok(oci::resolve_digest(&r.source(), opts.cache, opts.registry).await?)
}

/// The lock path for a recipe: `NAME.toml` → `NAME.lock` beside it.
pub fn default_lock_path(recipe: &Path) -> PathBuf {
    recipe.with_extension("lock")
}

const LOCK_HEADER: &str = "# kiln lock file: every input of the recipe, pinned by digest.\n\
# Written by `kiln build` and `kiln lock`; review changes, do not edit.\n";

/// Reads a lock file; `None` when there is none.
pub fn read_lock(path: &Path) -> Result<Option<Plan>, PlanError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PlanError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let plan: Plan = toml::from_str(&text).map_err(|e| PlanError::BadLock {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    if plan.lock_version != LOCK_VERSION {
        return Err(PlanError::BadLock {
            path: path.to_path_buf(),
            message: format!(
                "lock_version {} is not {LOCK_VERSION}: delete it and run `kiln lock`",
                plan.lock_version
            ),
        });
    }
    Ok(Some(plan))
}

/// The lock file's text for `plan`.
pub fn lock_text(plan: &Plan) -> String {
    let body = toml::to_string(plan).unwrap_or_else(|e| {
        // Every field is a string, number or table: serialising cannot fail.
        unreachable!("plan serialises to TOML: {e}")
    });
    format!("{LOCK_HEADER}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(name: &str, version: &str) -> Package {
        Package {
            name: name.into(),
            version: version.into(),
            architecture: "amd64".into(),
            filename: format!("pool/main/{name}_{version}.deb"),
            sha256: Digest::of(name.as_bytes()),
            size: 1,
        }
    }

    fn plan() -> Plan {
        Plan {
            lock_version: LOCK_VERSION,
            name: "x".into(),
            source_date_epoch: 1_700_000_000,
            suites: vec![PinnedSuite {
                mirror: "http://m".into(),
                suite: "trixie".into(),
                inrelease: Digest::of(b"r"),
                date: 1_700_000_000,
            }],
            kernel: Pin {
                source: "debian:trixie:linux-image-cloud-amd64".into(),
                mirror: Some("http://m".into()),
                digest: None,
                packages: vec![pkg("linux-image-cloud-amd64", "1")],
            },
            stub: Pin {
                source: "debian:trixie:systemd-boot-efi".into(),
                mirror: Some("http://m".into()),
                digest: None,
                packages: vec![pkg("systemd-boot-efi", "257")],
            },
            images: vec![ImagePin {
                container: "web".into(),
                pin: Pin {
                    source: "127.0.0.1:5000/web:1".into(),
                    mirror: None,
                    digest: Some(Digest::of(b"m")),
                    packages: vec![],
                },
            }],
        }
    }

    #[test]
    fn lock_round_trips_through_toml() {
        let p = plan();
        let text = lock_text(&p);
        assert!(text.starts_with("# kiln lock file"), "{text}");
        assert!(text.contains("[[image]]"), "{text}");
        let back: Plan = toml::from_str(&text).unwrap();
        assert_eq!(back, p);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        assert_eq!(read_lock(&path).unwrap(), None);
        std::fs::write(&path, &text).unwrap();
        assert_eq!(read_lock(&path).unwrap(), Some(p));
        std::fs::write(&path, text.replace("lock_version = 1", "lock_version = 9")).unwrap();
        assert!(matches!(read_lock(&path), Err(PlanError::BadLock { .. })));
        std::fs::write(&path, "garbage = [").unwrap();
        let e = read_lock(&path).unwrap_err();
        assert!(e.is_recipe_error(), "{e}");
    }

    #[test]
    fn diffs_name_versions_and_digests() {
        let old = plan().kernel;
        let mut new = old.clone();
        new.packages = vec![pkg("linux-image-cloud-amd64", "2"), pkg("extra", "1")];
        let d = diff("kernel", Some(&old), &new);
        let text: Vec<String> = d.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            text,
            vec![
                "kernel: extra 1 added",
                "kernel: linux-image-cloud-amd64 1 -> 2"
            ]
        );
        assert!(diff("kernel", Some(&old), &old).is_empty());
        let img = plan().images[0].pin.clone();
        let mut moved = img.clone();
        moved.digest = Some(Digest::of(b"n"));
        let d = diff("web", Some(&img), &moved);
        assert_eq!(d.len(), 1);
        assert!(d[0].what.contains(" -> sha256:"), "{}", d[0]);
        assert_eq!(
            diff("web", None, &img)[0].what,
            "127.0.0.1:5000/web:1 added"
        );
    }

    #[test]
    fn debian_sources_are_order_independent_keys() {
        let s = DebianSuite {
            mirror: crate::recipe::DEFAULT_MIRROR.into(),
            suite: "trixie".into(),
        };
        assert_eq!(
            debian_source(&s, &["b".into(), "a".into()]),
            "debian:trixie:a,b"
        );
        let other = DebianSuite {
            mirror: "http://mirror.example".into(),
            suite: "trixie".into(),
        };
        assert_ne!(
            debian_source(&other, &["a".into()]),
            debian_source(&s, &["a".into()])
        );
    }

    #[test]
    fn locked_reports_unpinned_inputs_before_resolving() {
        let r = crate::recipe::parse(
            Path::new("/x/r.toml"),
            "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\n\
             [[service]]\nname = \"web\"\nimage = \"127.0.0.1:5000/web:1\"\n\
             [[service]]\nname = \"db\"\nimage = \"127.0.0.1:5000/db:1\"\n",
        )
        .unwrap();
        let lock = plan();
        match locked_precheck(&r, Some(&lock), &LocalDebs::new()) {
            Err(PlanError::LockedDrift { changes }) => assert_eq!(
                changes,
                vec![Change {
                    input: "db".into(),
                    what: "127.0.0.1:5000/db:1 added".into()
                }]
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            locked_precheck(&r, None, &LocalDebs::new()),
            Err(PlanError::LockedDrift { .. })
        ));
        let mut whole = lock.clone();
        whole.images.push(ImagePin {
            container: "db".into(),
            pin: Pin {
                source: "127.0.0.1:5000/db:1".into(),
                mirror: None,
                digest: Some(Digest::of(b"d")),
                packages: vec![],
            },
        });
        locked_precheck(&r, Some(&whole), &LocalDebs::new()).unwrap();
    }

    #[test]
    fn update_mode_selects_inputs() {
        assert!(LockMode::Update(vec![]).updates("web"));
        assert!(LockMode::Update(vec!["web".into()]).updates("web"));
        assert!(!LockMode::Update(vec!["db".into()]).updates("web"));
        assert!(!LockMode::Reuse.updates("web"));
        assert!(!LockMode::Locked.updates("kernel"));
    }
}
