//! Signed, chunked A/B updates.
//!
//! `kiln publish-update` chunks a build's slot ([`manifest`]) and signs a
//! TUF repository whose only target is the manifest ([`repo`]); a host
//! checks that repository against the keys its recipe pins ([`keys`]),
//! fetches only the chunks its running slot lacks, and writes the other
//! slot.

pub mod apply;
#[cfg(feature = "tuf")]
pub mod http;
#[cfg(feature = "tuf")]
pub mod keys;
pub mod manifest;
#[cfg(feature = "tuf")]
pub mod oci;
#[cfg(feature = "tuf")]
pub mod repo;
pub mod service;

use std::path::PathBuf;

/// What can go wrong publishing or checking an update.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// Reading the slot's bytes.
    #[error("reading the slot")]
    Read(#[source] std::io::Error),
    /// A file.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A key file that is not a usable key.
    #[error("key {}: {why}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A manifest that does not hold together.
    #[error("update manifest: {0}")]
    BadManifest(String),
    /// JSON that could not be written.
    #[error("{what}")]
    Json {
        /// Which document.
        what: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    #[cfg(feature = "tuf")]
    /// TUF metadata refused or unreadable (signatures, expiry, versions).
    #[error("{what}")]
    Tuf {
        /// What was being read or written.
        what: String,
        /// tough's reason (boxed: it is large).
        #[source]
        source: Box<tough::error::Error>,
    },
    #[cfg(feature = "tuf")]
    /// A TUF document kiln made that tough refused.
    #[error("{what}")]
    Schema {
        /// What.
        what: String,
        /// tough's reason (boxed: it is large).
        #[source]
        source: Box<tough::schema::Error>,
    },
    /// Publishing with a key the repository does not trust.
    #[error("{repo} is signed by other keys ({}); the key given is {key}", theirs.join(", "))]
    OtherKeys {
        /// The repository.
        repo: String,
        /// The key given.
        key: String,
        /// The repository's root keys.
        theirs: Vec<String>,
    },
    /// Publishing another recipe's build into a repository.
    #[error("the image is a build of {new:?}; the repository publishes {published:?}")]
    OtherRecipe {
        /// The image's recipe.
        new: String,
        /// The repository's.
        published: String,
    },
    /// Publishing a version not newer than the one published.
    #[error("version {new} is not newer than {published}, which the repository publishes (versions order as semver)")]
    NotNewer {
        /// The image's version.
        new: String,
        /// The repository's.
        published: String,
    },
    /// A repository publishing another recipe than the one running.
    #[error("the repository publishes {published:?}, this host runs {running:?}")]
    ForeignRecipe {
        /// The repository's recipe.
        published: String,
        /// The running one.
        running: String,
    },
    /// A repository whose first root is not the one the host pins.
    #[error("untrusted update repository: {0}")]
    UntrustedRoot(String),
    /// An unusable source URL.
    #[error("update source {0}")]
    BadSource(String),
    /// A file the source did not serve.
    #[error("fetching {url}: {why}")]
    Fetch {
        /// What.
        url: String,
        /// Why.
        why: String,
    },
    /// The disk being updated.
    #[error("{disk}")]
    Disk {
        /// Its path.
        disk: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A disk whose running build the update does not follow.
    #[error("{disk} runs {running}; the update is {new}")]
    NotAnUpdate {
        /// Its path.
        disk: String,
        /// `name version` of the running build.
        running: String,
        /// `name version` of the update.
        new: String,
    },
    /// A chunk whose bytes are not the ones the manifest pins.
    #[error("chunk {url} is corrupt: its sha256 is {actual}")]
    CorruptChunk {
        /// What.
        url: String,
        /// What it hashed to.
        actual: String,
    },
}
