//! `oci::pull` from a local registry, an OCI layout and a docker archive.

use kiln_assemble::cache::{Cache, Digest};
use kiln_assemble::layers;
use kiln_assemble::oci::{self, OciError};
use kiln_formats::tree::{Node, Tree};
use kiln_tests::images::{self, Entry, TestImage};
use kiln_tests::registry::Registry;
use std::path::Path;

fn base_image() -> TestImage {
    let mut base = vec![
        Entry::dir("etc", 0o755),
        Entry::file("etc/os-release", "ID=test\n", 0o644),
        Entry::file("etc/gone", "x", 0o644),
    ];
    // busybox-static when installed, else a stand-in: the sources do not care.
    base.extend(images::busybox_entries().unwrap_or_else(|| {
        vec![
            Entry::file("bin/busybox", "#!fake", 0o755),
            Entry::symlink("bin/sh", "busybox"),
        ]
    }));
    let top = vec![
        Entry::file("etc/.wh.gone", "", 0o644),
        Entry::file("app/run", "run", 0o755),
        Entry::hardlink("app/run2", "app/run"),
    ];
    let mut img = TestImage::new(vec![images::layer_tar(&base), images::layer_tar(&top)]);
    img.env = vec!["PATH=/bin".into(), "A=b".into()];
    img.entrypoint = vec!["/bin/sh".into(), "-c".into()];
    img.cmd = vec!["echo hi".into()];
    img.working_dir = "/app".into();
    img.user = "1000:1000".into();
    img
}

fn tree_of(img: &oci::Image) -> Tree {
    let mut t = Tree::new();
    for l in &img.layers {
        layers::apply(&mut t, l).unwrap();
    }
    t
}

fn check_image(img: &oci::Image) {
    assert_eq!(img.config.env, vec!["PATH=/bin", "A=b"]);
    assert_eq!(img.config.entrypoint, vec!["/bin/sh", "-c"]);
    assert_eq!(img.config.cmd, vec!["echo hi"]);
    assert_eq!(img.config.working_dir, "/app");
    assert_eq!(img.config.user, "1000:1000");
    assert_eq!(img.layers.len(), 2);
    let t = tree_of(img);
    assert!(matches!(
        t.get(Path::new("/etc/os-release")),
        Some(Node::File { .. })
    ));
    assert!(t.get(Path::new("/etc/gone")).is_none());
    assert!(matches!(
        t.get(Path::new("/bin/sh")),
        Some(Node::Symlink { .. })
    ));
    assert!(matches!(
        t.get(Path::new("/app/run2")),
        Some(Node::File { .. })
    ));
}

fn digest(s: &str) -> Digest {
    s.parse().unwrap()
}

#[tokio::test]
async fn registry_pull_index_and_cache() {
    let Some(mut reg) = Registry::start() else {
        return;
    };
    let host = reg.host();
    let work = tempfile::tempdir().unwrap();
    let cache = Cache::open(work.path().join("cache")).unwrap();

    // Single-arch image by tag.
    let img = base_image();
    let manifest = img.push(&host, "test/app", "1").await;
    let source = format!("{host}/test/app:1");
    let pulled = oci::pull(&source, &cache, &Default::default())
        .await
        .unwrap();
    assert_eq!(pulled.manifest_digest, digest(&manifest));
    assert_eq!(pulled.reference, source);
    check_image(&pulled);

    // A wrong pinned digest is refused and named.
    let wrong = format!("{host}/test/app:1@sha256:{}", "0".repeat(64));
    let e = oci::pull(&wrong, &cache, &Default::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&wrong), "{e}");

    // Multi-arch index: amd64 is chosen.
    let mut arm = TestImage::new(vec![images::layer_tar(&[Entry::file(
        "arch", "arm64", 0o644,
    )])]);
    arm.architecture = "arm64".into();
    let amd = TestImage::new(vec![images::layer_tar(&[Entry::file(
        "arch", "amd64", 0o644,
    )])]);
    let index = images::push_index(&host, "test/multi", "latest", &[&arm, &amd]).await;
    let multi = oci::pull(
        &format!("{host}/test/multi:latest"),
        &cache,
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(multi.manifest_digest, digest(&index));
    let t = tree_of(&multi);
    match t.get(Path::new("/arch")) {
        Some(Node::File { data, .. }) => assert_eq!(&data.bytes().unwrap()[..], b"amd64"),
        other => panic!("{other:?}"),
    }

    // With the registry gone, digest-pinned pulls come from the cache.
    reg.stop();
    let again = oci::pull(
        &format!("{host}/test/app@{manifest}"),
        &cache,
        &Default::default(),
    )
    .await
    .unwrap();
    check_image(&again);
    assert_eq!(again.layers[0].digest, pulled.layers[0].digest);
    let multi2 = oci::pull(
        &format!("{host}/test/multi:latest@{index}"),
        &cache,
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(multi2.layers[0].digest, multi.layers[0].digest);
    // ...but a tag needs the registry.
    let e = oci::pull(&source, &cache, &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(e, OciError::Registry { .. }), "{e}");
}

#[tokio::test]
async fn oci_layout_pull_and_tamper() {
    let work = tempfile::tempdir().unwrap();
    let cache = Cache::open(work.path().join("cache")).unwrap();
    let dir = work.path().join("layout");
    let img = base_image();
    let manifest = img.write_oci_layout(&dir, "v1");

    let by_tag = oci::pull(
        &format!("oci-layout:{}:v1", dir.display()),
        &cache,
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(by_tag.manifest_digest, digest(&manifest));
    check_image(&by_tag);
    // The only manifest is picked without a tag.
    let only = oci::pull(
        &format!("oci-layout:{}", dir.display()),
        &cache,
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(only.manifest_digest, by_tag.manifest_digest);
    let e = oci::pull(
        &format!("oci-layout:{}:nope", dir.display()),
        &cache,
        &Default::default(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");

    // Tamper with the top layer: the pull fails naming that blob.
    let layer = by_tag.layers[1].digest;
    let path = dir.join("blobs/sha256").join(layer.hex());
    let mut data = std::fs::read(&path).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(&path, data).unwrap();
    let source = format!("oci-layout:{}:v1", dir.display());
    let e = oci::pull(&source, &cache, &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(e, OciError::Mismatch { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&source) && msg.contains(&layer.to_string()),
        "{msg}"
    );
}

#[tokio::test]
async fn oci_layout_multi_arch_index() {
    let work = tempfile::tempdir().unwrap();
    let cache = Cache::open(work.path().join("cache")).unwrap();
    let dir = work.path().join("layout");
    let mut arm = TestImage::new(vec![images::layer_tar(&[Entry::file(
        "arch", "arm64", 0o644,
    )])]);
    arm.architecture = "arm64".into();
    let amd = TestImage::new(vec![images::layer_tar(&[Entry::file(
        "arch", "amd64", 0o644,
    )])]);
    let (a, b) = (arm.blobs(), amd.blobs());
    let index = images::index_json(&[(&a.manifest, "arm64"), (&b.manifest, "amd64")]);
    let mut blobs = vec![
        index.clone(),
        a.manifest.clone(),
        b.manifest.clone(),
        a.config,
        b.config,
    ];
    blobs.extend(a.layers);
    blobs.extend(b.layers);
    images::write_layout(
        &dir,
        &blobs,
        &[(images::MT_OCI_INDEX, &index, Some("multi"), None)],
    );
    let img = oci::pull(
        &format!("oci-layout:{}:multi", dir.display()),
        &cache,
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(img.manifest_digest, digest(&images::sha256(&index)));
    match tree_of(&img).get(Path::new("/arch")) {
        Some(Node::File { data, .. }) => assert_eq!(&data.bytes().unwrap()[..], b"amd64"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn docker_archive_pull_and_diff_ids() {
    let work = tempfile::tempdir().unwrap();
    let cache = Cache::open(work.path().join("cache")).unwrap();
    let file = work.path().join("image.tar");
    let mut img = base_image();
    // A repeated layer is stored once and symlinked, as docker save does.
    let again = img.layers[1].clone();
    img.layers.push(again);
    img.write_docker_archive(&file, "test/app:1");
    let pulled = oci::pull(
        &format!("docker-archive:{}", file.display()),
        &cache,
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(pulled.layers.len(), 3);
    assert_eq!(
        pulled.manifest_digest,
        digest(&images::sha256(&img.config_json()))
    );
    let named = oci::pull(
        &format!("docker-archive:{}:test/app:1", file.display()),
        &cache,
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(named.manifest_digest, pulled.manifest_digest);

    // A config whose diff_ids do not match the layers is refused.
    let mut bad = base_image();
    let good_layers = bad.layers.clone();
    bad.layers[1] = images::layer_tar(&[Entry::file("other", "x", 0o644)]);
    let config = bad.config_json();
    bad.layers = good_layers;
    let bad_file = work.path().join("bad.tar");
    write_archive_with_config(&bad_file, &bad, &config);
    let e = oci::pull(
        &format!("docker-archive:{}", bad_file.display()),
        &cache,
        &Default::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, OciError::Mismatch { .. }), "{e}");
    assert!(e.to_string().contains("diff_ids"), "{e}");
}

/// A docker archive of `img`'s layers but an arbitrary config.
fn write_archive_with_config(file: &Path, img: &TestImage, config: &[u8]) {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    };
    let mut paths = Vec::new();
    for (i, l) in img.layers.iter().enumerate() {
        let p = format!("{i}/layer.tar");
        add(&p, l);
        paths.push(p);
    }
    let config_name = format!("{}.json", &images::sha256(config)[7..]);
    add(&config_name, config);
    let m = serde_json::json!([{"Config": config_name, "RepoTags": [], "Layers": paths}]);
    add("manifest.json", &serde_json::to_vec(&m).unwrap());
    std::fs::write(file, b.into_inner().unwrap()).unwrap();
}

// ---- a registry that requires credentials ----

const USER: &str = "kiln";
const PASSWORD: &str = "s3cret:with-colon";

/// `DOCKER_CONFIG` is process-wide: tests that set it hold this lock, and
/// the guard puts the old value back when dropped.
static ENV_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct DockerConfig {
    old: Option<std::ffi::OsString>,
    _dir: tempfile::TempDir,
    _lock: tokio::sync::MutexGuard<'static, ()>,
}

impl DockerConfig {
    /// Points `DOCKER_CONFIG` at a fresh directory whose config.json is
    /// `config`, or that has no config.json when `None`.
    async fn set(config: Option<serde_json::Value>) -> DockerConfig {
        let lock = ENV_LOCK.lock().await;
        let dir = tempfile::tempdir().unwrap();
        if let Some(c) = config {
            std::fs::write(
                dir.path().join("config.json"),
                serde_json::to_vec(&c).unwrap(),
            )
            .unwrap();
        }
        let old = std::env::var_os("DOCKER_CONFIG");
        std::env::set_var("DOCKER_CONFIG", dir.path());
        DockerConfig {
            old,
            _dir: dir,
            _lock: lock,
        }
    }
}

impl Drop for DockerConfig {
    fn drop(&mut self) {
        match self.old.take() {
            Some(v) => std::env::set_var("DOCKER_CONFIG", v),
            None => std::env::remove_var("DOCKER_CONFIG"),
        }
    }
}

/// `auths.HOST.auth = base64(user:password)`, as `docker login` writes it.
fn auth_config(host: &str, user: &str, password: &str) -> serde_json::Value {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    serde_json::json!({"auths": {host: {"auth": auth}}})
}

/// Pushes `img` as `HOST/REPO:TAG` with `auth`. Returns the manifest digest.
async fn push_as(
    img: &TestImage,
    host: &str,
    repo: &str,
    tag: &str,
    auth: &oci_client::secrets::RegistryAuth,
) -> Result<String, oci_client::errors::OciDistributionError> {
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::HttpsExcept(vec![host.to_string()]),
        ..Default::default()
    });
    let r: oci_client::Reference = format!("{host}/{repo}:{tag}").parse().unwrap();
    client
        .auth(&r, auth, oci_client::RegistryOperation::Push)
        .await?;
    let b = img.blobs();
    for blob in std::iter::once(&b.config).chain(&b.layers) {
        client
            .push_blob(&r, blob.clone(), &images::sha256(blob))
            .await?;
    }
    client
        .push_manifest_raw(
            &r,
            b.manifest.clone(),
            http::HeaderValue::from_static(images::MT_OCI_MANIFEST),
        )
        .await?;
    Ok(b.manifest_digest())
}

fn basic(user: &str, password: &str) -> oci_client::secrets::RegistryAuth {
    oci_client::secrets::RegistryAuth::Basic(user.into(), password.into())
}

#[tokio::test]
async fn auth_registry_pull_with_docker_config() {
    let Some(reg) = Registry::start_with_auth(USER, PASSWORD) else {
        return;
    };
    let host = reg.host();
    let img = base_image();

    // The registry really checks: anonymous and wrong-password pushes fail.
    let anon = oci_client::secrets::RegistryAuth::Anonymous;
    assert!(push_as(&img, &host, "test/app", "1", &anon).await.is_err());
    let wrong = basic(USER, "nope");
    assert!(push_as(&img, &host, "test/app", "1", &wrong).await.is_err());
    let manifest = push_as(&img, &host, "test/app", "1", &basic(USER, PASSWORD))
        .await
        .unwrap_or_else(|e| panic!("authorised push: {e}\n{}", reg.log()));

    let _env = DockerConfig::set(Some(auth_config(&host, USER, PASSWORD))).await;
    let work = tempfile::tempdir().unwrap();
    let cache = Cache::open(work.path().join("cache")).unwrap();
    let source = format!("{host}/test/app:1");
    let pulled = oci::pull(&source, &cache, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", reg.log()));
    assert_eq!(pulled.manifest_digest, digest(&manifest));
    check_image(&pulled);

    // `username`/`password` entries work too; a fresh cache forces the
    // digest-pinned pull to fetch every blob with credentials.
    drop(_env);
    let plain = serde_json::json!({"auths": {format!("http://{host}"): {
        "username": USER, "password": PASSWORD}}});
    let _env = DockerConfig::set(Some(plain)).await;
    let cache2 = Cache::open(work.path().join("cache2")).unwrap();
    let pinned = oci::pull(
        &format!("{host}/test/app@{manifest}"),
        &cache2,
        &Default::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", reg.log()));
    assert_eq!(pinned.layers[1].digest, pulled.layers[1].digest);
}

#[tokio::test]
async fn auth_registry_refuses_missing_or_wrong_credentials() {
    let Some(reg) = Registry::start_with_auth(USER, PASSWORD) else {
        return;
    };
    let host = reg.host();
    let manifest = push_as(
        &base_image(),
        &host,
        "test/app",
        "1",
        &basic(USER, PASSWORD),
    )
    .await
    .unwrap_or_else(|e| panic!("authorised push: {e}\n{}", reg.log()));
    let work = tempfile::tempdir().unwrap();
    let by_tag = format!("{host}/test/app:1");
    let by_digest = format!("{host}/test/app@{manifest}");

    let cases = [
        ("no config.json", None),
        ("wrong password", Some(auth_config(&host, USER, "wrong"))),
        ("unknown user", Some(auth_config(&host, "eve", PASSWORD))),
        (
            "credentials for another registry",
            Some(auth_config("127.0.0.1:1", USER, PASSWORD)),
        ),
    ];
    for (i, (what, config)) in cases.into_iter().enumerate() {
        let _env = DockerConfig::set(config).await;
        // A fresh cache each time, so nothing is served without the registry.
        let cache = Cache::open(work.path().join(format!("cache{i}"))).unwrap();
        for source in [&by_tag, &by_digest] {
            let e = oci::pull(source, &cache, &Default::default())
                .await
                .unwrap_err();
            assert!(matches!(e, OciError::Registry { .. }), "{what}: {e}");
            let msg = e.to_string();
            assert!(msg.starts_with(&format!("{source}: ")), "{what}: {msg}");
            // Refused for want of credentials, not e.g. a connection error.
            assert!(msg.contains("Not authorized"), "{what}: {msg}");
        }
    }
}
