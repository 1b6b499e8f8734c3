//! The helper process: enters the namespaces, unpacks the tree, runs the
//! steps, writes the tree back. It starts single-threaded and stays so,
//! which is what makes `fork` here sound.

use crate::Request;
use std::collections::HashMap;
use std::ffi::CString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The environment variable naming the directory that holds the
/// request's `dir`.
pub(crate) const DIR_ENV: &str = "KILN_SANDBOX_PARENT";

/// Prefix of the helper's last stderr line when a step failed:
/// `FAILED label \t how`.
pub(crate) const FAILED: &str = "kiln-sandbox-step-failed\t";
/// Line the helper writes to stderr before each step's output.
pub(crate) const STEP: &str = "kiln-sandbox-step\t";
/// Prefix of the helper's last stderr line when anything else failed.
pub(crate) const ERROR: &str = "kiln-sandbox-error\t";

/// Kernel filesystems mounted over the tree: their contents are never
/// part of the result.
const MOUNTED: [&str; 4] = ["proc", "dev", "run", "tmp"];
const OLD_ROOT: &str = ".kiln-old-root";

/// The helper's `main`: never returns.
pub fn helper_main() -> ! {
    let code = match enter() {
        Ok(code) => code,
        Err(message) => {
            eprintln!("{ERROR}{message}");
            1
        }
    };
    std::process::exit(code)
}

fn os(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

fn cstr(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{}: NUL in path", p.display()))
}

/// Enters the namespaces and runs the tree's PID 1; returns its exit code.
fn enter() -> Result<i32, String> {
    // Entered now, as the calling user: root inside may not be able to
    // walk the cache's ancestors (a 0700 home), so every later path is
    // relative to here.
    let parent = std::env::var_os(DIR_ENV).ok_or_else(|| format!("{DIR_ENV} is not set"))?;
    std::env::set_current_dir(&parent)
        .map_err(|e| format!("chdir {}: {e}", Path::new(&parent).display()))?;
    let mut out = io::stdout().lock();
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != 0 {
        let _ = writeln!(out, "E{}", io::Error::last_os_error());
        let _ = out.flush();
        return Ok(2);
    }
    writeln!(out, "U")
        .and_then(|()| out.flush())
        .map_err(|e| format!("greeting: {e}"))?;
    drop(out);
    let mut input = BufReader::new(io::stdin().lock());
    let mut line = String::new();
    input
        .read_line(&mut line)
        .map_err(|e| format!("reading: {e}"))?;
    if line != "G\n" {
        return Err("the parent did not map ids".into());
    }
    let parent_pid = std::os::unix::process::parent_id();
    // SAFETY: plain system calls on integers.
    unsafe {
        if libc::setresgid(0, 0, 0) != 0 {
            return Err(os("setresgid"));
        }
        if libc::setresuid(0, 0, 0) != 0 {
            return Err(os("setresuid"));
        }
        // Dies with kiln, so a killed build stops its scripts (the next
        // build sweeps the tree). Set after the id change, which clears it.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(os("prctl"));
        }
        if std::os::unix::process::parent_id() != parent_pid {
            return Err("kiln is gone".into());
        }
        let flags = libc::CLONE_NEWNS
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWPID;
        if libc::unshare(flags) != 0 {
            return Err(os("unshare"));
        }
    }
    // SAFETY: this process has one thread (the helper never starts
    // another), so the child may do anything a process may.
    match unsafe { libc::fork() } {
        -1 => Err(os("fork")),
        0 => {
            // And with the helper: PID 1 gone, the kernel kills the rest.
            // SAFETY: prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
                eprintln!("{ERROR}{}", os("prctl"));
                std::process::exit(1)
            }
            let code = match pid1(&mut input) {
                Ok(code) => code,
                Err(message) => {
                    eprintln!("{ERROR}{message}");
                    1
                }
            };
            std::process::exit(code)
        }
        pid => Ok(wait(pid)?.0),
    }
}

/// Waits for `pid`: its exit code (128 + signal when killed) and a text.
fn wait(pid: libc::pid_t) -> Result<(i32, String), String> {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(os("waitpid"));
        }
    }
    if libc::WIFEXITED(status) {
        let c = libc::WEXITSTATUS(status);
        Ok((c, format!("exit status {c}")))
    } else {
        let s = libc::WTERMSIG(status);
        Ok((128 + s, format!("killed by signal {s}")))
    }
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let what = format!("mounting {}", target.display());
    let src = src.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype
        .map(|f| CString::new(f).map_err(|_| what.clone()))
        .transpose()?;
    let data = data
        .map(|d| CString::new(d).map_err(|_| what.clone()))
        .transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string alive for the call,
    // or null where mount(2) allows it.
    let r = unsafe {
        libc::mount(
            ptr(&src),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if r != 0 {
        return Err(os(&what));
    }
    Ok(())
}

/// PID 1 of the sandbox: builds the root, runs the steps, writes the tree.
fn pid1(input: &mut impl BufRead) -> Result<i32, String> {
    let mut line = String::new();
    input
        .read_line(&mut line)
        .map_err(|e| format!("reading the request: {e}"))?;
    let req: Request = serde_json::from_str(&line).map_err(|e| format!("bad request: {e}"))?;
    // Relative to the current directory, its parent.
    let dir = PathBuf::from(req.dir.file_name().ok_or("the request's dir has no name")?);
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let mut pivoted = false;
    let result = configure(&req, input, &dir, &mut pivoted);
    // The tree is removed whatever happened (only root inside can: its
    // files belong to the mapped ids).
    let cleaned = clean(if pivoted { Path::new("/") } else { &dir });
    let code = result?;
    cleaned?;
    Ok(code)
}

fn configure(
    req: &Request,
    input: &mut impl Read,
    dir: &Path,
    pivoted: &mut bool,
) -> Result<i32, String> {
    make_root(dir, pivoted)?;
    unpack(input, Path::new("/"))?;
    for step in &req.steps {
        eprintln!("{STEP}{}", step.label);
        let (code, how) = run_step(step)?;
        if code != 0 {
            eprintln!("{FAILED}{}\t{how}", step.label);
            return Ok(1);
        }
    }
    let mut out = io::BufWriter::new(io::stdout().lock());
    write_tree(&mut out, req.epoch).map_err(|e| format!("writing the tree: {e}"))?;
    out.flush().map_err(|e| format!("writing the tree: {e}"))?;
    Ok(0)
}

/// Unpacks the tar stream into `dir`, owners and modes as given (device
/// nodes cannot be made in a user namespace, and the kernel filesystems
/// mounted over the tree hide what would go there: both are left out).
fn unpack(input: &mut impl Read, dir: &Path) -> Result<(), String> {
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let entries = archive
        .entries()
        .map_err(|e| format!("reading the tree: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("reading the tree: {e}"))?;
        let path = entry.path_bytes().into_owned();
        let path = path.strip_prefix(b"./").unwrap_or(&path);
        let top = path.split(|b| *b == b'/').next().unwrap_or_default();
        if matches!(
            entry.header().entry_type(),
            tar::EntryType::Char | tar::EntryType::Block
        ) || MOUNTED.iter().any(|m| m.as_bytes() == top)
        {
            continue;
        }
        entry.unpack_in(dir).map_err(|e| {
            let mut msg = format!("unpacking {}", String::from_utf8_lossy(&entry.path_bytes()));
            let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(&e);
            while let Some(c) = cause {
                msg = format!("{msg}: {c}");
                cause = c.source();
            }
            msg
        })?;
    }
    Ok(())
}

/// Mounts /proc, a minimal /dev, /run and /tmp, then makes `dir` the root.
fn make_root(dir: &Path, pivoted: &mut bool) -> Result<(), String> {
    let mkdir = |p: &Path| std::fs::create_dir_all(p).map_err(|e| format!("{}: {e}", p.display()));
    mount(Some(dir), dir, None, libc::MS_BIND | libc::MS_REC, None)?;
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    let proc = dir.join("proc");
    mkdir(&proc)?;
    mount(
        Some(Path::new("proc")),
        &proc,
        Some("proc"),
        nosuid_nodev | libc::MS_NOEXEC,
        None,
    )?;
    let dev = dir.join("dev");
    mkdir(&dev)?;
    mount(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=755"),
    )?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let at = dev.join(node);
        std::fs::write(&at, b"").map_err(|e| format!("{}: {e}", at.display()))?;
        mount(
            Some(&Path::new("/dev").join(node)),
            &at,
            None,
            libc::MS_BIND,
            None,
        )?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name))
            .map_err(|e| format!("/dev/{name}: {e}"))?;
    }
    for (name, mode) in [("run", "mode=755"), ("tmp", "mode=1777")] {
        let at = dir.join(name);
        mkdir(&at)?;
        mount(
            Some(Path::new("tmpfs")),
            &at,
            Some("tmpfs"),
            nosuid_nodev,
            Some(mode),
        )?;
    }
    let old = dir.join(OLD_ROOT);
    mkdir(&old)?;
    std::env::set_current_dir(dir).map_err(|e| format!("chdir {}: {e}", dir.display()))?;
    let dot = c".";
    let old_c = CString::new(OLD_ROOT).map_err(|_| "old root name".to_string())?;
    // SAFETY: both are NUL-terminated strings alive for the call.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), old_c.as_ptr()) } != 0 {
        return Err(os("pivot_root"));
    }
    *pivoted = true;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    let old_abs = CString::new(format!("/{OLD_ROOT}")).map_err(|_| "old root name".to_string())?;
    // SAFETY: a NUL-terminated string alive for the call.
    if unsafe { libc::umount2(old_abs.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(os("detaching the host's root"));
    }
    std::fs::remove_dir(format!("/{OLD_ROOT}")).map_err(|e| format!("/{OLD_ROOT}: {e}"))?;
    let name = b"kiln-sandbox";
    // SAFETY: pointer and length describe `name`.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(os("sethostname"));
    }
    Ok(())
}

/// Runs one step to its end, its output on stderr; returns how it ended.
fn run_step(step: &crate::Step) -> Result<(i32, String), String> {
    let cs = |s: &str| CString::new(s).map_err(|_| format!("{}: NUL in an argument", step.label));
    let argv: Vec<CString> = step.argv.iter().map(|a| cs(a)).collect::<Result<_, _>>()?;
    let env: Vec<CString> = step
        .env
        .iter()
        .map(|(k, v)| cs(&format!("{k}={v}")))
        .collect::<Result<_, _>>()?;
    let Some(program) = argv.first() else {
        return Err(format!("{}: empty argv", step.label));
    };
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut env_p: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
    env_p.push(std::ptr::null());
    let null = c"/dev/null";
    // SAFETY: single-threaded (see `enter`); the child only makes system
    // calls on memory prepared above, then execs or exits.
    match unsafe { libc::fork() } {
        -1 => Err(os("fork")),
        0 => unsafe {
            // SAFETY: fds and pointers prepared before the fork.
            let fd = libc::open(null.as_ptr(), libc::O_RDONLY);
            if fd >= 0 {
                libc::dup2(fd, 0);
            }
            // The tree goes to stdout: step output goes to stderr.
            libc::dup2(2, 1);
            libc::execve(program.as_ptr(), argv_p.as_ptr(), env_p.as_ptr());
            let msg = b"kiln sandbox: exec failed\n";
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        },
        pid => wait(pid),
    }
}

/// Writes the tree under `/` as a tar stream: sorted, owners as seen here,
/// mtimes clamped to `epoch`, hardlinks as links, the contents of the
/// kernel filesystems left out.
fn write_tree(out: &mut impl Write, epoch: u64) -> io::Result<()> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    walk(&mut b, Path::new("/"), Path::new(""), epoch, &mut links)?;
    b.finish()
}

fn walk<W: Write>(
    b: &mut tar::Builder<W>,
    abs: &Path,
    rel: &Path,
    epoch: u64,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> io::Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(abs)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    for name in names {
        let a = abs.join(&name);
        let r = rel.join(&name);
        let md = std::fs::symlink_metadata(&a)?;
        let ft = md.file_type();
        let mut h = tar::Header::new_gnu();
        h.set_mode(md.mode() & 0o7777);
        h.set_uid(md.uid().into());
        h.set_gid(md.gid().into());
        h.set_mtime(u64::try_from(md.mtime()).unwrap_or(0).min(epoch));
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            b.append_data(&mut h, &r, io::empty())?;
            let top = rel.as_os_str().is_empty();
            if !(top && MOUNTED.iter().any(|m| name == *m)) {
                walk(b, &a, &r, epoch, links)?;
            }
        } else if ft.is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, &r, std::fs::read_link(&a)?)?;
        } else if ft.is_file() {
            if md.nlink() > 1 {
                if let Some(first) = links.get(&(md.dev(), md.ino())) {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, &r, first)?;
                    continue;
                }
                links.insert((md.dev(), md.ino()), r.clone());
            }
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(md.len());
            b.append_data(&mut h, &r, std::fs::File::open(&a)?)?;
        } else if ft.is_fifo() {
            h.set_entry_type(tar::EntryType::Fifo);
            h.set_size(0);
            b.append_data(&mut h, &r, io::empty())?;
        }
        // Sockets and device nodes are not part of an image.
    }
    Ok(())
}

/// Removes everything below `root`, unmounting what is mounted there.
fn clean(root: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))?;
    for e in entries.flatten() {
        let p = e.path();
        if MOUNTED.iter().any(|m| e.file_name() == *m) {
            if let Ok(c) = cstr(&p) {
                // SAFETY: a NUL-terminated string alive for the call.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| format!("removing {}: {e}", p.display()))?;
    }
    Ok(())
}
