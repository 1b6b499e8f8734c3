//! Runs programs as root over a tree, the way `mmdebstrap --mode=unshare`
//! does: in new user, mount, PID, network, IPC and UTS namespaces, with the
//! tree as the whole filesystem. Nothing of the host is visible but the
//! tree, there is no network (a fresh network namespace), and root inside
//! is an unprivileged range of ids outside.
//!
//! This crate is the workspace's one exception to `unsafe_code = forbid`
//! outside the init: namespaces, `fork` and mounts are raw system calls.
//!
//! The parent ([`Sandbox::run`]) starts a helper process (`kiln __sandbox`,
//! i.e. kiln itself, single-threaded from its first instruction) and talks
//! to it over its standard streams:
//!
//! 1. the helper enters a new user namespace and writes `U\n`;
//! 2. the parent maps ids into it (directly when it is root, through
//!    `newuidmap`/`newgidmap` and `/etc/subuid` otherwise) and writes
//!    `G\n`, a JSON [`Request`] line, then the tree as a tar stream;
//! 3. the helper, now root in its namespaces, unpacks the tree into the
//!    request's directory, makes it the root, runs each step in order,
//!    writes the resulting tree to its stdout as a tar stream (owners as
//!    root inside sees them, mtimes clamped to the request's epoch), and
//!    removes the directory's contents. Steps' output goes to its stderr.

use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod helper;
pub use helper::helper_main;

/// What the helper is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// An empty directory the tree is unpacked into (and emptied after).
    pub dir: PathBuf,
    /// Exported as `SOURCE_DATE_EPOCH`; later mtimes are clamped to it.
    pub epoch: u64,
    /// Programs run in order, as root, inside the tree.
    pub steps: Vec<Step>,
}

/// One program run inside the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// What the step is, for errors (e.g. `nginx-common postinst`).
    pub label: String,
    /// Program (absolute path inside the tree) and arguments.
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: Vec<(String, String)>,
}

/// Errors from running a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The helper could not be started or talked to.
    #[error("sandbox helper {program}")]
    Helper {
        /// The helper program.
        program: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The kernel refused a new user namespace.
    #[error("this host does not allow unprivileged user namespaces ({message}); allow them (sysctl user.max_user_namespaces > 0 and kernel.unprivileged_userns_clone=1; on Ubuntu 23.10 and later kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor profile with `userns,` for kiln), or set `scripts = false` on the image")]
    NoUserNamespaces {
        /// What the kernel said.
        message: String,
    },
    /// Ids could not be mapped into the namespace.
    #[error("mapping ids into the sandbox: {0}")]
    IdMap(String),
    /// A step failed; `output` is the end of what the steps printed.
    #[error("{label} failed ({status}); its last output:\n{output}")]
    StepFailed {
        /// The step's label.
        label: String,
        /// How it ended.
        status: String,
        /// The last lines the steps printed.
        output: String,
    },
    /// The helper failed outside any step.
    #[error("sandbox: {message}")]
    Failed {
        /// What the helper reported.
        message: String,
    },
}

/// How root inside maps to ids outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdMap {
    /// Run as root: ids 0..count inside are `start..start+count` outside.
    Direct {
        /// First id outside.
        start: u32,
        /// How many ids.
        count: u32,
    },
    /// Run as a user: root inside is the user, ids 1..=count the user's
    /// subordinate ranges, mapped by `newuidmap`/`newgidmap`.
    Subordinate {
        /// The user's uid.
        uid: u32,
        /// The user's gid.
        gid: u32,
        /// First subordinate uid and how many.
        uids: (u32, u32),
        /// First subordinate gid and how many.
        gids: (u32, u32),
    },
    /// No ids to map (a user without `/etc/subuid` ranges): says why when
    /// a sandbox is run, not before.
    Unavailable {
        /// What is missing and how to add it.
        message: String,
    },
}

/// Ids a root build maps when root has no `/etc/subuid` entry.
const ROOT_DEFAULT: (u32, u32) = (100_000, 65_536);

impl IdMap {
    /// The map for the current user: a direct range as root (root's
    /// `/etc/subuid` entry, else 100000+65536), the user's subordinate ids
    /// otherwise.
    pub fn for_current_user() -> IdMap {
        // SAFETY: getuid and getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let name = user_name(uid);
        let sub = |file: &str| -> Option<(u32, u32)> {
            let text = std::fs::read_to_string(file).ok()?;
            text.lines().find_map(|l| {
                let f: Vec<&str> = l.trim().split(':').collect();
                let who = *f.first()?;
                let matches = who == uid.to_string() || name.as_deref() == Some(who);
                (matches && f.len() == 3).then(|| Some((f[1].parse().ok()?, f[2].parse().ok()?)))?
            })
        };
        if uid == 0 {
            let (start, count) = sub("/etc/subuid").unwrap_or(ROOT_DEFAULT);
            return IdMap::Direct {
                start,
                count: count.min(65_536),
            };
        }
        let who = name.clone().unwrap_or_else(|| uid.to_string());
        let missing = |file: &str| {
            IdMap::Unavailable {
            message: format!(
                "{file} has no range for {who}: add one (e.g. `usermod --add-subuids 200000-265535 --add-subgids 200000-265535 {who}`), or set `scripts = false` on the image"
            ),
        }
        };
        let Some(uids) = sub("/etc/subuid") else {
            return missing("/etc/subuid");
        };
        let Some(gids) = sub("/etc/subgid") else {
            return missing("/etc/subgid");
        };
        IdMap::Subordinate {
            uid,
            gid,
            uids,
            gids,
        }
    }

    /// Maps ids into the namespace of process `pid`.
    fn apply(&self, pid: u32) -> Result<(), SandboxError> {
        match self {
            IdMap::Unavailable { message } => Err(SandboxError::IdMap(message.clone())),
            IdMap::Direct { start, count } => {
                let map = format!("0 {start} {count}\n");
                for f in ["uid_map", "gid_map"] {
                    let path = format!("/proc/{pid}/{f}");
                    std::fs::write(&path, &map)
                        .map_err(|e| SandboxError::IdMap(format!("writing {path}: {e}")))?;
                }
                Ok(())
            }
            IdMap::Subordinate {
                uid,
                gid,
                uids,
                gids,
            } => {
                for (tool, own, (start, count)) in
                    [("newuidmap", uid, uids), ("newgidmap", gid, gids)]
                {
                    let out = Command::new(tool)
                        .arg(pid.to_string())
                        .args(["0", &own.to_string(), "1"])
                        .args(["1", &start.to_string(), &count.to_string()])
                        .output()
                        .map_err(|e| {
                            SandboxError::IdMap(format!("running {tool} (package uidmap): {e}"))
                        })?;
                    if !out.status.success() {
                        return Err(SandboxError::IdMap(format!(
                            "{tool}: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        )));
                    }
                }
                Ok(())
            }
        }
    }
}

/// The name of `uid` in /etc/passwd, if it has one.
fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
    })
}

/// How to start the helper: a program and its arguments (kiln: itself
/// with `__sandbox`).
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// The helper program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// How ids are mapped.
    pub ids: IdMap,
}

/// How much of the steps' output an error quotes.
const TAIL: usize = 4096;

impl Sandbox {
    /// Runs `req` over the tar stream `tree` and gives the resulting tar
    /// stream to `out`, whose result is returned once the helper has
    /// succeeded.
    pub fn run<T>(
        &self,
        req: &Request,
        mut tree: impl Read + Send,
        out: impl FnOnce(&mut dyn Read) -> io::Result<T>,
    ) -> Result<T, SandboxError> {
        let helper_err = |source| SandboxError::Helper {
            program: self.program.display().to_string(),
            source,
        };
        if let IdMap::Unavailable { message } = &self.ids {
            return Err(SandboxError::IdMap(message.clone()));
        }
        let parent = req.dir.parent().unwrap_or(Path::new("/"));
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .env(helper::DIR_ENV, parent)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(helper_err)?;
        let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(helper_err(io::ErrorKind::BrokenPipe.into()));
        };
        let mut stdout = BufReader::new(stdout);
        let result = std::thread::scope(|s| {
            // The steps' output, kept to quote the end of it.
            let errors = s.spawn(move || {
                let mut all = Vec::new();
                let _ = stderr.read_to_end(&mut all);
                all
            });
            let r = (|| {
                let mut line = String::new();
                stdout.read_line(&mut line).map_err(helper_err)?;
                match line.strip_prefix('E') {
                    Some(m) => {
                        return Err(SandboxError::NoUserNamespaces {
                            message: m.trim().to_string(),
                        })
                    }
                    None if line != "U\n" => {
                        return Err(SandboxError::Failed {
                            message: format!("unexpected helper greeting {line:?}"),
                        })
                    }
                    None => {}
                }
                // Root inside must own the directory it unpacks into.
                if let IdMap::Direct { start, .. } = self.ids {
                    std::os::unix::fs::chown(&req.dir, Some(start), Some(start)).map_err(|e| {
                        SandboxError::IdMap(format!("chown {}: {e}", req.dir.display()))
                    })?;
                }
                self.ids.apply(child.id())?;
                let header = serde_json::to_string(req).map_err(|e| helper_err(e.into()))?;
                let feed = s.spawn(move || -> io::Result<()> {
                    stdin.write_all(format!("G\n{header}\n").as_bytes())?;
                    io::copy(&mut tree, &mut stdin)?;
                    Ok(())
                });
                let value = out(&mut stdout);
                // Whatever `out` left is drained, so the helper never blocks.
                let _ = io::copy(&mut stdout, &mut io::sink());
                let fed = feed.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                Ok((value, fed))
            })();
            let status = child.wait();
            let errors = errors.join().unwrap_or_default();
            (r, status, errors)
        });
        let (r, status, errors) = result;
        let status = status.map_err(helper_err)?;
        let text = String::from_utf8_lossy(&errors);
        let tail = |t: &str| {
            let start = t.len().saturating_sub(TAIL);
            let start = (start..t.len())
                .find(|i| t.is_char_boundary(*i))
                .unwrap_or(t.len());
            t[start..].trim_end().to_string()
        };
        if !status.success() {
            // The helper's last line says what failed.
            if let Some(failed) = text
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix(helper::FAILED))
            {
                let (label, how) = failed.split_once('\t').unwrap_or((failed, "failed"));
                // Only what the failing step printed.
                let before = text
                    .rfind(helper::FAILED)
                    .map(|i| &text[..i])
                    .unwrap_or_default();
                let before = before
                    .rfind(helper::STEP)
                    .map(|i| &before[i..])
                    .and_then(|s| s.split_once('\n'))
                    .map_or(before, |(_, rest)| rest);
                return Err(SandboxError::StepFailed {
                    label: label.to_string(),
                    status: how.to_string(),
                    output: tail(before),
                });
            }
            if let Some(m) = text
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix(helper::ERROR))
            {
                return Err(SandboxError::Failed {
                    message: m.to_string(),
                });
            }
            if let Err(e) = r {
                return Err(e);
            }
            return Err(SandboxError::Failed {
                message: format!("helper exited with {status}: {}", tail(&text)),
            });
        }
        let (value, fed) = r?;
        fed.map_err(helper_err)?;
        value.map_err(helper_err)
    }
}

impl Sandbox {
    /// Removes `dir`, a tree a killed build left: its files belong to the
    /// mapped ids, which the calling user may not be able to remove, so
    /// the helper empties it as root inside (a request with no step).
    pub fn remove(&self, dir: &Path) -> Result<(), SandboxError> {
        let req = Request {
            dir: dir.to_path_buf(),
            epoch: 0,
            steps: Vec::new(),
        };
        self.run(&req, io::empty(), |tree| {
            io::copy(tree, &mut io::sink()).map(drop)
        })?;
        std::fs::remove_dir(dir).map_err(|source| SandboxError::Helper {
            program: self.program.display().to_string(),
            source,
        })
    }
}

/// Whether `path` is a directory holding nothing (the request's `dir`).
pub fn is_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_none())
}
