//! Running containers: spawn, forward their output, reap every child (the
//! init inherits all orphans), and shut the machine down.

use crate::console::{self, LineSplitter, Sink};
use crate::container;
use crate::sys;
use kiln_init::config::Container;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long output pipes may stay open after their container exited (a
/// child that escaped the PID namespace's teardown cannot hold us up).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

struct Stream {
    fd: OwnedFd,
    split: LineSplitter,
}

struct Job {
    sink: Sink,
    pid: Option<libc::pid_t>,
    exited_at: Option<Instant>,
    streams: Vec<Stream>,
}

impl Job {
    fn done(&self) -> bool {
        self.pid.is_none() && self.streams.is_empty()
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
    jobs: Vec<Job>,
    sigfd: Option<OwnedFd>,
    log_dir: String,
}

impl Supervisor {
    /// Blocks SIGCHLD and takes it through a signalfd; without one, polling
    /// with a timeout still reaps.
    pub fn new(log_dir: &str) -> Supervisor {
        // SAFETY: an initialised signal set passed to sigprocmask/signalfd.
        let sigfd = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            sys::owned(libc::signalfd(
                -1,
                &set,
                libc::SFD_CLOEXEC | libc::SFD_NONBLOCK,
            ))
        };
        Supervisor {
            jobs: Vec::new(),
            sigfd: sigfd.ok(),
            log_dir: log_dir.to_string(),
        }
    }

    /// Starts a container; errors are logged and leave no job behind.
    /// Returns the job index.
    pub fn start(&mut self, c: &Container) -> Option<usize> {
        console::log(&format!("{}: starting {:?}", c.name, c.args));
        match container::spawn(c) {
            Ok(s) => {
                console::log(&format!("{}: started, pid {}", c.name, s.pid));
                self.jobs.push(Job {
                    sink: Sink::open(&c.name, &self.log_dir),
                    pid: Some(s.pid),
                    exited_at: None,
                    streams: vec![
                        Stream {
                            fd: s.stdout,
                            split: LineSplitter::default(),
                        },
                        Stream {
                            fd: s.stderr,
                            split: LineSplitter::default(),
                        },
                    ],
                });
                Some(self.jobs.len() - 1)
            }
            Err(e) => {
                console::log(&format!(
                    "{}: failed to start: {}",
                    c.name,
                    console::chain(&e)
                ));
                // The half-started process, if any, is reaped as an orphan.
                self.reap();
                let _ = std::fs::remove_dir(format!("{}/{}", container::CGROUP_DIR, c.name));
                None
            }
        }
    }

    /// Runs until job `idx` exited and its output is drained.
    pub fn wait_job(&mut self, idx: usize) {
        while self.jobs.get(idx).is_some_and(|j| !j.done()) {
            self.pump();
        }
    }

    /// Runs until every job exited and its output is drained.
    pub fn wait_all(&mut self) {
        while self.jobs.iter().any(|j| !j.done()) {
            self.pump();
        }
    }

    /// Reaps orphans forever.
    pub fn idle_forever(&mut self) -> ! {
        loop {
            self.pump();
        }
    }

    /// One round: wait for output or a child exit, then handle both.
    fn pump(&mut self) {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut owners: Vec<(usize, usize)> = Vec::new();
        if let Some(fd) = &self.sigfd {
            fds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        for (j, job) in self.jobs.iter().enumerate() {
            for (s, st) in job.streams.iter().enumerate() {
                fds.push(libc::pollfd {
                    fd: st.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                owners.push((j, s));
            }
        }
        let timeout = if self.sigfd.is_some() { 1000 } else { 100 };
        // SAFETY: fds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            // EINTR or worse: reap anyway and go round again.
            self.reap();
            return;
        }
        let skip = usize::from(self.sigfd.is_some());
        if let Some(fd) = &self.sigfd {
            if fds[0].revents != 0 {
                let mut buf = [0u8; 128 * 4];
                let _ = sys::read(fd.as_fd(), &mut buf);
            }
        }
        // Output first, so lines written just before exit precede its report.
        let mut closed = Vec::new();
        for (k, pfd) in fds.iter().enumerate().skip(skip) {
            if pfd.revents == 0 {
                continue;
            }
            let (j, s) = owners[k - skip];
            if !self.read_stream(j, s) {
                closed.push((j, s));
            }
        }
        self.reap();
        let now = Instant::now();
        for (j, job) in self.jobs.iter().enumerate() {
            if job
                .exited_at
                .is_some_and(|t| now.duration_since(t) > DRAIN_GRACE)
            {
                for s in 0..job.streams.len() {
                    closed.push((j, s));
                }
            }
        }
        closed.sort();
        closed.dedup();
        for &(j, s) in closed.iter().rev() {
            let job = &mut self.jobs[j];
            // Dropping the stream closes its pipe.
            let mut st = job.streams.remove(s);
            if let Some(line) = st.split.finish() {
                job.sink.line(&line);
            }
        }
    }

    /// Reads what is available; false at end of stream.
    fn read_stream(&mut self, j: usize, s: usize) -> bool {
        let job = &mut self.jobs[j];
        let mut buf = [0u8; 4096];
        match sys::read(job.streams[s].fd.as_fd(), &mut buf) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                for line in job.streams[s].split.push(&buf[..n]) {
                    job.sink.line(&line);
                }
                true
            }
        }
    }

    /// Collects every exited child, logging the containers'.
    pub fn reap(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            if let Some(job) = self.jobs.iter_mut().find(|j| j.pid == Some(pid)) {
                console::log(&format!("{}: {}", job.sink.name, describe_status(status)));
                job.pid = None;
                job.exited_at = Some(Instant::now());
                // Empty once the PID namespace is gone; a leftover is harmless.
                let _ = std::fs::remove_dir(format!("{}/{}", container::CGROUP_DIR, job.sink.name));
            }
        }
    }
}

/// Ends everything and powers off (or reboots if that fails). Never returns.
pub fn poweroff() -> ! {
    console::log("powering off");
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
        libc::reboot(libc::RB_POWER_OFF);
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
    use super::describe_status;

    #[test]
    fn statuses() {
        assert_eq!(describe_status(0), "exited with status 0");
        assert_eq!(describe_status(3 << 8), "exited with status 3");
        assert_eq!(describe_status(9), "killed by signal 9");
    }
}
