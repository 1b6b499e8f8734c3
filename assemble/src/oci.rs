//! Container image sources resolved to a pinned, verified [`Image`].
//!
//! Three kinds of source:
//! - a registry reference `host[:port]/repo[:tag][@sha256:...]`;
//! - `oci-layout:DIR[:TAG]`, an OCI image layout directory;
//! - `docker-archive:FILE`, a `docker save` tarball.
//!
//! Every manifest, config and layer is checked against the digest that
//! names it before it is used. Registry blobs go through the [`Cache`], which
//! is consulted first: a warm cache and a digest-pinned reference need no
//! network at all.

use crate::cache::{Cache, CacheError, Digest};
use crate::layers::{Compression, Layer};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A resolved image: everything needed to build its root tree.
#[derive(Debug, Clone)]
pub struct Image {
    /// The source string the image was pulled from.
    pub reference: String,
    /// The digest the reference resolves to: for a registry or oci-layout
    /// source, the top-level manifest (an index for multi-arch images), so
    /// `reference@manifest_digest` pins it; for a docker-archive, the config
    /// digest (the image ID).
    pub manifest_digest: Digest,
    /// The image's runtime config.
    pub config: ImageConfig,
    /// Bottom layer first.
    pub layers: Vec<Layer>,
}

/// The runtime part (`config` object) of an OCI/Docker image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Environment, as `KEY=value`.
    #[serde(rename = "Env", default, deserialize_with = "null_default")]
    pub env: Vec<String>,
    /// Entrypoint argv; empty if unset.
    #[serde(rename = "Entrypoint", default, deserialize_with = "null_default")]
    pub entrypoint: Vec<String>,
    /// Default arguments (or command, without an entrypoint).
    #[serde(rename = "Cmd", default, deserialize_with = "null_default")]
    pub cmd: Vec<String>,
    /// Working directory; empty if unset.
    #[serde(rename = "WorkingDir", default, deserialize_with = "null_default")]
    pub working_dir: String,
    /// User, as `user[:group]` by name or id; empty if unset.
    #[serde(rename = "User", default, deserialize_with = "null_default")]
    pub user: String,
}

/// Docker writes `null` for unset lists; treat it like absent.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Errors from pulling and reading container images.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The reference is not a valid image source (registry, oci-layout or docker-archive).
    #[error("{reference}: not an image source: {reason}")]
    BadSource {
        /// The reference as given.
        reference: String,
        /// Why not.
        reason: String,
    },
    /// A manifest, config or layer does not hash to its digest.
    #[error("{reference}: {what} {expected} does not match its digest (got {actual})")]
    Mismatch {
        /// The image reference.
        reference: String,
        /// Which blob (manifest, config, layer).
        what: String,
        /// The digest expected.
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// A manifest or config blob is not valid JSON or lacks what kiln needs.
    #[error("{reference}: {what} {digest}: {message}")]
    Invalid {
        /// The image reference.
        reference: String,
        /// Which blob (manifest, config, ...).
        what: String,
        /// Digest of the blob.
        digest: Digest,
        /// What is wrong with it.
        message: String,
    },
    /// The image source is malformed (bad digest string, oci-layout marker, archive layout, ...).
    #[error("{reference}: {message}")]
    Format {
        /// The image reference.
        reference: String,
        /// What is wrong.
        message: String,
    },
    /// The registry refused or failed a request.
    #[error("{reference}: registry: {message}")]
    Registry {
        /// The image reference.
        reference: String,
        /// What the registry or client reported.
        message: String,
    },
    /// Reading a local image source failed.
    #[error("{reference}: {}", path.display())]
    Io {
        /// The image reference.
        reference: String,
        /// The file read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// Reading or writing the cache failed.
    #[error("{reference}: cache")]
    Cache {
        /// The image reference.
        reference: String,
        /// The underlying cache error.
        source: CacheError,
    },
    /// Offline, and a needed manifest or blob is not cached.
    #[error("{reference}: offline, and {what} is not in the cache")]
    Offline {
        /// The image reference.
        reference: String,
        /// What is missing.
        what: String,
    },
    /// The registry no longer serves the pinned manifest.
    #[error("{reference}: the pinned {digest} is gone ({message}); run `kiln lock --update` to pin what it names today")]
    PinGone {
        /// The image reference.
        reference: String,
        /// The pinned manifest digest.
        digest: Digest,
        /// What the registry said.
        message: String,
    },
}

// ---- JSON documents (only the fields we use; unknown ones are ignored) ----

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    urls: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

/// An image manifest or an index / manifest list.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

#[derive(Debug, Deserialize)]
struct ConfigDoc {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    config: ImageConfig,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// How registries are reached.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// `HOST[:PORT]` spoken to over plain HTTP (loopback always is).
    pub insecure: Vec<String>,
    /// Never use the network: manifests and blobs must be cached.
    pub offline: bool,
}

/// Resolves `source` to a verified image. See the module docs for the forms.
pub async fn pull(source: &str, cache: &Cache, opts: &RegistryOptions) -> Result<Image, OciError> {
    if let Some(rest) = source.strip_prefix("oci-layout:") {
        pull_layout(source, rest, None).await
    } else if let Some(rest) = source.strip_prefix("docker-archive:") {
        pull_docker_archive(source, rest).await
    } else {
        pull_registry(source, None, cache, opts).await
    }
}

/// The digest `source` resolves to today (see [`Image::manifest_digest`]),
/// fetching no layer from a registry or layout.
pub async fn resolve_digest(
    source: &str,
    cache: &Cache,
    opts: &RegistryOptions,
) -> Result<Digest, OciError> {
    if let Some(rest) = source.strip_prefix("oci-layout:") {
        let (dir, tag) = split_layout(rest);
        Ok(layout_top(source, Path::new(dir), tag).await?.0)
    } else if source.starts_with("docker-archive:") {
        // A local file: reading it whole is the cheap way to its image ID.
        Ok(pull(source, cache, opts).await?.manifest_digest)
    } else {
        registry_digest(source, cache, opts).await
    }
}

/// What a registry reference's tag (or pinned digest) names.
async fn registry_digest(
    source: &str,
    cache: &Cache,
    opts: &RegistryOptions,
) -> Result<Digest, OciError> {
    let (client, reference, auth) = registry_client(source, opts)?;
    tag_digest(&client, &reference, &auth, source, cache, opts).await
}

/// What `reference` names, asking the registry through `client` (which
/// then holds any token the registry issued).
async fn tag_digest(
    client: &oci_client::Client,
    reference: &oci_client::Reference,
    auth: &oci_client::secrets::RegistryAuth,
    source: &str,
    cache: &Cache,
    opts: &RegistryOptions,
) -> Result<Digest, OciError> {
    if let Some(d) = reference.digest() {
        return parse_digest(source, "pinned", d);
    }
    if opts.offline {
        return Err(OciError::Offline {
            reference: source.to_string(),
            what: "the tag's manifest".into(),
        });
    }
    let (bytes, _) = client
        .pull_manifest_raw(reference, auth, MANIFEST_TYPES)
        .await
        .map_err(|e| registry_err(source, "fetching manifest", &e))?;
    let data = bytes.to_vec();
    let d = Digest::of(&data);
    cache.put(&d, &data).map_err(|e| OciError::Cache {
        reference: source.to_string(),
        source: e,
    })?;
    record_served(cache, reference, &d);
    Ok(d)
}

/// The image `source` named when it resolved to `digest` (from a lock):
/// a registry is asked for exactly that manifest (the cache serves it when
/// this repository served it before), a layout must still hold it, an
/// archive must still be that image.
pub async fn pull_pinned(
    source: &str,
    digest: Digest,
    cache: &Cache,
    opts: &RegistryOptions,
) -> Result<Image, OciError> {
    let image = if let Some(rest) = source.strip_prefix("oci-layout:") {
        pull_layout(source, rest, Some(digest)).await?
    } else if let Some(rest) = source.strip_prefix("docker-archive:") {
        pull_docker_archive(source, rest).await?
    } else {
        pull_registry(source, Some(digest), cache, opts).await?
    };
    if image.manifest_digest != digest {
        return Err(OciError::PinGone {
            reference: source.to_string(),
            digest,
            message: format!("it is now {}", image.manifest_digest),
        });
    }
    Ok(image)
}

fn registry_err(reference: &str, what: &str, e: &dyn std::error::Error) -> OciError {
    OciError::Registry {
        reference: reference.to_string(),
        message: format!("{what}: {}", crate::error_chain(e)),
    }
}

/// Cache record: `reference`'s repository served manifest `digest`. A
/// digest pinned for one repository is not served from the cache because
/// another repository had it.
fn served_key(reference: &oci_client::Reference) -> String {
    format!(
        "{}/{}",
        reference.resolve_registry(),
        reference.repository()
    )
}

fn record_served(cache: &Cache, reference: &oci_client::Reference, digest: &Digest) {
    // Only an optimisation for later offline use: failing to record is harmless.
    let _ = cache.write_ref(
        "served",
        &format!("{}@{digest}", served_key(reference)),
        "1",
    );
}

fn was_served(cache: &Cache, reference: &oci_client::Reference, digest: &Digest) -> bool {
    cache
        .read_ref("served", &format!("{}@{digest}", served_key(reference)))
        .is_some()
}

// ---- shared resolution ----

/// Where manifests and blobs named by digest come from.
enum Store<'a> {
    Registry {
        client: &'a oci_client::Client,
        reference: &'a oci_client::Reference,
        auth: &'a oci_client::secrets::RegistryAuth,
        cache: &'a Cache,
        offline: bool,
        /// Whether `client` holds the registry's token yet.
        authed: &'a std::sync::atomic::AtomicBool,
    },
    Layout {
        dir: &'a Path,
    },
}

fn parse_digest(reference: &str, what: &str, s: &str) -> Result<Digest, OciError> {
    s.parse().map_err(|_| OciError::Format {
        reference: reference.to_string(),
        message: format!("{what} digest {s:?} is not sha256:<64 hex digits>"),
    })
}

fn verify(reference: &str, what: &str, expected: &Digest, data: &[u8]) -> Result<(), OciError> {
    let actual = Digest::of(data);
    if actual != *expected {
        return Err(OciError::Mismatch {
            reference: reference.to_string(),
            what: what.to_string(),
            expected: *expected,
            actual,
        });
    }
    Ok(())
}

impl Store<'_> {
    /// The verified bytes of `digest`.
    async fn get(
        &self,
        reference: &str,
        what: &str,
        digest: &Digest,
        manifest: bool,
    ) -> Result<Vec<u8>, OciError> {
        match self {
            Store::Layout { dir } => {
                let path = dir.join("blobs").join("sha256").join(digest.hex());
                let data = tokio::fs::read(&path)
                    .await
                    .map_err(|source| OciError::Io {
                        reference: reference.to_string(),
                        path: path.clone(),
                        source,
                    })?;
                verify(reference, what, digest, &data)?;
                Ok(data)
            }
            Store::Registry {
                client,
                reference: r,
                auth,
                cache,
                offline,
                authed,
            } => {
                let cache_err = |source| OciError::Cache {
                    reference: reference.to_string(),
                    source,
                };
                // A manifest counts as cached only for a repository that
                // served it; blobs are shared content.
                if !manifest || was_served(cache, r, digest) {
                    if let Some(data) = cache.get(digest).map_err(cache_err)? {
                        return Ok(data);
                    }
                }
                if *offline {
                    return Err(OciError::Offline {
                        reference: reference.to_string(),
                        what: format!("{what} {digest}"),
                    });
                }
                let reg_err = |e: oci_client::errors::OciDistributionError| {
                    registry_err(reference, &format!("fetching {what} {digest}"), &e)
                };
                // Blob requests carry the token a manifest request got; when
                // the manifest came from the cache, get one first.
                if !authed.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    client
                        .auth(r, auth, oci_client::RegistryOperation::Pull)
                        .await
                        .map_err(reg_err)?;
                }
                let data = if manifest {
                    let by_digest = r.clone_with_digest(digest.to_string());
                    let (bytes, _) = client
                        .pull_manifest_raw(&by_digest, auth, MANIFEST_TYPES)
                        .await
                        .map_err(reg_err)?;
                    bytes.to_vec()
                } else {
                    let mut out = Vec::new();
                    client
                        .pull_blob(r, digest.to_string().as_str(), &mut out)
                        .await
                        .map_err(reg_err)?;
                    out
                };
                verify(reference, what, digest, &data)?;
                cache.put(digest, &data).map_err(cache_err)?;
                if manifest {
                    record_served(cache, r, digest);
                }
                Ok(data)
            }
        }
    }
}

const MANIFEST_TYPES: &[&str] = &[
    MT_OCI_INDEX,
    MT_DOCKER_LIST,
    MT_OCI_MANIFEST,
    MT_DOCKER_MANIFEST,
];

fn parse_manifest(reference: &str, digest: &Digest, data: &[u8]) -> Result<ManifestDoc, OciError> {
    let doc: ManifestDoc = serde_json::from_slice(data).map_err(|e| OciError::Invalid {
        reference: reference.to_string(),
        what: "manifest".into(),
        digest: *digest,
        message: format!("bad JSON: {e}"),
    })?;
    if doc.schema_version != Some(2) {
        return Err(OciError::Invalid {
            reference: reference.to_string(),
            what: "manifest".into(),
            digest: *digest,
            message: format!(
                "schemaVersion {:?} is not supported (only 2)",
                doc.schema_version
            ),
        });
    }
    Ok(doc)
}

/// Picks the target's linux entry of an index (a plain or `v1` variant
/// first).
fn select_platform(entries: &[Descriptor]) -> Option<&Descriptor> {
    let target = |d: &&Descriptor| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == crate::arch::TARGET.oci)
    };
    let plain = |d: &&Descriptor| {
        d.platform
            .as_ref()
            .is_some_and(|p| matches!(p.variant.as_deref(), None | Some("") | Some("v1")))
    };
    entries
        .iter()
        .filter(target)
        .find(plain)
        .or_else(|| entries.iter().find(target))
}

fn compression_of(media_type: &str, data: &[u8]) -> Compression {
    if media_type.ends_with("gzip") {
        Compression::Gzip
    } else if media_type.ends_with("zstd") {
        Compression::Zstd
    } else if media_type.ends_with("xz") {
        Compression::Xz
    } else if media_type.ends_with(".tar") {
        Compression::None
    } else {
        Compression::sniff(data)
    }
}

fn check_size(
    reference: &str,
    what: &str,
    desc: &Descriptor,
    digest: &Digest,
    len: usize,
) -> Result<(), OciError> {
    match desc.size {
        Some(s) if s != len as u64 => Err(OciError::Invalid {
            reference: reference.to_string(),
            what: what.to_string(),
            digest: *digest,
            message: format!("size {len} differs from the descriptor's {s}"),
        }),
        _ => Ok(()),
    }
}

/// From a verified top-level manifest (or index) to the image.
async fn resolve(
    reference: &str,
    store: &Store<'_>,
    top_digest: Digest,
    top: Vec<u8>,
) -> Result<Image, OciError> {
    let mut digest = top_digest;
    let mut doc = parse_manifest(reference, &digest, &top)?;
    // An index may point at another index; two levels is plenty.
    for _ in 0..2 {
        let Some(entries) = &doc.manifests else { break };
        let entry = select_platform(entries).ok_or_else(|| OciError::Invalid {
            reference: reference.to_string(),
            what: "index".into(),
            digest,
            message: format!("no linux/{} manifest", crate::arch::TARGET.oci),
        })?;
        let d = parse_digest(reference, "manifest", &entry.digest)?;
        let data = store.get(reference, "manifest", &d, true).await?;
        check_size(reference, "manifest", entry, &d, data.len())?;
        digest = d;
        doc = parse_manifest(reference, &digest, &data)?;
    }
    if doc.manifests.is_some() {
        return Err(OciError::Invalid {
            reference: reference.to_string(),
            what: "index".into(),
            digest,
            message: "indexes nested too deeply".into(),
        });
    }
    let invalid = |message: &str| OciError::Invalid {
        reference: reference.to_string(),
        what: "manifest".into(),
        digest,
        message: message.to_string(),
    };
    if let Some(mt) = &doc.media_type {
        if mt != MT_OCI_MANIFEST && mt != MT_DOCKER_MANIFEST {
            return Err(invalid(&format!("unsupported media type {mt}")));
        }
    }
    let config_desc = doc.config.as_ref().ok_or_else(|| invalid("no config"))?;
    let layer_descs = doc.layers.as_ref().ok_or_else(|| invalid("no layers"))?;

    let config_digest = parse_digest(reference, "config", &config_desc.digest)?;
    let config_data = store
        .get(reference, "config", &config_digest, false)
        .await?;
    check_size(
        reference,
        "config",
        config_desc,
        &config_digest,
        config_data.len(),
    )?;
    let config = parse_config(reference, &config_digest, &config_data)?;

    let mut layers = Vec::with_capacity(layer_descs.len());
    for desc in layer_descs {
        let d = parse_digest(reference, "layer", &desc.digest)?;
        if !desc.urls.is_empty() {
            return Err(OciError::Invalid {
                reference: reference.to_string(),
                what: "layer".into(),
                digest: d,
                message: "foreign layers (with urls) are not supported".into(),
            });
        }
        let data = store.get(reference, "layer", &d, false).await?;
        check_size(reference, "layer", desc, &d, data.len())?;
        layers.push(Layer {
            source: reference.to_string(),
            digest: d,
            compression: compression_of(&desc.media_type, &data),
            data: Arc::new(data),
        });
    }
    Ok(Image {
        reference: reference.to_string(),
        manifest_digest: top_digest,
        config: config.config,
        layers,
    })
}

fn parse_config(reference: &str, digest: &Digest, data: &[u8]) -> Result<ConfigDoc, OciError> {
    let invalid = |message: String| OciError::Invalid {
        reference: reference.to_string(),
        what: "config".into(),
        digest: *digest,
        message,
    };
    let doc: ConfigDoc =
        serde_json::from_slice(data).map_err(|e| invalid(format!("bad JSON: {e}")))?;
    let os = doc.os.as_deref().unwrap_or("linux");
    let want = crate::arch::TARGET.oci;
    let arch = doc.architecture.as_deref().unwrap_or(want);
    if os != "linux" || arch != want {
        return Err(invalid(format!(
            "image is for {os}/{arch}, not linux/{want}"
        )));
    }
    Ok(doc)
}

// ---- registry ----

/// Credentials for `registry` from the docker config file, if any.
fn docker_auth(registry: &str) -> oci_client::secrets::RegistryAuth {
    use oci_client::secrets::RegistryAuth;
    let path = match std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("config.json"),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(h) => PathBuf::from(h).join(".docker").join("config.json"),
            None => return RegistryAuth::Anonymous,
        },
    };
    match std::fs::read(&path) {
        Ok(data) => auth_from_docker_config(&data, registry),
        Err(_) => RegistryAuth::Anonymous,
    }
}

/// Looks `registry` up in a docker `config.json`: `auths.HOST.auth`
/// (base64 `user:pass`), `username`/`password`, or `registrytoken`.
fn auth_from_docker_config(data: &[u8], registry: &str) -> oci_client::secrets::RegistryAuth {
    use base64::Engine as _;
    use oci_client::secrets::RegistryAuth;

    #[derive(Deserialize)]
    struct Config {
        #[serde(default)]
        auths: BTreeMap<String, Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        #[serde(default)]
        auth: Option<String>,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<String>,
        #[serde(default)]
        registrytoken: Option<String>,
    }
    let Ok(config) = serde_json::from_slice::<Config>(data) else {
        return RegistryAuth::Anonymous;
    };
    let is_hub = matches!(
        registry,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    );
    // Keys are written as a bare host or a URL (`https://host/v1/`).
    let entry = config.auths.iter().find_map(|(key, e)| {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("");
        let hub_key = matches!(
            host,
            "docker.io" | "index.docker.io" | "registry-1.docker.io"
        );
        (host == registry || (is_hub && hub_key)).then_some(e)
    });
    let Some(e) = entry else {
        return RegistryAuth::Anonymous;
    };
    if let Some(token) = e.registrytoken.as_ref().filter(|t| !t.is_empty()) {
        return RegistryAuth::Bearer(token.clone());
    }
    if let Some(auth) = e.auth.as_ref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        if let Some((user, pass)) = decoded.as_deref().and_then(|s| s.split_once(':')) {
            return RegistryAuth::Basic(user.to_string(), pass.to_string());
        }
    }
    if let (Some(u), Some(p)) = (&e.username, &e.password) {
        return RegistryAuth::Basic(u.clone(), p.clone());
    }
    RegistryAuth::Anonymous
}

/// Loopback registries (tests, local mirrors) speak plain HTTP.
fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.split(':').next().unwrap_or("")
    };
    matches!(host, "localhost" | "::1") || host.starts_with("127.")
}

/// A client for `source`'s registry: plain HTTP for loopback and the
/// hosts named insecure, credentials from the docker config.
fn registry_client(
    source: &str,
    opts: &RegistryOptions,
) -> Result<
    (
        oci_client::Client,
        oci_client::Reference,
        oci_client::secrets::RegistryAuth,
    ),
    OciError,
> {
    use oci_client::client::{ClientConfig, ClientProtocol};
    let reference: oci_client::Reference = source.parse().map_err(|e| OciError::BadSource {
        reference: source.to_string(),
        reason: format!("{e}"),
    })?;
    let registry = reference.resolve_registry().to_string();
    let insecure = is_loopback(&registry) || opts.insecure.contains(&registry);
    let protocol = if insecure {
        ClientProtocol::HttpsExcept(vec![registry.clone()])
    } else {
        ClientProtocol::Https
    };
    let client = oci_client::Client::new(ClientConfig {
        protocol,
        ..Default::default()
    });
    let auth = docker_auth(&registry);
    Ok((client, reference, auth))
}

async fn pull_registry(
    source: &str,
    pin: Option<Digest>,
    cache: &Cache,
    opts: &RegistryOptions,
) -> Result<Image, OciError> {
    let (client, reference, auth) = registry_client(source, opts)?;
    let pinned = match pin {
        Some(d) => Some(d),
        None => reference
            .digest()
            .map(|d| parse_digest(source, "pinned", d))
            .transpose()?,
    };
    let authed = std::sync::atomic::AtomicBool::new(false);
    let store = Store::Registry {
        client: &client,
        reference: &reference,
        auth: &auth,
        cache,
        offline: opts.offline,
        authed: &authed,
    };
    let digest = match pinned {
        Some(d) => d,
        None => {
            let d = tag_digest(&client, &reference, &auth, source, cache, opts).await?;
            authed.store(true, std::sync::atomic::Ordering::Relaxed);
            d
        }
    };
    // A pinned manifest is content: the cache can serve it.
    let data = store.get(source, "manifest", &digest, true).await?;
    resolve(source, &store, digest, data).await
}

// ---- oci-layout ----

#[derive(Deserialize)]
struct LayoutIndex {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// `DIR:TAG` unless the whole thing names a directory.
fn split_layout(rest: &str) -> (&str, Option<&str>) {
    if Path::new(rest).is_dir() {
        return (rest, None);
    }
    match rest.rsplit_once(':') {
        Some((d, t)) => (d, Some(t)),
        None => (rest, None),
    }
}

/// The manifest (or index) that the layout's index.json names for `tag`.
async fn layout_top(
    source: &str,
    dir: &Path,
    tag: Option<&str>,
) -> Result<(Digest, Option<u64>), OciError> {
    let read = |name: &str| {
        let path = dir.join(name);
        async move {
            tokio::fs::read(&path).await.map_err(|e| OciError::Io {
                reference: source.to_string(),
                path,
                source: e,
            })
        }
    };
    let marker = read("oci-layout").await?;
    let marker: serde_json::Value =
        serde_json::from_slice(&marker).map_err(|e| OciError::Format {
            reference: source.to_string(),
            message: format!("oci-layout: {e}"),
        })?;
    if marker.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
        return Err(OciError::Format {
            reference: source.to_string(),
            message: "oci-layout: imageLayoutVersion is not 1.0.0".into(),
        });
    }
    let index: LayoutIndex =
        serde_json::from_slice(&read("index.json").await?).map_err(|e| OciError::Format {
            reference: source.to_string(),
            message: format!("index.json: {e}"),
        })?;
    let chosen: Vec<&Descriptor> = match tag {
        Some(t) => index
            .manifests
            .iter()
            .filter(|d| d.annotations.get(REF_NAME).is_some_and(|n| n == t))
            .collect(),
        None => index.manifests.iter().collect(),
    };
    let desc = match chosen.as_slice() {
        [one] => *one,
        [] => {
            return Err(OciError::Format {
                reference: source.to_string(),
                message: match tag {
                    Some(t) => format!("index.json has no manifest named {t:?}"),
                    None => "index.json lists no manifest".into(),
                },
            })
        }
        _ => {
            return Err(OciError::Format {
                reference: source.to_string(),
                message: "index.json lists several manifests: name one with :TAG".into(),
            })
        }
    };
    Ok((parse_digest(source, "manifest", &desc.digest)?, desc.size))
}

async fn pull_layout(source: &str, rest: &str, pin: Option<Digest>) -> Result<Image, OciError> {
    let (dir, tag) = split_layout(rest);
    let dir = Path::new(dir);
    let (digest, size) = match pin {
        Some(d) => (d, None),
        None => layout_top(source, dir, tag).await?,
    };
    let store = Store::Layout { dir };
    let data = store.get(source, "manifest", &digest, true).await?;
    if let Some(s) = size {
        if s != data.len() as u64 {
            return Err(OciError::Invalid {
                reference: source.to_string(),
                what: "manifest".into(),
                digest,
                message: format!("size {} differs from the descriptor's {s}", data.len()),
            });
        }
    }
    resolve(source, &store, digest, data).await
}

// ---- docker-archive ----

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveManifest {
    config: String,
    #[serde(default, deserialize_with = "null_default")]
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

/// Normalises a path inside the archive (no `..` escapes, no leading `./`).
fn archive_path(base: &str, p: &str) -> Option<String> {
    let mut out: Vec<&str> = if p.starts_with('/') {
        Vec::new()
    } else {
        base.split('/').filter(|c| !c.is_empty()).collect()
    };
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

/// The 64-hex digest a docker-archive file name encodes, if it does.
fn digest_in_name(path: &str) -> Option<Digest> {
    let name = path.strip_prefix("blobs/sha256/").or_else(|| {
        let file = path.rsplit('/').next()?;
        file.strip_suffix(".json")
    })?;
    if name.len() == 64 {
        Digest::from_hex(name).ok()
    } else {
        None
    }
}

async fn pull_docker_archive(source: &str, rest: &str) -> Result<Image, OciError> {
    // `FILE` or `FILE:repo:tag` (the part after the file picks an image).
    let (file, want) = if Path::new(rest).is_file() {
        (rest, None)
    } else {
        match rest.split_once(':') {
            Some((f, t)) => (f, Some(t)),
            None => (rest, None),
        }
    };
    let data = tokio::fs::read(file).await.map_err(|e| OciError::Io {
        reference: source.to_string(),
        path: PathBuf::from(file),
        source: e,
    })?;
    let format = |message: String| OciError::Format {
        reference: source.to_string(),
        message,
    };

    // Regular files by path, and symlinks (docker save shares layers that way).
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    let mut links: HashMap<String, String> = HashMap::new();
    let mut archive = tar::Archive::new(&data[..]);
    let entries = archive
        .entries()
        .map_err(|e| format(format!("reading archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format(format!("reading archive: {e}")))?;
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some(path) = archive_path("", &path) else {
            continue;
        };
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut buf = Vec::new();
                entry
                    .read_to_end(&mut buf)
                    .map_err(|e| format(format!("{path}: {e}")))?;
                files.insert(path, buf);
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                let base = if entry.header().entry_type() == tar::EntryType::Link {
                    String::new()
                } else {
                    path.rsplit_once('/')
                        .map(|(d, _)| d.to_string())
                        .unwrap_or_default()
                };
                if let Some(t) = archive_path(&base, &target) {
                    links.insert(path, t);
                }
            }
            _ => {}
        }
    }
    let lookup = |p: &str| -> Result<&Vec<u8>, OciError> {
        let mut p = archive_path("", p).ok_or_else(|| format(format!("{p}: bad path")))?;
        for _ in 0..8 {
            if let Some(d) = files.get(&p) {
                return Ok(d);
            }
            match links.get(&p) {
                Some(t) => p = t.clone(),
                None => break,
            }
        }
        Err(format(format!("{p}: not in the archive")))
    };

    let manifests: Vec<ArchiveManifest> = serde_json::from_slice(lookup("manifest.json")?)
        .map_err(|e| format(format!("manifest.json: {e}")))?;
    let m = match want {
        Some(t) => manifests
            .iter()
            .find(|m| m.repo_tags.iter().any(|r| r == t))
            .ok_or_else(|| format(format!("manifest.json has no image tagged {t:?}")))?,
        None => match manifests.as_slice() {
            [one] => one,
            [] => return Err(format("manifest.json lists no image".into())),
            _ => {
                return Err(format(
                    "manifest.json lists several images: name one with :REPO:TAG".into(),
                ))
            }
        },
    };

    let config_data = lookup(&m.config)?;
    let config_digest = Digest::of(config_data);
    if let Some(named) = digest_in_name(&m.config) {
        verify(source, "config", &named, config_data)?;
    }
    let config = parse_config(source, &config_digest, config_data)?;
    let diff_ids = config
        .rootfs
        .as_ref()
        .map(|r| &r.diff_ids[..])
        .unwrap_or(&[]);
    if diff_ids.len() != m.layers.len() {
        return Err(OciError::Invalid {
            reference: source.to_string(),
            what: "config".into(),
            digest: config_digest,
            message: format!(
                "{} layers but {} rootfs.diff_ids",
                m.layers.len(),
                diff_ids.len()
            ),
        });
    }
    let mut layers = Vec::with_capacity(m.layers.len());
    for (path, diff_id) in m.layers.iter().zip(diff_ids) {
        let blob = lookup(path)?;
        let digest = Digest::of(blob);
        if let Some(named) = digest_in_name(path) {
            verify(source, "layer", &named, blob)?;
        }
        let diff_id = parse_digest(source, "diff_id", diff_id)?;
        let compression = Compression::sniff(blob);
        let uncompressed_digest = if compression == Compression::None {
            digest
        } else {
            uncompressed_sha256(blob, compression).map_err(|e| OciError::Invalid {
                reference: source.to_string(),
                what: "layer".into(),
                digest,
                message: format!("decompressing: {e}"),
            })?
        };
        if uncompressed_digest != diff_id {
            return Err(OciError::Mismatch {
                reference: source.to_string(),
                what: format!("layer {path} (uncompressed, rootfs.diff_ids)"),
                expected: diff_id,
                actual: uncompressed_digest,
            });
        }
        layers.push(Layer {
            source: source.to_string(),
            digest,
            compression,
            data: Arc::new(blob.clone()),
        });
    }
    Ok(Image {
        reference: source.to_string(),
        manifest_digest: config_digest,
        config: config.config,
        layers,
    })
}

/// sha256 of a compressed stream's decompressed bytes, streaming.
fn uncompressed_sha256(data: &[u8], c: Compression) -> std::io::Result<Digest> {
    use sha2::Digest as _;
    let mut r: Box<dyn Read + '_> = match c {
        Compression::None => Box::new(data),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(data)),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(data)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(data)?),
    };
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Digest(h.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_client::secrets::RegistryAuth;

    #[test]
    fn docker_config_auth() {
        let cfg = br#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"aHViOnNlY3JldA=="},
            "reg.example.com:5000":{"auth":"dXNlcjpwYTpzcw=="},
            "tok.example.com":{"registrytoken":"T0K"},
            "plain.example.com":{"username":"u","password":"p"}}}"#;
        let basic = |u: &str, p: &str| format!("{:?}", RegistryAuth::Basic(u.into(), p.into()));
        let got = |r: &str| format!("{:?}", auth_from_docker_config(cfg, r));
        assert_eq!(got("index.docker.io"), basic("hub", "secret"));
        // The password may itself contain a colon.
        assert_eq!(got("reg.example.com:5000"), basic("user", "pa:ss"));
        assert_eq!(got("plain.example.com"), basic("u", "p"));
        assert!(matches!(
            auth_from_docker_config(cfg, "tok.example.com"),
            RegistryAuth::Bearer(t) if t == "T0K"
        ));
        assert_eq!(got("reg.example.com"), "Anonymous");
        assert_eq!(
            format!("{:?}", auth_from_docker_config(b"not json", "x")),
            "Anonymous"
        );
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("[::1]:80"));
        assert!(!is_loopback("registry.example.com"));
    }

    #[test]
    fn amd64_selection_prefers_plain_variant() {
        let d = |arch: &str, variant: Option<&str>, n: u8| Descriptor {
            media_type: MT_OCI_MANIFEST.into(),
            digest: format!("sha256:{}", hex::encode([n; 32])),
            size: None,
            platform: Some(Platform {
                architecture: arch.into(),
                os: "linux".into(),
                variant: variant.map(Into::into),
            }),
            annotations: BTreeMap::new(),
            urls: vec![],
        };
        let all = [
            d("arm64", Some("v8"), 1),
            d("amd64", Some("v3"), 2),
            d("amd64", None, 3),
        ];
        assert_eq!(select_platform(&all).unwrap().digest, all[2].digest);
        assert_eq!(select_platform(&all[..2]).unwrap().digest, all[1].digest);
        assert!(select_platform(&all[..1]).is_none());
    }

    #[test]
    fn config_nulls_are_empty() {
        let doc = parse_config(
            "x",
            &Digest::of(b""),
            br#"{"architecture":"amd64","os":"linux","config":{"Env":null,"Cmd":["sh"],"Entrypoint":null}}"#,
        )
        .unwrap();
        assert_eq!(doc.config.cmd, vec!["sh".to_string()]);
        assert!(doc.config.env.is_empty() && doc.config.entrypoint.is_empty());
        let e = parse_config(
            "img",
            &Digest::of(b""),
            br#"{"architecture":"arm64","os":"linux"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("linux/arm64"), "{e}");
    }

    #[test]
    fn archive_paths_and_names() {
        assert_eq!(
            archive_path("a/b", "../c/layer.tar").as_deref(),
            Some("a/c/layer.tar")
        );
        assert_eq!(
            archive_path("", "./manifest.json").as_deref(),
            Some("manifest.json")
        );
        assert_eq!(archive_path("a", "../../x"), None);
        let hex = "ab".repeat(32);
        assert!(digest_in_name(&format!("{hex}.json")).is_some());
        assert!(digest_in_name(&format!("blobs/sha256/{hex}")).is_some());
        assert!(digest_in_name("abc/layer.tar").is_none());
    }

    #[test]
    fn media_types_pick_compression() {
        assert_eq!(compression_of(MT_LAYER_GZ, b""), Compression::Gzip);
        assert_eq!(
            compression_of("application/vnd.oci.image.layer.v1.tar+zstd", b""),
            Compression::Zstd
        );
        assert_eq!(
            compression_of("application/vnd.oci.image.layer.v1.tar", b"\x1f\x8b"),
            Compression::None
        );
        assert_eq!(compression_of("", b"\x1f\x8b"), Compression::Gzip);
    }
    const MT_LAYER_GZ: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

    #[tokio::test]
    async fn bad_sources_name_the_reference() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().join("cache")).unwrap();
        let e = pull(
            "oci-layout:/nonexistent/dir",
            &cache,
            &RegistryOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, OciError::Io { .. }), "{e}");
        let e = pull(
            "docker-archive:/nonexistent.tar",
            &cache,
            &RegistryOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string().contains("docker-archive:/nonexistent.tar"),
            "{e}"
        );
        let e = pull("UPPER/Case", &cache, &RegistryOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(e, OciError::BadSource { .. }), "{e}");
    }
}
