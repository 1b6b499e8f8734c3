//! Bad input gets a clear error and a non-zero exit (2 for the recipe or
//! command line, 1 for the environment), never a panic or a partial output
//! file; every example recipe validates; progress is reported as plain
//! lines or JSON events.

use kiln_tests::kiln as k;
use std::path::{Path, PathBuf};
use std::process::Command;

fn kiln() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

const HEAD: &str =
    "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\n";

#[test]
fn example_recipes_validate() {
    let dir = k::workspace().join("recipes");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let r = k::run(Command::new(kiln()).arg("validate").arg(&p));
            assert!(r.ok, "{}: {}", p.display(), r.stderr);
            n += 1;
        }
    }
    assert!(n >= 1, "no recipes found in {}", dir.display());
}

/// Errors found by `validate` (and so by `build`, before any work).
#[test]
fn recipe_errors_name_file_line_and_field() {
    let dir = k::scratch("bad-recipes");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown-key.toml",
            "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\ncmdlin = \"x\"\n".into(),
            ":5:1: kernel.cmdlin: unknown field",
        ),
        (
            "two-kernels.toml",
            "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"a\"\npath = \"vmlinuz\"\n".into(),
            ":5:8: kernel.path: [kernel] takes exactly one of",
        ),
        (
            "bad-net.toml",
            "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"a\"\n\n[[service]]\nname = \"s\"\nimage = \"r/i:1\"\nnet = \"nat\"\n".into(),
            ":9:7: service[0].net: expected \"host\", \"none\" or \"bridge\"",
        ),
        (
            "wrong-type.toml",
            "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"a\"\n[disk]\nsize = 5\n".into(),
            ":6:8: disk.size: invalid type",
        ),
        (
            "no-kernel.toml",
            "name = \"x\"\nversion = \"1\"\n".into(),
            ":1:1: kernel: missing",
        ),
        (
            "empty-command.toml",
            format!("{HEAD}[[service]]\nname = \"s\"\nimage = \"r/i:1\"\ncommand = []\n"),
            ":8:11: service[0].command: must not be empty",
        ),
        (
            "duplicate-key.toml",
            format!("{HEAD}[disk]\nsize = \"1G\"\nsize = \"2G\"\n"),
            ":7:1: disk.size: duplicate key `size`",
        ),
        (
            "too-small.toml",
            format!("{HEAD}[disk]\nsize = \"64M\"\n"),
            ":6:8: disk.size: 64M is too small",
        ),
        (
            "too-large.toml",
            format!("{HEAD}[disk]\nsize = \"100000T\"\n"),
            ":6:8: disk.size: 100000T is too large",
        ),
        (
            "file-source-missing.toml",
            format!("{HEAD}[[file]]\npath = \"/etc/x\"\nsource = \"no-such-file\"\n"),
            ":7:10: file[0].source: cannot read",
        ),
    ];
    for (file, text, want) in &cases {
        let p = dir.join(file);
        std::fs::write(&p, text).unwrap();
        for verb in ["validate", "build"] {
            let out = dir.join("out");
            let r = k::run(
                Command::new(kiln())
                    .arg(verb)
                    .arg(&p)
                    .arg("--quiet")
                    .current_dir(&dir),
            );
            assert!(!r.ok, "{verb} {file} succeeded");
            assert_eq!(r.code, Some(2), "{verb} {file}: {}", r.stderr);
            assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
            let expected = format!("{}{want}", p.display());
            assert!(
                r.stderr.contains(&expected),
                "{verb} {file}: wanted {expected:?} in:\n{}",
                r.stderr
            );
            assert!(!out.exists());
        }
    }
}

#[test]
fn missing_recipe_is_an_environment_error_printed_once() {
    let r = k::run(Command::new(kiln()).args(["validate", "/nonexistent/recipe.toml"]));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("/nonexistent/recipe.toml"),
        "{}",
        r.stderr
    );
    // The cause once, not repeated by every layer of the chain.
    assert_eq!(
        r.stderr.matches("No such file or directory").count(),
        1,
        "{}",
        r.stderr
    );
}

/// A build that fails midway (an image that cannot be found) leaves no file
/// at the output path.
#[test]
fn failed_build_leaves_no_output() {
    let dir = k::scratch("failed-build");
    let recipe = dir.join("r.toml");
    std::fs::write(
        &recipe,
        "name = \"broken\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\n\n[[service]]\nname = \"s\"\nimage = \"oci-layout:does-not-exist\"\n",
    )
    .unwrap();
    let out = dir.join("out");
    let r = k::try_build(&kiln(), &recipe, &out);
    assert!(!r.ok);
    assert!(r.stderr.contains("does-not-exist"), "{}", r.stderr);
    assert!(!out.join("broken.raw").exists());
    k::assert_no_files(&out);
    assert!(
        !dir.join("r.lock").exists(),
        "a failed build wrote its lock"
    );
}

/// A Debian package that does not exist is reported against the recipe
/// field that asked for it.
#[test]
fn unknown_debian_package_names_the_field() {
    let dir = k::scratch("unknown-package");
    let recipe = dir.join("r.toml");
    std::fs::write(
        &recipe,
        "name = \"nopkg\"\nversion = \"1\"\n[kernel]\ndebian = \"no-such-kernel-package\"\n",
    )
    .unwrap();
    let out = dir.join("out");
    let r = k::try_build(&kiln(), &recipe, &out);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    let want = format!(
        "{}:4:10: kernel.debian: cannot satisfy `no-such-kernel-package`",
        recipe.display()
    );
    assert!(
        r.stderr.contains(&want),
        "wanted {want:?} in:\n{}",
        r.stderr
    );
    assert!(!out.join("nopkg.raw").exists());
}

/// Errors only the trees can show (a command missing from its image, a
/// bind source missing from the host root) fail the build with exit 2,
/// located in the recipe, and leave nothing behind.
#[test]
fn late_recipe_errors_are_located() {
    let dir = k::scratch("late-errors");
    let cases = [
        (
            "no-command.toml",
            format!("{HEAD}[[service]]\nname = \"s\"\nimage = {{ debian = [\"busybox-static\"], scripts = false }}\ncommand = [\"nginx\", \"-g\", \"daemon off;\"]\n"),
            ":8:11: service[0].command: container s: nginx is not in the image's PATH",
        ),
        (
            "bind-missing.toml",
            format!("{HEAD}[[service]]\nname = \"s\"\nimage = {{ debian = [\"busybox-static\"], scripts = false }}\ncommand = [\"/bin/busybox\", \"true\"]\nbinds = [\"/etc/nope:/etc/nope:ro\"]\n"),
            ":9:10: service[0].binds[0]: source /etc/nope is not in the host root",
        ),
    ];
    for (file, text, want) in &cases {
        let p = dir.join(file);
        std::fs::write(&p, text).unwrap();
        let out = dir.join("out");
        let r = k::try_build(&kiln(), &p, &out);
        assert_eq!(r.code, Some(2), "{file}: {}", r.stderr);
        let expected = format!("{}{want}", p.display());
        assert!(
            r.stderr.contains(&expected),
            "{file}: wanted {expected:?} in:\n{}",
            r.stderr
        );
        k::assert_no_files(&out);
    }
}

fn tiny_recipe(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.toml");
    std::fs::write(
        &p,
        format!("{HEAD}[[onboot]]\nname = \"a\"\nimage = {{ debian = [\"busybox-static\"], scripts = false }}\ncommand = [\"/bin/busybox\", \"true\"]\n"),
    )
    .unwrap();
    p
}

/// Output paths are checked before any work: a file is a command-line
/// error (2), a read-only directory an environment one (1).
#[test]
fn output_path_problems_fail_early() {
    let dir = k::scratch("output-path");
    let recipe = tiny_recipe(&dir);
    let file = dir.join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let r = k::try_build(&kiln(), &recipe, &file);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(
        r.stderr.contains("is a file, not a directory"),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("kiln: fetch"),
        "work was done: {}",
        r.stderr
    );

    // A read-only directory: a read-only mount as root (root ignores mode
    // bits), mode 0555 otherwise.
    let ro = dir.join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    let r = if is_root() {
        let script = format!(
            "mount -t tmpfs -o ro none {ro} && exec {kiln} build --quiet {recipe} -o {ro} --cache {cache}",
            ro = ro.display(),
            kiln = kiln().display(),
            recipe = recipe.display(),
            cache = k::shared_cache().display()
        );
        k::run(Command::new("unshare").args(["-m", "sh", "-c", &script]))
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        k::try_build(&kiln(), &recipe, &ro)
    };
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("output directory {}", ro.display())),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("Read-only file system") || r.stderr.contains("Permission denied"),
        "{}",
        r.stderr
    );
}

fn is_root() -> bool {
    k::run(Command::new("id").arg("-u")).stdout.trim() == "0"
}

/// Off a terminal, one line per stage; with `--json`, one JSON event per
/// line on stdout, every stage started and ended, the output reported.
#[test]
fn progress_is_plain_lines_or_json() {
    let dir = k::scratch("progress");
    let recipe = tiny_recipe(&dir);
    let out = dir.join("out");
    // A temp file left by a killed build (nobody holds its lock) is swept.
    std::fs::create_dir_all(&out).unwrap();
    let stale = out.join(".x.raw.tmp-4194304");
    std::fs::write(&stale, b"left by a SIGKILLed build").unwrap();
    let r = k::run(
        Command::new(kiln())
            .arg("build")
            .arg(&recipe)
            .arg("-o")
            .arg(&out)
            .arg("--cache")
            .arg(k::shared_cache()),
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(!stale.exists(), "stale temp file not swept");
    for stage in ["resolve", "fetch", "trees", "encode", "write"] {
        assert!(
            r.stderr
                .lines()
                .any(|l| l.starts_with(&format!("kiln: {stage} ")) && l.trim_end().contains('s')),
            "no {stage} line in:\n{}",
            r.stderr
        );
    }

    let r = k::run(
        Command::new(kiln())
            .arg("build")
            .arg("--json")
            .arg(&recipe)
            .arg("-o")
            .arg(&out)
            .arg("--cache")
            .arg(k::shared_cache()),
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.is_empty(), "stderr with --json: {}", r.stderr);
    let events: Vec<serde_json::Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    for stage in ["resolve", "fetch", "trees", "encode", "write"] {
        for kind in ["stage-start", "stage-end"] {
            assert!(
                events
                    .iter()
                    .any(|e| e["event"] == kind && e["stage"] == stage),
                "no {kind} {stage} in {events:?}"
            );
        }
    }
    let inputs: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "input").collect();
    assert!(inputs.iter().all(|e| e["cached"] == true), "{inputs:?}");
    assert!(inputs.len() >= 3, "kernel, stub and busybox: {inputs:?}");
    let output = events
        .iter()
        .find(|e| e["event"] == "output")
        .expect("an output event");
    assert_eq!(output["path"], out.join("x.raw").display().to_string());

    let r = k::run(
        Command::new(kiln())
            .arg("build")
            .arg("--quiet")
            .arg(&recipe)
            .arg("-o")
            .arg(&out)
            .arg("--cache")
            .arg(k::shared_cache()),
    );
    assert!(
        r.ok && r.stdout.is_empty() && r.stderr.is_empty(),
        "{}{}",
        r.stdout,
        r.stderr
    );

    // On a terminal (script(1) gives it one): stage lines above a live
    // line, and the compression's bytes and rate.
    let cmd = format!(
        "{} build {} -o {} --cache {}",
        kiln().display(),
        recipe.display(),
        out.display(),
        k::shared_cache().display()
    );
    let r = k::run(
        Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .env_remove("CI"),
    );
    assert!(r.ok, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("kiln: encode")
            && r.stdout.contains("(compressed ")
            && r.stdout.contains(" MiB"),
        "{}",
        r.stdout
    );
}

/// `--help` describes every argument; `-q` is only where it does something;
/// `kiln run` on a missing file says so, without an install hint.
#[test]
fn help_texts_and_run_on_a_missing_file() {
    let r = k::run(Command::new(kiln()).args(["build", "--help"]));
    assert!(r.ok);
    assert!(r.stdout.contains("<RECIPE>  The recipe"), "{}", r.stdout);
    assert!(r.stdout.contains("--locked"), "{}", r.stdout);
    assert!(r.stdout.contains("Examples:"), "{}", r.stdout);
    let r = k::run(Command::new(kiln()).args(["run", "--quiet", "x.raw"]));
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    let r = k::run(Command::new(kiln()).args(["run", "/nonexistent/disk.raw"]));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("/nonexistent/disk.raw: not found"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("apt-get"), "{}", r.stderr);
    let junk_dir = k::scratch("run-junk");
    let junk = junk_dir.join("junk.raw");
    std::fs::write(&junk, vec![0x5a; 1 << 20]).unwrap();
    let r = k::run(Command::new(kiln()).arg("run").arg(&junk));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("no GPT"), "{}", r.stderr);
}

/// SIGINT or SIGTERM while the root is being compressed: kiln exits 130 or
/// 143 and leaves no file in the output directory and no temp file in the
/// cache.
#[test]
fn interrupted_build_leaves_nothing() {
    use std::io::BufRead;
    let dir = k::scratch("interrupted");
    let cache = dir.join("cache");
    for (signal, code, seed) in [("INT", 130, 1u64), ("TERM", 143, 2)] {
        // 64 MiB that does not compress: seconds of zstd 15 on two cores.
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let data: Vec<u8> = (0..(64u32 << 20) / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        std::fs::write(dir.join("noise"), &data).unwrap();
        let recipe = dir.join("big.toml");
        std::fs::write(
            &recipe,
            format!("{HEAD}[disk]\nsize = \"1G\"\n[[onboot]]\nname = \"a\"\nimage = {{ debian = [\"busybox-static\"], scripts = false }}\ncommand = [\"/bin/busybox\", \"true\"]\n[[file]]\npath = \"/noise\"\nsource = \"noise\"\n"),
        )
        .unwrap();
        // The shared cache's inputs, copied by hard links: this build's
        // temp files are then the only ones in `cache`.
        let _ = std::fs::remove_dir_all(&cache);
        // Other tests write to the shared cache meanwhile: files that vanish
        // under cp (temps, sandbox trees) make it fail harmlessly; what it
        // missed the build fetches again.
        let _ = Command::new("cp")
            .arg("-al")
            .arg(k::shared_cache())
            .arg(&cache)
            .stderr(std::process::Stdio::null())
            .status();
        std::fs::create_dir_all(&cache).unwrap();
        // Temp files and sandbox trees of other tests' builds.
        let _ = std::fs::remove_dir_all(cache.join("configure"));
        for p in walk(&cache) {
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".tmp-"))
            {
                std::fs::remove_file(&p).unwrap();
            }
        }
        let out = dir.join("out");
        let mut child = Command::new(kiln())
            .arg("build")
            .arg(&recipe)
            .arg("-o")
            .arg(&out)
            .arg("--cache")
            .arg(&cache)
            .env("CI", "1")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = String::new();
        // Stage lines come as stages end: after `trees`, the root is
        // being compressed.
        for line in lines.by_ref() {
            let line = line.unwrap();
            seen.push_str(&line);
            seen.push('\n');
            if line.starts_with("kiln: trees") {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let exit = child.wait().unwrap();
        assert_eq!(
            exit.code(),
            Some(code),
            "SIG{signal}: {seen}{}",
            rest.join("\n")
        );
        assert!(
            !rest.iter().any(|l| l.starts_with("kiln: encode")),
            "the build ended before SIG{signal}: raise the noise"
        );
        k::assert_no_files(&out);
        let temps: Vec<_> = walk(&cache)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".tmp-"))
            })
            .collect();
        assert!(temps.is_empty(), "SIG{signal} left {temps:?}");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Writes `NAME_1.0_all.deb` into `dir` with `dpkg-deb`: `files` in its
/// data (path, contents) and `control` files (name, contents; scripts are
/// made executable).
fn make_deb(dir: &Path, name: &str, files: &[(&str, &str)], control: &[(&str, &str)]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let root = dir.join(name);
    let _ = std::fs::remove_dir_all(&root);
    let mut all = vec![(
        "DEBIAN/control".to_string(),
        format!("Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: Test <t@example.org>\nDescription: a test package\n"),
    )];
    all.extend(
        files
            .iter()
            .map(|(p, t)| (p.trim_start_matches('/').to_string(), t.to_string())),
    );
    all.extend(
        control
            .iter()
            .map(|(n, t)| (format!("DEBIAN/{n}"), t.to_string())),
    );
    for (path, text) in &all {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        if text.starts_with("#!") {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    let deb = dir.join(format!("{name}_1.0_all.deb"));
    let r = k::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&root)
            .arg(&deb),
    );
    assert!(r.ok, "dpkg-deb: {}", r.stderr);
    deb
}

/// Writes `hostile_1.0_all.deb` into `dir`: its postinst tries to write
/// `marker` on the host, change a kernel setting and reach `port` on the
/// host's loopback, then fails.
fn hostile_deb(dir: &Path, marker: &Path, port: u16) -> PathBuf {
    let postinst = format!(
        "#!/bin/bash\nmkdir -p {dir} && echo pwned > {marker} && echo wrote-marker\necho 7 > /proc/sys/vm/swappiness && echo changed-swappiness\necho x > /dev/tcp/127.0.0.1/{port} && echo reached-listener\necho hostile-postinst-done\nexit 3\n",
        dir = marker.parent().unwrap().display(),
        marker = marker.display()
    );
    make_deb(
        dir,
        "hostile",
        &[("/usr/share/hostile/README", "harmless data\n")],
        &[("postinst", &postinst)],
    )
}

/// dpkg's triggers run after configuration, for what other packages
/// activate: a file trigger by a file under its path, a named one by an
/// `activate` directive. Also: accounts with locked shadow entries.
#[test]
fn triggers_run_as_dpkg_runs_them() {
    let dir = k::scratch("triggers");
    let postinst =
        "#!/bin/sh\nset -e\nmkdir -p /var/lib/watcher\necho \"$*\" >> /var/lib/watcher/log\n";
    make_deb(
        &dir,
        "watcher",
        &[],
        &[
            ("postinst", postinst),
            ("triggers", "interest-noawait /usr/share/watched\ninterest watcher-named\ninterest never-activated\n"),
        ],
    );
    make_deb(
        &dir,
        "feeder",
        &[("/usr/share/watched/a", "x\n")],
        &[("triggers", "activate-noawait watcher-named\n")],
    );
    let recipe = dir.join("triggers.toml");
    std::fs::write(
        &recipe,
        format!("{HEAD}[[onboot]]\nname = \"a\"\nimage = {{ debian = [\"busybox-static\"], debs = [\"watcher_1.0_all.deb\", \"feeder_1.0_all.deb\"] }}\ncommand = [\"/bin/busybox\", \"true\"]\n"),
    )
    .unwrap();
    let out = dir.join("out");
    k::build(&kiln(), &recipe, &out);
    let image = out.join("x.raw");
    let parts = k::partitions(&image);
    let root = out.join("root.img");
    k::extract_partition(&image, &parts[1], &root);
    let cat = |path: &str| {
        let r = k::run(
            Command::new("unsquashfs")
                .arg("-cat")
                .arg(&root)
                .arg(format!("containers/a/rootfs/{path}")),
        );
        assert!(r.ok, "{path}: {}", r.stderr);
        r.stdout
    };
    assert_eq!(
        cat("var/lib/watcher/log"),
        "configure \ntriggered /usr/share/watched watcher-named\n"
    );
    let file = cat("var/lib/dpkg/triggers/File");
    assert!(
        file.lines()
            .any(|l| l == "/usr/share/watched watcher/noawait"),
        "{file}"
    );
    let shadow = cat("etc/shadow");
    assert!(shadow.starts_with("root:*:"), "{shadow}");
    let ls = k::run(Command::new("unsquashfs").arg("-lln").arg(&root));
    assert!(
        ls.stdout
            .lines()
            .any(|l| l.starts_with("-rw-r----- 0/42") && l.ends_with("rootfs/etc/shadow")),
        "{}",
        ls.stdout
    );
}

/// A package from disk whose postinst attacks the build host: nothing
/// reaches the host, and the build fails quoting the script's own output.
#[test]
fn hostile_package_cannot_touch_the_host() {
    let dir = k::scratch("hostile");
    let marker = dir.join("outside").join("pwned");
    let _ = std::fs::remove_dir_all(marker.parent().unwrap());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let swappiness = std::fs::read_to_string("/proc/sys/vm/swappiness").unwrap();
    hostile_deb(&dir, &marker, port);
    let recipe = dir.join("hostile.toml");
    std::fs::write(
        &recipe,
        format!("{HEAD}[[onboot]]\nname = \"a\"\nimage = {{ debian = [\"busybox-static\"], debs = [\"hostile_1.0_all.deb\"] }}\ncommand = [\"/bin/busybox\", \"true\"]\n"),
    )
    .unwrap();
    let out = dir.join("out");
    let r = k::try_build(&kiln(), &recipe, &out);
    assert!(!r.ok, "the build succeeded");
    assert!(
        r.stderr.contains("hostile postinst failed (exit status 3)")
            && r.stderr.contains("hostile-postinst-done"),
        "{}",
        r.stderr
    );
    // Only the failing script's output is quoted.
    assert!(!r.stderr.contains("update-alternatives"), "{}", r.stderr);
    // (Writing the marker succeeds: inside the sandbox's own tree.)
    for escaped in ["changed-swappiness", "reached-listener"] {
        assert!(!r.stderr.contains(escaped), "{escaped}:\n{}", r.stderr);
    }
    assert!(!marker.exists(), "the postinst wrote to the host");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/vm/swappiness").unwrap(),
        swappiness
    );
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the postinst reached the host's listener"
    );
    k::assert_no_files(&out);
}

/// Where user namespaces are forbidden (here: inside one that may create
/// none), a configured image fails naming the setting, and the same image
/// with `scripts = false` builds.
#[test]
fn forbidden_user_namespaces_name_the_setting() {
    let dir = k::scratch("no-userns");
    let body = |scripts: &str| {
        format!("{HEAD}[[onboot]]\nname = \"a\"\nimage = {{ debian = [\"busybox-static\"]{scripts} }}\ncommand = [\"/bin/busybox\", \"true\"]\n")
    };
    let build = |name: &str, text: String| {
        let recipe = dir.join(format!("{name}.toml"));
        std::fs::write(&recipe, text).unwrap();
        let script = format!(
            "echo 0 > /proc/sys/user/max_user_namespaces && exec {kiln} build --quiet {recipe} -o {out} --cache {cache}",
            kiln = kiln().display(),
            recipe = recipe.display(),
            out = dir.join(name).display(),
            cache = k::shared_cache().display()
        );
        k::run(Command::new("unshare").args(["--user", "--map-root-user", "sh", "-c", &script]))
    };
    let r = build("configured", body(""));
    assert!(!r.ok, "built without a sandbox");
    assert!(
        r.stderr.contains("user.max_user_namespaces") && r.stderr.contains("scripts = false"),
        "{}",
        r.stderr
    );
    let r = build("unpacked", body(", scripts = false"));
    assert!(r.ok, "{}", r.stderr);
}
