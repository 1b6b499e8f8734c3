//! `docker-archive:FILE`: a `docker save` tarball.

use super::*;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ArchiveManifest {
    config: String,
    #[serde(default, deserialize_with = "null_default")]
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

/// Normalises a path inside the archive (no `..` escapes, no leading `./`).
pub(super) fn archive_path(base: &str, p: &str) -> Option<String> {
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
pub(super) fn digest_in_name(path: &str) -> Option<Digest> {
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

pub(super) async fn pull_docker_archive(source: &str, rest: &str) -> Result<Image, OciError> {
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
    let (doc, config) = parse_config(source, &config_digest, config_data)?;
    let diff_ids = doc.rootfs().diff_ids();
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
            data: blob.clone().into(),
        });
    }
    Ok(Image {
        reference: source.to_string(),
        manifest_digest: config_digest,
        config,
        layers,
    })
}

/// sha256 of a compressed stream's decompressed bytes, streaming.
pub(super) fn uncompressed_sha256(data: &[u8], c: Compression) -> std::io::Result<Digest> {
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
