//! An update repository kept in an OCI registry (`oci://host/name`).
//!
//! Each repository file is an artifact tagged with its file name (TUF's
//! names, `1.root.json`, `timestamp.json`, `SHA256.kiln-update.json`, are
//! valid tags): an OCI image manifest whose first layer is the file. The
//! manifest target's artifact also lists every chunk it pins as a layer, so
//! a registry's garbage collection keeps them. Chunks are blobs, fetched
//! by digest.

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OCI_IMAGE_MEDIA_TYPE};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tough::{Bytes, Transport, TransportError, TransportErrorKind, TransportStream};
use url::Url;

use crate::manifest::Chunk;
use crate::UpdateError;

/// Media type of a repository file's layer.
const FILE_TYPE: &str = "application/vnd.kiln.update.file.v1";
/// Media type of a chunk's layer.
const CHUNK_TYPE: &str = "application/vnd.kiln.update.chunk.v1";
/// Media type of the (empty) config.
const CONFIG_TYPE: &str = "application/vnd.kiln.update.config.v1+json";

/// A registry repository holding an update repository.
#[derive(Clone)]
pub struct OciRepo {
    client: Client,
    /// `host[:port]/name`.
    name: String,
    auth: RegistryAuth,
}

impl std::fmt::Debug for OciRepo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "oci://{}", self.name)
    }
}

fn oci_err(what: String) -> impl FnOnce(oci_client::errors::OciDistributionError) -> UpdateError {
    move |e| UpdateError::Fetch {
        url: what,
        why: e.to_string(),
    }
}

impl OciRepo {
    /// `name` is `host[:port]/repository`; `plain_http` for registries
    /// without TLS (loopback, or an `oci+http://` source).
    pub fn new(name: &str, plain_http: bool, auth: RegistryAuth) -> Result<OciRepo, UpdateError> {
        let name = name.trim_end_matches('/').to_string();
        let host = name.split('/').next().unwrap_or_default().to_string();
        if !name.contains('/') || host.is_empty() {
            return Err(UpdateError::BadSource(format!(
                "oci://{name}: expected oci://HOST/REPOSITORY"
            )));
        }
        let protocol = if plain_http {
            ClientProtocol::HttpsExcept(vec![host])
        } else {
            ClientProtocol::Https
        };
        Ok(OciRepo {
            client: Client::new(ClientConfig {
                protocol,
                ..Default::default()
            }),
            name,
            auth,
        })
    }

    fn reference(&self, at: &str) -> Result<Reference, UpdateError> {
        let text = if at.starts_with("sha256:") {
            format!("{}@{at}", self.name)
        } else {
            format!("{}:{at}", self.name)
        };
        text.parse()
            .map_err(|e| UpdateError::BadSource(format!("{text}: {e}")))
    }

    /// The file tagged `tag`, if any.
    pub async fn get_file(&self, tag: &str) -> Result<Option<Vec<u8>>, UpdateError> {
        let r = self.reference(tag)?;
        let what = format!("oci://{}:{tag}", self.name);
        let pulled = self
            .client
            .pull_manifest_raw(&r, &self.auth, &[OCI_IMAGE_MEDIA_TYPE])
            .await;
        let raw = match pulled {
            Ok((raw, _)) => raw,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(oci_err(what)(e)),
        };
        let m: OciImageManifest = serde_json::from_slice(&raw).map_err(|e| UpdateError::Fetch {
            url: what.clone(),
            why: format!("not an OCI image manifest: {e}"),
        })?;
        let layer = m.layers.first().ok_or_else(|| UpdateError::Fetch {
            url: what.clone(),
            why: "its manifest has no layer".into(),
        })?;
        self.blob(layer).await.map(Some)
    }

    async fn blob(&self, d: &OciDescriptor) -> Result<Vec<u8>, UpdateError> {
        let r = self.reference(&d.digest)?;
        let mut out = Vec::new();
        // oci-client checks the digest as it reads.
        self.client
            .pull_blob(&r, d, &mut out)
            .await
            .map_err(oci_err(format!("oci://{}@{}", self.name, d.digest)))?;
        Ok(out)
    }

    /// A chunk's bytes (checked against its digest).
    pub async fn get_chunk(&self, sha256: &str) -> Result<Vec<u8>, UpdateError> {
        self.blob(&descriptor(CHUNK_TYPE, sha256, 0)).await
    }

    /// Whether the registry holds the chunk.
    pub async fn has_chunk(&self, sha256: &str) -> Result<bool, UpdateError> {
        let r = self.reference(&format!("sha256:{sha256}"))?;
        self.client
            .store_auth_if_needed(r.resolve_registry(), &self.auth)
            .await;
        self.client
            .blob_exists(&r, &format!("sha256:{sha256}"))
            .await
            .map_err(oci_err(format!("oci://{}@sha256:{sha256}", self.name)))
    }

    /// Uploads a chunk.
    pub async fn put_chunk(&self, sha256: &str, data: &[u8]) -> Result<(), UpdateError> {
        self.put_blob(&format!("sha256:{sha256}"), data).await
    }

    async fn put_blob(&self, digest: &str, data: &[u8]) -> Result<(), UpdateError> {
        let r = self.reference(digest)?;
        self.client
            .push_blob(&r, Bytes::copy_from_slice(data), digest)
            .await
            .map_err(oci_err(format!("pushing oci://{}@{digest}", self.name)))?;
        Ok(())
    }

    /// Tags `data` as `tag`, its artifact also listing `chunks`.
    pub async fn put_file(
        &self,
        tag: &str,
        data: &[u8],
        chunks: &[Chunk],
    ) -> Result<(), UpdateError> {
        use sha2::Digest;
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)));
        self.put_blob(&digest, data).await?;
        let config = b"{}";
        let config_digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(config)));
        self.put_blob(&config_digest, config).await?;
        let mut layers = vec![descriptor(FILE_TYPE, &digest, data.len())];
        let mut seen = std::collections::HashSet::new();
        for c in chunks {
            if seen.insert(&c.sha256) {
                layers.push(descriptor(
                    CHUNK_TYPE,
                    &format!("sha256:{}", c.sha256),
                    c.len as usize,
                ));
            }
        }
        let manifest = OciImageManifest {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_MEDIA_TYPE.into()),
            config: descriptor(CONFIG_TYPE, &config_digest, config.len()),
            layers,
            ..Default::default()
        };
        let r = self.reference(tag)?;
        self.client
            .push_manifest(&r, &manifest.into())
            .await
            .map_err(oci_err(format!("pushing oci://{}:{tag}", self.name)))?;
        Ok(())
    }
}

fn descriptor(media_type: &str, digest: &str, len: usize) -> OciDescriptor {
    let digest = if digest.starts_with("sha256:") {
        digest.to_string()
    } else {
        format!("sha256:{digest}")
    };
    OciDescriptor {
        media_type: media_type.into(),
        digest,
        size: i64::try_from(len).unwrap_or(i64::MAX),
        ..Default::default()
    }
}

fn not_found(e: &oci_client::errors::OciDistributionError) -> bool {
    use oci_client::errors::OciDistributionError as E;
    match e {
        E::ImageManifestNotFoundError(_) => true,
        E::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                oci_client::errors::OciErrorCode::ManifestUnknown
                    | oci_client::errors::OciErrorCode::NameUnknown
            )
        }),
        E::ServerError { code, .. } => *code == 404,
        _ => false,
    }
}

#[tough::async_trait]
impl Transport for OciRepo {
    /// `oci://host/name/metadata/FILE` and `.../targets/FILE` are the tag
    /// `FILE`; `.../chunks/SHA256` the blob.
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        let file = url
            .path_segments()
            .and_then(|mut s| s.next_back())
            .unwrap_or_default()
            .to_string();
        let is_chunk = url.path().contains("/chunks/");
        let got = if is_chunk {
            self.get_chunk(&file).await.map(Some)
        } else {
            self.get_file(&file).await
        };
        match got {
            Ok(Some(data)) => Ok(Box::pin(futures::stream::once(async move {
                Ok(Bytes::from(data))
            }))),
            Ok(None) => Err(TransportError::new(TransportErrorKind::FileNotFound, url)),
            Err(e) => Err(TransportError::new_with_cause(
                TransportErrorKind::Other,
                url,
                e.to_string(),
            )),
        }
    }
}
