//! Running containers as units: each has a name, a kind and a state;
//! the supervisor starts them, forwards their output, reaps every child
//! (the init inherits all orphans), and shuts the machine down.

use crate::console::{self, LineSplitter, Sink};
use crate::container;
use crate::network::Network;
use crate::sys;
use kiln_init::config::{
    Container, ContainerStatus, Exit, Net, Probe, Restart, Status, HEALTH_FILE, STATE_DIR,
    STATUS_FILE,
};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};
use thiserror::Error;

/// How long output pipes may stay open after their container exited (a
/// child that escaped the PID namespace's teardown cannot hold us up).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// One output pipe of a unit.
struct Stream {
    fd: OwnedFd,
    split: LineSplitter,
}

/// A starting container's setup report (non-blocking), read until it
/// ends: at the exec, or the setup's failure.
struct Report {
    fd: OwnedFd,
    buf: Vec<u8>,
}

/// More than any failure report takes.
const REPORT_MAX: usize = 64 * 1024;

impl Report {
    /// Reads what is there; true once the writers are gone.
    fn read(&mut self) -> bool {
        let mut chunk = [0u8; 512];
        loop {
            match sys::read(self.fd.as_fd(), &mut chunk) {
                Ok(0) => return true,
                Ok(n) if self.buf.len() < REPORT_MAX => self.buf.extend_from_slice(&chunk[..n]),
                Ok(_) => {}
                Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock,
            }
        }
    }
}

/// What a pipe polled in a round belongs to.
#[derive(Clone, Copy)]
enum Pipe {
    /// Stream `.1` of unit `.0`.
    Output(usize, usize),
    /// The setup report of unit `.0`.
    Report(usize),
}

/// When a unit runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitKind {
    /// Runs to completion, in order, before services.
    Onboot,
    /// Long-running.
    Service,
    /// Runs to completion, in order, once services have stopped.
    Onshutdown,
}

/// Where a unit is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Not started yet.
    Pending,
    /// Its process runs (PID in the init's namespace).
    Running { pid: libc::pid_t },
    /// Its process ended with this wait status; it starts again at `at`.
    Backoff { status: libc::c_int, at: Instant },
    /// Its process ended with this wait status, for good.
    Exited { status: libc::c_int },
    /// It could not be started.
    Failed { reason: String },
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Running { .. } => "running",
            State::Backoff { .. } => "backoff",
            State::Exited { .. } => "exited",
            State::Failed { .. } => "failed",
        }
    }
}

/// First restart delay; each quick exit in a row doubles it.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest restart delay.
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A run at least this long ends a crash loop: the delay and the count
/// of restarts `max_restarts` limits start over.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// Quick exits in a row from which a unit is said to crash-loop.
const CRASH_LOOP: u32 = 3;

/// What follows an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Its exit is final (success, or `never`).
    Done,
    /// Start it again after this delay.
    Restart(Duration),
    /// `on-failure` gave up after `max_restarts` restarts in a row.
    GiveUp,
}

/// The policy's decision for a unit that exited with `status`, having been
/// restarted `streak` times since its last run of [`HEALTHY_RUN`].
pub fn after_exit(
    restart: Restart,
    max_restarts: u32,
    streak: u32,
    status: libc::c_int,
) -> AfterExit {
    let failed = status != 0;
    let delay = BACKOFF_START
        .saturating_mul(1 << streak.min(16))
        .min(BACKOFF_CAP);
    match restart {
        Restart::Never => AfterExit::Done,
        Restart::OnFailure if !failed => AfterExit::Done,
        Restart::OnFailure if streak >= max_restarts => AfterExit::GiveUp,
        Restart::OnFailure | Restart::Always => AfterExit::Restart(delay),
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("unit {unit}: cannot become {to} while {from}")]
pub struct BadTransition {
    unit: String,
    from: &'static str,
    to: &'static str,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("two containers are named {0:?}")]
pub struct DuplicateUnit(String);

/// A supervised container.
pub struct Unit {
    spec: Container,
    kind: UnitKind,
    state: State,
    started_at: Option<Instant>,
    exited_at: Option<Instant>,
    /// Restarts since it started first.
    restarts: u32,
    /// Restarts since its last run of [`HEALTHY_RUN`].
    streak: u32,
    /// The init stopped it: its exit is final and no failure.
    stopped: bool,
    /// Seconds since boot when it entered its state.
    since: f64,
    /// The wait status of its last run.
    last_status: Option<libc::c_int>,
    /// Its probe passed in this run (or it exec'd, having none).
    ready: bool,
    /// Its setup report while it sets up; the step that failed, if one did.
    report: Option<Report>,
    setup_failure: Option<String>,
    /// When its probe runs next; a running exec probe and its start.
    next_probe: Option<Instant>,
    probing: Option<(libc::pid_t, Instant)>,
    /// It has logged what it waits for.
    said_waiting: bool,
    sink: Option<Sink>,
    streams: Vec<Stream>,
}

impl Unit {
    pub fn new(spec: Container, kind: UnitKind) -> Unit {
        Unit {
            spec,
            kind,
            state: State::Pending,
            started_at: None,
            exited_at: None,
            restarts: 0,
            streak: 0,
            stopped: false,
            since: sys::boot_seconds(),
            last_status: None,
            ready: false,
            report: None,
            setup_failure: None,
            next_probe: None,
            probing: None,
            said_waiting: false,
            sink: None,
            streams: Vec::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn kind(&self) -> UnitKind {
        self.kind
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn pid(&self) -> Option<libc::pid_t> {
        match self.state {
            State::Running { pid } => Some(pid),
            _ => None,
        }
    }

    fn go(&mut self, allowed: bool, to: State) -> Result<(), BadTransition> {
        if !allowed {
            return Err(BadTransition {
                unit: self.name().to_string(),
                from: self.state.name(),
                to: to.name(),
            });
        }
        self.state = to;
        self.since = sys::boot_seconds();
        Ok(())
    }

    /// Its entry in the status file.
    fn status(&self) -> ContainerStatus {
        let kind = match self.kind {
            UnitKind::Onboot => "onboot",
            UnitKind::Service => "service",
            UnitKind::Onshutdown => "onshutdown",
        };
        ContainerStatus {
            name: self.name().to_string(),
            kind: kind.to_string(),
            state: self.state.name().to_string(),
            pid: self.pid(),
            restarts: self.restarts,
            last_exit: self.last_status.map(|s| {
                if libc::WIFSIGNALED(s) {
                    Exit::Signal(libc::WTERMSIG(s))
                } else {
                    Exit::Code(libc::WEXITSTATUS(s))
                }
            }),
            since: self.since,
            essential: self.spec.essential,
            ready: self.ready,
        }
    }

    /// Whether it counts toward a healthy run: ready and running, waiting
    /// to restart, or ended well. Onshutdown units do not count.
    fn healthy(&self) -> bool {
        match self.state {
            State::Running { .. } => self.ready,
            State::Backoff { .. } => true,
            State::Exited { .. } => !self.has_failed(),
            State::Pending | State::Failed { .. } => false,
        }
    }

    /// Pending or Backoff → Running.
    pub fn started(&mut self, pid: libc::pid_t, at: Instant) -> Result<(), BadTransition> {
        let ok = matches!(self.state, State::Pending | State::Backoff { .. });
        let again = matches!(self.state, State::Backoff { .. });
        self.go(ok, State::Running { pid })?;
        if again {
            self.restarts += 1;
            self.streak += 1;
        }
        self.started_at = Some(at);
        self.ready = false;
        self.next_probe = None;
        Ok(())
    }

    /// Its setup report ended at `at`: it exec'd its program (ready if it
    /// has no probe; probing from now if it has), or a step failed.
    fn set_up(&mut self, outcome: Result<(), String>, at: Instant) {
        match outcome {
            Ok(()) if self.pid().is_some() => {
                self.ready = self.spec.ready.is_none();
                self.next_probe = self.spec.ready.as_ref().map(|_| at);
            }
            Ok(()) => {}
            Err(reason) => self.setup_failure = Some(reason),
        }
    }

    /// Reads the rest of its setup report, if it has one, and handles it.
    fn finish_report(&mut self, at: Instant) {
        let Some(mut report) = self.report.take() else {
            return;
        };
        report.read();
        let outcome = container::setup_outcome(&report.buf).map_err(|e| console::chain(&e));
        if let Err(reason) = &outcome {
            console::log(&format!("{}: failed to start: {reason}", self.name()));
        }
        self.set_up(outcome, at);
    }

    /// Running → Backoff or Exited, as its restart policy decides; returns
    /// the decision.
    pub fn exited(&mut self, status: libc::c_int, at: Instant) -> Result<AfterExit, BadTransition> {
        let ok = matches!(self.state, State::Running { .. });
        if ok
            && self
                .started_at
                .is_some_and(|s| at.duration_since(s) >= HEALTHY_RUN)
        {
            self.streak = 0;
        }
        let next = if self.stopped {
            AfterExit::Done
        } else {
            after_exit(
                self.spec.restart,
                self.spec.max_restarts,
                self.streak,
                status,
            )
        };
        let to = match next {
            AfterExit::Restart(delay) => State::Backoff {
                status,
                at: at + delay,
            },
            AfterExit::Done | AfterExit::GiveUp => State::Exited { status },
        };
        self.go(ok, to)?;
        self.exited_at = Some(at);
        self.last_status = Some(status);
        self.ready = false;
        self.next_probe = None;
        Ok(next)
    }

    /// Pending or Backoff → Failed.
    pub fn failed(&mut self, reason: String) -> Result<(), BadTransition> {
        let ok = matches!(self.state, State::Pending | State::Backoff { .. });
        self.go(ok, State::Failed { reason })
    }

    /// Running → Failed: its process ended having reported a failed
    /// setup step (it never ran its program, so it is not restarted).
    fn failed_setup(&mut self, reason: String, at: Instant) -> Result<(), BadTransition> {
        let ok = matches!(self.state, State::Running { .. });
        self.go(ok, State::Failed { reason })?;
        self.exited_at = Some(at);
        self.ready = false;
        self.next_probe = None;
        Ok(())
    }

    /// Whether its process runs, will run again, or its output is still
    /// being drained.
    pub fn busy(&self) -> bool {
        matches!(self.state, State::Running { .. } | State::Backoff { .. })
            || !self.streams.is_empty()
    }

    /// Whether it ended in failure: could not start, or its last exit (its
    /// policy having given up) was not a success.
    pub fn has_failed(&self) -> bool {
        if self.stopped {
            return false;
        }
        match self.state {
            State::Failed { .. } => true,
            State::Exited { status } => status != 0,
            _ => false,
        }
    }

    pub fn essential(&self) -> bool {
        self.spec.essential
    }

    /// Marks it stopped by the init if it runs or waits to restart (then
    /// it is done); an ended unit keeps its outcome.
    fn stop(&mut self) {
        match self.state {
            State::Running { .. } => self.stopped = true,
            State::Backoff { status, .. } => {
                self.stopped = true;
                self.state = State::Exited { status };
            }
            _ => {}
        }
    }

    /// Whether it exited more than `grace` before `now`.
    fn exited_before(&self, now: Instant, grace: Duration) -> bool {
        self.exited_at
            .is_some_and(|t| now.duration_since(t) > grace)
    }

    fn line(&mut self, line: &[u8]) {
        if let Some(sink) = &mut self.sink {
            sink.line(line);
        }
    }
}

/// Describes a wait status, e.g. "exited with status 0".
pub fn describe_status(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("changed state ({status:#x})")
    }
}

pub struct Supervisor {
    units: Units,
    sigfd: Option<OwnedFd>,
    /// Power button devices.
    buttons: Vec<OwnedFd>,
    log_dir: String,
    /// Why the machine is to shut down, once asked.
    stop: Option<String>,
    /// The status file, and what was last written to it.
    status: Option<std::fs::File>,
    published: String,
    /// Services may start (as their dependencies become ready).
    services_started: bool,
    /// How long essential units must be healthy to record the run so,
    /// since when they are, and whether it is recorded.
    healthy_after: Duration,
    healthy_since: Option<Instant>,
    healthy_recorded: bool,
    /// The A/B boot being judged, if the slot booted is on trial.
    trial: Option<Trial>,
    /// The armed watchdog and when it was last fed.
    watchdog: Option<(std::fs::File, Instant)>,
    /// The verified root's device, watched for corruption, and when it
    /// was last looked at.
    verity: Option<(VerityWatch, Instant)>,
    /// The control socket, and whether it asked for a reboot.
    control: Option<crate::control::Control>,
    reboot_asked: bool,
    /// The host's network, until when containers on it wait for it, and
    /// whether starting them anyway was said.
    net: Option<Network>,
    net_wait_until: Option<Instant>,
    said_net_late: bool,
}

/// A boot of an A/B slot not yet marked successful: good once healthy
/// (then marked so in the GPT), failed when an essential container fails
/// or it is not healthy by `deadline` (then the machine restarts, and the
/// chooser's count decides what boots next).
pub struct Trial {
    /// The disk and partition number of the slot.
    pub disk: String,
    pub number: u32,
    /// `a` or `b`, for the log.
    pub letter: char,
    pub deadline: Instant,
    /// `Some(true)` good, `Some(false)` failed.
    pub verdict: Option<bool>,
}

/// The verified root as the supervisor watches it: dm-verity makes a
/// corrupt block's reads fail; the first one found is logged, and with
/// `verity_error = "restart"` the machine restarts (on an A/B disk into
/// the other slot, this one marked failed).
pub struct VerityWatch {
    /// The device-mapper name.
    pub device: &'static str,
    /// `verity_error = "restart"`.
    pub restart: bool,
    /// The slot booted: its disk, partition number and letter.
    pub slot: Option<(String, u32, char)>,
}

/// How often the verified root's status is looked at.
const VERITY_CHECK: Duration = Duration::from_secs(1);

/// How often the watchdog is fed (its timeout is [`WATCHDOG_TIMEOUT_S`]).
const WATCHDOG_FEED: Duration = Duration::from_secs(5);
/// Seconds a hung init has before the watchdog restarts the machine.
pub const WATCHDOG_TIMEOUT_S: libc::c_int = 60;

/// How often a probe runs until it passes.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// An exec probe running this long has failed; it is killed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Signals to PID 1 that ask for a shutdown (SIGINT: Ctrl-Alt-Del).
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGPWR];

/// Whether a socket listens on TCP `port` in the network namespace of
/// process `pid` (its `/proc/PID/net/tcp` and `tcp6`): no connection made.
fn listening(pid: libc::pid_t, port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|t| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{t}")).is_ok_and(|s| listens_on(&s, port))
    })
}

/// Whether a `/proc/net/tcp`-style table has a listening socket on `port`.
fn listens_on(table: &str, port: u16) -> bool {
    const LISTEN: &str = "0A";
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local_port = f.get(1).and_then(|a| a.rsplit_once(':')).map(|(_, p)| p);
        f.get(3) == Some(&LISTEN)
            && local_port.and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
    })
}

/// Creates the state directory and the status file (world-readable: a
/// container of any user may bind it).
fn open_status() -> Option<std::fs::File> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let _ = std::fs::DirBuilder::new().mode(0o755).create(STATE_DIR);
    // Empty until the run is healthy, so that a container can bind it.
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o644)
        .open(HEALTH_FILE);
    match std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o644)
        .open(STATUS_FILE)
    {
        Ok(f) => Some(f),
        Err(e) => {
            console::log(&format!("cannot write {STATUS_FILE}: {e}"));
            None
        }
    }
}

/// The number of a recipe's `stop_signal` name (validated at build).
pub fn signal_number(name: &str) -> libc::c_int {
    match name {
        "SIGINT" => libc::SIGINT,
        "SIGQUIT" => libc::SIGQUIT,
        "SIGHUP" => libc::SIGHUP,
        "SIGUSR1" => libc::SIGUSR1,
        "SIGUSR2" => libc::SIGUSR2,
        "SIGKILL" => libc::SIGKILL,
        "SIGPWR" => libc::SIGPWR,
        "SIGWINCH" => libc::SIGWINCH,
        _ => libc::SIGTERM,
    }
}

impl Supervisor {
    /// Blocks SIGCHLD and the shutdown signals and takes them through a
    /// signalfd (without one, polling with a timeout still reaps); opens
    /// the power button.
    pub fn new(log_dir: &str, healthy_after: Duration) -> Supervisor {
        // SAFETY: an initialised signal set passed to sigprocmask/signalfd.
        let sigfd = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            for sig in STOP_SIGNALS {
                libc::sigaddset(&mut set, sig);
            }
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            sys::owned(libc::signalfd(
                -1,
                &set,
                libc::SFD_CLOEXEC | libc::SFD_NONBLOCK,
            ))
        };
        let buttons = crate::button::open_power_buttons();
        if buttons.is_empty() {
            console::log("no power button found: shutdown by signal only");
        }
        Supervisor {
            units: Units::default(),
            sigfd: sigfd.ok(),
            buttons,
            log_dir: log_dir.to_string(),
            stop: None,
            status: open_status(),
            published: String::new(),
            services_started: false,
            healthy_after,
            healthy_since: None,
            trial: None,
            watchdog: None,
            control: None,
            reboot_asked: false,
            verity: None,
            healthy_recorded: false,
            net: None,
            net_wait_until: None,
            said_net_late: false,
        }
    }

    /// Runs the host's network from the loop; containers on it wait for
    /// it to be up, or `wait` at most.
    pub fn set_network(&mut self, net: Network, wait: Duration) {
        self.net_wait_until = Some(Instant::now() + wait);
        self.net = Some(net);
    }

    /// Whether containers on the host network may start: it is up, or
    /// they have waited long enough.
    fn network_ready(&mut self, now: Instant) -> bool {
        if self.net.as_ref().is_none_or(Network::up) {
            return true;
        }
        if self.net_wait_until.is_some_and(|t| now < t) {
            return false;
        }
        if !self.said_net_late {
            self.said_net_late = true;
            console::log("network not up in time: starting its containers anyway");
        }
        true
    }

    /// Runs due probes; marks units ready.
    fn probe(&mut self, now: Instant) {
        for unit in &mut self.units.0 {
            let (Some(pid), Some(probe)) = (unit.pid(), unit.spec.ready.clone()) else {
                continue;
            };
            if unit.ready {
                continue;
            }
            if let Some((p, since)) = unit.probing {
                if now.duration_since(since) > PROBE_TIMEOUT {
                    // SAFETY: signalling our own unreaped child.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                continue;
            }
            if unit.next_probe.is_none_or(|t| t > now) {
                continue;
            }
            unit.next_probe = Some(now + PROBE_INTERVAL);
            let passed = match &probe {
                Probe::Tcp(port) => listening(pid, *port),
                Probe::File(path) => {
                    std::fs::symlink_metadata(format!("/proc/{pid}/root{path}")).is_ok()
                }
                Probe::Exec(argv) => {
                    match container::spawn_probe(&unit.spec, pid, argv) {
                        Ok(p) => unit.probing = Some((p, now)),
                        Err(e) => {
                            console::log(&format!("{}: probe: {}", unit.name(), console::chain(&e)))
                        }
                    }
                    false
                }
            };
            if passed {
                unit.ready = true;
                console::log(&format!("{}: ready", unit.name()));
            }
        }
    }

    /// Starts pending services whose dependencies are ready; fails those
    /// whose dependency ended without being ready.
    fn start_ready_services(&mut self) {
        if !self.services_started || self.stop.is_some() {
            return;
        }
        for name in self.units.names(UnitKind::Service) {
            let Some(unit) = self.units.get(&name) else {
                continue;
            };
            if unit.state != State::Pending {
                continue;
            }
            let mut waiting = Vec::new();
            let mut dead = None;
            for d in &unit.spec.depends_on {
                match self.units.get(d) {
                    Some(dep) if dep.ready => {}
                    Some(dep)
                        if matches!(dep.state, State::Exited { .. } | State::Failed { .. }) =>
                    {
                        dead = Some(d.clone())
                    }
                    _ => waiting.push(d.clone()),
                }
            }
            if let Some(d) = dead {
                console::log(&format!(
                    "{name}: not started: {d} ended without becoming ready"
                ));
                if let Some(u) = self.units.get_mut(&name) {
                    let _ = u.failed(format!("{d} ended without becoming ready"));
                }
            } else if waiting.is_empty() {
                let networked = unit.spec.net != Net::None;
                if networked && !self.network_ready(Instant::now()) {
                    if let Some(u) = self.units.get_mut(&name) {
                        if !u.said_waiting {
                            u.said_waiting = true;
                            console::log(&format!("{name}: waiting for the network"));
                        }
                    }
                    continue;
                }
                self.start(&name);
            } else if let Some(u) = self.units.get_mut(&name) {
                if !u.said_waiting {
                    u.said_waiting = true;
                    console::log(&format!("{name}: waiting for {}", waiting.join(", ")));
                }
            }
        }
    }

    /// Records the run healthy once every essential unit has been healthy
    /// for `healthy_after`.
    fn check_health(&mut self, now: Instant) {
        if self.healthy_recorded || !self.services_started || self.stop.is_some() {
            return;
        }
        let all = self
            .units
            .0
            .iter()
            .filter(|u| u.essential() && u.kind != UnitKind::Onshutdown)
            .all(Unit::healthy);
        if !all {
            self.healthy_since = None;
            return;
        }
        let since = *self.healthy_since.get_or_insert(now);
        if now.duration_since(since) >= self.healthy_after {
            self.healthy_recorded = true;
            let line = format!("healthy {}\n", sys::boot_seconds());
            // In place, like the status file: a bind holds it.
            let written = std::fs::OpenOptions::new()
                .write(true)
                .open(HEALTH_FILE)
                .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, line.as_bytes(), 0));
            match written {
                Ok(()) => console::log(&format!(
                    "healthy: essential containers ready for {}ms",
                    self.healthy_after.as_millis()
                )),
                Err(e) => console::log(&format!("cannot write {HEALTH_FILE}: {e}")),
            }
        }
    }

    /// Judges the slot on trial, once: good when the run is healthy,
    /// failed when an essential container fails or the deadline passes.
    fn judge(&mut self, now: Instant) {
        let Some(t) = self.trial.as_ref().filter(|t| t.verdict.is_none()) else {
            return;
        };
        let failed = self.failed_essential();
        let why = if self.healthy_recorded {
            None
        } else if !failed.is_empty() {
            Some(format!(
                "essential containers failed: {}",
                failed.join(", ")
            ))
        } else if now >= t.deadline {
            Some("not healthy in time (update.healthy_within)".to_string())
        } else {
            return;
        };
        let (disk, number, letter) = (t.disk.clone(), t.number, t.letter);
        let good = why.is_none();
        if let Some(t) = self.trial.as_mut() {
            t.verdict = Some(good);
        }
        match why {
            None => match kiln_boot::disk::mark_good(&disk, number) {
                Ok(()) => console::log(&format!("slot {letter}: healthy, marked good")),
                Err(e) => console::log(&format!(
                    "slot {letter}: healthy, but marking it good failed: {e}"
                )),
            },
            Some(why) => {
                console::log(&format!("slot {letter} failed its trial: {why}"));
                self.request_stop(&format!("slot {letter} failed its trial"));
            }
        }
    }

    /// Watches the verified root as the run goes.
    pub fn watch_verity(&mut self, watch: VerityWatch) {
        self.verity = Some((watch, Instant::now()));
    }

    /// Looks at the verified root now: a run that ended still restarts
    /// if a corrupt block was read in it.
    pub fn check_verity_now(&mut self) {
        self.check_verity_at(Instant::now(), true);
    }

    fn check_verity(&mut self, now: Instant) {
        self.check_verity_at(now, false);
    }

    fn check_verity_at(&mut self, now: Instant, force: bool) {
        let Some((w, at)) = &mut self.verity else {
            return;
        };
        if !force && now.duration_since(*at) < VERITY_CHECK {
            return;
        }
        *at = now;
        if !crate::dm::corrupted(w.device).unwrap_or(false) {
            return;
        }
        let Some((w, _)) = self.verity.take() else {
            return;
        };
        console::log("root: dm-verity found a corrupt block; reading it fails with EIO");
        if !w.restart {
            return;
        }
        if let Some((disk, number, letter)) = &w.slot {
            let other = match kiln_boot::disk::mark_failed(disk, *number) {
                Ok(other) => {
                    console::log(&format!("slot {letter} marked failed: its root is corrupt"));
                    other
                }
                Err(e) => {
                    console::log(&format!("slot {letter}: cannot mark it failed: {e}"));
                    false
                }
            };
            // Restarting into the same corrupt root would loop.
            if !other {
                console::log(
                    "no other slot can boot: staying up (reads of the corrupt block fail)",
                );
                return;
            }
        }
        self.reboot_asked = true;
        self.request_stop("root corrupt (verity_error = restart)");
    }

    /// Answers `control`'s requests as the run goes.
    pub fn set_control(&mut self, control: crate::control::Control) {
        self.control = Some(control);
    }

    /// Whether the control socket asked for a reboot.
    pub fn reboot_asked(&self) -> bool {
        self.reboot_asked
    }

    /// Feeds `dog` (an opened, armed `/dev/watchdog`) as the run goes.
    pub fn set_watchdog(&mut self, dog: std::fs::File) {
        self.watchdog = Some((dog, Instant::now()));
    }

    /// Disarms the watchdog (its magic close): the machine is going down
    /// on purpose.
    pub fn disarm_watchdog(&mut self) {
        if let Some((mut dog, _)) = self.watchdog.take() {
            let _ = std::io::Write::write_all(&mut dog, b"V");
        }
    }

    fn feed_watchdog(&mut self, now: Instant) {
        if let Some((dog, fed)) = &mut self.watchdog {
            if now.duration_since(*fed) >= WATCHDOG_FEED {
                let _ = std::io::Write::write_all(dog, b"k");
                *fed = now;
            }
        }
    }

    /// Judges `trial` as the run goes.
    pub fn set_trial(&mut self, trial: Trial) {
        self.trial = Some(trial);
    }

    /// Whether the slot on trial was judged failed: the machine restarts.
    pub fn trial_failed(&self) -> bool {
        self.trial
            .as_ref()
            .is_some_and(|t| t.verdict == Some(false))
    }

    fn trial_pending(&self) -> bool {
        self.trial.as_ref().is_some_and(|t| t.verdict.is_none())
    }

    /// When the next probe or the health record is due.
    fn next_wake(&self) -> Option<Instant> {
        let probes = self
            .units
            .0
            .iter()
            .filter(|u| u.pid().is_some() && !u.ready && u.probing.is_none())
            .filter_map(|u| u.next_probe);
        let health = self
            .healthy_since
            .filter(|_| !self.healthy_recorded)
            .map(|t| t + self.healthy_after);
        let trial = self
            .trial
            .as_ref()
            .filter(|t| t.verdict.is_none())
            .map(|t| t.deadline);
        probes.chain(health).chain(trial).min()
    }

    /// Rewrites the status file if anything in it changed.
    pub fn publish(&mut self) {
        let status = Status {
            uptime: 0.0,
            stopping: self.stop.is_some(),
            containers: self.units.0.iter().map(Unit::status).collect(),
        };
        let Ok(text) = serde_json::to_string(&status) else {
            return;
        };
        if text == self.published {
            return;
        }
        let Some(file) = &self.status else { return };
        let stamped = Status {
            uptime: sys::boot_seconds(),
            ..status
        };
        let Ok(mut out) = serde_json::to_string(&stamped) else {
            return;
        };
        // In place: a container's bind holds this very file. Padding keeps
        // no stale tail from a longer previous text: one line always.
        let old = file.metadata().map(|m| m.len()).unwrap_or(0);
        let pad = usize::try_from(old)
            .unwrap_or(0)
            .saturating_sub(out.len() + 1);
        out.extend(std::iter::repeat_n(' ', pad));
        out.push('\n');
        use std::os::unix::fs::FileExt;
        if file.write_all_at(out.as_bytes(), 0).is_ok() {
            self.published = text;
        }
    }

    /// Why a shutdown was asked for, if it was.
    pub fn stop_requested(&self) -> Option<&str> {
        self.stop.as_deref()
    }

    fn request_stop(&mut self, why: &str) {
        if self.stop.is_none() {
            console::log(&format!("{why}: shutting down"));
            self.stop = Some(why.to_string());
        }
    }

    /// Registers a container as a pending unit.
    pub fn add(&mut self, spec: Container, kind: UnitKind) -> Result<(), DuplicateUnit> {
        self.units.add(Unit::new(spec, kind))
    }

    /// Starts each unit of `kind` in turn, waiting for it to finish (or
    /// for a shutdown request).
    pub fn run_in_order(&mut self, kind: UnitKind) {
        for name in self.units.names(kind) {
            if kind != UnitKind::Onshutdown && self.stop.is_some() {
                return;
            }
            let networked = self
                .units
                .get(&name)
                .is_some_and(|u| u.spec.net != Net::None);
            while networked && self.stop.is_none() && !self.network_ready(Instant::now()) {
                self.pump(None);
            }
            self.start(&name);
            self.wait(&name);
        }
    }

    /// Starts the services, each once its dependencies are ready.
    pub fn start_services(&mut self) {
        self.services_started = true;
        self.start_ready_services();
        self.publish();
    }

    /// Starts a pending unit; failures are logged and leave it Failed.
    pub fn start(&mut self, name: &str) {
        let log_dir = self.log_dir.clone();
        let Some(unit) = self.units.get_mut(name) else {
            return;
        };
        if !matches!(unit.state(), State::Pending | State::Backoff { .. }) {
            let now = unit.state().name();
            console::log(&format!("{name}: not started again, it is {now}"));
            return;
        }
        console::log(&format!("{name}: starting {:?}", unit.spec.args));
        // What a restarted unit's last run left unterminated.
        for mut st in std::mem::take(&mut unit.streams) {
            if let Some(line) = st.split.finish() {
                unit.line(&line);
            }
        }
        let res = match container::spawn(&unit.spec) {
            Ok(s) => {
                console::log(&format!("{name}: started, pid {}", s.pid));
                unit.report = Some(Report {
                    fd: s.report,
                    buf: Vec::new(),
                });
                unit.setup_failure = None;
                unit.sink = Some(Sink::open(name, &log_dir));
                unit.streams = [s.stdout, s.stderr]
                    .into_iter()
                    .map(|fd| Stream {
                        fd,
                        split: LineSplitter::default(),
                    })
                    .collect();
                unit.started(s.pid, Instant::now())
            }
            Err(e) => {
                let reason = console::chain(&e);
                console::log(&format!("{name}: failed to start: {reason}"));
                let res = unit.failed(reason);
                // The half-started process, if any, is reaped as an orphan.
                self.reap();
                let _ = std::fs::remove_dir(format!("{}/{name}", container::CGROUP_DIR));
                res
            }
        };
        if let Err(e) = res {
            console::log(&e.to_string());
        }
        self.publish();
    }

    /// Runs until unit `name` exited and its output is drained, or (but
    /// for onshutdown units) a shutdown is asked for.
    pub fn wait(&mut self, name: &str) {
        while self.units.get(name).is_some_and(Unit::busy) {
            let shutdown = self
                .units
                .get(name)
                .is_some_and(|u| u.kind == UnitKind::Onshutdown);
            if self.stop.is_some() && !shutdown {
                return;
            }
            self.pump(None);
        }
    }

    /// Runs until every started unit has exec'd its program or failed to,
    /// or a shutdown is asked for.
    pub fn settle(&mut self) {
        while self.stop.is_none() && self.units.0.iter().any(|u| u.report.is_some()) {
            self.pump(None);
        }
    }

    /// Runs until every unit that started or will start has exited and
    /// its output is drained, or a shutdown is asked for.
    pub fn wait_all(&mut self) {
        // A pending service still starts (once its dependencies or the
        // network are ready).
        let waits =
            |u: &Unit| u.busy() || (u.kind == UnitKind::Service && u.state == State::Pending);
        // A slot on trial is judged before the host may power off.
        while self.stop.is_none() && (self.units.0.iter().any(waits) || self.trial_pending()) {
            self.pump(None);
        }
    }

    /// Reaps orphans until a shutdown is asked for.
    pub fn wait_for_stop(&mut self) {
        while self.stop.is_none() {
            self.pump(None);
        }
    }

    /// Stops what runs, services first in reverse order, then onboot
    /// units: each gets its stop signal and its `stop_timeout`, then
    /// SIGKILL. No unit restarts afterwards.
    pub fn stop_all(&mut self) {
        let mut names = self.units.start_order();
        names.reverse();
        names.extend(self.units.names(UnitKind::Onboot));
        for u in &mut self.units.0 {
            if u.kind != UnitKind::Onshutdown {
                u.stop();
            }
        }
        for name in names {
            self.stop_unit(&name);
        }
    }

    fn stop_unit(&mut self, name: &str) {
        let Some(unit) = self.units.get(name) else {
            return;
        };
        let Some(pid) = unit.pid() else { return };
        let sig = signal_number(&unit.spec.stop_signal);
        let timeout = Duration::from_millis(unit.spec.stop_timeout_ms);
        console::log(&format!("{name}: stopping with {}", unit.spec.stop_signal));
        // SAFETY: signalling a child this init started and has not reaped.
        unsafe { libc::kill(pid, sig) };
        let deadline = Instant::now() + timeout;
        while self.units.get(name).is_some_and(|u| u.pid().is_some()) && Instant::now() < deadline {
            self.pump(Some(deadline));
        }
        if self.units.get(name).is_some_and(|u| u.pid().is_some()) {
            console::log(&format!(
                "{name}: still running after {}ms; killing",
                timeout.as_millis()
            ));
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        while self.units.get(name).is_some_and(Unit::busy) {
            self.pump(None);
        }
    }

    /// One round: wait (until `limit` at most) for output, a signal, the
    /// power button or a child exit, then handle them.
    fn pump(&mut self, limit: Option<Instant>) {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        // Whose each polled pipe is, valid for this round only.
        let mut owners: Vec<Pipe> = Vec::new();
        if let Some(fd) = &self.sigfd {
            fds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        for b in &self.buttons {
            fds.push(libc::pollfd {
                fd: b.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let control_fd = self.control.as_ref().map(|c| c.listener.as_raw_fd());
        let net_fds: Vec<RawFd> = self
            .net
            .as_ref()
            .map_or(Vec::new(), Network::fds)
            .into_iter()
            .chain(control_fd)
            .collect();
        for &fd in &net_fds {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        for (u, unit) in self.units.0.iter().enumerate() {
            for (s, st) in unit.streams.iter().enumerate() {
                fds.push(libc::pollfd {
                    fd: st.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                owners.push(Pipe::Output(u, s));
            }
            if let Some(r) = &unit.report {
                fds.push(libc::pollfd {
                    fd: r.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                owners.push(Pipe::Report(u));
            }
        }
        let mut timeout: libc::c_int = if self.sigfd.is_some() { 1000 } else { 100 };
        let now = Instant::now();
        let wakes = self.units.0.iter().filter_map(|u| match u.state {
            State::Backoff { at, .. } => Some(at),
            _ => None,
        });
        let next = self.next_wake();
        let net_next = self.net.as_ref().and_then(|n| {
            let waiting = !n.up() && !self.said_net_late;
            n.deadline()
                .into_iter()
                .chain(self.net_wait_until.filter(|_| waiting))
                .min()
        });
        for at in wakes.chain(limit).chain(next).chain(net_next) {
            let ms = at.saturating_duration_since(now).as_millis();
            timeout = timeout.min(libc::c_int::try_from(ms).unwrap_or(timeout));
        }
        // SAFETY: fds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            // EINTR or worse: reap anyway and go round again.
            self.reap();
            return;
        }
        let skip = usize::from(self.sigfd.is_some()) + self.buttons.len() + net_fds.len();
        let first_net = skip - net_fds.len();
        let net_ready: Vec<libc::c_int> = fds[first_net..skip]
            .iter()
            .filter(|p| p.revents != 0)
            .map(|p| p.fd)
            .collect();
        if let Some(net) = &mut self.net {
            net.handle(&net_ready, Instant::now());
        }
        if let (Some(c), Some(fd)) = (&self.control, control_fd) {
            let units = &self.units;
            let running = |name: &str| units.get(name).and_then(Unit::pid);
            if net_ready.contains(&fd) && c.serve(&running) == crate::control::Then::Reboot {
                self.reboot_asked = true;
                self.request_stop("control: reboot");
            }
        }
        let mut stop = None;
        if let Some(fd) = &self.sigfd {
            if fds[0].revents != 0 {
                // signalfd_siginfo records: ssi_signo is their first field.
                let mut buf = [0u8; 128 * 8];
                let n = sys::read(fd.as_fd(), &mut buf).unwrap_or(0);
                for info in buf[..n].chunks_exact(128) {
                    let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                    let signo = libc::c_int::try_from(signo).unwrap_or(0);
                    if STOP_SIGNALS.contains(&signo) {
                        stop = Some(format!("signal {signo}"));
                    }
                }
            }
        }
        let first_button = usize::from(self.sigfd.is_some());
        for (i, b) in self.buttons.iter().enumerate() {
            if fds[first_button + i].revents != 0 {
                let mut buf = [0u8; 24 * 16];
                let n = sys::read(b.as_fd(), &mut buf).unwrap_or(0);
                if crate::button::pressed(&buf[..n]) {
                    stop = Some("power button".to_string());
                }
            }
        }
        if let Some(why) = stop {
            self.request_stop(&why);
        }
        // Output first, so lines written just before exit precede its report.
        let mut closed = Vec::new();
        for (k, pfd) in fds.iter().enumerate().skip(skip) {
            if pfd.revents == 0 {
                continue;
            }
            match owners[k - skip] {
                Pipe::Output(u, s) => {
                    if !read_stream(&mut self.units.0[u], s) {
                        closed.push((u, s));
                    }
                }
                Pipe::Report(u) => {
                    let unit = &mut self.units.0[u];
                    if unit.report.as_mut().is_some_and(Report::read) {
                        unit.finish_report(Instant::now());
                    }
                }
            }
        }
        self.reap();
        let now = Instant::now();
        for (u, unit) in self.units.0.iter().enumerate() {
            if unit.exited_before(now, DRAIN_GRACE) {
                closed.extend((0..unit.streams.len()).map(|s| (u, s)));
            }
        }
        closed.sort();
        closed.dedup();
        for &(u, s) in closed.iter().rev() {
            let unit = &mut self.units.0[u];
            // Dropping the stream closes its pipe.
            let mut st = unit.streams.remove(s);
            if let Some(line) = st.split.finish() {
                unit.line(&line);
            }
        }
        let due: Vec<String> = self
            .units
            .0
            .iter()
            .filter(|u| matches!(u.state, State::Backoff { at, .. } if at <= now))
            .filter(|_| self.stop.is_none())
            .map(|u| u.name().to_string())
            .collect();
        for name in due {
            self.start(&name);
        }
        let now = Instant::now();
        self.probe(now);
        self.start_ready_services();
        self.check_health(now);
        self.judge(now);
        self.check_verity(now);
        self.feed_watchdog(now);
        self.publish();
    }

    /// Essential units that failed, in the order added.
    pub fn failed_essential(&self) -> Vec<String> {
        self.units
            .0
            .iter()
            .filter(|u| u.essential() && u.has_failed())
            .map(|u| u.name().to_string())
            .collect()
    }

    /// Collects every exited child, logging the units'.
    pub fn reap(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            if self.net.as_mut().is_some_and(|n| n.reaped(pid)) {
                continue;
            }
            if let Some(unit) = self
                .units
                .0
                .iter_mut()
                .find(|u| u.probing.is_some_and(|(p, _)| p == pid))
            {
                unit.probing = None;
                if status == 0 && unit.pid().is_some() && !unit.ready {
                    unit.ready = true;
                    console::log(&format!("{}: ready", unit.name()));
                }
                continue;
            }
            let Some(unit) = self.units.by_pid_mut(pid) else {
                continue;
            };
            let name = unit.name().to_string();
            let now = Instant::now();
            // Written before it ended, so all there: its last lines come
            // before the line saying it exited.
            drain_streams(unit);
            unit.finish_report(now);
            if let Some(reason) = unit.setup_failure.take() {
                if let Err(e) = unit.failed_setup(reason, now) {
                    console::log(&e.to_string());
                }
                let _ = std::fs::remove_dir(format!("{}/{name}", container::CGROUP_DIR));
                continue;
            }
            let how = describe_status(status);
            match unit.exited(status, now) {
                Ok(AfterExit::Done) => console::log(&format!("{name}: {how}")),
                Ok(AfterExit::Restart(delay)) => {
                    let looping = if unit.streak + 1 >= CRASH_LOOP {
                        format!(", crash loop ({} quick exits in a row)", unit.streak + 1)
                    } else {
                        String::new()
                    };
                    console::log(&format!(
                        "{name}: {how}; restart {} in {}ms{looping}",
                        unit.restarts + 1,
                        delay.as_millis()
                    ))
                }
                Ok(AfterExit::GiveUp) => console::log(&format!(
                    "{name}: {how}; not restarted: {} restarts in a row (max_restarts)",
                    unit.streak
                )),
                Err(e) => console::log(&e.to_string()),
            }
            // Empty once the PID namespace is gone; a leftover is harmless.
            let _ = std::fs::remove_dir(format!("{}/{}", container::CGROUP_DIR, unit.name()));
        }
    }
}

/// The units, in the order added, found by name or PID.
#[derive(Default)]
pub struct Units(Vec<Unit>);

impl Units {
    /// Adds `unit` unless one with its name exists.
    pub fn add(&mut self, unit: Unit) -> Result<(), DuplicateUnit> {
        if self.get(unit.name()).is_some() {
            return Err(DuplicateUnit(unit.name().to_string()));
        }
        self.0.push(unit);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Unit> {
        self.0.iter().find(|u| u.name() == name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Unit> {
        self.0.iter_mut().find(|u| u.name() == name)
    }

    /// The running unit whose process is `pid`.
    pub fn by_pid_mut(&mut self, pid: libc::pid_t) -> Option<&mut Unit> {
        self.0.iter_mut().find(|u| u.pid() == Some(pid))
    }

    /// Services with each one's dependencies before it, otherwise in the
    /// order added (cycles were refused at build).
    pub fn start_order(&self) -> Vec<String> {
        fn visit(units: &Units, name: &str, out: &mut Vec<String>, depth: usize) {
            if out.iter().any(|n| n == name) || depth > units.0.len() {
                return;
            }
            if let Some(u) = units.get(name) {
                for d in &u.spec.depends_on {
                    visit(units, d, out, depth + 1);
                }
                out.push(name.to_string());
            }
        }
        let mut out = Vec::new();
        for name in self.names(UnitKind::Service) {
            visit(self, &name, &mut out, 0);
        }
        out
    }

    /// Names of the units of `kind`, in the order they were added.
    pub fn names(&self, kind: UnitKind) -> Vec<String> {
        self.0
            .iter()
            .filter(|u| u.kind() == kind)
            .map(|u| u.name().to_string())
            .collect()
    }
}

/// Reads what is available from stream `s`; false at end of stream.
/// Reads what is already in `unit`'s output pipes, without waiting (other
/// processes of the container may still hold them open).
fn drain_streams(unit: &mut Unit) {
    for s in 0..unit.streams.len() {
        loop {
            let mut pfd = libc::pollfd {
                fd: unit.streams[s].fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, no waiting.
            let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
            if ready <= 0 || pfd.revents & libc::POLLIN == 0 || !read_stream(unit, s) {
                break;
            }
        }
    }
}

fn read_stream(unit: &mut Unit, s: usize) -> bool {
    let mut buf = [0u8; 4096];
    match sys::read(unit.streams[s].fd.as_fd(), &mut buf) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            for line in unit.streams[s].split.push(&buf[..n]) {
                unit.line(&line);
            }
            true
        }
    }
}

/// Ends everything and powers off (or reboots if asked, or if powering
/// off fails). Never returns.
pub fn poweroff(reboot: bool) -> ! {
    console::log(if reboot { "rebooting" } else { "powering off" });
    // SAFETY: signalling every other process, then syncing; no pointers.
    unsafe {
        libc::kill(-1, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        // SAFETY: reaping with a null status.
        let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if pid < 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
        libc::sync();
    }
    unmount_all();
    // SAFETY: flushing buffers then asking the kernel to power off.
    unsafe {
        libc::sync();
        if !reboot {
            libc::reboot(libc::RB_POWER_OFF);
        }
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // Exiting PID 1 would panic the kernel: wait instead.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Unmounts everything but `/`, deepest first, ignoring failures.
fn unmount_all() {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let targets: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(|t| t.replace("\\040", " "))
        .filter(|t| t != "/")
        .collect();
    for t in targets.iter().rev() {
        if sys::umount(t, 0).is_err() {
            let _ = sys::umount(t, libc::MNT_DETACH);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> Container {
        Container {
            name: name.into(),
            args: vec!["true".into()],
            binds: vec![],
            ..crate::container::tests::container()
        }
    }

    #[test]
    fn unit_life() {
        let mut u = Unit::new(spec("web"), UnitKind::Service);
        assert_eq!((u.name(), u.kind()), ("web", UnitKind::Service));
        assert_eq!(u.state(), &State::Pending);
        assert!(!u.busy());
        assert_eq!(u.pid(), None);
        let t = Instant::now();
        u.started(42, t).expect("start");
        assert_eq!(u.pid(), Some(42));
        assert!(u.busy());
        assert_eq!(u.exited(256, t), Ok(AfterExit::Done));
        assert_eq!(u.state(), &State::Exited { status: 256 });
        assert!(u.has_failed());
        assert_eq!(u.pid(), None);
        assert!(!u.busy());
        assert!(!u.exited_before(t, DRAIN_GRACE));
        assert!(u.exited_before(t + DRAIN_GRACE * 2, DRAIN_GRACE));
    }

    /// A unit is ready only once its setup ended in the exec (with no
    /// probe); a failed setup fails it without a restart.
    #[test]
    fn ready_once_set_up() {
        let t = Instant::now();
        let mut u = Unit::new(spec("web"), UnitKind::Service);
        u.started(5, t).expect("start");
        assert!(!u.ready && !u.healthy());
        u.set_up(Ok(()), t);
        assert!(u.ready && u.healthy());
        let mut probed = Unit::new(
            Container {
                ready: Some(Probe::Tcp(80)),
                ..spec("db")
            },
            UnitKind::Service,
        );
        probed.started(6, t).expect("start");
        probed.set_up(Ok(()), t);
        assert_eq!((probed.ready, probed.next_probe), (false, Some(t)));
        let mut bad = Unit::new(spec("bad"), UnitKind::Onboot);
        bad.started(7, t).expect("start");
        bad.set_up(Err("setup: mount /proc".into()), t);
        let reason = bad.setup_failure.take().expect("kept until reaped");
        bad.failed_setup(reason, t).expect("fail");
        assert_eq!(
            bad.state(),
            &State::Failed {
                reason: "setup: mount /proc".into()
            }
        );
        assert!(bad.has_failed() && !bad.busy());
        assert!(Unit::new(spec("x"), UnitKind::Onboot)
            .failed_setup("r".into(), t)
            .is_err());
    }

    #[test]
    fn bad_transitions_are_refused() {
        let mut u = Unit::new(spec("job"), UnitKind::Onboot);
        let t = Instant::now();
        assert_eq!(
            u.exited(0, t),
            Err(BadTransition {
                unit: "job".into(),
                from: "pending",
                to: "exited"
            })
        );
        u.started(7, t).expect("start");
        assert!(u.started(8, t).is_err());
        assert!(u.failed("late".into()).is_err());
        assert_eq!(u.pid(), Some(7));
        u.exited(0, t).expect("exit");
        assert!(u.exited(0, t).is_err());
        assert!(u.exited_at.is_some());

        let mut f = Unit::new(spec("bad"), UnitKind::Onboot);
        f.failed("no such file".into()).expect("fail");
        assert_eq!(
            f.state(),
            &State::Failed {
                reason: "no such file".into()
            }
        );
        assert!(!f.busy());
        assert!(f.started(1, t).is_err());
        assert!(f.has_failed());
    }

    #[test]
    fn units_by_name_and_pid() {
        let mut units = Units::default();
        for (name, kind) in [
            ("setup", UnitKind::Onboot),
            ("web", UnitKind::Service),
            ("migrate", UnitKind::Onboot),
            ("db", UnitKind::Service),
        ] {
            units.add(Unit::new(spec(name), kind)).expect(name);
        }
        assert_eq!(
            units.add(Unit::new(spec("web"), UnitKind::Onboot)),
            Err(DuplicateUnit("web".into()))
        );
        assert_eq!(units.names(UnitKind::Onboot), ["setup", "migrate"]);
        assert_eq!(units.names(UnitKind::Service), ["web", "db"]);
        assert_eq!(units.get("db").map(Unit::kind), Some(UnitKind::Service));
        assert!(units.get("nope").is_none());
        units
            .get_mut("web")
            .expect("web")
            .started(10, Instant::now())
            .expect("start");
        units
            .get_mut("db")
            .expect("db")
            .started(11, Instant::now())
            .expect("start");
        assert_eq!(
            units
                .by_pid_mut(11)
                .map(|u| u.name().to_string())
                .as_deref(),
            Some("db")
        );
        assert!(units.by_pid_mut(12).is_none());
        units
            .by_pid_mut(10)
            .expect("web")
            .exited(0, Instant::now())
            .expect("exit");
        // An exited unit's PID may be reused by an unrelated orphan.
        assert!(units.by_pid_mut(10).is_none());
    }

    #[test]
    fn restart_policies_and_backoff() {
        use kiln_init::config::Restart;
        use AfterExit::{Done, GiveUp, Restart as Again};
        let ms = Duration::from_millis;
        // on-failure: success is final; failures back off, doubling, until
        // max_restarts in a row.
        assert_eq!(after_exit(Restart::OnFailure, 3, 0, 0), Done);
        assert_eq!(after_exit(Restart::OnFailure, 3, 0, 1 << 8), Again(ms(100)));
        assert_eq!(after_exit(Restart::OnFailure, 3, 2, 9), Again(ms(400)));
        assert_eq!(after_exit(Restart::OnFailure, 3, 3, 1 << 8), GiveUp);
        assert_eq!(after_exit(Restart::OnFailure, 0, 0, 1 << 8), GiveUp);
        // always: whatever the status, without limit, the delay capped.
        assert_eq!(after_exit(Restart::Always, 0, 0, 0), Again(ms(100)));
        assert_eq!(after_exit(Restart::Always, 0, 40, 0), Again(BACKOFF_CAP));
        // never.
        assert_eq!(after_exit(Restart::Never, 5, 0, 1 << 8), Done);
    }

    #[test]
    fn a_unit_restarts_then_gives_up() {
        let mut spec = spec("flaky");
        spec.restart = Restart::OnFailure;
        spec.max_restarts = 1;
        let mut u = Unit::new(spec, UnitKind::Service);
        let t = Instant::now();
        u.started(5, t).expect("start");
        assert_eq!(u.exited(1 << 8, t), Ok(AfterExit::Restart(BACKOFF_START)));
        assert!(u.busy() && !u.has_failed());
        assert!(matches!(u.state(), State::Backoff { at, .. } if *at == t + BACKOFF_START));
        u.started(6, t).expect("restart");
        assert_eq!((u.restarts, u.streak), (1, 1));
        assert_eq!(u.exited(1 << 8, t), Ok(AfterExit::GiveUp));
        assert!(!u.busy() && u.has_failed());
        // A long run ends the streak: the next failure is restarted again.
        let mut spec2 = super::tests::spec("slow");
        spec2.restart = Restart::OnFailure;
        spec2.max_restarts = 1;
        let mut v = Unit::new(spec2, UnitKind::Service);
        v.started(7, t).expect("start");
        v.exited(1 << 8, t).expect("exit");
        v.started(8, t).expect("restart");
        let later = t + HEALTHY_RUN;
        assert_eq!(
            v.exited(1 << 8, later),
            Ok(AfterExit::Restart(BACKOFF_START))
        );
    }

    #[test]
    fn stopping_is_no_failure_but_keeps_past_failures() {
        let t = Instant::now();
        let mut ran = Unit::new(spec("ran"), UnitKind::Service);
        ran.started(1, t).unwrap();
        ran.exited(1 << 8, t).unwrap();
        ran.stop();
        assert!(ran.has_failed());
        let mut runs = Unit::new(spec("runs"), UnitKind::Service);
        runs.started(2, t).unwrap();
        runs.stop();
        assert_eq!(runs.exited(15, t), Ok(AfterExit::Done));
        assert!(!runs.has_failed());
    }

    #[test]
    fn listening_sockets() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n\
   0: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n\
   1: 0100007F:0050 0100007F:9C40 01 00000000:00000000 00:00000000 00000000\n";
        assert!(listens_on(table, 5432));
        // Port 80 only has an established connection.
        assert!(!listens_on(table, 80));
        assert!(!listens_on("", 5432));
    }

    #[test]
    fn statuses() {
        assert_eq!(describe_status(0), "exited with status 0");
        assert_eq!(describe_status(3 << 8), "exited with status 3");
        assert_eq!(describe_status(9), "killed by signal 9");
    }
}
