//! Running the `kiln` binary, booting its images and checking them with the
//! standard tools.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root (tests/ is one level below it).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A cache shared by every test run, so Debian packages and registry blobs
/// are fetched once per machine rather than once per test.
pub fn shared_cache() -> PathBuf {
    let dir = std::env::var_os("KILN_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target").join("kiln-test-cache"));
    std::fs::create_dir_all(&dir).expect("creating the test cache");
    dir
}

/// A scratch directory under target/, emptied first. It is removed when the
/// test passes (a CI disk holds many images at once) and kept for post-mortems
/// when it fails.
pub fn scratch(name: &str) -> Scratch {
    let dir = workspace()
        .join("target")
        .join("kiln-test-scratch")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a scratch dir");
    Scratch(dir)
}

/// A scratch directory, removed on drop unless the test is failing.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Output of a command with stdout and stderr as text.
pub struct Ran {
    /// Whether the command exited with status 0.
    pub ok: bool,
    /// Exit status; `None` if killed by a signal.
    pub code: Option<i32>,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl From<Output> for Ran {
    fn from(o: Output) -> Self {
        Ran {
            ok: o.status.success(),
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs `cmd` to completion, capturing its output.
pub fn run(cmd: &mut Command) -> Ran {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    out.into()
}

/// `kiln build RECIPE -o OUT --quiet` with the shared cache, whatever its
/// outcome.
pub fn try_build(kiln: &Path, recipe: &Path, out: &Path) -> Ran {
    run(Command::new(kiln)
        .args(["build", "--quiet"])
        .arg(recipe)
        .arg("-o")
        .arg(out)
        .arg("--cache")
        .arg(shared_cache()))
}

/// [`try_build`] that panics with kiln's stderr when the build fails.
pub fn build(kiln: &Path, recipe: &Path, out: &Path) -> Ran {
    let r = try_build(kiln, recipe, out);
    assert!(
        r.ok,
        "kiln build {} failed:\n{}",
        recipe.display(),
        r.stderr
    );
    r
}

/// Boots `image` with `kiln run`, returning the serial console output.
pub fn boot(kiln: &Path, image: &Path, timeout_secs: u64) -> Ran {
    boot_with(kiln, image, timeout_secs, &[])
}

/// [`boot`] with more `kiln run` arguments (network cards, say).
pub fn boot_with(kiln: &Path, image: &Path, timeout_secs: u64, args: &[&str]) -> Ran {
    let r = run(Command::new(kiln)
        .arg("run")
        .arg(image)
        .args(args)
        .arg("--timeout")
        .arg(timeout_secs.to_string()));
    // Kept for post-mortems when an assertion fails.
    let _ = std::fs::write(image.with_extension("console.log"), &r.stdout);
    r
}

/// Boots `image` with `kiln run` until a console line satisfies `done`
/// (or `timeout_secs` pass), then stops QEMU; returns the console so far.
/// For images whose services run forever.
pub fn boot_until(
    kiln: &Path,
    image: &Path,
    timeout_secs: u64,
    done: impl FnMut(&str) -> bool,
) -> String {
    boot_until_with(kiln, image, timeout_secs, &[], done)
}

/// [`boot_until`] with more `kiln run` arguments.
pub fn boot_until_with(
    kiln: &Path,
    image: &Path,
    timeout_secs: u64,
    args: &[&str],
    mut done: impl FnMut(&str) -> bool,
) -> String {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(kiln)
        .arg("run")
        .arg(image)
        .args(args)
        .arg("--timeout")
        .arg(timeout_secs.to_string())
        // Not a terminal: the console stays non-interactive.
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        // Its own group: stopping it stops QEMU too.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", kiln.display()));
    let stdout = child.stdout.take().expect("piped");
    let mut console = String::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        console.push_str(&line);
        console.push('\n');
        if done(&line) {
            break;
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", "--"])
        .arg(format!("-{}", child.id()))
        .status();
    let _ = child.wait();
    let _ = std::fs::write(image.with_extension("console.log"), &console);
    console
}

/// Copies partition `part` (as [`partitions`] lists it) of `image` into a
/// new file `to`, for the standard tools to check.
pub fn extract_partition(image: &Path, part: &(u32, u64, u64, String, String), to: &Path) {
    use std::io::{Read, Seek, SeekFrom};
    let (offset, len) = (part.1 * 512, (part.2 - part.1 + 1) * 512);
    let mut f = std::fs::File::open(image).expect("opening image");
    f.seek(SeekFrom::Start(offset)).expect("seeking");
    let mut buf = vec![0; usize::try_from(len).expect("partition fits in memory")];
    f.read_exact(&mut buf).expect("reading partition");
    std::fs::write(to, buf).expect("writing partition copy");
}

/// The UKI slot `part` of an A/B disk holds (where its header says),
/// copied to `to`; and the header.
pub fn extract_slot_uki(
    image: &Path,
    part: &(u32, u64, u64, String, String),
    to: &Path,
) -> kiln_boot::SlotHeader {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(image).expect("opening image");
    let end = (part.2 + 1) * 512;
    let mut raw = vec![0u8; kiln_boot::slot::HEADER_LEN];
    f.seek(SeekFrom::Start(end - raw.len() as u64))
        .expect("seeking");
    f.read_exact(&mut raw).expect("reading the slot header");
    let h = kiln_boot::SlotHeader::decode(&raw).expect("a valid slot header");
    f.seek(SeekFrom::Start(part.1 * 512 + h.uki_offset))
        .expect("seeking");
    let mut uki = vec![0u8; usize::try_from(h.uki_len).expect("fits")];
    f.read_exact(&mut uki).expect("reading the UKI");
    std::fs::write(to, uki).expect("writing the UKI");
    h
}

/// Flips one bit of the byte at `at` in `path` (a corrupt block).
pub fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
}

/// Partitions of a GPT disk as `sgdisk -i` reports them: (number, first
/// sector, last sector, unique GUID, name), checked with `sgdisk -v` first.
pub fn partitions(image: &Path) -> Vec<(u32, u64, u64, String, String)> {
    let v = run(Command::new("sgdisk").arg("-v").arg(image));
    assert!(
        v.ok && v.stdout.contains("No problems found"),
        "sgdisk -v {}:\n{}{}",
        image.display(),
        v.stdout,
        v.stderr
    );
    let p = run(Command::new("sgdisk").arg("-p").arg(image));
    assert!(p.ok, "sgdisk -p: {}", p.stderr);
    let mut out = Vec::new();
    for line in p.stdout.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(n) = f.first().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let i = run(Command::new("sgdisk").arg(format!("-i{n}")).arg(image));
        let guid = i
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("Partition unique GUID: "))
            .unwrap_or_default()
            .to_lowercase();
        out.push((
            n,
            f[1].parse().expect("first sector"),
            f[2].parse().expect("last sector"),
            guid,
            f.last().copied().unwrap_or_default().to_string(),
        ));
    }
    out
}

/// Lines the guest printed for container `name` (`NAME| ...`), prefix removed.
pub fn container_lines<'a>(console: &'a str, name: &str) -> Vec<&'a str> {
    let prefix = format!("{name}| ");
    console
        .lines()
        .filter_map(|l| {
            let l = l.trim_end_matches('\r');
            // The name whole: "confined| " is not "unconfined| ".
            l.match_indices(&prefix)
                .find(|(at, _)| {
                    l[..*at]
                        .chars()
                        .next_back()
                        .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-'))
                })
                .map(|(at, _)| &l[at + prefix.len()..])
        })
        .collect()
}

/// Parses the JSON file at `path` (e.g. a build's `NAME.plan.json`).
pub fn read_json(path: &Path) -> serde_json::Value {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_slice(&data).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// A TOML basic string holding `s` (quotes, backslashes and control
/// characters escaped), for recipes written by tests.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Panics if `dir` exists and holds anything: a failed build left files.
pub fn assert_no_files(dir: &Path) {
    if dir.exists() {
        let left: Vec<_> = std::fs::read_dir(dir)
            .expect("reading the output dir")
            .map(|e| e.expect("a directory entry").file_name())
            .collect();
        assert!(left.is_empty(), "files left in {}: {left:?}", dir.display());
    }
}
