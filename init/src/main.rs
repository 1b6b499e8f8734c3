//! kiln-init: PID 1 of a kiln image.
//!
//! In the initramfs it loads modules, finds the root partition by GPT GUID
//! and switches root; in the real root it sets up the host and runs the
//! containers. It never exits: on fatal errors it powers off, since a PID 1
//! that exits or panics takes the kernel down with it.

mod boot;
mod bpf;
mod bridge;
mod button;
mod caps;
mod console;
mod container;
mod control;
mod data;
mod dhcp;
mod dm;
mod fat;
mod glob;
mod iso9660;
mod metadata;
mod modules;
mod msg;
mod netlink;
mod network;
mod nftables;
mod seccomp;
mod supervisor;
mod sys;

use console::log;
use kiln_init::config::{
    BootConfig, HostConfig, RootSource, RunResult, WhenDone, BOOT_CONFIG_PATH, HOST_CONFIG_PATH,
    RESULT_PREFIX,
};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use supervisor::UnitKind;
use sys::{RealSys, Sys};

use kiln_init::config::{self, SYSROOT};
/// How long to wait for the root partition to show up.
const ROOT_WAIT_MS: u64 = 10_000;

fn main() {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        // Everything below assumes it owns the machine (it powers off).
        eprintln!("kiln-init: must run as PID 1 (the kernel's init); refusing");
        std::process::exit(1);
    }
    let result = std::panic::catch_unwind(run);
    let msg = match result {
        Ok(Err(msg)) => msg,
        Ok(Ok(never)) => match never {},
        Err(_) => "internal error (panic)".to_string(),
    };
    log(&format!("FATAL: {msg}"));
    let restart = RESTART_ON_FATAL.load(Ordering::Relaxed);
    log(if restart {
        "restarting in 5 seconds (the slots' boot tries choose what boots)"
    } else {
        "powering off in 5 seconds"
    });
    std::thread::sleep(std::time::Duration::from_secs(5));
    supervisor::poweroff(restart);
}

/// Whether a fatal error restarts the machine rather than powering it off:
/// the slot booted is on trial (its tries decide what boots next) or was
/// marked failed with another slot to boot.
static RESTART_ON_FATAL: AtomicBool = AtomicBool::new(false);

fn read_json<T: serde::de::DeserializeOwned>(sys: &dyn Sys, path: &str) -> Result<T, String> {
    let data = sys
        .read_file(path)
        .map_err(|e| format!("read {path}: {e}"))?;
    serde_json::from_slice(&data).map_err(|e| format!("parse {path}: {e}"))
}

/// Modules left for after the root is mounted, and the initramfs that
/// holds them (no longer `/` by then).
struct Deferred {
    /// Whether hardware modules are left (false: only ones loaded on
    /// demand, such as the bridge's, may still be needed).
    more: bool,
    loader: modules::Loader,
    index: kiln_init::config::ModuleIndex,
    initramfs: std::os::fd::OwnedFd,
}

fn log_report(what: &str, report: &modules::LoadReport, from: usize) {
    let loaded = &report.loaded[from.min(report.loaded.len())..];
    log(&format!("{what} ({}): {}", loaded.len(), loaded.join(" ")));
    for (name, err) in &report.failed {
        log(&format!("module {name} failed: {err}"));
    }
}

/// The initramfs stage: the modules the root needs (the rest wait),
/// root discovery (an A/B slot, a partition, a file), switch_root.
fn initramfs_stage(sys: &dyn Sys, boot: &BootConfig) -> Result<Stage, String> {
    let mut loader = modules::Loader::default();
    let mut booted = None;
    let (early, dev) = match &boot.root {
        RootSource::Slot { build_id } => {
            let id = parse_build_id(build_id)?;
            let root_there = || boot::find_slot(sys, &id).is_some();
            let early = loader.load(sys, &boot.modules, "", &root_there);
            log_report("modules for the root", &loader.report, 0);
            let mut waited = 0;
            let found = loop {
                if let Some(found) = boot::find_slot(sys, &id) {
                    break found;
                }
                if waited >= ROOT_WAIT_MS {
                    return Err(format!("no disk holds an A/B slot with build {build_id}"));
                }
                sys.sleep_ms(50);
                waited += 50;
            };
            let dev = found.node.clone();
            let on_trial = found
                .slots
                .iter()
                .any(|s| s.number == found.number && !s.state.successful);
            RESTART_ON_FATAL.store(on_trial, Ordering::Relaxed);
            booted = Some(found);
            (early, dev)
        }
        RootSource::Partition(guid) => {
            let root_there = || boot::root_present(sys, guid);
            let early = loader.load(sys, &boot.modules, "", &root_there);
            log_report("modules for the root", &loader.report, 0);
            let dev = boot::wait_for_partition(sys, guid, ROOT_WAIT_MS)
                .map_err(|e| console::chain(&e))?;
            (early, dev)
        }
        // Its modules (loop, the filesystem's) are among the first; the
        // rest load now too, as nothing else marks the root's arrival
        // (the power button's among them).
        RootSource::Initramfs(file) => {
            let early = loader.load(sys, &boot.modules, "", &|| false);
            log_report("modules for the root", &loader.report, 0);
            let dev = sys
                .attach_loop(file, 0, 0)
                .map_err(|e| format!("attaching {file} to a loop device: {e}"))?;
            (early, dev)
        }
        RootSource::Iso { volume_id, path } => {
            let root_there = || boot::find_iso_file(sys, volume_id, path).is_some();
            let early = loader.load(sys, &boot.modules, "", &root_there);
            log_report("modules for the root", &loader.report, 0);
            let mut waited = 0;
            let (disk, offset, len) = loop {
                if let Some(found) = boot::find_iso_file(sys, volume_id, path) {
                    break found;
                }
                if waited >= ROOT_WAIT_MS {
                    return Err(format!(
                        "no device holds ISO volume {volume_id} with {path}"
                    ));
                }
                sys.sleep_ms(50);
                waited += 50;
            };
            let dev = sys
                .attach_loop(&disk, offset, len)
                .map_err(|e| format!("attaching {path} of {disk} to a loop device: {e}"))?;
            log(&format!("root {path} found on {disk} ({volume_id})"));
            (early, dev)
        }
    };
    let mounted = boot::verify_root(sys, boot.verity.as_ref(), &dev)
        .map_err(|e| console::chain(&e))
        .and_then(|verified| {
            if verified != dev {
                log(&format!("root {dev} verified through {verified}"));
            }
            boot::mount_fs(
                sys,
                &verified,
                SYSROOT,
                &boot.root_fstype,
                libc::MS_RDONLY,
                None,
            )
            .map(|()| verified)
            .map_err(|e| {
                let hint = if boot.verity.is_some() {
                    " (a verified root that does not match its root hash fails to read)"
                } else {
                    ""
                };
                format!("{}{hint}", console::chain(&e))
            })
        });
    let dev = match (mounted, &booted) {
        (Ok(dev), _) => dev,
        (Err(e), Some(found)) => return Err(abandon_slot(found, e)),
        (Err(e), None) => return Err(e),
    };
    log(&format!("root {dev} ({}) mounted", boot.root_fstype));
    // The rest of the modules stay reachable through this descriptor.
    let initramfs = std::fs::File::open("/")
        .ok()
        .map(std::os::fd::OwnedFd::from);
    boot::switch_root(sys, SYSROOT).map_err(|e| console::chain(&e))?;
    let deferred = initramfs.map(|initramfs| Deferred {
        more: early,
        loader,
        index: boot.modules.clone(),
        initramfs,
    });
    Ok(Stage {
        deferred,
        booted,
        verity: boot.verity.as_ref().map(|v| v.on_error),
    })
}

/// Logs the A/B slots; the trial to judge if the slot booted is not yet
/// marked good.
fn slot_trial(found: &boot::FoundSlot, cfg: &HostConfig) -> Option<supervisor::Trial> {
    let letter = found.slot.letter();
    let infos = &found.slots;
    let line: Vec<String> = infos
        .iter()
        .map(|s| kiln_boot::disk::describe(s, s.number == found.number))
        .collect();
    log(&format!("booted slot {letter}; slots: {}", line.join("; ")));
    let me = infos.iter().find(|s| s.number == found.number)?;
    (!me.state.successful).then(|| supervisor::Trial {
        disk: found.disk.clone(),
        number: found.number,
        letter,
        deadline: std::time::Instant::now()
            + std::time::Duration::from_millis(cfg.healthy_within_ms),
        verdict: None,
    })
}

/// A slot whose root cannot be mounted (corrupt, or not matching its
/// root hash) is marked failed, so that the fatal error restarts into the
/// other slot; with no other image to boot, it powers off as anywhere.
fn abandon_slot(found: &boot::FoundSlot, why: String) -> String {
    let letter = found.slot.letter();
    match kiln_boot::disk::mark_failed(&found.disk, found.number) {
        Ok(other) => {
            log(&format!(
                "slot {letter} marked failed; {}",
                if other {
                    "the other slot boots next"
                } else {
                    "no other slot can boot"
                }
            ));
            RESTART_ON_FATAL.store(other, Ordering::Relaxed);
        }
        // On trial, the tries left still decide.
        Err(e) => log(&format!("slot {letter}: cannot mark it failed: {e}")),
    }
    format!("slot {letter}: {why}")
}

/// What the initramfs stage leaves for the rest: modules to load, and on
/// an A/B disk the slot booted.
struct Stage {
    deferred: Option<Deferred>,
    booted: Option<boot::FoundSlot>,
    /// What a corrupt root block does, if the root is verified.
    verity: Option<config::VerityError>,
}

fn parse_build_id(hex: &str) -> Result<[u8; 32], String> {
    let bad = || format!("boot config: build id {hex:?} is not 64 hex digits");
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut id = [0u8; 32];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).map_err(|_| bad())?;
    }
    Ok(id)
}

/// Loads the deferred modules in a child process, alongside the services
/// (once; the init keeps its loader for modules it loads on demand).
fn load_later(d: &mut Deferred) {
    if !std::mem::take(&mut d.more) {
        return;
    }
    // SAFETY: the init is single-threaded, so the child may run Rust code.
    match unsafe { libc::fork() } {
        0 => {
            let Deferred {
                loader,
                index,
                initramfs,
                ..
            } = d;
            // Idle priority: on a small machine the services go first.
            // SAFETY: sched_param is plain integers (more fields on musl);
            // zero is SCHED_IDLE's only priority.
            unsafe {
                let param: libc::sched_param = std::mem::zeroed();
                libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
            }
            let before = loader.report.loaded.len();
            loader.report.failed.clear();
            let prefix = format!("/proc/self/fd/{}", initramfs.as_raw_fd());
            loader.load(&RealSys, index, &prefix, &|| false);
            log_report("modules loaded later", &loader.report, before);
            // SAFETY: leaving the child without the parent's cleanup.
            unsafe { libc::_exit(0) }
        }
        pid if pid < 0 => log("cannot fork to load the remaining modules"),
        _ => {}
    }
}

/// Loads softdog and arms it: a hung init restarts the machine (on an
/// A/B disk, a slot on trial so loses a try).
fn arm_watchdog(sys: &dyn Sys, deferred: Option<&mut Deferred>) -> Option<std::fs::File> {
    let d = deferred?;
    let prefix = format!("/proc/self/fd/{}", d.initramfs.as_raw_fd());
    for m in kiln_init::config::WATCHDOG_MODULES {
        d.loader.load_named(sys, &d.index, &prefix, m);
    }
    let dog = match std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/watchdog")
    {
        Ok(f) => f,
        Err(e) => {
            log(&format!("watchdog: /dev/watchdog: {e}"));
            return None;
        }
    };
    let mut timeout = supervisor::WATCHDOG_TIMEOUT_S;
    // SAFETY: WDIOC_SETTIMEOUT reads and writes the one int it points to.
    let r = unsafe { libc::ioctl(dog.as_raw_fd(), WDIOC_SETTIMEOUT, &mut timeout) };
    if r < 0 {
        log(&format!(
            "watchdog: setting its timeout: {}",
            std::io::Error::last_os_error()
        ));
    }
    log(&format!("watchdog: armed, {timeout} s"));
    Some(dog)
}

/// `_IOWR('W', 6, int)`.
const WDIOC_SETTIMEOUT: libc::Ioctl = 0xc004_5706_u32 as libc::Ioctl;

/// Loads the bridge's modules and sets the bridge up; containers on it
/// fail to start if this fails, the others are unaffected.
fn set_up_bridge(sys: &dyn Sys, plan: &bridge::Plan, deferred: Option<&mut Deferred>) {
    let Some(d) = deferred else {
        log("bridge: the initramfs is gone, its modules cannot be loaded");
        return;
    };
    let prefix = format!("/proc/self/fd/{}", d.initramfs.as_raw_fd());
    let before = d.loader.report.loaded.len();
    d.loader.report.failed.clear();
    for m in kiln_init::config::BRIDGE_MODULES {
        d.loader.load_named(sys, &d.index, &prefix, m);
    }
    log_report("bridge modules", &d.loader.report, before);
    match plan.set_up() {
        Ok(()) => log(&format!(
            "bridge {} up at {}: {} containers, {} published ports",
            kiln_init::config::BRIDGE,
            plan.host,
            plan.members.len(),
            plan.forwards.len()
        )),
        Err(e) => log(&format!("bridge: {e}")),
    }
}

fn run() -> Result<std::convert::Infallible, String> {
    let sys = RealSys;
    // SAFETY: setting the process umask; no pointers.
    unsafe { libc::umask(0o022) };
    let pseudo_errs = boot::mount_pseudo(&sys);
    if let Some(fd) = boot::setup_console() {
        console::set_console(fd);
    }
    log("starting");
    for e in pseudo_errs {
        log(&format!("warning: {}", console::chain(&e)));
    }
    let mut deferred = None;
    let mut booted = None;
    let mut verity = None;
    if sys.exists(BOOT_CONFIG_PATH) {
        let boot: BootConfig = read_json(&sys, BOOT_CONFIG_PATH)?;
        let stage = initramfs_stage(&sys, &boot)?;
        deferred = stage.deferred;
        booted = stage.booted;
        verity = stage.verity;
    } else {
        log("no boot config: assuming the real root is already mounted");
    }
    // Network drivers now, in this process: DHCP runs while containers
    // set up, and a one-CPU machine defers the rest until they started.
    if let Some(d) = &mut deferred {
        let prefix = format!("/proc/self/fd/{}", d.initramfs.as_raw_fd());
        let before = d.loader.report.loaded.len();
        d.loader
            .load_where(&sys, &d.index, &prefix, &|p| p.contains("/drivers/net/"));
        if d.loader.report.loaded.len() > before {
            log_report("network drivers", &d.loader.report, before);
        }
    }
    for e in boot::mount_runtime(&sys) {
        log(&format!("warning: {}", console::chain(&e)));
    }
    // State kept across updates: the A/B disk's data partition.
    let data = match &booted {
        Some(found) => {
            let disk_name = found.disk.trim_start_matches("/dev/").to_string();
            let node = |n| boot::partition_name(&sys, &disk_name, n).map(|p| format!("/dev/{p}"));
            data::set_up(&found.disk, &node)
        }
        None => Err(std::io::Error::other("no data partition (not an A/B disk)")),
    };
    match data {
        Ok(line) => log(&line),
        Err(e) => {
            log(&format!(
                "data: {e}; {} is a tmpfs, not kept",
                config::DATA_DIR
            ));
            if let Err(e) = data::tmpfs() {
                log(&format!("warning: tmpfs on {}: {e}", config::DATA_DIR));
            }
        }
    }
    let failed = boot::setup_cgroups(&sys);
    if !failed.is_empty() {
        log(&format!(
            "warning: cgroup controllers not enabled: {}",
            failed.join(", ")
        ));
    }
    if let Err(e) = container::attach_device_filter() {
        log(&format!(
            "warning: no container can start: {}",
            console::chain(&e)
        ));
    }
    let cfg: HostConfig = read_json(&sys, HOST_CONFIG_PATH)?;
    for e in boot::apply_host(&sys, &cfg) {
        log(&format!("warning: {e}"));
    }
    log(&format!(
        "host {} ready: {} onboot, {} services (init resident: {} KiB)",
        cfg.hostname,
        cfg.onboot.len(),
        cfg.services.len(),
        sys::rss_kib().map_or("?".to_string(), |k| k.to_string())
    ));

    // Ctrl-Alt-Del becomes SIGINT to this process: a clean shutdown.
    // SAFETY: reboot(2) with a command constant only.
    unsafe { libc::reboot(libc::RB_DISABLE_CAD) };
    // The kernel's work for a module is not preemptible: on one CPU it
    // would delay the first containers however low the loader's priority,
    // so there the rest loads once they have started.
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus > 1 {
        if let Some(d) = deferred.as_mut() {
            load_later(d);
        }
    }
    let healthy_after = std::time::Duration::from_millis(cfg.healthy_after_ms);
    let mut sup = supervisor::Supervisor::new("/var/log", healthy_after);
    if let Some(trial) = booted.as_ref().and_then(|b| slot_trial(b, &cfg)) {
        sup.set_trial(trial);
    }
    if let Some(on_error) = verity {
        sup.watch_verity(supervisor::VerityWatch {
            device: "kiln-root",
            restart: on_error == config::VerityError::Restart,
            slot: booted
                .as_ref()
                .map(|b| (b.disk.clone(), b.number, b.slot.letter())),
        });
    }
    if let Some(found) = &booted {
        match control::Control::listen(&found.disk, found.number) {
            Ok(c) => sup.set_control(c),
            Err(e) => log(&format!("control: {}: {e}", config::CONTROL_SOCKET)),
        }
    }
    match network::Network::start(
        &cfg.network,
        &cfg.hostname,
        cfg.hostname_pinned,
        std::time::Instant::now(),
    ) {
        Ok(net) => sup.set_network(net, std::time::Duration::from_millis(cfg.network.wait_ms)),
        Err(e) => log(&format!("warning: no network: {}", console::chain(&e))),
    }
    // The bridge before any container can be plugged into it; DHCP's
    // first exchange is under way meanwhile.
    if let Some(plan) = bridge::Plan::of(&cfg) {
        set_up_bridge(&sys, &plan, deferred.as_mut());
    }
    let units = cfg
        .onboot
        .iter()
        .map(|c| (c, UnitKind::Onboot))
        .chain(cfg.services.iter().map(|c| (c, UnitKind::Service)))
        .chain(cfg.onshutdown.iter().map(|c| (c, UnitKind::Onshutdown)));
    for (c, kind) in units {
        if let Err(e) = sup.add(c.clone(), kind) {
            log(&format!("{e}: only the first runs"));
        }
    }
    sup.run_in_order(UnitKind::Onboot);
    // Armed once the first containers ran: its module is not on their way.
    if booted.is_some() {
        if let Some(dog) = arm_watchdog(&sys, deferred.as_mut()) {
            sup.set_watchdog(dog);
        }
    }
    if sup.stop_requested().is_none() {
        sup.start_services();
    }
    sup.settle();
    if let Some(d) = deferred.as_mut() {
        load_later(d);
    }
    sup.wait_all();
    sup.check_verity_now();
    if sup.stop_requested().is_none() {
        log("all containers exited");
        if cfg.when_done == WhenDone::Stay {
            log("staying up");
            sup.wait_for_stop();
        }
    }
    sup.stop_all();
    sup.run_in_order(UnitKind::Onshutdown);
    sup.disarm_watchdog();
    let result = RunResult {
        failed_essential: sup.failed_essential(),
    };
    let json = serde_json::to_string(&result).unwrap_or_default();
    console::write_console(format!("{RESULT_PREFIX}{json}\n").as_bytes());
    // A slot that failed its trial restarts: the chooser counts its tries.
    let reboot = (cfg.when_done == WhenDone::Reboot && sup.stop_requested().is_none())
        || sup.trial_failed()
        || sup.reboot_asked();
    supervisor::poweroff(reboot);
}
