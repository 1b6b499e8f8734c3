//! Log fan-out: the init's own messages and every container output line go
//! to the console, container lines also to `/var/log/NAME.log`.

use crate::sys;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;

/// Longest line kept whole; longer output is cut into pieces this size so
/// a process that never prints a newline cannot grow our memory.
pub const MAX_LINE: usize = 4096;

/// The console, held for the life of the process; stderr until
/// [`set_console`] is called.
static CONSOLE: OnceLock<OwnedFd> = OnceLock::new();

/// Sends log output to `fd` from now on (only the first call counts).
pub fn set_console(fd: OwnedFd) {
    let _ = CONSOLE.set(fd);
}

/// Writes raw bytes to the console, ignoring errors: there is nowhere else
/// to report them.
pub fn write_console(data: &[u8]) {
    let stderr = std::io::stderr();
    let fd = match CONSOLE.get() {
        Some(fd) => fd.as_fd(),
        None => stderr.as_fd(),
    };
    let _ = sys::write_all(fd, data);
}

/// Logs one init message: `kiln-init: [UPTIME] MSG`.
pub fn log(msg: &str) {
    let line = format!("kiln-init: [{:>8}] {msg}\n", sys::uptime());
    write_console(line.as_bytes());
}

/// An error and its causes, `outer: inner: root`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// Splits a byte stream into lines.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Adds bytes, returning every line completed (without the newline).
    pub fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for &b in data {
            if b == b'\n' {
                out.push(std::mem::take(&mut self.pending));
            } else {
                self.pending.push(b);
                if self.pending.len() >= MAX_LINE {
                    out.push(std::mem::take(&mut self.pending));
                }
            }
        }
        out
    }

    /// The unterminated tail at end of stream, if any.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        if self.pending.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.pending))
        }
    }
}

/// `NAME| line\n`, with a trailing `\r` dropped so CRLF output stays tidy.
pub fn prefixed(name: &str, line: &[u8]) -> Vec<u8> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut out = Vec::with_capacity(name.len() + line.len() + 3);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"| ");
    out.extend_from_slice(line);
    out.push(b'\n');
    out
}

/// Where one container's lines go.
pub struct Sink {
    pub name: String,
    log: Option<std::fs::File>,
    pub lines: u64,
}

impl Sink {
    /// Opens `/var/log/NAME.log` for appending; the console alone if that fails.
    pub fn open(name: &str, log_dir: &str) -> Sink {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("{log_dir}/{name}.log"));
        if let Err(e) = &log {
            self::log(&format!("{name}: cannot open log file: {e}"));
        }
        Sink {
            name: name.to_string(),
            log: log.ok(),
            lines: 0,
        }
    }

    /// Writes one line to the console and the log file.
    pub fn line(&mut self, line: &[u8]) {
        use std::io::Write;
        if self.lines == 0 {
            log(&format!("{}: first output line", self.name));
        }
        self.lines += 1;
        let out = prefixed(&self.name, line);
        write_console(&out);
        if let Some(f) = &mut self.log {
            let _ = f.write_all(&out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_across_chunks() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"hel"), Vec::<Vec<u8>>::new());
        assert_eq!(s.push(b"lo\nwor"), vec![b"hello".to_vec()]);
        assert_eq!(s.push(b"ld\n\nx"), vec![b"world".to_vec(), Vec::new()]);
        assert_eq!(s.finish(), Some(b"x".to_vec()));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn cuts_long_lines() {
        let mut s = LineSplitter::default();
        let big = vec![b'a'; MAX_LINE * 2 + 10];
        let lines = s.push(&big);
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l.len() == MAX_LINE));
        assert_eq!(s.finish().map(|l| l.len()), Some(10));
    }

    #[test]
    fn chains_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("mount /proc")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("denied"));
        assert_eq!(chain(&e), "mount /proc: denied");
        assert_eq!(chain(&std::io::Error::other("x")), "x");
    }

    #[test]
    fn prefixes() {
        assert_eq!(prefixed("web", b"hi"), b"web| hi\n".to_vec());
        assert_eq!(prefixed("web", b"hi\r"), b"web| hi\n".to_vec());
        assert_eq!(prefixed("a", b""), b"a| \n".to_vec());
    }

    #[test]
    fn sink_appends_to_log_file() {
        let dir = std::env::temp_dir().join(format!("kiln-init-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let d = dir.to_string_lossy().to_string();
        // Console writes go to stderr (fd 2) in tests.
        let mut s = Sink::open("svc", &d);
        s.line(b"one");
        s.line(b"two");
        drop(s);
        let mut s = Sink::open("svc", &d);
        s.line(b"three");
        let text = std::fs::read_to_string(dir.join("svc.log")).expect("read");
        assert_eq!(text, "svc| one\nsvc| two\nsvc| three\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
