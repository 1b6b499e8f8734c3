//! Progress display: a spinner with the current step on a TTY; nothing
//! with `--quiet`, in CI, or when stderr is not a terminal.

use indicatif::{ProgressBar, ProgressStyle};
use kiln_assemble::image::Progress;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

pub struct Reporter {
    bar: Option<ProgressBar>,
}

impl Reporter {
    pub fn new(quiet: bool) -> Arc<Reporter> {
        let show = !quiet && std::env::var_os("CI").is_none() && std::io::stderr().is_terminal();
        let bar = show.then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Arc::new(Reporter { bar })
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Progress for Reporter {
    fn step(&self, message: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(message.to_string());
        }
    }
}
