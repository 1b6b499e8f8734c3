//! Starting one container: cgroup with a device filter, namespaces, a
//! read-only root with Docker's /proc and /sys masking, a minimal /dev,
//! credentials and capabilities, then exec.

use crate::bpf;
use crate::caps::{self, CapPlan};
use crate::msg::{ChildMsg, DecodeError, Failure};
use crate::seccomp;
use crate::sys::{self, check, cstr, Kind, RealSys, Sys};
use kiln_init::config::{Container, Net, VOLUMES_DIR};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use thiserror::Error;

use kiln_init::config::USERNS_SIZE;
pub use kiln_init::config::{CGROUP_DIR, CONTAINER_ROOTS_DIR, DEFAULT_PATH};

#[derive(Debug, Error)]
pub enum ContainerError {
    #[error("capabilities")]
    Caps(#[from] caps::CapError),
    #[error("cgroup {path}")]
    Cgroup {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("device filter")]
    DeviceFilter(#[source] io::Error),
    #[error("{0}")]
    Io(&'static str, #[source] io::Error),
    #[error("setup: {step}")]
    Setup {
        step: String,
        #[source]
        source: Option<io::Error>,
    },
    #[error("bad report from the setup process")]
    Report(#[source] DecodeError),
    #[error("no device filter (it failed to attach at boot)")]
    NoDeviceFilter,
    #[error("no args to run")]
    NoArgs,
}

/// A started container: its PID (in the init's namespace), the read
/// ends of its stdout and stderr, and its setup report (non-blocking),
/// which ends when the container execs its program or dies: empty then,
/// or the step that failed (see [`setup_outcome`]).
#[derive(Debug)]
pub struct Spawned {
    pub pid: libc::pid_t,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub report: OwnedFd,
}

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

/// Whether [`attach_device_filter`] succeeded: no container starts
/// without the filter.
static DEVICE_FILTER: AtomicBool = AtomicBool::new(false);

/// Attaches the device allow-list to the cgroup all containers live
/// under, once at boot: every container cgroup inherits it, and none can
/// attach its own (attached without BPF_F_ALLOW_OVERRIDE).
pub fn attach_device_filter() -> Result<(), ContainerError> {
    let dir = std::fs::File::open(CGROUP_DIR).map_err(|e| ContainerError::Cgroup {
        path: CGROUP_DIR.to_string(),
        source: e,
    })?;
    let prog = bpf::program(&bpf::DEFAULT_RULES);
    // The attachment keeps the program; its fd can go.
    bpf::load_and_attach(&prog, dir.as_fd()).map_err(ContainerError::DeviceFilter)?;
    DEVICE_FILTER.store(true, Ordering::Relaxed);
    Ok(())
}

/// Creates the container's cgroup directory, or reuses a leftover one.
fn make_cgroup_dir(sys: &dyn Sys, name: &str) -> Result<String, ContainerError> {
    let path = format!("{CGROUP_DIR}/{name}");
    if let Err(e) = sys.mkdir(&path) {
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(ContainerError::Cgroup { path, source: e });
        }
    }
    Ok(path)
}

/// Creates the container's cgroup with its resources; returns its
/// directory, open for clone3.
fn make_cgroup(c: &Container) -> Result<OwnedFd, ContainerError> {
    let path = make_cgroup_dir(&RealSys, &c.name)?;
    for (knob, value) in c.resources.knobs() {
        let file = format!("{path}/{knob}");
        RealSys
            .write_file(&file, value.as_bytes())
            .map_err(|source| ContainerError::Cgroup { path: file, source })?;
    }
    let dir = std::fs::File::open(&path).map_err(|e| ContainerError::Cgroup { path, source: e })?;
    Ok(dir.into())
}

/// Starts `c` and returns at once; the container sets itself up and
/// execs while the caller goes on (see [`Spawned::report`]).
pub fn spawn(c: &Container) -> Result<Spawned, ContainerError> {
    if c.args.is_empty() {
        return Err(ContainerError::NoArgs);
    }
    if !DEVICE_FILTER.load(Ordering::Relaxed) {
        return Err(ContainerError::NoDeviceFilter);
    }
    let plan = caps::plan(caps::mask(&c.capabilities)?, c.uid, caps::last_cap());
    prepare_volumes(c).map_err(|e| ContainerError::Io("making its volumes", e))?;
    let cgroup = make_cgroup(c)?;
    let root = format!("{CONTAINER_ROOTS_DIR}/{}", c.name);
    RealSys
        .mkdir_all(&root)
        .map_err(|e| ContainerError::Io("plumbing dir", e))?;
    // Built before the clone so the child allocates little.
    let exec = ExecPlan::new(c)?;

    let pipes = |what| sys::pipe().map_err(|e| ContainerError::Io(what, e));
    let (out_r, out_w) = pipes("stdout pipe")?;
    let (err_r, err_w) = pipes("stderr pipe")?;
    let (rep_r, rep_w) = pipes("report pipe")?;
    let (go_r, go_w) = pipes("go pipe")?;
    // Its own cgroup namespace: the container sees its cgroup as the root.
    let mut flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP;
    if c.net != Net::Host {
        flags |= libc::CLONE_NEWNET;
    }
    // Created first, it owns the other new namespaces: the container's
    // root has its capabilities over them, none over the host's.
    if c.userns.is_some() {
        flags |= libc::CLONE_NEWUSER;
    }
    // SAFETY: the init is single-threaded.
    let pid = unsafe { sys::clone_into(flags, cgroup.as_fd()) }
        .map_err(|e| ContainerError::Io("clone3", e))?;
    if pid == 0 {
        drop((out_r, err_r, rep_r, go_w, cgroup));
        // Until the init has prepared it (see `prepare`); EOF: it gave up.
        let mut go = [0u8; 1];
        if !matches!(sys::read(go_r.as_fd(), &mut go), Ok(1)) {
            exit(127);
        }
        drop(go_r);
        // A panic here must never unwind into the init's own fatal path
        // (which would power the machine off from a child).
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let e = match setup(
                c,
                &root,
                &plan,
                &exec,
                out_w.as_fd(),
                err_w.as_fd(),
                rep_w.as_fd(),
            ) {
                Err(e) => e,
                Ok(never) => match never {},
            };
            report(rep_w.as_fd(), e);
            exit(127);
        }));
        report(rep_w.as_fd(), Failure::other("panic during setup"));
        exit(127);
    }
    // Only the child may hold the write ends, so reads end when it goes.
    drop((out_w, err_w, rep_w, go_r));
    // Any failure before the go byte kills the child: nothing half-started.
    let go = sys::set_nonblocking(rep_r.as_fd())
        .map_err(|e| ContainerError::Io("report pipe", e))
        .and_then(|()| prepare(c, pid))
        .and_then(|()| {
            sys::write_all(go_w.as_fd(), b"g").map_err(|e| ContainerError::Io("go pipe", e))
        });
    if let Err(e) = go {
        // SAFETY: killing and reaping the child just cloned.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        return Err(e);
    }
    Ok(Spawned {
        pid,
        stdout: out_r,
        stderr: err_r,
        report: rep_r,
    })
}

/// Makes the container's named volumes that do not exist yet below
/// [`VOLUMES_DIR`]: a new one starts as a copy of the image's directory at
/// its path (owners and modes kept, as Docker fills a new named volume),
/// else empty and owned by the container's user. Made under a temporary
/// name and renamed: a volume half made is never used.
fn prepare_volumes(c: &Container) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (name, target) in &c.volumes {
        let dir = format!("{VOLUMES_DIR}/{name}");
        if std::fs::symlink_metadata(&dir).is_ok() {
            continue;
        }
        std::fs::create_dir_all(VOLUMES_DIR)?;
        let tmp = format!("{VOLUMES_DIR}/.{name}.new");
        let _ = std::fs::remove_dir_all(&tmp);
        let image_dir = format!("{}{target}", c.rootfs);
        match std::fs::symlink_metadata(&image_dir) {
            Ok(m) if m.is_dir() => {
                copy_tree(std::path::Path::new(&image_dir), std::path::Path::new(&tmp))?
            }
            _ => {
                std::fs::create_dir(&tmp)?;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
                std::os::unix::fs::lchown(&tmp, Some(c.uid), Some(c.gid))?;
            }
        }
        std::fs::rename(&tmp, &dir)?;
    }
    Ok(())
}

/// Copies a directory tree: directories, files and symlinks, with their
/// owners and modes (other kinds are skipped).
fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = std::fs::symlink_metadata(from)?;
    let ft = m.file_type();
    if ft.is_dir() {
        std::fs::create_dir(to)?;
        let mut entries: Vec<_> = std::fs::read_dir(from)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for e in entries {
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
    } else if ft.is_file() {
        std::fs::copy(from, to)?;
    } else if ft.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)?;
    } else {
        return Ok(());
    }
    std::os::unix::fs::lchown(to, Some(m.uid()), Some(m.gid()))?;
    if !ft.is_symlink() {
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    Ok(())
}

/// What the init sets on a container it just cloned, before letting it
/// go on (all of it needs privileges on the host the container may not
/// have, and all of it survives exec): its id maps, its end of a veth
/// pair on the bridge, its oom_score_adj and its resource limits.
fn prepare(c: &Container, pid: libc::pid_t) -> Result<(), ContainerError> {
    let fail = |step: String| {
        move |e| ContainerError::Setup {
            step,
            source: Some(e),
        }
    };
    if let Some(first) = c.userns {
        // setgroups stays allowed: the writer has CAP_SETGID on the host.
        let map = format!("0 {first} {USERNS_SIZE}\n");
        for f in ["uid_map", "gid_map"] {
            RealSys
                .write_file(&format!("/proc/{pid}/{f}"), map.as_bytes())
                .map_err(fail(format!("write {f}")))?;
        }
    }
    if let (Net::Bridge, Some(address)) = (c.net, c.address) {
        crate::bridge::attach(address, pid).map_err(fail("plug into the bridge".into()))?;
    }
    let adj = c.resources.oom_score_adj().to_string();
    RealSys
        .write_file(&format!("/proc/{pid}/oom_score_adj"), adj.as_bytes())
        .map_err(fail("oom_score_adj".into()))?;
    for (name, (soft, hard)) in &c.rlimits {
        let Some(resource) = rlimit_resource(name) else {
            return Err(ContainerError::Setup {
                step: format!("unknown limit {name}"),
                source: None,
            });
        };
        let lim = libc::rlimit {
            rlim_cur: *soft,
            rlim_max: *hard,
        };
        // SAFETY: a valid rlimit; the old value is not asked for.
        let r = unsafe { libc::prlimit(pid, resource, &lim, std::ptr::null_mut()) };
        check(r).map_err(fail(format!("rlimit {name}")))?;
    }
    Ok(())
}

/// Starts `argv` inside the running container whose PID 1 is `pid`: in
/// its cgroup, network, IPC, UTS and mount namespaces and root, as its
/// user with its capabilities, output discarded (a readiness probe).
/// Returns the probe's PID; the caller reaps it.
pub fn spawn_probe(
    c: &Container,
    pid: libc::pid_t,
    argv: &[String],
) -> Result<libc::pid_t, ContainerError> {
    let plan = caps::plan(caps::mask(&c.capabilities)?, c.uid, caps::last_cap());
    let mut probe = c.clone();
    probe.args = argv.to_vec();
    let exec = ExecPlan::new(&probe)?;
    // Opened now, in the init's namespaces: after entering the mount
    // namespace these paths would name other processes.
    let open = |what: &str| -> Result<OwnedFd, ContainerError> {
        let path = cstr(&format!("/proc/{pid}/{what}"))
            .map_err(|e| ContainerError::Io("probe path", e))?;
        // SAFETY: a NUL-terminated path alive for the call.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        sys::owned(fd).map_err(|e| ContainerError::Io("opening the container's namespaces", e))
    };
    let mut namespaces = Vec::new();
    // The user namespace last: once in it, the probe has no capabilities
    // over the host's namespaces (a host network's, say).
    let user = c.userns.map(|_| "ns/user");
    for ns in ["ns/net", "ns/ipc", "ns/uts", "ns/mnt"]
        .into_iter()
        .chain(user)
    {
        namespaces.push(open(ns)?);
    }
    let root = open("root")?;
    let cgroup = format!("{CGROUP_DIR}/{}/cgroup.procs", c.name);
    // SAFETY: the init is single-threaded, so the child may run Rust code.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(ContainerError::Io("fork", io::Error::last_os_error()));
    }
    if child > 0 {
        return Ok(child);
    }
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = enter_and_exec(&probe, &cgroup, &namespaces, &root, &plan, &exec);
    }));
    exit(127);
}

/// The probe child's work; only returns on error.
fn enter_and_exec(
    c: &Container,
    cgroup: &str,
    namespaces: &[OwnedFd],
    root: &OwnedFd,
    plan: &CapPlan,
    exec: &ExecPlan,
) -> Result<std::convert::Infallible, Failure> {
    // SAFETY: an empty, initialised signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
    step("join cgroup", RealSys.write_file(cgroup, b"0"))?;
    for ns in namespaces {
        // SAFETY: a namespace fd we hold; 0 accepts any type.
        step("setns", check(unsafe { libc::setns(ns.as_raw_fd(), 0) }))?;
    }
    // SAFETY: an fd we hold.
    step("fchdir", check(unsafe { libc::fchdir(root.as_raw_fd()) }))?;
    // SAFETY: a static NUL-terminated path.
    step("chroot", check(unsafe { libc::chroot(c".".as_ptr()) }))?;
    let null = step("open /dev/null", std::fs::File::open("/dev/null"))?;
    for to in 0..3 {
        // SAFETY: duplicating an fd we hold onto the standard ones.
        step("dup2", check(unsafe { libc::dup2(null.as_raw_fd(), to) }))?;
    }
    become_and_exec(c, plan, exec, None)
}

/// What a container's whole setup report says: nothing (it exec'd, or
/// died before a step failed) or the step that failed, the first if
/// several did.
pub fn setup_outcome(report: &[u8]) -> Result<(), ContainerError> {
    let msgs = ChildMsg::decode_all(report).map_err(ContainerError::Report)?;
    match msgs.into_iter().next() {
        Some(ChildMsg::Failed(f)) => Err(ContainerError::Setup {
            source: f.os_error(),
            step: f.step,
        }),
        None => Ok(()),
    }
}

/// Sends one message in a single write (below PIPE_BUF: never mixed with
/// another writer's).
fn send(fd: BorrowedFd<'_>, msg: &ChildMsg) {
    let _ = sys::write_all(fd, &msg.encode());
}

/// Reports a failed step.
fn report(fd: BorrowedFd<'_>, f: Failure) {
    send(fd, &ChildMsg::Failed(f));
}

fn exit(code: libc::c_int) -> ! {
    // SAFETY: leaving a forked child without running the parent's cleanup.
    unsafe { libc::_exit(code) }
}

/// argv, envp and the resolved program, ready for execve.
pub struct ExecPlan {
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: String,
    /// The seccomp program, built before fork.
    seccomp: Vec<libc::sock_filter>,
}

impl ExecPlan {
    fn new(c: &Container) -> Result<ExecPlan, ContainerError> {
        let conv = |v: &[String]| -> Result<Vec<CString>, ContainerError> {
            v.iter()
                .map(|s| cstr(s).map_err(|e| ContainerError::Io("argument", e)))
                .collect()
        };
        Ok(ExecPlan {
            argv: conv(&c.args)?,
            envp: conv(&c.env)?,
            cwd: if c.cwd.is_empty() {
                "/".to_string()
            } else {
                c.cwd.clone()
            },
            seccomp: crate::seccomp::program(caps::mask(&c.capabilities)?),
        })
    }
}

/// setrlimit's resource type, which differs between C libraries.
#[cfg(target_env = "musl")]
type Resource = libc::c_int;
#[cfg(not(target_env = "musl"))]
type Resource = libc::__rlimit_resource_t;

/// The `RLIMIT_` constant of a recipe's limit name.
fn rlimit_resource(name: &str) -> Option<Resource> {
    Some(match name {
        "as" => libc::RLIMIT_AS,
        "core" => libc::RLIMIT_CORE,
        "cpu" => libc::RLIMIT_CPU,
        "data" => libc::RLIMIT_DATA,
        "fsize" => libc::RLIMIT_FSIZE,
        "locks" => libc::RLIMIT_LOCKS,
        "memlock" => libc::RLIMIT_MEMLOCK,
        "msgqueue" => libc::RLIMIT_MSGQUEUE,
        "nice" => libc::RLIMIT_NICE,
        "nofile" => libc::RLIMIT_NOFILE,
        "nproc" => libc::RLIMIT_NPROC,
        "rss" => libc::RLIMIT_RSS,
        "rtprio" => libc::RLIMIT_RTPRIO,
        "rttime" => libc::RLIMIT_RTTIME,
        "sigpending" => libc::RLIMIT_SIGPENDING,
        "stack" => libc::RLIMIT_STACK,
        _ => return None,
    })
}

/// Resolves `prog` against the PATH in `env`, with `is_exec` telling
/// whether a candidate is an executable file.
pub fn resolve(prog: &str, env: &[String], is_exec: &dyn Fn(&str) -> bool) -> Option<String> {
    if prog.contains('/') {
        return Some(prog.to_string());
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    path.split(':')
        .map(|d| if d.is_empty() { "." } else { d })
        .map(|d| format!("{}/{prog}", d.trim_end_matches('/')))
        .find(|cand| is_exec(cand))
}

fn is_executable(path: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn step<T>(what: &str, r: io::Result<T>) -> Result<T, Failure> {
    r.map_err(|e| Failure::os(what, &e))
}

/// Runs in the container's PID 1, in its cgroup and new namespaces,
/// before exec. Only returns on error.
fn setup(
    c: &Container,
    root: &str,
    plan: &CapPlan,
    exec: &ExecPlan,
    out: BorrowedFd<'_>,
    err: BorrowedFd<'_>,
    rep: BorrowedFd<'_>,
) -> Result<std::convert::Infallible, Failure> {
    // The init blocks SIGCHLD for its signalfd; the mask survives exec.
    // SAFETY: an empty, initialised signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::umask(0o022);
    }
    let null = step("open /dev/null", std::fs::File::open("/dev/null"))?;
    for (from, to) in [(null.as_fd(), 0), (out, 1), (err, 2)] {
        // SAFETY: duplicating fds we hold onto the standard ones, which
        // the exec'd program owns from here on.
        step("dup2", check(unsafe { libc::dup2(from.as_raw_fd(), to) }))?;
    }
    drop(null);
    if c.userns.is_some() {
        // Its ids are still the host's root, unmapped here: become the
        // namespace's root (keeping the namespace's capabilities).
        // SAFETY: integer arguments and an empty list.
        unsafe {
            step("setresgid", check(libc::setresgid(0, 0, 0)))?;
            step("setgroups", check(libc::setgroups(0, std::ptr::null())))?;
            step("setresuid", check(libc::setresuid(0, 0, 0)))?;
        }
    }
    match (c.net, c.address) {
        (Net::None, _) => step("bring up lo", RealSys.loopback_up())?,
        (Net::Bridge, Some(address)) => step(
            "configure eth0 on the bridge",
            crate::bridge::configure_inside(address),
        )?,
        _ => {}
    }
    // Through the host's /proc while it is still mounted: net.* and IPC
    // settings are those of the writer's namespaces, this container's.
    for (key, value) in &c.sysctl {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        step(
            &format!("sysctl {key}"),
            RealSys.write_file(&path, value.as_bytes()),
        )?;
    }
    setup_root(&RealSys, c, root)?;

    become_and_exec(c, plan, exec, c.init.then_some(rep))
}

/// The end of every start, a container's or a probe's: its credentials
/// (bounding set first, which needs CAP_SETPCAP, then ids, then the sets,
/// which setuid to non-root has already emptied), no_new_privs, its
/// directory, the seccomp filter last (it would refuse the calls before),
/// then exec, behind the reaper when given its report fd. Only returns
/// on error.
fn become_and_exec(
    c: &Container,
    plan: &CapPlan,
    exec: &ExecPlan,
    reaper_rep: Option<BorrowedFd<'_>>,
) -> Result<std::convert::Infallible, Failure> {
    step("drop bounding capabilities", caps::drop_bounding(plan))?;
    // SAFETY: pointer and length describe the groups vector.
    let r = unsafe { libc::setgroups(c.groups.len(), c.groups.as_ptr()) };
    step("setgroups", check(r))?;
    // SAFETY: integer arguments only.
    step("setgid", check(unsafe { libc::setgid(c.gid) }))?;
    // SAFETY: integer arguments only.
    step("setuid", check(unsafe { libc::setuid(c.uid) }))?;
    step("set capabilities", caps::set_sets(plan))?;
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    step("no_new_privs", check(r))?;
    step(
        &format!("chdir {}", exec.cwd),
        std::env::set_current_dir(&exec.cwd),
    )?;
    let prog = resolve(&c.args[0], &c.env, &is_executable)
        .ok_or_else(|| Failure::other(format!("{}: not found in PATH", c.args[0])))?;
    let prog = step("program path", cstr(&prog))?;
    let mut argv: Vec<*const libc::c_char> = exec.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = exec.envp.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    if c.seccomp {
        step("seccomp filter", seccomp::install(&exec.seccomp))?;
    }
    if let Some(rep) = reaper_rep {
        reaper(rep)?;
    }
    // SAFETY: NULL-terminated arrays of valid C strings kept alive by `exec`.
    unsafe { libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Err(Failure::os(
        format!("exec {}", c.args[0]),
        &io::Error::last_os_error(),
    ))
}

/// With `init = true`: forks; the child returns to exec the program, and
/// this process stays PID 1 of the namespace as its reaper: it forwards
/// every signal it can catch to the program, reaps orphans, and exits as
/// the program did (128 + N if signal N killed it), like tini.
fn reaper(rep: BorrowedFd<'_>) -> Result<(), Failure> {
    // SAFETY: an initialised full signal set; blocked before the fork so
    // no signal meant for the program is lost to a default action here.
    let all = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        all
    };
    // SAFETY: this process is single-threaded.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(Failure::os("fork", &io::Error::last_os_error()));
    }
    if child == 0 {
        // SAFETY: an initialised empty set: the program starts unmasked.
        unsafe {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        }
        return Ok(());
    }
    // The program's exec (or failure) alone ends the setup report.
    // SAFETY: closing this process's copy of an fd it will not use.
    unsafe { libc::close(rep.as_raw_fd()) };
    loop {
        // SAFETY: a valid set and a null info pointer.
        let sig = unsafe { libc::sigwaitinfo(&all, std::ptr::null_mut()) };
        if sig == libc::SIGCHLD {
            loop {
                let mut status = 0;
                // SAFETY: a valid status pointer.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                if pid == child {
                    let code = if libc::WIFSIGNALED(status) {
                        128 + libc::WTERMSIG(status)
                    } else {
                        libc::WEXITSTATUS(status)
                    };
                    exit(code);
                }
            }
        } else if sig > 0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child, sig) };
        }
    }
}

/// The container's filesystem tree and hostname, from a fresh mount
/// namespace to being inside the new root: a read-only bind of the
/// rootfs, tmpfs /tmp and /run, a minimal /dev, /proc and /sys with
/// Docker's masking, the recipe's binds, then pivot_root.
pub fn setup_root(sys: &dyn Sys, c: &Container, root: &str) -> Result<(), Failure> {
    step(
        "make / private",
        sys.mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None),
    )?;
    step("sethostname", sys.sethostname(&c.name))?;
    step(
        "bind rootfs",
        sys.mount(
            Some(&c.rootfs),
            root,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        ),
    )?;
    step("remount rootfs read-only", remount_bind(sys, root, true, 0))?;
    let at = |p: &str| format!("{root}{p}");
    tmpfs(sys, &at("/tmp"), NOSUID_NODEV, "mode=1777")?;
    tmpfs(sys, &at("/run"), NOSUID_NODEV, "mode=755")?;
    make_dev(sys, &at("/dev"), c.userns.is_some())?;
    make_proc(sys, &at("/proc"), &at("/dev/null"))?;
    if c.userns.is_some() && c.net == Net::Host {
        // A user namespace may mount sysfs only for a network namespace
        // it owns: the host's is bound instead, read-only.
        step(
            "bind /sys",
            sys.mount(
                Some("/sys"),
                &at("/sys"),
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
            ),
        )?;
        step(
            "read-only /sys",
            remount_bind(sys, &at("/sys"), true, libc::MS_NOEXEC),
        )?;
        // The host's cgroup2 came along and cannot be unmounted (nor its
        // own mounted on it): cover it first.
        tmpfs(
            sys,
            &at("/sys/fs/cgroup"),
            NOSUID_NODEV | libc::MS_NOEXEC,
            "size=4k,mode=755",
        )?;
    } else {
        step(
            "mount /sys",
            sys.mount(
                Some("sysfs"),
                &at("/sys"),
                Some("sysfs"),
                NOSUID_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
                None,
            ),
        )?;
    }
    mask(sys, &at("/sys/firmware"), &at("/dev/null"))?;
    // Its own cgroup (the namespace's root), read-only, as Docker does.
    step(
        "mount /sys/fs/cgroup",
        sys.mount(
            Some("cgroup2"),
            &at("/sys/fs/cgroup"),
            Some("cgroup2"),
            NOSUID_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
            None,
        ),
    )?;
    for t in &c.tmpfs {
        let data = format!(
            "size={},mode={:o},uid={},gid={}",
            t.size, t.mode, t.uid, t.gid
        );
        let target = at(&t.path);
        // Below /run or /tmp the image's directory is hidden: make it.
        if sys.kind(&target).is_none() {
            step(
                &format!("make mount point {}", t.path),
                sys.mkdir_all(&target),
            )?;
        }
        tmpfs(sys, &target, NOSUID_NODEV, &data)?;
    }
    for b in &c.binds {
        let target = at(&b.target);
        // A target on a tmpfs (the builder made it in the image, which
        // the tmpfs now hides) is made again.
        if sys.kind(&target).is_none() {
            let made = match sys.kind(&b.source) {
                Some(Kind::Dir) | None => sys.mkdir_all(&target),
                Some(_) => {
                    let parent = target.rsplit_once('/').map_or("/", |(p, _)| p);
                    sys.mkdir_all(parent)
                        .and_then(|()| sys.write_file(&target, b""))
                }
            };
            step(&format!("make mount point {}", b.target), made)?;
        }
        step(
            &format!("bind {} to {}", b.source, b.target),
            sys.mount(
                Some(&b.source),
                &target,
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
            ),
        )?;
        step(
            &format!("remount bind {}", b.target),
            remount_bind(sys, &target, b.readonly, 0),
        )?;
    }
    pivot(sys, root)
}

fn tmpfs(sys: &dyn Sys, path: &str, flags: libc::c_ulong, data: &str) -> Result<(), Failure> {
    step(
        &format!("tmpfs on {path}"),
        sys.mount(Some("tmpfs"), path, Some("tmpfs"), flags, Some(data)),
    )
}

/// Remounts a bind mount with nosuid,nodev (+ read-only, + `extra`).
///
/// Flags the mount has are kept: inside a user namespace the kernel
/// refuses to clear them (and outside, a bind keeps its source's).
fn remount_bind(sys: &dyn Sys, path: &str, readonly: bool, extra: libc::c_ulong) -> io::Result<()> {
    let has = sys.mount_flags(path)?;
    let mut flags = libc::MS_REMOUNT | libc::MS_BIND | NOSUID_NODEV | extra | has;
    if readonly {
        flags |= libc::MS_RDONLY;
    }
    sys.mount(None, path, None, flags, None)
}

/// The minimal /dev: real device nodes on a tmpfs (bound from the host's
/// in a user namespace, where mknod is refused), a private devpts, shm.
fn make_dev(sys: &dyn Sys, dev: &str, userns: bool) -> Result<(), Failure> {
    tmpfs(
        sys,
        dev,
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "mode=755,size=65536k",
    )?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let p = format!("{dev}/{name}");
        if userns {
            step(&format!("make {p}"), sys.write_file(&p, b""))?;
            let host = format!("/dev/{name}");
            step(
                &format!("bind {host}"),
                sys.mount(Some(&host), &p, None, libc::MS_BIND, None),
            )?;
            continue;
        }
        step(
            &format!("mknod {p}"),
            sys.mknod(&p, libc::S_IFCHR | 0o666, major, minor),
        )?;
        // The umask applied at mknod.
        step("chmod", sys.chmod(&p, 0o666))?;
    }
    for d in ["pts", "shm"] {
        step("mkdir", sys.mkdir(&format!("{dev}/{d}")))?;
    }
    step(
        "mount devpts",
        sys.mount(
            Some("devpts"),
            &format!("{dev}/pts"),
            Some("devpts"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
    )?;
    tmpfs(
        sys,
        &format!("{dev}/shm"),
        NOSUID_NODEV | libc::MS_NOEXEC,
        "mode=1777,size=65536k",
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        step(
            &format!("symlink /dev/{link}"),
            sys.symlink(target, &format!("{dev}/{link}")),
        )?;
    }
    Ok(())
}

/// Docker's masked and read-only /proc paths.
pub const PROC_MASKED: [&str; 10] = [
    "acpi",
    "asound",
    "interrupts",
    "kcore",
    "keys",
    "latency_stats",
    "sched_debug",
    "scsi",
    "timer_list",
    "timer_stats",
];
pub const PROC_READONLY: [&str; 5] = ["bus", "fs", "irq", "sys", "sysrq-trigger"];

/// Hides `path`: an empty read-only tmpfs over a directory, the null
/// device over a file; absent paths are fine.
fn mask(sys: &dyn Sys, path: &str, null: &str) -> Result<(), Failure> {
    let r = match sys.kind(path) {
        None => return Ok(()),
        Some(Kind::Dir) => sys.mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            NOSUID_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
            Some("size=0"),
        ),
        Some(Kind::Other) => sys.mount(Some(null), path, None, libc::MS_BIND, None),
    };
    step(&format!("mask {path}"), r)
}

fn make_proc(sys: &dyn Sys, proc: &str, null: &str) -> Result<(), Failure> {
    step(
        "mount /proc",
        sys.mount(
            Some("proc"),
            proc,
            Some("proc"),
            NOSUID_NODEV | libc::MS_NOEXEC,
            None,
        ),
    )?;
    for m in PROC_MASKED {
        mask(sys, &format!("{proc}/{m}"), null)?;
    }
    for r in PROC_READONLY {
        let p = format!("{proc}/{r}");
        if sys.kind(&p).is_none() {
            continue;
        }
        step(
            &format!("bind {p}"),
            sys.mount(Some(&p), &p, None, libc::MS_BIND | libc::MS_REC, None),
        )?;
        step(
            &format!("read-only {p}"),
            remount_bind(sys, &p, true, libc::MS_NOEXEC),
        )?;
    }
    Ok(())
}

/// pivot_root into `root`, dropping the old root.
fn pivot(sys: &dyn Sys, root: &str) -> Result<(), Failure> {
    step("chdir new root", sys.chdir(root))?;
    // pivot_root(".", ".") stacks the old root on the new one, which the
    // detach below removes.
    step("pivot_root", sys.pivot_root(".", "."))?;
    step("detach old root", sys.umount(".", libc::MNT_DETACH))?;
    step("chdir /", sys.chdir("/"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sys::fake::{FakeSys, Op};
    use kiln_init::config::Bind;

    #[test]
    fn resolves_through_path() {
        let env = vec!["A=1".to_string(), "PATH=/usr/bin:/bin".to_string()];
        let exists = |p: &str| p == "/bin/sh" || p == "/usr/bin/env";
        assert_eq!(resolve("sh", &env, &exists).as_deref(), Some("/bin/sh"));
        assert_eq!(
            resolve("env", &env, &exists).as_deref(),
            Some("/usr/bin/env")
        );
        assert_eq!(resolve("nope", &env, &exists), None);
        assert_eq!(resolve("./x", &env, &exists).as_deref(), Some("./x"));
        // Without PATH, Docker's default applies.
        assert_eq!(resolve("sh", &[], &exists).as_deref(), Some("/bin/sh"));
    }

    #[test]
    fn copy_tree_keeps_modes_and_links() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("kiln-vol-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/f"), b"data").unwrap();
        std::fs::set_permissions(src.join("sub/f"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        std::os::unix::fs::symlink("sub/f", src.join("link")).unwrap();
        copy_tree(&src, &dir.join("dst")).unwrap();
        assert_eq!(std::fs::read(dir.join("dst/sub/f")).unwrap(), b"data");
        let mode = std::fs::metadata(dir.join("dst/sub/f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o640);
        assert_eq!(
            std::fs::read_link(dir.join("dst/link")).unwrap(),
            std::path::Path::new("sub/f")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A container `web` running nginx with two binds, for tests.
    pub(crate) fn container() -> Container {
        Container {
            name: "web".into(),
            rootfs: "/containers/web/rootfs".into(),
            args: vec!["nginx".into()],
            env: vec![],
            cwd: String::new(),
            uid: 0,
            gid: 0,
            groups: vec![],
            net: Net::Host,
            address: None,
            ports: Vec::new(),
            volumes: vec![],
            binds: vec![
                Bind {
                    source: "/var/lib/web".into(),
                    target: "/data".into(),
                    readonly: false,
                },
                Bind {
                    source: "/etc/web".into(),
                    target: "/etc/web".into(),
                    readonly: true,
                },
            ],
            tmpfs: vec![],
            capabilities: vec![],
            restart: kiln_init::config::Restart::Never,
            max_restarts: 0,
            essential: true,
            stop_signal: "SIGTERM".into(),
            stop_timeout_ms: 10_000,
            depends_on: vec![],
            ready: None,
            init: false,
            resources: Default::default(),
            seccomp: true,
            sysctl: Default::default(),
            rlimits: Default::default(),
            userns: None,
        }
    }

    const ROOT: &str = "/run/kiln/roots/web";

    /// A fake whose container root has some of the /proc and /sys paths
    /// Docker masks: a file, directories, and others absent.
    fn fake_root() -> FakeSys {
        let sys = FakeSys::default();
        for p in [
            "/proc/kcore",
            "/proc/acpi/wakeup",
            "/proc/sys/kernel/hostname",
            "/proc/sysrq-trigger",
            "/sys/firmware/acpi/tables",
        ] {
            sys.add(&format!("{ROOT}{p}"), b"");
        }
        sys
    }

    fn mounts(sys: &FakeSys) -> Vec<Op> {
        let ops = sys.ops.borrow();
        ops.iter()
            .filter(|op| matches!(op, Op::Mount { .. }))
            .cloned()
            .collect()
    }

    #[test]
    fn root_is_a_read_only_bind_then_pivoted() {
        let sys = fake_root();
        setup_root(&sys, &container(), ROOT).expect("setup");
        let log = sys.log();
        assert_eq!(
            log[..4],
            [
                "mount - / - rec,private -",
                "sethostname web",
                "mount /containers/web/rootfs /run/kiln/roots/web - bind,rec -",
                "mount - /run/kiln/roots/web - ro,nosuid,nodev,remount,bind -",
            ]
        );
        assert_eq!(
            log[log.len() - 4..],
            [
                "chdir /run/kiln/roots/web",
                "pivot_root . .",
                "umount . 0x2",
                "chdir /",
            ]
        );
    }

    #[test]
    fn proc_and_sys_are_masked() {
        let sys = fake_root();
        setup_root(&sys, &container(), ROOT).expect("setup");
        let log = sys.log();
        for want in [
            "mount proc /run/kiln/roots/web/proc proc nosuid,nodev,noexec -",
            // A file gets the null device, a directory an empty tmpfs.
            "mount /run/kiln/roots/web/dev/null /run/kiln/roots/web/proc/kcore - bind -",
            "mount tmpfs /run/kiln/roots/web/proc/acpi tmpfs ro,nosuid,nodev,noexec size=0",
            "mount /run/kiln/roots/web/proc/sys /run/kiln/roots/web/proc/sys - bind,rec -",
            "mount - /run/kiln/roots/web/proc/sys - ro,nosuid,nodev,noexec,remount,bind -",
            "mount - /run/kiln/roots/web/proc/sysrq-trigger - ro,nosuid,nodev,noexec,remount,bind -",
            "mount sysfs /run/kiln/roots/web/sys sysfs ro,nosuid,nodev,noexec -",
            "mount tmpfs /run/kiln/roots/web/sys/firmware tmpfs ro,nosuid,nodev,noexec size=0",
            "mount cgroup2 /run/kiln/roots/web/sys/fs/cgroup cgroup2 ro,nosuid,nodev,noexec -",
        ] {
            assert!(
                log.iter().any(|l| l == want),
                "missing {want:?} in {log:#?}"
            );
        }
        // Absent paths are skipped, and masking follows the /proc mount.
        let targets = sys.mount_targets();
        assert!(!targets.iter().any(|t| t.ends_with("/proc/keys")));
        let at = |t: &str| targets.iter().position(|x| x == t).expect(t);
        assert!(at("/run/kiln/roots/web/proc") < at("/run/kiln/roots/web/proc/kcore"));
        assert!(at("/run/kiln/roots/web/sys") < at("/run/kiln/roots/web/sys/firmware"));
    }

    /// A tmpfs is mounted with its size and the image directory's mode and
    /// owner, before the binds; a bind target it hides is made again.
    #[test]
    fn tmpfs_before_binds_with_owner_and_size() {
        let sys = fake_root();
        sys.add(&format!("{ROOT}/etc/web"), b"");
        sys.add(&format!("{ROOT}/data/x"), b"");
        let mut c = container();
        c.tmpfs = vec![
            kiln_init::config::Tmpfs {
                path: "/var/lib/nginx".into(),
                size: 1 << 20,
                mode: 0o750,
                uid: 33,
                gid: 33,
            },
            kiln_init::config::Tmpfs {
                path: "/run/postgresql".into(),
                size: 1 << 20,
                mode: 0o2775,
                uid: 100,
                gid: 102,
            },
        ];
        c.binds.push(Bind {
            source: "/run/app/sock".into(),
            target: "/var/lib/nginx/sock".into(),
            readonly: false,
        });
        setup_root(&sys, &c, ROOT).expect("setup");
        let log = sys.log();
        let at = |want: &str| {
            log.iter()
                .position(|l| l == want)
                .unwrap_or_else(|| panic!("missing {want:?} in {log:#?}"))
        };
        let mount = at("mount tmpfs /run/kiln/roots/web/var/lib/nginx tmpfs nosuid,nodev size=1048576,mode=750,uid=33,gid=33");
        // Under the container's own /run tmpfs: its mount point is made.
        let run = at("mkdir -p /run/kiln/roots/web/run/postgresql");
        assert!(run < at("mount tmpfs /run/kiln/roots/web/run/postgresql tmpfs nosuid,nodev size=1048576,mode=2775,uid=100,gid=102"));
        let made = at("mkdir -p /run/kiln/roots/web/var/lib/nginx/sock");
        let bound = at("mount /run/app/sock /run/kiln/roots/web/var/lib/nginx/sock - bind,rec -");
        assert!(mount < made && made < bound, "{log:#?}");
        // Targets the image has are used as they are.
        assert!(
            !log.iter()
                .any(|l| l == "mkdir -p /run/kiln/roots/web/etc/web"),
            "{log:#?}"
        );
    }

    #[test]
    fn binds_keep_their_mode_and_get_nosuid_nodev() {
        let sys = fake_root();
        setup_root(&sys, &container(), ROOT).expect("setup");
        let log = sys.log();
        let rw = [
            "mount /var/lib/web /run/kiln/roots/web/data - bind,rec -",
            "mount - /run/kiln/roots/web/data - nosuid,nodev,remount,bind -",
        ];
        let ro = [
            "mount /etc/web /run/kiln/roots/web/etc/web - bind,rec -",
            "mount - /run/kiln/roots/web/etc/web - ro,nosuid,nodev,remount,bind -",
        ];
        for pair in [rw, ro] {
            let i = log.iter().position(|l| l == pair[0]).expect(pair[0]);
            assert_eq!(log[i + 1], pair[1]);
        }
        // The binds land in the new root before it becomes `/`.
        let pivot = log
            .iter()
            .position(|l| l == "pivot_root . .")
            .expect("pivot");
        assert!(log.iter().position(|l| l == ro[1]).expect("ro") < pivot);
    }

    #[test]
    fn every_mount_is_nosuid_and_only_dev_allows_devices() {
        let sys = fake_root();
        setup_root(&sys, &container(), ROOT).expect("setup");
        for op in mounts(&sys) {
            let Op::Mount {
                target,
                fstype,
                flags,
                ..
            } = &op
            else {
                unreachable!()
            };
            // Plain binds take their flags at the remount that follows;
            // making / private changes propagation only.
            let fresh = fstype.is_some() || flags & libc::MS_REMOUNT != 0;
            if !fresh {
                continue;
            }
            assert_ne!(flags & libc::MS_NOSUID, 0, "{op}");
            let dev =
                target == "/run/kiln/roots/web/dev" || target == "/run/kiln/roots/web/dev/pts";
            assert_eq!(flags & libc::MS_NODEV == 0, dev, "{op}");
        }
    }

    #[test]
    fn dev_has_the_nodes_and_links() {
        let sys = fake_root();
        setup_root(&sys, &container(), ROOT).expect("setup");
        let log = sys.log();
        for want in [
            "mount tmpfs /run/kiln/roots/web/dev tmpfs nosuid,noexec mode=755,size=65536k",
            "mknod /run/kiln/roots/web/dev/null 20666 1:3",
            "chmod /run/kiln/roots/web/dev/null 666",
            "mknod /run/kiln/roots/web/dev/tty 20666 5:0",
            "mount devpts /run/kiln/roots/web/dev/pts devpts nosuid,noexec newinstance,ptmxmode=0666,mode=0620,gid=5",
            "symlink /run/kiln/roots/web/dev/ptmx -> pts/ptmx",
            "symlink /run/kiln/roots/web/dev/stderr -> /proc/self/fd/2",
        ] {
            assert!(log.iter().any(|l| l == want), "missing {want:?} in {log:#?}");
        }
        assert_eq!(log.iter().filter(|l| l.starts_with("mknod ")).count(), 6);
    }

    #[test]
    fn a_failing_step_stops_setup_and_says_which() {
        let sys = FakeSys {
            fail_at: Some(("/run/kiln/roots/web/data".into(), libc::ENOENT)),
            ..fake_root()
        };
        // The image has the mount point: the bind itself fails.
        sys.add("/run/kiln/roots/web/data/file", b"");
        let err = setup_root(&sys, &container(), ROOT).expect_err("must fail");
        assert_eq!(
            err,
            Failure {
                step: "bind /var/lib/web to /data".into(),
                errno: libc::ENOENT
            }
        );
        assert!(!sys.log().iter().any(|l| l.starts_with("pivot_root")));
    }

    #[test]
    fn cgroup_is_created_once() {
        let sys = FakeSys::default();
        let path = make_cgroup_dir(&sys, "web").expect("cgroup");
        assert_eq!(path, "/sys/fs/cgroup/kiln/web");
        let sys = FakeSys {
            fail_at: Some((path.clone(), libc::EEXIST)),
            ..Default::default()
        };
        assert_eq!(make_cgroup_dir(&sys, "web").expect("exists"), path);
        let sys = FakeSys {
            fail_at: Some((path.clone(), libc::EACCES)),
            ..Default::default()
        };
        assert!(matches!(
            make_cgroup_dir(&sys, "web"),
            Err(ContainerError::Cgroup { .. })
        ));
    }

    #[test]
    fn outcome_of_reports() {
        // An exec (or a death before any step failed) says nothing.
        assert!(setup_outcome(&[]).is_ok());
        let failed = |step: &str| {
            ChildMsg::Failed(Failure {
                step: step.into(),
                errno: libc::EPERM,
            })
            .encode()
        };
        let two = [failed("mount /proc"), failed("later")].concat();
        let err = setup_outcome(&two).expect_err("failed");
        assert_eq!(err.to_string(), "setup: mount /proc");
        let cause = std::error::Error::source(&err).expect("errno kept as the cause");
        assert_eq!(
            cause.to_string(),
            io::Error::from_raw_os_error(libc::EPERM).to_string()
        );
        assert!(matches!(
            setup_outcome(&two[..3]),
            Err(ContainerError::Report(DecodeError::Truncated))
        ));
    }
}
