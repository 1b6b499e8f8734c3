//! Applying layer tarballs to an in-memory [`Tree`] with OCI whiteout
//! semantics, never touching the host filesystem.
//!
//! (Being written: see the OCI helper's task.)

use crate::cache::Digest;
use kiln_formats::tree::Tree;

/// How a layer's tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Xz,
    Zstd,
}

/// One layer: a (possibly compressed) tar stream and where it came from.
#[derive(Debug, Clone)]
pub struct Layer {
    /// What the layer belongs to, for errors: an image reference, or
    /// `debian:PACKAGE=VERSION`.
    pub source: String,
    /// Digest of the blob the layer came from (OCI layer blob, or the .deb).
    pub digest: Digest,
    pub compression: Compression,
    pub data: std::sync::Arc<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("{source_name} layer {digest}: {path}: {reason}")]
    Unsafe {
        source_name: String,
        digest: Digest,
        path: String,
        reason: String,
    },
    #[error("{source_name} layer {digest}: {message}")]
    Read {
        source_name: String,
        digest: Digest,
        message: String,
    },
}

/// Applies `layer` on top of `tree`.
pub fn apply(tree: &mut Tree, layer: &Layer) -> Result<(), LayerError> {
    let _ = (tree, layer);
    unimplemented!("layer application is being written")
}
