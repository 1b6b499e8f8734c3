//! The sandbox against the real kernel: a tree with the host's static
//! busybox, scripts run as root inside, and what they can and cannot do.

use kiln_sandbox::{IdMap, Request, Sandbox, SandboxError, Step};
use std::io::Read;
use std::path::{Path, PathBuf};

const BUSYBOX: &str = "/bin/busybox";

fn busybox() -> Option<Vec<u8>> {
    let data = std::fs::read(BUSYBOX).ok()?;
    // Only a static one runs alone in the tree (package busybox-static).
    let out = std::process::Command::new("file")
        .arg(BUSYBOX)
        .output()
        .ok();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if text.is_some_and(|t| !t.contains("statically linked")) {
        return None;
    }
    Some(data)
}

fn header() -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// busybox as /bin/busybox and /bin/sh, /etc, /var.
fn tree(busybox: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, p: &str| {
        let mut h = header();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(1_000);
        b.append_data(&mut h, p, std::io::empty()).unwrap();
    };
    for d in ["bin", "etc", "var"] {
        dir(&mut b, d);
    }
    let mut h = header();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    h.set_mtime(1_000);
    b.append_data(&mut h, "bin/busybox", busybox).unwrap();
    let mut h = header();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_size(0);
    b.append_link(&mut h, "bin/sh", "busybox").unwrap();
    b.into_inner().unwrap()
}

fn sandbox() -> Sandbox {
    Sandbox {
        program: PathBuf::from(env!("CARGO_BIN_EXE_kiln-sandbox")),
        args: Vec::new(),
        ids: IdMap::for_current_user(),
    }
}

/// A fresh directory, removed when the test ends.
fn dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("kiln-sandbox-{name}-"))
        .tempdir()
        .unwrap()
}

fn script(label: &str, text: &str) -> Step {
    Step {
        label: label.into(),
        argv: vec!["/bin/sh".into(), "-c".into(), text.into()],
        env: vec![("PATH".into(), "/bin".into())],
    }
}

/// (path, uid, gid, mtime, contents) of every entry of a tar stream.
type Entries = Vec<(String, u64, u64, u64, Vec<u8>)>;

fn entries(r: &mut dyn Read) -> std::io::Result<Entries> {
    let mut out = Vec::new();
    for e in tar::Archive::new(r).entries()? {
        let mut e = e?;
        let h = e.header().clone();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        out.push((
            String::from_utf8_lossy(&e.path_bytes()).into_owned(),
            h.uid()?,
            h.gid()?,
            h.mtime()?,
            data,
        ));
    }
    Ok(out)
}

/// Root inside owns everything and can chown to any mapped id; what the
/// steps make comes back with those owners and mtimes clamped; kernel
/// filesystems stay out; the directory is left empty.
#[test]
fn steps_run_as_root_and_the_tree_comes_back() {
    let Some(bb) = busybox() else {
        eprintln!("note: no static {BUSYBOX}; skipping");
        return;
    };
    // Below a directory only its owner may enter (a 0700 home): root
    // inside (other ids, as root) still reaches it.
    let private = dir("private");
    let private = private.path();
    let work = private.join("cache").join("work");
    std::fs::create_dir_all(&work).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let req = Request {
        dir: work.clone(),
        epoch: 1_700_000_000,
        steps: vec![
            script(
                "first",
                "echo \"uid $(id -u) pid $$ host $(hostname)\"; echo made > /etc/made; chown 33:34 /etc/made; ln /etc/made /etc/again",
            ),
            script("second", "mkdir -p /var/lib/x && touch /run/gone /tmp/gone && cat /etc/made >&2"),
        ],
    };
    let got = sandbox().run(&req, &tree(&bb)[..], entries).unwrap();
    let find = |p: &str| got.iter().find(|e| e.0.trim_end_matches('/') == p);
    // Hardlinked: the first name in sorted order carries the data.
    let made = find("etc/again").expect("etc/again");
    assert_eq!((made.1, made.2, &made.4[..]), (33, 34, &b"made\n"[..]));
    assert!(made.3 <= 1_700_000_000);
    assert_eq!(find("bin/busybox").unwrap().3, 1_000, "kept mtime");
    assert!(find("var/lib/x").is_some());
    assert!(find("etc/made").is_some(), "hardlink");
    assert!(find("run/gone").is_none() && find("tmp/gone").is_none());
    assert!(!got
        .iter()
        .any(|e| e.0.starts_with("proc/") || e.0.starts_with("dev/")));
    assert!(
        kiln_sandbox::is_empty_dir(&work),
        "tree left in {}",
        work.display()
    );
}

/// A step cannot write to the host, change the host's kernel settings or
/// reach a host listener; its failure is reported with its output.
#[test]
fn steps_cannot_touch_the_host() {
    let Some(bb) = busybox() else {
        eprintln!("note: no static {BUSYBOX}; skipping");
        return;
    };
    let (hostile, marked) = (dir("hostile"), dir("marker"));
    let work = hostile.path().to_path_buf();
    let marker = marked.path().join("pwned");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let swappiness = std::fs::read_to_string("/proc/sys/vm/swappiness").unwrap();
    let text = format!(
        "mkdir -p {dir}; echo pwned > {m}; echo 7 > /proc/sys/vm/swappiness; \
         echo x | nc -w 2 127.0.0.1 {port}; echo hostile-step-ran; exit 3",
        dir = marker.parent().unwrap().display(),
        m = marker.display()
    );
    let req = Request {
        dir: work.clone(),
        epoch: 1,
        steps: vec![script("hostile postinst", &text)],
    };
    let e = sandbox()
        .run(&req, &tree(&bb)[..], entries)
        .expect_err("the step fails");
    let SandboxError::StepFailed {
        label,
        status,
        output,
    } = &e
    else {
        panic!("{e}")
    };
    assert_eq!(
        (label.as_str(), status.as_str()),
        ("hostile postinst", "exit status 3")
    );
    assert!(output.contains("hostile-step-ran"), "{output}");
    assert!(!output.contains("kiln-sandbox"), "{output}");
    assert!(!marker.exists(), "the step wrote to the host");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/vm/swappiness").unwrap(),
        swappiness
    );
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the step reached the host's listener"
    );
    assert!(kiln_sandbox::is_empty_dir(&work));
}

/// What a killed build left, owned by mapped ids the caller may not
/// remove (here a 0700 directory of uid 33 inside), is removed.
#[test]
fn leftover_trees_are_removed() {
    let sandbox = sandbox();
    let left = dir("leftover");
    let work = left.path().to_path_buf();
    let deep = work.join("var/lib/private");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("secret"), "x").unwrap();
    std::fs::create_dir_all(work.join("proc")).unwrap();
    if let IdMap::Direct { start, .. } = sandbox.ids {
        use std::os::unix::fs::{chown, PermissionsExt};
        for (p, id) in [
            (&work, start),
            (&work.join("var"), start),
            (&work.join("var/lib"), start),
            (&work.join("proc"), start),
            (&deep, start + 33),
            (&deep.join("secret"), start + 33),
        ] {
            chown(p, Some(id), Some(id)).unwrap();
        }
        std::fs::set_permissions(&deep, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    sandbox.remove(&work).unwrap();
    assert!(!work.exists(), "{} is still there", work.display());
}

/// Where user namespaces are forbidden the error says how to allow them.
#[test]
fn forbidden_user_namespaces_are_explained() {
    let Some(bb) = busybox() else {
        eprintln!("note: no static {BUSYBOX}; skipping");
        return;
    };
    let helper = env!("CARGO_BIN_EXE_kiln-sandbox");
    // The helper runs in a user namespace that may create none.
    let s = Sandbox {
        program: PathBuf::from("unshare"),
        args: vec![
            "--user".into(),
            "--map-root-user".into(),
            "sh".into(),
            "-c".into(),
            format!("echo 0 > /proc/sys/user/max_user_namespaces && exec {helper}").into(),
        ],
        ids: sandbox().ids,
    };
    let forbidden = dir("forbidden");
    let req = Request {
        dir: forbidden.path().to_path_buf(),
        epoch: 1,
        steps: vec![],
    };
    let e = s
        .run(&req, &tree(&bb)[..], entries)
        .expect_err("no namespace");
    assert!(matches!(e, SandboxError::NoUserNamespaces { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("user.max_user_namespaces") && text.contains("scripts = false"),
        "{text}"
    );
    let _ = Path::new(&req.dir);
}
