//! Registries: the OCI distribution API through oci-client, plain HTTP
//! only for loopback and hosts named insecure.

use super::auth::docker_auth;
use super::*;

/// What a registry reference's tag (or pinned digest) names.
pub(super) async fn registry_digest(
    source: &str,
    cache: &Cache,
    opts: &RegistryOptions,
) -> Result<Digest, OciError> {
    let (client, reference, auth) = registry_client(source, opts)?;
    tag_digest(&client, &reference, &auth, source, cache, opts).await
}

/// What `reference` names, asking the registry through `client` (which
/// then holds any token the registry issued).
pub(super) async fn tag_digest(
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

pub(super) fn registry_err(reference: &str, what: &str, e: &dyn std::error::Error) -> OciError {
    OciError::Registry {
        reference: reference.to_string(),
        message: format!("{what}: {}", crate::error_chain(e)),
    }
}

/// Cache record: `reference`'s repository served manifest `digest`. A
/// digest pinned for one repository is not served from the cache because
/// another repository had it.
pub(super) fn served_key(reference: &oci_client::Reference) -> String {
    format!(
        "{}/{}",
        reference.resolve_registry(),
        reference.repository()
    )
}

pub(super) fn record_served(cache: &Cache, reference: &oci_client::Reference, digest: &Digest) {
    // Only an optimisation for later offline use: failing to record is harmless.
    let _ = cache.write_ref(
        "served",
        &format!("{}@{digest}", served_key(reference)),
        "1",
    );
}

pub(super) fn was_served(
    cache: &Cache,
    reference: &oci_client::Reference,
    digest: &Digest,
) -> bool {
    cache
        .read_ref("served", &format!("{}@{digest}", served_key(reference)))
        .is_some()
}

/// Loopback registries (tests, local mirrors) speak plain HTTP.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.split(':').next().unwrap_or("")
    };
    matches!(host, "localhost" | "::1") || host.starts_with("127.")
}

/// A client for `source`'s registry: plain HTTP for loopback and the
/// hosts named insecure, credentials from the docker config.
pub(super) fn registry_client(
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

pub(super) async fn pull_registry(
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
