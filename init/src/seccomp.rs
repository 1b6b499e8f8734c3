//! The default seccomp filter: Docker's default profile for x86_64, built
//! here as a classic BPF program (no libseccomp). Syscalls outside the
//! allowlist fail with EPERM; a capability the container holds opens the
//! syscalls Docker ties to it; without CAP_SYS_ADMIN, `clone` may not make
//! namespaces and `clone3` says ENOSYS (so C libraries fall back to
//! `clone`); `socket` refuses AF_VSOCK; `personality` takes Docker's five
//! values. Other architectures' syscalls (i386, x32) fail with EPERM.
//!
//! The allowlist is checked in ascending order, so the commonest calls
//! (read, write, mmap...) match first.

use crate::caps;

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
/// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// The low 32 bits of the first argument (little-endian).
const OFF_ARG0: u32 = 16;
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;

const SYS_CLONE: u32 = 56;
const SYS_CLONE3: u32 = 435;
const SYS_SOCKET: u32 = 41;
const SYS_PERSONALITY: u32 = 135;
/// `clone` flags that make namespaces (Docker's 2114060288).
const NAMESPACE_FLAGS: u32 = 0x7E02_0000;
const AF_VSOCK: u32 = 40;
/// `personality` values Docker allows.
const PERSONALITIES: [u32; N] = [0, 8, 0x20000, 0x20008, 0xffff_ffff];
const N: usize = 5;

/// Syscalls every container may make (Docker's default allowlist, the
/// x86_64 ones), by number, ascending.
const ALLOWED: [(u32, &str); 294] = [
    (0, "read"),
    (1, "write"),
    (2, "open"),
    (3, "close"),
    (4, "stat"),
    (5, "fstat"),
    (6, "lstat"),
    (7, "poll"),
    (8, "lseek"),
    (9, "mmap"),
    (10, "mprotect"),
    (11, "munmap"),
    (12, "brk"),
    (13, "rt_sigaction"),
    (14, "rt_sigprocmask"),
    (15, "rt_sigreturn"),
    (16, "ioctl"),
    (17, "pread64"),
    (18, "pwrite64"),
    (19, "readv"),
    (20, "writev"),
    (21, "access"),
    (22, "pipe"),
    (23, "select"),
    (24, "sched_yield"),
    (25, "mremap"),
    (26, "msync"),
    (27, "mincore"),
    (28, "madvise"),
    (29, "shmget"),
    (30, "shmat"),
    (31, "shmctl"),
    (32, "dup"),
    (33, "dup2"),
    (34, "pause"),
    (35, "nanosleep"),
    (36, "getitimer"),
    (37, "alarm"),
    (38, "setitimer"),
    (39, "getpid"),
    (40, "sendfile"),
    (42, "connect"),
    (43, "accept"),
    (44, "sendto"),
    (45, "recvfrom"),
    (46, "sendmsg"),
    (47, "recvmsg"),
    (48, "shutdown"),
    (49, "bind"),
    (50, "listen"),
    (51, "getsockname"),
    (52, "getpeername"),
    (53, "socketpair"),
    (54, "setsockopt"),
    (55, "getsockopt"),
    (57, "fork"),
    (58, "vfork"),
    (59, "execve"),
    (60, "exit"),
    (61, "wait4"),
    (62, "kill"),
    (63, "uname"),
    (64, "semget"),
    (65, "semop"),
    (66, "semctl"),
    (67, "shmdt"),
    (68, "msgget"),
    (69, "msgsnd"),
    (70, "msgrcv"),
    (71, "msgctl"),
    (72, "fcntl"),
    (73, "flock"),
    (74, "fsync"),
    (75, "fdatasync"),
    (76, "truncate"),
    (77, "ftruncate"),
    (78, "getdents"),
    (79, "getcwd"),
    (80, "chdir"),
    (81, "fchdir"),
    (82, "rename"),
    (83, "mkdir"),
    (84, "rmdir"),
    (85, "creat"),
    (86, "link"),
    (87, "unlink"),
    (88, "symlink"),
    (89, "readlink"),
    (90, "chmod"),
    (91, "fchmod"),
    (92, "chown"),
    (93, "fchown"),
    (94, "lchown"),
    (95, "umask"),
    (96, "gettimeofday"),
    (97, "getrlimit"),
    (98, "getrusage"),
    (99, "sysinfo"),
    (100, "times"),
    (101, "ptrace"),
    (102, "getuid"),
    (104, "getgid"),
    (105, "setuid"),
    (106, "setgid"),
    (107, "geteuid"),
    (108, "getegid"),
    (109, "setpgid"),
    (110, "getppid"),
    (111, "getpgrp"),
    (112, "setsid"),
    (113, "setreuid"),
    (114, "setregid"),
    (115, "getgroups"),
    (116, "setgroups"),
    (117, "setresuid"),
    (118, "getresuid"),
    (119, "setresgid"),
    (120, "getresgid"),
    (121, "getpgid"),
    (122, "setfsuid"),
    (123, "setfsgid"),
    (124, "getsid"),
    (125, "capget"),
    (126, "capset"),
    (127, "rt_sigpending"),
    (128, "rt_sigtimedwait"),
    (129, "rt_sigqueueinfo"),
    (130, "rt_sigsuspend"),
    (131, "sigaltstack"),
    (132, "utime"),
    (133, "mknod"),
    (137, "statfs"),
    (138, "fstatfs"),
    (140, "getpriority"),
    (141, "setpriority"),
    (142, "sched_setparam"),
    (143, "sched_getparam"),
    (144, "sched_setscheduler"),
    (145, "sched_getscheduler"),
    (146, "sched_get_priority_max"),
    (147, "sched_get_priority_min"),
    (148, "sched_rr_get_interval"),
    (149, "mlock"),
    (150, "munlock"),
    (151, "mlockall"),
    (152, "munlockall"),
    (154, "modify_ldt"),
    (157, "prctl"),
    (158, "arch_prctl"),
    (159, "adjtimex"),
    (160, "setrlimit"),
    (162, "sync"),
    (186, "gettid"),
    (187, "readahead"),
    (188, "setxattr"),
    (189, "lsetxattr"),
    (190, "fsetxattr"),
    (191, "getxattr"),
    (192, "lgetxattr"),
    (193, "fgetxattr"),
    (194, "listxattr"),
    (195, "llistxattr"),
    (196, "flistxattr"),
    (197, "removexattr"),
    (198, "lremovexattr"),
    (199, "fremovexattr"),
    (200, "tkill"),
    (201, "time"),
    (202, "futex"),
    (203, "sched_setaffinity"),
    (204, "sched_getaffinity"),
    (205, "set_thread_area"),
    (206, "io_setup"),
    (207, "io_destroy"),
    (208, "io_getevents"),
    (209, "io_submit"),
    (210, "io_cancel"),
    (211, "get_thread_area"),
    (213, "epoll_create"),
    (214, "epoll_ctl_old"),
    (215, "epoll_wait_old"),
    (216, "remap_file_pages"),
    (217, "getdents64"),
    (218, "set_tid_address"),
    (219, "restart_syscall"),
    (220, "semtimedop"),
    (221, "fadvise64"),
    (222, "timer_create"),
    (223, "timer_settime"),
    (224, "timer_gettime"),
    (225, "timer_getoverrun"),
    (226, "timer_delete"),
    (228, "clock_gettime"),
    (229, "clock_getres"),
    (230, "clock_nanosleep"),
    (231, "exit_group"),
    (232, "epoll_wait"),
    (233, "epoll_ctl"),
    (234, "tgkill"),
    (235, "utimes"),
    (240, "mq_open"),
    (241, "mq_unlink"),
    (242, "mq_timedsend"),
    (243, "mq_timedreceive"),
    (244, "mq_notify"),
    (245, "mq_getsetattr"),
    (247, "waitid"),
    (251, "ioprio_set"),
    (252, "ioprio_get"),
    (253, "inotify_init"),
    (254, "inotify_add_watch"),
    (255, "inotify_rm_watch"),
    (257, "openat"),
    (258, "mkdirat"),
    (259, "mknodat"),
    (260, "fchownat"),
    (261, "futimesat"),
    (262, "newfstatat"),
    (263, "unlinkat"),
    (264, "renameat"),
    (265, "linkat"),
    (266, "symlinkat"),
    (267, "readlinkat"),
    (268, "fchmodat"),
    (269, "faccessat"),
    (270, "pselect6"),
    (271, "ppoll"),
    (273, "set_robust_list"),
    (274, "get_robust_list"),
    (275, "splice"),
    (276, "tee"),
    (277, "sync_file_range"),
    (278, "vmsplice"),
    (280, "utimensat"),
    (281, "epoll_pwait"),
    (282, "signalfd"),
    (283, "timerfd_create"),
    (284, "eventfd"),
    (285, "fallocate"),
    (286, "timerfd_settime"),
    (287, "timerfd_gettime"),
    (288, "accept4"),
    (289, "signalfd4"),
    (290, "eventfd2"),
    (291, "epoll_create1"),
    (292, "dup3"),
    (293, "pipe2"),
    (294, "inotify_init1"),
    (295, "preadv"),
    (296, "pwritev"),
    (297, "rt_tgsigqueueinfo"),
    (299, "recvmmsg"),
    (301, "fanotify_mark"),
    (302, "prlimit64"),
    (303, "name_to_handle_at"),
    (305, "clock_adjtime"),
    (306, "syncfs"),
    (307, "sendmmsg"),
    (309, "getcpu"),
    (310, "process_vm_readv"),
    (311, "process_vm_writev"),
    (314, "sched_setattr"),
    (315, "sched_getattr"),
    (316, "renameat2"),
    (317, "seccomp"),
    (318, "getrandom"),
    (319, "memfd_create"),
    (322, "execveat"),
    (324, "membarrier"),
    (325, "mlock2"),
    (326, "copy_file_range"),
    (327, "preadv2"),
    (328, "pwritev2"),
    (329, "pkey_mprotect"),
    (330, "pkey_alloc"),
    (331, "pkey_free"),
    (332, "statx"),
    (333, "io_pgetevents"),
    (334, "rseq"),
    (424, "pidfd_send_signal"),
    (425, "io_uring_setup"),
    (426, "io_uring_enter"),
    (427, "io_uring_register"),
    (434, "pidfd_open"),
    (436, "close_range"),
    (437, "openat2"),
    (439, "faccessat2"),
    (441, "epoll_pwait2"),
    (444, "landlock_create_ruleset"),
    (445, "landlock_add_rule"),
    (446, "landlock_restrict_self"),
    (447, "memfd_secret"),
    (448, "process_mrelease"),
    (449, "futex_waitv"),
];

/// Syscalls a capability opens, as in Docker's profile (x86_64 ones).
const BY_CAPABILITY: [(&str, &[(u32, &str)]); 14] = [
    (
        "SYS_ADMIN",
        &[
            (56, "clone"),
            (103, "syslog"),
            (165, "mount"),
            (166, "umount2"),
            (170, "sethostname"),
            (171, "setdomainname"),
            (179, "quotactl"),
            (212, "lookup_dcookie"),
            (272, "unshare"),
            (298, "perf_event_open"),
            (300, "fanotify_init"),
            (308, "setns"),
            (321, "bpf"),
            (428, "open_tree"),
            (429, "move_mount"),
            (430, "fsopen"),
            (431, "fsconfig"),
            (432, "fsmount"),
            (433, "fspick"),
            (435, "clone3"),
            (442, "mount_setattr"),
            (443, "quotactl_fd"),
        ],
    ),
    ("SYS_BOOT", &[(169, "reboot")]),
    ("SYS_CHROOT", &[(161, "chroot")]),
    (
        "SYS_MODULE",
        &[
            (175, "init_module"),
            (176, "delete_module"),
            (313, "finit_module"),
        ],
    ),
    ("SYS_PACCT", &[(163, "acct")]),
    (
        "SYS_PTRACE",
        &[
            (101, "ptrace"),
            (310, "process_vm_readv"),
            (311, "process_vm_writev"),
            (312, "kcmp"),
            (438, "pidfd_getfd"),
            (440, "process_madvise"),
        ],
    ),
    ("SYS_RAWIO", &[(172, "iopl"), (173, "ioperm")]),
    ("SYS_TIME", &[(164, "settimeofday"), (227, "clock_settime")]),
    ("SYS_TTY_CONFIG", &[(153, "vhangup")]),
    (
        "SYS_NICE",
        &[
            (237, "mbind"),
            (238, "set_mempolicy"),
            (239, "get_mempolicy"),
            (450, "set_mempolicy_home_node"),
        ],
    ),
    ("SYSLOG", &[(103, "syslog")]),
    ("BPF", &[(321, "bpf")]),
    ("PERFMON", &[(298, "perf_event_open")]),
    ("DAC_READ_SEARCH", &[(304, "open_by_handle_at")]),
];

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The filter for a container holding the capabilities in `caps_mask`.
pub fn program(caps_mask: u64) -> Vec<libc::sock_filter> {
    let has = |name: &str| caps::number(name).is_ok_and(|n| caps_mask & (1 << n) != 0);
    let eperm = stmt(RET_K, RET_ERRNO | libc::EPERM as u32);
    let allow = stmt(RET_K, RET_ALLOW);
    let mut p = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        eperm,
        stmt(LD_W_ABS, OFF_NR),
        jump(JGE_K, X32_SYSCALL_BIT, 0, 1),
        eperm,
    ];
    let admin = has("SYS_ADMIN");
    if !admin {
        // clone without namespace flags; clone3 (flags in memory, out of
        // reach of a filter) said to be missing.
        p.extend([
            jump(JEQ_K, SYS_CLONE, 0, 4),
            stmt(LD_W_ABS, OFF_ARG0),
            jump(JSET_K, NAMESPACE_FLAGS, 0, 1),
            eperm,
            allow,
            jump(JEQ_K, SYS_CLONE3, 0, 1),
            stmt(RET_K, RET_ERRNO | libc::ENOSYS as u32),
        ]);
    }
    p.extend([
        jump(JEQ_K, SYS_SOCKET, 0, 4),
        stmt(LD_W_ABS, OFF_ARG0),
        jump(JEQ_K, AF_VSOCK, 0, 1),
        eperm,
        allow,
    ]);
    // jeq nr; then each value jumps to the shared allow, the last falls
    // through to eperm.
    let n = u8::try_from(N).unwrap_or(u8::MAX);
    p.push(jump(JEQ_K, SYS_PERSONALITY, 0, n + 3));
    p.push(stmt(LD_W_ABS, OFF_ARG0));
    for (i, v) in (0u8..).zip(PERSONALITIES) {
        p.push(jump(JEQ_K, v, n - 1 - i, u8::from(i == n - 1)));
    }
    p.push(allow);
    p.push(eperm);
    let mut allowed: Vec<u32> = ALLOWED.iter().map(|(nr, _)| *nr).collect();
    for (cap, calls) in BY_CAPABILITY {
        if has(cap) {
            allowed.extend(calls.iter().map(|(nr, _)| *nr));
        }
    }
    allowed.sort_unstable();
    allowed.dedup();
    for nr in allowed {
        p.push(jump(JEQ_K, nr, 0, 1));
        p.push(allow);
    }
    p.push(eperm);
    p
}

/// Installs `prog` for the calling thread and what it executes; needs
/// no_new_privs (or CAP_SYS_ADMIN).
pub fn install(prog: &[libc::sock_filter]) -> std::io::Result<()> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: fprog points at `prog`, alive for the call; the kernel copies it.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &fprog as *const libc::sock_fprog,
        )
    };
    crate::sys::check(r).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic BPF program over a `seccomp_data`, as the kernel would.
    fn run(p: &[libc::sock_filter], arch: u32, nr: u32, arg0: u32) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_ne_bytes());
        data[4..8].copy_from_slice(&arch.to_ne_bytes());
        data[16..20].copy_from_slice(&arg0.to_ne_bytes());
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = p[pc];
            pc += 1;
            let jumped = |cond: bool| usize::from(if cond { i.jt } else { i.jf });
            match i.code {
                LD_W_ABS => {
                    let k = i.k as usize;
                    acc = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
                }
                JEQ_K => pc += jumped(acc == i.k),
                JGE_K => pc += jumped(acc >= i.k),
                JSET_K => pc += jumped(acc & i.k != 0),
                RET_K => return i.k,
                c => panic!("unknown opcode {c:#x}"),
            }
        }
    }

    const EPERM: u32 = RET_ERRNO | libc::EPERM as u32;

    #[test]
    fn docker_default_decisions() {
        let default =
            caps::mask(&kiln_init::config::DEFAULT_CAPABILITIES.map(String::from)).unwrap();
        let p = program(default);
        let x86 = |nr, arg0| run(&p, AUDIT_ARCH_X86_64, nr, arg0);
        // Allowed: read, write, execve, exit_group, chroot (CAP_SYS_CHROOT).
        for nr in [0, 1, 59, 231, 161] {
            assert_eq!(x86(nr, 0), RET_ALLOW, "{nr}");
        }
        // Refused: unshare, keyctl, add_key, mount, reboot, bpf, ptrace
        // is allowed (kernel >= 4.8), init_module refused.
        for nr in [272, 250, 248, 165, 169, 321, 175] {
            assert_eq!(x86(nr, 0), EPERM, "{nr}");
        }
        assert_eq!(x86(101, 0), RET_ALLOW, "ptrace");
        // clone: threads and forks yes, namespaces no; clone3 ENOSYS.
        assert_eq!(x86(SYS_CLONE, 0x003d_0f00), RET_ALLOW);
        assert_eq!(x86(SYS_CLONE, 0x1000_0000 | 0x11), EPERM);
        assert_eq!(x86(SYS_CLONE3, 0), RET_ERRNO | libc::ENOSYS as u32);
        assert_eq!(x86(SYS_SOCKET, 2), RET_ALLOW);
        assert_eq!(x86(SYS_SOCKET, AF_VSOCK), EPERM);
        for v in PERSONALITIES {
            assert_eq!(x86(SYS_PERSONALITY, v), RET_ALLOW, "{v:#x}");
        }
        assert_eq!(x86(SYS_PERSONALITY, 0x0040_0000), EPERM);
        // Other ABIs.
        assert_eq!(run(&p, 0x4000_0003, 0, 0), EPERM, "i386");
        assert_eq!(x86(X32_SYSCALL_BIT | 1, 0), EPERM, "x32");
        assert_eq!(x86(999, 0), EPERM);
    }

    #[test]
    fn capabilities_open_their_syscalls() {
        let admin = 1u64 << caps::number("SYS_ADMIN").unwrap();
        let p = program(admin);
        let x86 = |nr, arg0| run(&p, AUDIT_ARCH_X86_64, nr, arg0);
        assert_eq!(x86(272, 0), RET_ALLOW, "unshare");
        assert_eq!(x86(SYS_CLONE, 0x1000_0000), RET_ALLOW);
        assert_eq!(x86(SYS_CLONE3, 0), RET_ALLOW);
        assert_eq!(x86(161, 0), EPERM, "chroot without CAP_SYS_CHROOT");
        assert_eq!(x86(250, 0), EPERM, "keyctl is never allowed");
        assert!(program(0).len() < 1024);
    }
}
