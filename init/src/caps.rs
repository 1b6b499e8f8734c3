//! Capability names, masks, and applying them to the calling process.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CapError {
    #[error("unknown capability {0:?}")]
    Unknown(String),
}

use kiln_init::config::CAPABILITIES as NAMES;

/// Number of a capability name, with or without the `CAP_` prefix,
/// any case.
// Positions in NAMES, a list of about 41.
#[allow(clippy::cast_possible_truncation)]
pub fn number(name: &str) -> Result<u32, CapError> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    NAMES
        .iter()
        .position(|n| *n == bare)
        .map(|i| i as u32)
        .ok_or_else(|| CapError::Unknown(name.to_string()))
}

/// Bit mask of the named capabilities.
pub fn mask(names: &[String]) -> Result<u64, CapError> {
    names
        .iter()
        .try_fold(0u64, |m, n| Ok(m | 1u64 << number(n)?))
}

/// The sets a container's process gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapPlan {
    /// Capabilities to drop from the bounding set, ascending.
    pub drop_bounding: u64,
    /// Effective = permitted, set before exec. Inheritable stays empty
    /// (CVE-2022-24769): a file with inheritable file capabilities must not
    /// gain them across exec, as in runc and Docker.
    pub sets: u64,
}

/// What to do for a process running as `uid` that keeps `keep`, on a
/// kernel whose highest capability is `last_cap`. Like Docker, a non-root
/// user keeps the bounding set but holds nothing after exec.
pub fn plan(keep: u64, uid: u32, last_cap: u32) -> CapPlan {
    let all = if last_cap >= 63 {
        u64::MAX
    } else {
        (1u64 << (last_cap + 1)) - 1
    };
    let keep = keep & all;
    CapPlan {
        drop_bounding: all & !keep,
        sets: if uid == 0 { keep } else { 0 },
    }
}

/// Highest capability number the running kernel knows.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Drops from the bounding set. Needs CAP_SETPCAP, so runs before setuid.
pub fn drop_bounding(plan: &CapPlan) -> std::io::Result<()> {
    for cap in 0..64u32 {
        if plan.drop_bounding & (1 << cap) != 0 {
            // SAFETY: prctl with integer arguments only.
            let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if r == -1 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The two capset(2) words for `plan`: effective and permitted get
/// `plan.sets`, inheritable nothing.
// Splits the 64-bit set into its 32-bit halves on purpose.
#[allow(clippy::cast_possible_truncation)]
fn cap_data(plan: &CapPlan) -> [CapData; 2] {
    let word = |bits: u32| CapData {
        effective: bits,
        permitted: bits,
        inheritable: 0,
    };
    [word(plan.sets as u32), word((plan.sets >> 32) as u32)]
}

/// Sets effective and permitted to `plan.sets`, empties inheritable, and
/// clears the ambient set.
pub fn set_sets(plan: &CapPlan) -> std::io::Result<()> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = cap_data(plan);
    // SAFETY: header and two data structs laid out as capset(2) expects.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_init::config::DEFAULT_CAPABILITIES;

    #[test]
    fn names_map_to_kernel_numbers() {
        assert_eq!(number("CAP_CHOWN"), Ok(0));
        assert_eq!(number("CAP_SETPCAP"), Ok(8));
        assert_eq!(number("cap_net_raw"), Ok(13));
        assert_eq!(number("SYS_ADMIN"), Ok(21));
        assert_eq!(number("CAP_MKNOD"), Ok(27));
        assert_eq!(number("CAP_AUDIT_WRITE"), Ok(29));
        assert_eq!(number("CAP_SETFCAP"), Ok(31));
        assert_eq!(number("CAP_CHECKPOINT_RESTORE"), Ok(40));
        assert_eq!(
            number("CAP_NOPE"),
            Err(CapError::Unknown("CAP_NOPE".into()))
        );
    }

    #[test]
    fn docker_default_mask() {
        let names: Vec<String> = DEFAULT_CAPABILITIES.iter().map(|s| s.to_string()).collect();
        // What `grep CapEff /proc/self/status` shows in a default Docker container.
        assert_eq!(mask(&names), Ok(0x0000_0000_a804_25fb));
    }

    #[test]
    fn plan_for_root_and_users() {
        let keep = 0x0000_0000_a804_25fb;
        let root = plan(keep, 0, 40);
        assert_eq!(root.sets, keep);
        assert_eq!(root.drop_bounding, 0x0000_01ff_ffff_ffff & !keep);
        assert_eq!(root.drop_bounding & keep, 0);
        let user = plan(keep, 1000, 40);
        assert_eq!(user.sets, 0);
        assert_eq!(user.drop_bounding, root.drop_bounding);
        // Asking for a capability the kernel lacks keeps nothing extra.
        assert_eq!(plan(1 << 50, 0, 40).sets, 0);
        assert_eq!(plan(u64::MAX, 0, 63).drop_bounding, 0);
    }

    #[test]
    fn inheritable_set_is_empty() {
        let keep = (1u64 << 40) | 0xa804_25fb;
        let data = cap_data(&plan(keep, 0, 40));
        assert_eq!(
            data,
            [
                CapData {
                    effective: 0xa804_25fb,
                    permitted: 0xa804_25fb,
                    inheritable: 0,
                },
                CapData {
                    effective: 1 << 8,
                    permitted: 1 << 8,
                    inheritable: 0,
                },
            ]
        );
    }
}
