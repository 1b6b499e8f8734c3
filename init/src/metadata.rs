//! Instance metadata and userdata: the providers a cloud offers, tried in
//! order once the network is up, each bounded in time and size, the
//! answer written under /run/config (which the init then makes read-only).
//!
//! It runs in a child process: whatever a hostile server sends, the worst
//! it can do is end that child.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Where the results go.
pub const CONFIG_DIR: &str = "/run/config";
/// The link-local address AWS, GCE, Azure and OpenStack answer on.
const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
/// The most any one answer may be.
pub const MAX_BODY: usize = 1 << 20;
/// The longest any one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum FetchError {
    #[error("{0}: not an http:// URL")]
    Url(String),
    #[error("{url}")]
    Io {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("{url}: no answer within {}s", REQUEST_TIMEOUT.as_secs())]
    Slow { url: String },
    #[error("{url}: answer over {} bytes", MAX_BODY)]
    TooBig { url: String },
    #[error("{url}: not an HTTP answer")]
    Garbled { url: String },
    #[error("{url}: HTTP status {status}")]
    Status { url: String, status: u16 },
}

/// An HTTP/1.0 request's answer body, for a 200; bounded in time (the
/// whole exchange) and size.
pub fn http(method: &str, url: &str, headers: &[(&str, &str)]) -> Result<Vec<u8>, FetchError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| FetchError::Url(url.to_string()))?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let io = |source| FetchError::Io {
        url: url.to_string(),
        source,
    };
    let hostport = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let addr = hostport
        .to_socket_addrs()
        .map_err(io)?
        .next()
        .ok_or_else(|| io(io::ErrorKind::NotFound.into()))?;
    let mut s = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT).map_err(io)?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "PUT" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    s.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(io)?;
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(FetchError::Slow {
                url: url.to_string(),
            });
        }
        s.set_read_timeout(Some(left)).map_err(io)?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(FetchError::Slow {
                    url: url.to_string(),
                })
            }
            Err(e) => return Err(io(e)),
        }
        // Headers, then the body: room for both.
        if got.len() > MAX_BODY + 64 * 1024 {
            return Err(FetchError::TooBig {
                url: url.to_string(),
            });
        }
    }
    let garbled = || FetchError::Garbled {
        url: url.to_string(),
    };
    let end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(garbled)?;
    let head = std::str::from_utf8(&got[..end]).map_err(|_| garbled())?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(garbled)?;
    if status != 200 {
        return Err(FetchError::Status {
            url: url.to_string(),
            status,
        });
    }
    let body = got.split_off(end + 4);
    if body.len() > MAX_BODY {
        return Err(FetchError::TooBig {
            url: url.to_string(),
        });
    }
    Ok(body)
}

/// What a provider told.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Found {
    pub provider: &'static str,
    pub userdata: Option<Vec<u8>>,
    pub hostname: Option<String>,
    pub ssh_keys: Vec<String>,
}

fn text(body: Vec<u8>) -> Option<String> {
    String::from_utf8(body)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// An item a provider may not have: missing (404) is `None`; any other
/// failure ends the provider.
fn optional(r: Result<Vec<u8>, FetchError>) -> Result<Option<Vec<u8>>, FetchError> {
    match r {
        Ok(b) => Ok(Some(b)),
        Err(FetchError::Status { status: 404, .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// AWS EC2's IMDSv2: a session token first (PUT), then each item with it.
pub fn aws(base: &str) -> Result<Found, FetchError> {
    let token = http(
        "PUT",
        &format!("{base}/latest/api/token"),
        &[("X-aws-ec2-metadata-token-ttl-seconds", "300")],
    )?;
    let token = text(token).ok_or_else(|| FetchError::Garbled {
        url: format!("{base}/latest/api/token"),
    })?;
    let get = |path: &str| {
        http(
            "GET",
            &format!("{base}{path}"),
            &[("X-aws-ec2-metadata-token", &token)],
        )
    };
    let hostname = optional(get("/latest/meta-data/local-hostname"))?.and_then(text);
    let userdata = optional(get("/latest/user-data"))?;
    let key = optional(get("/latest/meta-data/public-keys/0/openssh-key"))?.and_then(text);
    Ok(Found {
        provider: "aws",
        userdata,
        hostname,
        ssh_keys: key.into_iter().collect(),
    })
}

/// Google Compute Engine's metadata server.
pub fn gce(base: &str) -> Result<Found, FetchError> {
    let get = |path: &str| {
        http(
            "GET",
            &format!("{base}/computeMetadata/v1/instance/{path}"),
            &[("Metadata-Flavor", "Google")],
        )
    };
    let hostname = get("hostname")?;
    let userdata = optional(get("attributes/user-data"))?;
    // "user:ssh-ed25519 AAAA... comment" per line.
    let keys = optional(get("attributes/ssh-keys"))?
        .and_then(text)
        .map(|t| {
            t.lines()
                .filter_map(|l| l.split_once(':').map(|(_, k)| k.trim().to_string()))
                .filter(|k| !k.is_empty())
                .collect()
        })
        .unwrap_or_default();
    Ok(Found {
        provider: "gce",
        userdata,
        hostname: text(hostname).map(|h| h.split('.').next().unwrap_or(&h).to_string()),
        ssh_keys: keys,
    })
}

/// `kiln.NAME=VALUE` from a kernel command line.
pub fn cmdline_value<'c>(cmdline: &'c str, name: &str) -> Option<&'c str> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

/// `local-hostname` and the `public-keys` list of NoCloud's meta-data
/// (the little YAML it holds: `key: value` lines and `- item` lists).
fn nocloud_meta(text: &str) -> (Option<String>, Vec<String>) {
    let mut hostname = None;
    let mut keys = Vec::new();
    let mut in_keys = false;
    for line in text.lines() {
        let t = line.trim();
        if let Some(item) = t.strip_prefix("- ").filter(|_| in_keys) {
            keys.push(item.trim().trim_matches('"').to_string());
            continue;
        }
        in_keys = false;
        if let Some((k, v)) = t.split_once(':') {
            let v = v.trim().trim_matches('"');
            match k.trim() {
                "local-hostname" | "hostname" if !v.is_empty() => hostname = Some(v.to_string()),
                "public-keys" => in_keys = true,
                _ => {}
            }
        }
    }
    (hostname, keys)
}

/// A config drive's filesystem: ISO 9660 or FAT.
enum Drive {
    Iso(crate::iso9660::Iso<std::fs::File>),
    Fat(crate::fat::Fat<std::fs::File>),
}

impl Drive {
    /// The filesystem on block device `dev`, if it is one of those.
    fn open(dev: &str) -> Option<Drive> {
        let open = || std::fs::File::open(format!("/dev/{dev}")).ok();
        if let Ok(Some(iso)) = crate::iso9660::Iso::open(open()?) {
            return Some(Drive::Iso(iso));
        }
        match crate::fat::Fat::open(open()?) {
            Ok(Some(fat)) => Some(Drive::Fat(fat)),
            _ => None,
        }
    }

    fn label(&self) -> &str {
        match self {
            Drive::Iso(i) => &i.label,
            Drive::Fat(f) => &f.label,
        }
    }

    fn file(&mut self, path: &str) -> io::Result<Option<Vec<u8>>> {
        match self {
            Drive::Iso(i) => i.file(path),
            Drive::Fat(f) => f.file(path),
        }
    }
}

/// A config drive: a block device whose ISO 9660 or FAT label is
/// `cidata` (NoCloud: `meta-data`, `user-data`) or `config-2`
/// (OpenStack: `openstack/latest/meta_data.json`, `.../user_data`).
pub fn config_drive(log: &dyn Fn(&str)) -> Option<Found> {
    let mut devs: Vec<String> = std::fs::read_dir("/sys/class/block")
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    devs.sort();
    for dev in devs {
        let Some(mut iso) = Drive::open(&dev) else {
            continue;
        };
        let label = iso.label().to_ascii_lowercase();
        let read = |iso: &mut Drive, p: &str| {
            iso.file(p).unwrap_or_else(|e| {
                log(&format!("metadata: /dev/{dev}: {p}: {e}"));
                None
            })
        };
        let found = match label.as_str() {
            "cidata" => {
                let meta = read(&mut iso, "meta-data")
                    .and_then(text)
                    .unwrap_or_default();
                let (hostname, ssh_keys) = nocloud_meta(&meta);
                Found {
                    provider: "nocloud",
                    userdata: read(&mut iso, "user-data"),
                    hostname,
                    ssh_keys,
                }
            }
            "config-2" => {
                let meta = read(&mut iso, "openstack/latest/meta_data.json")
                    .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m).ok())
                    .unwrap_or_default();
                let keys = meta["public_keys"]
                    .as_object()
                    .map(|o| {
                        o.values()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                Found {
                    provider: "nocloud",
                    userdata: read(&mut iso, "openstack/latest/user_data"),
                    hostname: meta["hostname"]
                        .as_str()
                        .map(|h| h.split('.').next().unwrap_or(h).to_string()),
                    ssh_keys: keys,
                }
            }
            _ => continue,
        };
        log(&format!("metadata: config drive /dev/{dev} ({label})"));
        return Some(found);
    }
    None
}

/// Without a network: a config drive, then userdata on the command line.
pub fn discover_offline(cmdline: &str, log: &dyn Fn(&str)) -> Option<Found> {
    if let Some(f) = config_drive(log) {
        return Some(f);
    }
    cmdline_value(cmdline, "kiln.userdata").map(|u| Found {
        provider: "cmdline",
        userdata: Some(u.as_bytes().to_vec()),
        ..Found::default()
    })
}

/// A network provider, given the endpoint's base URL.
type Provider = fn(&str) -> Result<Found, FetchError>;

/// A file a userdata tree describes: path below /run/config, content, mode.
pub type TreeFile = (String, String, u32);

/// Tries the providers in order: AWS, GCE (at `kiln.metadata_url=` if
/// given), a config drive, then userdata on the command line
/// (`kiln.userdata=`).
/// `kiln.metadata=off` leaves only the command line (what `kiln run --net
/// user` asks, so a guest never reads the build host's credentials).
pub fn discover(cmdline: &str, log: &dyn Fn(&str)) -> Option<Found> {
    if cmdline_value(cmdline, "kiln.metadata") == Some("off") {
        log("metadata: network providers off (kiln.metadata=off)");
        return discover_offline(cmdline, log);
    }
    let base = cmdline_value(cmdline, "kiln.metadata_url")
        .unwrap_or(DEFAULT_ENDPOINT)
        .trim_end_matches('/');
    let providers: [(&str, Provider); 2] = [("aws", aws), ("gce", gce)];
    for (name, p) in providers {
        match p(base) {
            Ok(f) => return Some(f),
            Err(e) => log(&format!("metadata: {name}: {}", crate::console::chain(&e))),
        }
    }
    discover_offline(cmdline, log)
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("{0:?} is not a plain name (no '/', '..' or NUL)")]
    BadName(String),
    #[error("{0}: \"content\" is not a string")]
    NoContent(String),
    #[error("{path}: bad \"perm\" {perm:?} (octal, at most 0777)")]
    BadPerm { path: String, perm: String },
}

/// The files a userdata JSON object describes (LinuxKit's convention):
/// `{ "dir": { "file": { "content": "...", "perm": "0644" } } }`, nested
/// to any depth; (relative path, content, mode). `None` if the userdata
/// is not such an object.
pub fn userdata_tree(data: &[u8]) -> Option<Result<Vec<TreeFile>, TreeError>> {
    let v: serde_json::Value = serde_json::from_slice(data).ok()?;
    let obj = v.as_object()?;
    let mut out = Vec::new();
    Some(walk(obj, "", &mut out).map(|()| out))
}

fn walk(
    obj: &serde_json::Map<String, serde_json::Value>,
    at: &str,
    out: &mut Vec<TreeFile>,
) -> Result<(), TreeError> {
    for (name, v) in obj {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(TreeError::BadName(name.clone()));
        }
        let path = if at.is_empty() {
            name.clone()
        } else {
            format!("{at}/{name}")
        };
        let Some(inner) = v.as_object() else {
            return Err(TreeError::NoContent(path));
        };
        if inner.contains_key("content") {
            let content = inner
                .get("content")
                .and_then(|c| c.as_str())
                .ok_or_else(|| TreeError::NoContent(path.clone()))?;
            let perm = inner.get("perm").and_then(|p| p.as_str()).unwrap_or("0644");
            let mode = u32::from_str_radix(perm, 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| TreeError::BadPerm {
                    path: path.clone(),
                    perm: perm.to_string(),
                })?;
            out.push((path, content.to_string(), mode));
        } else {
            walk(inner, &path, out)?;
        }
    }
    Ok(())
}

/// Writes what was found under `dir` (created first).
pub fn write(dir: &str, found: Option<&Found>, log: &dyn Fn(&str)) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let provider = found.map_or("none", |f| f.provider);
    std::fs::write(format!("{dir}/provider"), format!("{provider}\n"))?;
    let Some(f) = found else {
        return Ok(());
    };
    if let Some(h) = &f.hostname {
        std::fs::write(format!("{dir}/hostname"), format!("{h}\n"))?;
    }
    if !f.ssh_keys.is_empty() {
        std::fs::create_dir_all(format!("{dir}/ssh"))?;
        std::fs::write(
            format!("{dir}/ssh/authorized_keys"),
            f.ssh_keys.join("\n") + "\n",
        )?;
    }
    if let Some(u) = &f.userdata {
        std::fs::write(format!("{dir}/userdata"), u)?;
        match userdata_tree(u) {
            None => {}
            Some(Err(e)) => log(&format!("metadata: userdata tree refused: {e}")),
            Some(Ok(files)) => {
                for (path, content, mode) in files {
                    let full = format!("{dir}/{path}");
                    if let Some(parent) = std::path::Path::new(&full).parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::write(&full, content)?;
                    std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode))?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Serves `answer` (raw bytes, after `delay`) to each connection.
    fn serve(answer: Vec<u8>, delay: Duration) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                std::thread::sleep(delay);
                let _ = c.write_all(&answer);
            }
        });
        url
    }

    fn ok(body: &[u8]) -> Vec<u8> {
        let mut a =
            format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        a.extend_from_slice(body);
        a
    }

    #[test]
    fn answers_are_read_within_bounds() {
        let url = serve(ok(b"hello"), Duration::ZERO);
        assert_eq!(http("GET", &format!("{url}/x"), &[]).unwrap(), b"hello");
        // Over 1 MiB: refused, not read into memory without end.
        let url = serve(ok(&vec![b'a'; MAX_BODY + 1]), Duration::ZERO);
        assert!(matches!(
            http("GET", &url, &[]),
            Err(FetchError::TooBig { .. })
        ));
        // Slower than 2 s: given up.
        let url = serve(ok(b"late"), Duration::from_secs(3));
        let t = Instant::now();
        assert!(matches!(
            http("GET", &url, &[]),
            Err(FetchError::Slow { .. })
        ));
        assert!(t.elapsed() < Duration::from_millis(2900));
        let url = serve(b"garbage".to_vec(), Duration::ZERO);
        assert!(matches!(
            http("GET", &url, &[]),
            Err(FetchError::Garbled { .. })
        ));
        let url = serve(b"HTTP/1.0 401 No\r\n\r\n".to_vec(), Duration::ZERO);
        assert!(matches!(
            http("GET", &url, &[]),
            Err(FetchError::Status { status: 401, .. })
        ));
        assert!(matches!(
            http("GET", "https://x/", &[]),
            Err(FetchError::Url(_))
        ));
    }

    /// Serves an IMDSv2 emulation: a token, then `routes` (path, raw
    /// answer, delay); 404 for the rest.
    fn imds(routes: Vec<(&'static str, Vec<u8>, Duration)>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let n = c.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
                if path == "/latest/api/token" {
                    let _ = c.write_all(&ok(b"tok"));
                    continue;
                }
                match routes.iter().find(|r| r.0 == path) {
                    Some((_, answer, delay)) => {
                        std::thread::sleep(*delay);
                        let _ = c.write_all(answer);
                    }
                    None => {
                        let _ = c.write_all(b"HTTP/1.0 404 No\r\n\r\n");
                    }
                }
            }
        });
        url
    }

    /// Hostile metadata, served: each piece is bounded or refused, the
    /// provider gives up as a whole on a bound, and nothing is written
    /// outside the directory.
    #[test]
    fn hostile_metadata_is_bounded_and_refused() {
        let quick = Duration::ZERO;
        // Invalid UTF-8 for a hostname: dropped; a userdata tree climbing
        // out with "..": kept as userdata, its files refused.
        let url = imds(vec![
            (
                "/latest/meta-data/local-hostname",
                ok(&[0xff, 0xfe, b'x']),
                quick,
            ),
            (
                "/latest/user-data",
                ok(br#"{"..": {"escape": {"content": "x"}}}"#),
                quick,
            ),
            (
                "/latest/meta-data/public-keys/0/openssh-key",
                ok(b"ssh-ed25519 AAAA k"),
                quick,
            ),
        ]);
        let found = aws(&url).unwrap();
        assert_eq!(found.hostname, None);
        assert_eq!(found.ssh_keys, ["ssh-ed25519 AAAA k"]);
        let dir = std::env::temp_dir().join(format!("kiln-hostile-{}", std::process::id()));
        let inner = dir.join("config");
        let said = std::cell::RefCell::new(Vec::new());
        write(inner.to_str().unwrap(), Some(&found), &|m| {
            said.borrow_mut().push(m.to_string())
        })
        .unwrap();
        assert!(said.borrow()[0].contains("refused"), "{:?}", said.borrow());
        assert!(!dir.join("escape").exists() && !inner.join("escape").exists());
        assert!(!inner.join("hostname").exists());
        let _ = std::fs::remove_dir_all(&dir);
        // A body over 1 MiB, or an answer later than 2 s: the provider
        // fails as a whole, within its bound.
        let url = imds(vec![(
            "/latest/user-data",
            ok(&vec![b'a'; MAX_BODY + 1]),
            quick,
        )]);
        assert!(matches!(aws(&url), Err(FetchError::TooBig { .. })));
        let url = imds(vec![(
            "/latest/meta-data/local-hostname",
            ok(b"late"),
            Duration::from_secs(3),
        )]);
        let t = Instant::now();
        assert!(matches!(aws(&url), Err(FetchError::Slow { .. })));
        assert!(t.elapsed() < Duration::from_millis(2900));
    }

    #[test]
    fn userdata_trees() {
        let t = br#"{"app": {"conf": {"greeting": {"content": "hi\n", "perm": "0600"}}, "x": {"content": ""}}}"#;
        let files = userdata_tree(t).unwrap().unwrap();
        assert_eq!(
            files,
            [
                ("app/conf/greeting".to_string(), "hi\n".to_string(), 0o600),
                ("app/x".to_string(), String::new(), 0o644)
            ]
        );
        // Not JSON, or not an object: plain userdata.
        assert!(userdata_tree(b"#!/bin/sh\necho hi").is_none());
        assert!(userdata_tree(b"[1, 2]").is_none());
        assert!(userdata_tree(&[0xff, 0xfe]).is_none());
        for (bad, want) in [
            (
                &br#"{"..": {"f": {"content": "x"}}}"#[..],
                TreeError::BadName("..".into()),
            ),
            (
                br#"{"a/b": {"content": "x"}}"#,
                TreeError::BadName("a/b".into()),
            ),
            (
                br#"{"a": {"content": 5}}"#,
                TreeError::NoContent("a".into()),
            ),
            (br#"{"a": "text"}"#, TreeError::NoContent("a".into())),
            (
                br#"{"a": {"content": "x", "perm": "4755"}}"#,
                TreeError::BadPerm {
                    path: "a".into(),
                    perm: "4755".into(),
                },
            ),
        ] {
            assert_eq!(userdata_tree(bad), Some(Err(want)));
        }
    }

    #[test]
    fn nocloud_meta_data() {
        let (h, k) = nocloud_meta(
            "instance-id: i-1\nlocal-hostname: \"box-1\"\npublic-keys:\n  - ssh-ed25519 AAAA a@b\n  - ssh-rsa BBBB c@d\nother: x\n- not-a-key\n",
        );
        assert_eq!(h.as_deref(), Some("box-1"));
        assert_eq!(k, ["ssh-ed25519 AAAA a@b", "ssh-rsa BBBB c@d"]);
        assert_eq!(nocloud_meta(""), (None, vec![]));
    }

    #[test]
    fn command_line_values() {
        let c = "console=ttyS0 kiln.metadata_url=http://10.0.2.100 kiln.userdata=hello";
        assert_eq!(
            cmdline_value(c, "kiln.metadata_url"),
            Some("http://10.0.2.100")
        );
        assert_eq!(cmdline_value(c, "kiln.userdata"), Some("hello"));
        assert_eq!(cmdline_value(c, "kiln.user"), None);
    }

    #[test]
    fn results_are_written() {
        let dir = std::env::temp_dir().join(format!("kiln-meta-{}", std::process::id()));
        let d = dir.to_str().unwrap();
        let found = Found {
            provider: "aws",
            userdata: Some(br#"{"app": {"motd": {"content": "hi\n"}}}"#.to_vec()),
            hostname: Some("web-1".into()),
            ssh_keys: vec!["ssh-ed25519 AAAA k".into()],
        };
        write(d, Some(&found), &|_| {}).unwrap();
        let read = |p: &str| std::fs::read_to_string(dir.join(p)).unwrap();
        assert_eq!(read("provider"), "aws\n");
        assert_eq!(read("hostname"), "web-1\n");
        assert_eq!(read("ssh/authorized_keys"), "ssh-ed25519 AAAA k\n");
        assert_eq!(read("app/motd"), "hi\n");
        assert!(read("userdata").starts_with('{'));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
