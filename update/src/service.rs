//! The in-guest update service's contract: where kiln puts its
//! configuration, where it stages an update for the init to apply, and
//! the recipe's reboot window.
//!
//! The service (`kiln-update`, a container kiln adds when a recipe sets
//! `[update] source`) checks the signed repository, fetches the chunks the
//! running slot lacks into its volume, and asks the init, over the control
//! socket, to write them into the other slot (`apply`): it needs no disk,
//! only the network and that socket.

/// The service's configuration in its container.
pub const CONFIG_PATH: &str = "/etc/kiln-update.json";
/// The container's name and its volume's.
pub const NAME: &str = "kiln-update";
/// Where its volume (the TUF datastore, the staged update) is mounted.
pub const STATE_DIR: &str = "/var/lib/kiln-update";
/// The staged update, below the volume: `manifest.json` (the signed
/// target as fetched) and `chunks/SHA256`.
pub const STAGED: &str = "staged";
/// See [`STAGED`].
pub const MANIFEST: &str = "manifest.json";
/// See [`STAGED`].
pub const CHUNKS: &str = "chunks";
/// The init's control socket (kiln-init's `CONTROL_SOCKET`).
pub const CONTROL_SOCKET: &str = "/run/kiln/state/control.sock";
/// The signal that asks the service to check now: the init sends it when
/// a container asks its control socket to `check`.
pub const CHECK_SIGNAL: libc::c_int = libc::SIGHUP;

/// A reboot window, minutes after midnight UTC: `start..end`, wrapping
/// past midnight when `end < start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    /// First minute inside.
    pub start: u16,
    /// First minute past it.
    pub end: u16,
}

impl Window {
    /// `"HH:MM-HH:MM"` (UTC).
    pub fn parse(s: &str) -> Option<Window> {
        let minute = |t: &str| {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60 && t.trim().len() == 5).then_some(h * 60 + m)
        };
        let (a, b) = s.split_once('-')?;
        let w = Window {
            start: minute(a)?,
            end: minute(b)?,
        };
        (w.start != w.end).then_some(w)
    }

    /// Seconds from `now` (seconds since the epoch) until the window
    /// opens: 0 inside it.
    pub fn wait(&self, now: u64) -> u64 {
        let day = now % 86_400;
        let (start, end) = (u64::from(self.start) * 60, u64::from(self.end) * 60);
        let inside = if start < end {
            (start..end).contains(&day)
        } else {
            day >= start || day < end
        };
        if inside {
            0
        } else {
            (start + 86_400 - day) % 86_400
        }
    }
}

/// What kiln writes to [`CONFIG_PATH`].
#[cfg(feature = "tuf")]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[update] source`.
    pub source: String,
    /// `[update] root_keys`: the keys the repository's first root must be
    /// signed by.
    pub root_keys: Vec<crate::keys::PublicKey>,
    /// `[update] check`: seconds between checks.
    pub check_secs: u64,
    /// `[update] window`; `None`: reboot once an update is written.
    pub window: Option<Window>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_wait() {
        let w = Window::parse("02:00-04:00").unwrap();
        assert_eq!((w.start, w.end), (120, 240));
        let day = 20_000 * 86_400;
        assert_eq!(w.wait(day + 3 * 3600), 0);
        assert_eq!(w.wait(day + 3600), 3600);
        assert_eq!(w.wait(day + 4 * 3600), 22 * 3600);
        let night = Window::parse("23:30-01:00").unwrap();
        assert_eq!(night.wait(day + 23 * 3600 + 45 * 60), 0);
        assert_eq!(night.wait(day + 1800), 0);
        assert_eq!(night.wait(day + 3600), 22 * 3600 + 1800);
        for bad in [
            "2:00-4:00",
            "02:00",
            "24:00-01:00",
            "02:60-03:00",
            "02:00-02:00",
            "",
        ] {
            assert_eq!(Window::parse(bad), None, "{bad}");
        }
    }
}
