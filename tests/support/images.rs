//! Small test images built in Rust, written as a registry push, an OCI
//! image layout directory, or a `docker save` archive.
//!
//! Everything is deterministic: mtime 0, root ownership, sorted JSON keys.

use sha2::{Digest as _, Sha256};
use std::io::Write;
use std::path::Path;

/// Media type of an OCI image index.
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image manifest.
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image config.
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of a gzip-compressed OCI layer.
pub const MT_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// One entry of a test layer.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A regular file.
    File {
        /// Path in the layer.
        path: String,
        /// File contents.
        data: Vec<u8>,
        /// Permission bits.
        mode: u32,
    },
    /// A directory.
    Dir {
        /// Path in the layer.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// A symbolic link.
    Symlink {
        /// Path in the layer.
        path: String,
        /// Link target.
        target: String,
    },
    /// A hard link to an earlier entry.
    Hardlink {
        /// Path in the layer.
        path: String,
        /// Path of the entry linked to.
        target: String,
    },
}

impl Entry {
    /// A regular file with contents `data`.
    pub fn file(path: &str, data: impl Into<Vec<u8>>, mode: u32) -> Entry {
        Entry::File {
            path: path.into(),
            data: data.into(),
            mode,
        }
    }
    /// A directory.
    pub fn dir(path: &str, mode: u32) -> Entry {
        Entry::Dir {
            path: path.into(),
            mode,
        }
    }
    /// A symbolic link to `target`.
    pub fn symlink(path: &str, target: &str) -> Entry {
        Entry::Symlink {
            path: path.into(),
            target: target.into(),
        }
    }
    /// A hard link to the entry at `target`.
    pub fn hardlink(path: &str, target: &str) -> Entry {
        Entry::Hardlink {
            path: path.into(),
            target: target.into(),
        }
    }
}

/// An uncompressed layer tar holding `entries` in order.
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        match e {
            Entry::File { path, data, mode } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, &data[..]).expect("tar file");
            }
            Entry::Dir { path, mode } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                b.append_data(&mut h, path, &[][..]).expect("tar dir");
            }
            Entry::Symlink { path, target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                b.append_link(&mut h, path, target).expect("tar symlink");
            }
            Entry::Hardlink { path, target } => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                b.append_link(&mut h, path, target).expect("tar hardlink");
            }
        }
    }
    b.into_inner().expect("tar")
}

/// Entries for every regular file, directory and symlink under `dir`,
/// sorted, with paths relative to it.
pub fn entries_from_dir(dir: &Path) -> std::io::Result<Vec<Entry>> {
    use std::os::unix::fs::PermissionsExt;
    fn go(root: &Path, dir: &Path, out: &mut Vec<Entry>) -> std::io::Result<()> {
        let mut names: Vec<_> = std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for p in names {
            let rel = p
                .strip_prefix(root)
                .expect("below root")
                .to_string_lossy()
                .into_owned();
            let md = std::fs::symlink_metadata(&p)?;
            let mode = md.permissions().mode() & 0o7777;
            if md.file_type().is_symlink() {
                let t = std::fs::read_link(&p)?;
                out.push(Entry::symlink(&rel, &t.to_string_lossy()));
            } else if md.is_dir() {
                out.push(Entry::dir(&rel, mode));
                go(root, &p, out)?;
            } else if md.is_file() {
                out.push(Entry::file(&rel, std::fs::read(&p)?, mode));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    go(dir, dir, &mut out)?;
    Ok(out)
}

/// A layer with busybox-static's `/bin/busybox` plus `sh`/`ls`/`cat`/`echo`
/// symlinks, or `None` if busybox-static is not installed.
pub fn busybox_entries() -> Option<Vec<Entry>> {
    let data = std::fs::read("/bin/busybox").ok()?;
    let mut v = vec![
        Entry::dir("bin", 0o755),
        Entry::file("bin/busybox", data, 0o755),
    ];
    for applet in ["cat", "echo", "ls", "sh", "sleep"] {
        v.push(Entry::symlink(&format!("bin/{applet}"), "busybox"));
    }
    Some(v)
}

/// `data` gzip-compressed (fast level).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).expect("gzip");
    gz.finish().expect("gzip")
}

/// An image being put together for a test.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// Config `architecture` (default `amd64`).
    pub architecture: String,
    /// Config `Env`, as `KEY=value`.
    pub env: Vec<String>,
    /// Config `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// Config `Cmd`.
    pub cmd: Vec<String>,
    /// Config `WorkingDir`.
    pub working_dir: String,
    /// Config `User`.
    pub user: String,
    /// Uncompressed layer tars, bottom first.
    pub layers: Vec<Vec<u8>>,
}

/// The serialised pieces of a [`TestImage`] (layers gzip-compressed).
#[derive(Debug, Clone)]
pub struct Blobs {
    /// The config JSON.
    pub config: Vec<u8>,
    /// Layers, gzip-compressed, bottom first.
    pub layers: Vec<Vec<u8>>,
    /// The OCI manifest JSON.
    pub manifest: Vec<u8>,
}

impl Blobs {
    /// `sha256:<hex>` of the manifest.
    pub fn manifest_digest(&self) -> String {
        sha256(&self.manifest)
    }
}

impl TestImage {
    /// An amd64 image of `layers` running `/bin/sh` as root in `/`.
    pub fn new(layers: Vec<Vec<u8>>) -> Self {
        TestImage {
            architecture: "amd64".into(),
            env: vec!["PATH=/bin".into()],
            entrypoint: vec![],
            cmd: vec!["/bin/sh".into()],
            working_dir: "/".into(),
            user: "0:0".into(),
            layers,
        }
    }

    /// The image config JSON (Docker/OCI `config` object + rootfs).
    pub fn config_json(&self) -> Vec<u8> {
        let diff_ids: Vec<String> = self.layers.iter().map(|l| sha256(l)).collect();
        let v = serde_json::json!({
            "architecture": self.architecture,
            "os": "linux",
            "config": {
                "Env": self.env,
                "Entrypoint": self.entrypoint,
                "Cmd": self.cmd,
                "WorkingDir": self.working_dir,
                "User": self.user,
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        serde_json::to_vec(&v).expect("json")
    }

    /// The config, gzip-compressed layers and manifest.
    pub fn blobs(&self) -> Blobs {
        let config = self.config_json();
        let layers: Vec<Vec<u8>> = self.layers.iter().map(|l| gzip(l)).collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG, "digest": sha256(&config), "size": config.len()},
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": MT_LAYER_GZIP, "digest": sha256(l), "size": l.len(),
            })).collect::<Vec<_>>(),
        });
        Blobs {
            config,
            layers,
            manifest: serde_json::to_vec(&manifest).expect("json"),
        }
    }

    /// Writes the image as an OCI image layout in `dir`, its manifest named
    /// `tag` in index.json. Returns the manifest digest.
    pub fn write_oci_layout(&self, dir: &Path, tag: &str) -> String {
        let b = self.blobs();
        let mut all = vec![b.config.clone(), b.manifest.clone()];
        all.extend(b.layers.iter().cloned());
        write_layout(
            dir,
            &all,
            &[(MT_OCI_MANIFEST, &b.manifest, Some(tag), None)],
        );
        b.manifest_digest()
    }

    /// Writes a `docker save`-style archive: `manifest.json`, the config as
    /// `<hex>.json`, and uncompressed layers as `<n>/layer.tar`, the second
    /// of two identical layers as a symlink like docker does.
    pub fn write_docker_archive(&self, file: &Path, repo_tag: &str) {
        let config = self.config_json();
        let config_name = format!("{}.json", &sha256(&config)[7..]);
        let mut b = tar::Builder::new(Vec::new());
        let add = |b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, data).expect("tar");
        };
        let mut layer_paths = Vec::new();
        let mut seen: Vec<(String, String)> = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let d = sha256(l);
            let path = format!("{i}/layer.tar");
            if let Some((_, first)) = seen.iter().find(|(dd, _)| *dd == d) {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_mtime(0);
                h.set_size(0);
                b.append_link(&mut h, &path, format!("../{first}"))
                    .expect("tar");
            } else {
                add(&mut b, &path, l);
                seen.push((d, path.clone()));
            }
            layer_paths.push(path);
        }
        add(&mut b, &config_name, &config);
        let manifest = serde_json::json!([{
            "Config": config_name,
            "RepoTags": [repo_tag],
            "Layers": layer_paths,
        }]);
        add(
            &mut b,
            "manifest.json",
            &serde_json::to_vec(&manifest).expect("json"),
        );
        std::fs::write(file, b.into_inner().expect("tar")).expect("write archive");
    }

    /// Pushes the image as `HOST/REPO:TAG` to a plain-HTTP registry.
    /// Returns the manifest digest.
    pub async fn push(&self, host: &str, repo: &str, tag: &str) -> String {
        let b = self.blobs();
        let client = client(host);
        let r = reference(host, repo, tag);
        auth_push(&client, &r).await;
        for blob in std::iter::once(&b.config).chain(&b.layers) {
            client
                .push_blob(&r, blob.clone(), &sha256(blob))
                .await
                .expect("push blob");
        }
        push_manifest(&client, &r, &b.manifest, MT_OCI_MANIFEST).await;
        b.manifest_digest()
    }
}

/// An OCI image index over `(platform manifest, architecture)` pairs.
pub fn index_json(manifests: &[(&[u8], &str)]) -> Vec<u8> {
    let v = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MT_OCI_INDEX,
        "manifests": manifests.iter().map(|(m, arch)| serde_json::json!({
            "mediaType": MT_OCI_MANIFEST,
            "digest": sha256(m),
            "size": m.len(),
            "platform": {"architecture": arch, "os": "linux"},
        })).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&v).expect("json")
}

/// Pushes a multi-arch image (every image under its own architecture) as
/// `HOST/REPO:TAG`. Returns the index digest.
pub async fn push_index(host: &str, repo: &str, tag: &str, images: &[&TestImage]) -> String {
    let client = client(host);
    let r = reference(host, repo, tag);
    auth_push(&client, &r).await;
    let mut manifests = Vec::new();
    for img in images {
        let b = img.blobs();
        for blob in std::iter::once(&b.config).chain(&b.layers) {
            client
                .push_blob(&r, blob.clone(), &sha256(blob))
                .await
                .expect("push blob");
        }
        let by_digest = r.clone_with_digest(b.manifest_digest());
        push_manifest(&client, &by_digest, &b.manifest, MT_OCI_MANIFEST).await;
        manifests.push((b.manifest, img.architecture.clone()));
    }
    let pairs: Vec<(&[u8], &str)> = manifests
        .iter()
        .map(|(m, a)| (&m[..], a.as_str()))
        .collect();
    let index = index_json(&pairs);
    push_manifest(&client, &r, &index, MT_OCI_INDEX).await;
    sha256(&index)
}

/// An index.json entry: media type, manifest bytes, ref name, architecture.
pub type LayoutRef<'a> = (&'a str, &'a [u8], Option<&'a str>, Option<&'a str>);

/// Writes an OCI layout holding `blobs`, with `refs` (media type, manifest
/// bytes, ref name, platform architecture) listed in index.json.
pub fn write_layout(dir: &Path, blobs: &[Vec<u8>], refs: &[LayoutRef<'_>]) {
    let blob_dir = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blob_dir).expect("layout dir");
    for b in blobs {
        std::fs::write(blob_dir.join(&sha256(b)[7..]), b).expect("blob");
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("oci-layout");
    let manifests: Vec<serde_json::Value> = refs
        .iter()
        .map(|(mt, m, name, arch)| {
            let mut d = serde_json::json!({"mediaType": mt, "digest": sha256(m), "size": m.len()});
            if let Some(n) = name {
                d["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": n});
            }
            if let Some(a) = arch {
                d["platform"] = serde_json::json!({"architecture": a, "os": "linux"});
            }
            d
        })
        .collect();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("json"),
    )
    .expect("index.json");
}

fn client(host: &str) -> oci_client::Client {
    oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::HttpsExcept(vec![host.to_string()]),
        ..Default::default()
    })
}

fn reference(host: &str, repo: &str, tag: &str) -> oci_client::Reference {
    format!("{host}/{repo}:{tag}").parse().expect("reference")
}

async fn auth_push(client: &oci_client::Client, r: &oci_client::Reference) {
    client
        .auth(
            r,
            &oci_client::secrets::RegistryAuth::Anonymous,
            oci_client::RegistryOperation::Push,
        )
        .await
        .expect("registry auth");
}

async fn push_manifest(
    client: &oci_client::Client,
    r: &oci_client::Reference,
    body: &[u8],
    mt: &str,
) {
    client
        .push_manifest_raw(
            r,
            body.to_vec(),
            http::HeaderValue::from_str(mt).expect("media type"),
        )
        .await
        .expect("push manifest");
}
