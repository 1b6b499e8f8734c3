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
    let pulled = oci::pull(&source, &cache).await.unwrap();
    assert_eq!(pulled.manifest_digest, digest(&manifest));
    assert_eq!(pulled.reference, source);
    check_image(&pulled);

    // A wrong pinned digest is refused and named.
    let wrong = format!("{host}/test/app:1@sha256:{}", "0".repeat(64));
    let e = oci::pull(&wrong, &cache).await.unwrap_err();
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
    let multi = oci::pull(&format!("{host}/test/multi:latest"), &cache)
        .await
        .unwrap();
    assert_eq!(multi.manifest_digest, digest(&index));
    let t = tree_of(&multi);
    match t.get(Path::new("/arch")) {
        Some(Node::File { data, .. }) => assert_eq!(&data[..], b"amd64"),
        other => panic!("{other:?}"),
    }

    // With the registry gone, digest-pinned pulls come from the cache.
    reg.stop();
    let again = oci::pull(&format!("{host}/test/app@{manifest}"), &cache)
        .await
        .unwrap();
    check_image(&again);
    assert_eq!(again.layers[0].digest, pulled.layers[0].digest);
    let multi2 = oci::pull(&format!("{host}/test/multi:latest@{index}"), &cache)
        .await
        .unwrap();
    assert_eq!(multi2.layers[0].digest, multi.layers[0].digest);
    // ...but a tag needs the registry.
    let e = oci::pull(&source, &cache).await.unwrap_err();
    assert!(matches!(e, OciError::Registry { .. }), "{e}");
}

#[tokio::test]
async fn oci_layout_pull_and_tamper() {
    let work = tempfile::tempdir().unwrap();
    let cache = Cache::open(work.path().join("cache")).unwrap();
    let dir = work.path().join("layout");
    let img = base_image();
    let manifest = img.write_oci_layout(&dir, "v1");

    let by_tag = oci::pull(&format!("oci-layout:{}:v1", dir.display()), &cache)
        .await
        .unwrap();
    assert_eq!(by_tag.manifest_digest, digest(&manifest));
    check_image(&by_tag);
    // The only manifest is picked without a tag.
    let only = oci::pull(&format!("oci-layout:{}", dir.display()), &cache)
        .await
        .unwrap();
    assert_eq!(only.manifest_digest, by_tag.manifest_digest);
    let e = oci::pull(&format!("oci-layout:{}:nope", dir.display()), &cache)
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
    let e = oci::pull(&source, &cache).await.unwrap_err();
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
    let img = oci::pull(&format!("oci-layout:{}:multi", dir.display()), &cache)
        .await
        .unwrap();
    assert_eq!(img.manifest_digest, digest(&images::sha256(&index)));
    match tree_of(&img).get(Path::new("/arch")) {
        Some(Node::File { data, .. }) => assert_eq!(&data[..], b"amd64"),
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
    let pulled = oci::pull(&format!("docker-archive:{}", file.display()), &cache)
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
    let e = oci::pull(&format!("docker-archive:{}", bad_file.display()), &cache)
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
