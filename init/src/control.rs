//! The control socket of an A/B disk's init ([`CONTROL_SOCKET`]): a
//! container given `control = true` asks, one line per connection, and
//! gets one JSON line back.
//!
//! - `status`: the slot booted and both slots' states;
//! - `rollback`: the other slot boots next (as `kiln rollback` offline);
//! - `reboot`: services stop in order and the machine restarts;
//! - `check`: the update service (`[update] source`) checks now;
//! - `have`: the chunks of the running slot (sha256s, as an update's
//!   manifest names them), so the update service fetches only the others;
//! - `apply`: the update the service staged in its volume is written into
//!   the other slot and armed; refused while the running slot is on trial,
//!   since that would take away the slot to fall back to.
//!
//! `have` and `apply` read or write a whole slot: a child process answers
//! them, so the services' supervision goes on meanwhile. `apply` and
//! `rollback` hold [`SLOTS_LOCK`]: a second one asked meanwhile is refused
//! rather than racing the first over the slot or the partition table.

use kiln_boot::disk::{self, FileDisk, SlotInfo};
use kiln_init::config::{CONTROL_SOCKET, SLOTS_LOCK};
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

/// What a request asks the supervisor to do besides answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Nothing more.
    Nothing,
    /// Stop the services and restart the machine.
    Reboot,
}

/// The listening socket and the disk whose slots it answers for.
pub struct Control {
    pub listener: UnixListener,
    disk: String,
    booted: u32,
}

impl Control {
    /// Listens on [`CONTROL_SOCKET`] (root only) for the slots of `disk`;
    /// `booted` is the partition number of the slot running.
    pub fn listen(disk: &str, booted: u32) -> io::Result<Control> {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::remove_file(CONTROL_SOCKET);
        let listener = UnixListener::bind(CONTROL_SOCKET)?;
        std::fs::set_permissions(CONTROL_SOCKET, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(Control {
            listener,
            disk: disk.to_string(),
            booted,
        })
    }

    /// Answers the connections waiting; what to do next. `running` gives
    /// the pid of a container running by name.
    pub fn serve(&self, running: &dyn Fn(&str) -> Option<libc::pid_t>) -> Then {
        let mut then = Then::Nothing;
        while let Ok((stream, _)) = self.listener.accept() {
            if self.answer(stream, running) == Then::Reboot {
                then = Then::Reboot;
            }
        }
        then
    }

    fn answer(&self, stream: UnixStream, running: &dyn Fn(&str) -> Option<libc::pid_t>) -> Then {
        // A client that says nothing holds the init at most this long.
        let limit = Some(Duration::from_secs(1));
        if stream.set_nonblocking(false).is_err()
            || stream.set_read_timeout(limit).is_err()
            || stream.set_write_timeout(limit).is_err()
        {
            return Then::Nothing;
        }
        let mut line = String::new();
        let mut reader = io::BufReader::new((&stream).take(256));
        let _ = reader.read_line(&mut line);
        if matches!(line.trim(), "have" | "apply") {
            self.answer_in_child(line.trim(), stream);
            return Then::Nothing;
        }
        let (reply, then) = if line.trim() == "check" {
            (check(running), Then::Nothing)
        } else {
            self.handle(line.trim())
        };
        let _ = (&stream).write_all(format!("{reply}\n").as_bytes());
        // The update service asks for the status at every check; what a
        // check finds, the service says.
        if !matches!(line.trim(), "status" | "check") || reply["ok"] != true {
            crate::console::log(&format!("control: {}: {reply}", line.trim()));
        }
        then
    }

    /// Answers `request` from a child process, which may take as long as
    /// writing a slot takes.
    fn answer_in_child(&self, request: &str, stream: UnixStream) {
        // SAFETY: the init is single-threaded, so the child may run Rust code.
        match unsafe { libc::fork() } {
            0 => {
                let reply = match self.slow(request) {
                    Ok(v) => v,
                    Err(e) => serde_json::json!({"ok": false, "error": e}),
                };
                let log = if request == "have" {
                    format!("{} chunks", reply["chunks"].as_array().map_or(0, Vec::len))
                } else {
                    reply.to_string()
                };
                crate::console::log(&format!("control: {request}: {log}"));
                let _ = stream.set_write_timeout(None);
                let _ = (&stream).write_all(format!("{reply}\n").as_bytes());
                // SAFETY: leaving the child without the parent's cleanup.
                unsafe { libc::_exit(0) }
            }
            pid if pid < 0 => {
                let reply = serde_json::json!({"ok": false, "error": "cannot fork"});
                let _ = (&stream).write_all(format!("{reply}\n").as_bytes());
            }
            // The supervisor reaps it with the other children it did not
            // start itself.
            _ => {}
        }
    }

    /// `have` or `apply`, in the child.
    fn slow(&self, request: &str) -> Result<serde_json::Value, String> {
        // Released when the child exits, however it ends.
        let _lock = match request {
            "apply" => Some(lock(Path::new(SLOTS_LOCK))?),
            _ => None,
        };
        let mut dev =
            FileDisk::open(&self.disk, false).map_err(|e| format!("{}: {e}", self.disk))?;
        let (_, slots) = disk::read(&mut dev).map_err(|e| format!("reading the slots: {e}"))?;
        let me = slots
            .iter()
            .find(|s| s.number == self.booted)
            .ok_or("the booted slot is gone")?;
        if request == "have" {
            let chunks = kiln_update::apply::index(&mut dev, me)
                .map_err(|e| format!("reading slot {}: {e}", me.slot.letter()))?;
            let mut chunks: Vec<String> = chunks.into_keys().collect();
            chunks.sort();
            return Ok(serde_json::json!({"ok": true, "chunks": chunks}));
        }
        if !me.state.successful {
            return Err(format!(
                "slot {} is on trial: writing the other slot would take away the one to fall back to",
                me.slot.letter()
            ));
        }
        drop(dev);
        let staged = std::path::Path::new(kiln_init::config::VOLUMES_DIR)
            .join(kiln_update::service::NAME)
            .join(kiln_update::service::STAGED);
        let manifest = staged.join(kiln_update::service::MANIFEST);
        let text = std::fs::read(&manifest).map_err(|e| format!("{}: {e}", manifest.display()))?;
        let (m, header) = kiln_update::manifest::Manifest::parse(&text)
            .map_err(|e| format!("{}: {e}", manifest.display()))?;
        let chunks = staged.join(kiln_update::service::CHUNKS);
        let a = kiln_update::apply::apply(&self.disk, Some(self.booted), &m, &header, &mut |c| {
            let path = chunks.join(&c.sha256);
            std::fs::read(&path).map_err(|source| kiln_update::UpdateError::Io { path, source })
        })
        .map_err(|e| crate::console::chain(&e))?;
        Ok(serde_json::json!({
            "ok": true,
            "slot": a.slot.to_string(),
            "version": a.version,
            "previous": a.previous,
            "tries": a.tries,
            "fetched": a.fetched,
            "reused": a.reused,
        }))
    }

    /// The answer to one request.
    fn handle(&self, request: &str) -> (serde_json::Value, Then) {
        let fail = |e: String| (serde_json::json!({"ok": false, "error": e}), Then::Nothing);
        let slots = match FileDisk::open(&self.disk, request == "rollback")
            .and_then(|mut d| disk::read(&mut d).map(|(_, s)| (d, s)))
        {
            Ok(s) => s,
            Err(e) => return fail(format!("reading the slots: {e}")),
        };
        let (mut dev, slots) = slots;
        let Some(me) = slots.iter().find(|s| s.number == self.booted) else {
            return fail("the booted slot is gone".into());
        };
        match request {
            "status" => (
                serde_json::json!({
                    "ok": true,
                    "booted": me.slot.letter().to_string(),
                    "slots": slots.iter().map(|s| slot_json(s, s.number == self.booted)).collect::<Vec<_>>(),
                }),
                Then::Nothing,
            ),
            "rollback" => {
                let _lock = match lock(Path::new(SLOTS_LOCK)) {
                    Ok(l) => l,
                    Err(e) => return fail(e),
                };
                let Some(other) = slots.iter().find(|s| s.slot != me.slot) else {
                    return fail("no other slot".into());
                };
                let Some(h) = &other.header else {
                    return fail(format!("slot {} holds no image", other.slot.letter()));
                };
                let (t, m) = kiln_boot::slot::prefer(other.state, me.state, h.tries);
                let written = disk::set_state(&mut dev, other.number, t)
                    .and_then(|()| disk::set_state(&mut dev, me.number, m));
                match written {
                    Ok(()) => (
                        serde_json::json!({"ok": true, "next": other.slot.letter().to_string()}),
                        Then::Nothing,
                    ),
                    Err(e) => fail(format!("writing the slots' boot bits: {e}")),
                }
            }
            "reboot" => (serde_json::json!({"ok": true}), Then::Reboot),
            other => fail(format!(
                "unknown request {other:?} (status, rollback, reboot, check, have or apply)"
            )),
        }
    }
}

/// Asks the update service to check now.
fn check(running: &dyn Fn(&str) -> Option<libc::pid_t>) -> serde_json::Value {
    use kiln_update::service::{CHECK_SIGNAL, NAME};
    let Some(pid) = running(NAME) else {
        return serde_json::json!({
            "ok": false,
            "error": format!("{NAME} is not running (it runs when the recipe sets [update] source)"),
        });
    };
    // SAFETY: signalling a child of this init that it has not reaped.
    if unsafe { libc::kill(pid, CHECK_SIGNAL) } != 0 {
        let e = io::Error::last_os_error();
        return serde_json::json!({"ok": false, "error": format!("signalling {NAME}: {e}")});
    }
    serde_json::json!({"ok": true})
}

/// Takes the lock at `path` for as long as the file returned is open, or
/// says who holds it.
fn lock(path: &Path) -> Result<File, String> {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: flock only reads the descriptor, which `f` owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.kind() == io::ErrorKind::WouldBlock {
            "an update is being written into the other slot: ask again when it is done".into()
        } else {
            format!("locking {}: {e}", path.display())
        });
    }
    Ok(f)
}

fn slot_json(s: &SlotInfo, booted: bool) -> serde_json::Value {
    serde_json::json!({
        "slot": s.slot.letter().to_string(),
        "name": s.header.as_ref().map(|h| h.name.clone()),
        "version": s.header.as_ref().map(|h| h.version.clone()),
        "state": disk::describe(s, booted),
        "priority": s.state.priority,
        "tries": s.state.tries,
        "successful": s.state.successful,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second writer is refused while the first holds the lock, in
    /// another process as in this one, and may go once it is gone.
    #[test]
    fn one_writer_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slots.lock");
        let first = lock(&path).unwrap();
        let e = lock(&path).unwrap_err();
        assert!(e.contains("being written"), "{e}");
        let other = std::process::Command::new("flock")
            .args(["--nonblock", "--exclusive"])
            .arg(&path)
            .arg("true")
            .status()
            .unwrap();
        assert!(!other.success(), "another process took the lock");
        drop(first);
        let again = lock(&path);
        assert!(again.is_ok(), "{again:?}");
    }

    #[test]
    fn the_update_service_knows_the_socket() {
        assert_eq!(
            kiln_update::service::CONTROL_SOCKET,
            kiln_init::config::CONTROL_SOCKET
        );
    }
}
