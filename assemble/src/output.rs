//! Writing outputs without ever leaving a partial file at an output path.
//!
//! Each output is written to a temp file beside it (`.NAME.tmp-PID`),
//! locked (`flock`) while its writer lives, and renamed into place only
//! when every output of the build is complete. Temp files are removed on
//! error, and by [`remove_all_temps`] from a signal handler; those left by
//! a killed build are swept by the next one, which can tell them from a
//! concurrent build's because nobody holds their lock.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Errors from writing outputs into the output directory.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The output directory path is an existing file.
    #[error("output directory {} is a file, not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The output directory cannot be created or written.
    #[error("output directory {}", path.display())]
    Unwritable {
        /// The output directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// Writing, syncing or renaming an output file failed.
    #[error("writing {}", path.display())]
    Write {
        /// The output file.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
}

/// Temp files of this process that are not yet renamed into place, and
/// whether [`remove_all_temps`] has run (then no new one is created).
struct Temps {
    paths: Vec<PathBuf>,
    closing: bool,
}

static TEMPS: Mutex<Temps> = Mutex::new(Temps {
    paths: Vec::new(),
    closing: false,
});

fn temps() -> std::sync::MutexGuard<'static, Temps> {
    TEMPS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes every temp file this process has open, and refuses new ones;
/// for signal handlers.
pub fn remove_all_temps() {
    let mut t = temps();
    t.closing = true;
    for p in t.paths.drain(..) {
        let _ = fs::remove_file(p);
    }
}

/// Creates the new file `path` (read-write), registers it for
/// [`remove_all_temps`] in one step (so a signal arriving meanwhile cannot
/// leave it behind) and locks it, which keeps other builds' [`sweep`] off it.
pub fn create_temp(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let file = {
            let mut t = temps();
            if t.closing {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "kiln is stopping",
                ));
            }
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)?;
            t.paths.push(path.to_path_buf());
            file
        };
        // A sweep may find the file before it is locked and remove it; then
        // the path no longer names this file and it is made again.
        let kept = file.lock().and_then(|()| {
            let (ours, named) = (file.metadata()?, fs::metadata(path));
            Ok(named.is_ok_and(|n| (n.dev(), n.ino()) == (ours.dev(), ours.ino())))
        });
        match kept {
            Ok(true) => return Ok(file),
            Ok(false) => untrack_temp(path),
            Err(e) => {
                untrack_temp(path);
                let _ = fs::remove_file(path);
                return Err(e);
            }
        }
    }
}

/// Forgets a temp file that was renamed or removed.
pub fn untrack_temp(path: &Path) {
    temps().paths.retain(|p| p != path);
}

const TMP_MARK: &str = ".tmp-";

/// Checks, before any work, that `dir` can receive outputs: creates it,
/// refuses a file, and proves it writable. Sweeps temp files that killed
/// builds left there.
pub fn prepare_dir(dir: &Path) -> Result<(), OutputError> {
    if dir.exists() && !dir.is_dir() {
        return Err(OutputError::NotADirectory(dir.to_path_buf()));
    }
    let unwritable = |source| OutputError::Unwritable {
        path: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(unwritable)?;
    let probe = dir.join(format!(".kiln-probe{TMP_MARK}{}", std::process::id()));
    File::create(&probe).map_err(unwritable)?;
    let _ = fs::remove_file(&probe);
    sweep(dir);
    Ok(())
}

/// Removes `.*.tmp-*` files in `dir` whose writer is gone (unlocked).
pub fn sweep(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with('.') || !name.contains(TMP_MARK) {
            continue;
        }
        let path = e.path();
        let Ok(f) = File::open(&path) else { continue };
        // A live writer holds an exclusive lock: leave its file alone.
        if f.try_lock().is_ok() {
            let _ = fs::remove_file(&path);
        }
    }
}

/// One output being written.
pub struct Pending {
    /// The temporary file being written, beside `path`.
    pub tmp: PathBuf,
    /// Where the output goes once complete.
    pub path: PathBuf,
    /// Held (and locked) until renamed.
    file: File,
}

impl Pending {
    /// Starts writing `path`: a locked temp file beside it.
    pub fn create(path: &Path) -> Result<Pending, OutputError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}{TMP_MARK}{}", std::process::id()));
        let err = |source| OutputError::Write {
            path: path.to_path_buf(),
            source,
        };
        let _ = fs::remove_file(&tmp);
        let file = create_temp(&tmp).map_err(err)?;
        Ok(Pending {
            tmp,
            path: path.to_path_buf(),
            file,
        })
    }

    /// The temporary file, to write into.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    fn discard(&self) {
        let _ = fs::remove_file(&self.tmp);
        untrack_temp(&self.tmp);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Still here means not committed: nothing partial stays behind.
        if self.tmp.exists() {
            self.discard();
        }
    }
}

/// Syncs every pending output and renames them into place in order; if
/// one fails, those already renamed are removed again, so the set appears
/// whole or not at all.
pub fn commit(pending: Vec<Pending>) -> Result<Vec<PathBuf>, OutputError> {
    for p in &pending {
        p.file.sync_all().map_err(|source| OutputError::Write {
            path: p.path.clone(),
            source,
        })?;
    }
    let mut done: Vec<PathBuf> = Vec::new();
    for p in &pending {
        if let Err(source) = fs::rename(&p.tmp, &p.path) {
            for d in &done {
                let _ = fs::remove_file(d);
            }
            return Err(OutputError::Write {
                path: p.path.clone(),
                source,
            });
        }
        untrack_temp(&p.tmp);
        done.push(p.path.clone());
    }
    Ok(done)
}

/// Writes one file atomically (a set of one).
pub fn write_file(path: &Path, data: &[u8]) -> Result<(), OutputError> {
    use std::io::Write;
    let mut p = Pending::create(path)?;
    p.file()
        .write_all(data)
        .map_err(|source| OutputError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    commit(vec![p]).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn dropped_pending_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut p = Pending::create(&dir.path().join("x.raw")).unwrap();
            p.file().write_all(b"partial").unwrap();
        }
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn commit_renames_the_whole_set() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Pending::create(&dir.path().join("a.raw")).unwrap();
        let mut b = Pending::create(&dir.path().join("a.plan.json")).unwrap();
        a.file().write_all(b"disk").unwrap();
        b.file().write_all(b"{}").unwrap();
        commit(vec![a, b]).unwrap();
        assert_eq!(names(dir.path()), vec!["a.plan.json", "a.raw"]);
        assert_eq!(fs::read(dir.path().join("a.raw")).unwrap(), b"disk");
    }

    #[test]
    fn commit_failure_removes_what_was_renamed() {
        let dir = tempfile::tempdir().unwrap();
        let a = Pending::create(&dir.path().join("a.raw")).unwrap();
        // The second target is a non-empty directory: rename fails.
        fs::create_dir_all(dir.path().join("b/inside")).unwrap();
        let b = Pending::create(&dir.path().join("b")).unwrap();
        assert!(commit(vec![a, b]).is_err());
        assert_eq!(names(dir.path()), vec!["b"]);
    }

    #[test]
    fn sweep_removes_only_unlocked_temps() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".old.raw.tmp-1"), b"left by a killed build").unwrap();
        let live = Pending::create(&dir.path().join("live.raw")).unwrap();
        fs::write(dir.path().join("keep.raw"), b"an output").unwrap();
        sweep(dir.path());
        let n = names(dir.path());
        assert!(!n.contains(&".old.raw.tmp-1".to_string()), "{n:?}");
        assert!(n.iter().any(|x| x.starts_with(".live.raw.tmp-")), "{n:?}");
        assert!(n.contains(&"keep.raw".to_string()));
        drop(live);
    }

    #[test]
    fn a_concurrent_sweep_never_takes_a_new_temp() {
        // Another build's cache sweep ran between a temp's creation and its
        // lock once, and the writer's rename found nothing (CI).
        let dir = tempfile::tempdir().unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    sweep(dir.path());
                }
            });
            let lost = (0..2000)
                .filter(|i| {
                    let tmp = dir.path().join(format!(".w{TMP_MARK}{i}"));
                    // The file stays open (locked) until renamed, as in kiln.
                    let ok = create_temp(&tmp).and_then(|mut f| {
                        f.write_all(b"x")?;
                        fs::rename(&tmp, dir.path().join("done"))
                    });
                    untrack_temp(&tmp);
                    ok.is_err()
                })
                .count();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(lost, 0, "temps swept away before their rename");
        });
    }

    #[test]
    fn prepare_refuses_a_file_and_creates_a_dir() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("file");
        fs::write(&f, b"x").unwrap();
        assert!(matches!(
            prepare_dir(&f),
            Err(OutputError::NotADirectory(_))
        ));
        prepare_dir(&dir.path().join("new/out")).unwrap();
        assert!(dir.path().join("new/out").is_dir());
        assert!(names(&dir.path().join("new/out")).is_empty());
    }
}
