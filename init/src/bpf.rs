//! The cgroup v2 device filter: a hand-assembled BPF_PROG_TYPE_CGROUP_DEVICE
//! program allowing only the minimal /dev's character devices.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// One eBPF instruction as the kernel reads it (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u8,
    /// dst register in the low nibble, src in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

// Opcodes used (class | op | source).
pub const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
pub const ALU64_AND_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
pub const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
pub const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
pub const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// `BPF_DEVCG_DEV_CHAR` in `bpf_cgroup_dev_ctx.access_type`'s low 16 bits.
pub const DEV_CHAR: i32 = 2;
#[cfg(test)]
pub const DEV_BLOCK: i32 = 1;

/// A device rule: character device `major:minor`, `None` = any minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub major: u32,
    pub minor: Option<u32>,
}

/// runc's default allow list: null, zero, full, random, urandom, tty,
/// ptmx, and the devpts ptys (136:*).
pub const DEFAULT_RULES: [Rule; 8] = [
    Rule {
        major: 1,
        minor: Some(3),
    },
    Rule {
        major: 1,
        minor: Some(5),
    },
    Rule {
        major: 1,
        minor: Some(7),
    },
    Rule {
        major: 1,
        minor: Some(8),
    },
    Rule {
        major: 1,
        minor: Some(9),
    },
    Rule {
        major: 5,
        minor: Some(0),
    },
    Rule {
        major: 5,
        minor: Some(2),
    },
    Rule {
        major: 136,
        minor: None,
    },
];

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

/// Builds the program. Context (`struct bpf_cgroup_dev_ctx`): u32
/// access_type (access << 16 | type) at 0, major at 4, minor at 8. Returns
/// 1 to allow, 0 to deny.
pub fn program(rules: &[Rule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0),
        insn(ALU64_AND_K, 2, 0, 0, 0xffff),
        insn(LDX_MEM_W, 3, 1, 4, 0),
        insn(LDX_MEM_W, 4, 1, 8, 0),
    ];
    for r in rules {
        // Each block: checks that jump past it on mismatch, then allow.
        let checks: i16 = if r.minor.is_some() { 3 } else { 2 };
        let len = checks + 2;
        p.push(insn(JNE_K, 2, 0, len - 1, DEV_CHAR));
        p.push(insn(JNE_K, 3, 0, len - 2, r.major as i32));
        if let Some(minor) = r.minor {
            p.push(insn(JNE_K, 4, 0, len - 3, minor as i32));
        }
        p.push(insn(MOV64_K, 0, 0, 0, 1));
        p.push(insn(EXIT, 0, 0, 0, 0));
    }
    p.push(insn(MOV64_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

/// The `bpf_attr` prefix BPF_PROG_LOAD reads; the rest is zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    pad: [u64; 12],
}

#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    pad: [u64; 4],
}

// The attr structs are a few dozen bytes.
#[allow(clippy::cast_possible_truncation)]
fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a zero-padded bpf_attr variant of the given size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Loads `prog` and attaches it to the cgroup directory `cgroup_fd`.
/// Returns the program fd (the attachment keeps the program alive, so the
/// caller may drop it).
pub fn load_and_attach(prog: &[Insn], cgroup: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let license = c"Apache-2.0";
    let insn_cnt =
        u32::try_from(prog.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    let fd = libc::c_int::try_from(bpf(BPF_PROG_LOAD, &mut load)?)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    let fd = crate::sys::owned(fd)?;
    let mut attach = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: fd.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    bpf(BPF_PROG_ATTACH, &mut attach)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)]
    use super::*;

    /// Runs the subset of eBPF that [`program`] emits on a device context.
    fn run(prog: &[Insn], ty: i32, access: i32, major: u32, minor: u32) -> u64 {
        let ctx = [((access << 16) | ty) as u32, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        for _ in 0..10_000 {
            let i = prog[pc];
            let dst = (i.regs & 0x0f) as usize;
            let src = (i.regs >> 4) as usize;
            pc += 1;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(src, 1, "loads only from the context");
                    assert!(i.off >= 0 && i.off % 4 == 0 && i.off < 12);
                    r[dst] = ctx[i.off as usize / 4] as u64;
                }
                ALU64_AND_K => r[dst] &= i.imm as i64 as u64,
                MOV64_K => r[dst] = i.imm as i64 as u64,
                JNE_K => {
                    if r[dst] != i.imm as i64 as u64 {
                        pc = (pc as i64 + i.off as i64) as usize;
                    }
                }
                EXIT => return r[0],
                c => panic!("unexpected opcode {c:#x}"),
            }
            assert!(pc < prog.len(), "fell off the end");
        }
        panic!("no exit");
    }

    #[test]
    fn allows_exactly_the_default_list() {
        let p = program(&DEFAULT_RULES);
        for access in [1, 2, 4, 6, 7] {
            for (maj, min) in [
                (1, 3),
                (1, 5),
                (1, 7),
                (1, 8),
                (1, 9),
                (5, 0),
                (5, 2),
                (136, 0),
                (136, 42),
            ] {
                assert_eq!(run(&p, DEV_CHAR, access, maj, min), 1, "c {maj}:{min}");
                assert_eq!(run(&p, DEV_BLOCK, access, maj, min), 0, "b {maj}:{min}");
            }
            for (maj, min) in [
                (1, 1),
                (1, 2),
                (1, 4),
                (1, 11),
                (5, 1),
                (4, 0),
                (8, 0),
                (254, 0),
                (10, 200),
                (137, 0),
            ] {
                assert_eq!(run(&p, DEV_CHAR, access, maj, min), 0, "c {maj}:{min}");
            }
        }
        // Disk block devices are denied.
        assert_eq!(run(&p, DEV_BLOCK, 2, 253, 0), 0);
    }

    #[test]
    fn structure() {
        let p = program(&DEFAULT_RULES);
        // 4 loads, 7 exact rules of 5, one wildcard rule of 4, final deny.
        assert_eq!(p.len(), 4 + 7 * 5 + 4 + 2);
        assert_eq!(p.last().map(|i| i.code), Some(EXIT));
        assert_eq!(p[p.len() - 2], insn(MOV64_K, 0, 0, 0, 0));
        // Every jump lands inside the program.
        for (pc, i) in p.iter().enumerate() {
            if i.code == JNE_K {
                let t = pc as i64 + 1 + i.off as i64;
                assert!(t > pc as i64 && (t as usize) < p.len());
            }
        }
        assert!(program(&[]).len() == 6);
        assert_eq!(run(&program(&[]), DEV_CHAR, 2, 1, 3), 0);
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }
}
