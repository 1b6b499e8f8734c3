//! The contract between the builder and the init: the files the builder
//! writes for the init (as JSON) and the paths both sides agree on.
//!
//! - `/kiln/boot.json` in the initramfs: [`BootConfig`], what is needed to
//!   find and mount the root filesystem.
//! - `/kiln/config.json` in the root filesystem: [`HostConfig`], what runs.
//! - Paths: where containers live, the mount points the init mounts over
//!   (the builder creates them in the read-only trees), PATH defaults.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Path of [`BootConfig`] inside the initramfs.
pub const BOOT_CONFIG_PATH: &str = "/kiln/boot.json";
/// Path of [`HostConfig`] inside the root filesystem.
pub const HOST_CONFIG_PATH: &str = "/kiln/config.json";
/// Where container root filesystems live inside the root filesystem:
/// `CONTAINERS_DIR/NAME/rootfs`.
pub const CONTAINERS_DIR: &str = "/containers";
/// Where the init mounts the root filesystem before switching to it; the
/// builder creates it in the initramfs.
pub const SYSROOT: &str = "/sysroot";
/// Directories the initramfs needs before anything is mounted.
pub const INITRAMFS_DIRS: [&str; 6] = ["/dev", "/proc", "/sys", SYSROOT, "/run", "/tmp"];
/// Directories the init mounts over in the host root (kernel filesystems,
/// tmpfs, the log directory).
pub const HOST_MOUNTPOINTS: [&str; 6] = ["/proc", "/sys", "/dev", "/run", "/tmp", "/var/log"];
/// Where the data partition of an A/B disk is mounted (a tmpfs without
/// one): state kept across updates, container volumes below it.
pub const DATA_DIR: &str = "/var/lib/kiln";
/// The init's control socket on A/B disks, bound into containers given
/// `control = true` at the same path: one line asked (`status`,
/// `rollback`, `reboot`, `check`), one JSON line answered.
pub const CONTROL_SOCKET: &str = "/run/kiln/state/control.sock";
/// Named volumes (`volumes = ["NAME:/path"]`): `DATA_DIR/volumes/NAME`.
pub const VOLUMES_DIR: &str = "/var/lib/kiln/volumes";
/// Directories the init mounts over in every container root.
pub const CONTAINER_MOUNTPOINTS: [&str; 5] = ["/proc", "/sys", "/dev", "/tmp", "/run"];
/// Host paths that exist only at run time (tmpfs or kernel filesystems): a
/// bind from below them cannot be checked when the image is built.
pub const RUNTIME_PREFIXES: [&str; 6] = ["/run", "/tmp", "/var/lib/kiln", "/dev", "/proc", "/sys"];
/// Where the root keeps recipe `[[file]]`s whose path is on a tmpfs the
/// init mounts (see [`is_runtime_file`]): at boot the init copies
/// `RUNTIME_FILES_DIR` + path to path.
pub const RUNTIME_FILES_DIR: &str = "/kiln/files";

/// Whether a recipe file's path is on a tmpfs the init mounts (`/run`,
/// `/tmp`), so that it is copied there at boot rather than baked in place.
pub fn is_runtime_file(path: &str) -> bool {
    ["/run/", "/tmp/"].iter().any(|p| path.starts_with(p)) && !path.contains("/../")
}

/// Where per-container cgroups live.
pub const CGROUP_DIR: &str = "/sys/fs/cgroup/kiln";
/// The init's tmpfs (mode 0700): containers' roots and its state.
pub const PLUMBING_DIR: &str = "/run/kiln";
/// Held (flock) by whoever writes a slot or the slots' boot bits while
/// the system runs: one `apply` or `rollback` at a time.
pub const SLOTS_LOCK: &str = "/run/kiln/slots.lock";
/// The containers' root mount points: `CONTAINER_ROOTS_DIR/NAME`.
pub const CONTAINER_ROOTS_DIR: &str = "/run/kiln/roots";
/// What the init publishes about the containers.
pub const STATE_DIR: &str = "/run/kiln/state";
/// Every container's state as JSON (see docs/status.md); a container may
/// bind this one file read-only.
pub const STATUS_FILE: &str = "/run/kiln/state/status.json";
/// PATH when an image sets none (Docker's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the init needs to find and mount the root filesystem: `/kiln/boot.json` in the initramfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// Where the root filesystem is.
    pub root: RootSource,
    /// Filesystem type passed to mount(2), e.g. "squashfs" or "erofs".
    pub root_fstype: String,
    /// Kernel release the modules belong to (`uname -r`).
    pub kernel_release: String,
    /// Modules shipped in the initramfs.
    pub modules: ModuleIndex,
    /// The dm-verity tree after the root's data, if the root is verified;
    /// its root hash is the kernel command line's [`ROOT_HASH_KEY`].
    pub verity: Option<RootVerity>,
}

/// Where a verified root's hash tree is and what corruption does. The
/// root's device holds the data (`data_blocks` 4 KiB blocks), then the
/// tree's superblock, then the tree, top level first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootVerity {
    /// Data blocks covered (4 KiB each).
    pub data_blocks: u64,
    /// The salt, hex.
    pub salt: String,
    /// What reading a corrupt block does.
    pub on_error: VerityError,
}

/// What reading a block that fails verification does (`[disk]
/// verity_error`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerityError {
    /// The read fails with EIO: the service sees an I/O error.
    #[default]
    Eio,
    /// The machine restarts (with A/B, counting against the slot's tries).
    Restart,
}

/// The kernel command line key pinning a verified root's hash, as
/// systemd names it: the UKI's `.cmdline` carries it, so one UKI pins
/// its whole root.
pub const ROOT_HASH_KEY: &str = "roothash";

/// The root hash a kernel command line pins: 64 hex digits, lowercased.
pub fn cmdline_root_hash(cmdline: &str) -> Option<String> {
    let key = format!("{ROOT_HASH_KEY}=");
    let value = cmdline
        .split_ascii_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix(&key))?;
    (value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| value.to_ascii_lowercase())
}

/// The software watchdog an A/B disk's init arms: a hung init restarts
/// the machine, and a slot on trial loses a try.
pub const WATCHDOG_MODULES: [&str; 1] = ["softdog"];

/// Modules a verified root needs (with what they depend on).
pub const VERITY_MODULES: [&str; 1] = ["dm_verity"];

/// Where the init finds the root filesystem: one choice per image form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RootSource {
    /// A GPT partition, by its unique partition GUID (lowercase,
    /// hyphenated): disk images laid out with `update = "none"`.
    Partition(String),
    /// The A/B slot holding this build (its slot header's build id, the
    /// root squashfs's sha256 in hex): A/B disk images.
    Slot {
        /// Hex sha256 of the root squashfs.
        build_id: String,
    },
    /// A file in the initramfs, attached read-only through a loop device:
    /// the kernel+initrd and UKI forms, which need no disk.
    Initramfs(String),
    /// A file of the ISO 9660 volume with this id, on whichever device
    /// holds it (a CD-ROM, or the ISO written to a disk), attached through
    /// a loop device at its extent: the `iso` form.
    Iso {
        /// The volume id.
        volume_id: String,
        /// The file's path in the volume (`kiln/root.img`).
        path: String,
    },
}

/// Where the kernel+initrd and UKI forms carry the root filesystem.
pub const INITRAMFS_ROOT: &str = "/kiln/root.img";
/// Where the `iso` form carries it, in its ISO 9660 tree (upper case as
/// written; the init compares names without case).
pub const ISO_ROOT: &str = "KILN/ROOT.IMG";
/// Modules a root in the initramfs needs, loaded first.
pub const INITRAMFS_ROOT_MODULES: [&str; 1] = ["loop"];

/// What the init needs to load modules without modules.dep/modules.alias.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleIndex {
    /// Module name (underscores, e.g. "virtio_blk") → module facts.
    pub modules: BTreeMap<String, ModuleInfo>,
    /// Modules loaded whatever the hardware (e.g. the root filesystem's).
    pub always: Vec<String>,
}

/// One kernel module shipped in the initramfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleInfo {
    /// Absolute path of the module file in the initramfs (.ko, .ko.xz, .ko.zst).
    pub path: String,
    /// Names from `.modinfo` `depends=`, loaded first.
    pub depends: Vec<String>,
    /// Glob patterns from `.modinfo` `alias=`, matched against modaliases.
    pub aliases: Vec<String>,
}

/// Everything the init runs, written into the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Host name set with sethostname(2).
    pub hostname: String,
    /// What to do once every container has exited.
    pub when_done: WhenDone,
    /// Milliseconds essential containers must have been ready before the
    /// run counts as healthy ([`HEALTH_FILE`]).
    pub healthy_after_ms: u64,
    /// On an A/B disk, how long a slot on trial may take to become
    /// healthy before its boot is judged failed (milliseconds).
    pub healthy_within_ms: u64,
    /// Recipe `[[file]]`s on a tmpfs (see [`is_runtime_file`]), which the
    /// init copies into place from [`RUNTIME_FILES_DIR`]; the others are
    /// baked into the read-only root and need nothing at run time.
    pub files: Vec<FileEntry>,
    /// Run to completion, in order, before services.
    pub onboot: Vec<Container>,
    /// Long-running.
    pub services: Vec<Container>,
    /// Run to completion, in order, once services have stopped.
    pub onshutdown: Vec<Container>,
    /// The host's network.
    pub network: Network,
    /// Keep `hostname` whatever DHCP (or metadata) names the host.
    pub hostname_pinned: bool,
}

/// The host's network (recipe `[network]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Interfaces configured by name; every other Ethernet interface
    /// runs DHCP.
    pub interfaces: Vec<Interface>,
    /// IPv6 by SLAAC (the kernel's autoconfiguration); false: IPv6 off.
    pub ipv6: bool,
    /// Milliseconds containers on the host network wait for it before
    /// starting anyway.
    pub wait_ms: u64,
    /// The `kiln0` bridge's subnet (network address, prefix length): the
    /// host is its first address, containers with `net = "bridge"` the
    /// next ones in recipe order.
    pub bridge_subnet: (std::net::Ipv4Addr, u8),
}

/// The bridge subnet when the recipe names none: private, and clear of
/// QEMU's 10.0.2.0/24 and Docker's 172.17.0.0/16.
pub const DEFAULT_BRIDGE_SUBNET: (std::net::Ipv4Addr, u8) =
    (std::net::Ipv4Addr::new(172, 31, 0, 0), 24);
/// The bridge containers with `net = "bridge"` are plugged into.
pub const BRIDGE: &str = "kiln0";
/// Modules the bridge, its veth pairs and the nftables rules for
/// masquerade and published ports need (with what they depend on);
/// shipped when a container uses the bridge, loaded when the network
/// comes up.
pub const BRIDGE_MODULES: [&str; 8] = [
    "bridge",
    "veth",
    "nf_tables",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_fib_ipv4",
    "nf_conntrack",
];

/// How long containers wait for the network by default.
pub const DEFAULT_NETWORK_WAIT_MS: u64 = 5_000;

impl Default for Network {
    fn default() -> Network {
        Network {
            interfaces: Vec::new(),
            ipv6: true,
            wait_ms: DEFAULT_NETWORK_WAIT_MS,
            bridge_subnet: DEFAULT_BRIDGE_SUBNET,
        }
    }
}

/// One interface of `[[network.interface]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// Kernel name, `eth0`.
    pub name: String,
    /// Configured by DHCP (false: by the fields below, or only brought up).
    pub dhcp: bool,
    /// Static address and prefix length.
    pub address: Option<(std::net::Ipv4Addr, u8)>,
    /// Default route through this router.
    pub gateway: Option<std::net::Ipv4Addr>,
    /// Name servers.
    pub dns: Vec<std::net::Ipv4Addr>,
    /// Link MTU.
    pub mtu: Option<u32>,
}

/// Where the init keeps what it learnt of the network.
pub const NET_DIR: &str = "/run/kiln/net";
/// Name servers and search domain, bound read-only over /etc/resolv.conf
/// in containers on the host network (kept current in place).
pub const RESOLV_CONF: &str = "/run/kiln/net/resolv.conf";
/// localhost and the host's name and address, bound over /etc/hosts.
pub const HOSTS_FILE: &str = "/run/kiln/net/hosts";
/// localhost and every bridge container's name and address, bound over
/// /etc/hosts in containers on the bridge: they reach each other by name.
pub const BRIDGE_HOSTS_FILE: &str = "/run/kiln/net/bridge-hosts";

/// What the init does once every container has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenDone {
    /// Keep running after every container has exited.
    Stay,
    /// Power off once every container has exited.
    Poweroff,
    /// Reboot once every container has exited.
    Reboot,
}

/// Signals a recipe may name as `stop_signal` (the init maps them to the
/// target's numbers).
pub const STOP_SIGNALS: [&str; 9] = [
    "SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGKILL", "SIGPWR", "SIGWINCH",
];

/// How long a container is given to stop before SIGKILL when the recipe
/// gives no `stop_timeout`.
pub const DEFAULT_STOP_TIMEOUT_MS: u64 = 10_000;

/// A file the init copies onto a tmpfs at boot, from
/// [`RUNTIME_FILES_DIR`] + `path` in the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Absolute path, under `/run` or `/tmp`.
    pub path: String,
    /// Permission bits (e.g. `0o644`).
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
}

/// One container the init runs: its root, command, identity and access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Container {
    /// Container name, unique within the image.
    pub name: String,
    /// Root filesystem path in the host root (read-only).
    pub rootfs: String,
    /// argv; `args[0]` is resolved against the container's PATH.
    pub args: Vec<String>,
    /// `KEY=value`, image Env merged with the recipe's.
    pub env: Vec<String>,
    /// Working directory inside the container.
    pub cwd: String,
    /// User id the command runs as.
    pub uid: u32,
    /// Primary group id the command runs as.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Network namespace choice.
    pub net: Net,
    /// Its address and the subnet's prefix length on the bridge (`net =
    /// "bridge"`); the subnet's first address is the host's, its gateway.
    pub address: Option<(std::net::Ipv4Addr, u8)>,
    /// Ports of the host's addresses forwarded to it (`net = "bridge"`).
    pub ports: Vec<Port>,
    /// Host paths bind-mounted into the container.
    pub binds: Vec<Bind>,
    /// Named volumes the init makes below [`VOLUMES_DIR`] before the
    /// container starts (the binds mount them): name, path in the
    /// container.
    #[serde(default)]
    pub volumes: Vec<(String, String)>,
    /// Writable tmpfs mounts, before the binds.
    pub tmpfs: Vec<Tmpfs>,
    /// Capability names (e.g. "CAP_CHOWN") the container keeps.
    pub capabilities: Vec<String>,
    /// When it is started again after it exits.
    pub restart: Restart,
    /// Restarts `on-failure` allows before it gives up.
    pub max_restarts: u32,
    /// Whether its failure makes the machine's run a failure.
    pub essential: bool,
    /// Signal asking it to stop (one of [`STOP_SIGNALS`]).
    pub stop_signal: String,
    /// Milliseconds it is given to stop before SIGKILL.
    pub stop_timeout_ms: u64,
    /// Services that must be ready before it starts.
    pub depends_on: Vec<String>,
    /// When it counts as ready; `None`: once started.
    pub ready: Option<Probe>,
    /// A built-in reaper is its PID 1, forwarding signals to the program
    /// and reaping orphans (Docker's `--init`); otherwise the program is.
    pub init: bool,
    /// Limits and priority, applied to its cgroup before it starts.
    pub resources: Resources,
    /// Docker's default seccomp filter; `false`: unconfined.
    pub seccomp: bool,
    /// Namespaced kernel settings (`net.core.somaxconn` → `1024`), written
    /// in its namespaces before it starts.
    pub sysctl: BTreeMap<String, String>,
    /// Resource limits by name (`nofile`), as (soft, hard); `u64::MAX` is
    /// unlimited.
    pub rlimits: BTreeMap<String, (u64, u64)>,
    /// Its own user namespace: ids 0 to [`USERNS_SIZE`] - 1 inside are
    /// host ids from this one on; `None`: the host's ids.
    pub userns: Option<u32>,
}

/// The first host uid and gid given to a container with `userns = true`
/// (as Docker's userns-remap and /etc/subuid conventions start).
pub const USERNS_FIRST: u32 = 100_000;
/// How many ids each such container maps: its range follows the previous
/// one's, so containers never share an id.
pub const USERNS_SIZE: u32 = 65_536;

/// Resource limit names a recipe may set (`RLIMIT_` + upper case).
pub const RLIMITS: [&str; 16] = [
    "as",
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
];

/// Whether a sysctl is namespaced (Docker's list): only these may be set
/// for a container, `net.*` only with its own network namespace.
pub fn namespaced_sysctl(key: &str) -> bool {
    const IPC: [&str; 8] = [
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    IPC.contains(&key) || key.starts_with("fs.mqueue.") || key.starts_with("net.")
}

/// A container's resources as intent; see [`Resources::knobs`] for the
/// cgroup v2 settings each becomes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Memory limit in bytes (`memory.max`).
    pub memory: Option<u64>,
    /// CPU limit in thousandths of a core (`cpu.max`).
    pub cpu_millis: Option<u32>,
    /// Process and thread limit (`pids.max`).
    pub pids: Option<u32>,
    /// Block I/O weight, 1 to 10000 (`io.weight`; default 100).
    pub io_weight: Option<u16>,
    /// How it fares against the others under contention.
    pub class: Class,
}

/// What a container is to the machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// Protected: its memory is not reclaimed (`memory.low`), ten times
    /// the CPU weight, and the OOM killer avoids it (`oom_score_adj`
    /// -900).
    Critical,
    /// The default: cgroup defaults.
    #[default]
    Normal,
    /// Uses what is idle: a tenth of the CPU weight, reclaimed first
    /// (`memory.high` at 80% of its limit) and OOM-killed first
    /// (`oom_score_adj` 1000).
    Batch,
}

impl Resources {
    /// The cgroup v2 files and values that carry these resources.
    pub fn knobs(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(m) = self.memory {
            out.push(("memory.max", m.to_string()));
            if self.class == Class::Batch {
                out.push(("memory.high", (m / 10 * 8).to_string()));
            }
        }
        if self.class == Class::Critical {
            let low = self.memory.map_or("max".to_string(), |m| m.to_string());
            out.push(("memory.low", low));
        }
        if let Some(c) = self.cpu_millis {
            out.push(("cpu.max", format!("{} 100000", u64::from(c) * 100)));
        }
        let weight = match self.class {
            Class::Critical => 1000,
            Class::Normal => 100,
            Class::Batch => 10,
        };
        out.push(("cpu.weight", weight.to_string()));
        if let Some(p) = self.pids {
            out.push(("pids.max", p.to_string()));
        }
        if let Some(w) = self.io_weight {
            out.push(("io.weight", format!("default {w}")));
        }
        out
    }

    /// The `oom_score_adj` its processes get.
    pub fn oom_score_adj(&self) -> i32 {
        match self.class {
            Class::Critical => -900,
            Class::Normal => 0,
            Class::Batch => 1000,
        }
    }
}

/// A readiness probe, as a recipe writes it: `{ tcp = 5432 }`,
/// `{ file = "/run/ready" }` or `{ exec = ["pg_isready"] }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Probe {
    /// Something listens on this TCP port in the container's network.
    Tcp(u16),
    /// This path exists in the container.
    File(String),
    /// This command, run in the container as its user, exits 0.
    Exec(Vec<String>),
}

/// How long essential containers must have been ready before the run is
/// recorded healthy, when the recipe gives no `healthy_after`.
pub const DEFAULT_HEALTHY_AFTER_MS: u64 = 30_000;
/// Empty at boot; written (in place, so a container may bind it) once
/// every essential container has been ready, waiting to restart or done
/// well for `healthy_after`: one line, `healthy SECONDS-SINCE-BOOT`.
pub const HEALTH_FILE: &str = "/run/kiln/state/health";

/// When a container is started again after its process exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Whatever the exit status, without limit.
    Always,
    /// After a non-zero exit status or a signal, up to `max_restarts`.
    OnFailure,
    /// Never: its first exit is final.
    Never,
}

/// Restarts `on-failure` allows when the recipe gives no `max_restarts`.
pub const DEFAULT_MAX_RESTARTS: u32 = 5;

/// What [`STATUS_FILE`] holds: every container's state, rewritten in
/// place (a bind pins the file) whenever one changes, padded with spaces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// Seconds since boot when it was written.
    pub uptime: f64,
    /// Whether the machine is shutting down.
    pub stopping: bool,
    /// In recipe order: onboot, service, onshutdown containers.
    pub containers: Vec<ContainerStatus>,
}

/// One container in [`Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerStatus {
    /// Its name.
    pub name: String,
    /// `onboot`, `service` or `onshutdown`.
    pub kind: String,
    /// `pending`, `running`, `backoff` (exited, to be restarted),
    /// `exited` (for good) or `failed` (could not start).
    pub state: String,
    /// Its process (in the host's PID namespace) while running.
    pub pid: Option<i32>,
    /// Times it was started again.
    pub restarts: u32,
    /// How its last run ended, if one did.
    pub last_exit: Option<Exit>,
    /// Seconds since boot when it entered this state.
    pub since: f64,
    /// Whether its failure fails the run.
    pub essential: bool,
    /// Whether it is ready: its probe passed in this run (or, with none,
    /// it runs).
    pub ready: bool,
}

/// How a process ended: an exit code or a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// This signal killed it.
    Signal(i32),
}

/// Prefix of the line the init prints last before powering off, followed
/// by a JSON [`RunResult`]; `kiln run` reads it for its exit status.
pub const RESULT_PREFIX: &str = "kiln-init: result ";

/// How the machine's run went, as the init reports it at power-off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunResult {
    /// Essential containers that failed (could not start, or their last
    /// exit was a failure), in recipe order.
    pub failed_essential: Vec<String>,
}

/// The network a container sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Net {
    /// Share the host's network namespace.
    Host,
    /// Own network namespace with only loopback.
    None,
    /// Own network namespace with loopback and `eth0`, one end of a veth
    /// pair whose other end is on the [`BRIDGE`]; traffic out is
    /// masqueraded to the host's addresses.
    Bridge,
}

/// A published port: traffic to `host_port` on the host's addresses (or
/// only on `host_ip`) goes to the container's `port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    /// Only this address of the host's; `None`: any.
    pub host_ip: Option<std::net::Ipv4Addr>,
    /// Port on the host.
    pub host_port: u16,
    /// Port in the container.
    pub port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
}

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// Its IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

/// A host path bind-mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bind {
    /// Path in the host root.
    pub source: String,
    /// Path in the container.
    pub target: String,
    /// Mount read-only.
    pub readonly: bool,
}

/// A size-limited tmpfs in a container, owned as the image's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tmpfs {
    /// Path in the container.
    pub path: String,
    /// Size limit in bytes.
    pub size: u64,
    /// Permission bits of its root.
    pub mode: u32,
    /// Owner user id of its root.
    pub uid: u32,
    /// Owner group id of its root.
    pub gid: u32,
}

/// Capability names in kernel number order (`CAP_CHOWN` = 0).
pub const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Docker's default capability set, what a container gets unless the
/// recipe asks for more.
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_hash_from_the_command_line() {
        let h = "AB".repeat(32);
        let line = format!("console=ttyS0 roothash={h} quiet\n");
        assert_eq!(cmdline_root_hash(&line), Some("ab".repeat(32)));
        // The last one wins, as the kernel's own parameters do.
        let two = format!("roothash={} roothash={h}", "cd".repeat(32));
        assert_eq!(cmdline_root_hash(&two), Some("ab".repeat(32)));
        assert_eq!(cmdline_root_hash("console=ttyS0"), None);
        assert_eq!(cmdline_root_hash("roothash=abc"), None);
        assert_eq!(
            cmdline_root_hash(&format!("roothash={}", "zz".repeat(32))),
            None
        );
        assert_eq!(cmdline_root_hash(&format!("xroothash={h}")), None);
    }

    #[test]
    fn resources_as_cgroup_knobs() {
        let r = Resources {
            memory: Some(100 << 20),
            cpu_millis: Some(500),
            pids: Some(64),
            io_weight: Some(200),
            class: Class::Batch,
        };
        assert_eq!(
            r.knobs(),
            [
                ("memory.max", "104857600".to_string()),
                ("memory.high", "83886080".into()),
                ("cpu.max", "50000 100000".into()),
                ("cpu.weight", "10".into()),
                ("pids.max", "64".into()),
                ("io.weight", "default 200".into()),
            ]
        );
        assert_eq!(r.oom_score_adj(), 1000);
        let critical = Resources {
            class: Class::Critical,
            ..Default::default()
        };
        assert_eq!(
            critical.knobs(),
            [
                ("memory.low", "max".to_string()),
                ("cpu.weight", "1000".into())
            ]
        );
        assert_eq!(critical.oom_score_adj(), -900);
        assert_eq!(
            Resources::default().knobs(),
            [("cpu.weight", "100".to_string())]
        );
    }
}
