//! From kernel hand-off to the real root: pseudo filesystems, modules,
//! finding the root partition by GPT GUID, switch_root, then the real
//! root's tmpfs mounts, cgroups, hostname and runtime files.

use crate::sys::{Sys, VerityRoot};
use kiln_formats::gpt::{self, GptError, Guid};
use kiln_init::config::{
    cmdline_root_hash, is_runtime_file, FileEntry, HostConfig, RootVerity, ROOT_HASH_KEY,
    RUNTIME_FILES_DIR,
};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("mount {what} on {target}")]
    Mount {
        what: String,
        target: String,
        source: io::Error,
    },
    #[error("root partition")]
    BadRootGuid(#[source] GptError),
    #[error("no partition with GUID {guid} appeared (disks: {seen})")]
    RootNotFound { guid: Guid, seen: String },
    #[error("switch root")]
    SwitchRoot(#[source] io::Error),
    #[error("the kernel command line pins no root hash ({key}=, 64 hex digits): the verified root cannot be checked")]
    NoRootHash { key: &'static str },
    #[error("setting up dm-verity on {dev}")]
    Verity {
        dev: String,
        #[source]
        source: io::Error,
    },
}

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

/// Mounts `fstype` on `target`, creating it, and names the failure.
pub fn mount_fs(
    sys: &dyn Sys,
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), BootError> {
    let _ = sys.mkdir_all(target);
    sys.mount(Some(src), target, Some(fstype), flags, data)
        .map_err(|source| BootError::Mount {
            what: fstype.to_string(),
            target: target.to_string(),
            source,
        })
}

/// /proc, /sys and /dev; already-mounted ones (EBUSY) are fine.
pub fn mount_pseudo(sys: &dyn Sys) -> Vec<BootError> {
    let mut errs = Vec::new();
    for (src, target, fstype, flags, data) in [
        (
            "proc",
            "/proc",
            "proc",
            NOSUID_NODEV | libc::MS_NOEXEC,
            None,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            NOSUID_NODEV | libc::MS_NOEXEC,
            None,
        ),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            libc::MS_NOSUID,
            Some("mode=0755"),
        ),
    ] {
        if let Err(e) = mount_fs(sys, src, target, fstype, flags, data) {
            if !matches!(&e, BootError::Mount { source, .. } if source.raw_os_error() == Some(libc::EBUSY))
            {
                errs.push(e);
            }
        }
    }
    errs
}

/// Makes fds 0-2 point at the console when the kernel could not open it
/// (an initramfs without /dev/console), so later fds never land there.
/// Returns the console for logging.
pub fn setup_console() -> Option<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    // std adds O_CLOEXEC.
    let console = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")
        .ok()?;
    let fd = OwnedFd::from(console);
    for std_fd in 0..3 {
        // SAFETY: F_GETFD only probes whether the fd is open.
        if unsafe { libc::fcntl(std_fd, libc::F_GETFD) } == -1 {
            // SAFETY: duplicating our open console onto a free standard fd;
            // the copy is deliberately never closed.
            unsafe { libc::dup2(fd.as_raw_fd(), std_fd) };
        }
    }
    Some(fd)
}

/// Whole disks under /sys/class/block (entries without a `partition` file).
fn whole_disks(sys: &dyn Sys) -> Vec<String> {
    sys.list_dir("/sys/class/block")
        .unwrap_or_default()
        .into_iter()
        .filter(|d| !sys.exists(&format!("/sys/class/block/{d}/partition")))
        .filter(|d| !d.starts_with("loop") && !d.starts_with("ram"))
        .collect()
}

/// The block device name of partition `number` of `disk`, from sysfs.
pub fn partition_name(sys: &dyn Sys, disk: &str, number: u32) -> Option<String> {
    let base = format!("/sys/class/block/{disk}");
    sys.list_dir(&base).ok()?.into_iter().find(|entry| {
        sys.read_file(&format!("{base}/{entry}/partition"))
            .ok()
            .and_then(|d| String::from_utf8_lossy(&d).trim().parse::<u32>().ok())
            == Some(number)
    })
}

/// The GPT of `/dev/{disk}`, 512- or 4096-byte sectors.
fn read_gpt(sys: &dyn Sys, disk: &str) -> Result<gpt::Table, GptError> {
    let dev = format!("/dev/{disk}");
    // sysfs counts 512-byte units whatever the sector size. Knowing the
    // length lets a damaged primary table fall back to the backup, as the
    // kernel does when it makes the partition nodes.
    let len = sys
        .read_file(&format!("/sys/class/block/{disk}/size"))
        .ok()
        .and_then(|s| String::from_utf8_lossy(&s).trim().parse::<u64>().ok())
        .and_then(|n| n.checked_mul(512));
    gpt::read_table_at(len, |off, buf| {
        let data = sys.read_at(&dev, off, buf.len())?;
        if data.len() != buf.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&data);
        Ok(())
    })
}

/// A block device read through the [`Sys`] seam, for the ISO reader.
struct SysReader<'a> {
    sys: &'a dyn Sys,
    dev: String,
    pos: u64,
}

impl io::Read for SysReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let data = self.sys.read_at(&self.dev, self.pos, buf.len())?;
        buf[..data.len()].copy_from_slice(&data);
        self.pos += data.len() as u64;
        Ok(data.len())
    }
}

impl io::Seek for SysReader<'_> {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        match to {
            io::SeekFrom::Start(p) => self.pos = p,
            _ => return Err(io::ErrorKind::Unsupported.into()),
        }
        Ok(self.pos)
    }
}

/// The device holding ISO 9660 volume `volume_id`, and where `path` is on
/// it: (device, byte offset, length).
pub fn find_iso_file(sys: &dyn Sys, volume_id: &str, path: &str) -> Option<(String, u64, u64)> {
    for disk in whole_disks(sys) {
        let dev = format!("/dev/{disk}");
        let r = SysReader {
            sys,
            dev: dev.clone(),
            pos: 0,
        };
        let Ok(Some(mut iso)) = crate::iso9660::Iso::open(r) else {
            continue;
        };
        if iso.label != volume_id {
            continue;
        }
        if let Ok(Some((offset, len))) = iso.extent(path) {
            return Some((dev, offset, len));
        }
    }
    None
}

/// The A/B slot holding build `build_id`, found by its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundSlot {
    /// The whole disk, `/dev/vda`.
    pub disk: String,
    /// Its partition number.
    pub number: u32,
    /// The partition's node, `/dev/vda2`.
    pub node: String,
    /// Which slot it is.
    pub slot: kiln_boot::Slot,
    /// What it holds.
    pub header: kiln_boot::SlotHeader,
    /// Every slot of its disk, as the boot found them.
    pub slots: Vec<kiln_boot::disk::SlotInfo>,
}

/// Looks once through every disk's GPT for the slot partition whose
/// header names `build_id`; its disk's slots come along (for the log and
/// the trial, with no second read).
pub fn find_slot(sys: &dyn Sys, build_id: &[u8; 32]) -> Option<FoundSlot> {
    for disk in whole_disks(sys) {
        let Ok(table) = read_gpt(sys, &disk) else {
            continue;
        };
        let dev = format!("/dev/{disk}");
        let mut slots = Vec::new();
        for p in &table.partitions {
            if p.entry.type_guid.0 != kiln_boot::SLOT_TYPE {
                continue;
            }
            let Some(slot) = kiln_boot::Slot::from_partition_name(&p.entry.name) else {
                continue;
            };
            let first = p.entry.first_lba * table.sector_size;
            let end = (p.entry.last_lba + 1) * table.sector_size;
            let len = kiln_boot::slot::HEADER_LEN;
            let header = end
                .checked_sub(len as u64)
                .and_then(|at| sys.read_at(&dev, at, len).ok())
                .and_then(|raw| kiln_boot::SlotHeader::decode(&raw))
                .filter(|h| h.fits(end - first));
            slots.push(kiln_boot::disk::SlotInfo {
                slot,
                number: p.index,
                first_lba: p.entry.first_lba,
                len: end - first,
                state: kiln_boot::SlotState::from_attributes(p.entry.attributes),
                header,
            });
        }
        let Some(me) = slots
            .iter()
            .find(|s| s.header.as_ref().is_some_and(|h| &h.build_id == build_id))
        else {
            continue;
        };
        let (number, slot) = (me.number, me.slot);
        let Some(header) = me.header.clone() else {
            continue;
        };
        if let Some(name) = partition_name(sys, &disk, number) {
            let node = format!("/dev/{name}");
            if sys.exists(&node) {
                return Some(FoundSlot {
                    disk: dev,
                    number,
                    node,
                    slot,
                    header,
                    slots,
                });
            }
        }
    }
    None
}

/// Looks once through every disk's GPT for the partition with `guid`.
/// Whether the partition with unique GUID `guid` is there now.
pub fn root_present(sys: &dyn Sys, guid: &str) -> bool {
    Guid::parse(guid).is_ok_and(|g| find_partition(sys, g).is_some())
}

pub fn find_partition(sys: &dyn Sys, guid: Guid) -> Option<String> {
    for disk in whole_disks(sys) {
        let Ok(table) = read_gpt(sys, &disk) else {
            continue;
        };
        for p in table.partitions.iter().filter(|p| p.entry.guid == guid) {
            if let Some(name) = partition_name(sys, &disk, p.index) {
                let node = format!("/dev/{name}");
                if sys.exists(&node) {
                    return Some(node);
                }
            }
        }
    }
    None
}

/// What each disk holds, for the error message when the root is missing.
fn describe_disks(sys: &dyn Sys) -> String {
    let disks: Vec<String> = whole_disks(sys)
        .into_iter()
        .map(|disk| match read_gpt(sys, &disk) {
            Ok(table) => {
                let g: Vec<String> = table
                    .partitions
                    .iter()
                    .map(|p| format!("{}={}", p.index, p.entry.guid))
                    .collect();
                format!("{disk}: {}", g.join(" "))
            }
            Err(e) => format!("{disk}: {}", crate::console::chain(&e)),
        })
        .collect();
    if disks.is_empty() {
        "none".to_string()
    } else {
        disks.join(", ")
    }
}

/// Polls for the root partition for up to `timeout_ms`.
pub fn wait_for_partition(sys: &dyn Sys, guid: &str, timeout_ms: u64) -> Result<String, BootError> {
    // A malformed GUID would never match: say so instead of waiting.
    let guid = Guid::parse(guid).map_err(BootError::BadRootGuid)?;
    let step = 50;
    let mut waited = 0;
    loop {
        if let Some(dev) = find_partition(sys, guid) {
            return Ok(dev);
        }
        if waited >= timeout_ms {
            return Err(BootError::RootNotFound {
                guid,
                seen: describe_disks(sys),
            });
        }
        sys.sleep_ms(step);
        waited += step;
    }
}

/// The device to mount the root from: `dev` itself, or for a verified
/// root its dm-verity mapping, checked against the command line's root
/// hash on every read.
pub fn verify_root(
    sys: &dyn Sys,
    verity: Option<&RootVerity>,
    dev: &str,
) -> Result<String, BootError> {
    let Some(v) = verity else {
        return Ok(dev.to_string());
    };
    let cmdline = sys.read_file("/proc/cmdline").unwrap_or_default();
    let root_hash = cmdline_root_hash(&String::from_utf8_lossy(&cmdline))
        .ok_or(BootError::NoRootHash { key: ROOT_HASH_KEY })?;
    let root = VerityRoot {
        data_blocks: v.data_blocks,
        root_hash,
        salt: v.salt.clone(),
    };
    sys.open_verity("kiln-root", dev, &root)
        .map_err(|source| BootError::Verity {
            dev: dev.to_string(),
            source,
        })
}

/// Moves /proc, /sys and /dev into `new_root`, makes it `/`, chroots.
pub fn switch_root(sys: &dyn Sys, new_root: &str) -> Result<(), BootError> {
    for m in ["/proc", "/sys", "/dev"] {
        let target = format!("{new_root}{m}");
        let _ = sys.mkdir_all(&target);
        sys.mount(Some(m), &target, None, libc::MS_MOVE, None)
            .map_err(|source| BootError::Mount {
                what: m.to_string(),
                target,
                source,
            })?;
    }
    sys.chdir(new_root).map_err(BootError::SwitchRoot)?;
    sys.mount(Some("."), "/", None, libc::MS_MOVE, None)
        .map_err(BootError::SwitchRoot)?;
    sys.chroot(".").map_err(BootError::SwitchRoot)?;
    sys.chdir("/").map_err(BootError::SwitchRoot)
}

/// Mounts of the real root. Failures are returned for logging; the boot
/// goes on without what failed.
pub fn mount_runtime(sys: &dyn Sys) -> Vec<BootError> {
    let mut errs = Vec::new();
    let mounts: [(&str, &str, &str, libc::c_ulong, Option<&str>); 6] = [
        ("tmpfs", "/run", "tmpfs", NOSUID_NODEV, Some("mode=755")),
        ("tmpfs", "/tmp", "tmpfs", NOSUID_NODEV, Some("mode=1777")),
        (
            "tmpfs",
            "/var/log",
            "tmpfs",
            NOSUID_NODEV | libc::MS_NOEXEC,
            Some("mode=755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("mode=0620,gid=5,ptmxmode=0666"),
        ),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            NOSUID_NODEV | libc::MS_NOEXEC,
            None,
        ),
        (
            "tmpfs",
            "/run/kiln",
            "tmpfs",
            NOSUID_NODEV,
            // Others may pass through (a container with its own user
            // namespace mounts its root below), not list.
            Some("mode=711"),
        ),
    ];
    for (src, target, fstype, flags, data) in mounts {
        if let Err(e) = mount_fs(sys, src, target, fstype, flags, data) {
            errs.push(e);
        }
    }
    errs
}

/// Creates the kiln cgroup and enables what controllers it can, each alone
/// so a missing one does not block the others. Returns those that failed.
pub fn setup_cgroups(sys: &dyn Sys) -> Vec<String> {
    let mut failed = Vec::new();
    let _ = sys.mkdir_all("/sys/fs/cgroup/kiln");
    for ctl in ["cpu", "io", "pids", "memory"] {
        for dir in ["/sys/fs/cgroup", "/sys/fs/cgroup/kiln"] {
            let knob = format!("{dir}/cgroup.subtree_control");
            if sys.write_file(&knob, format!("+{ctl}").as_bytes()).is_err() {
                failed.push(format!("{ctl} in {dir}"));
            }
        }
    }
    failed
}

/// Writes one runtime file with its mode and owner.
pub fn write_file(f: &FileEntry) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = std::path::Path::new(&f.path).parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(format!("{RUNTIME_FILES_DIR}{}", f.path), &f.path)?;
    std::fs::set_permissions(&f.path, std::fs::Permissions::from_mode(f.mode & 0o7777))?;
    std::os::unix::fs::chown(&f.path, Some(f.uid), Some(f.gid))
}

/// Hostname and runtime files of the host config; returns error messages.
pub fn apply_host(sys: &dyn Sys, cfg: &HostConfig) -> Vec<String> {
    let mut errs = Vec::new();
    if let Err(e) = sys.sethostname(&cfg.hostname) {
        errs.push(format!("sethostname {:?}: {e}", cfg.hostname));
    }
    // Containers on the host network reach each other on 127.0.0.1.
    if let Err(e) = sys.loopback_up() {
        errs.push(format!("bringing up lo: {e}"));
    }
    for f in cfg.files.iter().filter(|f| is_runtime_file(&f.path)) {
        if let Err(e) = write_file(f) {
            errs.push(format!("write {}: {e}", f.path));
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::FakeSys;

    #[test]
    fn a_verified_root_maps_through_dm_verity() {
        use kiln_init::config::VerityError;
        let sys = FakeSys::default();
        let v = RootVerity {
            data_blocks: 10,
            salt: "5a5a".into(),
            on_error: VerityError::Restart,
        };
        assert_eq!(verify_root(&sys, None, "/dev/vda2").unwrap(), "/dev/vda2");
        // No root hash on the command line: refused, nothing mapped.
        sys.add("/proc/cmdline", b"console=ttyS0\n");
        let e = verify_root(&sys, Some(&v), "/dev/vda2").unwrap_err();
        assert!(e.to_string().contains("roothash="), "{e}");
        assert!(sys.log().is_empty());
        let hash = "0f".repeat(32);
        sys.add(
            "/proc/cmdline",
            format!("console=ttyS0 roothash={hash}\n").as_bytes(),
        );
        assert_eq!(
            verify_root(&sys, Some(&v), "/dev/vda2").unwrap(),
            "/dev/dm-0"
        );
        assert_eq!(
            sys.log(),
            [format!(
                "veritysetup open /dev/vda2 kiln-root 10 {hash} 5a5a"
            )]
        );
    }
    use kiln_formats::gpt::{PartitionEntry, LINUX_ROOT_X86_64_TYPE, SECTOR};

    const GUID_TEXT: &str = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";
    /// Sectors of the test disks; sysfs `size` says the same.
    const DISK_SECTORS: u64 = 2048;

    fn root_guid() -> Guid {
        Guid::parse(GUID_TEXT).expect("guid")
    }

    /// A disk whose GPT, written by kiln-formats, has one partition per GUID.
    fn disk(guids: &[Guid]) -> Vec<u8> {
        let entries: Vec<PartitionEntry> = (34..)
            .zip(guids)
            .map(|(lba, &guid)| PartitionEntry {
                type_guid: LINUX_ROOT_X86_64_TYPE,
                guid,
                first_lba: lba,
                last_lba: lba,
                attributes: 0,
                name: String::new(),
            })
            .collect();
        let img = gpt::encode(Guid::NIL, DISK_SECTORS, &entries).expect("encode");
        let mut d = vec![0u8; usize::try_from(DISK_SECTORS * SECTOR).expect("small")];
        d[..img.head.len()].copy_from_slice(&img.head);
        let tail = d.len() - img.tail.len();
        d[tail..].copy_from_slice(&img.tail);
        d
    }

    fn fake_machine() -> FakeSys {
        let sys = FakeSys::default();
        sys.add("/sys/class/block/vda/size", b"2048\n");
        sys.add("/sys/class/block/vda/vda1/partition", b"1\n");
        sys.add("/sys/class/block/vda/vda2/partition", b"2\n");
        sys.add("/sys/class/block/vda1/partition", b"1\n");
        sys.add("/sys/class/block/vda2/partition", b"2\n");
        sys.add("/sys/class/block/loop0/size", b"0");
        sys.add("/dev/vda", &disk(&[Guid([9; 16]), root_guid()]));
        sys.add("/dev/vda1", b"");
        sys.add("/dev/vda2", b"");
        sys
    }

    #[test]
    fn finds_root_by_guid() {
        let sys = fake_machine();
        assert_eq!(
            find_partition(&sys, root_guid()).as_deref(),
            Some("/dev/vda2")
        );
        assert_eq!(
            wait_for_partition(&sys, &GUID_TEXT.to_uppercase(), 0).ok(),
            Some("/dev/vda2".to_string())
        );
        assert_eq!(find_partition(&sys, Guid([1; 16])), None);
    }

    #[test]
    fn damaged_primary_table_uses_the_backup() {
        let sys = fake_machine();
        let mut d = disk(&[Guid([9; 16]), root_guid()]);
        d[512 + 40] ^= 1;
        sys.add("/dev/vda", &d);
        assert_eq!(
            find_partition(&sys, root_guid()).as_deref(),
            Some("/dev/vda2")
        );
        // Without the size in sysfs there is no backup to find.
        sys.add("/sys/class/block/vda/size", b"");
        assert_eq!(find_partition(&sys, root_guid()), None);
    }

    #[test]
    fn nvme_style_names() {
        let sys = FakeSys::default();
        sys.add("/sys/class/block/nvme0n1/size", b"2048");
        sys.add("/sys/class/block/nvme0n1/nvme0n1p2/partition", b"2");
        sys.add("/sys/class/block/nvme0n1p2/partition", b"2");
        sys.add("/dev/nvme0n1", &disk(&[Guid([9; 16]), root_guid()]));
        sys.add("/dev/nvme0n1p2", b"");
        assert_eq!(
            wait_for_partition(&sys, GUID_TEXT, 100).ok().as_deref(),
            Some("/dev/nvme0n1p2")
        );
    }

    #[test]
    fn times_out_without_root() {
        let sys = FakeSys::default();
        assert!(matches!(
            wait_for_partition(&sys, GUID_TEXT, 200),
            Err(BootError::RootNotFound { .. })
        ));
        // The error lists what each disk holds.
        let sys = fake_machine();
        sys.add("/sys/class/block/vdb/size", b"8");
        sys.add("/dev/vdb", &[0; 4096]);
        let e = wait_for_partition(&sys, "00000000-0000-0000-0000-000000000001", 0)
            .expect_err("absent");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "vda: 1=09090909-0909-0909-0909-090909090909 2={GUID_TEXT}"
            )),
            "{msg}"
        );
        assert!(msg.contains("vdb: no valid GPT header"), "{msg}");
    }

    #[test]
    fn malformed_root_guid_fails_at_once() {
        let sys = fake_machine();
        assert!(matches!(
            wait_for_partition(&sys, "not-a-guid", 10_000),
            Err(BootError::BadRootGuid(_))
        ));
    }

    #[test]
    fn pseudo_and_runtime_mounts() {
        let sys = FakeSys::default();
        assert!(mount_pseudo(&sys).is_empty());
        assert!(mount_runtime(&sys).is_empty());
        assert_eq!(
            sys.mount_targets(),
            vec![
                "/proc",
                "/sys",
                "/dev",
                "/run",
                "/tmp",
                "/var/log",
                "/dev/pts",
                "/sys/fs/cgroup",
                "/run/kiln"
            ]
        );
    }

    #[test]
    fn switch_root_moves_then_chroots() {
        let sys = FakeSys::default();
        switch_root(&sys, "/sysroot").expect("switch");
        assert_eq!(
            sys.log(),
            vec![
                "mkdir -p /sysroot/proc",
                "mount /proc /sysroot/proc - move -",
                "mkdir -p /sysroot/sys",
                "mount /sys /sysroot/sys - move -",
                "mkdir -p /sysroot/dev",
                "mount /dev /sysroot/dev - move -",
                "chdir /sysroot",
                "mount . / - move -",
                "chroot .",
                "chdir /",
            ]
        );
    }

    #[test]
    fn cgroup_controllers_each_alone() {
        let sys = FakeSys {
            fail_at: Some((
                "/sys/fs/cgroup/kiln/cgroup.subtree_control".into(),
                libc::EINVAL,
            )),
            ..Default::default()
        };
        assert_eq!(
            setup_cgroups(&sys),
            vec![
                "cpu in /sys/fs/cgroup/kiln",
                "io in /sys/fs/cgroup/kiln",
                "pids in /sys/fs/cgroup/kiln",
                "memory in /sys/fs/cgroup/kiln"
            ]
        );
        assert_eq!(
            sys.log(),
            vec![
                "mkdir -p /sys/fs/cgroup/kiln",
                "write /sys/fs/cgroup/cgroup.subtree_control +cpu",
                "write /sys/fs/cgroup/cgroup.subtree_control +io",
                "write /sys/fs/cgroup/cgroup.subtree_control +pids",
                "write /sys/fs/cgroup/cgroup.subtree_control +memory",
            ]
        );
    }

    /// The hostname is set and loopback brought up before any container.
    #[test]
    fn host_gets_its_name_and_loopback() {
        let sys = FakeSys::default();
        let cfg = HostConfig {
            hostname: "box".into(),
            when_done: kiln_init::config::WhenDone::Stay,
            healthy_after_ms: 0,
            healthy_within_ms: 0,
            files: vec![],
            onboot: vec![],
            services: vec![],
            onshutdown: vec![],
            network: Default::default(),
            hostname_pinned: false,
        };
        assert!(apply_host(&sys, &cfg).is_empty());
        assert_eq!(sys.log(), vec!["sethostname box", "ip link set lo up"]);
    }

    #[test]
    fn runtime_paths() {
        assert!(is_runtime_file("/run/app/conf"));
        assert!(is_runtime_file("/tmp/x"));
        assert!(!is_runtime_file("/etc/x"));
        assert!(!is_runtime_file("/runner/x"));
        assert!(!is_runtime_file("/run/../etc/passwd"));
    }
}
