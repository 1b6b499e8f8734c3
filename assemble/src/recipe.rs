//! The recipe: kiln's public interface, parsed from TOML into typed values.
//!
//! Parsing is done once: [`load`] turns the text into a [`Recipe`] whose
//! fields are enums, numbers and paths, never strings to parse again. Every
//! value a later stage may reject keeps its [`Loc`] (line, column, dotted
//! field), so an error found at build time (a command missing from its
//! image, a disk too small) still points into the recipe file.

use kiln_init::config::{
    Class, Net, Port, Probe, Protocol, Resources, Restart, VerityError, WhenDone,
    DEFAULT_HEALTHY_AFTER_MS, DEFAULT_MAX_RESTARTS, DEFAULT_STOP_TIMEOUT_MS, STOP_SIGNALS,
};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// A recipe problem, located in its file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{}:{}: {}: {message}", file.display(), loc.line, loc.column, loc.field)]
pub struct RecipeError {
    /// The recipe file.
    pub file: PathBuf,
    /// Where in the file.
    pub loc: Loc,
    /// What is wrong.
    pub message: String,
}

/// Errors from reading a recipe.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading the recipe file failed.
    #[error("reading recipe {}", path.display())]
    Io {
        /// The recipe file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The recipe is not valid TOML or breaks a rule.
    #[error(transparent)]
    Invalid(#[from] Box<RecipeError>),
}

/// Where a value sits in the recipe.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Loc {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted path such as `service[0].image`; `(recipe)` for the whole
    /// document.
    pub field: String,
}

/// A value and where the recipe wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At<T> {
    /// The value.
    pub value: T,
    /// Where the recipe wrote it.
    pub loc: Loc,
}

impl<T> std::ops::Deref for At<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

/// A validated recipe: every field typed, defaults applied.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// The recipe file; relative paths in it were resolved against its
    /// directory.
    pub path: PathBuf,
    /// Image name; names the output files.
    pub name: At<String>,
    /// Image version, as the recipe gives it.
    pub version: At<String>,
    /// Kernel source and command line.
    pub kernel: KernelSpec,
    /// Onboot containers (in order) then services.
    pub containers: Vec<ContainerSpec>,
    /// `[[file]]` entries placed in the root filesystem.
    pub files: Vec<FileSpec>,
    /// Host settings.
    pub host: HostSpec,
    /// Disk settings.
    pub disk: DiskSpec,
    /// Output settings.
    pub output: OutputSpec,
    /// The host's network (`[network]`).
    pub network: kiln_init::config::Network,
    /// A/B update settings (`[update]`).
    pub update: UpdateSpec,
}

/// The recipe's `[kernel]` table.
#[derive(Debug, Clone)]
pub struct KernelSpec {
    /// Where the kernel comes from.
    pub source: At<KernelSource>,
    /// Kernel command line, baked into the UKI.
    pub cmdline: At<String>,
}

/// Where the kernel (and its modules) come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// A Debian package (usually a metapackage) and its kernel image closure.
    Debian(DebianSuite, String),
    /// An OCI image in LinuxKit layout: `/kernel` plus `/kernel.tar`.
    Image(ImageRef),
    /// A bzImage file, with `lib/modules/REL` from a directory or tarball.
    Path {
        /// The bzImage file.
        image: PathBuf,
        /// Modules directory or tarball, if any.
        modules: Option<PathBuf>,
    },
}

/// One suite of one Debian mirror.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DebianSuite {
    /// Mirror base URL.
    pub mirror: String,
    /// Suite name (e.g. `trixie`).
    pub suite: String,
}

/// Container image references other than Debian package sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// `host[:port]/repo[:tag][@sha256:...]`.
    Registry(String),
    /// An OCI image layout directory, optionally a tag in its index.
    OciLayout {
        /// The layout directory.
        dir: PathBuf,
        /// Tag in its index, if given.
        tag: Option<String>,
    },
    /// A `docker save` tarball.
    DockerArchive(PathBuf),
}

impl ImageRef {
    /// The source string `oci::pull` takes, with paths already resolved.
    pub fn source(&self) -> String {
        match self {
            ImageRef::Registry(r) => r.clone(),
            ImageRef::OciLayout { dir, tag: None } => format!("oci-layout:{}", dir.display()),
            ImageRef::OciLayout { dir, tag: Some(t) } => {
                format!("oci-layout:{}:{t}", dir.display())
            }
            ImageRef::DockerArchive(f) => format!("docker-archive:{}", f.display()),
        }
    }
}

/// Where a container's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A container image (registry, OCI layout or docker archive).
    Oci(ImageRef),
    /// Debian packages and their dependency closure.
    Debian {
        /// The suite the packages come from.
        suite: DebianSuite,
        /// Package names asked for.
        packages: Vec<String>,
        /// Configured as dpkg would (the suite's Essential packages added,
        /// maintainer scripts run in a sandbox); `false`: only unpacked.
        scripts: bool,
        /// .deb files from disk, as written (relative to the recipe).
        debs: Vec<String>,
    },
}

/// When a container runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// To completion, in order, before services.
    Onboot,
    /// Long-running.
    Service,
    /// To completion, in order, once services have stopped.
    Onshutdown,
}

/// A container from the recipe's `[[onboot]]` or `[[service]]` tables.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// Onboot or service.
    pub kind: Kind,
    /// Container name, unique in the recipe.
    pub name: At<String>,
    /// Where its root filesystem comes from.
    pub image: At<ImageSource>,
    /// `None`: the image's Entrypoint + Cmd.
    pub command: Option<At<Vec<String>>>,
    /// Environment added to the image's, by name.
    pub env: BTreeMap<String, String>,
    /// Working directory; `None`: the image's.
    pub cwd: Option<At<String>>,
    /// `USER[:GROUP]`; `None`: the image's.
    pub user: Option<At<String>>,
    /// Network namespace choice.
    pub net: Net,
    /// Its address on the bridge, assigned in recipe order.
    pub address: Option<std::net::Ipv4Addr>,
    /// Host ports forwarded to it (`net = "bridge"`).
    pub ports: Vec<Port>,
    /// Host paths bind-mounted into the container.
    pub binds: Vec<At<BindSpec>>,
    /// Named volumes (`volumes`): name and path in the container; each is
    /// also a writable bind from the data partition among `binds`.
    pub volumes: Vec<(String, String)>,
    /// Writable, size-limited tmpfs mounts.
    pub tmpfs: Vec<At<TmpfsSpec>>,
    /// When it is started again after it exits.
    pub restart: Restart,
    /// Restarts `on-failure` allows.
    pub max_restarts: u32,
    /// Whether its failure fails the machine's run.
    pub essential: bool,
    /// `control = true`: the init's control socket is bound into it.
    pub control: Option<At<bool>>,
    /// Signal asking it to stop.
    pub stop_signal: String,
    /// Milliseconds it is given to stop before SIGKILL.
    pub stop_timeout_ms: u64,
    /// Services that must be ready before it starts.
    pub depends_on: Vec<String>,
    /// When it counts as ready; `None`: once started.
    pub ready: Option<Probe>,
    /// A reaper is PID 1 rather than the program.
    pub init: bool,
    /// Limits and priority.
    pub resources: Resources,
    /// Capabilities it keeps (`CAP_` names, kernel order).
    pub capabilities: Vec<String>,
    /// Docker's default seccomp filter; `false`: unconfined.
    pub seccomp: bool,
    /// Namespaced kernel settings.
    pub sysctl: BTreeMap<String, String>,
    /// Resource limits as (soft, hard).
    pub rlimits: BTreeMap<String, (u64, u64)>,
    /// Its root is an unprivileged host id in its own user namespace.
    pub userns: bool,
}

/// A tmpfs as written in a recipe: `PATH[:size=SIZE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmpfsSpec {
    /// Path in the container.
    pub path: String,
    /// Size limit in bytes.
    pub size: u64,
}

/// A tmpfs's size when the recipe gives none.
pub const TMPFS_DEFAULT_SIZE: u64 = 64 << 20;

/// A bind mount as written in a recipe: `SRC:DST[:ro|rw]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindSpec {
    /// Path in the host root.
    pub source: String,
    /// Path in the container.
    pub target: String,
    /// Mount read-only (`:ro`).
    pub readonly: bool,
}

/// A `[[file]]` entry: a file placed in the root filesystem.
#[derive(Debug, Clone)]
pub struct FileSpec {
    /// The container whose image gets the file (before its maintainer
    /// scripts run); `None`: the host root.
    pub container: Option<At<String>>,
    /// Absolute path in the root filesystem (or the container's image).
    pub path: At<String>,
    /// What the file holds.
    pub contents: FileContents,
    /// Permission bits (e.g. `0o644`).
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
}

/// Where a `[[file]]`'s contents come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileContents {
    /// Contents written in the recipe.
    Inline(Vec<u8>),
    /// A file on the build host, resolved against the recipe's directory
    /// (checked to exist when the recipe is loaded).
    Source(At<PathBuf>),
}

/// The recipe's `[host]` table.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// Host name of the appliance.
    pub hostname: String,
    /// What to do once every container has exited.
    pub when_done: WhenDone,
    /// Milliseconds essential containers must be ready to count healthy.
    pub healthy_after_ms: u64,
    /// `hostname_from = "recipe"`: the hostname is kept whatever DHCP says.
    pub hostname_pinned: bool,
}

/// The recipe's `[disk]` table.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Bytes.
    pub size: At<u64>,
    /// Whether the root is verified by dm-verity (`verity`, default on).
    pub verity: bool,
    /// What a corrupt root block does (`verity_error`).
    pub verity_error: kiln_init::config::VerityError,
    /// The layout: A/B slots and a data partition, or one root.
    pub update: UpdateMode,
    /// Each slot's size (`slot_size`); `None`: twice what the build needs.
    pub slot_size: Option<At<u64>>,
}

/// `[disk] update`: how a disk image is laid out for updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateMode {
    /// ESP (kiln-boot), slot A, slot B, data (the default).
    Ab,
    /// ESP (the UKI) and one root partition.
    None,
}

/// The recipe's `[update]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateSpec {
    /// Boots a new slot gets to be judged healthy before the other boots
    /// again.
    pub tries: u8,
    /// How long a new slot's boot may take to become healthy before it
    /// is judged failed (milliseconds).
    pub healthy_within_ms: u64,
    /// `[update] source` and what goes with it: the host updates itself.
    pub online: Option<OnlineSpec>,
}

/// Online updates: what the update service kiln adds is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineSpec {
    /// The repository (`oci://`, `oci+http://`, `https://`, `http://`).
    pub source: At<String>,
    /// The keys its first root must be signed by (`root_keys`, read at
    /// build time).
    pub root_keys: Vec<kiln_update::keys::PublicKey>,
    /// Certificate authorities (DER) the source's TLS certificate may
    /// chain to besides Mozilla's roots (`ca`, read at build time).
    pub ca: Vec<Vec<u8>>,
    /// Seconds between checks (`check`).
    pub check_secs: u64,
    /// When it may reboot into an update (`window`); `None`: at once.
    pub window: Option<kiln_update::service::Window>,
}

/// `[update] check` unless given: 6 hours.
pub const DEFAULT_CHECK_SECS: u64 = 6 * 3600;

/// `[update] tries` unless given.
pub const DEFAULT_TRIES: u8 = 3;
/// `[update] healthy_within` unless given: 5 minutes.
pub const DEFAULT_HEALTHY_WITHIN_MS: u64 = 300_000;

/// Output container formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Format {
    /// A raw disk image (`NAME.raw`).
    Raw,
    /// qcow2 version 3, sparse (`NAME.qcow2`).
    Qcow2,
    /// A fixed VHD, as Azure takes it (`NAME.vhd`).
    Vhd,
    /// A dynamic VHD (`NAME-dynamic.vhd`).
    VhdDynamic,
    /// A streamOptimized VMDK, as VMware and AWS VM Import take it
    /// (`NAME.vmdk`).
    Vmdk,
    /// `disk.raw` in a sparse, gzip'd tar, as Google Compute Engine
    /// imports it (`NAME.tar.gz`).
    Gce,
    /// The kernel, an initramfs holding the root, and the command line,
    /// for PXE/iPXE and direct boot (`NAME-kernel`, `NAME-initrd.img`,
    /// `NAME-cmdline`).
    KernelInitrd,
    /// The unified kernel image alone, its initramfs holding the root,
    /// for UEFI HTTP boot or another boot manager (`NAME.efi`).
    Uki,
    /// A hybrid ISO (`NAME.iso`): El Torito with a UEFI entry for CDs, a
    /// GPT on the same bytes for USB sticks.
    Iso,
}

impl Format {
    /// Every format with its recipe name.
    pub const ALL: &[(&str, Format)] = &[
        ("raw", Format::Raw),
        ("qcow2", Format::Qcow2),
        ("vhd", Format::Vhd),
        ("vhd-dynamic", Format::VhdDynamic),
        ("vmdk", Format::Vmdk),
        ("gce", Format::Gce),
        ("kernel+initrd", Format::KernelInitrd),
        ("uki", Format::Uki),
        ("iso", Format::Iso),
    ];

    /// The format's name in recipes.
    pub fn name(self) -> &'static str {
        Format::ALL
            .iter()
            .find(|(_, f)| *f == self)
            .map_or("raw", |(n, _)| n)
    }

    /// The file this format is written to, for an image named `name`.
    pub fn file_name(self, name: &str) -> String {
        match self {
            Format::Raw => format!("{name}.raw"),
            Format::Qcow2 => format!("{name}.qcow2"),
            Format::Vhd => format!("{name}.vhd"),
            Format::VhdDynamic => format!("{name}-dynamic.vhd"),
            Format::Vmdk => format!("{name}.vmdk"),
            Format::Gce => format!("{name}.tar.gz"),
            Format::KernelInitrd => format!("{name}-kernel"),
            Format::Uki => format!("{name}.efi"),
            Format::Iso => format!("{name}.iso"),
        }
    }

    /// Whether it boots without a disk (its root is in its initramfs).
    pub fn diskless(self) -> bool {
        matches!(self, Format::KernelInitrd | Format::Uki)
    }

    /// Whether it is an encoding of the GPT disk image.
    pub fn is_disk(self) -> bool {
        !self.diskless() && self != Format::Iso
    }

    /// The format named `s`, if any.
    pub fn parse(s: &str) -> Option<Format> {
        Format::ALL.iter().find(|(n, _)| *n == s).map(|(_, f)| *f)
    }
}

/// Compressor of the root filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootCompression {
    /// zstd level, 1 to 22.
    pub zstd_level: u32,
}

impl Default for RootCompression {
    fn default() -> Self {
        RootCompression { zstd_level: 15 }
    }
}

impl RootCompression {
    /// `zstd` or `zstd:LEVEL` (1-22).
    pub fn parse(s: &str) -> Option<RootCompression> {
        let level = match s.split_once(':') {
            None if s == "zstd" => RootCompression::default().zstd_level,
            Some(("zstd", l)) => l.parse().ok()?,
            _ => return None,
        };
        (1..=22)
            .contains(&level)
            .then_some(RootCompression { zstd_level: level })
    }
}

impl fmt::Display for RootCompression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "zstd:{}", self.zstd_level)
    }
}

/// The recipe's `[output]` table.
#[derive(Debug, Clone)]
pub struct OutputSpec {
    /// Formats to write, in order.
    pub formats: At<Vec<Format>>,
    /// Compressor of the root filesystem.
    pub root_compression: At<RootCompression>,
    /// qcow2 clusters stored deflated where that is smaller.
    pub qcow2_compress: bool,
}

impl Recipe {
    /// The image name.
    pub fn name(&self) -> &str {
        &self.name.value
    }

    /// The recipe's directory.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// An error at `loc` in this recipe.
    pub fn error(&self, loc: &Loc, message: impl Into<String>) -> Box<RecipeError> {
        Box::new(RecipeError {
            file: self.path.clone(),
            loc: loc.clone(),
            message: message.into(),
        })
    }

    /// Replaces `[output] formats` (from the command line), with the
    /// recipe's checks: a fixed VHD needs a size in whole MiB.
    pub fn set_formats(&mut self, formats: Vec<Format>) -> Result<(), Box<RecipeError>> {
        if formats.contains(&Format::Vhd) && !self.disk.size.value.is_multiple_of(1 << 20) {
            return Err(self.error(
                &self.disk.size.loc,
                "a fixed VHD needs a size in whole MiB (Azure's rule)",
            ));
        }
        let mut unique = Vec::new();
        for f in formats {
            if !unique.contains(&f) {
                unique.push(f);
            }
        }
        self.output.formats.value = unique;
        Ok(())
    }

    /// Onboot containers, in order.
    pub fn onboot(&self) -> impl Iterator<Item = &ContainerSpec> {
        self.containers.iter().filter(|c| c.kind == Kind::Onboot)
    }

    /// Service containers, in order.
    pub fn services(&self) -> impl Iterator<Item = &ContainerSpec> {
        self.containers.iter().filter(|c| c.kind == Kind::Service)
    }

    /// Onshutdown containers, in order.
    pub fn onshutdown(&self) -> impl Iterator<Item = &ContainerSpec> {
        self.containers
            .iter()
            .filter(|c| c.kind == Kind::Onshutdown)
    }
}

/// Debian suite used when the recipe names none.
pub const DEFAULT_SUITE: &str = "trixie";
/// Debian mirror used when the recipe names none.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Kernel command line used when the recipe gives none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
/// Disk size in bytes when the recipe gives none (1 GiB).
pub const DEFAULT_DISK_SIZE: u64 = 1 << 30;
/// The ESP alone takes 64 MiB; below this nothing fits.
pub const MIN_DISK_SIZE: u64 = 128 << 20;
/// ext4 and most hosts' filesystems cap a file at 16 TiB.
pub const MAX_DISK_SIZE: u64 = 16 << 40;

/// Reads, parses and validates the recipe at `path`.
pub fn load(path: &Path) -> Result<Recipe, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse(path, &text)?)
}

/// Parses and validates recipe `text`; `path` is used in errors and to
/// resolve relative paths.
pub fn parse(path: &Path, text: &str) -> Result<Recipe, Box<RecipeError>> {
    let locate = Locator::new(path, text);
    let raw: raw::Recipe = toml::from_str(text).map_err(|e| locate.toml_error(&e))?;
    validate(&locate, raw)
}

/// Turns byte spans into file:line:column and field paths.
struct Locator<'a> {
    path: &'a Path,
    text: &'a str,
    table: Option<DeTable<'a>>,
}

impl<'a> Locator<'a> {
    fn new(path: &'a Path, text: &'a str) -> Self {
        let table = DeTable::parse(text).ok().map(|t| t.into_inner());
        Locator { path, text, table }
    }

    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.chars().rev().take_while(|c| *c != '\n').count() + 1;
        (line, column)
    }

    fn loc(&self, span: Range<usize>) -> Loc {
        let (line, column) = self.line_col(span.start);
        let field = self
            .table
            .as_ref()
            .and_then(|t| field_at(t, &span))
            .unwrap_or_else(|| "(recipe)".to_string());
        Loc {
            line,
            column,
            field,
        }
    }

    fn loc_field(&self, span: Range<usize>, field: String) -> Loc {
        let (line, column) = self.line_col(span.start);
        Loc {
            line,
            column,
            field,
        }
    }

    fn error_at(&self, loc: Loc, message: impl Into<String>) -> Box<RecipeError> {
        Box::new(RecipeError {
            file: self.path.to_path_buf(),
            loc,
            message: message.into(),
        })
    }

    fn at<T>(&self, s: &Spanned<T>, message: impl Into<String>) -> Box<RecipeError> {
        self.error_at(self.loc(s.span()), message)
    }

    fn located<T>(&self, s: Spanned<T>) -> At<T> {
        let loc = self.loc(s.span());
        At {
            value: s.into_inner(),
            loc,
        }
    }

    /// A TOML syntax or schema error. Two cases need help to name their
    /// field: a duplicate key (the document does not parse as a table, so
    /// the key is read from the text at the span) and a missing field (the
    /// span is its parent table).
    fn toml_error(&self, e: &toml::de::Error) -> Box<RecipeError> {
        let span = e.span().unwrap_or(0..0);
        let message = e.message().trim_end().to_string();
        if let Some(missing) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
        {
            // toml gives 0..0 for the document itself, else the table's body.
            let parent = self
                .table
                .as_ref()
                .filter(|_| span != (0..0))
                .and_then(|t| field_at(t, &span));
            let field = match parent {
                Some(ref p) => format!("{p}.{missing}"),
                None => missing.to_string(),
            };
            let start = if parent.is_none() { 0 } else { span.start };
            return self.error_at(self.loc_field(start..start, field), message);
        }
        if message.contains("duplicate key") {
            let key = self.text[span.clone()].trim().trim_matches('"').to_string();
            let field = match header_before(self.text, span.start) {
                Some(h) => format!("{h}.{key}"),
                None => key.clone(),
            };
            return self.error_at(
                self.loc_field(span, field),
                format!("duplicate key `{key}`: each key may appear once per table"),
            );
        }
        self.error_at(self.loc(span), message)
    }
}

/// The `[table]` or `[[array]]` header in force at `offset`, if any.
fn header_before(text: &str, offset: usize) -> Option<String> {
    text[..offset.min(text.len())]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
}

/// The dotted path of the innermost key or value covering `span`.
fn field_at(table: &DeTable, span: &Range<usize>) -> Option<String> {
    fn covers(r: &Range<usize>, s: &Range<usize>) -> bool {
        r.start <= s.start && s.end <= r.end.max(r.start + 1)
    }
    fn walk_table(t: &DeTable, span: &Range<usize>, path: &mut Vec<String>) -> bool {
        for (k, v) in t {
            if covers(&k.span(), span) {
                path.push(k.get_ref().to_string());
                return true;
            }
            if covers(&v.span(), span) {
                path.push(k.get_ref().to_string());
                walk_value(v.get_ref(), span, path);
                return true;
            }
        }
        // Array-of-tables entries have no span for the whole header
        // block, so also look inside values that do not cover the span.
        for (k, v) in t {
            let mut sub = vec![k.get_ref().to_string()];
            if walk_value(v.get_ref(), span, &mut sub) {
                path.extend(sub);
                return true;
            }
        }
        false
    }
    fn walk_value(v: &DeValue, span: &Range<usize>, path: &mut Vec<String>) -> bool {
        match v {
            DeValue::Table(t) => walk_table(t, span, path),
            DeValue::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    let mut sub = Vec::new();
                    let inside = walk_value(item.get_ref(), span, &mut sub);
                    if inside || covers(&item.span(), span) {
                        let last = path.pop().unwrap_or_default();
                        path.push(format!("{last}[{i}]"));
                        path.extend(sub);
                        return true;
                    }
                }
                false
            }
            _ => false,
        }
    }
    let mut path = Vec::new();
    if walk_table(table, span, &mut path) && !path.is_empty() {
        Some(path.join("."))
    } else {
        None
    }
}

/// The TOML schema as written: optional where the recipe may omit a key,
/// spans kept. [`validate`] turns it into [`Recipe`].
mod raw {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Recipe {
        pub name: Spanned<String>,
        pub version: Spanned<String>,
        pub kernel: Option<Spanned<Kernel>>,
        #[serde(default)]
        pub onboot: Vec<Spanned<Container>>,
        #[serde(default, rename = "service")]
        pub services: Vec<Spanned<Container>>,
        #[serde(default)]
        pub onshutdown: Vec<Spanned<Container>>,
        #[serde(default, rename = "file")]
        pub files: Vec<File>,
        #[serde(default)]
        pub host: Host,
        #[serde(default)]
        pub disk: Disk,
        #[serde(default)]
        pub output: Output,
        #[serde(default)]
        pub network: Network,
        #[serde(default)]
        pub update: Update,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Update {
        pub tries: Option<Spanned<i64>>,
        pub healthy_within: Option<Spanned<String>>,
        pub source: Option<Spanned<String>>,
        pub root_keys: Option<Spanned<Vec<Spanned<String>>>>,
        pub ca: Option<Spanned<Vec<Spanned<String>>>>,
        pub check: Option<Spanned<String>>,
        pub window: Option<Spanned<String>>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Network {
        pub ipv6: Option<bool>,
        pub wait: Option<Spanned<String>>,
        pub bridge_subnet: Option<Spanned<String>>,
        #[serde(default)]
        pub interface: Vec<Spanned<NetInterface>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct NetInterface {
        pub name: Spanned<String>,
        pub dhcp: Option<bool>,
        pub address: Option<Spanned<String>>,
        pub gateway: Option<Spanned<String>>,
        #[serde(default)]
        pub dns: Vec<Spanned<String>>,
        pub mtu: Option<Spanned<i64>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Kernel {
        pub debian: Option<Spanned<String>>,
        pub suite: Option<Spanned<String>>,
        pub mirror: Option<Spanned<String>>,
        pub image: Option<Spanned<String>>,
        pub path: Option<Spanned<String>>,
        pub modules: Option<Spanned<String>>,
        pub cmdline: Option<Spanned<String>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Container {
        pub name: Spanned<String>,
        pub image: Spanned<Image>,
        pub command: Option<Spanned<Vec<String>>>,
        pub env: Option<Spanned<BTreeMap<String, String>>>,
        pub cwd: Option<Spanned<String>>,
        pub user: Option<Spanned<String>>,
        pub net: Option<Spanned<String>>,
        #[serde(default)]
        pub binds: Vec<Spanned<String>>,
        #[serde(default)]
        pub volumes: Vec<Spanned<String>>,
        #[serde(default)]
        pub tmpfs: Vec<Spanned<String>>,
        pub restart: Option<Spanned<String>>,
        pub max_restarts: Option<Spanned<i64>>,
        pub essential: Option<bool>,
        pub control: Option<Spanned<bool>>,
        pub stop_signal: Option<Spanned<String>>,
        pub stop_timeout: Option<Spanned<String>>,
        pub depends_on: Option<Vec<Spanned<String>>>,
        pub ready: Option<Spanned<Probe>>,
        pub init: Option<Spanned<toml::Value>>,
        pub memory: Option<Spanned<String>>,
        pub cpu: Option<Spanned<f64>>,
        pub pids: Option<Spanned<i64>>,
        pub io_weight: Option<Spanned<i64>>,
        pub class: Option<Spanned<Class>>,
        pub capabilities: Option<Capabilities>,
        pub seccomp: Option<Spanned<String>>,
        pub sysctl: Option<BTreeMap<Spanned<String>, Spanned<toml::Value>>>,
        pub rlimits: Option<BTreeMap<Spanned<String>, Spanned<toml::Value>>>,
        pub userns: Option<bool>,
        pub ports: Option<Vec<Spanned<String>>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Capabilities {
        #[serde(default)]
        pub add: Vec<Spanned<String>>,
        #[serde(default)]
        pub drop: Vec<Spanned<String>>,
    }

    #[derive(Debug)]
    pub enum Image {
        Ref(String),
        Debian {
            packages: Vec<String>,
            suite: Option<String>,
            scripts: Option<bool>,
            debs: Vec<String>,
        },
    }

    impl<'de> Deserialize<'de> for Image {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Image;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("an image reference string or { debian = [PACKAGES] }")
                }
                fn visit_str<E: de::Error>(self, s: &str) -> Result<Image, E> {
                    Ok(Image::Ref(s.to_string()))
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Image, A::Error> {
                    let mut packages: Option<Vec<String>> = None;
                    let mut suite = None;
                    let mut scripts = None;
                    let mut debs = Vec::new();
                    while let Some(k) = map.next_key::<String>()? {
                        match k.as_str() {
                            "debian" => packages = Some(map.next_value()?),
                            "suite" => suite = Some(map.next_value()?),
                            "scripts" => scripts = Some(map.next_value()?),
                            "debs" => debs = map.next_value()?,
                            other => {
                                return Err(de::Error::unknown_field(
                                    other,
                                    &["debian", "suite", "scripts", "debs"],
                                ))
                            }
                        }
                    }
                    let packages = packages.ok_or_else(|| de::Error::missing_field("debian"))?;
                    Ok(Image::Debian {
                        packages,
                        suite,
                        scripts,
                        debs,
                    })
                }
            }
            d.deserialize_any(V)
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        pub container: Option<Spanned<String>>,
        pub path: Spanned<String>,
        pub contents: Option<Spanned<String>>,
        pub source: Option<Spanned<String>>,
        pub mode: Option<Spanned<String>>,
        pub uid: Option<u32>,
        pub gid: Option<u32>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Host {
        pub hostname: Option<Spanned<String>>,
        pub when_done: Option<Spanned<String>>,
        pub healthy_after: Option<Spanned<String>>,
        pub hostname_from: Option<Spanned<String>>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Disk {
        pub size: Option<Spanned<String>>,
        pub verity: Option<bool>,
        pub verity_error: Option<Spanned<String>>,
        pub update: Option<Spanned<String>>,
        pub slot_size: Option<Spanned<String>>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Output {
        pub formats: Option<Spanned<Vec<String>>>,
        pub root_compression: Option<Spanned<String>>,
        pub qcow2_compress: Option<bool>,
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

/// A limit as a recipe writes it: `4096`, `"unlimited"`, `"1024:4096"`.
fn parse_rlimit(v: &toml::Value) -> Option<(u64, u64)> {
    let one = |s: &str| match s {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    };
    let (soft, hard) = match v {
        toml::Value::Integer(i) => {
            let n = u64::try_from(*i).ok()?;
            (n, n)
        }
        toml::Value::String(s) => match s.split_once(':') {
            Some((a, b)) => (one(a)?, one(b)?),
            None => (one(s)?, one(s)?),
        },
        _ => return None,
    };
    (soft <= hard).then_some((soft, hard))
}

/// `[update] source`, `root_keys`, `ca`, `check` and `window`.
fn online_updates(
    l: &Locator<'_>,
    u: &raw::Update,
    resolve: &dyn Fn(&str) -> PathBuf,
    mode: UpdateMode,
    containers: &[ContainerSpec],
) -> Result<Option<OnlineSpec>, Box<RecipeError>> {
    let Some(source) = &u.source else {
        for (given, name) in [
            (u.root_keys.as_ref().map(Spanned::span), "root_keys"),
            (u.ca.as_ref().map(Spanned::span), "ca"),
            (u.check.as_ref().map(Spanned::span), "check"),
            (u.window.as_ref().map(Spanned::span), "window"),
        ] {
            if let Some(span) = given {
                return Err(l.error_at(
                    l.loc(span),
                    format!("{name} is for online updates: it needs [update] source"),
                ));
            }
        }
        return Ok(None);
    };
    let s = source.get_ref();
    if !["oci://", "oci+http://", "https://", "http://"]
        .iter()
        .any(|p| s.starts_with(p))
    {
        return Err(l.at(
            source,
            "expected oci://HOST/NAME, oci+http://HOST/NAME (a registry without TLS), https://… or http://…",
        ));
    }
    if let Err(e) = kiln_update::repo::Source::parse(s) {
        return Err(l.at(source, e.to_string()));
    }
    if mode != UpdateMode::Ab {
        return Err(l.at(
            source,
            "online updates write the other slot: they need [disk] update = \"ab\"",
        ));
    }
    if let Some(c) = containers
        .iter()
        .find(|c| c.name.value == kiln_update::service::NAME)
    {
        return Err(l.error_at(
            c.name.loc.clone(),
            format!(
                "{:?} is the update service kiln adds for [update] source: name this container otherwise",
                kiln_update::service::NAME
            ),
        ));
    }
    let Some(keys) = &u.root_keys else {
        return Err(l.at(
            source,
            "needs root_keys: the public keys (PEM files) the repository's root is signed with",
        ));
    };
    if keys.get_ref().is_empty() {
        return Err(l.at(keys, "lists no key"));
    }
    let mut root_keys = Vec::new();
    for k in keys.get_ref() {
        let key = kiln_update::keys::PublicKey::load(&resolve(k.get_ref()))
            .map_err(|e| l.at(k, e.to_string()))?;
        if !root_keys.contains(&key) {
            root_keys.push(key);
        }
    }
    let mut ca = Vec::new();
    for f in u.ca.as_ref().map_or(&[][..], |f| f.get_ref()) {
        for der in load_ca(&resolve(f.get_ref())).map_err(|e| l.at(f, e))? {
            if !ca.contains(&der) {
                ca.push(der);
            }
        }
    }
    let check_secs = match &u.check {
        None => DEFAULT_CHECK_SECS,
        Some(c) => parse_duration(c.get_ref())
            .filter(|&ms| ms >= 1000)
            .map(|ms| ms / 1000)
            .ok_or_else(|| {
                l.at(
                    c,
                    "expected a duration of a second or more, such as \"6h\" or \"30m\"",
                )
            })?,
    };
    let window = match &u.window {
        None => None,
        Some(w) => Some(
            kiln_update::service::Window::parse(w.get_ref()).ok_or_else(|| {
                l.at(
                    w,
                    "expected \"HH:MM-HH:MM\" in UTC, such as \"02:00-04:00\"",
                )
            })?,
        ),
    };
    Ok(Some(OnlineSpec {
        source: l.located(source.clone()),
        root_keys,
        ca,
        check_secs,
        window,
    }))
}

/// The certificates of a PEM file (`[update] ca`), each checked to be one
/// a TLS client can take as a root.
fn load_ca(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, der) in CertificateDer::pem_slice_iter(&text).enumerate() {
        let der = der.map_err(|e| format!("{}: certificate {}: {e}", path.display(), i + 1))?;
        webpki::anchor_from_trusted_cert(&der).map_err(|e| {
            format!(
                "{}: certificate {} is not one a TLS client can trust: {e}",
                path.display(),
                i + 1
            )
        })?;
        out.push(der.to_vec());
    }
    if out.is_empty() {
        return Err(format!(
            "{}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(out)
}

/// Docker's default capabilities with the recipe's `drop` then `add`
/// applied (`"ALL"` in either means every capability), as `CAP_` names in
/// kernel order.
fn capability_set(
    l: &Locator<'_>,
    c: Option<&raw::Capabilities>,
) -> Result<Vec<String>, Box<RecipeError>> {
    use kiln_init::config::{CAPABILITIES, DEFAULT_CAPABILITIES};
    let bare = |s: &str| {
        let up = s.to_ascii_uppercase();
        up.strip_prefix("CAP_").unwrap_or(&up).to_string()
    };
    let mut keep: BTreeSet<String> = DEFAULT_CAPABILITIES.iter().map(|c| bare(c)).collect();
    let Some(c) = c else {
        return Ok(CAPABILITIES
            .iter()
            .filter(|n| keep.contains(**n))
            .map(|n| format!("CAP_{n}"))
            .collect());
    };
    let check = |s: &Spanned<String>| -> Result<String, Box<RecipeError>> {
        let name = bare(s.get_ref());
        if name == "ALL" || CAPABILITIES.contains(&name.as_str()) {
            Ok(name)
        } else {
            Err(l.at(s, format!("unknown capability {:?}", s.get_ref())))
        }
    };
    for d in &c.drop {
        match check(d)?.as_str() {
            "ALL" => keep.clear(),
            n => {
                keep.remove(n);
            }
        }
    }
    for a in &c.add {
        match check(a)?.as_str() {
            "ALL" => keep.extend(CAPABILITIES.iter().map(|n| n.to_string())),
            n => {
                keep.insert(n.to_string());
            }
        }
    }
    Ok(CAPABILITIES
        .iter()
        .filter(|n| keep.contains(**n))
        .map(|n| format!("CAP_{n}"))
        .collect())
}

/// Every `depends_on` names another service, and no service waits for
/// itself through others.
fn check_dependencies(
    l: &Locator<'_>,
    containers: &[ContainerSpec],
    deps: &[(String, Vec<Spanned<String>>)],
) -> Result<(), Box<RecipeError>> {
    let kind_of = |n: &str| {
        containers
            .iter()
            .find(|c| c.name.value == n)
            .map(|c| c.kind)
    };
    for (name, ds) in deps {
        for d in ds {
            match kind_of(d.get_ref()) {
                None => return Err(l.at(d, format!("no container is named {:?}", d.get_ref()))),
                Some(_) if d.get_ref() == name => return Err(l.at(d, "a service cannot wait for itself")),
                Some(Kind::Service) => {}
                Some(_) => {
                    return Err(l.at(
                        d,
                        format!("{:?} is not a service (onboot containers have all finished before services start)", d.get_ref()),
                    ))
                }
            }
        }
    }
    // A cycle: a path from a dependency back to the service.
    let next = |n: &str| -> Vec<&Spanned<String>> {
        deps.iter()
            .find(|(x, _)| x == n)
            .map(|(_, d)| d.iter().collect())
            .unwrap_or_default()
    };
    for (name, ds) in deps {
        for d in ds {
            let mut path = vec![name.clone(), d.get_ref().clone()];
            let mut seen = BTreeSet::new();
            if reaches(d.get_ref(), name, &next, &mut seen, &mut path) {
                return Err(l.at(d, format!("dependency cycle: {}", path.join(" -> "))));
            }
        }
    }
    Ok(())
}

/// Whether `to` is reachable from `from`; `path` ends with the way there.
fn reaches<'a>(
    from: &str,
    to: &str,
    next: &dyn Fn(&str) -> Vec<&'a Spanned<String>>,
    seen: &mut BTreeSet<String>,
    path: &mut Vec<String>,
) -> bool {
    if from == to {
        return true;
    }
    if !seen.insert(from.to_string()) {
        return false;
    }
    for n in next(from) {
        path.push(n.get_ref().clone());
        if reaches(n.get_ref(), to, next, seen, path) {
            return true;
        }
        path.pop();
    }
    false
}

/// Milliseconds of a duration such as `"500ms"`, `"30s"`, `"5m"`, `"1h"`,
/// `"7d"`.
pub fn parse_duration(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(scale)
}

/// Parses sizes like `1G`, `512M`, `2GiB`, `1048576` (binary units).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// Parses `SRC:DST[:ro|rw]`.
pub fn parse_bind(s: &str) -> Result<BindSpec, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (source, target, readonly) = match parts.as_slice() {
        [s, t] => (*s, *t, false),
        [s, t, "ro"] => (*s, *t, true),
        [s, t, "rw"] => (*s, *t, false),
        [_, _, o] => return Err(format!("unknown bind option {o:?} (expected ro or rw)")),
        _ => return Err("expected SOURCE:TARGET[:ro|rw]".into()),
    };
    for p in [source, target] {
        if !is_clean_absolute(p) {
            return Err(format!(
                "{p:?} must be an absolute path without `..` components"
            ));
        }
    }
    Ok(BindSpec {
        source: source.into(),
        target: target.into(),
        readonly,
    })
}

/// Parses `PATH[:size=SIZE]`.
pub fn parse_tmpfs(s: &str) -> Result<TmpfsSpec, String> {
    let (path, opts) = s.split_once(':').unwrap_or((s, ""));
    if !is_clean_absolute(path) {
        return Err(format!(
            "{path:?} must be an absolute path without `..` components, not /"
        ));
    }
    let mut size = TMPFS_DEFAULT_SIZE;
    for opt in opts.split(',').filter(|o| !o.is_empty()) {
        match opt.split_once('=') {
            Some(("size", v)) => {
                size = parse_size(v).filter(|n| *n >= 4096).ok_or_else(|| {
                    format!("size {v:?}: expected a size of at least 4K, like 64M")
                })?;
            }
            _ => return Err(format!("unknown tmpfs option {opt:?} (expected size=SIZE)")),
        }
    }
    Ok(TmpfsSpec {
        path: path.trim_end_matches('/').to_string(),
        size,
    })
}

/// Absolute, and no `..` component.
pub fn is_clean_absolute(p: &str) -> bool {
    p.starts_with('/') && !p.split('/').any(|c| c == "..") && p.len() > 1
}

fn size_text(n: u64) -> String {
    if n.is_multiple_of(1 << 40) {
        format!("{}T", n >> 40)
    } else if n.is_multiple_of(1 << 30) {
        format!("{}G", n >> 30)
    } else {
        format!("{}M", n >> 20)
    }
}

fn validate(l: &Locator, r: raw::Recipe) -> Result<Recipe, Box<RecipeError>> {
    type Res<T> = Result<T, Box<RecipeError>>;
    let dir = l.path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let resolve = |p: &str| -> PathBuf {
        if Path::new(p).is_absolute() {
            PathBuf::from(p)
        } else {
            dir.join(p)
        }
    };

    if !is_name(r.name.get_ref()) {
        return Err(l.at(
            &r.name,
            "must be 1-63 characters of a-z, 0-9 and `-` (it names output files)",
        ));
    }
    if r.version.get_ref().trim().is_empty() {
        return Err(l.at(&r.version, "must not be empty"));
    }

    let Some(kernel_table) = r.kernel else {
        return Err(l.error_at(
            l.loc_field(0..0, "kernel".into()),
            "missing: add a [kernel] table with one source (debian, image or path)",
        ));
    };
    let kernel_span = kernel_table.span();
    let k = kernel_table.into_inner();
    let suite_of =
        |suite: &Option<Spanned<String>>, mirror: &Option<Spanned<String>>| DebianSuite {
            mirror: mirror
                .as_ref()
                .map(|m| m.get_ref().trim_end_matches('/').to_string())
                .unwrap_or_else(|| DEFAULT_MIRROR.to_string()),
            suite: suite
                .as_ref()
                .map(|s| s.get_ref().clone())
                .unwrap_or_else(|| DEFAULT_SUITE.to_string()),
        };
    let kernel_suite = suite_of(&k.suite, &k.mirror);
    let sources: Vec<&Spanned<String>> = [&k.debian, &k.image, &k.path]
        .into_iter()
        .flatten()
        .collect();
    let source_span = match sources.as_slice() {
        [] => {
            return Err(l.error_at(
                l.loc_field(kernel_span, "kernel".into()),
                "needs exactly one source: debian, image or path",
            ))
        }
        [one] => one.span(),
        [_, second, ..] => {
            return Err(l.at(
                second,
                "[kernel] takes exactly one of debian, image or path",
            ))
        }
    };
    if k.debian.is_none() {
        if let Some(s) = k.suite.as_ref().or(k.mirror.as_ref()) {
            return Err(l.at(s, "only applies to a `debian` kernel"));
        }
    }
    if let Some(m) = &k.modules {
        if k.path.is_none() {
            return Err(l.at(m, "only applies to a `path` kernel"));
        }
    }
    let kernel_source = if let Some(d) = &k.debian {
        if d.get_ref().trim().is_empty() {
            return Err(l.at(d, "names no package"));
        }
        KernelSource::Debian(kernel_suite.clone(), d.get_ref().trim().to_string())
    } else if let Some(i) = &k.image {
        KernelSource::Image(image_ref(l, i, &resolve)?)
    } else if let Some(p) = &k.path {
        KernelSource::Path {
            image: resolve(p.get_ref()),
            modules: k.modules.as_ref().map(|m| resolve(m.get_ref())),
        }
    } else {
        unreachable!("one source was found above")
    };
    let cmdline = match k.cmdline {
        Some(c) => {
            if c.get_ref().contains('\n') {
                return Err(l.at(&c, "must be one line"));
            }
            l.located(c)
        }
        None => At {
            value: DEFAULT_CMDLINE.to_string(),
            loc: l.loc_field(kernel_span.clone(), "kernel.cmdline".into()),
        },
    };
    let kernel = KernelSpec {
        source: At {
            value: kernel_source,
            loc: l.loc(source_span),
        },
        cmdline,
    };

    let mut names = BTreeSet::new();
    let mut containers = Vec::new();
    // Published ports so far, by container, for clashes.
    let mut published: Vec<(String, Port)> = Vec::new();
    // Each container's `depends_on`, with locations, for the checks after.
    let mut deps: Vec<(String, Vec<Spanned<String>>)> = Vec::new();
    let all = r
        .onboot
        .into_iter()
        .map(|c| (Kind::Onboot, c))
        .chain(r.services.into_iter().map(|c| (Kind::Service, c)))
        .chain(r.onshutdown.into_iter().map(|c| (Kind::Onshutdown, c)));
    for (kind, spanned) in all {
        let c = spanned.into_inner();
        let name = c.name.get_ref();
        if !is_name(name) {
            return Err(l.at(&c.name, "must be 1-63 characters of a-z, 0-9 and `-`"));
        }
        if !names.insert(name.clone()) {
            return Err(l.at(
                &c.name,
                format!("another container is already named {name:?}"),
            ));
        }
        let image_span = c.image.span();
        let image = match c.image.get_ref() {
            raw::Image::Ref(s) if s.trim().is_empty() => return Err(l.at(&c.image, "is empty")),
            raw::Image::Ref(s) => ImageSource::Oci(image_ref_str(l, &c.image, s, &resolve)?),
            raw::Image::Debian { packages, debs, .. } if packages.is_empty() && debs.is_empty() => {
                return Err(l.at(&c.image, "lists no Debian package"));
            }
            raw::Image::Debian { debs, .. } if debs.iter().any(|d| !d.ends_with(".deb")) => {
                return Err(l.at(&c.image, "`debs` lists files ending in .deb"));
            }
            raw::Image::Debian {
                packages,
                suite,
                scripts,
                debs,
            } => ImageSource::Debian {
                suite: DebianSuite {
                    mirror: kernel_suite.mirror.clone(),
                    suite: suite.clone().unwrap_or_else(|| kernel_suite.suite.clone()),
                },
                packages: packages.clone(),
                scripts: scripts.unwrap_or(true),
                debs: debs.clone(),
            },
        };
        if let Some(cmd) = &c.command {
            if cmd.get_ref().is_empty() {
                return Err(l.at(
                    cmd,
                    "must not be empty when given (omit it to use the image's Entrypoint and Cmd)",
                ));
            }
            if cmd.get_ref()[0].is_empty() {
                return Err(l.at(cmd, "the program (first element) is empty"));
            }
        }
        if let Some(env) = &c.env {
            for key in env.get_ref().keys() {
                if key.is_empty() || key.contains('=') || key.contains('\0') {
                    return Err(l.at(env, format!("key {key:?} is not a valid variable name")));
                }
            }
        }
        if let Some(cwd) = &c.cwd {
            if !cwd.get_ref().starts_with('/') {
                return Err(l.at(cwd, "must be an absolute path"));
            }
        }
        if let Some(u) = &c.user {
            let s = u.get_ref();
            if s.is_empty() || s.split(':').count() > 2 || s.split(':').any(str::is_empty) {
                return Err(l.at(u, "expected USER[:GROUP] (names or numeric ids)"));
            }
        }
        let net = match &c.net {
            None => Net::Host,
            Some(n) => match n.get_ref().as_str() {
                "host" => Net::Host,
                "none" => Net::None,
                "bridge" => Net::Bridge,
                _ => return Err(l.at(n, "expected \"host\", \"none\" or \"bridge\"")),
            },
        };
        let mut ports = Vec::new();
        for p in c.ports.iter().flatten() {
            if net != Net::Bridge {
                return Err(l.at(p, "published ports need net = \"bridge\""));
            }
            let port = parse_port(p.get_ref()).ok_or_else(|| {
                l.at(
                    p,
                    "expected [HOST_IP:]HOST_PORT:PORT[/tcp|/udp], such as \"8080:80\" or \"53:53/udp\"",
                )
            })?;
            let clash = |o: &(String, Port)| {
                o.1.host_port == port.host_port
                    && o.1.protocol == port.protocol
                    && (o.1.host_ip.is_none()
                        || port.host_ip.is_none()
                        || o.1.host_ip == port.host_ip)
            };
            if let Some((other, _)) = published.iter().find(|o| clash(o)) {
                return Err(l.at(
                    p,
                    format!(
                        "host port {} is already published by {other}",
                        port.host_port
                    ),
                ));
            }
            published.push((name.clone(), port));
            ports.push(port);
        }
        let binds = c
            .binds
            .into_iter()
            .map(|b| {
                let spec = parse_bind(b.get_ref()).map_err(|m| l.at(&b, m))?;
                Ok(At {
                    value: spec,
                    loc: l.loc(b.span()),
                })
            })
            .collect::<Res<Vec<_>>>()?;
        let mut binds = binds;
        let mut volumes = Vec::new();
        for v in c.volumes {
            let bad = || {
                l.at(
                    &v,
                    "expected NAME:/path (NAME of lowercase letters, digits and '-')",
                )
            };
            let (vname, target) = v.get_ref().split_once(':').ok_or_else(bad)?;
            if !is_name(vname) || !is_clean_absolute(target) || target.contains(':') {
                return Err(bad());
            }
            let target = target.to_string();
            if binds.iter().any(|b| b.value.target == target) {
                return Err(l.at(&v, format!("{target} is also a bind target")));
            }
            if volumes.iter().any(|(n, _)| n == vname) {
                return Err(l.at(&v, format!("volume {vname} is listed twice")));
            }
            volumes.push((vname.to_string(), target.clone()));
            binds.push(At {
                value: BindSpec {
                    source: format!("{}/{vname}", kiln_init::config::VOLUMES_DIR),
                    target,
                    readonly: false,
                },
                loc: l.loc(v.span()),
            });
        }
        let mut tmpfs: Vec<At<TmpfsSpec>> = Vec::new();
        for t in c.tmpfs {
            let spec = parse_tmpfs(t.get_ref()).map_err(|m| l.at(&t, m))?;
            if tmpfs.iter().any(|o| o.value.path == spec.path) {
                return Err(l.at(&t, format!("{} is listed twice", spec.path)));
            }
            if binds.iter().any(|b| b.value.target == spec.path) {
                return Err(l.at(&t, format!("{} is also a bind target", spec.path)));
            }
            tmpfs.push(At {
                value: spec,
                loc: l.loc(t.span()),
            });
        }
        let restart = match &c.restart {
            None => Restart::OnFailure,
            Some(r) => match r.get_ref().as_str() {
                "always" => Restart::Always,
                "on-failure" => Restart::OnFailure,
                "never" => Restart::Never,
                _ => return Err(l.at(r, "expected \"always\", \"on-failure\" or \"never\"")),
            },
        };
        let max_restarts = match &c.max_restarts {
            None => DEFAULT_MAX_RESTARTS,
            Some(m) if restart != Restart::OnFailure => {
                return Err(l.at(m, "applies only to restart = \"on-failure\""))
            }
            Some(m) => u32::try_from(*m.get_ref())
                .map_err(|_| l.at(m, "expected a number of restarts, 0 or more"))?,
        };
        // `init = true`: kiln's reaper as PID 1; `"image"`: the image's own
        // init (a system container), which may power its namespace off.
        let (reaper, system) = match c.init.as_ref().map(|i| (i, i.get_ref())) {
            None => (false, false),
            Some((_, toml::Value::Boolean(b))) => (*b, false),
            Some((_, toml::Value::String(s))) if s == "image" => (false, true),
            Some((i, _)) => return Err(l.at(i, "expected true, false or \"image\"")),
        };
        let stop_signal = match &c.stop_signal {
            // busybox's init (and finit) power off on SIGUSR2.
            None if system => "SIGUSR2".to_string(),
            None => "SIGTERM".to_string(),
            Some(sig) => {
                let name = sig.get_ref().to_ascii_uppercase();
                let name = if name.starts_with("SIG") {
                    name
                } else {
                    format!("SIG{name}")
                };
                if !STOP_SIGNALS.contains(&name.as_str()) {
                    return Err(l.at(sig, format!("expected one of {}", STOP_SIGNALS.join(", "))));
                }
                name
            }
        };
        if kind != Kind::Service {
            if let Some(d) = c.depends_on.as_ref().and_then(|d| d.first()) {
                return Err(l.at(
                    d,
                    "only services wait for others (onboot and onshutdown containers run in order)",
                ));
            }
            if let Some(r) = &c.ready {
                return Err(l.at(r, "only services have a readiness probe"));
            }
        }
        let ready = match &c.ready {
            None => None,
            Some(r) => Some(match r.get_ref() {
                Probe::Tcp(0) => return Err(l.at(r, "port 0 is no port")),
                Probe::File(p) if !is_clean_absolute(p) => {
                    return Err(l.at(r, "the file must be an absolute path without `..`"))
                }
                Probe::Exec(a) if a.first().is_none_or(String::is_empty) => {
                    return Err(l.at(r, "the command must not be empty"))
                }
                p => p.clone(),
            }),
        };
        let depends_on: Vec<Spanned<String>> = c.depends_on.clone().unwrap_or_default();
        deps.push((name.clone(), depends_on.clone()));
        let stop_timeout_ms = match &c.stop_timeout {
            None => DEFAULT_STOP_TIMEOUT_MS,
            Some(t) => parse_duration(t.get_ref()).ok_or_else(|| {
                l.at(
                    t,
                    "expected a duration such as \"500ms\", \"10s\" or \"2m\"",
                )
            })?,
        };
        let resources = Resources {
            memory: match &c.memory {
                None => None,
                Some(m) => Some(
                    parse_size(m.get_ref())
                        .filter(|n| *n >= 4 << 20)
                        .ok_or_else(|| {
                            l.at(m, "expected a size of at least 4M, such as \"256M\"")
                        })?,
                ),
            },
            cpu_millis: match &c.cpu {
                None => None,
                Some(v) => {
                    let cores = *v.get_ref();
                    if !(0.01..=1024.0).contains(&cores) {
                        return Err(l.at(v, "expected cores between 0.01 and 1024, such as 0.5"));
                    }
                    // In range: at most 1,024,000.
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    let millis = (cores * 1000.0).round() as u32;
                    Some(millis)
                }
            },
            pids: match &c.pids {
                None => None,
                Some(p) => Some(
                    u32::try_from(*p.get_ref())
                        .ok()
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| l.at(p, "expected a number of processes, 1 or more"))?,
                ),
            },
            io_weight: match &c.io_weight {
                None => None,
                Some(w) => Some(
                    u16::try_from(*w.get_ref())
                        .ok()
                        .filter(|n| (1..=10_000).contains(n))
                        .ok_or_else(|| {
                            l.at(w, "expected a weight from 1 to 10000 (default 100)")
                        })?,
                ),
            },
            class: c.class.as_ref().map(|c| *c.get_ref()).unwrap_or_default(),
        };
        let mut capabilities = capability_set(l, c.capabilities.as_ref())?;
        if system && !capabilities.iter().any(|c| c == "CAP_SYS_BOOT") {
            // In its own PID namespace reboot(2) only ends that namespace.
            capabilities.push("CAP_SYS_BOOT".into());
            capabilities.sort_by_key(|c| {
                kiln_init::config::CAPABILITIES
                    .iter()
                    .position(|n| c.strip_prefix("CAP_") == Some(n))
            });
        }
        let seccomp = match &c.seccomp {
            None => true,
            Some(s) => match s.get_ref().as_str() {
                "default" => true,
                "unconfined" => false,
                _ => return Err(l.at(s, "expected \"default\" or \"unconfined\"")),
            },
        };
        let mut sysctl = BTreeMap::new();
        for (k, v) in c.sysctl.iter().flatten() {
            let key = k.get_ref();
            if !kiln_init::config::namespaced_sysctl(key) {
                return Err(l.at(k, format!("{key} is not namespaced: only net.*, fs.mqueue.* and the IPC kernel.* settings can be set for one container")));
            }
            if key.starts_with("net.") && net == Net::Host {
                return Err(l.at(
                    k,
                    format!("{key} would change the host's network: set net = \"none\""),
                ));
            }
            let value = match v.get_ref() {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                _ => return Err(l.at(v, "expected a string or an integer")),
            };
            sysctl.insert(key.clone(), value);
        }
        let mut rlimits = BTreeMap::new();
        for (k, v) in c.rlimits.iter().flatten() {
            let key = k.get_ref().to_ascii_lowercase();
            if !kiln_init::config::RLIMITS.contains(&key.as_str()) {
                return Err(l.at(
                    k,
                    format!(
                        "unknown limit {:?} (expected one of {})",
                        k.get_ref(),
                        kiln_init::config::RLIMITS.join(", ")
                    ),
                ));
            }
            let limit = parse_rlimit(v.get_ref()).ok_or_else(|| {
                l.at(
                    v,
                    "expected a number, \"unlimited\" or \"SOFT:HARD\" with soft no more than hard",
                )
            })?;
            rlimits.insert(key, limit);
        }
        containers.push(ContainerSpec {
            kind,
            sysctl,
            rlimits,
            userns: c.userns.unwrap_or(false),
            capabilities,
            seccomp,
            resources,
            depends_on: depends_on.iter().map(|d| d.get_ref().clone()).collect(),
            ready,
            init: reaper,
            stop_signal,
            stop_timeout_ms,
            restart,
            max_restarts,
            essential: c.essential.unwrap_or(true),
            control: c.control.map(|v| l.located(v)),
            name: l.located(c.name),
            image: At {
                value: image,
                loc: l.loc(image_span),
            },
            command: match c.command {
                Some(c) => Some(l.located(c)),
                None if system => Some(At {
                    value: vec!["/sbin/init".to_string()],
                    loc: l.loc(c.init.as_ref().map_or(0..0, |i| i.span())),
                }),
                None => None,
            },
            env: c.env.map(Spanned::into_inner).unwrap_or_default(),
            cwd: c.cwd.map(|c| l.located(c)),
            user: c.user.map(|u| l.located(u)),
            net,
            address: None,
            ports,
            binds,
            volumes,
            tmpfs,
        });
    }

    check_dependencies(l, &containers, &deps)?;

    let mut paths = BTreeSet::new();
    let mut files = Vec::new();
    for f in r.files {
        let p = f.path.get_ref();
        if !is_clean_absolute(p) {
            return Err(l.at(&f.path, "must be an absolute path without `..`"));
        }
        if let Some(c) = &f.container {
            if !containers.iter().any(|x| x.name.value == *c.get_ref()) {
                return Err(l.at(c, format!("no container is named {:?}", c.get_ref())));
            }
        }
        let target = f.container.as_ref().map(|c| c.get_ref().clone());
        if !paths.insert((target, p.clone())) {
            return Err(l.at(&f.path, format!("{p} is declared twice")));
        }
        let contents = match (f.contents, f.source) {
            (Some(_), Some(s)) => {
                return Err(l.at(&s, "give either `contents` or `source`, not both"))
            }
            (None, None) => return Err(l.at(&f.path, "needs `contents` or `source`")),
            (Some(c), None) => FileContents::Inline(c.into_inner().into_bytes()),
            (None, Some(s)) => {
                let full = resolve(s.get_ref());
                match std::fs::metadata(&full) {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => return Err(l.at(&s, format!("{} is not a file", full.display()))),
                    Err(e) => return Err(l.at(&s, format!("cannot read {}: {e}", full.display()))),
                }
                FileContents::Source(At {
                    value: full,
                    loc: l.loc(s.span()),
                })
            }
        };
        let mode = match &f.mode {
            Some(m) => u32::from_str_radix(m.get_ref(), 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| l.at(m, "expected an octal mode such as \"0644\""))?,
            None => 0o644,
        };
        files.push(FileSpec {
            container: f.container.map(|c| l.located(c)),
            path: l.located(f.path),
            contents,
            mode,
            uid: f.uid.unwrap_or(0),
            gid: f.gid.unwrap_or(0),
        });
    }

    let hostname = match &r.host.hostname {
        Some(h) => {
            let s = h.get_ref();
            if s.is_empty()
                || s.len() > 64
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                return Err(l.at(h, "not a valid hostname"));
            }
            s.clone()
        }
        None => r.name.get_ref().clone(),
    };
    let when_done = match &r.host.when_done {
        None => WhenDone::Stay,
        Some(w) => match w.get_ref().as_str() {
            "stay" => WhenDone::Stay,
            "poweroff" => WhenDone::Poweroff,
            "reboot" => WhenDone::Reboot,
            _ => return Err(l.at(w, "expected \"stay\", \"poweroff\" or \"reboot\"")),
        },
    };

    let hostname_pinned = match &r.host.hostname_from {
        None => false,
        Some(h) => match h.get_ref().as_str() {
            "recipe" => true,
            "network" => false,
            _ => return Err(l.at(h, "expected \"recipe\" or \"network\"")),
        },
    };
    let network = network(l, &r.network)?;
    // Bridge addresses in recipe order, after the host's (the first).
    let (subnet, prefix) = network.bridge_subnet;
    let size = 1u64 << (32 - u32::from(prefix));
    for (n, c) in containers
        .iter_mut()
        .filter(|c| c.net == Net::Bridge)
        .enumerate()
    {
        // Network, host, containers, broadcast.
        let offset = n as u64 + 2;
        if offset >= size - 1 {
            let msg = format!(
                "{}/{prefix} has room for {} containers on the bridge, not {}",
                subnet,
                size.saturating_sub(3),
                n + 1
            );
            return Err(match &r.network.bridge_subnet {
                Some(s) => l.at(s, msg),
                None => l.error_at(c.name.loc.clone(), msg),
            });
        }
        c.address = Some(std::net::Ipv4Addr::from(
            u32::from(subnet) + u32::try_from(offset).unwrap_or(u32::MAX),
        ));
    }
    let healthy_after_ms = match &r.host.healthy_after {
        None => DEFAULT_HEALTHY_AFTER_MS,
        Some(h) => parse_duration(h.get_ref()).ok_or_else(|| {
            l.at(
                h,
                "expected a duration such as \"500ms\", \"30s\" or \"5m\"",
            )
        })?,
    };

    let size = match r.disk.size {
        Some(s) => {
            let n = parse_size(s.get_ref())
                .ok_or_else(|| l.at(&s, "expected a size such as \"1G\" or \"512M\""))?;
            if n < MIN_DISK_SIZE {
                return Err(l.at(
                    &s,
                    format!(
                        "{} is too small: at least {} (the EFI system partition alone is 64M)",
                        s.get_ref(),
                        size_text(MIN_DISK_SIZE)
                    ),
                ));
            }
            if n > MAX_DISK_SIZE {
                return Err(l.at(
                    &s,
                    format!(
                        "{} is too large: at most {}",
                        s.get_ref(),
                        size_text(MAX_DISK_SIZE)
                    ),
                ));
            }
            if n % 512 != 0 {
                return Err(l.at(&s, "must be a multiple of 512 bytes"));
            }
            At {
                value: n,
                loc: l.loc(s.span()),
            }
        }
        None => At {
            value: DEFAULT_DISK_SIZE,
            loc: l.loc_field(0..0, "disk.size".into()),
        },
    };

    // One of a few words, or the default.
    let choose = |v: &Option<Spanned<String>>, what: &str, words: &[&str]| match v {
        None => Ok(0),
        Some(v) => words.iter().position(|w| w == v.get_ref()).ok_or_else(|| {
            let expected: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
            l.at(
                v,
                format!(
                    "{:?} is not {what} (expected {})",
                    v.get_ref(),
                    expected.join(" or ")
                ),
            )
        }),
    };
    let verity_error = [VerityError::Eio, VerityError::Restart]
        [choose(&r.disk.verity_error, "a verity_error", &["eio", "restart"])?];
    let update_mode = [UpdateMode::Ab, UpdateMode::None]
        [choose(&r.disk.update, "an update layout", &["ab", "none"])?];
    let slot_size = match &r.disk.slot_size {
        None => None,
        Some(s) => {
            let n = parse_size(s.get_ref())
                .filter(|n| n.is_multiple_of(1 << 20) && *n > 0)
                .ok_or_else(|| {
                    l.at(s, "expected a size in whole MiB such as \"512M\" or \"2G\"")
                })?;
            if update_mode == UpdateMode::None {
                return Err(l.at(s, "slot_size needs update = \"ab\""));
            }
            Some(At {
                value: n,
                loc: l.loc(s.span()),
            })
        }
    };
    let tries = match &r.update.tries {
        None => DEFAULT_TRIES,
        Some(t) => u8::try_from(*t.get_ref())
            .ok()
            .filter(|n| (1..=15).contains(n))
            .ok_or_else(|| l.at(t, "tries must be 1 to 15 (the GPT bits hold 4)"))?,
    };
    let healthy_within_ms = match &r.update.healthy_within {
        None => DEFAULT_HEALTHY_WITHIN_MS,
        Some(h) => parse_duration(h.get_ref())
            .filter(|&ms| ms > 0)
            .ok_or_else(|| l.at(h, "expected a duration such as \"90s\" or \"5m\""))?,
    };
    if let (Some(h), true) = (
        &r.update.healthy_within,
        healthy_within_ms <= healthy_after_ms,
    ) {
        return Err(l.at(
            h,
            "must be longer than host.healthy_after: a new slot has to be healthy that long first",
        ));
    }
    let online = online_updates(l, &r.update, &resolve, update_mode, &containers)?;
    let update = UpdateSpec {
        tries,
        healthy_within_ms,
        online,
    };

    let formats = match r.output.formats {
        Some(f) => {
            if f.get_ref().is_empty() {
                return Err(l.at(&f, "lists no format"));
            }
            let mut out = Vec::new();
            for name in f.get_ref() {
                let format = Format::parse(name).ok_or_else(|| {
                    l.at(
                        &f,
                        format!(
                            "format {name:?} is not supported (supported: {})",
                            Format::ALL
                                .iter()
                                .map(|(n, _)| *n)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })?;
                if out.contains(&format) {
                    return Err(l.at(&f, format!("format {name:?} is listed twice")));
                }
                out.push(format);
            }
            if out.contains(&Format::Vhd) && !size.value.is_multiple_of(1 << 20) {
                return Err(l.error_at(
                    size.loc.clone(),
                    "a fixed VHD needs a size in whole MiB (Azure's rule)",
                ));
            }
            At {
                value: out,
                loc: l.loc(f.span()),
            }
        }
        None => At {
            value: vec![Format::Raw],
            loc: l.loc_field(0..0, "output.formats".into()),
        },
    };
    let root_compression = match r.output.root_compression {
        Some(c) => At {
            value: RootCompression::parse(c.get_ref())
                .ok_or_else(|| l.at(&c, "expected \"zstd\" or \"zstd:LEVEL\" with LEVEL 1-22"))?,
            loc: l.loc(c.span()),
        },
        None => At {
            value: RootCompression::default(),
            loc: l.loc_field(0..0, "output.root_compression".into()),
        },
    };

    Ok(Recipe {
        path: l.path.to_path_buf(),
        name: l.located(r.name),
        version: l.located(r.version),
        kernel,
        containers,
        files,
        host: HostSpec {
            hostname,
            when_done,
            healthy_after_ms,
            hostname_pinned,
        },
        disk: DiskSpec {
            size,
            verity: r.disk.verity.unwrap_or(true),
            verity_error,
            update: update_mode,
            slot_size,
        },
        output: OutputSpec {
            formats,
            root_compression,
            qcow2_compress: r.output.qcow2_compress.unwrap_or(false),
        },
        network,
        update,
    })
}

/// The typed `[network]` table.
/// `[HOST_IP:]HOST_PORT:PORT[/tcp|/udp]`, TCP by default; ports 1-65535.
fn parse_port(s: &str) -> Option<Port> {
    let (rest, protocol) = match s.rsplit_once('/') {
        Some((r, "tcp")) => (r, Protocol::Tcp),
        Some((r, "udp")) => (r, Protocol::Udp),
        Some(_) => return None,
        None => (s, Protocol::Tcp),
    };
    let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0);
    let parts: Vec<&str> = rest.split(':').collect();
    let (host_ip, host_port, inner) = match parts[..] {
        [h, c] => (None, h, c),
        [ip, h, c] => (Some(ip.parse().ok()?), h, c),
        _ => return None,
    };
    Some(Port {
        host_ip,
        host_port: port(host_port)?,
        port: port(inner)?,
        protocol,
    })
}

fn network(l: &Locator, n: &raw::Network) -> Result<kiln_init::config::Network, Box<RecipeError>> {
    use kiln_init::config::Interface;
    use std::net::Ipv4Addr;
    let wait_ms = match &n.wait {
        None => kiln_init::config::DEFAULT_NETWORK_WAIT_MS,
        Some(w) => parse_duration(w.get_ref())
            .ok_or_else(|| l.at(w, "expected a duration such as \"500ms\", \"5s\" or \"1m\""))?,
    };
    let ip = |s: &Spanned<String>| {
        s.get_ref()
            .parse::<Ipv4Addr>()
            .map_err(|_| l.at(s, "expected an IPv4 address such as \"10.0.0.1\""))
    };
    let mut interfaces: Vec<Interface> = Vec::new();
    for i in &n.interface {
        let i = i.get_ref();
        let name = i.name.get_ref();
        if name.is_empty()
            || name.len() > 15
            || name.contains(['/', ':'])
            || name.chars().any(char::is_whitespace)
        {
            return Err(l.at(
                &i.name,
                "not an interface name (1 to 15 characters, no '/', ':' or spaces)",
            ));
        }
        if interfaces.iter().any(|o| o.name == *name) {
            return Err(l.at(&i.name, format!("interface {name} is configured twice")));
        }
        let address = match &i.address {
            None => None,
            Some(a) => {
                let parsed = a.get_ref().split_once('/').and_then(|(ip, p)| {
                    Some((
                        ip.parse::<Ipv4Addr>().ok()?,
                        p.parse::<u8>().ok().filter(|&p| p <= 32)?,
                    ))
                });
                Some(parsed.ok_or_else(|| {
                    l.at(
                        a,
                        "expected an address with its prefix length, such as \"10.0.0.5/24\"",
                    )
                })?)
            }
        };
        let dhcp = i.dhcp.unwrap_or(address.is_none());
        if dhcp && address.is_some() {
            if let Some(a) = &i.address {
                return Err(l.at(a, "a static address needs dhcp = false"));
            }
        }
        let gateway = i.gateway.as_ref().map(ip).transpose()?;
        if let (Some(g), None) = (&i.gateway, address) {
            return Err(l.at(g, "a gateway needs a static address"));
        }
        let dns = i.dns.iter().map(ip).collect::<Result<Vec<_>, _>>()?;
        let mtu = match &i.mtu {
            None => None,
            Some(m) => Some(
                u32::try_from(*m.get_ref())
                    .ok()
                    .filter(|m| (576..=65535).contains(m))
                    .ok_or_else(|| l.at(m, "expected an MTU from 576 to 65535"))?,
            ),
        };
        interfaces.push(Interface {
            name: name.clone(),
            dhcp,
            address,
            gateway,
            dns,
            mtu,
        });
    }
    let bridge_subnet = match &n.bridge_subnet {
        None => kiln_init::config::DEFAULT_BRIDGE_SUBNET,
        Some(s) => {
            let msg = "expected a private IPv4 subnet with room for containers, such as \"172.31.0.0/24\" (prefix 8 to 29, host bits zero)";
            let (ip, p) = s
                .get_ref()
                .split_once('/')
                .and_then(|(ip, p)| Some((ip.parse::<Ipv4Addr>().ok()?, p.parse::<u8>().ok()?)))
                .filter(|(ip, p)| {
                    (8..=29).contains(p) && u32::from(*ip) & (u32::MAX >> p) == 0 && ip.is_private()
                })
                .ok_or_else(|| l.at(s, msg))?;
            let clash = interfaces.iter().find_map(|i| {
                let (a, ap) = i.address?;
                let bits = u32::MAX << (32 - u32::from(ap.min(p)));
                (u32::from(a) & bits == u32::from(ip) & bits).then(|| i.name.clone())
            });
            if let Some(name) = clash {
                return Err(l.at(s, format!("overlaps the address of interface {name}")));
            }
            (ip, p)
        }
    };
    Ok(kiln_init::config::Network {
        interfaces,
        ipv6: n.ipv6.unwrap_or(true),
        wait_ms,
        bridge_subnet,
    })
}

fn image_ref(
    l: &Locator,
    s: &Spanned<String>,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<ImageRef, Box<RecipeError>> {
    image_ref_str(l, s, s.get_ref(), resolve)
}

/// `oci-layout:DIR[:TAG]`, `docker-archive:FILE` (relative to the recipe)
/// or a registry reference.
fn image_ref_str<T>(
    l: &Locator,
    at: &Spanned<T>,
    s: &str,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<ImageRef, Box<RecipeError>> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix("oci-layout:") {
        if rest.is_empty() {
            return Err(l.at(at, "oci-layout: needs a directory"));
        }
        // `DIR:TAG` unless the whole thing names a directory.
        let whole = resolve(rest);
        if whole.is_dir() {
            return Ok(ImageRef::OciLayout {
                dir: whole,
                tag: None,
            });
        }
        return Ok(match rest.rsplit_once(':') {
            Some((d, t)) if !t.contains('/') => ImageRef::OciLayout {
                dir: resolve(d),
                tag: Some(t.to_string()),
            },
            _ => ImageRef::OciLayout {
                dir: whole,
                tag: None,
            },
        });
    }
    if let Some(rest) = s.strip_prefix("docker-archive:") {
        if rest.is_empty() {
            return Err(l.at(at, "docker-archive: needs a file"));
        }
        return Ok(ImageRef::DockerArchive(resolve(rest)));
    }
    s.parse::<oci_client::Reference>()
        .map_err(|e| l.at(at, format!("not an image reference: {e}")))?;
    Ok(ImageRef::Registry(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "hello"
version = "0.1.0"

[kernel]
debian = "linux-image-cloud-amd64"
cmdline = "console=ttyS0"

[[onboot]]
name = "greet"
image = { debian = ["busybox-static"] }
command = ["/bin/busybox", "echo", "hello"]

[[service]]
name = "web"
image = "127.0.0.1:5000/web:1"
env = { KEY = "v" }
net = "none"
binds = ["/run/config:/config:ro"]

[[file]]
path = "/etc/motd"
contents = "hi"
mode = "0644"

[host]
when_done = "poweroff"

[disk]
size = "512M"
"#;

    fn err(text: &str) -> RecipeError {
        *parse(Path::new("r.toml"), text).unwrap_err()
    }

    #[test]
    fn good_recipe_parses_into_types() {
        let r = parse(Path::new("/x/r.toml"), GOOD).unwrap();
        assert_eq!(r.name(), "hello");
        assert_eq!(r.disk.size.value, 512 << 20);
        assert_eq!(r.output.formats.value, vec![Format::Raw]);
        assert_eq!(r.output.root_compression.value.zstd_level, 15);
        assert_eq!(r.host.when_done, WhenDone::Poweroff);
        assert_eq!(r.host.hostname, "hello");
        assert_eq!(
            r.containers[0].image.value,
            ImageSource::Debian {
                suite: DebianSuite {
                    mirror: DEFAULT_MIRROR.into(),
                    suite: DEFAULT_SUITE.into()
                },
                packages: vec!["busybox-static".into()],
                scripts: true,
                debs: vec![],
            }
        );
        assert_eq!(r.containers[0].kind, Kind::Onboot);
        assert_eq!(r.containers[1].kind, Kind::Service);
        assert_eq!(r.containers[1].net, Net::None);
        assert_eq!(r.containers[1].binds[0].value.target, "/config");
        assert_eq!(r.containers[1].binds[0].loc.field, "service[0].binds[0]");
        assert_eq!(r.containers[0].command.as_ref().unwrap().loc.line, 12);
        assert_eq!(
            r.kernel.source.value,
            KernelSource::Debian(
                DebianSuite {
                    mirror: DEFAULT_MIRROR.into(),
                    suite: DEFAULT_SUITE.into()
                },
                "linux-image-cloud-amd64".into()
            )
        );
        assert_eq!(r.kernel.source.loc.field, "kernel.debian");
    }

    #[test]
    fn local_image_paths_resolve_against_the_recipe() {
        let text = GOOD.replace("127.0.0.1:5000/web:1", "oci-layout:img:v2");
        let r = parse(Path::new("/x/r.toml"), &text).unwrap();
        assert_eq!(
            r.containers[1].image.value,
            ImageSource::Oci(ImageRef::OciLayout {
                dir: "/x/img".into(),
                tag: Some("v2".into())
            })
        );
        let text = GOOD.replace("127.0.0.1:5000/web:1", "docker-archive:a.tar");
        let r = parse(Path::new("/x/r.toml"), &text).unwrap();
        assert_eq!(
            r.containers[1].image.value,
            ImageSource::Oci(ImageRef::DockerArchive("/x/a.tar".into()))
        );
        let e = err(&GOOD.replace("127.0.0.1:5000/web:1", "UPPER/Case::bad"));
        assert_eq!(e.loc.field, "service[0].image", "{e}");
    }

    #[test]
    fn unknown_key_names_line_and_field() {
        let text = GOOD.replace("net = \"none\"", "nett = \"none\"");
        let e = err(&text);
        assert_eq!(e.loc.line, 18, "{e}");
        assert_eq!(e.loc.field, "service[0].nett", "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
        assert!(e.to_string().starts_with("r.toml:18:1: "), "{e}");
    }

    #[test]
    fn wrong_type_names_field() {
        let text = GOOD.replace("version = \"0.1.0\"", "version = 1");
        let e = err(&text);
        assert_eq!((e.loc.line, e.loc.field.as_str()), (3, "version"), "{e}");
    }

    #[test]
    fn two_kernel_sources_is_an_error() {
        let text = GOOD.replace(
            "cmdline = \"console=ttyS0\"",
            "path = \"vmlinuz\"\ncmdline = \"console=ttyS0\"",
        );
        let e = err(&text);
        assert_eq!(e.loc.field, "kernel.path", "{e}");
        assert_eq!(e.loc.line, 7, "{e}");
    }

    #[test]
    fn missing_kernel_is_reported_on_kernel() {
        let text = "name = \"x\"\nversion = \"1\"\n";
        let e = err(text);
        assert_eq!(e.loc.field, "kernel", "{e}");
        let e = err("name = \"x\"\nversion = \"1\"\n[kernel]\ncmdline = \"c\"\n");
        assert_eq!(e.loc.field, "kernel", "{e}");
        assert!(e.message.contains("one source"), "{e}");
    }

    #[test]
    fn missing_required_field_is_named() {
        let e = err("version = \"1\"\n[kernel]\ndebian = \"k\"\n");
        assert_eq!(e.loc.field, "name", "{e}");
        let text = GOOD.replace("name = \"web\"\n", "");
        let e = err(&text);
        assert!(e.loc.field.ends_with("name"), "{e}");
        assert!(e.message.contains("missing field"), "{e}");
    }

    #[test]
    fn empty_command_is_reported_on_command() {
        let text = GOOD.replace(
            "command = [\"/bin/busybox\", \"echo\", \"hello\"]",
            "command = []",
        );
        let e = err(&text);
        assert_eq!(
            (e.loc.line, e.loc.field.as_str()),
            (12, "onboot[0].command"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_key_is_named() {
        let e = err(&GOOD.replace("size = \"512M\"", "size = \"512M\"\nsize = \"1G\""));
        assert_eq!(e.loc.field, "disk.size", "{e}");
        assert_eq!(e.loc.line, 31, "{e}");
        assert!(e.message.contains("duplicate key `size`"), "{e}");
    }

    #[test]
    fn disk_size_bounds_are_checked() {
        let e = err(&GOOD.replace("512M", "64M"));
        assert_eq!(e.loc.field, "disk.size", "{e}");
        assert!(e.message.contains("too small"), "{e}");
        let e = err(&GOOD.replace("512M", "100000T"));
        assert!(e.message.contains("too large"), "{e}");
        let e = err(&GOOD.replace("512M", "99999999999999999999T"));
        assert_eq!(e.loc.field, "disk.size", "{e}");
    }

    #[test]
    fn file_source_must_exist() {
        let text = GOOD.replace("contents = \"hi\"", "source = \"no-such-file\"");
        let e = err(&text);
        assert_eq!(e.loc.field, "file[0].source", "{e}");
        assert!(e.message.contains("no-such-file"), "{e}");
    }

    #[test]
    fn validation_errors_point_at_values() {
        let e = err(&GOOD.replace("net = \"none\"", "net = \"nat\""));
        assert_eq!(
            (e.loc.line, e.loc.field.as_str()),
            (18, "service[0].net"),
            "{e}"
        );
        let e = err(&GOOD.replace("size = \"512M\"", "size = \"lots\""));
        assert_eq!(e.loc.field, "disk.size", "{e}");
        let e = err(&GOOD.replace("mode = \"0644\"", "mode = \"999\""));
        assert_eq!(e.loc.field, "file[0].mode", "{e}");
        let e = err(&GOOD.replace(":/config:ro", ":../config:ro"));
        assert_eq!(e.loc.field, "service[0].binds[0]", "{e}");
        let e = err(&GOOD.replace("name = \"web\"", "name = \"greet\""));
        assert_eq!(e.loc.field, "service[0].name", "{e}");
        let e = err(&GOOD.replace("name = \"hello\"", "name = \"Hello\""));
        assert_eq!((e.loc.line, e.loc.field.as_str()), (2, "name"), "{e}");
        let e = err(&GOOD.replace("[disk]", "[output]\nroot_compression = \"gzip\"\n[disk]"));
        assert_eq!(e.loc.field, "output.root_compression", "{e}");
    }

    #[test]
    fn syntax_error_is_located() {
        let e = err("name = \"x\"\nversion = \n");
        assert_eq!(e.loc.line, 2, "{e}");
    }

    #[test]
    fn container_files_name_a_container() {
        let text = |c: &str| {
            format!("name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"k\"\n[[service]]\nname = \"db\"\nimage = \"busybox\"\n[[file]]\ncontainer = \"{c}\"\npath = \"/etc/x\"\ncontents = \"y\"\n[[file]]\npath = \"/etc/x\"\ncontents = \"host\"\n")
        };
        let r = parse(Path::new("/r/x.toml"), &text("db")).unwrap();
        assert_eq!(r.files[0].container.as_ref().unwrap().value, "db");
        assert!(
            r.files[1].container.is_none(),
            "same path, host root: no clash"
        );
        let e = err(&text("web"));
        assert_eq!(e.loc.field, "file[0].container", "{e}");
    }

    #[test]
    fn tmpfs_specs() {
        assert_eq!(
            parse_tmpfs("/var/lib/nginx").unwrap(),
            TmpfsSpec {
                path: "/var/lib/nginx".into(),
                size: TMPFS_DEFAULT_SIZE
            }
        );
        assert_eq!(parse_tmpfs("/cache:size=1G").unwrap().size, 1 << 30);
        for bad in [
            "cache",
            "/",
            "/a/../b",
            "/c:size=big",
            "/c:mode=1777",
            "/c:size=1",
        ] {
            assert!(parse_tmpfs(bad).is_err(), "{bad}");
        }
        let e = err(
            "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\n[[service]]\nname = \"a\"\nimage = \"busybox\"\nbinds = [\"/run/a:/data\"]\ntmpfs = [\"/cache\", \"/data\"]\n",
        );
        assert_eq!(e.loc.field, "service[0].tmpfs[1]", "{e}");
        assert!(e.to_string().contains("also a bind target"), "{e}");
    }

    #[test]
    fn restart_policies() {
        let base = "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\n[[service]]\nname = \"a\"\nimage = \"busybox\"\n";
        let ok = |extra: &str| parse(Path::new("r.toml"), &format!("{base}{extra}")).unwrap();
        let c = &ok("").containers[0];
        assert_eq!(
            (c.restart, c.max_restarts, c.essential),
            (Restart::OnFailure, DEFAULT_MAX_RESTARTS, true)
        );
        let c = &ok("restart = \"always\"\nessential = false\n").containers[0];
        assert_eq!((c.restart, c.essential), (Restart::Always, false));
        assert_eq!(ok("max_restarts = 0\n").containers[0].max_restarts, 0);
        let c = &ok("").containers[0];
        assert_eq!(
            (c.stop_signal.as_str(), c.stop_timeout_ms),
            ("SIGTERM", 10_000)
        );
        let c = &ok("stop_signal = \"usr1\"\nstop_timeout = \"1500ms\"\n").containers[0];
        assert_eq!(
            (c.stop_signal.as_str(), c.stop_timeout_ms),
            ("SIGUSR1", 1500)
        );
        assert_eq!(parse_duration("2m"), Some(120_000));
        let c =
            &ok("memory = \"256M\"\ncpu = 0.5\npids = 64\nio_weight = 200\nclass = \"batch\"\n")
                .containers[0];
        assert_eq!(
            c.resources,
            Resources {
                memory: Some(256 << 20),
                cpu_millis: Some(500),
                pids: Some(64),
                io_weight: Some(200),
                class: Class::Batch
            }
        );
        assert_eq!(
            ok("cpu = 2\n").containers[0].resources.cpu_millis,
            Some(2000)
        );
        let c = &ok("net = \"none\"\nsysctl = { \"net.core.somaxconn\" = 512, \"kernel.sem\" = \"1 2 3 4\" }\nrlimits = { NOFILE = 64, core = \"unlimited\", stack = \"1:2\" }\n").containers[0];
        assert_eq!(c.sysctl["net.core.somaxconn"], "512");
        assert_eq!(c.sysctl["kernel.sem"], "1 2 3 4");
        assert_eq!(c.rlimits["nofile"], (64, 64));
        assert_eq!(c.rlimits["core"], (u64::MAX, u64::MAX));
        assert_eq!(c.rlimits["stack"], (1, 2));
        assert!(!c.userns);
        assert!(ok("userns = true\n").containers[0].userns);
        let c = &ok("init = \"image\"\n").containers[0];
        assert_eq!(
            c.command.as_ref().map(|c| &c.value[..]),
            Some(&["/sbin/init".to_string()][..])
        );
        assert_eq!((c.init, c.stop_signal.as_str()), (false, "SIGUSR2"));
        assert!(c.capabilities.contains(&"CAP_SYS_BOOT".to_string()));
        assert!(ok("init = true\n").containers[0].init);
        assert_eq!(parse_duration("7d"), Some(7 * 86_400_000));
        for bad in ["", "s", "1.5s", "-1s", "10 s", "3w"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        for (extra, field, says) in [
            (
                "restart = \"sometimes\"\n",
                "service[0].restart",
                "expected \"always\"",
            ),
            (
                "restart = \"never\"\nmax_restarts = 2\n",
                "service[0].max_restarts",
                "only to restart = \"on-failure\"",
            ),
            (
                "max_restarts = -1\n",
                "service[0].max_restarts",
                "0 or more",
            ),
            (
                "stop_signal = \"SIGSTOP\"\n",
                "service[0].stop_signal",
                "SIGTERM, SIGINT",
            ),
            (
                "stop_timeout = \"10\"\n",
                "service[0].stop_timeout",
                "a duration",
            ),
            ("memory = \"1M\"\n", "service[0].memory", "at least 4M"),
            ("cpu = 0\n", "service[0].cpu", "between 0.01"),
            ("pids = 0\n", "service[0].pids", "1 or more"),
            ("io_weight = 20000\n", "service[0].io_weight", "1 to 10000"),
            ("class = \"low\"\n", "service[0].class", "unknown variant"),
            ("init = \"yes\"\n", "service[0].init", "\"image\""),
            (
                "sysctl = { \"vm.swappiness\" = \"1\" }\n",
                "service[0].sysctl.vm.swappiness",
                "not namespaced",
            ),
            (
                "sysctl = { \"net.core.somaxconn\" = \"1\" }\n",
                "service[0].sysctl.net.core.somaxconn",
                "net = \"none\"",
            ),
            (
                "rlimits = { files = 1 }\n",
                "service[0].rlimits.files",
                "unknown limit",
            ),
            (
                "rlimits = { nofile = \"9:1\" }\n",
                "service[0].rlimits.nofile",
                "SOFT:HARD",
            ),
        ] {
            let e = err(&format!("{base}{extra}"));
            assert_eq!(e.loc.field, field, "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
    }

    #[test]
    fn network_tables() {
        let base =
            "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\n";
        let ok = |extra: &str| parse(Path::new("r.toml"), &format!("{base}{extra}")).unwrap();
        let n = ok("").network;
        assert_eq!(n, kiln_init::config::Network::default());
        assert!(n.ipv6 && n.interfaces.is_empty() && n.wait_ms == 5000);
        let r = ok("[host]\nhostname_from = \"recipe\"\n[network]\nipv6 = false\nwait = \"2s\"\n[[network.interface]]\nname = \"eth1\"\naddress = \"10.0.0.5/24\"\ngateway = \"10.0.0.1\"\ndns = [\"10.0.0.53\"]\nmtu = 9000\n[[network.interface]]\nname = \"eth0\"\nmtu = 1400\n");
        assert!(r.host.hostname_pinned);
        assert_eq!((r.network.ipv6, r.network.wait_ms), (false, 2000));
        let i = &r.network.interfaces;
        assert_eq!(i[0].name, "eth1");
        assert!(!i[0].dhcp);
        assert_eq!(i[0].address, Some(("10.0.0.5".parse().unwrap(), 24)));
        assert_eq!(i[0].gateway, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(
            i[0].dns,
            ["10.0.0.53".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        assert_eq!(i[0].mtu, Some(9000));
        assert!(i[1].dhcp && i[1].address.is_none());
        for (extra, field, says) in [
            ("[network]\nwait = \"soon\"\n", "network.wait", "duration"),
            (
                "[[network.interface]]\nname = \"a/b\"\n",
                "network.interface[0].name",
                "interface name",
            ),
            (
                "[[network.interface]]\nname = \"e\"\n[[network.interface]]\nname = \"e\"\n",
                "network.interface[1].name",
                "twice",
            ),
            (
                "[[network.interface]]\nname = \"e\"\naddress = \"10.0.0.5\"\n",
                "network.interface[0].address",
                "prefix length",
            ),
            (
                "[[network.interface]]\nname = \"e\"\naddress = \"10.0.0.5/24\"\ndhcp = true\n",
                "network.interface[0].address",
                "dhcp = false",
            ),
            (
                "[[network.interface]]\nname = \"e\"\ngateway = \"10.0.0.1\"\n",
                "network.interface[0].gateway",
                "static address",
            ),
            (
                "[[network.interface]]\nname = \"e\"\ndns = [\"x\"]\n",
                "network.interface[0].dns[0]",
                "IPv4",
            ),
            (
                "[[network.interface]]\nname = \"e\"\nmtu = 10\n",
                "network.interface[0].mtu",
                "MTU",
            ),
            (
                "[host]\nhostname_from = \"dns\"\n",
                "host.hostname_from",
                "recipe",
            ),
        ] {
            let e = err(&format!("{base}{extra}"));
            assert_eq!(e.loc.field, field, "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
    }

    #[test]
    fn output_formats() {
        let base =
            "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\n";
        let parse_with = |extra: &str| parse(Path::new("r.toml"), &format!("{base}{extra}"));
        let mut r = parse_with(
            "[output]\nformats = [\"raw\", \"qcow2\", \"vhd\", \"vhd-dynamic\", \"vmdk\", \"gce\"]\n",
        )
        .unwrap();
        let files: Vec<String> = r
            .output
            .formats
            .value
            .iter()
            .map(|f| f.file_name("x"))
            .collect();
        assert_eq!(
            files,
            [
                "x.raw",
                "x.qcow2",
                "x.vhd",
                "x-dynamic.vhd",
                "x.vmdk",
                "x.tar.gz"
            ]
        );
        assert!(r.disk.verity);
        assert_eq!(r.disk.verity_error, VerityError::Eio);
        let v = parse_with("[disk]\nverity = false\nverity_error = \"restart\"\n").unwrap();
        assert!(!v.disk.verity);
        assert_eq!(v.disk.verity_error, VerityError::Restart);
        assert_eq!(
            v.update,
            UpdateSpec {
                tries: 3,
                healthy_within_ms: 300_000,
                online: None,
            }
        );
        assert_eq!(v.disk.update, UpdateMode::Ab);
        let u = parse_with(
            "[disk]\nupdate = \"none\"\n[update]\ntries = 1\nhealthy_within = \"90s\"\n",
        )
        .unwrap();
        assert_eq!(u.disk.update, UpdateMode::None);
        assert_eq!(
            u.update,
            UpdateSpec {
                tries: 1,
                healthy_within_ms: 90_000,
                online: None,
            }
        );
        for (text, field) in [
            ("[update]\ntries = 0\n", "update.tries"),
            ("[update]\ntries = 16\n", "update.tries"),
            (
                "[update]\nhealthy_within = \"10s\"\n",
                "update.healthy_within",
            ),
            ("[disk]\nupdate = \"abc\"\n", "disk.update"),
            ("[disk]\nslot_size = \"1000K\"\n", "disk.slot_size"),
            (
                "[disk]\nupdate = \"none\"\nslot_size = \"1G\"\n",
                "disk.slot_size",
            ),
        ] {
            let e = parse_with(text).unwrap_err();
            assert_eq!(e.loc.field, field, "{text}: {e}");
        }
        let e = parse_with("[disk]\nverity_error = \"panic\"\n").unwrap_err();
        assert_eq!(e.loc.field, "disk.verity_error", "{e}");
        assert!(e.to_string().contains("\"eio\" or \"restart\""), "{e}");
        assert!(!r.output.qcow2_compress);
        assert!(
            parse_with("[output]\nqcow2_compress = true\n")
                .unwrap()
                .output
                .qcow2_compress
        );
        r.set_formats(vec![Format::Vmdk, Format::Vmdk]).unwrap();
        assert_eq!(r.output.formats.value, [Format::Vmdk]);
        // A fixed VHD's size must be whole MiB, from the recipe or the
        // command line; the error points at the size.
        let e =
            *parse_with("[disk]\nsize = \"300000K\"\n[output]\nformats = [\"vhd\"]\n").unwrap_err();
        assert_eq!(e.loc.field, "disk.size", "{e}");
        assert!(e.message.contains("whole MiB"), "{e}");
        let mut r = parse_with("[disk]\nsize = \"300000K\"\n").unwrap();
        let e = r.set_formats(vec![Format::Vhd]).unwrap_err();
        assert_eq!(e.loc.field, "disk.size", "{e}");
        let e = *parse_with("[output]\nformats = [\"iso9660\"]\n").unwrap_err();
        assert!(
            e.message.contains("qcow2, vhd, vhd-dynamic, vmdk, gce"),
            "{e}"
        );
    }

    #[test]
    fn bridge_addresses_and_ports() {
        use std::net::Ipv4Addr;
        let svc = |name: &str, extra: &str| {
            format!("[[service]]\nname = \"{name}\"\nimage = \"busybox\"\n{extra}")
        };
        let head =
            "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\n";
        let parse_with = |body: String| parse(Path::new("r.toml"), &format!("{head}{body}"));
        let r = parse_with(format!(
            "{}{}{}",
            svc(
                "web",
                "net = \"bridge\"\nports = [\"8080:80\", \"10.0.2.15:5353:53/udp\"]\n"
            ),
            svc("host", ""),
            svc("db", "net = \"bridge\"\n"),
        ))
        .unwrap();
        let c = &r.containers;
        assert_eq!(c[0].address, Some(Ipv4Addr::new(172, 31, 0, 2)));
        assert_eq!(c[1].address, None);
        assert_eq!(c[2].address, Some(Ipv4Addr::new(172, 31, 0, 3)));
        assert_eq!(
            c[0].ports,
            [
                Port {
                    host_ip: None,
                    host_port: 8080,
                    port: 80,
                    protocol: Protocol::Tcp
                },
                Port {
                    host_ip: Some(Ipv4Addr::new(10, 0, 2, 15)),
                    host_port: 5353,
                    port: 53,
                    protocol: Protocol::Udp
                }
            ]
        );
        let r = parse_with(format!(
            "{}[network]\nbridge_subnet = \"10.9.0.0/16\"\n",
            svc("a", "net = \"bridge\"\n")
        ))
        .unwrap();
        assert_eq!(r.network.bridge_subnet, (Ipv4Addr::new(10, 9, 0, 0), 16));
        assert_eq!(r.containers[0].address, Some(Ipv4Addr::new(10, 9, 0, 2)));
        let bridged = svc("a", "net = \"bridge\"\nports = [\"80:80\"]\n");
        for (body, field, says) in [
            (svc("a", "ports = [\"80:80\"]\n"), "service[0].ports[0]", "net = \"bridge\""),
            (svc("a", "net = \"bridge\"\nports = [\"80\"]\n"), "service[0].ports[0]", "HOST_PORT:PORT"),
            (svc("a", "net = \"bridge\"\nports = [\"0:80\"]\n"), "service[0].ports[0]", "HOST_PORT:PORT"),
            (svc("a", "net = \"bridge\"\nports = [\"80:80/sctp\"]\n"), "service[0].ports[0]", "/udp"),
            (
                format!("{bridged}{}", svc("b", "net = \"bridge\"\nports = [\"127.0.0.1:80:81\"]\n")),
                "service[1].ports[0]",
                "already published by a",
            ),
            (
                format!("{bridged}[network]\nbridge_subnet = \"172.31.0.1/24\"\n"),
                "network.bridge_subnet",
                "host bits zero",
            ),
            (
                format!("{bridged}[network]\nbridge_subnet = \"8.8.0.0/16\"\n"),
                "network.bridge_subnet",
                "private",
            ),
            (
                format!("{bridged}{}[network]\nbridge_subnet = \"10.1.0.0/29\"\n", (0..6).map(|i| svc(&format!("s{i}"), "net = \"bridge\"\n")).collect::<String>()),
                "network.bridge_subnet",
                "room for 5 containers",
            ),
            (
                format!("{bridged}[network]\nbridge_subnet = \"10.0.0.0/16\"\n[[network.interface]]\nname = \"eth1\"\naddress = \"10.0.3.4/24\"\n"),
                "network.bridge_subnet",
                "interface eth1",
            ),
        ] {
            let e = *parse_with(body).unwrap_err();
            assert_eq!(e.loc.field, field, "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
        // Bridge containers may set their own network's sysctls.
        assert!(parse_with(svc(
            "a",
            "net = \"bridge\"\nsysctl = { \"net.core.somaxconn\" = 9 }\n"
        ))
        .is_ok());
    }

    #[test]
    fn dependencies_and_readiness() {
        let svc = |name: &str, extra: &str| {
            format!("[[service]]\nname = \"{name}\"\nimage = \"busybox\"\n{extra}")
        };
        let head =
            "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\n";
        let text = format!(
            "{head}[[onboot]]\nname = \"init\"\nimage = \"busybox\"\n{}{}[host]\nhealthy_after = \"2s\"\n",
            svc("db", "ready = { tcp = 5432 }\n"),
            svc("web", "depends_on = [\"db\"]\nready = { exec = [\"true\"] }\n"),
        );
        let r = parse(Path::new("r.toml"), &text).unwrap();
        assert_eq!(r.host.healthy_after_ms, 2000);
        assert_eq!(r.containers[1].ready, Some(Probe::Tcp(5432)));
        assert_eq!(r.containers[2].depends_on, ["db"]);
        assert_eq!(
            r.containers[2].ready,
            Some(Probe::Exec(vec!["true".into()]))
        );
        for (body, field, says) in [
            (
                svc("a", "depends_on = [\"nope\"]\n"),
                "service[0].depends_on[0]",
                "no container is named \"nope\"",
            ),
            (
                svc("a", "depends_on = [\"a\"]\n"),
                "service[0].depends_on[0]",
                "itself",
            ),
            (
                format!(
                    "{}{}{}",
                    svc("a", "depends_on = [\"b\"]\n"),
                    svc("b", "depends_on = [\"c\"]\n"),
                    svc("c", "depends_on = [\"a\"]\n")
                ),
                "service[0].depends_on[0]",
                "dependency cycle: a -> b -> c -> a",
            ),
            (
                format!(
                    "[[onboot]]\nname = \"o\"\nimage = \"busybox\"\n{}",
                    svc("a", "depends_on = [\"o\"]\n")
                ),
                "service[0].depends_on[0]",
                "not a service",
            ),
            (
                svc("a", "ready = { http = 80 }\n"),
                "service[0].ready.http",
                "unknown variant",
            ),
            (
                svc("a", "ready = { file = \"run/x\" }\n"),
                "service[0].ready",
                "absolute",
            ),
            (
                svc("a", "ready = { exec = [] }\n"),
                "service[0].ready",
                "must not be empty",
            ),
            (
                svc("a", "ready = { tcp = 0 }\n"),
                "service[0].ready",
                "port 0",
            ),
            (
                "[[onboot]]\nname = \"o\"\nimage = \"busybox\"\nready = { tcp = 1 }\n".to_string(),
                "onboot[0].ready",
                "only services",
            ),
        ] {
            let e = err(&format!("{head}{body}"));
            assert_eq!(e.loc.field, field, "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
        let e = err(&format!(
            "{head}{}[host]\nhealthy_after = \"soon\"\n",
            svc("a", "")
        ));
        assert_eq!(e.loc.field, "host.healthy_after", "{e}");
    }

    #[test]
    fn online_updates_pin_keys_and_check_their_settings() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("update.pub");
        std::fs::write(
            &key,
            "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAyTmmSnVfwd6DaR0nNytys/WygMatCOjSK9uL+Fj2oOk=\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("private.pem"),
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        // PEM armour around bytes that are no certificate.
        std::fs::write(
            dir.path().join("junk.pem"),
            "-----BEGIN CERTIFICATE-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let base = "name = \"r\"\nversion = \"1.0.0\"\n[kernel]\npath = \"/k\"\n[[service]]\nname = \"web\"\nimage = \"busybox\"\n";
        let recipe = dir.path().join("r.toml");
        let parse_with = |extra: &str| parse(&recipe, &format!("{base}{extra}"));
        let r = parse_with(
            "[update]\nsource = \"oci://registry.example/fleet/web\"\nroot_keys = [\"update.pub\", \"update.pub\"]\ncheck = \"30m\"\nwindow = \"02:00-04:00\"\n",
        )
        .unwrap();
        let o = r.update.online.unwrap();
        assert_eq!(o.source.value, "oci://registry.example/fleet/web");
        assert_eq!(o.root_keys.len(), 1);
        assert_eq!(o.root_keys[0].kind, "ed25519");
        assert_eq!((o.check_secs, o.window.unwrap().start), (1800, 120));
        let d = parse_with(
            "[update]\nsource = \"https://updates.example/web\"\nroot_keys = [\"update.pub\"]\n",
        )
        .unwrap()
        .update
        .online
        .unwrap();
        assert_eq!((d.check_secs, d.window), (DEFAULT_CHECK_SECS, None));
        let keys = "root_keys = [\"update.pub\"]\n";
        for (text, field, why) in [
            ("[update]\ncheck = \"1h\"\n".to_string(), "update.check", "needs [update] source"),
            ("[update]\nsource = \"/srv/updates\"\n".into(), "update.source", "expected oci://"),
            ("[update]\nsource = \"oci://registry.example\"\n".into(), "update.source", "HOST/REPOSITORY"),
            ("[update]\nsource = \"oci://r.example/x\"\n".into(), "update.source", "needs root_keys"),
            ("[update]\nsource = \"oci://r.example/x\"\nroot_keys = []\n".into(), "update.root_keys", "lists no key"),
            ("[update]\nsource = \"oci://r.example/x\"\nroot_keys = [\"nope.pub\"]\n".into(), "update.root_keys[0]", "nope.pub"),
            ("[update]\nsource = \"oci://r.example/x\"\nroot_keys = [\"private.pem\"]\n".into(), "update.root_keys[0]", "not a PEM public key"),
            ("[update]\nca = [\"update.pub\"]\n".into(), "update.ca", "needs [update] source"),
            (format!("[update]\nsource = \"oci://r.example/x\"\n{keys}ca = [\"nope.pem\"]\n"), "update.ca[0]", "nope.pem"),
            (format!("[update]\nsource = \"oci://r.example/x\"\n{keys}ca = [\"update.pub\"]\n"), "update.ca[0]", "holds no PEM certificate"),
            (format!("[update]\nsource = \"oci://r.example/x\"\n{keys}ca = [\"junk.pem\"]\n"), "update.ca[0]", "not one a TLS client can trust"),
            (format!("[update]\nsource = \"oci://r.example/x\"\n{keys}check = \"0s\"\n"), "update.check", "a second or more"),
            (format!("[update]\nsource = \"oci://r.example/x\"\n{keys}window = \"2-4\"\n"), "update.window", "HH:MM-HH:MM"),
            (format!("[disk]\nupdate = \"none\"\n[update]\nsource = \"oci://r.example/x\"\n{keys}"), "update.source", "update = \"ab\""),
            (format!("[[service]]\nname = \"kiln-update\"\nimage = \"busybox\"\n[update]\nsource = \"oci://r.example/x\"\n{keys}"), "service[1].name", "the update service kiln adds"),
        ] {
            let e = parse_with(&text).unwrap_err();
            assert_eq!(e.loc.field, field, "{text}: {e}");
            assert!(e.to_string().contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn sizes_binds_and_compression() {
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1X"), None);
        assert_eq!(
            parse_bind("/a:/b:ro").unwrap(),
            BindSpec {
                source: "/a".into(),
                target: "/b".into(),
                readonly: true
            }
        );
        assert!(parse_bind("a:/b").is_err());
        assert!(parse_bind("/a:/b:rx").is_err());
        assert_eq!(RootCompression::parse("zstd:3").unwrap().zstd_level, 3);
        assert_eq!(RootCompression::parse("zstd").unwrap().zstd_level, 15);
        assert!(RootCompression::parse("zstd:23").is_none());
        assert!(RootCompression::parse("xz").is_none());
    }
}
