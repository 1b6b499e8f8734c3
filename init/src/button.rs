//! The ACPI power button, read from its evdev device: QEMU's
//! `system_powerdown` (what `kiln run` sends on SIGINT/SIGTERM) and a
//! cloud's "stop instance" press it.

use crate::sys;
use std::os::fd::{AsRawFd, OwnedFd};

const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// `struct input_event` on 64-bit: a timeval, type, code, value.
const EVENT_SIZE: usize = 24;
const INPUT_DIR: &str = "/dev/input";

/// `EVIOCGNAME(len)`: the device's name.
fn eviocgname(len: u8) -> u32 {
    (2 << 30) | (u32::from(len) << 16) | (u32::from(b'E') << 8) | 0x06
}

/// Every input device whose name says it is a power button, opened
/// non-blocking (none where evdev or the button driver is missing).
pub fn open_power_buttons() -> Vec<OwnedFd> {
    let Ok(entries) = std::fs::read_dir(INPUT_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("event"))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        let Ok(path) = std::ffi::CString::new(format!("{INPUT_DIR}/{n}")) else {
            continue;
        };
        // SAFETY: a NUL-terminated path alive for the call.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        let Ok(fd) = sys::owned(fd) else { continue };
        let mut name = [0u8; 64];
        // The request's type is the C library's (`int` on musl).
        let request = eviocgname(64) as libc::Ioctl;
        // SAFETY: the buffer is as long as the length encoded in the request.
        let len = unsafe { libc::ioctl(fd.as_raw_fd(), request, name.as_mut_ptr()) };
        let len = usize::try_from(len).unwrap_or(0).min(name.len());
        if String::from_utf8_lossy(&name[..len]).contains("Power Button") {
            out.push(fd);
        }
    }
    out
}

/// Whether `data`, whole `input_event` records, holds a power key press.
pub fn pressed(data: &[u8]) -> bool {
    data.chunks_exact(EVENT_SIZE).any(|e| {
        let kind = u16::from_ne_bytes([e[16], e[17]]);
        let code = u16::from_ne_bytes([e[18], e[19]]);
        let value = i32::from_ne_bytes([e[20], e[21], e[22], e[23]]);
        kind == EV_KEY && code == KEY_POWER && value == 1
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> Vec<u8> {
        let mut e = vec![0u8; 16];
        e.extend(kind.to_ne_bytes());
        e.extend(code.to_ne_bytes());
        e.extend(value.to_ne_bytes());
        e
    }

    #[test]
    fn power_key_presses() {
        // What the button driver sends: press, sync, release, sync.
        let mut press = event(EV_KEY, KEY_POWER, 1);
        press.extend(event(0, 0, 0));
        assert!(pressed(&press));
        assert!(!pressed(&event(EV_KEY, KEY_POWER, 0)));
        assert!(!pressed(&event(EV_KEY, 115, 1)));
        assert!(!pressed(&press[..20]));
        assert_eq!(eviocgname(64), 0x8040_4506);
    }
}
