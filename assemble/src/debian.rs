//! A verified Debian archive client.
//!
//! Trust flows from the keyring: `InRelease` must carry a valid signature
//! by a keyring key, its SHA256 list pins `Packages.xz`, and each package
//! entry pins its `.deb`. Everything but `InRelease` is cached by digest, so
//! a warm build downloads only that one small file.

pub(crate) mod ar;
pub mod dpkg;
pub mod index;
mod inrelease;
pub mod sysusers;
pub mod version;

use crate::cache::{Cache, CacheError, Digest};
use crate::layers::{Compression, Layer};
use index::Index;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use inrelease::verify_inrelease;

/// Mirror used when the recipe names none.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Suite used when the recipe names none.
pub const DEFAULT_SUITE: &str = "trixie";
/// Keyring that verifies InRelease when the recipe names none.
pub const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// The only architecture indexed (plus `all`).
pub const ARCH: &str = crate::arch::TARGET.debian;

/// Errors from fetching, verifying and resolving Debian packages.
#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    /// Reading the keyring file failed.
    #[error("reading keyring {}", path.display())]
    Keyring {
        /// The keyring file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The keyring could not be parsed as OpenPGP keys.
    #[error("keyring: {0}")]
    BadKeyring(String),
    /// An HTTP request to the mirror failed or returned an error status.
    #[error("fetching {url}: {message}")]
    Http {
        /// The URL fetched.
        url: String,
        /// What went wrong, with its causes.
        message: String,
    },
    /// InRelease is not signed by a key of the keyring, or its signature is bad.
    #[error("InRelease signature: {0}")]
    Signature(String),
    /// InRelease is not UTF-8, is malformed, lacks the Packages index, or is for another suite.
    #[error("InRelease: {0}")]
    Release(String),
    /// Offline, and no verified InRelease of the suite is cached.
    #[error("offline: no verified InRelease of {suite} from {mirror} in the cache (build once with network, or use a lock file)")]
    NotCachedOffline {
        /// Mirror URL.
        mirror: String,
        /// Suite name.
        suite: String,
    },
    /// Offline, and the pinned .deb is not cached.
    #[error("offline: {name} {version} is not in the cache")]
    DebNotCachedOffline {
        /// Package name.
        name: String,
        /// Package version.
        version: String,
    },
    /// A downloaded file does not match the digest InRelease or the pin gives.
    #[error("{what}: expected {expected}, got {actual}")]
    Mismatch {
        /// What was downloaded (file or URL).
        what: String,
        /// The digest expected.
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// The Packages index cannot be decompressed or parsed.
    #[error("Packages index: {what}")]
    Index {
        /// What is wrong with it.
        what: String,
    },
    /// No package in the index satisfies a dependency.
    #[error("cannot satisfy `{dependency}`, wanted by {}", chain_text(.chain))]
    Unsatisfiable {
        /// The dependency, as written in the control field.
        dependency: String,
        /// Packages from the request down to the one that wants it.
        chain: Vec<String>,
    },
    /// A dependency needs a version of a package other than the one already chosen.
    #[error("`{want}` needs another version of {package} than the chosen {have}, wanted by {}", chain_text(.chain))]
    Conflict {
        /// The package name.
        package: String,
        /// The version already chosen.
        have: String,
        /// The dependency that wants another version.
        want: String,
        /// Packages from the request down to the one that wants it.
        chain: Vec<String>,
    },
    /// A .deb cannot be unpacked (bad ar or tar member, unknown compression).
    #[error("{package}: {message}")]
    Deb {
        /// The package as `NAME=VERSION`.
        package: String,
        /// What is wrong.
        message: String,
    },
    /// Reading or writing the cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl DebianError {
    /// Whether the recipe (not the environment) is at fault: a package
    /// that does not exist or cannot be installed.
    pub fn is_recipe_error(&self) -> bool {
        matches!(
            self,
            DebianError::Unsatisfiable { .. } | DebianError::Conflict { .. }
        )
    }
}

fn chain_text(chain: &[String]) -> String {
    if chain.is_empty() {
        "the recipe".to_string()
    } else {
        chain.join(" -> ")
    }
}

/// A binary package as pinned by the index: what lock files and SBOMs record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    /// Package name.
    pub name: String,
    /// Debian version string.
    pub version: String,
    /// Debian architecture (e.g. `amd64`, `all`).
    pub architecture: String,
    /// Path below the mirror root.
    pub filename: String,
    /// SHA256 of the .deb file.
    pub sha256: Digest,
    /// Size of the .deb file in bytes.
    pub size: u64,
}

/// Downloads pinned .debs from one mirror, through the cache. Needs no
/// index: the pin (from an index or a lock file) names file and digest.
#[derive(Debug, Clone)]
pub struct Mirror {
    url: String,
    client: reqwest::Client,
    cache: Cache,
    offline: bool,
}

impl Mirror {
    /// A mirror at `url` (trailing slashes dropped); `offline` serves only from the cache.
    pub fn new(url: &str, cache: &Cache, offline: bool) -> Result<Mirror, DebianError> {
        let url = url.trim_end_matches('/').to_string();
        let client = http_client().map_err(|e| DebianError::Http {
            url: url.clone(),
            message: crate::error_chain(&e),
        })?;
        Ok(Mirror {
            url,
            client,
            cache: cache.clone(),
            offline,
        })
    }

    /// The mirror's base URL, without a trailing slash.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The .deb of `pkg`, verified against its pinned SHA256.
    pub async fn fetch(&self, pkg: &Package) -> Result<Vec<u8>, DebianError> {
        if let Some(d) = self.cache.get(&pkg.sha256)? {
            return Ok(d);
        }
        self.download(pkg, &|_| {}).await?;
        self.cache
            .get(&pkg.sha256)?
            .ok_or_else(|| DebianError::Http {
                url: pkg.filename.clone(),
                message: "vanished from the cache as it was stored".into(),
            })
    }

    /// Puts the .deb in the cache unless it is there, streamed to disk
    /// while hashed (never whole in memory); `progress` hears of each
    /// chunk's size.
    pub async fn download(
        &self,
        pkg: &Package,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), DebianError> {
        if self.cache.contains(&pkg.sha256) {
            return Ok(());
        }
        if self.offline {
            return Err(DebianError::DebNotCachedOffline {
                name: pkg.name.clone(),
                version: pkg.version.clone(),
            });
        }
        let url = format!("{}/{}", self.url, pkg.filename);
        let err = |message: String| DebianError::Http {
            url: url.clone(),
            message,
        };
        let mut resp = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| err(crate::error_chain(&e)))?;
        if !resp.status().is_success() {
            let mut message = format!("HTTP status {}", resp.status());
            // The archive drops superseded versions a lock may still pin.
            if resp.status() == reqwest::StatusCode::NOT_FOUND {
                message = format!(
                    "{message}: {} {} is no longer in the archive; run `kiln lock --update` to pin what is there today",
                    pkg.name, pkg.version
                );
            }
            return Err(err(message));
        }
        let mut out = self.cache.blob_writer()?;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| err(crate::error_chain(&e)))?
        {
            std::io::Write::write_all(&mut out, &chunk).map_err(|source| CacheError::Io {
                path: out.temp_path().to_path_buf(),
                source,
            })?;
            progress(chunk.len() as u64);
        }
        out.commit(Some(&pkg.sha256)).map_err(|e| match e {
            CacheError::Mismatch { expected, actual } => DebianError::Mismatch {
                what: url.clone(),
                expected,
                actual,
            },
            e => e.into(),
        })?;
        Ok(())
    }

    /// Whether the .deb is already cached (and intact).
    pub fn is_cached(&self, pkg: &Package) -> bool {
        self.cache.contains(&pkg.sha256)
    }
}

fn http_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .build()
}

/// An opened, verified suite of one mirror.
#[derive(Debug)]
pub struct Archive {
    mirror: Mirror,
    suite: String,
    inrelease: Digest,
    packages_xz: Digest,
    date: Option<u64>,
    index: Index,
}

/// Path of the index inside a suite; the one InRelease entry we need.
const PACKAGES_PATH: &str = "main/binary-amd64/Packages.xz";

impl Archive {
    /// Fetches and verifies `dists/SUITE/InRelease`, then loads the amd64
    /// `main` index it pins (from the cache when already there). With
    /// `offline`, the InRelease verified last for this suite is used from
    /// the cache instead (its signature is checked again).
    pub async fn open(
        mirror_url: &str,
        suite: &str,
        keyring: &Path,
        cache: &Cache,
        offline: bool,
    ) -> Result<Archive, DebianError> {
        let keys = std::fs::read(keyring).map_err(|source| DebianError::Keyring {
            path: keyring.to_path_buf(),
            source,
        })?;
        let mirror = Mirror::new(mirror_url, cache, offline)?;
        let ref_key = format!("{}/dists/{suite}", mirror.url);
        let raw = if offline {
            cache
                .read_ref("inrelease", &ref_key)
                .and_then(|d| d.parse::<Digest>().ok())
                .map(|d| cache.get(&d))
                .transpose()?
                .flatten()
                .ok_or_else(|| DebianError::NotCachedOffline {
                    mirror: mirror.url.clone(),
                    suite: suite.to_string(),
                })?
        } else {
            let url = format!("{}/dists/{suite}/InRelease", mirror.url);
            get(&mirror.client, &url).await?
        };
        let inrelease = Digest::of(&raw);
        let text = String::from_utf8(raw)
            .map_err(|_| DebianError::Release("InRelease is not UTF-8".into()))?;
        let signed = verify_inrelease(&text, &keys)?;
        let release = inrelease::Release::parse(&signed)?;
        if release.suite.as_deref() != Some(suite) && release.codename.as_deref() != Some(suite) {
            // A validly signed InRelease of another suite (replay/mixup).
            return Err(DebianError::Release(format!(
                "asked for suite {suite:?}, InRelease is for {:?}/{:?}",
                release.suite, release.codename
            )));
        }
        if !offline {
            cache.put(&inrelease, text.as_bytes())?;
            cache.write_ref("inrelease", &ref_key, &inrelease.to_string())?;
        }
        let (packages_xz, size) =
            release.sha256.get(PACKAGES_PATH).copied().ok_or_else(|| {
                DebianError::Release(format!("no SHA256 entry for {PACKAGES_PATH}"))
            })?;
        let xz = match cache.get(&packages_xz)? {
            Some(d) => d,
            None if offline => {
                return Err(DebianError::NotCachedOffline {
                    mirror: mirror.url.clone(),
                    suite: suite.to_string(),
                })
            }
            None => {
                let url = format!("{}/dists/{suite}/{PACKAGES_PATH}", mirror.url);
                let d = get(&mirror.client, &url).await?;
                if d.len() as u64 != size {
                    return Err(DebianError::Http {
                        url,
                        message: format!("expected {size} bytes, got {}", d.len()),
                    });
                }
                check(&url, &packages_xz, &d)?;
                cache.put(&packages_xz, &d)?;
                d
            }
        };
        let index = packages_index(cache, &packages_xz, &xz)?;
        Ok(Archive {
            mirror,
            suite: suite.to_string(),
            inrelease,
            packages_xz,
            date: release.date,
            index,
        })
    }

    /// Digest of the verified InRelease file: pins the whole suite.
    pub fn inrelease_digest(&self) -> Digest {
        self.inrelease
    }

    /// Digest of the Packages.xz the index came from.
    pub fn packages_digest(&self) -> Digest {
        self.packages_xz
    }

    /// When the archive published this InRelease (seconds since the epoch).
    pub fn date(&self) -> Option<u64> {
        self.date
    }

    /// The mirror this archive was read from.
    pub fn mirror(&self) -> &Mirror {
        &self.mirror
    }

    /// The suite name (e.g. `trixie`).
    pub fn suite(&self) -> &str {
        &self.suite
    }

    /// The highest version of `name` in the index, if any.
    pub fn package(&self, name: &str) -> Option<&Package> {
        self.index.get(name).map(|e| &e.package)
    }

    /// Names of the suite's Essential packages.
    pub fn essential(&self) -> Vec<String> {
        self.index.essential()
    }

    /// The dependency closure of `roots` (names, optionally with a version
    /// constraint such as `libc6 (>= 2.36)`), sorted by name.
    pub fn resolve(&self, roots: &[String]) -> Result<Vec<Package>, DebianError> {
        self.index.resolve(roots)
    }

    /// The .deb of `pkg`, verified against the index's SHA256.
    pub async fn fetch(&self, pkg: &Package) -> Result<Vec<u8>, DebianError> {
        self.mirror.fetch(pkg).await
    }
}

/// Cache record kind: Packages.xz digest → digest of its text as zstd.
const PACKAGES_ZSTD_REF: &str = "packages-zstd";

/// The index, parsed as the text streams from the cached zstd
/// copy (verified as it is read) or, the first time, from the .xz while
/// that copy is written: the text is never held whole.
fn packages_index(cache: &Cache, xz_digest: &Digest, xz: &[u8]) -> Result<Index, DebianError> {
    let key = xz_digest.to_string();
    if let Some(d) = cache
        .read_ref(PACKAGES_ZSTD_REF, &key)
        .and_then(|d| d.parse::<Digest>().ok())
    {
        if let Ok(file) = std::fs::File::open(cache.blob_path(&d)) {
            let mut hashing = crate::cache::Hashing::new(file);
            let parsed = zstd::Decoder::new(&mut hashing)
                .map_err(|e| e.to_string())
                .and_then(|z| Index::read(std::io::BufReader::new(z)).map_err(|e| e.to_string()));
            // A damaged copy is only a lost speed-up: the .xz is verified.
            if let (Ok(index), Ok(actual)) = (parsed, hashing.finish()) {
                if actual == d {
                    return Ok(index);
                }
            }
        }
    }
    let index_err = |e: std::io::Error| DebianError::Index {
        what: format!("decompressing {PACKAGES_PATH}: {e}"),
    };
    // Keeping the copy is only a speed-up: failing to is not an error.
    let copy = cache
        .blob_writer()
        .ok()
        .and_then(|w| zstd::Encoder::new(w, 3).ok());
    let mut tee = Tee {
        inner: liblzma::read::XzDecoder::new(xz),
        copy,
    };
    let index = Index::read(std::io::BufReader::new(&mut tee))?;
    // What the parser did not read (nothing, for a well-formed index).
    std::io::copy(&mut tee, &mut std::io::sink()).map_err(index_err)?;
    if let Some(Ok(w)) = tee.copy.map(|z| z.finish()) {
        if let Ok((d, _)) = w.commit(None) {
            let _ = cache.write_ref(PACKAGES_ZSTD_REF, &key, &d.to_string());
        }
    }
    Ok(index)
}

/// A reader that writes what it reads into `copy`, dropping the copy at
/// its first error.
struct Tee<R, W> {
    inner: R,
    copy: Option<W>,
}

impl<R: std::io::Read, W: std::io::Write> std::io::Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(w) = &mut self.copy {
            if w.write_all(&buf[..n]).is_err() {
                self.copy = None;
            }
        }
        Ok(n)
    }
}

fn check(what: &str, expected: &Digest, data: &[u8]) -> Result<(), DebianError> {
    let actual = Digest::of(data);
    if actual != *expected {
        return Err(DebianError::Mismatch {
            what: what.to_string(),
            expected: *expected,
            actual,
        });
    }
    Ok(())
}

async fn get(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, DebianError> {
    let err = |message: String| DebianError::Http {
        url: url.to_string(),
        message,
    };
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| err(crate::error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(err(format!("HTTP status {}", resp.status())));
    }
    let body = resp
        .bytes()
        .await
        .map_err(|e| err(crate::error_chain(&e)))?;
    Ok(body.to_vec())
}

/// The control files of a .deb held in memory (a local package).
pub fn read_control(deb: &[u8]) -> Result<dpkg::Control, String> {
    let members = ar::members(deb)?;
    match members.first() {
        Some(m) if m.name == "debian-binary" && m.data.starts_with(b"2.") => {}
        _ => return Err("not a Debian 2.x binary package".into()),
    }
    let m = members
        .iter()
        .find(|m| m.name.starts_with("control.tar"))
        .ok_or("no control.tar member")?;
    let compression = match &m.name["control.tar".len()..] {
        "" => Compression::None,
        ".gz" => Compression::Gzip,
        ".xz" => Compression::Xz,
        ".zst" => Compression::Zstd,
        other => return Err(format!("unknown control.tar compression {other:?}")),
    };
    let tar = crate::layers::decompress_stream(compression, m.data)
        .map_err(|e| format!("{}: {e}", m.name))?;
    dpkg::Control::from_tar(tar).map_err(|e| format!("{}: {e}", m.name))
}

/// The filesystem payload of a .deb (`data.tar[.gz|.xz|.zst]`) as a layer.
/// Maintainer scripts (in `control.tar`) are deliberately not used.
/// `pkg_name_version` is `NAME=VERSION`; `digest` is the .deb's.
pub fn deb_layer(pkg_name_version: &str, digest: Digest, deb: &[u8]) -> Result<Layer, DebianError> {
    let bad = |message: String| DebianError::Deb {
        package: pkg_name_version.to_string(),
        message,
    };
    let members = ar::members(deb).map_err(bad)?;
    match members.first() {
        Some(m) if m.name == "debian-binary" && m.data.starts_with(b"2.") => {}
        _ => return Err(bad("not a Debian 2.x binary package".into())),
    }
    let (compression, data) = members
        .iter()
        .find_map(|m| {
            let c = match m.name {
                "data.tar" => Compression::None,
                "data.tar.gz" => Compression::Gzip,
                "data.tar.xz" => Compression::Xz,
                "data.tar.zst" => Compression::Zstd,
                _ => return None,
            };
            Some((c, m.data))
        })
        .ok_or_else(|| bad("no data.tar member".into()))?;
    Ok(Layer {
        source: format!("debian:{pkg_name_version}"),
        digest,
        compression,
        data: data.to_vec().into(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Read;

    /// A cache shared by the network tests (and their reruns), in the
    /// target directory.
    pub(crate) fn test_cache() -> Cache {
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test binary>
        let dir = exe
            .ancestors()
            .nth(3)
            .map(|t| t.join("kiln-test-cache"))
            .unwrap_or_else(|| std::env::temp_dir().join("kiln-test-cache"));
        Cache::open(dir).unwrap()
    }

    pub(crate) async fn trixie() -> Archive {
        Archive::open(
            DEFAULT_MIRROR,
            DEFAULT_SUITE,
            Path::new(DEFAULT_KEYRING),
            &test_cache(),
            false,
        )
        .await
        .unwrap()
    }

    /// Decompresses a layer's tar stream.
    /// The data layer of trixie's real cloud kernel package (cached).
    pub(crate) async fn trixie_cloud_kernel() -> Layer {
        let a = trixie().await;
        let pkgs = a.resolve(&["linux-image-cloud-amd64".to_string()]).unwrap();
        let pkg = pkgs
            .iter()
            .find(|p| p.name.starts_with("linux-image-6.12") && p.name.ends_with("-cloud-amd64"))
            .unwrap();
        let deb = a.fetch(pkg).await.unwrap();
        deb_layer(&format!("{}={}", pkg.name, pkg.version), pkg.sha256, &deb).unwrap()
    }

    pub(crate) fn layer_tar(layer: &Layer) -> Vec<u8> {
        let mut raw = Vec::new();
        layer.data.open().unwrap().read_to_end(&mut raw).unwrap();
        let d = &raw[..];
        match layer.compression {
            Compression::None => d.to_vec(),
            Compression::Gzip => {
                let mut v = Vec::new();
                flate2::read::GzDecoder::new(d).read_to_end(&mut v).unwrap();
                v
            }
            Compression::Xz => liblzma::decode_all(d).unwrap(),
            Compression::Zstd => zstd::decode_all(d).unwrap(),
        }
    }

    fn tar_paths(tar: &[u8]) -> Vec<String> {
        let mut a = tar::Archive::new(tar);
        a.entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn layer_from_synthetic_deb() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o755);
        h.set_cksum();
        b.append_data(&mut h, "./bin/x", &b"hi"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        let deb = ar::build(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar.zst", b"ignored"),
            ("data.tar.zst", &zst),
        ]);
        let d = Digest::of(&deb);
        let l = deb_layer("x=1", d, &deb).unwrap();
        assert_eq!(l.source, "debian:x=1");
        assert_eq!(l.compression, Compression::Zstd);
        assert_eq!(tar_paths(&layer_tar(&l)), vec!["bin/x"]);

        let no_data = ar::build(&[("debian-binary", b"2.0\n")]);
        assert!(deb_layer("x=1", d, &no_data).is_err());
        let not_deb = ar::build(&[("data.tar", &tar)]);
        assert!(deb_layer("x=1", d, &not_deb).is_err());
    }

    /// Parses a .deb built by dpkg-deb, the reference tool.
    #[test]
    fn layer_from_dpkg_deb() {
        if std::process::Command::new("dpkg-deb")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("note: dpkg-deb not installed, skipping");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pkg");
        std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(
            root.join("DEBIAN/control"),
            "Package: kiln-test\nVersion: 1.0\nArchitecture: all\nMaintainer: k <k@example.org>\nDescription: test\n",
        )
        .unwrap();
        std::fs::write(root.join("usr/bin/hello"), "#!/bin/sh\necho hi\n").unwrap();
        let out = dir.path().join("t.deb");
        for (z, want) in [
            ("xz", Compression::Xz),
            ("gzip", Compression::Gzip),
            ("none", Compression::None),
        ] {
            let st = std::process::Command::new("dpkg-deb")
                .args(["--root-owner-group", "-Z", z, "--build"])
                .arg(&root)
                .arg(&out)
                .output()
                .unwrap();
            assert!(
                st.status.success(),
                "{}",
                String::from_utf8_lossy(&st.stderr)
            );
            let deb = std::fs::read(&out).unwrap();
            let l = deb_layer("kiln-test=1.0", Digest::of(&deb), &deb).unwrap();
            assert_eq!(l.compression, want);
            let paths = tar_paths(&layer_tar(&l));
            assert!(paths.iter().any(|p| p == "./usr/bin/hello"), "{paths:?}");
        }
    }

    #[tokio::test]
    async fn network_trixie_open_and_resolve_busybox() {
        let a = trixie().await;
        assert!(a.index.len() > 10_000);
        let got = a.resolve(&["busybox-static".to_string()]).unwrap();
        let names: Vec<&str> = got.iter().map(|p| p.name.as_str()).collect();
        assert!(names.contains(&"busybox-static"), "{names:?}");
        assert!(names.len() < 10, "closure too big: {names:?}");
        let bb = got.iter().find(|p| p.name == "busybox-static").unwrap();
        // Fetch, verify and unpack the real .deb.
        let deb = a.fetch(bb).await.unwrap();
        assert_eq!(Digest::of(&deb), bb.sha256);
        let l = deb_layer(&format!("{}={}", bb.name, bb.version), bb.sha256, &deb).unwrap();
        let paths = tar_paths(&layer_tar(&l));
        assert!(paths.iter().any(|p| p == "./usr/bin/busybox"), "{paths:?}");
        let json = serde_json::to_value(bb).unwrap();
        assert_eq!(json["sha256"], bb.sha256.to_string());
    }

    #[tokio::test]
    async fn network_trixie_kernel_meta_package() {
        let a = trixie().await;
        let got = a.resolve(&["linux-image-cloud-amd64".to_string()]).unwrap();
        let names: Vec<&str> = got.iter().map(|p| p.name.as_str()).collect();
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("linux-image-6.12") && n.ends_with("-cloud-amd64")),
            "{names:?}"
        );
    }

    #[tokio::test]
    async fn network_rejects_unknown_suite() {
        let r = Archive::open(
            DEFAULT_MIRROR,
            "no-such-suite",
            Path::new(DEFAULT_KEYRING),
            &test_cache(),
            false,
        )
        .await;
        assert!(matches!(r, Err(DebianError::Http { .. })));
    }
}
