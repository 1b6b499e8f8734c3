//! kiln-update: the in-guest update service. On the recipe's schedule it
//! checks the signed repository; given a newer build it fetches the chunks
//! the running slot lacks into its volume, asks the init to write them
//! into the other slot, and asks it to reboot (within the window). Its
//! lines on the console are the container's (`kiln-update| `).

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use kiln_update::repo::{self, Checked, Chunks, Running, Source};
use kiln_update::service::{self, Config};

fn main() -> ExitCode {
    // Before any other thread starts, so that every thread blocks it and
    // only `wait` takes it.
    block_check_signal();
    let cfg: Config = match std::fs::read(service::CONFIG_PATH)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", service::CONFIG_PATH);
            return ExitCode::FAILURE;
        }
    };
    let source = match Source::parse(&cfg.source) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}", chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let mut said = String::new();
    loop {
        let (line, wait) = match round(&cfg, &source) {
            Ok((line, wait)) => (line, wait),
            Err(e) => (e, Duration::from_secs(cfg.check_secs)),
        };
        // A host checking every few minutes says the same once.
        if line != said {
            println!("{line}");
            said = line;
        }
        if wait_or_asked(wait) {
            // Whoever asked sees what the check found, even if unchanged.
            said.clear();
        }
    }
}

/// Blocks [`service::CHECK_SIGNAL`] in this thread and those it starts.
fn block_check_signal() {
    // SAFETY: a signal set on the stack, initialised by sigemptyset before
    // use; pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, service::CHECK_SIGNAL);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits `d`, or until a check is asked for (true then). The signal must
/// be blocked ([`block_check_signal`]).
fn wait_or_asked(d: Duration) -> bool {
    let deadline = std::time::Instant::now() + d;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        let ts = libc::timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        // SAFETY: as in block_check_signal; sigtimedwait reads the set and
        // the timeout and may leave the info pointer null.
        let got = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, service::CHECK_SIGNAL);
            libc::sigtimedwait(&set, std::ptr::null_mut(), &ts)
        };
        if got == service::CHECK_SIGNAL {
            return true;
        }
        // EAGAIN: the time is up (the loop sees it); EINTR: wait on.
    }
}

/// One check: what to say, and how long to wait before the next.
fn round(cfg: &Config, source: &Source) -> Result<(String, Duration), String> {
    let every = Duration::from_secs(cfg.check_secs);
    let status = ask("status")?;
    let booted = status["booted"].as_str().unwrap_or_default();
    let me = status["slots"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["slot"] == booted))
        .ok_or("the init's status names no booted slot")?;
    // Writing the other slot would take away the one to fall back to.
    if me["successful"] != true {
        return Ok((
            format!("slot {booted} is on trial: checking for updates once it is marked good"),
            Duration::from_secs(2),
        ));
    }
    let running = Running {
        name: me["name"].as_str().unwrap_or_default().into(),
        version: me["version"].as_str().unwrap_or_default().into(),
    };
    let datastore = Path::new(service::STATE_DIR).join("tuf");
    let (manifest, header) = match repo::check(source, &cfg.root_keys, &datastore, &running) {
        Ok(Checked::Newer(m, h)) => (m, h),
        Ok(Checked::UpToDate) => {
            return Ok((
                format!(
                    "{} {} is the newest published in {}",
                    running.name, running.version, cfg.source
                ),
                every,
            ))
        }
        Ok(Checked::Older(v)) => {
            return Ok((
                format!(
                    "refused: {} publishes {v}, older than the {} running",
                    cfg.source, running.version
                ),
                every,
            ))
        }
        Err(e) => return Err(format!("refused: {}", chain(&e))),
    };
    println!(
        "{} {} is published; fetching what slot {booted} lacks",
        header.name, header.version
    );

    // Staged in the volume: a check after a restart or power loss goes
    // on from the chunks fetched so far.
    let staged = Path::new(service::STATE_DIR).join(service::STAGED);
    let text = serde_json::to_vec(&*manifest).map_err(|e| e.to_string())?;
    let manifest_path = staged.join(service::MANIFEST);
    if std::fs::read(&manifest_path).ok().as_deref() != Some(&text[..]) {
        let _ = std::fs::remove_dir_all(&staged);
    }
    let chunks_dir = staged.join(service::CHUNKS);
    std::fs::create_dir_all(&chunks_dir).map_err(|e| format!("{}: {e}", chunks_dir.display()))?;
    let have: HashSet<String> = ask("have")?["chunks"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let fetch = Chunks::new(source).map_err(|e| chain(&e))?;
    let (mut fetched, mut bytes) = (0, 0u64);
    let mut seen = HashSet::new();
    for c in &manifest.chunks {
        let path = chunks_dir.join(&c.sha256);
        if have.contains(&c.sha256) || !seen.insert(&c.sha256) || path.exists() {
            continue;
        }
        let data = fetch.fetch(&c.sha256).map_err(|e| chain(&e))?;
        repo::write_new(&path, &data).map_err(|e| chain(&e))?;
        fetched += 1;
        bytes += data.len() as u64;
    }
    repo::write_new(&manifest_path, &text).map_err(|e| chain(&e))?;
    println!(
        "fetched {fetched} of {} chunks ({} KiB); writing the other slot",
        manifest.chunks.len(),
        bytes >> 10
    );
    let applied = ask("apply");
    let _ = std::fs::remove_dir_all(&staged);
    let applied = applied?;
    println!(
        "slot {} now holds {} {}, armed for {} boot(s)",
        applied["slot"].as_str().unwrap_or("?"),
        header.name,
        header.version,
        applied["tries"]
    );
    if let Some(w) = cfg.window {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let wait = w.wait(now);
        if wait > 0 {
            println!(
                "rebooting in the window {:02}:{:02}-{:02}:{:02} UTC, in {wait} s",
                w.start / 60,
                w.start % 60,
                w.end / 60,
                w.end % 60
            );
            std::thread::sleep(Duration::from_secs(wait));
        }
    }
    ask("reboot")?;
    println!("rebooting into {}", header.version);
    // The init stops this service on the way down; no check meanwhile.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Asks the init one control request; its answer, or why it refused.
fn ask(request: &str) -> Result<serde_json::Value, String> {
    let fail = |e: std::io::Error| format!("{}: {request}: {e}", service::CONTROL_SOCKET);
    let mut s = UnixStream::connect(service::CONTROL_SOCKET).map_err(fail)?;
    s.write_all(format!("{request}\n").as_bytes())
        .map_err(fail)?;
    let mut line = String::new();
    std::io::BufReader::new(&s)
        .read_line(&mut line)
        .map_err(fail)?;
    let v: serde_json::Value = serde_json::from_str(&line)
        .map_err(|e| format!("the init's answer to {request}: {e}: {line:?}"))?;
    if v["ok"] == true {
        Ok(v)
    } else {
        Err(format!(
            "the init refused {request}: {}",
            v["error"].as_str().unwrap_or("no reason given")
        ))
    }
}

/// An error and its causes, each once.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.contains(&s) {
            out = format!("{out}: {s}");
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check signal cuts a wait short; without it the wait is whole.
    #[test]
    fn a_check_asked_for_ends_the_wait() {
        block_check_signal();
        let t = std::time::Instant::now();
        assert!(!wait_or_asked(Duration::from_millis(200)));
        assert!(t.elapsed() >= Duration::from_millis(200));
        // SAFETY: signalling this thread, which blocks the signal.
        unsafe { libc::pthread_kill(libc::pthread_self(), service::CHECK_SIGNAL) };
        let t = std::time::Instant::now();
        assert!(wait_or_asked(Duration::from_secs(30)));
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
