//! Configuring a Debian image as dpkg would after unpacking it: every
//! `preinst install`, then every `postinst configure` in dependency order,
//! then the triggers they activate (`postinst triggered`), run as root inside [`kiln_sandbox`] over the image's tree, with services
//! kept from starting (`policy-rc.d`) and `SOURCE_DATE_EPOCH` from the
//! lock. The configured tree is kept in the cache by its inputs (package
//! digests, epoch, kiln's version), so a rebuild runs no script.

use crate::cache::{Cache, Digest};
use crate::debian::dpkg::{Installed, ADMINDIR};
use crate::fetch::{commit_ref, parse_plain, store_plain, FetchError};
use crate::layers;
use kiln_formats::tree::{Node, Tree};
use kiln_sandbox::{Request, Sandbox, SandboxError, Step};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;

/// Errors from configuring an image.
#[derive(Debug, thiserror::Error)]
pub enum ConfigureError {
    /// The build has no way to start the sandbox.
    #[error("container {0}: maintainer scripts need the sandbox helper (`kiln __sandbox`), which this build was not given")]
    NoSandbox(String),
    /// The sandbox failed, or a script in it.
    #[error("container {container}: configuring its packages")]
    Sandbox {
        /// The container.
        container: String,
        /// The underlying error.
        source: SandboxError,
    },
    /// Reading or keeping the tree failed.
    #[error("container {container}: configuring its packages")]
    Fetch {
        /// The container.
        container: String,
        /// The underlying error.
        source: Box<FetchError>,
    },
    /// The configured tree could not be applied.
    #[error("container {container}: the configured tree")]
    Layer {
        /// The container.
        container: String,
        /// The underlying error.
        source: Box<layers::LayerError>,
    },
}

/// Cache record kind: configuration inputs → digest of the configured tar.
const CONFIGURED_REF: &str = "configured";
/// Bumped when the way images are configured changes.
const VERSION: &str = "kiln configure v4";
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A container's unpacked image, and what its configured tree depends on.
pub struct Unpacked<'a> {
    /// The container.
    pub container: &'a str,
    /// Its tree, unpacked, with dpkg's database and users.
    pub tree: &'a Tree,
    /// Its packages' control files.
    pub installed: &'a [Installed],
    /// Its packages' .deb digests.
    pub debs: &'a [Digest],
    /// The recipe's files for the image, one line each (path, mode,
    /// owner, content digest).
    pub files: &'a str,
    /// The lock's `source_date_epoch`.
    pub epoch: u64,
}

/// The configured tree of `image`.
pub fn configure(
    image: &Unpacked<'_>,
    cache: &Cache,
    sandbox: Option<&Sandbox>,
) -> Result<Tree, ConfigureError> {
    let Unpacked {
        container,
        tree,
        installed,
        debs,
        files,
        epoch,
    } = *image;
    let fetch_err = |e: FetchError| ConfigureError::Fetch {
        container: container.to_string(),
        source: Box::new(e),
    };
    let key = cache_key(debs, files, epoch);
    let name = format!("{container} (configured)");
    let cached = cache
        .read_ref(CONFIGURED_REF, &key)
        .and_then(|d| d.parse::<Digest>().ok())
        .and_then(|d| parse_plain(&name, d, &cache.blob_path(&d), &d).ok());
    let parsed = match cached {
        Some(p) => p,
        None => {
            let sandbox = sandbox.ok_or_else(|| ConfigureError::NoSandbox(container.into()))?;
            sweep(&cache.dir().join("configure"), |p| {
                // Best effort: what stays is tried again by the next build.
                let _ = sandbox.remove(p);
            });
            let dir = cache.dir().join("configure").join(format!(
                "{}-{}",
                std::process::id(),
                &key[..16]
            ));
            std::fs::create_dir_all(&dir).map_err(|e| {
                fetch_err(FetchError::Read {
                    what: dir.display().to_string(),
                    source: e,
                })
            })?;
            let req = Request {
                dir: dir.clone(),
                epoch,
                steps: steps(installed, epoch),
            };
            let (reader, mut writer) = std::io::pipe().map_err(|e| {
                fetch_err(FetchError::Read {
                    what: "a pipe".into(),
                    source: e,
                })
            })?;
            let digest = Digest::of(key.as_bytes());
            let result = std::thread::scope(|s| {
                let feed = s.spawn(move || write_tar(tree, &mut writer));
                let r = sandbox.run(&req, reader, |out| {
                    store_plain(cache, &name, digest, layers::Compression::None, out)
                        .map_err(std::io::Error::other)
                });
                let fed = feed.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                (r, fed)
            });
            let _ = std::fs::remove_dir(&dir);
            let (parsed, blob) = match result {
                (Ok(v), _) => v,
                // A tree that could not be read is why the helper failed
                // (a closed pipe is only that the helper stopped reading).
                (Err(_), Err(e)) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    return Err(fetch_err(FetchError::Read {
                        what: "the tree for its scripts".into(),
                        source: e,
                    }))
                }
                (Err(source), _) => {
                    return Err(ConfigureError::Sandbox {
                        container: container.to_string(),
                        source,
                    })
                }
            };
            commit_ref(cache, CONFIGURED_REF, &key, blob).map_err(fetch_err)?;
            parsed
        }
    };
    let mut out = Tree::new();
    layers::apply_parsed(&mut out, &parsed).map_err(|source| ConfigureError::Layer {
        container: container.to_string(),
        source: Box::new(source),
    })?;
    out.root.meta = tree.root.meta.clone();
    Ok(out)
}

/// What the configured tree depends on: the packages, the recipe's files
/// for the image (`files`, one line each), the epoch, kiln's version.
/// Removes (with `remove`: the sandbox, as their files belong to ids the
/// user may only handle as root inside) what killed builds left in `dir`:
/// entries named `PID-...` whose process is gone.
fn sweep(dir: &Path, remove: impl Fn(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let pid = name.to_string_lossy().split('-').next().map(str::to_string);
        let Some(pid) = pid.filter(|p| p.parse::<u32>().is_ok()) else {
            continue;
        };
        if !Path::new("/proc").join(&pid).exists() {
            remove(&e.path());
        }
    }
}

fn cache_key(debs: &[Digest], files: &str, epoch: u64) -> String {
    let mut sorted = debs.to_vec();
    sorted.sort();
    let mut text = format!(
        "{VERSION}\nkiln {}\nepoch {epoch}\n{files}",
        env!("CARGO_PKG_VERSION")
    );
    for d in sorted {
        text.push_str(&d.to_string());
        text.push('\n');
    }
    Digest::of(text.as_bytes()).hex()
}

/// Package names a control's `Pre-Depends` and `Depends` mention (every
/// alternative, versions and architectures dropped).
fn depends(i: &Installed) -> BTreeSet<String> {
    ["Pre-Depends", "Depends"]
        .iter()
        .filter_map(|f| i.control.field(f))
        .flat_map(|v| {
            v.split([',', '|'])
                .filter_map(|d| d.split_whitespace().next())
                .map(|n| n.split(':').next().unwrap_or(n).to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Packages in the order dpkg configures them: dependencies first (cycles
/// broken in name order), otherwise by name.
fn order(installed: &[Installed]) -> Vec<&Installed> {
    let by_name: BTreeMap<String, &Installed> = installed
        .iter()
        .filter_map(|i| Some((i.control.field("Package")?, i)))
        .collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    fn visit<'a>(
        name: &str,
        by_name: &BTreeMap<String, &'a Installed>,
        done: &mut BTreeSet<String>,
        out: &mut Vec<&'a Installed>,
    ) {
        let Some(i) = by_name.get(name) else { return };
        if !done.insert(name.to_string()) {
            return;
        }
        for d in depends(i) {
            visit(&d, by_name, done, out);
        }
        out.push(i);
    }
    for name in by_name.keys() {
        visit(name, &by_name, &mut done, &mut out);
    }
    out
}

/// The steps: policy-rc.d in, preinsts, postinsts, triggers, policy-rc.d
/// out, cleanup.
fn steps(installed: &[Installed], epoch: u64) -> Vec<Step> {
    let base_env = vec![
        ("PATH".to_string(), PATH.to_string()),
        ("HOME".into(), "/root".into()),
        ("LC_ALL".into(), "C".into()),
        ("DEBIAN_FRONTEND".into(), "noninteractive".into()),
        ("DEBCONF_NONINTERACTIVE_SEEN".into(), "true".into()),
        ("DPKG_ADMINDIR".into(), ADMINDIR.into()),
        ("DPKG_ROOT".into(), String::new()),
        ("SOURCE_DATE_EPOCH".into(), epoch.to_string()),
    ];
    let shell = |label: &str, script: &str| Step {
        label: label.to_string(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: base_env.clone(),
    };
    let mut steps = vec![shell(
        "policy-rc.d",
        &format!("printf '#!/bin/sh\\nexit 101\\n' > {POLICY_RC_D} && chmod 755 {POLICY_RC_D}"),
    )];
    let ordered = order(installed);
    for (script, args) in [
        ("preinst", &["install"][..]),
        ("postinst", &["configure", ""][..]),
    ] {
        for i in &ordered {
            let (Some(info), Some(pkg)) = (i.control.info_name(), i.control.field("Package"))
            else {
                continue;
            };
            if !i.control.scripts.contains_key(script) {
                continue;
            }
            let mut env = base_env.clone();
            env.push(("DPKG_MAINTSCRIPT_PACKAGE".into(), pkg.clone()));
            env.push((
                "DPKG_MAINTSCRIPT_ARCH".into(),
                i.control.field("Architecture").unwrap_or_default(),
            ));
            env.push(("DPKG_MAINTSCRIPT_NAME".into(), script.into()));
            let mut argv = vec![format!("{ADMINDIR}/info/{info}.{script}")];
            argv.extend(args.iter().map(|a| a.to_string()));
            steps.push(Step {
                label: format!("{pkg} {script}"),
                argv,
                env,
            });
        }
    }
    // Then dpkg's "Processing triggers for ..." (libc-bin's ldconfig,
    // debianutils' shells, ...).
    for (i, names) in triggered(&ordered) {
        let (Some(info), Some(pkg)) = (i.control.info_name(), i.control.field("Package")) else {
            continue;
        };
        let mut env = base_env.clone();
        env.push(("DPKG_MAINTSCRIPT_PACKAGE".into(), pkg.clone()));
        env.push(("DPKG_MAINTSCRIPT_NAME".into(), "postinst".into()));
        steps.push(Step {
            label: format!("{pkg} postinst triggered"),
            argv: vec![
                format!("{ADMINDIR}/info/{info}.postinst"),
                "triggered".into(),
                names.join(" "),
            ],
            env,
        });
    }
    steps.push(shell("policy-rc.d out", &format!("rm -f {POLICY_RC_D}")));
    // What scripts leave that records when they ran, not what they did
    // (as mmdebstrap's cleanup): the image stays reproducible.
    // Secrets scripts generate for "this host" would be shared by every
    // host the image boots, and differ between builds: removed, with the
    // snakeoil certificate's hash link.
    steps.push(shell(
        "cleanup",
        &format!(
            "rm -f {} {}; for l in /etc/ssl/certs/*.0; do \
             [ \"$(readlink \"$l\")\" = ssl-cert-snakeoil.pem ] && rm -f \"$l\"; done; true",
            UNREPRODUCIBLE.join(" "),
            PER_HOST_SECRETS.join(" ")
        ),
    ));
    steps
}

/// The packages whose triggers the others activate, in configure order,
/// each with its activated triggers: a file trigger by another package
/// shipping a path under it, any trigger by another package's `activate`
/// directive. (A package's own activations are what its `postinst
/// configure` already handled, as dpkg treats them when both happen in one
/// run.)
fn triggered<'a>(ordered: &[&'a Installed]) -> Vec<(&'a Installed, Vec<String>)> {
    let name = |i: &Installed| i.control.field("Package").unwrap_or_default();
    let activated_by = |trigger: &str, me: &str| {
        ordered.iter().any(|other| {
            if name(other) == me {
                return false;
            }
            let explicit = other
                .control
                .triggers()
                .iter()
                .any(|(d, t)| d.starts_with("activate") && t == trigger);
            explicit
                || (trigger.starts_with('/')
                    && other.paths.iter().any(|p| {
                        let p = p.trim_end_matches('/');
                        p.strip_prefix(trigger)
                            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
                    }))
        })
    };
    ordered
        .iter()
        .filter(|i| i.control.scripts.contains_key("postinst"))
        .filter_map(|i| {
            let me = name(i);
            let names: Vec<String> = i
                .control
                .triggers()
                .into_iter()
                .filter(|(d, t)| d.starts_with("interest") && activated_by(t, &me))
                .map(|(_, t)| t)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            (!names.is_empty()).then_some((*i, names))
        })
        .collect()
}

/// Keys and certificates scripts generate for the machine they run on.
const PER_HOST_SECRETS: [&str; 3] = [
    "/etc/ssh/ssh_host_*_key*",
    "/etc/ssl/private/ssl-cert-snakeoil.key",
    "/etc/ssl/certs/ssl-cert-snakeoil.pem",
];

/// Files configuration leaves with times or inode numbers in them.
const UNREPRODUCIBLE: [&str; 6] = [
    "/var/log/alternatives.log",
    "/var/log/dpkg.log",
    "/var/cache/ldconfig/aux-cache",
    "/var/cache/debconf/*-old",
    "/var/lib/dpkg/*-old",
    "/etc/machine-id",
];

/// Writes `tree` as a tar stream (device nodes and sockets left out: the
/// sandbox cannot make them).
fn write_tar(tree: &Tree, out: &mut impl Write) -> std::io::Result<()> {
    let mut b = tar::Builder::new(out);
    for (path, node) in tree.walk() {
        let rel = path.strip_prefix("/").unwrap_or(&path);
        let meta = node.meta();
        let mut h = tar::Header::new_gnu();
        h.set_mode(meta.mode & 0o7777);
        h.set_uid(meta.uid.into());
        h.set_gid(meta.gid.into());
        h.set_mtime(meta.mtime);
        match node {
            Node::Dir(_) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, rel, std::io::empty())?;
            }
            Node::File { data, .. } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len());
                b.append_data(&mut h, rel, data.reader())?;
            }
            Node::Symlink { target, .. } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, rel, Path::new(target))?;
            }
            Node::Fifo { .. } => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_size(0);
                b.append_data(&mut h, rel, std::io::empty())?;
            }
            Node::Device { .. } | Node::Socket { .. } => {}
        }
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::debian::dpkg::Control;

    fn pkg(name: &str, depends: &str, scripts: &[&str]) -> Installed {
        Installed {
            control: Control {
                control: format!("Package: {name}\nArchitecture: amd64\nDepends: {depends}\n")
                    .into_bytes(),
                md5sums: None,
                conffiles: None,
                scripts: scripts
                    .iter()
                    .map(|s| (s.to_string(), b"#!/bin/sh\n".to_vec()))
                    .collect(),
            },
            paths: vec![],
        }
    }

    #[test]
    fn dependencies_are_configured_first() {
        let installed = [
            pkg(
                "nginx",
                "nginx-common (= 1), libc6 (>= 2.36) | libc6-udeb",
                &["postinst"],
            ),
            pkg("libc6", "libgcc-s1", &["postinst", "preinst"]),
            pkg(
                "nginx-common",
                "debconf, lsb-base:any",
                &["postinst", "preinst"],
            ),
            pkg("libgcc-s1", "libc6", &[]),
        ];
        let labels: Vec<String> = steps(&installed, 5).into_iter().map(|s| s.label).collect();
        assert_eq!(
            labels,
            [
                "policy-rc.d",
                "libc6 preinst",
                "nginx-common preinst",
                "libc6 postinst",
                "nginx-common postinst",
                "nginx postinst",
                "policy-rc.d out",
                "cleanup"
            ]
        );
        let s = steps(&installed, 5);
        let post = s.iter().find(|s| s.label == "nginx postinst").unwrap();
        assert_eq!(
            post.argv,
            ["/var/lib/dpkg/info/nginx.postinst", "configure", ""]
        );
        assert!(post
            .env
            .contains(&("DPKG_MAINTSCRIPT_PACKAGE".into(), "nginx".into())));
        assert!(post.env.contains(&("SOURCE_DATE_EPOCH".into(), "5".into())));
    }

    #[test]
    fn triggers_run_for_what_other_packages_activate() {
        let with = |mut i: Installed, triggers: &str, paths: &[&str]| {
            i.control
                .scripts
                .insert("triggers".into(), triggers.as_bytes().to_vec());
            i.paths = paths.iter().map(|p| p.to_string()).collect();
            i
        };
        let installed = [
            with(
                pkg("libc-bin", "", &["postinst"]),
                "interest-await ldconfig\n",
                &["/sbin/ldconfig"],
            ),
            with(
                pkg("libssl", "libc-bin", &[]),
                "activate-noawait ldconfig\n",
                &["/usr/lib/libssl.so.3"],
            ),
            with(
                pkg("debianutils", "", &["postinst"]),
                "interest-noawait /usr/share/debianutils/shells.d\ninterest-noawait /usr/share/nothing\n",
                &["/usr/share/debianutils/shells.d/"],
            ),
            // Its own file and its own activation do not count.
            with(
                pkg("self", "", &["postinst"]),
                "interest /usr/share/self\ninterest self-reload\nactivate self-reload\n",
                &["/usr/share/self/x"],
            ),
            with(
                pkg("bash", "", &[]),
                "",
                &["/usr/share/debianutils/shells.d/bash", "/usr/share/selfish"],
            ),
        ];
        let s = steps(&installed, 5);
        let triggered: Vec<(&str, &[String])> = s
            .iter()
            .filter(|s| s.label.ends_with("triggered"))
            .map(|s| (s.label.as_str(), &s.argv[1..]))
            .collect();
        assert_eq!(
            triggered,
            [
                (
                    "debianutils postinst triggered",
                    &[
                        "triggered".to_string(),
                        "/usr/share/debianutils/shells.d".into()
                    ][..]
                ),
                (
                    "libc-bin postinst triggered",
                    &["triggered".to_string(), "ldconfig".into()][..]
                ),
            ]
        );
    }

    #[test]
    fn sweep_removes_only_what_dead_builds_left() {
        let dir = std::env::temp_dir().join(format!("kiln-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // No process has a pid this large (pid_max is at most 2^22).
        let dead = dir.join("99999999-abcd");
        let alive = dir.join(format!("{}-abcd", std::process::id()));
        let other = dir.join("notes");
        for d in [&dead, &alive, &other] {
            std::fs::create_dir_all(d.join("etc")).unwrap();
        }
        sweep(&dir, |p| std::fs::remove_dir_all(p).unwrap());
        assert!(!dead.exists() && alive.exists() && other.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cache_key_depends_on_packages_and_epoch() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        assert_eq!(cache_key(&[a, b], "", 1), cache_key(&[b, a], "", 1));
        assert_ne!(cache_key(&[a, b], "", 1), cache_key(&[a, b], "", 2));
        assert_ne!(cache_key(&[a], "", 1), cache_key(&[a, b], "", 1));
        assert_ne!(
            cache_key(&[a], "", 1),
            cache_key(&[a], "/etc/x 644 0:0 d\n", 1)
        );
    }
}
