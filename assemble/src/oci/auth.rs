//! Registry credentials from the docker config file.

use super::*;

/// Credentials for `registry` from the docker config file, if any.
pub fn docker_auth(registry: &str) -> oci_client::secrets::RegistryAuth {
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
pub(super) fn auth_from_docker_config(
    data: &[u8],
    registry: &str,
) -> oci_client::secrets::RegistryAuth {
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
