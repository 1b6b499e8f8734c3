//! kiln-init: PID 1 of a kiln image.
//!
//! In the initramfs it loads modules, finds the root partition by GPT GUID
//! and switches root; in the real root it sets up the host and runs the
//! containers. It never exits: on fatal errors it powers off, since a PID 1
//! that exits or panics takes the kernel down with it.

mod boot;
mod bpf;
mod button;
mod caps;
mod console;
mod container;
mod glob;
mod modules;
mod msg;
mod seccomp;
mod supervisor;
mod sys;

use console::log;
use kiln_init::config::{
    BootConfig, HostConfig, RunResult, WhenDone, BOOT_CONFIG_PATH, HOST_CONFIG_PATH, RESULT_PREFIX,
};
use supervisor::UnitKind;
use sys::{RealSys, Sys};

use kiln_init::config::SYSROOT;
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
    log("powering off in 5 seconds");
    std::thread::sleep(std::time::Duration::from_secs(5));
    supervisor::poweroff(false);
}

fn read_json<T: serde::de::DeserializeOwned>(sys: &dyn Sys, path: &str) -> Result<T, String> {
    let data = sys
        .read_file(path)
        .map_err(|e| format!("read {path}: {e}"))?;
    serde_json::from_slice(&data).map_err(|e| format!("parse {path}: {e}"))
}

/// The initramfs stage: modules, root discovery, switch_root.
fn initramfs_stage(sys: &dyn Sys, boot: &BootConfig) -> Result<(), String> {
    let report = modules::load_all(sys, &boot.modules);
    log(&format!(
        "modules loaded ({}): {}",
        report.loaded.len(),
        report.loaded.join(" ")
    ));
    for (name, err) in &report.failed {
        log(&format!("module {name} failed: {err}"));
    }
    let dev = boot::wait_for_partition(sys, &boot.root_partuuid, ROOT_WAIT_MS)
        .map_err(|e| console::chain(&e))?;
    boot::mount_fs(sys, &dev, SYSROOT, &boot.root_fstype, libc::MS_RDONLY, None)
        .map_err(|e| console::chain(&e))?;
    log(&format!("root {dev} ({}) mounted", boot.root_fstype));
    boot::switch_root(sys, SYSROOT).map_err(|e| console::chain(&e))
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
    if sys.exists(BOOT_CONFIG_PATH) {
        let boot: BootConfig = read_json(&sys, BOOT_CONFIG_PATH)?;
        initramfs_stage(&sys, &boot)?;
    } else {
        log("no boot config: assuming the real root is already mounted");
    }
    for e in boot::mount_runtime(&sys) {
        log(&format!("warning: {}", console::chain(&e)));
    }
    let failed = boot::setup_cgroups(&sys);
    if !failed.is_empty() {
        log(&format!(
            "warning: cgroup controllers not enabled: {}",
            failed.join(", ")
        ));
    }
    let cfg: HostConfig = read_json(&sys, HOST_CONFIG_PATH)?;
    for e in boot::apply_host(&sys, &cfg) {
        log(&format!("warning: {e}"));
    }
    log(&format!(
        "host {} ready: {} onboot, {} services",
        cfg.hostname,
        cfg.onboot.len(),
        cfg.services.len()
    ));

    // Ctrl-Alt-Del becomes SIGINT to this process: a clean shutdown.
    // SAFETY: reboot(2) with a command constant only.
    unsafe { libc::reboot(libc::RB_DISABLE_CAD) };
    let healthy_after = std::time::Duration::from_millis(cfg.healthy_after_ms);
    let mut sup = supervisor::Supervisor::new("/var/log", healthy_after);
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
    if sup.stop_requested().is_none() {
        sup.start_services();
    }
    sup.wait_all();
    if sup.stop_requested().is_none() {
        log("all containers exited");
        if cfg.when_done == WhenDone::Stay {
            log("staying up");
            sup.wait_for_stop();
        }
    }
    sup.stop_all();
    sup.run_in_order(UnitKind::Onshutdown);
    let result = RunResult {
        failed_essential: sup.failed_essential(),
    };
    let json = serde_json::to_string(&result).unwrap_or_default();
    console::write_console(format!("{RESULT_PREFIX}{json}\n").as_bytes());
    let reboot = cfg.when_done == WhenDone::Reboot && sup.stop_requested().is_none();
    supervisor::poweroff(reboot);
}
