//! A throwaway local OCI registry (Debian's `docker-registry`, CNCF
//! distribution) on 127.0.0.1, killed when dropped; optionally requiring
//! HTTP basic auth from an htpasswd file.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BINARY: &str = "/usr/bin/docker-registry";

/// A `docker-registry` process serving from a temporary directory, stopped on drop.
pub struct Registry {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Address it listens on (127.0.0.1, or an address in a test netns).
    ip: String,
    port: u16,
    /// Whether /v2/ answers 401 (credentials required) when ready.
    auth: bool,
    /// Whether it speaks only TLS.
    tls: bool,
}

/// An htpasswd line `user:$2y$...` (bcrypt, the only hash distribution
/// accepts).
/// The salt is fixed: the file is throwaway and tests stay deterministic.
fn htpasswd_line(user: &str, password: &str) -> String {
    // Cost 4, bcrypt's minimum, keeps every authenticated request cheap.
    let hash = bcrypt::hash_with_salt(password, 4, *b"kiln-test-salt!!").expect("bcrypt");
    format!("{user}:{}", hash.format_for_version(bcrypt::Version::TwoY))
}

impl Registry {
    /// Starts a registry, or returns `None` (after printing a note) when the
    /// binary is not installed.
    pub fn start() -> Option<Registry> {
        Self::start_inner(None, None)
    }

    /// A second registry serving this one's storage over TLS with `cert`
    /// and `key` (PEM files): what is pushed to one is pulled from both.
    pub fn tls_twin(&self, cert: &Path, key: &Path) -> Registry {
        let tls = Tls {
            storage: self.storage(),
            cert,
            key,
        };
        Self::start_with(None, None, Some(tls)).expect("docker-registry is installed")
    }

    /// Starts a registry inside network namespace `netns`, listening on
    /// `ip` (an address of that namespace the host can reach).
    pub fn start_in_netns(netns: &str, ip: &str) -> Option<Registry> {
        Self::start_inner(None, Some((netns, ip)))
    }

    /// Like [`Registry::start`], but every request must carry HTTP basic
    /// credentials `user:password` (distribution's htpasswd auth, bcrypt).
    pub fn start_with_auth(user: &str, password: &str) -> Option<Registry> {
        Self::start_inner(Some((user, password)), None)
    }

    fn start_inner(auth: Option<(&str, &str)>, netns: Option<(&str, &str)>) -> Option<Registry> {
        Self::start_with(auth, netns, None)
    }

    fn start_with(
        auth: Option<(&str, &str)>,
        netns: Option<(&str, &str)>,
        tls: Option<Tls<'_>>,
    ) -> Option<Registry> {
        if !Path::new(BINARY).exists() {
            eprintln!("note: {BINARY} not installed; skipping registry test");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        // Ask the kernel for a free port, then hand it to the registry.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let ip = netns.map_or("127.0.0.1", |(_, ip)| ip).to_string();
        let storage = tls
            .as_ref()
            .map_or_else(|| dir.path().join("storage"), |t| t.storage.clone());
        std::fs::create_dir_all(&storage).expect("storage dir");
        let config = dir.path().join("config.yml");
        let tls_keys = tls.as_ref().map_or(String::new(), |t| {
            format!(
                ", tls: {{certificate: {}, key: {}}}",
                t.cert.display(),
                t.key.display()
            )
        });
        let mut yaml = format!(
            "version: 0.1\n\
             log: {{level: warn}}\n\
             storage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\n\
             http: {{addr: {ip}:{port}, secret: test{tls_keys}}}\n",
            storage.display()
        );
        if let Some((user, password)) = auth {
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{}\n", htpasswd_line(user, password)))
                .expect("htpasswd");
            yaml.push_str(&format!(
                "auth: {{htpasswd: {{realm: test, path: {}}}}}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(&config, yaml).expect("registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log file");
        let mut cmd = match netns {
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BINARY]);
                c
            }
            None => Command::new(BINARY),
        };
        let child = cmd
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let mut reg = Registry {
            child: Some(child),
            dir,
            ip,
            port,
            auth: auth.is_some(),
            tls: tls.is_some(),
        };
        reg.wait_ready();
        Some(reg)
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.v2_answers() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("docker-registry exited with {status}: {}", self.log());
            }
            if Instant::now() > deadline {
                panic!("docker-registry did not answer /v2/: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn v2_answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect((self.ip.as_str(), self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.host());
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]);
        // Go's TLS server answers a plain request with a 400 of its own.
        let want = match (self.tls, self.auth) {
            (true, _) => "400",
            (_, true) => "401",
            _ => "200",
        };
        head.starts_with(&format!("HTTP/1.1 {want}"))
            || head.starts_with(&format!("HTTP/1.0 {want}"))
    }

    /// `IP:PORT`, the registry part of image references.
    pub fn host(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// The registry's storage directory.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// What the registry logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The bytes a stretch of [`Registry::log`] says were served: the sum
    /// of its access lines' `"GET /v2/…" 200 BYTES`.
    pub fn served_bytes(log: &str) -> u64 {
        log.lines()
            .filter(|l| l.contains("\"GET /v2/"))
            .filter_map(|l| {
                l.split("\" 200 ")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    /// Stops the registry now (e.g. to prove a pull is served from cache).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where a TLS registry keeps its blobs and the PEM files it serves with.
struct Tls<'a> {
    storage: PathBuf,
    cert: &'a Path,
    key: &'a Path,
}

/// A network namespace joined to this one by a veth pair, each end with
/// an address of a /30 no other host has: a registry in it is reached
/// over a real, non-loopback interface, and traffic stays on this machine.
pub struct TestNetns {
    /// Namespace name, as `ip netns` knows it.
    pub name: String,
    /// The namespace's end.
    pub ip: String,
    host_if: String,
}

impl TestNetns {
    /// Needs root (and iproute2); `None` otherwise.
    pub fn create() -> Option<TestNetns> {
        let id = std::process::id();
        let name = format!("kiln-test-{id}");
        let host_if = format!("kt{}", id % 100_000);
        let ns_if = format!("kn{}", id % 100_000);
        let net = id % 250;
        let (host_ip, ns_ip) = (format!("10.231.{net}.1"), format!("10.231.{net}.2"));
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ip(&["netns", "add", &name]) {
            eprintln!("note: cannot create a network namespace (not root?); skipping");
            return None;
        }
        let ns = TestNetns {
            name: name.clone(),
            ip: ns_ip.clone(),
            host_if: host_if.clone(),
        };
        let ok = ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]) && ip(&["link", "set", &ns_if, "netns", &name])
            && ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])
            && ip(&["link", "set", &host_if, "up"])
            && ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{ns_ip}/30"),
                "dev",
                &ns_if,
            ])
            && ip(&["-n", &name, "link", "set", &ns_if, "up"])
            && ip(&["-n", &name, "link", "set", "lo", "up"]);
        assert!(ok, "setting up the veth pair into {name} failed");
        Some(ns)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod served_tests {
    use super::Registry;

    #[test]
    fn served_bytes_sums_successful_gets() {
        let log = concat!(
            "127.0.0.1 - - [x] \"GET /v2/ HTTP/1.1\" 200 2 \"\" \"oci-client\"\n",
            "127.0.0.1 - - [x] \"GET /v2/k/blobs/sha256:a HTTP/1.1\" 200 4096 \"\" \"oci-client\"\n",
            "127.0.0.1 - - [x] \"GET /v2/k/manifests/t HTTP/1.1\" 404 19 \"\" \"oci-client\"\n",
            "127.0.0.1 - - [x] \"PUT /v2/k/blobs/uploads/u HTTP/1.1\" 201 0 \"\" \"oci-client\"\n",
            "time=\"…\" level=info msg=\"response completed\"\n",
        );
        assert_eq!(Registry::served_bytes(log), 4098);
    }
}
