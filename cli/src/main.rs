//! `kiln`: bake immutable appliances from a TOML recipe.

#![forbid(unsafe_code)]

mod progress;
mod run;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use kiln_assemble::ab;
use kiln_assemble::cache::Cache;
use kiln_assemble::image::{self, BuildError, BuildOptions};
use kiln_assemble::oci::RegistryOptions;
use kiln_assemble::plan::{self, LockMode, Plan, PlanError, ResolveOptions};
use kiln_assemble::recipe::{self, Format, LoadError, Recipe, RecipeError, RootCompression};
use kiln_assemble::{output, progress::Stage, progress::StageTimer};
use progress::{Mode, Reporter};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// The static kiln-init, built and embedded by build.rs.
static INIT: &[u8] = include_bytes!(env!("KILN_INIT_PATH"));
/// kiln-boot, the UEFI slot chooser of A/B disks (see cli/build.rs).
static CHOOSER: &[u8] = include_bytes!(env!("KILN_BOOT_PATH"));
/// The static kiln-update (see build.rs): images with `[update] source`
/// run it.
static UPDATER: &[u8] = include_bytes!(env!("KILN_UPDATE_PATH"));

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Bake immutable appliances: a TOML recipe to a bootable disk image",
    after_help = "Examples:\n  kiln build recipes/hello.toml -o out\n  kiln run out/hello.raw\n  kiln lock recipes/hello.toml --update\n\nExit status: 0 success, 1 environment failure (network, I/O), 2 recipe or command-line error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the recipe's images into a directory (and write its lock file).
    #[command(
        after_help = "Examples:\n  kiln build recipes/hello.toml -o out\n  kiln build app.toml --locked --offline   # CI: exactly the lock, no network"
    )]
    Build(BuildArgs),
    /// Pin every input of a recipe in its lock file without building.
    #[command(
        after_help = "Examples:\n  kiln lock app.toml                 # pin what is new or changed\n  kiln lock app.toml --update        # re-resolve everything (pick up fixes)\n  kiln lock --update app.toml web    # only the container `web`"
    )]
    Lock(LockArgs),
    /// Check a recipe without building it.
    Validate {
        /// The recipe (TOML) to check.
        recipe: PathBuf,
        #[command(flatten)]
        out: OutputMode,
    },
    /// Boot an image in QEMU with UEFI firmware; the serial console is
    /// this terminal.
    ///
    /// Exit status: 0 the guest powered off with no failed essential
    /// container; 1 kiln's own error (or QEMU's); 2 usage; 3 the guest
    /// reported failed essential containers; 4 the guest stopped without
    /// its init's final report (a panic or crash); 124 `--timeout` passed;
    /// 130/143 after SIGINT/SIGTERM, which press the guest's power button
    /// and stop QEMU if the guest is not off within 30 s.
    Run(run::RunArgs),
    /// Apply a newer build of the same recipe to an A/B disk image while
    /// it is off: the inactive slot is written, read back and armed, so
    /// the next boot tries it and falls back if it does not come up
    /// healthy.
    #[command(after_help = "Example:
  kiln update --image out-v2/app.raw vm-disk.raw
  kiln update --from /srv/updates/app --root-key update.pub vm-disk.raw")]
    Update {
        /// The newer build (a raw disk `kiln build` wrote).
        #[arg(long, required_unless_present = "from", conflicts_with = "from")]
        image: Option<PathBuf>,
        /// Or an update repository (`kiln publish-update`'s directory or
        /// `oci://HOST/NAME`): its signed newest build, taking from the
        /// running slot what it holds.
        #[arg(long, requires = "root_key")]
        from: Option<String>,
        /// A public key the repository's root must be signed with (PEM;
        /// repeat for several).
        #[arg(long = "root-key")]
        root_key: Vec<PathBuf>,
        /// The raw disk to update.
        disk: PathBuf,
        #[command(flatten)]
        out: OutputMode,
    },
    /// Publish a build as a signed update: its slot is chunked by content
    /// into a TUF repository (a directory to serve over HTTP(S)) that
    /// hosts whose recipe pins the key (`[update] root_keys`) check.
    /// Only chunks the repository lacks are added.
    #[command(after_help = "Example:
  openssl genpkey -algorithm ed25519 -out update.pem
  openssl pkey -in update.pem -pubout -out update.pub   # root_keys = [\"update.pub\"]
  kiln publish-update --key update.pem --to /srv/updates/app out/app.raw

The timestamp it signs expires in 7 days: publish a newer build before then,
or `--refresh`, or hosts refuse the repository as stale.")]
    PublishUpdate {
        /// The private key that signs (PEM: Ed25519, ECDSA P-256 or RSA).
        #[arg(long)]
        key: PathBuf,
        /// The repository: a directory (created if new; serve it over
        /// HTTP(S)) or a registry repository, `oci://HOST/NAME`
        /// (`oci+http://` for one without TLS; loopback speaks plain HTTP).
        #[arg(long)]
        to: String,
        /// The build to publish (a raw disk `kiln build` wrote).
        #[arg(required_unless_present = "refresh")]
        image: Option<PathBuf>,
        /// Sign the repository again as it is, with new expiry dates (the
        /// timestamp's 7 days start again): no new build.
        #[arg(long, conflicts_with = "image")]
        refresh: bool,
        /// How long hosts accept the signed timestamp, such as "7d" (the
        /// default) or "12h": past it they refuse the repository until it
        /// is published to or refreshed again (the defence against a
        /// mirror that freezes it).
        #[arg(long, value_parser = parse_lifetime)]
        expires: Option<std::time::Duration>,
        #[command(flatten)]
        out: OutputMode,
    },
    /// Make an A/B disk image boot its other slot next (while it is off).
    Rollback {
        /// The raw disk.
        disk: PathBuf,
        #[command(flatten)]
        out: OutputMode,
    },
    /// Show an A/B disk image's slots: what each holds, its boot state,
    /// and which boots next.
    Slots {
        /// The raw disk.
        disk: PathBuf,
    },
    /// Copies stdin to a TCP connection to ADDR:PORT and the connection to
    /// stdout: what `kiln run --forward` has QEMU start per guest
    /// connection.
    #[command(hide = true)]
    Relay {
        /// Where to connect.
        to: std::net::SocketAddr,
    },
}

#[derive(Args, Default)]
struct OutputMode {
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
    /// Newline-delimited JSON events on stdout (see docs/progress.md).
    #[arg(long, conflicts_with = "quiet")]
    json: bool,
}

#[derive(Args)]
struct InputArgs {
    /// The recipe (TOML) to build.
    recipe: PathBuf,
    /// Lock file (default: the recipe's path with `.lock`).
    #[arg(long)]
    lock: Option<PathBuf>,
    /// Content-addressed cache (default: $XDG_CACHE_HOME/kiln).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// OpenPGP keyring that signs the Debian archive.
    #[arg(long, default_value = kiln_assemble::debian::DEFAULT_KEYRING)]
    keyring: PathBuf,
    /// Use no network: every input must be in the cache (without a lock,
    /// the Debian index verified last is reused).
    #[arg(long)]
    offline: bool,
    /// Speak plain HTTP to this registry (HOST[:PORT]); repeatable. Also
    /// `insecure_registries` in $XDG_CONFIG_HOME/kiln/config.toml.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    insecure_registry: Vec<String>,
}

#[derive(Args)]
struct BuildArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Output directory; images are written as DIR/NAME.FORMAT.
    #[arg(long, short, default_value = "out")]
    output: PathBuf,
    /// Fail instead of resolving anything the lock does not pin.
    #[arg(long)]
    locked: bool,
    /// Root filesystem compression, e.g. `zstd:3` (overrides the recipe).
    #[arg(long, value_name = "zstd[:LEVEL]", value_parser = parse_compression)]
    root_compression: Option<RootCompression>,
    /// Output formats, comma-separated (replaces the recipe's list): raw,
    /// qcow2, vhd, vhd-dynamic, vmdk, gce.
    #[arg(long = "format", value_name = "FORMAT,...", value_delimiter = ',', value_parser = parse_format)]
    formats: Vec<Format>,
    #[command(flatten)]
    out: OutputMode,
}

#[derive(Args)]
struct LockArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Re-resolve inputs the lock already pins: the NAMEs given, or all.
    #[arg(long)]
    update: bool,
    /// With --update, only these inputs: container names, `kernel`, `stub`.
    #[arg(value_name = "NAME", requires = "update")]
    names: Vec<String>,
    #[command(flatten)]
    out: OutputMode,
}

fn parse_format(s: &str) -> Result<Format, String> {
    Format::parse(s).ok_or_else(|| {
        let names: Vec<&str> = Format::ALL.iter().map(|(n, _)| *n).collect();
        format!("expected one of {}", names.join(", "))
    })
}

fn parse_compression(s: &str) -> Result<RootCompression, String> {
    RootCompression::parse(s).ok_or_else(|| "expected zstd or zstd:LEVEL (1-22)".to_string())
}

/// kiln's hidden argument that makes it the maintainer-script sandbox's
/// helper (see the kiln-sandbox crate).
const SANDBOX_HELPER: &str = "__sandbox";

fn main() -> ExitCode {
    // First, while the process has one thread: the helper forks.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == SANDBOX_HELPER)
    {
        kiln_sandbox::helper_main()
    }
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: error: {e:#}");
            ExitCode::from(exit_status(&e))
        }
    }
}

/// 2 when the recipe or command line is at fault, 1 for the environment.
fn exit_status(e: &anyhow::Error) -> u8 {
    let recipe_fault = e.chain().any(|c| {
        c.downcast_ref::<RecipeError>().is_some()
            || matches!(c.downcast_ref::<LoadError>(), Some(LoadError::Invalid(_)))
            || c.downcast_ref::<PlanError>()
                .is_some_and(PlanError::is_recipe_error)
            || c.downcast_ref::<BuildError>()
                .is_some_and(BuildError::is_recipe_error)
            || matches!(
                c.downcast_ref::<output::OutputError>(),
                Some(output::OutputError::NotADirectory(_))
            )
    });
    if recipe_fault {
        2
    } else {
        1
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `insecure_registries` from `$XDG_CONFIG_HOME/kiln/config.toml`.
fn config_insecure_registries() -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Config {
        #[serde(default)]
        insecure_registries: Vec<String>,
    }
    let dir = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(h) => PathBuf::from(h).join(".config"),
            None => return Ok(Vec::new()),
        },
    };
    let path = dir.join("kiln").join("config.toml");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let c: Config = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    Ok(c.insecure_registries)
}

struct Prepared {
    recipe: Recipe,
    lock_path: PathBuf,
    lock: Option<Plan>,
    cache: Cache,
    registry: RegistryOptions,
}

impl Prepared {
    /// The resolve stage, timed and reported.
    async fn resolve(
        &self,
        keyring: &Path,
        mode: LockMode,
        progress: &dyn kiln_assemble::progress::Progress,
    ) -> Result<plan::Resolved, PlanError> {
        let t = StageTimer::start(progress, Stage::Resolve);
        let r = plan::resolve(
            &self.recipe,
            &ResolveOptions {
                cache: &self.cache,
                keyring,
                registry: &self.registry,
                lock: self.lock.as_ref(),
                mode,
                progress,
            },
        )
        .await;
        t.end();
        r
    }
}

fn prepare(input: &InputArgs) -> Result<Prepared> {
    let recipe = recipe::load(&input.recipe)?;
    let lock_path = input
        .lock
        .clone()
        .unwrap_or_else(|| plan::default_lock_path(&input.recipe));
    let lock = plan::read_lock(&lock_path)?;
    let cache = Cache::open(input.cache.clone().unwrap_or_else(Cache::default_dir))
        .context("opening the cache")?;
    let mut insecure = config_insecure_registries()?;
    insecure.extend(input.insecure_registry.iter().cloned());
    Ok(Prepared {
        recipe,
        lock_path,
        lock,
        cache,
        registry: RegistryOptions {
            insecure,
            offline: input.offline,
        },
    })
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Validate { recipe: path, out } => {
            let r = recipe::load(&path)?;
            let msg = format!(
                "{}: ok ({} onboot, {} services)",
                path.display(),
                r.onboot().count(),
                r.services().count()
            );
            if out.json {
                println!(
                    "{}",
                    serde_json::json!({"event": "valid", "recipe": path, "onboot": r.onboot().count(), "services": r.services().count()})
                );
            } else if !out.quiet {
                println!("{msg}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Build(args) => build(args),
        Command::Lock(args) => lock(args),
        Command::Run(args) => run::run(&args),
        Command::Relay { to } => run::relay(to),
        Command::Update {
            image: Some(image),
            disk,
            out,
            ..
        } => {
            let applied = ab::update(&disk, &image)?;
            report_slots(
                &disk,
                &out,
                &format!(
                    "{}: slot {} now holds {} (was running {}), armed for {} boot(s)",
                    disk.display(),
                    applied.slot.letter(),
                    applied.version,
                    applied.previous,
                    applied.tries
                ),
            )
        }
        Command::Update {
            from,
            root_key,
            disk,
            out,
            ..
        } => {
            let from = from.context("--image or --from")?;
            let what = update_from(&from, &root_key, &disk)
                .with_context(|| format!("updating {} from {from}", disk.display()))?;
            report_slots(&disk, &out, &what)
        }
        Command::PublishUpdate {
            key,
            to,
            image: None,
            expires,
            out,
            ..
        } => {
            let signing = kiln_update::keys::SigningKey::load(&key)?;
            let p = kiln_update::repo::refresh(
                &store(&to)?,
                &signing,
                std::time::SystemTime::now(),
                lifetimes(expires),
            )
            .with_context(|| format!("refreshing {to}"))?;
            if out.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "event": "refreshed", "repository": to, "version": p.version,
                        "metadata_version": p.metadata_version, "expires": p.expires,
                    })
                );
            } else if !out.quiet {
                println!(
                    "refreshed {to}: it still publishes {}; metadata version {}, valid until {}",
                    p.version, p.metadata_version, p.expires
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::PublishUpdate {
            key,
            to,
            image: Some(image),
            expires,
            out,
            ..
        } => {
            let signing = kiln_update::keys::SigningKey::load(&key)?;
            let (header, content) = ab::slot_content(&image)?;
            let p = kiln_update::repo::publish(
                &store(&to)?,
                &signing,
                &header,
                content,
                std::time::SystemTime::now(),
                lifetimes(expires),
            )
            .with_context(|| format!("publishing {} to {to}", image.display()))?;
            let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
            if out.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "event": "published", "repository": to, "name": header.name,
                        "version": p.version, "previous": p.previous,
                        "metadata_version": p.metadata_version, "expires": p.expires,
                        "chunks": p.chunks, "new_chunks": p.new_chunks,
                        "bytes": p.bytes, "new_bytes": p.new_bytes,
                    })
                );
            } else if !out.quiet {
                println!(
                    "published {} {}{} to {}: {} of {} chunks new ({:.1} of {:.1} MiB); metadata version {}, valid until {}",
                    header.name,
                    p.version,
                    p.previous.map(|v| format!(" (was {v})")).unwrap_or_default(),
                    to,
                    p.new_chunks,
                    p.chunks,
                    mib(p.new_bytes),
                    mib(p.bytes),
                    p.metadata_version,
                    p.expires
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rollback { disk, out } => {
            let slot = ab::rollback(&disk)?;
            report_slots(
                &disk,
                &out,
                &format!("{}: slot {} boots next", disk.display(), slot.letter()),
            )
        }
        Command::Slots { disk } => report_slots(&disk, &OutputMode::default(), ""),
    }
}

/// `--expires`: a duration of a second or more.
fn parse_lifetime(s: &str) -> Result<std::time::Duration, String> {
    kiln_assemble::recipe::parse_duration(s)
        .filter(|&ms| ms >= 1000)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| {
            format!("expected a duration of a second or more, such as \"7d\" or \"12h\", not {s:?}")
        })
}

/// The default lifetimes, the timestamp's as `--expires` gives it.
fn lifetimes(expires: Option<std::time::Duration>) -> kiln_update::repo::Lifetimes {
    let mut life = kiln_update::repo::Lifetimes::default();
    if let Some(t) = expires {
        life.timestamp = t;
    }
    life
}

/// An update repository named on the command line: `oci://HOST/NAME`,
/// `oci+http://HOST/NAME`, or a directory.
fn store(at: &str) -> Result<kiln_update::repo::Store> {
    use kiln_update::repo::Store;
    let oci = |name: &str, plain: bool| -> Result<Store> {
        let host = name.split('/').next().unwrap_or_default();
        let plain = plain || kiln_assemble::oci::is_loopback(host);
        let auth = kiln_assemble::oci::docker_auth(host);
        Ok(Store::Oci(kiln_update::oci::OciRepo::new(
            name, plain, auth,
        )?))
    };
    if let Some(name) = at.strip_prefix("oci://") {
        oci(name, false)
    } else if let Some(name) = at.strip_prefix("oci+http://") {
        oci(name, true)
    } else if at.starts_with("http://") || at.starts_with("https://") {
        anyhow::bail!("{at}: kiln reads a repository served over HTTP(S) from its directory or a registry here (oci://HOST/NAME)")
    } else {
        Ok(Store::Dir(PathBuf::from(at)))
    }
}

/// Checks the repository at `from` against `root_keys` and applies its
/// newest build to `disk`'s inactive slot: what it did, in a line.
fn update_from(from: &str, root_keys: &[PathBuf], disk: &Path) -> Result<String> {
    use kiln_update::repo::{self, Checked};
    let pinned = root_keys
        .iter()
        .map(|p| kiln_update::keys::PublicKey::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    let source = if from.starts_with("https://") || from.starts_with("http://") {
        repo::Source::parse(from)?
    } else {
        store(from)?.source()?
    };
    let running = ab::Disk::open(disk, false)?
        .active()?
        .header
        .clone()
        .context("the disk's active slot holds no build")?;
    // No state kept between runs: signatures, expiry and versions are
    // checked against this disk's build only.
    let datastore = tempfile::tempdir().context("a temporary datastore")?;
    let (manifest, header) =
        match repo::check(&source, &pinned, datastore.path(), &(&running).into())? {
            Checked::Newer(m, h) => (m, h),
            Checked::UpToDate => {
                return Ok(format!(
                    "{}: already runs {} {}, the version published",
                    disk.display(),
                    running.name,
                    running.version
                ))
            }
            Checked::Older(v) => anyhow::bail!(
                "the repository publishes {v}, older than the {} this disk runs",
                running.version
            ),
        };
    let path = disk.display().to_string();
    let chunks = repo::Chunks::new(&source)?;
    let a = kiln_update::apply::apply(&path, None, &manifest, &header, &mut |c| {
        chunks.fetch(&c.sha256)
    })?;
    Ok(format!(
        "{}: slot {} now holds {} (was running {}), armed for {} boot(s); fetched {} KiB, {} KiB taken from the running slot",
        disk.display(),
        a.slot,
        a.version,
        a.previous,
        a.tries,
        a.fetched >> 10,
        a.reused >> 10
    ))
}

/// Prints `what` and the disk's slots as `out` asks.
fn report_slots(disk: &std::path::Path, out: &OutputMode, what: &str) -> Result<ExitCode> {
    let d = ab::Disk::open(disk, false)?;
    if out.json {
        let next = d.active().ok().map(|s| s.slot.letter().to_string());
        let slots: Vec<serde_json::Value> = d
            .slots
            .iter()
            .map(|s| {
                serde_json::json!({
                    "slot": s.slot.letter().to_string(),
                    "name": s.header.as_ref().map(|h| h.name.clone()),
                    "version": s.header.as_ref().map(|h| h.version.clone()),
                    "priority": s.state.priority,
                    "tries": s.state.tries,
                    "successful": s.state.successful,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"event": "slots", "disk": disk, "next": next, "slots": slots})
        );
    } else if !out.quiet {
        if !what.is_empty() {
            println!("{what}");
        }
        for line in ab::describe(&d) {
            println!("  {line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn mode(out: &OutputMode) -> Mode {
    Mode::choose(out.quiet, out.json)
}

/// Runs `fut`, removing this process's temp outputs and exiting 130/143
/// if SIGINT or SIGTERM arrives first.
fn run_interruptible<T>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = T>,
) -> T {
    use tokio::signal::unix::{signal, SignalKind};
    // Watched on a worker thread: unpacking and encoding are synchronous
    // and hold the thread polling `fut` for seconds at a time.
    let _runtime = rt.enter();
    if let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        rt.spawn(async move {
            let (code, word) = tokio::select! {
                _ = int.recv() => (130, "interrupted"),
                _ = term.recv() => (143, "terminated"),
            };
            output::remove_all_temps();
            eprintln!("kiln: {word}");
            std::process::exit(code)
        });
    }
    rt.block_on(fut)
}

fn build(args: BuildArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let mut p = prepare(&args.input)?;
    if let Some(c) = args.root_compression {
        p.recipe.output.root_compression.value = c;
    }
    if !args.formats.is_empty() {
        p.recipe.set_formats(args.formats)?;
    }
    output::prepare_dir(&args.output)?;
    let reporter = Reporter::new(mode(&args.out));
    let rt = runtime()?;
    let lock_mode = if args.locked {
        LockMode::Locked
    } else {
        LockMode::Reuse
    };
    let result = run_interruptible(&rt, async {
        let resolved = p
            .resolve(&args.input.keyring, lock_mode, reporter.as_ref())
            .await?;
        let opts = BuildOptions {
            cache: p.cache.clone(),
            registry: p.registry.clone(),
            init: Arc::new(INIT.to_vec()),
            updater: UPDATER,
            chooser: CHOOSER,
            progress: reporter.clone(),
            sandbox: std::env::current_exe()
                .ok()
                .map(|program| kiln_sandbox::Sandbox {
                    program,
                    args: vec![SANDBOX_HELPER.into()],
                    ids: kiln_sandbox::IdMap::for_current_user(),
                }),
        };
        let built = image::build(&p.recipe, &resolved.plan, &args.output, &opts).await?;
        if p.lock.as_ref() != Some(&resolved.plan) {
            write_lock(&p.lock_path, &resolved.plan)?;
        }
        anyhow::Ok((built, resolved))
    });
    reporter.finish();
    let (built, _) = result?;
    if mode(&args.out) == Mode::Json {
        return Ok(ExitCode::SUCCESS);
    }
    if !args.out.quiet {
        for img in &built.images {
            let len = std::fs::metadata(img).map(|m| m.len()).unwrap_or(0);
            println!(
                "{} ({} MiB disk; root {:.1} MiB, ESP {} MiB; kernel {}) in {:.1}s",
                img.display(),
                len >> 20,
                built.root_size as f64 / (1 << 20) as f64,
                built.esp_size >> 20,
                built.kernel_release,
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_lock(path: &Path, plan: &Plan) -> Result<()> {
    output::write_file(path, plan::lock_text(plan).as_bytes())
        .with_context(|| format!("writing lock file {}", path.display()))
}

fn lock(args: LockArgs) -> Result<ExitCode> {
    let p = prepare(&args.input)?;
    let reporter = Reporter::new(mode(&args.out));
    let rt = runtime()?;
    let lock_mode = if args.update {
        LockMode::Update(args.names.clone())
    } else {
        LockMode::Reuse
    };
    let resolved = run_interruptible(&rt, async {
        p.resolve(&args.input.keyring, lock_mode, reporter.as_ref())
            .await
    });
    reporter.finish();
    let resolved = resolved?;
    if p.lock.as_ref() != Some(&resolved.plan) {
        write_lock(&p.lock_path, &resolved.plan)?;
    }
    if args.out.json {
        for c in &resolved.changes {
            println!(
                "{}",
                serde_json::json!({"event": "lock-change", "input": c.input, "change": c.what})
            );
        }
    } else if !args.out.quiet {
        if resolved.changes.is_empty() {
            println!("{}: up to date", p.lock_path.display());
        } else {
            println!(
                "{}: {} change(s)",
                p.lock_path.display(),
                resolved.changes.len()
            );
            for c in &resolved.changes {
                println!("  {c}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded init must be a static ELF executable: no PT_INTERP.
    #[test]
    fn embedded_init_is_static_elf() {
        assert_eq!(&INIT[..4], b"\x7fELF");
        assert_eq!(kiln_assemble::host::elf_interpreter(INIT), None);
        assert_eq!(INIT[4], 2, "64-bit");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn quiet_is_offered_only_where_it_does_something() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let run = cmd.find_subcommand("run").unwrap();
        assert!(run.get_arguments().all(|a| a.get_id() != "quiet"));
        let build = cmd.find_subcommand("build").unwrap();
        assert!(build.get_arguments().any(|a| a.get_id() == "quiet"));
        // Every positional argument is described in --help.
        for sub in cmd.get_subcommands() {
            for a in sub.get_positionals() {
                assert!(a.get_help().is_some(), "{} {}", sub.get_name(), a.get_id());
            }
        }
    }
}
