//! `oci-layout:DIR[:TAG]`: an OCI image layout directory.

use super::*;

/// `DIR:TAG` unless the whole thing names a directory.
pub(super) fn split_layout(rest: &str) -> (&str, Option<&str>) {
    if Path::new(rest).is_dir() {
        return (rest, None);
    }
    match rest.rsplit_once(':') {
        Some((d, t)) => (d, Some(t)),
        None => (rest, None),
    }
}

/// The manifest (or index) that the layout's index.json names for `tag`.
pub(super) async fn layout_top(
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
    let index: ImageIndex =
        serde_json::from_slice(&read("index.json").await?).map_err(|e| OciError::Format {
            reference: source.to_string(),
            message: format!("index.json: {e}"),
        })?;
    let chosen: Vec<&Descriptor> = match tag {
        Some(t) => index
            .manifests()
            .iter()
            .filter(|d| {
                d.annotations()
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME))
                    .is_some_and(|n| n == t)
            })
            .collect(),
        None => index.manifests().iter().collect(),
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
    Ok((
        parse_digest(source, "manifest", desc.digest().as_ref())?,
        Some(desc.size()),
    ))
}

pub(super) async fn pull_layout(
    source: &str,
    rest: &str,
    pin: Option<Digest>,
) -> Result<Image, OciError> {
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
