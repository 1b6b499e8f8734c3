//! Showing build progress: a live bar on a terminal, one plain line per
//! stage elsewhere (CI logs), JSON events with `--json`, nothing with
//! `--quiet`.

use indicatif::{ProgressBar, ProgressStyle};
use kiln_assemble::progress::{Event, Progress, Stage, Task};
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Quiet,
    Json,
    /// One line per stage on stderr.
    Plain,
    /// A live progress line on stderr.
    Tty,
}

impl Mode {
    pub fn choose(quiet: bool, json: bool) -> Mode {
        if quiet {
            Mode::Quiet
        } else if json {
            Mode::Json
        } else if std::io::stderr().is_terminal() && std::env::var_os("CI").is_none() {
            Mode::Tty
        } else {
            Mode::Plain
        }
    }
}

/// Inputs seen during the fetch stage, for its summary.
#[derive(Default)]
struct Counts {
    inputs: u64,
    downloaded: u64,
    bytes: u64,
}

/// Bytes of one task so far, for its live rate.
struct Rate {
    bytes: u64,
    started: Instant,
    shown: Instant,
}

pub struct Reporter {
    mode: Mode,
    bar: Option<ProgressBar>,
    counts: Mutex<Counts>,
    rates: Mutex<[Option<Rate>; 2]>,
}

impl Reporter {
    pub fn new(mode: Mode) -> Arc<Reporter> {
        let bar = (mode == Mode::Tty).then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed}] {prefix:>7} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Arc::new(Reporter {
            mode,
            bar,
            counts: Mutex::new(Counts::default()),
            rates: Mutex::new([None, None]),
        })
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The plain-text line for a finished stage.
    fn stage_line(&self, stage: Stage, seconds: f64) -> String {
        let rate = |slot: usize| {
            let rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
            rates[slot].as_ref().map(|r| {
                format!(
                    ", {}",
                    rate_text(r.bytes, r.started.elapsed().as_secs_f64())
                )
            })
        };
        let detail = match stage {
            Stage::Encode if self.mode == Mode::Tty => {
                rate(1).map_or(String::new(), |r| format!(" (compressed {})", &r[2..]))
            }
            Stage::Fetch => {
                let c = self.counts();
                format!(
                    " ({} inputs, {} downloaded, {:.1} MiB)",
                    c.inputs,
                    c.downloaded,
                    c.bytes as f64 / (1 << 20) as f64
                )
            }
            _ => String::new(),
        };
        format!("kiln: {:<7} {seconds:6.2}s{detail}", stage.name())
    }
}

/// "12.3 MiB at 4.5 MiB/s".
fn rate_text(bytes: u64, seconds: f64) -> String {
    let mib = bytes as f64 / (1 << 20) as f64;
    if seconds < 0.05 {
        return format!("{mib:.1} MiB");
    }
    format!("{mib:.1} MiB at {:.1} MiB/s", mib / seconds)
}

impl Progress for Reporter {
    fn bytes(&self, task: Task, n: u64) {
        let Some(bar) = &self.bar else { return };
        let (slot, verb) = match task {
            Task::Download => (0, "downloading"),
            Task::Compress => (1, "compressing"),
        };
        let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let r = rates[slot].get_or_insert(Rate {
            bytes: 0,
            started: now,
            shown: now,
        });
        r.bytes += n;
        // A few updates a second: called per chunk or block.
        if now.duration_since(r.shown) >= Duration::from_millis(200) {
            r.shown = now;
            let secs = now.duration_since(r.started).as_secs_f64();
            bar.set_message(format!("{verb} {}", rate_text(r.bytes, secs)));
        }
    }

    fn event(&self, event: &Event) {
        if let Event::Input { bytes, cached, .. } = event {
            let mut c = self.counts();
            c.inputs += 1;
            if !cached {
                c.downloaded += 1;
                c.bytes += bytes;
            }
        }
        match self.mode {
            Mode::Quiet => {}
            Mode::Json => {
                if let Ok(line) = serde_json::to_string(event) {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                }
            }
            Mode::Plain => {
                if let Event::StageEnd { stage, seconds } = event {
                    eprintln!("{}", self.stage_line(*stage, *seconds));
                }
            }
            Mode::Tty => {
                let Some(bar) = &self.bar else { return };
                match event {
                    Event::StageStart { stage } => bar.set_prefix(stage.name()),
                    Event::StageEnd { stage, seconds } => {
                        bar.println(self.stage_line(*stage, *seconds))
                    }
                    Event::Input {
                        what,
                        bytes,
                        cached,
                    } => {
                        let how = if *cached {
                            "cached".to_string()
                        } else {
                            format!("{:.1} MiB downloaded", *bytes as f64 / (1 << 20) as f64)
                        };
                        bar.set_message(format!("{what} ({how})"));
                    }
                    Event::Step { message } => bar.set_message(message.clone()),
                    Event::Output { path, .. } => bar.set_message(path.clone()),
                }
            }
        }
    }
}
