//! The update repository: TUF metadata (tough) whose only target is the
//! manifest, and the chunks the manifest pins by sha256.
//!
//! Layout under the repository's base (a directory served over HTTP(S)):
//! `metadata/` (`N.root.json`, `N.targets.json`, `N.snapshot.json`,
//! `timestamp.json`: TUF with consistent snapshots), `targets/`
//! (`SHA256.kiln-update.json`) and `chunks/SHA256`. One signing key holds
//! all four roles: the publisher's key, which hosts pin as
//! `[update] root_keys`.
//!
//! Signed metadata expires (the timestamp soonest), so a mirror cannot
//! serve an old repository forever (a freeze); versions only grow, so it
//! cannot serve an older one (a rollback, refused against the versions a
//! host saw last, kept in its datastore).

use std::collections::HashMap;
use std::io::Read;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use kiln_boot::SlotHeader;
use sha2::{Digest, Sha256};
use tough::editor::signed::{PathExists, SignedRole};
use tough::editor::RepositoryEditor;
use tough::key_source::KeySource;
use tough::schema::{KeyHolder, RoleKeys, RoleType, Root, Signed, Target};
use tough::{ExpirationEnforcement, IntoVec, RepositoryLoader, TargetName, Transport};
use url::Url;

use crate::keys::{PublicKey, SigningKey};
use crate::manifest::{Manifest, TARGET};
use crate::UpdateError;

/// How long what `publish` signs stays valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// root.json: the keys (rotating them is a new root, signed by the old).
    pub root: Duration,
    /// targets.json and snapshot.json: the release.
    pub release: Duration,
    /// timestamp.json: how stale a host accepts the repository; publish
    /// again (`--refresh`) before it passes.
    pub timestamp: Duration,
}

impl Default for Lifetimes {
    fn default() -> Lifetimes {
        const DAY: u64 = 24 * 3600;
        Lifetimes {
            root: Duration::from_secs(10 * 365 * DAY),
            release: Duration::from_secs(90 * DAY),
            timestamp: Duration::from_secs(7 * DAY),
        }
    }
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The version published, and the one it replaced.
    pub version: String,
    /// See `version`.
    pub previous: Option<String>,
    /// The metadata's new version (all roles but root move together).
    pub metadata_version: u64,
    /// When the timestamp expires: hosts refuse the repository after.
    pub expires: String,
    /// The manifest's chunks, and how many the repository lacked.
    pub chunks: usize,
    /// See `chunks`.
    pub new_chunks: usize,
    /// Bytes of the slot, and of the chunks the repository lacked.
    pub bytes: u64,
    /// See `bytes`.
    pub new_bytes: u64,
}

fn runtime() -> Result<tokio::runtime::Runtime, UpdateError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(UpdateError::Read)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> UpdateError + '_ {
    move |source| UpdateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn tuf(what: impl Into<String>) -> impl FnOnce(tough::error::Error) -> UpdateError {
    let what = what.into();
    move |source| UpdateError::Tuf {
        what,
        source: Box::new(source),
    }
}

/// The `file://` URL of a directory (with its trailing slash).
pub fn dir_url(dir: &Path) -> Result<Url, UpdateError> {
    let abs = std::path::absolute(dir).map_err(io(dir))?;
    Url::from_directory_path(&abs).map_err(|()| UpdateError::Io {
        path: abs,
        source: std::io::Error::other("not an absolute path"),
    })
}

fn at(t: Timestamp, d: Duration) -> Result<Timestamp, UpdateError> {
    jiff::SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .ok_or_else(|| UpdateError::BadManifest(format!("expiry {d:?} after {t} overflows")))
}

/// Where a publisher writes a repository.
#[derive(Debug, Clone)]
pub enum Store {
    /// A directory, to serve over HTTP(S).
    Dir(PathBuf),
    /// A registry repository.
    Oci(crate::oci::OciRepo),
}

impl Store {
    /// How hosts (and the publisher, reading what is there) fetch it.
    pub fn source(&self) -> Result<Source, UpdateError> {
        match self {
            Store::Dir(d) => Source::dir(d),
            Store::Oci(o) => Ok(Source {
                base: Url::parse(&format!("{o:?}/"))
                    .map_err(|e| UpdateError::BadSource(format!("{o:?}: {e}")))?,
                transport: Box::new(o.clone()),
            }),
        }
    }

    async fn has_chunk(&self, sha256: &str) -> Result<bool, UpdateError> {
        match self {
            Store::Dir(d) => Ok(d.join("chunks").join(sha256).exists()),
            Store::Oci(o) => o.has_chunk(sha256).await,
        }
    }

    async fn put_chunk(&self, sha256: &str, data: &[u8]) -> Result<(), UpdateError> {
        match self {
            Store::Dir(d) => {
                let dir = d.join("chunks");
                std::fs::create_dir_all(&dir).map_err(io(&dir))?;
                write_new(&dir.join(sha256), data)
            }
            Store::Oci(o) => o.put_chunk(sha256, data).await,
        }
    }

    /// Writes `kind/name` (`metadata` or `targets`); a target's artifact
    /// also lists the chunks it pins.
    async fn put_file(
        &self,
        kind: &str,
        name: &str,
        data: &[u8],
        chunks: &[crate::manifest::Chunk],
    ) -> Result<(), UpdateError> {
        match self {
            Store::Dir(d) => {
                let dir = d.join(kind);
                std::fs::create_dir_all(&dir).map_err(io(&dir))?;
                write_new(&dir.join(name), data)
            }
            Store::Oci(o) => o.put_file(name, data, chunks).await,
        }
    }

    /// Where staged files are made before they are written.
    fn staging(&self) -> Result<tempfile::TempDir, UpdateError> {
        let (dir, b) = match self {
            Store::Dir(d) => (d.clone(), tempfile::Builder::new()),
            Store::Oci(_) => (std::env::temp_dir(), tempfile::Builder::new()),
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut b = b;
        b.prefix(".kiln-staging-")
            .tempdir_in(&dir)
            .map_err(io(&dir))
    }
}

/// Publishes a slot (its header and the bytes it describes) to `store`,
/// creating the repository if it is empty. Refuses another recipe, a
/// version not newer than the one published, and a repository whose keys
/// do not include `key`; then uploads the chunks the repository lacks,
/// the manifest, and the metadata, timestamp last.
pub fn publish(
    store: &Store,
    key: &SigningKey,
    header: &SlotHeader,
    mut content: impl Read,
    now: std::time::SystemTime,
    life: Lifetimes,
) -> Result<Published, UpdateError> {
    release(store, key, Some((header, &mut content)), now, life)
}

/// Signs the repository's metadata again as it is, with new expiry
/// dates: what a publisher runs before the timestamp expires when there is
/// no newer build to publish.
pub fn refresh(
    store: &Store,
    key: &SigningKey,
    now: std::time::SystemTime,
    life: Lifetimes,
) -> Result<Published, UpdateError> {
    release(store, key, None, now, life)
}

/// The repository's next version: with a new slot (publish), or the
/// same target signed again (refresh).
fn release(
    store: &Store,
    key: &SigningKey,
    slot: Option<(&SlotHeader, &mut dyn Read)>,
    now: std::time::SystemTime,
    life: Lifetimes,
) -> Result<Published, UpdateError> {
    let now = Timestamp::try_from(now)
        .map_err(|e| UpdateError::BadManifest(format!("the clock: {e}")))?;
    let rt = runtime()?;
    let staging = store.staging()?;
    let header = slot.as_ref().map(|(h, _)| *h);
    let (editor, version, previous) = rt.block_on(open_for_publish(
        store,
        key,
        header,
        now,
        life,
        staging.path(),
    ))?;
    let (mut new_chunks, mut new_bytes) = (0, 0);
    let manifest = match slot {
        Some((header, content)) => Some(Manifest::build(header, content, |c, data| {
            rt.block_on(async {
                if !store.has_chunk(&c.sha256).await? {
                    store.put_chunk(&c.sha256, data).await?;
                    new_chunks += 1;
                    new_bytes += data.len() as u64;
                }
                Ok(())
            })
        })?),
        None => None,
    };
    rt.block_on(sign_and_write(
        store,
        key,
        editor,
        version,
        manifest.as_ref(),
        now,
        life,
        staging.path(),
    ))?;
    Ok(Published {
        version: manifest.as_ref().map_or_else(
            || previous.clone().unwrap_or_default(),
            |m| m.version.clone(),
        ),
        previous,
        metadata_version: version,
        expires: at(now, life.timestamp)?
            .strftime("%Y-%m-%d %H:%M UTC")
            .to_string(),
        chunks: manifest.as_ref().map_or(0, |m| m.chunks.len()),
        new_chunks,
        bytes: manifest
            .as_ref()
            .map_or(0, |m| m.chunks.iter().map(|c| u64::from(c.len)).sum()),
        new_bytes,
    })
}

/// The editor for the repository's next version: the existing one's
/// (after the checks) or a new root's.
async fn open_for_publish(
    store: &Store,
    key: &SigningKey,
    header: Option<&SlotHeader>,
    now: Timestamp,
    life: Lifetimes,
    staging: &Path,
) -> Result<(RepositoryEditor, u64, Option<String>), UpdateError> {
    let source = store.source()?;
    let keys: Vec<Box<dyn KeySource>> = vec![Box::new(key.clone())];
    let Some(first) = source
        .fetch_opt(source.join("metadata/1.root.json")?)
        .await?
    else {
        if header.is_none() {
            return Err(UpdateError::BadSource(format!(
                "{}: no repository to refresh",
                source.base
            )));
        }
        let root_path = staging.join("1.root.json");
        new_root(key, now, life.root, &keys, staging).await?;
        let editor = RepositoryEditor::new(&root_path)
            .await
            .map_err(tuf("the new root.json"))?;
        return Ok((editor, 1, None));
    };
    let repo = load(
        &first,
        source.join("metadata/")?,
        source.join("targets/")?,
        source.transport.clone(),
        None,
        ExpirationEnforcement::Unsafe,
    )
    .await?;
    let root = &repo.root().signed;
    if !root_keys(root).contains(key.public()) {
        return Err(UpdateError::OtherKeys {
            repo: source.base.to_string(),
            key: key.public().to_string(),
            theirs: root_keys(root).iter().map(ToString::to_string).collect(),
        });
    }
    let (_, current, old) = read_manifest(&repo).await?;
    // A refresh re-signs what is published; a publish must follow it.
    if let Some(header) = header {
        if current.name != header.name {
            return Err(UpdateError::OtherRecipe {
                new: header.name.clone(),
                published: current.name,
            });
        }
        if kiln_boot::version::compare(&header.version, &current.version)
            != Some(std::cmp::Ordering::Greater)
        {
            return Err(UpdateError::NotNewer {
                new: header.version.clone(),
                published: current.version,
            });
        }
    }
    let version = repo.targets().signed.version.get().max(old) + 1;
    let root_path = staging.join("root.json");
    write_root(&repo, &root_path)?;
    let editor = RepositoryEditor::from_repo(&root_path, repo)
        .await
        .map_err(tuf("reading the repository for editing"))?;
    Ok((editor, version, Some(current.version)))
}

/// Writes the manifest to `dir` and makes it the only target.
async fn add_manifest(
    editor: &mut RepositoryEditor,
    manifest: &Manifest,
    dir: &Path,
) -> Result<(), UpdateError> {
    let manifest_path = dir.join(TARGET);
    let json = serde_json::to_vec_pretty(manifest).map_err(|source| UpdateError::Json {
        what: TARGET.into(),
        source,
    })?;
    std::fs::write(&manifest_path, json).map_err(io(&manifest_path))?;
    let target = Target::from_path(&manifest_path)
        .await
        .map_err(|e| UpdateError::Schema {
            what: "hashing the manifest".into(),
            source: Box::new(e),
        })?;
    editor.clear_targets().map_err(tuf("targets"))?;
    editor.add_target(TARGET, target).map_err(tuf("targets"))?;
    Ok(())
}

/// The root the repository trusts now, for its editor.
fn write_root(repo: &tough::Repository, path: &Path) -> Result<(), UpdateError> {
    let bytes = serde_json::to_vec(repo.root()).map_err(|source| UpdateError::Json {
        what: "root.json".into(),
        source,
    })?;
    std::fs::write(path, bytes).map_err(io(path))
}

/// Signs the manifest as the only target and writes manifest and
/// metadata to the store. Readers follow timestamp → snapshot → targets →
/// manifest → chunks: everything it leads to is in place before the
/// timestamp is.
#[allow(clippy::too_many_arguments)]
async fn sign_and_write(
    store: &Store,
    key: &SigningKey,
    mut editor: RepositoryEditor,
    version: u64,
    manifest: Option<&Manifest>,
    now: Timestamp,
    life: Lifetimes,
    staging: &Path,
) -> Result<(), UpdateError> {
    let keys: Vec<Box<dyn KeySource>> = vec![Box::new(key.clone())];
    let staged_targets = staging.join("targets");
    std::fs::create_dir_all(&staged_targets).map_err(io(&staged_targets))?;
    // A refresh re-signs the targets as they are.
    if let Some(manifest) = manifest {
        add_manifest(&mut editor, manifest, &staged_targets).await?;
    }
    let v = NonZeroU64::new(version).unwrap_or(NonZeroU64::MIN);
    editor
        .targets_version(v)
        .map_err(tuf("targets"))?
        .targets_expires(at(now, life.release)?)
        .map_err(tuf("targets"))?
        .snapshot_version(v)
        .snapshot_expires(at(now, life.release)?)
        .timestamp_version(v)
        .timestamp_expires(at(now, life.timestamp)?);
    let signed = editor.sign(&keys).await.map_err(tuf("signing"))?;
    let staged_meta = staging.join("metadata");
    signed
        .write(&staged_meta)
        .await
        .map_err(tuf("writing metadata"))?;
    let named = staging.join("named");
    std::fs::create_dir_all(&named).map_err(io(&named))?;
    if manifest.is_some() {
        signed
            .copy_targets(&staged_targets, &named, PathExists::Replace)
            .await
            .map_err(tuf("naming the manifest"))?;
    }
    for (kind, dir) in [("targets", &named), ("metadata", &staged_meta)] {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort_by_key(|n| n == "timestamp.json");
        for name in names {
            let path = dir.join(&name);
            let data = std::fs::read(&path).map_err(io(&path))?;
            let chunks = match (kind, manifest) {
                ("targets", Some(m)) => &m.chunks[..],
                _ => &[],
            };
            store.put_file(kind, &name, &data, chunks).await?;
        }
    }
    Ok(())
}

/// Root v1: `key` holds every role, threshold 1.
async fn new_root(
    key: &SigningKey,
    now: Timestamp,
    life: Duration,
    keys: &[Box<dyn KeySource>],
    out: &Path,
) -> Result<(), UpdateError> {
    let tuf_key = key.tuf_key()?;
    let id = tuf_key.key_id().map_err(|e| UpdateError::Schema {
        what: "the key's id".into(),
        source: Box::new(e),
    })?;
    let role = || RoleKeys {
        keyids: vec![id.clone()],
        threshold: NonZeroU64::MIN,
        _extra: HashMap::new(),
    };
    let root = Root {
        spec_version: "1.0.0".into(),
        consistent_snapshot: true,
        version: NonZeroU64::MIN,
        expires: at(now, life)?,
        keys: HashMap::from([(id.clone(), tuf_key)]),
        roles: [
            RoleType::Root,
            RoleType::Snapshot,
            RoleType::Targets,
            RoleType::Timestamp,
        ]
        .into_iter()
        .map(|r| (r, role()))
        .collect(),
        _extra: HashMap::new(),
    };
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let signed = SignedRole::new(root.clone(), &KeyHolder::Root(root), keys, &rng)
        .await
        .map_err(tuf("signing root.json"))?;
    signed
        .write(out, true)
        .await
        .map_err(tuf("writing root.json"))
}

/// The keys root.json trusts to sign root.json.
fn root_keys(root: &Root) -> Vec<PublicKey> {
    let Some(role) = root.roles.get(&RoleType::Root) else {
        return Vec::new();
    };
    role.keyids
        .iter()
        .filter_map(|id| root.keys.get(id))
        .filter_map(PublicKey::of)
        .collect()
}

/// Loads and verifies the repository from `root` (a root.json the caller
/// trusts), checking expiry unless `expiry` says not to (the publisher
/// may be refreshing expired metadata).
async fn load(
    root: &[u8],
    metadata: Url,
    targets: Url,
    transport: Box<dyn Transport>,
    datastore: Option<&Path>,
    expiry: ExpirationEnforcement,
) -> Result<tough::Repository, UpdateError> {
    let mut loader = RepositoryLoader::new(&root, metadata.clone(), targets)
        .transport(Shared(transport))
        .expiration_enforcement(expiry);
    if let Some(d) = datastore {
        loader = loader.datastore(d);
    }
    loader
        .load()
        .await
        .map_err(tuf(format!("the update repository at {metadata}")))
}

/// A boxed transport, as tough's loader takes a sized one.
#[derive(Debug, Clone)]
struct Shared(Box<dyn Transport>);

#[tough::async_trait]
impl Transport for Shared {
    async fn fetch(&self, url: Url) -> Result<tough::TransportStream, tough::TransportError> {
        self.0.fetch(url).await
    }
}

/// The repository's manifest (checked against its signed hash and
/// length) and the version of the targets that named it.
async fn read_manifest(
    repo: &tough::Repository,
) -> Result<(Manifest, SlotHeader, u64), UpdateError> {
    let name = TargetName::new(TARGET).map_err(tuf(TARGET))?;
    let data = repo
        .read_target(&name)
        .await
        .map_err(tuf(TARGET))?
        .ok_or_else(|| UpdateError::BadManifest(format!("the repository lists no {TARGET}")))?
        .into_vec()
        .await
        .map_err(tuf(TARGET))?;
    let (manifest, header) = Manifest::parse(&data)?;
    Ok((manifest, header, repo.targets().signed.version.get()))
}

/// What a host learns from the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// The repository publishes the version running.
    UpToDate,
    /// The repository publishes an older version: refused.
    Older(String),
    /// A newer version, to apply.
    Newer(Box<Manifest>, Box<SlotHeader>),
}

/// The build a host runs: its recipe's name and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// The recipe's name.
    pub name: String,
    /// Its version.
    pub version: String,
}

impl From<&SlotHeader> for Running {
    fn from(h: &SlotHeader) -> Running {
        Running {
            name: h.name.clone(),
            version: h.version.clone(),
        }
    }
}

/// Where a host finds its updates.
#[derive(Debug, Clone)]
pub struct Source {
    /// The repository's base URL (ending in `/`).
    pub base: Url,
    /// How its files are fetched.
    pub transport: Box<dyn Transport>,
}

impl Source {
    /// A repository directory on this machine.
    /// The repository a host's recipe names (`[update] source`):
    /// `oci://HOST/NAME` (`oci+http://` for a registry without TLS),
    /// `https://…` or `http://…` (a published directory served as is),
    /// or a directory. Registries are read anonymously.
    pub fn parse(at: &str) -> Result<Source, UpdateError> {
        let oci = |name: &str, plain: bool| {
            crate::oci::OciRepo::new(name, plain, oci_client::secrets::RegistryAuth::Anonymous)
                .and_then(|o| Store::Oci(o).source())
        };
        if let Some(name) = at.strip_prefix("oci://") {
            oci(name, false)
        } else if let Some(name) = at.strip_prefix("oci+http://") {
            oci(name, true)
        } else if at.starts_with("https://") || at.starts_with("http://") {
            let base = format!("{}/", at.trim_end_matches('/'));
            Ok(Source {
                base: Url::parse(&base)
                    .map_err(|e| UpdateError::BadSource(format!("{at}: {e}")))?,
                transport: Box::new(crate::http::HttpTransport::default()),
            })
        } else if at.contains("://") {
            Err(UpdateError::BadSource(format!(
                "{at}: expected oci://HOST/NAME, oci+http://HOST/NAME, https://… or http://…"
            )))
        } else {
            Source::dir(Path::new(at))
        }
    }

    /// A repository directory on this machine.
    pub fn dir(dir: &Path) -> Result<Source, UpdateError> {
        Ok(Source {
            base: dir_url(dir)?,
            transport: Box::new(tough::FilesystemTransport),
        })
    }

    fn join(&self, path: &str) -> Result<Url, UpdateError> {
        self.base
            .join(path)
            .map_err(|e| UpdateError::BadSource(format!("{}{path}: {e}", self.base)))
    }

    async fn fetch_opt(&self, url: Url) -> Result<Option<Vec<u8>>, UpdateError> {
        match self.transport.fetch(url.clone()).await {
            Err(e) if e.kind() == tough::TransportErrorKind::FileNotFound => Ok(None),
            Err(e) => Err(UpdateError::Fetch {
                url: url.to_string(),
                why: e.to_string(),
            }),
            Ok(stream) => stream
                .into_vec()
                .await
                .map(Some)
                .map_err(|e| UpdateError::Fetch {
                    url: url.to_string(),
                    why: e.to_string(),
                }),
        }
    }

    async fn fetch(&self, url: Url) -> Result<Vec<u8>, UpdateError> {
        let stream = self
            .transport
            .fetch(url.clone())
            .await
            .map_err(|e| UpdateError::Fetch {
                url: url.to_string(),
                why: e.to_string(),
            })?;
        stream.into_vec().await.map_err(|e| UpdateError::Fetch {
            url: url.to_string(),
            why: e.to_string(),
        })
    }
}

/// Checks the repository for an update to `running`, trusting only a root
/// signed by `pinned` keys. The datastore keeps the metadata versions and
/// the root a host saw last: an older repository is refused against them.
pub fn check(
    source: &Source,
    pinned: &[PublicKey],
    datastore: &Path,
    running: &Running,
) -> Result<Checked, UpdateError> {
    runtime()?.block_on(check_async(source, pinned, datastore, running))
}

/// Where the root a host trusts is kept in its datastore.
const TRUSTED_ROOT: &str = "kiln-trusted-root.json";

async fn check_async(
    source: &Source,
    pinned: &[PublicKey],
    datastore: &Path,
    running: &Running,
) -> Result<Checked, UpdateError> {
    std::fs::create_dir_all(datastore).map_err(io(datastore))?;
    let kept = datastore.join(TRUSTED_ROOT);
    let root = match std::fs::read(&kept) {
        Ok(r) => r,
        Err(_) => {
            let first = source.fetch(source.join("metadata/1.root.json")?).await?;
            let parsed: Signed<Root> = serde_json::from_slice(&first)
                .map_err(|e| UpdateError::UntrustedRoot(format!("metadata/1.root.json: {e}")))?;
            let theirs = root_keys(&parsed.signed);
            if theirs.is_empty() || !theirs.iter().all(|k| pinned.contains(k)) {
                return Err(UpdateError::UntrustedRoot(format!(
                    "its root keys ({}) are not all among the keys trusted ({})",
                    theirs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    pinned
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            // tough checks that its root keys signed it.
            first
        }
    };
    let repo = load(
        &root,
        source.join("metadata/")?,
        source.join("targets/")?,
        source.transport.clone(),
        Some(datastore),
        ExpirationEnforcement::Safe,
    )
    .await?;
    let latest = serde_json::to_vec(repo.root()).map_err(|source| UpdateError::Json {
        what: "root.json".into(),
        source,
    })?;
    write_new(&kept, &latest)?;
    let (manifest, header, _) = read_manifest(&repo).await?;
    if header.name != running.name {
        return Err(UpdateError::ForeignRecipe {
            published: header.name,
            running: running.name.clone(),
        });
    }
    Ok(
        match kiln_boot::version::compare(&header.version, &running.version) {
            Some(std::cmp::Ordering::Greater) => {
                Checked::Newer(Box::new(manifest), Box::new(header))
            }
            Some(std::cmp::Ordering::Equal) => Checked::UpToDate,
            _ => Checked::Older(header.version),
        },
    )
}

/// Fetches chunks, each checked against its sha256, through one runtime
/// (and so one connection pool) for them all.
pub struct Chunks<'a> {
    source: &'a Source,
    runtime: tokio::runtime::Runtime,
}

impl<'a> Chunks<'a> {
    /// Ready to fetch from `source`.
    pub fn new(source: &'a Source) -> Result<Chunks<'a>, UpdateError> {
        Ok(Chunks {
            source,
            runtime: runtime()?,
        })
    }

    /// The chunk named `sha256`.
    pub fn fetch(&self, sha256: &str) -> Result<Vec<u8>, UpdateError> {
        self.runtime.block_on(async {
            let url = self.source.join(&format!("chunks/{sha256}"))?;
            let data = self.source.fetch(url.clone()).await?;
            let actual = hex::encode(Sha256::digest(&data));
            if actual != sha256 {
                return Err(UpdateError::CorruptChunk {
                    url: url.to_string(),
                    actual,
                });
            }
            Ok(data)
        })
    }
}

/// Writes `path` whole or not at all (a temp file renamed over it).
pub fn write_new(path: &Path, data: &[u8]) -> Result<(), UpdateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    std::fs::write(&tmp, data)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(path)(e)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::tests::openssl_key;
    use crate::manifest::tests::{content, header};

    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s += &format!(": {c}");
            cur = c.source();
        }
        s
    }

    fn source(dir: &Path) -> Source {
        Source::dir(dir).unwrap()
    }

    fn publish_at(
        dir: &Path,
        key: &SigningKey,
        data: &[u8],
        version: &str,
        now: std::time::SystemTime,
    ) -> Result<Published, UpdateError> {
        let h = header(data.len() as u64, version);
        publish(
            &Store::Dir(dir.to_path_buf()),
            key,
            &h,
            data,
            now,
            Lifetimes::default(),
        )
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }

    /// Serves `dir` over HTTP/1.0 on 127.0.0.1 (GET only; 404 for what is
    /// not there): a published directory behind a web server.
    fn serve(dir: PathBuf) -> u16 {
        use std::io::{BufRead, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut c in listener.incoming().flatten() {
                let mut line = String::new();
                let _ = std::io::BufReader::new(&c).read_line(&mut line);
                let path = line
                    .split(' ')
                    .nth(1)
                    .unwrap_or("/")
                    .trim_start_matches('/');
                let reply = match std::fs::read(dir.join(path)) {
                    Ok(body) if !path.contains("..") => {
                        let mut r =
                            format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                                .into_bytes();
                        r.extend(body);
                        r
                    }
                    _ => b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                };
                let _ = c.write_all(&reply);
            }
        });
        port
    }

    #[test]
    fn a_directory_served_over_http_is_a_source() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let (a, a_pub) = openssl_key(t, "a", &["-algorithm", "ed25519"]);
        let key = SigningKey::load(&a).unwrap();
        let pinned = [PublicKey::load(&a_pub).unwrap()];
        let repo = t.join("repo");
        let now = std::time::SystemTime::now();
        let v1 = content(300_000, 3);
        let mut v2 = v1.clone();
        v2.splice(1000..1000, *b"changed");
        publish_at(&repo, &key, &v1, "1.0.0", now).unwrap();
        publish_at(&repo, &key, &v2, "1.1.0", now).unwrap();
        let src = Source::parse(&format!("http://127.0.0.1:{}/", serve(repo.clone()))).unwrap();
        let running = Running::from(&header(v1.len() as u64, "1.0.0"));
        let Checked::Newer(m, h) = check(&src, &pinned, &t.join("ds"), &running).unwrap() else {
            panic!("1.1.0 not offered over HTTP");
        };
        assert_eq!(h.version, "1.1.0");
        let chunks = Chunks::new(&src).unwrap();
        let got: Vec<u8> = m
            .chunks
            .iter()
            .flat_map(|c| chunks.fetch(&c.sha256).unwrap())
            .collect();
        assert_eq!(got, v2);
        let missing = chunks.fetch(&"0".repeat(64)).unwrap_err();
        assert!(chain(&missing).contains("not found"), "{}", chain(&missing));
        for bad in ["ftp://x/y", "oci://nohost"] {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn published_updates_check_and_bad_ones_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let (a, a_pub) = openssl_key(t, "a", &["-algorithm", "ed25519"]);
        let (b, b_pub) = openssl_key(t, "b", &["-algorithm", "ed25519"]);
        let (key, other) = (SigningKey::load(&a).unwrap(), SigningKey::load(&b).unwrap());
        let pinned = [PublicKey::load(&a_pub).unwrap()];
        let repo = t.join("repo");
        let now = std::time::SystemTime::now();
        let v1 = content(1 << 20, 1);
        let mut v2 = v1.clone();
        v2.splice(300_000..300_000, b"one more line\n".iter().copied());

        let p1 = publish_at(&repo, &key, &v1, "1.0.0", now).unwrap();
        assert_eq!((p1.previous, p1.metadata_version), (None, 1));
        assert_eq!((p1.new_chunks, p1.new_bytes), (p1.chunks, 1 << 20));
        let ds = t.join("datastore");
        let running = Running::from(&header(v1.len() as u64, "1.0.0"));
        let src = source(&repo);
        assert_eq!(
            check(&src, &pinned, &ds, &running).unwrap(),
            Checked::UpToDate
        );
        let before_v2 = t.join("metadata-v1");
        copy_dir(&repo.join("metadata"), &before_v2);

        let p2 = publish_at(&repo, &key, &v2, "2.0.0", now).unwrap();
        assert_eq!(p2.previous.as_deref(), Some("1.0.0"));
        assert!(p2.new_bytes * 5 < p2.bytes, "{p2:?}");
        let Checked::Newer(m, h) = check(&src, &pinned, &ds, &running).unwrap() else {
            panic!("v2 not offered");
        };
        assert_eq!(h.version, "2.0.0");
        let mut got = Vec::new();
        let chunks = Chunks::new(&src).unwrap();
        for c in &m.chunks {
            got.extend(chunks.fetch(&c.sha256).unwrap());
        }
        assert_eq!(got, v2);

        // The publisher refuses what a host would.
        for (k, data, v, why) in [
            (&key, &v2, "2.0.0", "not newer than 2.0.0"),
            (&key, &v2, "1.5", "not newer"),
            (&other, &v2, "3.0.0", "signed by other keys"),
        ] {
            let e = publish_at(&repo, k, data, v, now).unwrap_err();
            assert!(chain(&e).contains(why), "{v}: {}", chain(&e));
        }
        let mut foreign = header(v2.len() as u64, "3.0.0");
        foreign.name = "other".into();
        let e = publish(
            &Store::Dir(repo.clone()),
            &key,
            &foreign,
            &v2[..],
            now,
            Lifetimes::default(),
        )
        .unwrap_err();
        assert!(matches!(e, UpdateError::OtherRecipe { .. }), "{e}");

        // A host pinning another key trusts nothing here.
        let e = check(&src, &[other.public().clone()], &t.join("ds-b"), &running).unwrap_err();
        assert!(matches!(e, UpdateError::UntrustedRoot(_)), "{}", chain(&e));
        let _ = b_pub;
        // A host already past what is published refuses it.
        let newer = Running::from(&header(v1.len() as u64, "2.1.0"));
        assert_eq!(
            check(&src, &pinned, &ds, &newer).unwrap(),
            Checked::Older("2.0.0".into())
        );

        // A mirror serving the older repository (a freeze or a rollback)
        // is refused: the host saw newer metadata.
        let meta = repo.join("metadata");
        std::fs::copy(
            before_v2.join("timestamp.json"),
            meta.join("timestamp.json"),
        )
        .unwrap();
        let e = check(&src, &pinned, &ds, &running).unwrap_err();
        assert!(chain(&e).contains("version"), "{}", chain(&e));

        // A chunk not matching its sha256 is refused.
        let first = &m.chunks[0].sha256;
        std::fs::write(repo.join("chunks").join(first), b"tampered").unwrap();
        let e = Chunks::new(&src).unwrap().fetch(first).unwrap_err();
        assert!(matches!(e, UpdateError::CorruptChunk { .. }), "{e}");

        // Metadata signed long ago has expired: a host refuses it.
        let stale = t.join("stale");
        let long_ago = now - Duration::from_secs(30 * 24 * 3600);
        publish_at(&stale, &key, &v1, "1.0.0", long_ago).unwrap();
        let e = check(&source(&stale), &pinned, &t.join("ds-stale"), &running).unwrap_err();
        assert!(chain(&e).contains("xpired"), "{}", chain(&e));
        // Refreshed (signed again with new dates), the same build checks.
        let store = Store::Dir(stale.clone());
        let r = refresh(&store, &key, now, Lifetimes::default()).unwrap();
        assert_eq!((r.version.as_str(), r.metadata_version), ("1.0.0", 2));
        let older = Running::from(&header(v1.len() as u64, "0.9.0"));
        let Checked::Newer(_, h) =
            check(&source(&stale), &pinned, &t.join("ds-stale"), &older).unwrap()
        else {
            panic!("the refreshed repository offers nothing");
        };
        assert_eq!(h.version, "1.0.0");
        let e = refresh(&store, &other, now, Lifetimes::default()).unwrap_err();
        assert!(matches!(e, UpdateError::OtherKeys { .. }), "{e}");
        let e = refresh(&Store::Dir(t.join("none")), &key, now, Lifetimes::default()).unwrap_err();
        assert!(e.to_string().contains("no repository to refresh"), "{e}");

        // A manifest changed after signing is refused.
        let fresh = t.join("fresh");
        publish_at(&fresh, &key, &v1, "1.0.0", now).unwrap();
        publish_at(&fresh, &key, &v2, "2.0.0", now).unwrap();
        for e in std::fs::read_dir(fresh.join("targets")).unwrap().flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap();
            std::fs::write(e.path(), text.replace("2.0.0", "2.0.1")).unwrap();
        }
        let e = check(&source(&fresh), &pinned, &t.join("ds-fresh"), &running).unwrap_err();
        assert!(matches!(e, UpdateError::Tuf { .. }), "{}", chain(&e));
    }
}
