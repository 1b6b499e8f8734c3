//! What a build reports while it runs. The CLI turns these events into a
//! progress bar, plain lines or JSON; tests collect them.

use serde::Serialize;
use std::time::Duration;

/// The pipeline's stages, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Recipe → plan: every input pinned (lock read, indexes and tags resolved).
    Resolve,
    /// Plan → cache: .debs, image manifests and layers downloaded and verified.
    Fetch,
    /// Cache → trees: layers applied, host root assembled, checks run.
    Trees,
    /// Trees → filesystems: root, initramfs, UKI, ESP.
    Encode,
    /// Filesystems → output files.
    Write,
}

impl Stage {
    /// The stage's name as shown and in JSON events (`resolve`, `fetch`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Resolve => "resolve",
            Stage::Fetch => "fetch",
            Stage::Trees => "trees",
            Stage::Encode => "encode",
            Stage::Write => "write",
        }
    }
}

/// One progress event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A stage begins.
    StageStart {
        /// The stage.
        stage: Stage,
    },
    /// A stage ended; `seconds` is its wall time.
    StageEnd {
        /// The stage.
        stage: Stage,
        /// Wall-clock time in seconds.
        seconds: f64,
    },
    /// One input is in the cache: `cached` when nothing was downloaded.
    Input {
        /// The input (package, blob or file).
        what: String,
        /// Its size in bytes.
        bytes: u64,
        /// Whether it was already in the cache.
        cached: bool,
    },
    /// A step inside a stage (e.g. which filesystem is being encoded).
    Step {
        /// What is being done.
        message: String,
    },
    /// An output file is complete.
    Output {
        /// The output file.
        path: String,
        /// Its size in bytes.
        bytes: u64,
    },
}

/// Work measured in bytes while it runs, for live rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Bytes downloaded.
    Download,
    /// Raw bytes of the root filesystem compressed.
    Compress,
}

/// Receives progress events; must be cheap and never fail.
pub trait Progress: Send + Sync {
    /// Handles one event.
    fn event(&self, event: &Event);

    /// `n` more bytes of `task` done. Called often (per chunk or block):
    /// a live display, not an event stream.
    fn bytes(&self, _task: Task, _n: u64) {}
}

/// Shows nothing.
pub struct Silent;

impl Progress for Silent {
    fn event(&self, _: &Event) {}
}

/// Times a stage and reports its start and end.
pub struct StageTimer<'a> {
    progress: &'a dyn Progress,
    stage: Stage,
    started: std::time::Instant,
}

impl<'a> StageTimer<'a> {
    /// Reports `stage` as started and starts timing it.
    pub fn start(progress: &'a dyn Progress, stage: Stage) -> Self {
        progress.event(&Event::StageStart { stage });
        StageTimer {
            progress,
            stage,
            started: std::time::Instant::now(),
        }
    }

    /// Reports the end; returns the elapsed time.
    pub fn end(self) -> Duration {
        let d = self.started.elapsed();
        self.progress.event(&Event::StageEnd {
            stage: self.stage,
            seconds: d.as_secs_f64(),
        });
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_as_tagged_json() {
        let e = Event::StageEnd {
            stage: Stage::Fetch,
            seconds: 1.5,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"event":"stage-end","stage":"fetch","seconds":1.5}"#
        );
        let e = Event::Input {
            what: "busybox".into(),
            bytes: 3,
            cached: true,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"event":"input","what":"busybox","bytes":3,"cached":true}"#
        );
    }
}
