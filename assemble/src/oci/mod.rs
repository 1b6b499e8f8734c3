//! Container image sources resolved to a pinned, verified [`Image`]: one
//! file per kind of source (`registry`, `layout`, `archive`) plus `auth`
//! (credentials from the docker config), the shared resolution here.
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
use crate::layers::{Compression, Layer, LayerData};
use serde::{Deserialize, Deserializer};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

mod archive;
mod auth;
pub use auth::docker_auth;
mod layout;
mod registry;
pub use registry::is_loopback;

use archive::pull_docker_archive;
use layout::{layout_top, pull_layout, split_layout};
use registry::{pull_registry, record_served, registry_digest, registry_err, was_served};

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

/// The runtime part (`config` object) of an OCI/Docker image config, as
/// kiln uses it: unset (or `null`) lists and strings are empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// Environment, as `KEY=value`.
    pub env: Vec<String>,
    /// Entrypoint argv; empty if unset.
    pub entrypoint: Vec<String>,
    /// Default arguments (or command, without an entrypoint).
    pub cmd: Vec<String>,
    /// Working directory; empty if unset.
    pub working_dir: String,
    /// User, as `user[:group]` by name or id; empty if unset.
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

// ---- JSON documents: oci-spec's types (Docker's v2 schema 2 parses as them) ----

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};

/// A manifest document: an image manifest, or an index of them (an OCI
/// index or a Docker manifest list).
enum ManifestDoc {
    Index(Box<ImageIndex>),
    Manifest(Box<ImageManifest>),
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
                ..
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
                let fetching = format!("{what} {digest}");
                self.ready_to_fetch(reference, &fetching).await?;
                let reg_err = |e: oci_client::errors::OciDistributionError| {
                    registry_err(reference, &format!("fetching {fetching}"), &e)
                };
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

impl Store<'_> {
    /// Before fetching `what` from a registry: refused offline, and blob
    /// requests carry the token a manifest request got (when the manifest
    /// came from the cache, one is got first).
    async fn ready_to_fetch(&self, reference: &str, what: &str) -> Result<(), OciError> {
        let Store::Registry {
            client,
            reference: r,
            auth,
            offline,
            authed,
            ..
        } = self
        else {
            return Ok(());
        };
        if *offline {
            return Err(OciError::Offline {
                reference: reference.to_string(),
                what: what.to_string(),
            });
        }
        if !authed.swap(true, std::sync::atomic::Ordering::Relaxed) {
            client
                .auth(r, auth, oci_client::RegistryOperation::Pull)
                .await
                .map_err(|e| registry_err(reference, &format!("fetching {what}"), &e))?;
        }
        Ok(())
    }

    /// Where the layer blob `digest` is, and its first bytes (to tell its
    /// compression). Not read whole: a registry's blob streams into the
    /// cache while it is hashed, and every blob is checked against its
    /// digest again when it is unpacked.
    async fn layer(
        &self,
        reference: &str,
        digest: &Digest,
    ) -> Result<(LayerData, Vec<u8>), OciError> {
        let path = match self {
            Store::Layout { dir } => {
                // The user's files: checked now, streaming, so a tampered
                // layout fails the pull as a registry's blob would.
                let path = dir.join("blobs").join("sha256").join(digest.hex());
                let actual = std::fs::File::open(&path)
                    .and_then(|f| crate::cache::Hashing::new(std::io::BufReader::new(f)).finish())
                    .map_err(|source| OciError::Io {
                        reference: reference.to_string(),
                        path: path.clone(),
                        source,
                    })?;
                if actual != *digest {
                    return Err(OciError::Mismatch {
                        reference: reference.to_string(),
                        what: "layer".into(),
                        expected: *digest,
                        actual,
                    });
                }
                path
            }
            Store::Registry {
                client,
                reference: r,
                cache,
                ..
            } => {
                let cache_err = |source| OciError::Cache {
                    reference: reference.to_string(),
                    source,
                };
                let path = cache.blob_path(digest);
                if !path.is_file() {
                    let what = format!("layer {digest}");
                    self.ready_to_fetch(reference, &what).await?;
                    let reg_err = |e: oci_client::errors::OciDistributionError| {
                        registry_err(reference, &format!("fetching {what}"), &e)
                    };
                    let mut out = AsyncBlob(cache.blob_writer().map_err(cache_err)?);
                    client
                        .pull_blob(r, digest.to_string().as_str(), &mut out)
                        .await
                        .map_err(reg_err)?;
                    out.0.commit(Some(digest)).map_err(|e| match e {
                        crate::cache::CacheError::Mismatch { expected, actual } => {
                            OciError::Mismatch {
                                reference: reference.to_string(),
                                what: "layer".into(),
                                expected,
                                actual,
                            }
                        }
                        e => cache_err(e),
                    })?;
                }
                path
            }
        };
        let io = |source| OciError::Io {
            reference: reference.to_string(),
            path: path.clone(),
            source,
        };
        let mut file = std::fs::File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut head = Vec::with_capacity(8);
        std::io::Read::read_to_end(&mut std::io::Read::take(&mut file, 8), &mut head)
            .map_err(io)?;
        Ok((LayerData::file(path.clone(), len), head))
    }
}

/// A cache blob written by an async producer: writes go straight to the
/// file (page cache), which is as fast as a task switch.
struct AsyncBlob(crate::cache::BlobWriter);

impl tokio::io::AsyncWrite for AsyncBlob {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(std::io::Write::write(&mut self.0, buf))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(std::io::Write::flush(&mut self.0))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.poll_flush(cx)
    }
}

const MANIFEST_TYPES: &[&str] = &[
    MT_OCI_INDEX,
    MT_DOCKER_LIST,
    MT_OCI_MANIFEST,
    MT_DOCKER_MANIFEST,
];

fn parse_manifest(reference: &str, digest: &Digest, data: &[u8]) -> Result<ManifestDoc, OciError> {
    let invalid = |message: String| OciError::Invalid {
        reference: reference.to_string(),
        what: "manifest".into(),
        digest: *digest,
        message,
    };
    let doc: serde_json::Value =
        serde_json::from_slice(data).map_err(|e| invalid(format!("bad JSON: {e}")))?;
    let schema_version = doc.get("schemaVersion").and_then(|v| v.as_u64());
    if schema_version != Some(2) {
        return Err(invalid(format!(
            "schemaVersion {schema_version:?} is not supported (only 2)"
        )));
    }
    if doc.get("manifests").is_some() {
        serde_json::from_value(doc)
            .map(|i| ManifestDoc::Index(Box::new(i)))
            .map_err(|e| invalid(format!("not an image index: {e}")))
    } else {
        serde_json::from_value(doc)
            .map(|m| ManifestDoc::Manifest(Box::new(m)))
            .map_err(|e| invalid(format!("not an image manifest: {e}")))
    }
}

/// Picks the target's linux entry of an index (a plain or `v1` variant
/// first).
fn select_platform(entries: &[Descriptor]) -> Option<&Descriptor> {
    let target = |d: &&Descriptor| {
        d.platform().as_ref().is_some_and(|p| {
            p.os().to_string() == "linux" && p.architecture().to_string() == crate::arch::TARGET.oci
        })
    };
    let plain = |d: &&Descriptor| {
        d.platform()
            .as_ref()
            .is_some_and(|p| matches!(p.variant().as_deref(), None | Some("") | Some("v1")))
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
    let s = desc.size();
    if s == len as u64 {
        return Ok(());
    }
    Err(OciError::Invalid {
        reference: reference.to_string(),
        what: what.to_string(),
        digest: *digest,
        message: format!("size {len} differs from the descriptor's {s}"),
    })
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
        let ManifestDoc::Index(index) = &doc else {
            break;
        };
        let entry = select_platform(index.manifests()).ok_or_else(|| OciError::Invalid {
            reference: reference.to_string(),
            what: "index".into(),
            digest,
            message: format!("no linux/{} manifest", crate::arch::TARGET.oci),
        })?;
        let d = parse_digest(reference, "manifest", entry.digest().as_ref())?;
        let data = store.get(reference, "manifest", &d, true).await?;
        check_size(reference, "manifest", entry, &d, data.len())?;
        digest = d;
        doc = parse_manifest(reference, &digest, &data)?;
    }
    let manifest = match doc {
        ManifestDoc::Manifest(m) => m,
        ManifestDoc::Index(_) => {
            return Err(OciError::Invalid {
                reference: reference.to_string(),
                what: "index".into(),
                digest,
                message: "indexes nested too deeply".into(),
            })
        }
    };
    let invalid = |message: &str| OciError::Invalid {
        reference: reference.to_string(),
        what: "manifest".into(),
        digest,
        message: message.to_string(),
    };
    if let Some(mt) = manifest.media_type() {
        let mt = mt.to_string();
        if mt != MT_OCI_MANIFEST && mt != MT_DOCKER_MANIFEST {
            return Err(invalid(&format!("unsupported media type {mt}")));
        }
    }
    let config_desc = manifest.config();
    let layer_descs = manifest.layers();

    let config_digest = parse_digest(reference, "config", config_desc.digest().as_ref())?;
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
    let (_, config) = parse_config(reference, &config_digest, &config_data)?;

    let mut layers = Vec::with_capacity(layer_descs.len());
    for desc in layer_descs {
        let d = parse_digest(reference, "layer", desc.digest().as_ref())?;
        if desc.urls().as_ref().is_some_and(|u| !u.is_empty()) {
            return Err(OciError::Invalid {
                reference: reference.to_string(),
                what: "layer".into(),
                digest: d,
                message: "foreign layers (with urls) are not supported".into(),
            });
        }
        let (data, head) = store.layer(reference, &d).await?;
        let len = usize::try_from(data.len()).unwrap_or(usize::MAX);
        check_size(reference, "layer", desc, &d, len)?;
        layers.push(Layer {
            source: reference.to_string(),
            digest: d,
            compression: compression_of(desc.media_type().as_ref(), &head),
            data,
        });
    }
    Ok(Image {
        reference: reference.to_string(),
        manifest_digest: top_digest,
        config,
        layers,
    })
}

/// A verified config blob, parsed, checked to be for the target, and its
/// runtime part.
fn parse_config(
    reference: &str,
    digest: &Digest,
    data: &[u8],
) -> Result<(ImageConfiguration, ImageConfig), OciError> {
    let invalid = |message: String| OciError::Invalid {
        reference: reference.to_string(),
        what: "config".into(),
        digest: *digest,
        message,
    };
    let doc: ImageConfiguration =
        serde_json::from_slice(data).map_err(|e| invalid(format!("bad JSON: {e}")))?;
    let (os, arch) = (doc.os().to_string(), doc.architecture().to_string());
    let want = crate::arch::TARGET.oci;
    if os != "linux" || arch != want {
        return Err(invalid(format!(
            "image is for {os}/{arch}, not linux/{want}"
        )));
    }
    let c = doc.config().clone().unwrap_or_default();
    let runtime = ImageConfig {
        env: c.env().clone().unwrap_or_default(),
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        working_dir: c.working_dir().clone().unwrap_or_default(),
        user: c.user().clone().unwrap_or_default(),
    };
    Ok((doc, runtime))
}

#[cfg(test)]
mod tests {
    use super::archive::{archive_path, digest_in_name};
    use super::auth::auth_from_docker_config;
    use super::registry::is_loopback;
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
        let d = |arch: &str, variant: Option<&str>, n: u8| -> Descriptor {
            let mut platform = serde_json::json!({"architecture": arch, "os": "linux"});
            if let Some(v) = variant {
                platform["variant"] = v.into();
            }
            serde_json::from_value(serde_json::json!({
                "mediaType": MT_OCI_MANIFEST,
                "digest": format!("sha256:{}", hex::encode([n; 32])),
                "size": 1,
                "platform": platform,
            }))
            .unwrap()
        };
        let all = [
            d("arm64", Some("v8"), 1),
            d("amd64", Some("v3"), 2),
            d("amd64", None, 3),
        ];
        assert_eq!(select_platform(&all).unwrap().digest(), all[2].digest());
        assert_eq!(
            select_platform(&all[..2]).unwrap().digest(),
            all[1].digest()
        );
        assert!(select_platform(&all[..1]).is_none());
    }

    #[test]
    fn config_nulls_are_empty() {
        let (_, config) = parse_config(
            "x",
            &Digest::of(b""),
            br#"{"architecture":"amd64","os":"linux","config":{"Env":null,"Cmd":["sh"],"Entrypoint":null},"rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        assert_eq!(config.cmd, vec!["sh".to_string()]);
        assert!(config.env.is_empty() && config.entrypoint.is_empty());
        let e = parse_config(
            "img",
            &Digest::of(b""),
            br#"{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("linux/arm64"), "{e}");
        // The spec requires rootfs: a config without it is refused.
        let e = parse_config(
            "img",
            &Digest::of(b""),
            br#"{"architecture":"amd64","os":"linux"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("rootfs"), "{e}");
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
