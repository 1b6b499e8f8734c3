//! A throwaway local OCI registry (Debian's `docker-registry`, CNCF
//! distribution) on 127.0.0.1, killed when dropped; optionally requiring
//! HTTP basic auth from an htpasswd file.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BINARY: &str = "/usr/bin/docker-registry";

pub struct Registry {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    /// Whether /v2/ answers 401 (credentials required) when ready.
    auth: bool,
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
        Self::start_inner(None)
    }

    /// Like [`Registry::start`], but every request must carry HTTP basic
    /// credentials `user:password` (distribution's htpasswd auth, bcrypt).
    pub fn start_with_auth(user: &str, password: &str) -> Option<Registry> {
        Self::start_inner(Some((user, password)))
    }

    fn start_inner(auth: Option<(&str, &str)>) -> Option<Registry> {
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
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).expect("storage dir");
        let config = dir.path().join("config.yml");
        let mut yaml = format!(
            "version: 0.1\n\
             log: {{level: warn}}\n\
             storage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\n\
             http: {{addr: 127.0.0.1:{port}, secret: test}}\n",
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
        let child = Command::new(BINARY)
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
            port,
            auth: auth.is_some(),
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
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = format!("GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1:{}\r\n\r\n", self.port);
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]);
        let want = if self.auth { "401" } else { "200" };
        head.starts_with(&format!("HTTP/1.1 {want}"))
            || head.starts_with(&format!("HTTP/1.0 {want}"))
    }

    /// `127.0.0.1:PORT`, the registry part of image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's storage directory.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// What the registry logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Stops the registry now (e.g. to prove a pull is served from cache).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
