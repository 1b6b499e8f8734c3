//! Content-addressed blob cache keyed by sha256.
//!
//! A blob is verified before it is stored and again when it is read; one
//! that fails is deleted, never returned. Writes go to a temp file in the
//! same directory and are renamed into place, so a crash leaves no partial
//! blob under a digest name.

use sha2::{Digest as _, Sha256};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Errors from the content-addressed cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Reading or writing a file in the cache failed.
    #[error("cache {}", path.display())]
    Io {
        /// The cache file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// A blob's content does not hash to the digest it was stored or requested under.
    #[error("blob does not match its digest: expected {expected}, got {actual}")]
    Mismatch {
        /// The digest asked for.
        expected: Digest,
        /// The digest of the content.
        actual: Digest,
    },
    /// A string is not of the form `sha256:<64 hex digits>`.
    #[error("{0:?} is not a digest of the form sha256:<64 hex digits>")]
    BadDigest(String),
}

/// A sha256 content digest, displayed as `sha256:<hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The sha256 of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest(Sha256::digest(data).into())
    }

    /// The digest as 64 lowercase hex digits, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses bare hex (64 digits) as found in Debian indexes.
    pub fn from_hex(s: &str) -> Result<Self, CacheError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| CacheError::BadDigest(s.to_string()))?;
        Ok(Digest(out))
    }
}

impl FromStr for Digest {
    type Err = CacheError;
    fn from_str(s: &str) -> Result<Self, CacheError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| CacheError::BadDigest(s.to_string()))?;
        Digest::from_hex(hex).map_err(|_| CacheError::BadDigest(s.to_string()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A directory of blobs named by digest: `DIR/sha256/<hex>`.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Cache {
    /// Opens (creating) a cache rooted at `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, CacheError> {
        let dir = dir.into();
        let blobs = dir.join("sha256");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        // Temp files of killed builds (not those of a running one).
        crate::output::sweep(&blobs);
        for sub in ["refs", "squashfs"] {
            if let Ok(entries) = fs::read_dir(dir.join(sub)) {
                for e in entries.flatten() {
                    crate::output::sweep(&e.path());
                }
            }
        }
        Ok(Cache { dir })
    }

    /// `$XDG_CACHE_HOME/kiln`, else `$HOME/.cache/kiln`, else a directory
    /// under the system temp dir (a user with no home still gets a cache).
    pub fn default_dir() -> PathBuf {
        if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
            return PathBuf::from(x).join("kiln");
        }
        if let Some(h) = std::env::var_os("HOME").filter(|x| !x.is_empty()) {
            return PathBuf::from(h).join(".cache").join("kiln");
        }
        std::env::temp_dir().join("kiln-cache")
    }

    /// The cache's root directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A small named record beside the blobs (`DIR/refs/KIND/KEY`), for
    /// facts such as "the InRelease last verified for this suite" or "this
    /// manifest was served by that repository". Keys are hashed into names.
    pub fn read_ref(&self, kind: &str, key: &str) -> Option<String> {
        fs::read_to_string(self.ref_path(kind, key)).ok()
    }

    /// Records `value` under (`kind`, `key`), replacing it atomically.
    pub fn write_ref(&self, kind: &str, key: &str, value: &str) -> Result<(), CacheError> {
        let path = self.ref_path(kind, key);
        let dir = path.parent().unwrap_or(&self.dir).to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut tmp = tempfile_in(&dir).map_err(io_err(&dir))?;
        let result = tmp
            .1
            .write_all(value.as_bytes())
            .and_then(|()| fs::rename(&tmp.0, &path));
        crate::output::untrack_temp(&tmp.0);
        if result.is_err() {
            let _ = fs::remove_file(&tmp.0);
        }
        result.map_err(io_err(&path))
    }

    fn ref_path(&self, kind: &str, key: &str) -> PathBuf {
        self.dir
            .join("refs")
            .join(kind)
            .join(Digest::of(key.as_bytes()).hex())
    }

    /// Where the blob `digest` is stored (whether or not it is).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("sha256").join(digest.hex())
    }

    /// A blob written as a stream, hashed as it goes; it appears under its
    /// digest only at [`BlobWriter::commit`].
    pub fn blob_writer(&self) -> Result<BlobWriter, CacheError> {
        let dir = self.dir.join("sha256");
        let (tmp, file) = tempfile_in(&dir).map_err(io_err(&dir))?;
        let writer = BlobWriter {
            dir: dir.clone(),
            tmp,
            file: io::BufWriter::with_capacity(1 << 16, file),
            hasher: Sha256::new(),
            len: 0,
        };
        Ok(writer)
    }

    /// Whether a blob is stored under `digest` (not verified: for progress
    /// display; [`Cache::get`] verifies).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// The blob's bytes if cached and intact. A corrupt blob is removed and
    /// reported as absent so the caller fetches it again.
    pub fn get(&self, digest: &Digest) -> Result<Option<Vec<u8>>, CacheError> {
        let path = self.blob_path(digest);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        if Digest::of(&data) != *digest {
            let _ = fs::remove_file(&path);
            return Ok(None);
        }
        Ok(Some(data))
    }

    /// Stores `data` under `expected` after checking it hashes to that.
    pub fn put(&self, expected: &Digest, data: &[u8]) -> Result<(), CacheError> {
        let actual = Digest::of(data);
        if actual != *expected {
            return Err(CacheError::Mismatch {
                expected: *expected,
                actual,
            });
        }
        self.write_blob(&actual, data)
    }

    /// Stores `data` under its own digest and returns it (for content kiln
    /// produced itself, where there is nothing to verify against).
    pub fn put_new(&self, data: &[u8]) -> Result<Digest, CacheError> {
        let d = Digest::of(data);
        self.write_blob(&d, data)?;
        Ok(d)
    }

    fn write_blob(&self, digest: &Digest, data: &[u8]) -> Result<(), CacheError> {
        let path = self.blob_path(digest);
        if path.exists() {
            return Ok(());
        }
        let dir = self.dir.join("sha256");
        let mut tmp = tempfile_in(&dir).map_err(io_err(&dir))?;
        let result = (|| {
            tmp.1.write_all(data)?;
            tmp.1.sync_all()?;
            fs::rename(&tmp.0, &path)
        })();
        crate::output::untrack_temp(&tmp.0);
        if result.is_err() {
            let _ = fs::remove_file(&tmp.0);
        }
        result.map_err(io_err(&path))
    }
}

/// A blob being written; removed if dropped before [`BlobWriter::commit`].
pub struct BlobWriter {
    dir: PathBuf,
    tmp: PathBuf,
    file: io::BufWriter<fs::File>,
    hasher: Sha256,
    len: u64,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl BlobWriter {
    /// The temp file being written (to read back what is already written).
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores the blob under its digest, which must be `expected` if given;
    /// returns the digest and the blob's path.
    pub fn commit(mut self, expected: Option<&Digest>) -> Result<(Digest, PathBuf), CacheError> {
        self.file.flush().map_err(io_err(&self.tmp))?;
        let actual = Digest(std::mem::take(&mut self.hasher).finalize().into());
        if let Some(e) = expected.filter(|e| **e != actual) {
            return Err(CacheError::Mismatch {
                expected: *e,
                actual,
            });
        }
        let path = self.dir.join(actual.hex());
        // Another build may have stored the same blob: equal bytes.
        fs::rename(&self.tmp, &path).map_err(io_err(&path))?;
        crate::output::untrack_temp(&self.tmp);
        Ok((actual, path))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // After a commit the temp name is gone and this is a no-op.
        if fs::remove_file(&self.tmp).is_ok() {
            crate::output::untrack_temp(&self.tmp);
        }
    }
}

/// Reads through `inner`, hashing every byte, to check a stream against a
/// digest once it has been read to its end.
pub struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: io::Read> Hashing<R> {
    /// Hashes what is read from `inner`.
    pub fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
        }
    }

    /// Reads the rest of the stream and returns the digest of all of it.
    pub fn finish(&mut self) -> io::Result<Digest> {
        io::copy(self, &mut io::sink())?;
        Ok(Digest(std::mem::take(&mut self.hasher).finalize().into()))
    }
}

impl<R: io::Read> io::Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Compressed squashfs blocks, one file per key under `DIR/squashfs/`;
/// the writer checks what it reads, so a damaged file only costs a
/// recompression.
impl kiln_formats::squashfs::BlockStore for Cache {
    fn get(&self, key: &[u8; 32]) -> Option<Vec<u8>> {
        fs::read(self.block_path(key)).ok()
    }

    fn put(&self, key: &[u8; 32], compressed: &[u8]) {
        let path = self.block_path(key);
        let Some(dir) = path.parent() else { return };
        if fs::create_dir_all(dir).is_err() {
            return;
        }
        // Best effort: a block not kept is compressed again next time.
        if let Ok((tmp, mut f)) = tempfile_in(dir) {
            let ok = f.write_all(compressed).is_ok();
            if !ok || fs::rename(&tmp, &path).is_err() {
                let _ = fs::remove_file(&tmp);
            }
            crate::output::untrack_temp(&tmp);
        }
    }
}

impl Cache {
    fn block_path(&self, key: &[u8; 32]) -> PathBuf {
        let hex = hex::encode(key);
        self.dir.join("squashfs").join(&hex[..2]).join(hex)
    }
}

/// A uniquely named file in `dir` (pid + counter; no randomness needed).
fn tempfile_in(dir: &Path) -> io::Result<(PathBuf, fs::File)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = dir.join(format!(".tmp-{}-{}", std::process::id(), n));
        match crate::output::create_temp(&p) {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_round_trip() {
        let d = Digest::of(b"hello");
        let s = d.to_string();
        assert_eq!(
            s,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(s.parse::<Digest>().unwrap(), d);
        assert!("md5:abc".parse::<Digest>().is_err());
        assert!("sha256:zz".parse::<Digest>().is_err());
    }

    #[test]
    fn put_verifies_and_get_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let good = Digest::of(b"data");
        assert!(matches!(
            cache.put(&good, b"other"),
            Err(CacheError::Mismatch { .. })
        ));
        assert_eq!(cache.get(&good).unwrap(), None);
        cache.put(&good, b"data").unwrap();
        assert_eq!(cache.get(&good).unwrap().as_deref(), Some(&b"data"[..]));
        fs::write(cache.blob_path(&good), b"tampered").unwrap();
        assert_eq!(cache.get(&good).unwrap(), None);
        assert!(!cache.blob_path(&good).exists());
    }

    #[test]
    fn open_sweeps_temps_that_killed_builds_left() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        cache.write_ref("k", "a", "v").unwrap();
        let refs = dir.path().join("refs/k");
        let blocks = dir.path().join("squashfs/ab");
        fs::create_dir_all(&blocks).unwrap();
        let stale = [
            dir.path().join("sha256/.tmp-1-0"),
            refs.join(".tmp-1-1"),
            blocks.join(".tmp-1-2"),
        ];
        for p in &stale {
            fs::write(p, b"left by a SIGKILLed build").unwrap();
        }
        Cache::open(dir.path()).unwrap();
        for p in &stale {
            assert!(!p.exists(), "{} not swept", p.display());
        }
        assert_eq!(cache.read_ref("k", "a").as_deref(), Some("v"));
    }

    #[test]
    fn refs_round_trip_and_digests_serialize_as_strings() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.read_ref("k", "a/b"), None);
        cache.write_ref("k", "a/b", "one").unwrap();
        cache.write_ref("k", "a/b", "two").unwrap();
        assert_eq!(cache.read_ref("k", "a/b").as_deref(), Some("two"));
        let d = Digest::of(b"x");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{d}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"md5:0\"").is_err());
    }
}
