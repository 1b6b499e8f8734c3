//! Builds recipes/hello.toml from real Debian packages, checks every
//! artifact with the standard tools, boots it under QEMU/OVMF and reads
//! what the containers print on the serial console.

use kiln_tests::kiln::{self as k, container_lines};
use std::path::{Path, PathBuf};
use std::process::Command;

fn kiln() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

fn hello() -> PathBuf {
    k::workspace().join("recipes/hello.toml")
}

#[test]
fn hello_builds_validates_and_boots() {
    let out = k::scratch("hello");
    k::build(&kiln(), &hello(), &out);
    let image = out.join("hello.raw");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 256 << 20);
    // No temp files left next to the output.
    for e in std::fs::read_dir(&out).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "leftover {name}");
    }

    // GPT: valid, ESP, the two slots, data (A/B, the default layout).
    let parts = k::partitions(&image);
    let names: Vec<&str> = parts.iter().map(|p| p.4.as_str()).collect();
    assert_eq!(names, ["esp", "slot-a", "slot-b", "data"], "{parts:?}");

    // ESP: a FAT filesystem fsck accepts, booting kiln-boot (the chooser,
    // a UEFI application with no kernel in it).
    let esp = out.join("esp.img");
    k::extract_partition(&image, &parts[0], &esp);
    let fsck = k::run(Command::new("fsck.fat").arg("-n").arg(&esp));
    assert!(fsck.ok, "fsck.fat -n:\n{}{}", fsck.stdout, fsck.stderr);
    let chooser = out.join("BOOTX64.EFI");
    let m = k::run(
        Command::new("mcopy")
            .arg("-i")
            .arg(&esp)
            .arg("::/EFI/BOOT/BOOTX64.EFI")
            .arg(&chooser),
    );
    assert!(m.ok, "mcopy: {}", m.stderr);
    let what = k::run(Command::new("objdump").arg("-f").arg(&chooser));
    assert!(what.stdout.contains("pei-x86-64"), "{}", what.stdout);
    let sections = k::run(Command::new("objdump").arg("-h").arg(&chooser));
    assert!(!sections.stdout.contains(".linux"), "{}", sections.stdout);

    // Slot A: the UKI after the root, as its header says.
    let uki = out.join("slot-a.efi");
    let header = k::extract_slot_uki(&image, &parts[1], &uki);
    assert_eq!(
        (header.name.as_str(), header.version.as_str()),
        ("hello", "0.1.0")
    );
    let sections = k::run(Command::new("objdump").arg("-h").arg(&uki));
    for s in [".osrel", ".cmdline", ".uname", ".initrd", ".linux"] {
        assert!(
            sections.stdout.contains(s),
            "UKI lacks {s}:\n{}",
            sections.stdout
        );
    }

    // Root: squashfs that unsquashfs reads, with both containers and the config.
    let root = out.join("root.img");
    k::extract_partition(&image, &parts[1], &root);
    let ls = k::run(Command::new("unsquashfs").arg("-lln").arg(&root));
    assert!(ls.ok, "unsquashfs: {}", ls.stderr);
    for p in [
        "squashfs-root/kiln/config.json",
        "squashfs-root/containers/greet/rootfs/usr/bin/busybox",
        "squashfs-root/containers/hello/rootfs/usr/bin/busybox",
        "squashfs-root/containers/hello/rootfs/proc",
        "squashfs-root/etc/motd",
    ] {
        assert!(ls.stdout.contains(p), "root lacks {p}:\n{}", ls.stdout);
    }

    // dm-verity: the tree after the squashfs matches the root hash the
    // UKI's command line pins, as veritysetup reads it; one flipped byte
    // and it does not.
    let cmdline = out.join("cmdline");
    let c = k::run(
        Command::new("objcopy")
            .args(["-O", "binary", "--only-section=.cmdline"])
            .arg(&uki)
            .arg(&cmdline),
    );
    assert!(c.ok, "objcopy: {}", c.stderr);
    let cmdline = std::fs::read_to_string(&cmdline).unwrap();
    let root_hash = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("roothash="))
        .unwrap_or_else(|| panic!("no roothash= in {cmdline:?}"))
        .to_string();
    let mut bytes = std::fs::read(&root).unwrap();
    let squashfs_len = u64::from_le_bytes(bytes[40..48].try_into().unwrap());
    let hash_offset = squashfs_len.div_ceil(4096) * 4096;
    let verify = |file: &std::path::Path| {
        k::run(
            Command::new("veritysetup")
                .arg("verify")
                .arg(file)
                .arg(file)
                .arg(&root_hash)
                .arg(format!("--hash-offset={hash_offset}")),
        )
    };
    let v = verify(&root);
    assert!(v.ok, "veritysetup verify: {}{}", v.stdout, v.stderr);
    let bad = out.join("root-flipped.img");
    bytes[usize::try_from(squashfs_len / 2).unwrap()] ^= 1;
    std::fs::write(&bad, &bytes).unwrap();
    assert!(!verify(&bad).ok, "veritysetup accepted a flipped byte");
    drop(bytes);

    // dpkg's database lists what was installed, as dpkg-query reads it.
    let db = out.join("dpkg-db");
    let _ = std::fs::remove_dir_all(&db);
    let x = k::run(
        Command::new("unsquashfs")
            .arg("-d")
            .arg(&db)
            .arg(&root)
            .arg("containers/hello/rootfs/var/lib/dpkg"),
    );
    assert!(x.ok, "unsquashfs: {}", x.stderr);
    let q = k::run(
        Command::new("dpkg-query")
            .arg("--admindir")
            .arg(db.join("containers/hello/rootfs/var/lib/dpkg"))
            .args(["-W", "-f", "${Package} ${db:Status-Abbrev}\n"]),
    );
    assert!(q.ok, "dpkg-query: {}", q.stderr);
    assert_eq!(q.stdout.trim_end(), "busybox-static ii", "{}", q.stdout);

    // Boot: onboot runs first, the service is PID 1 of its own namespace,
    // sees its own hostname, a read-only root and Docker's capabilities;
    // then the host powers off by itself.
    let r = k::boot(&kiln(), &image, 300);
    let console = &r.stdout;
    assert!(
        r.code == Some(0),
        "guest did not power off cleanly:\n{console}\n{}",
        r.stderr
    );
    assert!(
        console.contains("kiln-init: result {\"failed_essential\":[]}"),
        "{console}"
    );
    let greet = container_lines(console, "greet");
    assert!(
        greet.contains(&"hello from an onboot container"),
        "{console}"
    );
    let svc = container_lines(console, "hello");
    assert!(
        svc.iter()
            .any(|l| l.starts_with("I am PID 1 in my own PID namespace, hostname hello")),
        "{console}"
    );
    assert!(
        svc.iter().any(|l| l.starts_with("Baked by kiln")),
        "{console}"
    );
    assert!(svc.contains(&"root is read-only"), "{console}");
    assert!(
        svc.iter()
            .any(|l| l.replace(['\t', ' '], "") == "CapEff:00000000a80425fb"),
        "{console}"
    );
    // The chooser booted slot A, the only one with an image.
    assert!(
        console.contains("kiln-boot: slot a (hello 0.1.0, good)"),
        "{console}"
    );
    assert!(
        console.contains("booted slot a; slots: a (hello 0.1.0): good; b (empty): no image"),
        "{console}"
    );
    // One flipped byte in the root's first block: dm-verity refuses the
    // mount, the slot is marked failed, and with no other slot to boot
    // the init says so and stops (no final report: kiln run exits 4).
    {
        let bad_disk = out.join("bad.raw");
        std::fs::copy(&image, &bad_disk).unwrap();
        k::flip_byte(&bad_disk, parts[1].1 * 512 + 2000);
        let r = k::boot_with(&kiln(), &bad_disk, 300, &["--net", "none"]);
        let c = &r.stdout;
        assert_eq!(r.code, Some(4), "{c}");
        assert!(c.contains("device-mapper: verity"), "{c}");
        assert!(
            c.contains("slot a marked failed; no other slot can boot")
                && c.contains("FATAL: slot a: mount")
                && c.contains("powering off in 5 seconds"),
            "{c}"
        );
        assert!(k::container_lines(c, "greet").is_empty(), "{c}");
    }
    let onboot_at = console.find("greet| hello").unwrap();
    let service_at = console.find("hello| I am PID").unwrap();
    assert!(onboot_at < service_at, "onboot ran after the service");
}

/// Every format hello.toml is built in, with the file each lands in.
const EVERY_FORMAT: &str = "raw,qcow2,vhd,vhd-dynamic,vmdk,gce,kernel+initrd,uki,iso";
const FORMAT_FILES: [&str; 11] = [
    "hello.raw",
    "hello.qcow2",
    "hello.vhd",
    "hello-dynamic.vhd",
    "hello.vmdk",
    "hello.tar.gz",
    "hello-kernel",
    "hello.efi",
    "hello.iso",
    "hello-initrd.img",
    "hello-cmdline",
];

/// Each format is what the standard tools accept and holds the raw disk
/// exactly (qemu-img check/info/compare, tar), and boots: QEMU's own
/// drivers read qcow2, both VHDs and the VMDK; GCE's tarball is unpacked
/// by kiln run; the kernel boots directly with its initrd, which holds the
/// root, and the UKI alone from an ESP kiln run makes for it; the ISO
/// from a CD-ROM (El Torito) and as a disk (its GPT), its root found by
/// volume id either way.
#[test]
fn every_format_checks_and_boots() {
    let out = k::scratch("formats");
    let r = k::run(
        Command::new(kiln())
            .args(["build", "--quiet", "--format", EVERY_FORMAT])
            .arg(hello())
            .arg("-o")
            .arg(&out),
    );
    assert!(r.ok, "kiln build --format: {}", r.stderr);
    let raw = out.join("hello.raw");
    let qemu_img = |args: &[&str]| {
        let r = k::run(Command::new("qemu-img").args(args));
        assert!(r.ok, "qemu-img {args:?}: {}{}", r.stdout, r.stderr);
        r.stdout
    };
    for (file, driver) in [
        ("hello.qcow2", "qcow2"),
        ("hello.vhd", "vpc"),
        ("hello-dynamic.vhd", "vpc"),
        ("hello.vmdk", "vmdk"),
    ] {
        let p = out.join(file);
        let p = p.to_str().unwrap();
        let info = qemu_img(&["info", "-f", driver, p]);
        assert!(
            info.contains("virtual size: 256 MiB (268435456 bytes)"),
            "{file}: {info}"
        );
        if driver != "vpc" {
            assert!(
                qemu_img(&["check", "-f", driver, p]).contains("No errors"),
                "{file}"
            );
        }
        let same = qemu_img(&[
            "compare",
            "-f",
            driver,
            "-F",
            "raw",
            p,
            raw.to_str().unwrap(),
        ]);
        assert!(same.contains("identical"), "{file}: {same}");
    }
    let vmdk = std::fs::read(out.join("hello.vmdk")).unwrap();
    assert!(String::from_utf8_lossy(&vmdk[512..1024]).contains("createType=\"streamOptimized\""));
    let list = k::run(
        Command::new("tar")
            .arg("-tvzf")
            .arg(out.join("hello.tar.gz")),
    );
    assert!(
        list.ok && list.stdout.trim_end().ends_with("disk.raw"),
        "{}",
        list.stdout
    );
    assert!(list.stdout.contains("268435456"), "{}", list.stdout);
    let sections = k::run(Command::new("objdump").arg("-h").arg(out.join("hello.efi")));
    for s in [".osrel", ".cmdline", ".uname", ".initrd", ".linux"] {
        assert!(
            sections.stdout.contains(s),
            "UKI lacks {s}:\n{}",
            sections.stdout
        );
    }
    assert_eq!(
        std::fs::read_to_string(out.join("hello-cmdline")).unwrap(),
        "console=ttyS0 loglevel=4\n"
    );
    let iso = out.join("hello.iso");
    let report = k::run(
        Command::new("xorriso")
            .arg("-indev")
            .arg(&iso)
            .args(["-report_el_torito", "plain"]),
    );
    assert!(
        report
            .stdout
            .contains("El Torito boot img :   1  UEFI  y   none"),
        "{}{}",
        report.stdout,
        report.stderr
    );
    let sg = k::run(Command::new("sgdisk").arg("-v").arg(&iso));
    assert!(sg.stdout.contains("No problems found"), "{}", sg.stdout);
    let boots = FORMAT_FILES[1..9]
        .iter()
        .map(|f| (*f, &[][..]))
        .chain([("hello.iso", &["--as-disk"][..])]);
    for (file, args) in boots {
        let r = k::boot_with(&kiln(), &out.join(file), 300, args);
        assert!(
            r.code == Some(0)
                && container_lines(&r.stdout, "greet") == ["hello from an onboot container"],
            "{file} {args:?} did not boot:\n{}\n{}",
            r.stdout,
            r.stderr
        );
    }
    assert!(
        !std::env::temp_dir().read_dir().unwrap().flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("kiln-gce-") || name.starts_with("kiln-uki-")
        }),
        "kiln run left a temp disk behind"
    );
}

/// A build as an unprivileged user (nobody) produces the same bytes as one
/// as root, in every format: building needs no privileges, and outputs
/// are reproducible.
#[test]
fn unprivileged_build_is_identical() {
    if not_root() {
        eprintln!(
            "not root: cannot switch to uid 65534 here; the build itself already runs unprivileged"
        );
    }
    let a = k::scratch("repro-a");
    let r = k::run(
        Command::new(kiln())
            .args(["build", "--quiet", "--format", EVERY_FORMAT])
            .arg(hello())
            .arg("-o")
            .arg(&a),
    );
    assert!(r.ok, "kiln build: {}", r.stderr);

    // nobody needs its own readable copy of the recipe, cache and binary.
    let b = k::scratch("repro-b");
    let home = b.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let cache = b.join("cache");
    copy_dir(&k::shared_cache(), &cache);
    let bin = b.join("kiln");
    std::fs::copy(kiln(), &bin).unwrap();
    let recipe = b.join("hello.toml");
    std::fs::copy(hello(), &recipe).unwrap();
    // The same pins as the root build (its lock is beside the recipe).
    std::fs::copy(hello().with_extension("lock"), b.join("hello.lock")).unwrap();
    let outb = b.join("out");
    std::fs::create_dir_all(&outb).unwrap();
    chown_recursive(&b);

    let mut cmd = if not_root() {
        Command::new(&bin)
    } else {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&bin);
        c
    };
    let r = k::run(
        cmd.env("HOME", &home)
            .env_remove("XDG_CACHE_HOME")
            .args(["build", "--quiet", "--locked", "--format", EVERY_FORMAT])
            .arg(&recipe)
            .arg("-o")
            .arg(&outb)
            .arg("--cache")
            .arg(&cache),
    );
    assert!(r.ok, "unprivileged build failed:\n{}", r.stderr);
    for file in FORMAT_FILES {
        let ia = std::fs::read(a.join(file)).unwrap();
        let ib = std::fs::read(outb.join(file)).unwrap();
        assert!(ia == ib, "root and nobody builds of {file} differ");
    }

    // A configured image too: nobody runs the maintainer scripts itself
    // (its own subordinate ids, not root's cached result) and gets the
    // same bytes.
    if not_root() {
        return;
    }
    let nginx = k::workspace().join("recipes/nginx.toml");
    let na = a.join("nginx");
    k::build(&kiln(), &nginx, &na);
    let recipe = b.join("nginx.toml");
    std::fs::copy(&nginx, &recipe).unwrap();
    std::fs::copy(nginx.with_extension("lock"), b.join("nginx.lock")).unwrap();
    // The same cache again, with what the root nginx build added: one copy
    // of the shared cache is big enough for a CI disk.
    copy_dir(&k::shared_cache(), &cache);
    let _ = std::fs::remove_dir_all(cache.join("refs/configured"));
    let outn = b.join("out-nginx");
    std::fs::create_dir_all(&outn).unwrap();
    chown_recursive(&b);
    let r = k::run(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&bin)
            .env("HOME", &home)
            .env_remove("XDG_CACHE_HOME")
            .args(["build", "--quiet", "--locked"])
            .arg(&recipe)
            .arg("-o")
            .arg(&outn)
            .arg("--cache")
            .arg(&cache),
    );
    assert!(r.ok, "unprivileged nginx build failed:\n{}", r.stderr);
    assert!(
        std::fs::read_dir(cache.join("refs/configured")).is_ok_and(|mut d| d.next().is_some()),
        "nobody's build did not configure the image itself"
    );
    let ia = std::fs::read(na.join("nginx.raw")).unwrap();
    let ib = std::fs::read(outn.join("nginx.raw")).unwrap();
    assert!(ia == ib, "root and nobody builds of nginx.toml differ");
}

/// With a lock and a warm cache a build needs no network: it runs in a
/// network namespace with no interfaces and gives the same bytes. Without
/// a lock it needs the archive's index and says why it cannot get it,
/// unless `--offline` lets it reuse the index verified last.
#[test]
fn locked_build_needs_no_network() {
    let dir = k::scratch("offline");
    let recipe = dir.join("hello.toml");
    std::fs::copy(hello(), &recipe).unwrap();
    let online = dir.join("online");
    k::build(&kiln(), &recipe, &online);
    let lock = std::fs::read_to_string(dir.join("hello.lock")).expect("build wrote a lock");
    assert!(lock.contains("source_date_epoch = "), "{lock}");
    assert!(lock.contains("[[image]]"), "{lock}");

    let no_net = |args: &[&str], out: &Path| {
        let mut c = Command::new("unshare");
        c.arg(if not_root() { "-rn" } else { "-n" })
            .arg(kiln())
            .args(["build", "--quiet"])
            .args(args)
            .arg(&recipe)
            .arg("-o")
            .arg(out)
            .arg("--cache")
            .arg(k::shared_cache());
        k::run(&mut c)
    };
    let offline = dir.join("offline");
    let r = no_net(&["--locked"], &offline);
    assert!(r.ok, "locked build without network failed:\n{}", r.stderr);
    let a = std::fs::read(online.join("hello.raw")).unwrap();
    let b = std::fs::read(offline.join("hello.raw")).unwrap();
    assert!(a == b, "the offline build differs from the online one");

    std::fs::remove_file(dir.join("hello.lock")).unwrap();
    let r = no_net(&[], &dir.join("no-lock"));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("dns error") || r.stderr.contains("resolv"),
        "the cause is not shown:\n{}",
        r.stderr
    );
    let r = no_net(&["--offline"], &dir.join("no-lock-offline"));
    assert!(r.ok, "--offline build failed:\n{}", r.stderr);
}

fn not_root() -> bool {
    k::run(Command::new("id").arg("-u")).stdout.trim() != "0"
}

/// Copies a cache into `to`, keeping what `to` already holds. Other tests
/// write to the shared cache meanwhile: files that vanish under cp (temps,
/// sandbox trees) make it complain harmlessly.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let r = k::run(Command::new("cp").arg("-an").arg(from.join(".")).arg(to));
    assert!(to.join("sha256").is_dir(), "cp: {}", r.stderr);
    let _ = std::fs::remove_dir_all(to.join("configure"));
}

fn chown_recursive(dir: &Path) {
    if not_root() {
        return;
    }
    let r = k::run(Command::new("chown").args(["-R", "65534:65534"]).arg(dir));
    assert!(r.ok, "chown: {}", r.stderr);
    // The scratch dir's parents must be traversable by nobody.
    let mut p = dir.parent();
    while let Some(d) = p {
        let _ = k::run(Command::new("chmod").arg("o+x").arg(d));
        p = d.parent();
    }
}

/// nginx from Debian packages with no workaround in the recipe: configured
/// as apt would (users, default site, dpkg's database), served on a
/// read-only root with tmpfs state, fetched over loopback by a second
/// container.
#[test]
fn nginx_serves_its_default_page() {
    let dir = k::scratch("nginx");
    let recipe = k::workspace().join("recipes/nginx.toml");
    let out = dir.join("out");
    k::build(&kiln(), &recipe, &out);
    let image = out.join("nginx.raw");

    let parts = k::partitions(&image);
    let root = out.join("root.img");
    k::extract_partition(&image, &parts[1], &root);
    let x = out.join("x");
    let _ = std::fs::remove_dir_all(&x);
    let r = k::run(
        Command::new("unsquashfs")
            .arg("-d")
            .arg(&x)
            .arg(&root)
            .arg("containers/web/rootfs/etc")
            .arg("containers/web/rootfs/var/lib/dpkg"),
    );
    assert!(r.ok, "unsquashfs: {}", r.stderr);
    let rootfs = x.join("containers/web/rootfs");
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    for user in ["root:x:0:0:", "www-data:x:33:33:", "nobody:x:65534:65534:"] {
        assert!(passwd.contains(user), "{user} not in:\n{passwd}");
    }
    let shadow = std::fs::read_to_string(rootfs.join("etc/shadow")).unwrap();
    assert!(shadow.contains("www-data:*:"), "{shadow}");
    assert!(
        std::fs::symlink_metadata(rootfs.join("etc/nginx/sites-enabled/default")).is_ok(),
        "nginx's postinst did not enable the default site"
    );
    // Every package of the closure is installed, as dpkg-query reads it.
    let plan = k::read_json(&out.join("nginx.plan.json"));
    let web = plan["image"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["container"] == "web"))
        .expect("web in the plan");
    let mut pinned: Vec<String> = web["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| p["name"].as_str().unwrap_or_default().to_string())
        .collect();
    pinned.sort();
    let q = k::run(
        Command::new("dpkg-query")
            .arg("--admindir")
            .arg(rootfs.join("var/lib/dpkg"))
            .args(["-W", "-f", "${Package} ${db:Status-Abbrev}\\n"]),
    );
    assert!(q.ok, "dpkg-query: {}", q.stderr);
    let mut installed: Vec<String> = q
        .stdout
        .lines()
        .map(|l| {
            // Status-Abbrev is three columns: want, status, error (blank).
            assert!(l.ends_with(" ii "), "{l:?}");
            l.split(' ').next().unwrap_or_default().to_string()
        })
        .collect();
    installed.sort();
    assert_eq!(installed, pinned);
    assert!(pinned.iter().any(|p| p == "nginx") && pinned.iter().any(|p| p == "dash"));

    let console = k::boot_until(&kiln(), &image, 300, |l| {
        l.starts_with("probe| ") || l.contains("probe: exited")
    });
    assert!(
        console.contains("probe| <title>Welcome to nginx!</title>"),
        "{console}"
    );
}

/// Python's http.server and PostgreSQL from Debian packages: each built
/// from its recipe and asked over loopback by a second container (the
/// database initialised at first start into its tmpfs, with the socket
/// directory its tmpfiles.d asks for).
#[test]
fn python_and_postgres_answer() {
    for (recipe, image, line) in [
        (
            "python-http.toml",
            "python-http.raw",
            "probe| <title>Directory listing for /</title>",
        ),
        ("postgres.toml", "postgres.raw", "client| 1"),
    ] {
        let out = k::scratch(&format!("answer-{recipe}"));
        k::build(&kiln(), &k::workspace().join("recipes").join(recipe), &out);
        if recipe == "postgres.toml" {
            // The recipe's file reached the scripts: no cluster was baked.
            let parts = k::partitions(&out.join(image));
            let root = out.join("root.img");
            k::extract_partition(&out.join(image), &parts[1], &root);
            let ls = k::run(Command::new("unsquashfs").arg("-lln").arg(&root));
            assert!(ls.ok, "unsquashfs: {}", ls.stderr);
            assert!(
                ls.stdout
                    .contains("rootfs/etc/postgresql-common/createcluster.d/kiln.conf")
                    && !ls.stdout.contains("rootfs/var/lib/postgresql/17"),
                "{}",
                ls.stdout
            );
            // Configured again from scratch, the same bytes: the scripts'
            // per-host secrets (ssl-cert's snakeoil key) are not kept.
            assert!(
                !ls.stdout.contains("ssl-cert-snakeoil"),
                "a generated key is in the image"
            );
            let cache = out.join("cache");
            let _ = std::fs::remove_dir_all(&cache);
            let r = k::run(
                Command::new("cp")
                    .arg("-al")
                    .arg(k::shared_cache())
                    .arg(&cache),
            );
            assert!(cache.join("sha256").is_dir(), "cp: {}", r.stderr);
            let _ = std::fs::remove_dir_all(cache.join("refs/configured"));
            let _ = std::fs::remove_dir_all(cache.join("configure"));
            let again = out.join("again");
            let r = k::run(
                Command::new(kiln())
                    .args(["build", "--quiet", "--locked"])
                    .arg(k::workspace().join("recipes").join(recipe))
                    .arg("-o")
                    .arg(&again)
                    .arg("--cache")
                    .arg(&cache),
            );
            assert!(r.ok, "{}", r.stderr);
            assert!(
                std::fs::read(out.join(image)).unwrap()
                    == std::fs::read(again.join(image)).unwrap(),
                "postgres.toml configured twice differs"
            );
            let _ = std::fs::remove_dir_all(&cache);
        }
        let console = k::boot_until(&kiln(), &out.join(image), 300, |l| {
            l.starts_with("probe| ") || l.starts_with("client| ") || l.contains(": exited")
        });
        assert!(console.contains(line), "{recipe}:\n{console}");
    }
}

/// Restart policies: `on-failure` restarts a failing service with growing
/// delays until `max_restarts`, then gives up; `never` runs once; a service
/// that exits 0 is done. The machine powers off once nothing will run
/// again, and `kiln run` exits 3 naming the failed essential container.
#[test]
fn restart_policies_and_the_run_result() {
    let dir = k::scratch("restart");
    let recipe = dir.join("restart.toml");
    let bb = "image = { debian = [\"busybox-static\"], scripts = false }";
    std::fs::write(
        &recipe,
        format!(
            "name = \"restart\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\ncmdline = \"console=ttyS0 loglevel=4\"\n\
             [[service]]\nname = \"crash\"\n{bb}\nmax_restarts = 2\ncommand = [\"/bin/busybox\", \"sh\", \"-c\", \"echo attempt; exit 1\"]\n\
             [[service]]\nname = \"once\"\n{bb}\nrestart = \"never\"\nessential = false\ncommand = [\"/bin/busybox\", \"sh\", \"-c\", \"echo ran; exit 2\"]\n\
             [[service]]\nname = \"fine\"\n{bb}\ncommand = [\"/bin/busybox\", \"sh\", \"-c\", \"echo done\"]\n\
             [[service]]\nname = \"segv-init\"\n{bb}\ninit = true\nrestart = \"never\"\nessential = false\ncommand = [\"/bin/busybox\", \"sh\", \"-c\", \"kill -SEGV $$; echo survived\"]\n\
             [[service]]\nname = \"segv-pid1\"\n{bb}\nrestart = \"never\"\nessential = false\ncommand = [\"/bin/busybox\", \"sh\", \"-c\", \"kill -SEGV $$; echo survived\"]\n\
             [[onshutdown]]\nname = \"report\"\n{bb}\nbinds = [\"/run/kiln/state/status.json:/run/status.json:ro\"]\ncommand = [\"/bin/busybox\", \"cat\", \"/run/status.json\"]\n\
             [host]\nwhen_done = \"poweroff\"\n[disk]\nsize = \"256M\"\n"
        ),
    )
    .unwrap();
    let out = dir.join("out");
    k::build(&kiln(), &recipe, &out);
    let r = k::boot(&kiln(), &out.join("restart.raw"), 300);
    let console = &r.stdout.replace('\r', "");
    assert_eq!(r.code, Some(3), "{console}\n{}", r.stderr);
    assert!(
        r.stderr.contains("failed essential containers: crash\n"),
        "{}",
        r.stderr
    );
    assert_eq!(
        k::container_lines(console, "crash"),
        ["attempt"; 3],
        "{console}"
    );
    assert_eq!(k::container_lines(console, "once"), ["ran"], "{console}");
    assert_eq!(k::container_lines(console, "fine"), ["done"], "{console}");
    // SIGSEGV to itself: with the reaper as PID 1 the shell dies of it; as
    // PID 1 of its namespace it has no handler, so the signal is ignored.
    assert!(
        k::container_lines(console, "segv-init").is_empty(),
        "{console}"
    );
    assert!(
        console.contains("segv-init: exited with status 139\n"),
        "{console}"
    );
    assert_eq!(
        k::container_lines(console, "segv-pid1"),
        ["survived"],
        "{console}"
    );
    for log in [
        "crash: exited with status 1; restart 1 in 100ms",
        "crash: exited with status 1; restart 2 in 200ms",
        "crash: exited with status 1; not restarted: 2 restarts in a row",
        "once: exited with status 2\n",
        "fine: exited with status 0\n",
        "kiln-init: result {\"failed_essential\":[\"crash\"]}",
    ] {
        assert!(console.contains(log), "{log:?} not in:\n{console}");
    }
    // The status file, as a container reads it through its bind.
    let report = k::container_lines(console, "report");
    assert_eq!(report.len(), 1, "{console}");
    let status: serde_json::Value = serde_json::from_str(report[0]).unwrap();
    let unit = |name: &str| {
        status["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in {status}"))
            .clone()
    };
    let crash = unit("crash");
    assert_eq!(
        (&crash["state"], &crash["restarts"], &crash["last_exit"]),
        (
            &serde_json::json!("exited"),
            &serde_json::json!(2),
            &serde_json::json!({"code": 1})
        ),
        "{status}"
    );
    assert_eq!(unit("once")["last_exit"], serde_json::json!({"code": 2}));
    assert_eq!(unit("once")["essential"], serde_json::json!(false));
    assert_eq!(unit("fine")["state"], serde_json::json!("exited"));
    let me = unit("report");
    assert_eq!(
        (&me["state"], &me["kind"]),
        (
            &serde_json::json!("running"),
            &serde_json::json!("onshutdown")
        )
    );
    assert!(me["pid"].as_i64().is_some_and(|p| p > 1), "{status}");
    assert_eq!(status["stopping"], serde_json::json!(false));
}

/// With a terminal on stdin, `kiln run` attaches the guest's console: it
/// says so, Ctrl-A X stops the guest at once (exit 130, no QEMU left),
/// and the terminal's modes are as they were. The same boot reads an
/// OpenStack config drive on a FAT volume (`--disk`).
#[test]
fn interactive_console_quits_on_ctrl_a_x() {
    use std::io::{BufRead, Write};
    use std::os::unix::process::CommandExt;
    let dir = k::scratch("console");
    let recipe = dir.join("console.toml");
    std::fs::write(
        &recipe,
        "name = \"console\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\ncmdline = \"console=ttyS0 loglevel=4\"\n\
         [[service]]\nname = \"sleeper\"\nimage = { debian = [\"busybox-static\"], scripts = false }\n\
         binds = [\"/run/config:/config:ro\"]\n\
         command = [\"/bin/busybox\", \"sh\", \"-c\", \"cd /config && busybox cat provider hostname ssh/authorized_keys app/motd; echo waiting; exec busybox sleep 600\"]\n[disk]\nsize = \"256M\"\n",
    )
    .unwrap();
    // A config-2 drive as FAT, made by the standard tools.
    let drive = dir.join("config-2.img");
    let _ = std::fs::remove_file(&drive);
    let made = k::run(
        Command::new("mkfs.vfat")
            .args(["-C", "-n", "config-2"])
            .arg(&drive)
            .arg("2048"),
    );
    assert!(made.ok, "mkfs.vfat: {}", made.stderr);
    for d in ["openstack", "openstack/latest"] {
        k::run(
            Command::new("mmd")
                .arg("-i")
                .arg(&drive)
                .arg(format!("::/{d}")),
        );
    }
    for (name, text) in [
        (
            "meta_data.json",
            r#"{"hostname": "fat-host.example", "public_keys": {"k": "ssh-ed25519 AAAAfat fat@kiln"}}"#,
        ),
        (
            "user_data",
            r#"{"app": {"motd": {"content": "from a FAT drive\n"}}}"#,
        ),
    ] {
        let src = dir.join(name);
        std::fs::write(&src, text).unwrap();
        let c = k::run(
            Command::new("mcopy")
                .arg("-i")
                .arg(&drive)
                .arg(&src)
                .arg(format!("::/openstack/latest/{name}")),
        );
        assert!(c.ok, "mcopy: {}", c.stderr);
    }
    let out = dir.join("out");
    k::build(&kiln(), &recipe, &out);
    let image = out.join("console.raw");
    // `script` gives kiln a terminal; the shell around it shows the
    // terminal's modes before and after.
    let inner = format!(
        "stty -g; '{}' run '{}' --disk '{}' --timeout 300; echo exit=$?; stty -g",
        kiln().display(),
        image.display(),
        drive.display()
    );
    let mut child = Command::new("script")
        .args(["-qfec", &inner, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .expect("script (util-linux)");
    let mut keys = child.stdin.take().unwrap();
    let mut text = String::new();
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        let line = line.replace('\r', "");
        if line == "sleeper| waiting" {
            keys.write_all(b"\x01x").unwrap();
        }
        text.push_str(&line);
        text.push('\n');
    }
    let _ = child.wait();
    assert!(
        text.contains("kiln: console attached (Ctrl-A X quits)"),
        "{text}"
    );
    assert!(
        text.contains("kiln: quit (Ctrl-A X): guest stopped"),
        "{text}"
    );
    assert!(text.contains("exit=130"), "{text}");
    assert_eq!(
        container_lines(&text, "sleeper"),
        [
            "nocloud",
            "fat-host",
            "ssh-ed25519 AAAAfat fat@kiln",
            "from a FAT drive",
            "waiting"
        ],
        "{text}"
    );
    let modes: Vec<&str> = text
        .lines()
        .filter(|l| l.len() > 20 && l.bytes().all(|b| b == b':' || b.is_ascii_hexdigit()))
        .collect();
    assert_eq!(modes.len(), 2, "{text}");
    assert_eq!(modes[0], modes[1], "terminal modes not restored:\n{text}");
    let ps = k::run(Command::new("pgrep").arg("-f").arg(image.to_str().unwrap()));
    assert!(
        ps.stdout.trim().is_empty(),
        "QEMU still runs: {}",
        ps.stdout
    );
}

/// SIGTERM to `kiln run` shuts the guest down through its power button:
/// services stop in reverse order, each with its stop signal and, past
/// its `stop_timeout`, SIGKILL; then the onshutdown containers run; QEMU
/// and kiln's temp files are gone afterwards.
#[test]
fn graceful_shutdown_on_sigterm() {
    use std::io::BufRead;
    let dir = k::scratch("shutdown");
    let recipe = dir.join("shutdown.toml");
    let bb = "image = { debian = [\"busybox-static\"], scripts = false }";
    let service = |name: &str, trap: &str, extra: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\n{bb}\n{extra}command = [\"/bin/busybox\", \"sh\", \"-c\", \"{trap}; echo up; while :; do sleep 1; done\"]\n"
        )
    };
    std::fs::write(
        &recipe,
        format!(
            "name = \"shutdown\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\ncmdline = \"console=ttyS0 loglevel=4\"\n{}{}{}\
             [[onshutdown]]\nname = \"bye\"\n{bb}\ncommand = [\"/bin/busybox\", \"echo\", \"goodbye\"]\n[disk]\nsize = \"256M\"\n",
            service("a", "trap 'echo got TERM; exit 0' TERM", ""),
            service("b", "trap 'echo got USR1; exit 0' USR1", "stop_signal = \"SIGUSR1\"\n"),
            service("stubborn", "trap '' TERM", "stop_timeout = \"1s\"\n"),
        ) + &service("fwd", "trap 'echo forwarded; exit 0' TERM", "init = true\n")
            // A system container: busybox's init reads the inittab below
            // (no /bin/sh in this image: commands without shell syntax),
            // and powers its namespace off on SIGUSR2.
            + &format!("[[service]]\nname = \"sys\"\n{bb}\ninit = \"image\"\ncommand = [\"/bin/busybox\", \"init\"]\n")
            // Restarted whatever its status, with growing delays.
            + &format!("[[service]]\nname = \"again\"\n{bb}\nrestart = \"always\"\ncommand = [\"/bin/busybox\", \"echo\", \"again\"]\n")
            + "[[file]]\ncontainer = \"sys\"\npath = \"/etc/inittab\"\ncontents = \"::sysinit:/bin/busybox echo system booted\\n::once:/bin/busybox echo up\\n::respawn:/bin/busybox sleep 1000\\n::shutdown:/bin/busybox echo system stopping\\n\"\n",
    )
    .unwrap();
    let out = dir.join("out");
    k::build(&kiln(), &recipe, &out);
    let image = out.join("shutdown.raw");
    let mut child = Command::new(kiln())
        .arg("run")
        .arg(&image)
        .args(["--timeout", "300"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut console = String::new();
    let mut up = 0;
    for line in lines.by_ref() {
        let line = line.unwrap().replace('\r', "");
        if line.ends_with("| up") {
            up += 1;
        }
        console.push_str(&line);
        console.push('\n');
        if up == 5 && console.contains("again: exited with status 0; restart 3 in 400ms") {
            break;
        }
    }
    assert_eq!(up, 5, "{console}");
    let sent = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    for line in lines.map_while(Result::ok) {
        console.push_str(&line.replace('\r', ""));
        console.push('\n');
    }
    let status = child.wait().unwrap();
    let _ = std::fs::write(image.with_extension("console.log"), &console);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(143), "{console}\n{stderr}");
    let at = |needle: &str| {
        console
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in:\n{console}"))
    };
    // `always` restarts a clean exit too, doubling the delay each time.
    assert!(
        at("again: exited with status 0; restart 1 in 100ms")
            < at("again: exited with status 0; restart 2 in 200ms")
    );
    let order = [
        at("sys| system booted"),
        at("power button: shutting down"),
        at("sys: stopping with SIGUSR2"),
        at("sys| system stopping"),
        at("sys: killed by signal 2"),
        // Through the reaper: its PID 1 forwards the signal to the shell.
        at("fwd| forwarded"),
        at("stubborn: stopping with SIGTERM"),
        at("stubborn: still running after 1000ms; killing"),
        at("b| got USR1"),
        at("a| got TERM"),
        at("bye| goodbye"),
        at("kiln-init: result {\"failed_essential\":[]}"),
    ];
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "out of order:\n{console}"
    );
    // Nothing left behind: no QEMU for this image, no temp file.
    let ps = k::run(Command::new("pgrep").arg("-f").arg(image.to_str().unwrap()));
    assert!(
        ps.stdout.trim().is_empty(),
        "QEMU still runs: {}",
        ps.stdout
    );
    let tmp = std::env::temp_dir();
    for name in [
        format!("kiln-ovmf-vars-{pid}.fd"),
        format!("kiln-qmp-{pid}.sock"),
    ] {
        assert!(
            !tmp.join(&name).exists(),
            "{name} left in {}",
            tmp.display()
        );
    }
}

/// `depends_on` waits for readiness, by each probe kind (a TCP listener,
/// a file, a command run in the container); once essential containers
/// have been ready for `healthy_after`, the init records the run healthy.
#[test]
fn dependencies_wait_for_readiness() {
    let dir = k::scratch("ready");
    let recipe = dir.join("ready.toml");
    let bb = "image = { debian = [\"busybox-static\"], scripts = false }";
    let service = |name: &str, extra: &str, script: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\n{bb}\n{extra}command = [\"/bin/busybox\", \"sh\", \"-c\", \"{script}\"]\n"
        )
    };
    std::fs::write(
        &recipe,
        format!(
            "name = \"ready\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\ncmdline = \"console=ttyS0 loglevel=4\"\n{}{}{}{}[host]\nhealthy_after = \"2s\"\n[disk]\nsize = \"256M\"\n",
            service(
                "web",
                "depends_on = [\"db\", \"cache\", \"check\"]\nbinds = [\"/run/kiln/state/status.json:/run/status.json:ro\", \"/run/kiln/state/health:/run/health:ro\"]\n",
                "echo started; busybox cat /run/status.json; while ! busybox grep -q healthy /run/health; do busybox sleep 0.5; done; busybox cat /run/health; busybox sleep 1000",
            ),
            service(
                "db",
                "ready = { tcp = 7000 }\n",
                "busybox sleep 2; echo listening; exec busybox nc -l -p 7000",
            ),
            service(
                "cache",
                "ready = { file = \"/run/ready\" }\n",
                "busybox sleep 2; echo made-file; busybox touch /run/ready; exec busybox sleep 1000",
            ),
            service(
                "check",
                // In its own user namespace: the probe joins that too.
                "userns = true\nready = { exec = [\"/bin/busybox\", \"test\", \"-e\", \"/tmp/ok\"] }\n",
                "busybox sleep 2; echo made-ok; busybox touch /tmp/ok; exec busybox sleep 1000",
            ),
        ),
    )
    .unwrap();
    let out = dir.join("out");
    k::build(&kiln(), &recipe, &out);
    let console = k::boot_until(&kiln(), &out.join("ready.raw"), 300, |l| {
        l.starts_with("web| healthy") || l.contains(": exited")
    })
    .replace('\r', "");
    let at = |needle: &str| {
        console
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in:\n{console}"))
    };
    assert!(at("web: waiting for db, cache, check") < at("db| listening"));
    for (made, ready) in [
        ("db| listening", "db: ready"),
        ("cache| made-file", "cache: ready"),
        ("check| made-ok", "check: ready"),
    ] {
        assert!(at(made) < at(ready), "{made} after {ready}:\n{console}");
        assert!(
            at(ready) < at("web| started"),
            "web before {ready}:\n{console}"
        );
    }
    // What web saw when it started: its dependencies ready.
    let status = k::container_lines(&console, "web")[1];
    let status: serde_json::Value = serde_json::from_str(status).unwrap();
    for c in status["containers"].as_array().unwrap() {
        if c["name"] != "web" {
            assert_eq!(c["ready"], serde_json::json!(true), "{status}");
        }
    }
    assert!(at("web| started") < at("healthy: essential containers ready for 2000ms"));
    assert!(at("web| healthy ") > 0);
}

/// Resources as intent: pids and memory limits hold inside their own
/// cgroup while a neighbour runs on, a critical service gets far more CPU
/// than a batch one under contention, and each sees its settings.
#[test]
fn resources_hold() {
    let dir = k::scratch("resources");
    let recipe = dir.join("resources.toml");
    let bb = "image = { debian = [\"busybox-static\"], scripts = false }";
    let service = |name: &str, extra: &str, script: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\n{bb}\nrestart = \"never\"\n{extra}command = [\"/bin/busybox\", \"sh\", \"-c\", \"{script}\"]\n"
        )
    };
    // Long enough to cover the judge's window however slowly the batch
    // one starts (its setup runs at its low weight).
    let spin = "read adj < /proc/self/oom_score_adj; echo adj $adj; busybox sh -c 'while :; do :; done' & busybox sleep 25; kill $!";
    std::fs::write(
        &recipe,
        format!(
            "name = \"resources\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\ncmdline = \"console=ttyS0 loglevel=4\"\n{}{}{}{}{}{}[host]\nwhen_done = \"poweroff\"\n[disk]\nsize = \"256M\"\n",
            // Forks until refused (the subshell dies of it); then only
            // builtins, which need no fork.
            service(
                "bomb",
                "pids = 16\n",
                "(i=0; while [ $i -lt 40 ]; do busybox sleep 3 & i=$((i+1)); done) 2>/dev/null; read cur < /sys/fs/cgroup/pids.current; read max < /sys/fs/cgroup/pids.max; read ev < /sys/fs/cgroup/pids.events; echo current $cur max $max; echo $ev",
            ),
            service(
                "hog",
                "memory = \"8M\"\nessential = false\n",
                "echo max $(busybox cat /sys/fs/cgroup/memory.max); busybox head -c 25165824 /dev/zero | busybox tail -c 25165824 >/dev/null; busybox grep oom_kill /sys/fs/cgroup/memory.events",
            ),
            service(
                "calm",
                "io_weight = 300\n",
                "busybox sleep 3; echo io $(busybox cat /sys/fs/cgroup/io.weight); echo still here",
            ),
            service("crit", "class = \"critical\"\n", spin),
            service("batch", "class = \"batch\"\n", spin),
            // CPU over 5 s while both spin, from their cgroups' cpu.stat.
            service(
                "judge",
                "depends_on = [\"crit\", \"batch\"]\nbinds = [\"/sys/fs/cgroup/kiln/crit/cpu.stat:/run/crit:ro\", \"/sys/fs/cgroup/kiln/batch/cpu.stat:/run/batch:ro\"]\n",
                "busybox sleep 1; read x c0 < /run/crit; read x b0 < /run/batch; busybox sleep 5; read x c1 < /run/crit; read x b1 < /run/batch; echo crit $((c1 - c0)) batch $((b1 - b0))",
            ),
        ),
    )
    .unwrap();
    let out = dir.join("out");
    k::build(&kiln(), &recipe, &out);
    let r = k::boot(&kiln(), &out.join("resources.raw"), 300);
    let console = r.stdout.replace('\r', "");
    assert_eq!(r.code, Some(0), "{console}\n{}", r.stderr);
    let lines = |name: &str| k::container_lines(&console, name);
    // The fork bomb was held at 16 processes, forks refused.
    let bomb = lines("bomb");
    let current: u32 = bomb
        .first()
        .and_then(|l| l.strip_prefix("current "))
        .and_then(|l| l.strip_suffix(" max 16"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{console}"));
    assert!((10..=16).contains(&current), "{console}");
    let refused: u32 = bomb
        .get(1)
        .and_then(|l| l.strip_prefix("max "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(refused > 0, "{console}");
    // The hog was OOM-killed in its cgroup; its neighbour ran on.
    assert_eq!(lines("hog").first(), Some(&"max 8388608"), "{console}");
    assert!(
        lines("hog")
            .iter()
            .any(|l| l.starts_with("oom_kill ") && *l != "oom_kill 0"),
        "{console}"
    );
    assert_eq!(lines("calm"), ["io default 300", "still here"], "{console}");
    // CPU under contention: critical at least 4x batch.
    let judged: Vec<u64> = lines("judge")
        .first()
        .map(|l| l.split(' ').filter_map(|w| w.parse().ok()).collect())
        .unwrap_or_default();
    let [crit, batch] = judged[..] else {
        panic!("{console}")
    };
    assert!(
        crit >= 4 * batch,
        "critical {crit} us, batch {batch} us\n{console}"
    );
    assert!(
        lines("crit").contains(&"adj -900") && lines("batch").contains(&"adj 1000"),
        "{console}"
    );
}

/// Hardening by default, as Docker's: the seccomp filter is on and refuses
/// user namespaces and the kernel keyring (and the same calls pass with
/// `seccomp = "unconfined"`, so the filter is what refuses them),
/// /proc/kcore is masked, and capabilities follow `add` and `drop`.
#[test]
fn hardening_defaults() {
    let dir = k::scratch("hardening");
    let recipe = dir.join("hardening.toml");
    let image = "image = { debian = [\"busybox-static\", \"keyutils\"], scripts = false }";
    let probe = "busybox grep Seccomp: /proc/self/status; busybox unshare -U true 2>&1 || echo unshare-refused; keyctl add user k v @s 2>&1 || echo add_key-refused; echo kcore $(busybox wc -c < /proc/kcore); busybox grep CapEff /proc/self/status; busybox mknod /tmp/n c 1 3 2>&1 && echo mknod-ok";
    // Root in its own user namespace: host ids from 100000 (65534 is the
    // unmapped host root), its capabilities of no use on the host's objects.
    let remapped = "busybox cat /proc/self/uid_map /proc/self/gid_map; echo uid $(busybox id -u) owner $(busybox stat -c %u /bin/busybox); busybox mknod /tmp/n c 1 3 2>&1 || echo mknod-refused; busybox grep CapEff /proc/self/status; echo classes $(busybox ls /sys/class | busybox wc -l)";
    let service = |name: &str, extra: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\n{image}\n{extra}command = [\"/bin/busybox\", \"sh\", \"-c\", \"{probe}\"]\n"
        )
    };
    std::fs::write(
        &recipe,
        format!(
            "name = \"hardening\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\ncmdline = \"console=ttyS0 loglevel=4\"\n{}{}{}[host]\nwhen_done = \"poweroff\"\n[disk]\nsize = \"320M\"\n",
            service("confined", ""),
            service("unconfined", "seccomp = \"unconfined\"\n"),
            service("caps", "capabilities = { add = [\"NET_ADMIN\"], drop = [\"CHOWN\"] }\n"),
        ) + &format!(
            "[[service]]\nname = \"tuned\"\n{image}\nnet = \"none\"\nsysctl = {{ \"net.core.somaxconn\" = \"1024\", \"kernel.shmmni\" = 2048 }}\nrlimits = {{ nofile = 1000, core = \"0:unlimited\" }}\n\
             command = [\"/bin/busybox\", \"sh\", \"-c\", \"busybox cat /proc/sys/net/core/somaxconn /proc/sys/kernel/shmmni; echo nofile $(ulimit -n) core $(ulimit -c) $(ulimit -H -c)\"]\n"
        ) + &format!(
            "[[service]]\nname = \"remapped\"\n{image}\nuserns = true\nrlimits = {{ nofile = 100000 }}\ncommand = [\"/bin/busybox\", \"sh\", \"-c\", \"{remapped}; echo nofile $(ulimit -n)\"]\n\
             [[service]]\nname = \"remapped2\"\n{image}\nuserns = true\nnet = \"none\"\ncommand = [\"/bin/busybox\", \"sh\", \"-c\", \"{remapped}\"]\n\
             [[service]]\nname = \"remapped3\"\n{image}\nuserns = true\nnet = \"bridge\"\ncommand = [\"/bin/busybox\", \"sh\", \"-c\", \"{remapped}; busybox ip -4 -o addr show dev eth0 | busybox awk '{{print $4}}'\"]\n\
             [[service]]\nname = \"cfg\"\n{image}\nbinds = [\"/run/config:/config:ro\"]\ncommand = [\"/bin/busybox\", \"sh\", \"-c\", \"cd /config && busybox cat provider hostname ssh/authorized_keys userdata; busybox sleep 3; echo v6 $(busybox ip -6 addr show dev eth0 | busybox wc -l) $(busybox cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6)\"]\n\
             [network]\nipv6 = false\n"
        ),
    )
    .unwrap();
    let out = dir.join("out");
    k::build(&kiln(), &recipe, &out);
    // A NoCloud config drive, as cloud-localds makes it (an ISO labelled
    // cidata, written here by xorriso).
    let drive = dir.join("drive");
    std::fs::create_dir_all(&drive).unwrap();
    std::fs::write(
        drive.join("meta-data"),
        "instance-id: i-42\nlocal-hostname: drive-host\npublic-keys:\n  - ssh-ed25519 AAAAdrive test@iso\n",
    )
    .unwrap();
    std::fs::write(drive.join("user-data"), "from the config drive\n").unwrap();
    let iso = dir.join("cidata.iso");
    let made = Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-V", "cidata", "-J", "-r", "-o"])
        .arg(&iso)
        .arg(&drive)
        .status()
        .expect("xorriso (scripts/install-deps.sh installs it)");
    assert!(made.success());
    let r = k::boot_with(
        &kiln(),
        &out.join("hardening.raw"),
        300,
        &["--disk", iso.to_str().unwrap()],
    );
    let console = r.stdout.replace('\r', "");
    assert_eq!(r.code, Some(0), "{console}\n{}", r.stderr);
    let lines = |name: &str| k::container_lines(&console, name).join("\n");
    let confined = lines("confined");
    for want in [
        "mknod-ok",
        "Seccomp:\t2",
        "Operation not permitted\nunshare-refused",
        "add_key: Operation not permitted\nadd_key-refused",
        "kcore 0",
        "CapEff:\t00000000a80425fb",
    ] {
        assert!(confined.contains(want), "{want:?} not in:\n{confined}");
    }
    let unconfined = lines("unconfined");
    assert!(unconfined.contains("Seccomp:\t0"), "{unconfined}");
    assert!(
        !unconfined.contains("refused") && unconfined.lines().any(|l| l.parse::<u64>().is_ok()),
        "the calls failed without the filter:\n{unconfined}"
    );
    assert!(
        lines("caps").contains("CapEff:\t00000000a80435fa"),
        "{}",
        lines("caps")
    );
    // Namespaced sysctls and limits, seen from inside.
    assert_eq!(
        lines("tuned"),
        "1024\n2048\nnofile 1000 core 0 unlimited",
        "{console}"
    );
    // The config drive's metadata and userdata, read-only in /run/config.
    assert_eq!(
        lines("cfg"),
        "nocloud\ndrive-host\nssh-ed25519 AAAAdrive test@iso\nfrom the config drive\nv6 0 1",
        "{console}"
    );
    assert!(
        console.contains("hostname drive-host (from metadata)"),
        "{console}"
    );
    // userns: each container its own range; a hard limit above the
    // host's default still set (by the init, from outside).
    for (name, first, extra) in [
        ("remapped", 100_000, "\nnofile 100000"),
        ("remapped2", 165_536, ""),
        // On the bridge: its eth0 configured from inside its namespace.
        ("remapped3", 231_072, "\n172.31.0.2/24"),
    ] {
        let map = format!("{:>10} {first:>10} {:>10}", 0, 65536);
        let got = lines(name);
        let head: Vec<&str> = got.lines().take(7).collect();
        assert_eq!(
            head[..6],
            [
                map.as_str(),
                map.as_str(),
                "uid 0 owner 65534",
                "mknod: /tmp/n: Operation not permitted",
                "mknod-refused",
                "CapEff:\t00000000a80425fb",
            ],
            "{name}:\n{got}"
        );
        assert!(
            head[6].starts_with("classes ") && head[6] != "classes 0",
            "{got}"
        );
        assert!(got.ends_with(&format!("{}{extra}", head[6])), "{got}");
    }
}

/// The host network with two restricted cards: DHCP on eth0 (slirp's
/// restricted DHCP gives an address, no router, no DNS), the recipe's
/// static settings on eth1, the files containers on the host network see,
/// a service's port published to this machine with `--publish`, and a
/// server on this machine reached from the guest with `--forward`.
#[test]
fn host_network_and_published_port() {
    let dir = k::scratch("network");
    let recipe = dir.join("network.toml");
    let bb = "image = { debian = [\"busybox-static\"], scripts = false }";
    std::fs::write(
        &recipe,
        format!(
            "name = \"network\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\ncmdline = \"console=ttyS0 loglevel=4 kiln.metadata_url=http://10.0.2.100\"\n\
             [[service]]\nname = \"meta\"\n{bb}\nrestart = \"never\"\nbinds = [\"/run/config:/config:ro\"]\n\
             command = [\"/bin/busybox\", \"sh\", \"-c\", \"cd /config && busybox cat provider hostname ssh/authorized_keys app/greeting && busybox stat -c %a app/greeting && busybox touch x 2>&1\"]\n\
             [[service]]\nname = \"web\"\n{bb}\nready = {{ tcp = 8080 }}\ncommand = [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n\
             [[file]]\ncontainer = \"web\"\npath = \"/www/index.html\"\ncontents = \"served from the guest\\n\"\n\
             [[service]]\nname = \"fetch\"\n{bb}\nrestart = \"never\"\ndepends_on = [\"bweb\", \"dns\"]\n\
             command = [\"/bin/busybox\", \"sh\", \"-c\", \"for u in 10.0.2.100/ 127.0.0.1:8081/ 10.0.2.15:8081/; do busybox wget -q -O - http://$u; done; busybox nslookup kiln.test 127.0.0.1 | busybox grep 'Address: 192'\"]\n\
             [[service]]\nname = \"bweb\"\n{bb}\nnet = \"bridge\"\nports = [\"8081:80\"]\nready = {{ tcp = 80 }}\ncommand = [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"80\", \"-h\", \"/www\"]\n\
             [[file]]\ncontainer = \"bweb\"\npath = \"/www/index.html\"\ncontents = \"served from the bridge\\n\"\n\
             [[service]]\nname = \"dns\"\nimage = {{ debian = [\"dnsmasq-base\"], scripts = false }}\nnet = \"bridge\"\nports = [\"53:53/udp\"]\nready = {{ tcp = 53 }}\n\
             command = [\"/usr/sbin/dnsmasq\", \"-k\", \"--no-resolv\", \"--no-hosts\", \"--address=/kiln.test/192.0.2.7\", \"--user=\", \"--pid-file=\", \"--log-facility=-\", \"--interface=eth0\"]\n\
             [[service]]\nname = \"bname\"\n{bb}\nnet = \"bridge\"\nrestart = \"never\"\ndepends_on = [\"bweb\", \"dns\"]\n\
             command = [\"/bin/busybox\", \"sh\", \"-c\", \"busybox ip -4 -o addr show dev eth0 | busybox awk '{{print $4}}'; busybox ip route | busybox grep default; for u in bweb/ 10.0.2.15:8081/ 10.0.2.100/; do busybox wget -q -O - http://$u; done; for s in dns 10.0.2.15; do busybox nslookup kiln.test $s | busybox grep 'Address: 192'; done\"]\n\
             [[service]]\nname = \"show\"\n{bb}\nrestart = \"never\"\n\
             command = [\"/bin/busybox\", \"sh\", \"-c\", \"for i in eth0 eth1; do echo $i $(busybox ip -4 -o addr show dev $i | busybox awk '{{print $4}}'); done; busybox ip route | busybox grep default; busybox cat /etc/resolv.conf /etc/hosts; for i in $(busybox seq 50); do busybox ip -6 addr show dev eth0 | busybox grep -q dynamic && break; busybox sleep 0.2; done; echo v6 $(busybox ip -6 -o addr show dev eth0 | busybox grep dynamic | busybox awk '{{print $4}}')\"]\n\
             [host]\nhostname = \"edge\"\n\
             [[network.interface]]\nname = \"eth1\"\naddress = \"192.168.50.5/24\"\ngateway = \"192.168.50.1\"\ndns = [\"192.168.50.53\"]\n\
             [disk]\nsize = \"256M\"\n"
        ),
    )
    .unwrap();
    let out = dir.join("out");
    k::build(&kiln(), &recipe, &out);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let publish = format!("{port}:8080");
    let bridge_tcp = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let publish_bridge = format!("{bridge_tcp}:8081");
    // What the guest reaches at 10.0.2.100:80: a server here, IMDSv2's
    // metadata paths and a page at /.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let forward = format!("10.0.2.100:80={}", server.local_addr().unwrap().port());
    std::thread::spawn(move || {
        for c in server.incoming().flatten() {
            imds(c);
        }
    });
    let mut page = None;
    let mut show_done = false;
    let mut fetched = false;
    let mut meta = false;
    let mut named = false;
    let mut bridge_page = None;
    let console = k::boot_until_with(
        &kiln(),
        &out.join("network.raw"),
        300,
        &[
            "--net",
            "restricted",
            "--net",
            "restricted",
            "--publish",
            &publish,
            "--publish",
            &publish_bridge,
            "--forward",
            &forward,
        ],
        |l| {
            if l.contains("] web: ready") {
                page = Some(http_get(port));
            }
            if l.contains("] bweb: ready") {
                bridge_page = Some(http_get(bridge_tcp));
            }
            show_done |= l.contains("show: exited");
            fetched |= l.contains("fetch: exited");
            meta |= l.contains("meta: exited");
            named |= l.contains("bname: exited");
            page.is_some() && bridge_page.is_some() && show_done && fetched && meta && named
        },
    )
    .replace('\r', "");
    let page = page.unwrap_or_else(|| panic!("web never ready:\n{console}"));
    assert!(
        page.starts_with("HTTP/1.") && page.contains("served from the guest"),
        "{page}\n{console}"
    );
    assert!(console.contains("network up in"), "{console}");
    // The host network reaches the outside (guestfwd) and the bridge's
    // published ports through 127.0.0.1 and its own address: TCP, and UDP
    // (a DNS query to dnsmasq). Slirp under restrict=on drops every UDP
    // datagram from the guest but DHCP's, so UDP is asked from inside.
    assert_eq!(
        container_lines(&console, "fetch"),
        [
            "from the host!",
            "served from the bridge",
            "served from the bridge",
            "Address: 192.0.2.7"
        ],
        "{console}"
    );
    // Published from the bridge, reached from this machine.
    let bridge_page = bridge_page.unwrap();
    assert!(
        bridge_page.starts_with("HTTP/1.") && bridge_page.contains("served from the bridge"),
        "{bridge_page}\n{console}"
    );
    // On the bridge: its address in recipe order, the route through the
    // host's end, a neighbour by name, the published port through the
    // host's address (hairpin), the outside by masquerade, and UDP to a
    // neighbour by name and to the published UDP port (hairpin).
    let bname = container_lines(&console, "bname");
    assert_eq!(bname.len(), 7, "{console}");
    assert_eq!(bname[0], "172.31.0.4/24", "{console}");
    assert!(
        bname[1].starts_with("default via 172.31.0.1 dev eth0"),
        "{console}"
    );
    assert_eq!(
        bname[2..],
        [
            "served from the bridge",
            "served from the bridge",
            "from the host!",
            "Address: 192.0.2.7",
            "Address: 192.0.2.7"
        ],
        "{console}"
    );
    assert!(
        console.contains("bridge kiln0 up at 172.31.0.1/24: 3 containers, 2 published ports"),
        "{console}"
    );
    let show = container_lines(&console, "show");
    assert_eq!(show.len(), 8, "{console}");
    // IPv6 by SLAAC from slirp's router advertisements (its fec0::/64,
    // site scope).
    assert_eq!(show[7], "v6 fec0::5054:ff:fe12:3456/64", "{console}");
    assert_eq!(show[..2], ["eth0 10.0.2.15/24", "eth1 192.168.50.5/24"]);
    assert!(
        show[2].starts_with("default via 192.168.50.1 dev eth1"),
        "{console}"
    );
    assert_eq!(
        show[3..7],
        [
            "nameserver 192.168.50.53",
            "127.0.0.1\tlocalhost",
            "::1\tlocalhost ip6-localhost ip6-loopback",
            "10.0.2.15\tmeta-host"
        ],
        "{console}"
    );
    // IMDSv2 (the emulation answers nothing without the session token):
    // provider, hostname, key and the userdata's file tree, read-only.
    assert!(
        console.contains("hostname meta-host (from metadata)"),
        "{console}"
    );
    assert_eq!(
        container_lines(&console, "meta"),
        [
            "aws",
            "meta-host",
            "ssh-ed25519 AAAAC3Nza test@kiln",
            "hello from userdata",
            "600",
            "touch: x: Read-only file system"
        ],
        "{console}"
    );
}

/// One connection to an IMDSv2 emulation: a token for `PUT
/// /latest/api/token` (with a TTL header), metadata only for requests
/// carrying it, 401 otherwise; a plain page at `/`.
fn imds(mut c: std::net::TcpStream) {
    use std::io::{BufRead, Write};
    const TOKEN: &str = "AQAEAtok3n";
    let mut reader = std::io::BufReader::new(c.try_clone().unwrap());
    let mut request = String::new();
    let _ = reader.read_line(&mut request);
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        headers.push(h.trim().to_ascii_lowercase());
    }
    let has = |h: &str| headers.iter().any(|x| x.starts_with(h));
    let parts: Vec<&str> = request.split_whitespace().collect();
    let (method, path) = (
        parts.first().copied().unwrap_or(""),
        parts.get(1).copied().unwrap_or(""),
    );
    let tree = r#"{"app": {"greeting": {"content": "hello from userdata\n", "perm": "0600"}}}"#;
    let body: Result<&str, u16> = match (method, path) {
        ("GET", "/") => Ok("from the host!\n"),
        ("PUT", "/latest/api/token") if has("x-aws-ec2-metadata-token-ttl-seconds:") => Ok(TOKEN),
        ("GET", _)
            if !has(&format!(
                "x-aws-ec2-metadata-token: {}",
                TOKEN.to_ascii_lowercase()
            )) =>
        {
            Err(401)
        }
        ("GET", "/latest/meta-data/local-hostname") => Ok("meta-host"),
        ("GET", "/latest/meta-data/public-keys/0/openssh-key") => {
            Ok("ssh-ed25519 AAAAC3Nza test@kiln")
        }
        ("GET", "/latest/user-data") => Ok(tree),
        _ => Err(404),
    };
    let answer = match body {
        Ok(b) => format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{b}", b.len()),
        Err(code) => format!("HTTP/1.0 {code} No\r\nContent-Length: 0\r\n\r\n"),
    };
    let _ = c.write_all(answer.as_bytes());
}

/// `GET /` from 127.0.0.1:`port`, the whole answer (or the error).
fn http_get(port: u16) -> String {
    use std::io::{Read, Write};
    let attempt = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    attempt().unwrap_or_else(|e| format!("error: {e}"))
}

/// A/B updates offline, on one disk through its life, each boot with
/// `kiln run --persist`: v2 applied with `kiln update` boots from slot B on
/// trial and is marked good; `kiln rollback` brings v1 back, and v1's
/// container makes v2 next again through the control socket; a flipped
/// byte in a file v2 reads (slot B) is found by dm-verity at run time
/// (`verity_error = "restart"`), the slot marked failed and v1 boots
/// instead; v3, whose essential container fails, gets its one try and the machine is
/// back on v1 in the same run. Refused: an update not newer than what
/// runs, a build of another recipe, an encoded disk. The disk is grown
/// before its first boot: the data partition and its ext4 follow, and a
/// volume on it counts boots across every update and rollback; e2fsck
/// finds it clean after an update and at the end.
#[test]
fn ab_updates_roll_back_and_refuse_bad_slots() {
    let out = k::scratch("ab");
    // netcat-openbsd speaks to the control socket (busybox's nc cannot).
    let nc = "image = { debian = [\"busybox-static\", \"netcat-openbsd\"], scripts = false }";
    let recipe = |name: &str, version: &str, command: &str| {
        format!(
            "name = \"{name}\"\nversion = \"{version}\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\ncmdline = \"console=ttyS0 loglevel=4\"\n\
             [[onboot]]\nname = \"app\"\n{nc}\nrestart = \"never\"\nvolumes = [\"state:/state\"]\ncontrol = true\n\
             command = [\"/bin/busybox\", \"sh\", \"-c\", \"c=$(busybox cat /state/count 2>/dev/null || echo 0); echo boots before $c; echo $((c+1)) > /state/count; \
             if [ $c = 1 ]; then echo rollback | /bin/nc.openbsd -U -N /run/kiln/state/control.sock; fi; \
             busybox find / -xdev -type f | busybox xargs busybox cat > /dev/null 2>&1; {command}\"]\n\
             [host]\nwhen_done = \"poweroff\"\nhealthy_after = \"2s\"\n[disk]\nsize = \"256M\"\nverity_error = \"restart\"\n[update]\ntries = 1\n"
        )
    };
    let build = |tag: &str, text: String| {
        let dir = out.join(tag);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ab.toml");
        std::fs::write(&path, text).unwrap();
        k::build(&kiln(), &path, &dir);
        dir.join(format!(
            "{}.raw",
            if tag == "other" { "other" } else { "ab" }
        ))
    };
    let v1 = build("v1", recipe("ab", "1.0.0", "echo app version 1"));
    let v2 = build("v2", recipe("ab", "2.0.0", "echo app version 2"));
    let v3 = build("v3", recipe("ab", "3.0.0", "echo app version 3; exit 1"));
    let other = build("other", recipe("other", "9.0.0", "echo other"));
    let disk = out.join("disk.raw");
    std::fs::copy(&v1, &disk).unwrap();
    let grow = k::run(
        Command::new("qemu-img")
            .args(["resize", "-q", "-f", "raw"])
            .arg(&disk)
            .arg("+64M"),
    );
    assert!(grow.ok, "qemu-img resize: {}", grow.stderr);
    let data_fsck = |when: &str| {
        let parts = k::partitions(&disk);
        assert_eq!(parts[3].4, "data");
        let img = out.join("data.img");
        k::extract_partition(&disk, &parts[3], &img);
        let r = k::run(Command::new("e2fsck").arg("-fn").arg(&img));
        assert!(
            r.ok,
            "e2fsck -fn on the data partition {when}:\n{}{}",
            r.stdout, r.stderr
        );
        let _ = std::fs::remove_file(&img);
    };
    let kiln_cmd = |args: &[&std::ffi::OsStr]| k::run(Command::new(kiln()).args(args));
    let update = |image: &std::path::Path| {
        kiln_cmd(&[
            "update".as_ref(),
            "--image".as_ref(),
            image.as_os_str(),
            disk.as_os_str(),
        ])
    };
    let next = || {
        let r = kiln_cmd(&["slots".as_ref(), disk.as_os_str()]);
        assert!(r.ok, "kiln slots: {}", r.stderr);
        r.stdout
    };
    let boot = |what: &str| {
        let r = k::boot_with(&kiln(), &disk, 400, &["--persist", "--net", "none"]);
        let _ = std::fs::write(out.join(format!("{what}.console.log")), &r.stdout);
        r
    };

    // Published as signed updates, v2 (a one-line change) adds only the
    // chunks v1 lacks; republishing v2 is refused.
    // The update repository lives in a registry, as `[update] source =
    // "oci://…"` would have it.
    let reg =
        kiln_tests::registry::Registry::start().expect("docker-registry (scripts/install-deps.sh)");
    let repo = format!("oci://{}/kiln/ab-updates", reg.host());
    let key = out.join("update.pem");
    let made = k::run(
        Command::new("openssl")
            .args(["genpkey", "-algorithm", "ed25519", "-out"])
            .arg(&key),
    );
    assert!(made.ok, "openssl genpkey: {}", made.stderr);
    let publish = |image: &std::path::Path| {
        kiln_cmd(&[
            "publish-update".as_ref(),
            "--json".as_ref(),
            "--key".as_ref(),
            key.as_os_str(),
            "--to".as_ref(),
            repo.as_ref(),
            image.as_os_str(),
        ])
    };
    let mut v2_bytes = 0;
    for (image, version) in [(&v1, "1.0.0"), (&v2, "2.0.0")] {
        let p = publish(image);
        assert!(p.ok, "kiln publish-update {version}: {}", p.stderr);
        let j: serde_json::Value = serde_json::from_str(&p.stdout).unwrap();
        assert_eq!(j["version"], version, "{j}");
        let (new, all) = (
            j["new_bytes"].as_u64().unwrap(),
            j["bytes"].as_u64().unwrap(),
        );
        if version == "2.0.0" {
            assert!(
                new * 5 <= all,
                "a one-line change adds {new} of {all} bytes"
            );
            v2_bytes = all;
        }
    }
    // Signed again with new dates, the repository still publishes v2.
    let refreshed = kiln_cmd(&[
        "publish-update".as_ref(),
        "--refresh".as_ref(),
        "--key".as_ref(),
        key.as_os_str(),
        "--to".as_ref(),
        repo.as_ref(),
    ]);
    assert!(
        refreshed.ok
            && refreshed
                .stdout
                .contains("it still publishes 2.0.0; metadata version 3"),
        "{}{}",
        refreshed.stdout,
        refreshed.stderr
    );
    let again = publish(&v2);
    assert!(
        !again.ok && again.stderr.contains("not newer than 2.0.0"),
        "{}",
        again.stderr
    );

    // v2 in slot B from the signed repository (only the chunks v1 lacks
    // are read from it), on trial, then good.
    let public = out.join("update.pub");
    let made = k::run(
        Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&public),
    );
    assert!(made.ok, "openssl pkey: {}", made.stderr);
    let served_before = reg.log().len();
    let u = kiln_cmd(&[
        "update".as_ref(),
        "--from".as_ref(),
        repo.as_ref(),
        "--root-key".as_ref(),
        public.as_os_str(),
        disk.as_os_str(),
    ]);
    assert!(u.ok, "kiln update --from: {}{}", u.stdout, u.stderr);
    // What the registry served (its access log: `"GET …" 200 BYTES`): the
    // metadata, the manifest and the chunks v1 lacks, not v2's whole slot.
    let served = kiln_tests::registry::Registry::served_bytes(&reg.log()[served_before..]);
    assert!(
        served > 0 && served * 5 <= v2_bytes,
        "the update fetched {served} bytes of a {v2_bytes}-byte slot"
    );
    eprintln!("update from the registry: {served} of {v2_bytes} bytes fetched");
    assert!(
        u.stdout
            .contains("slot b now holds 2.0.0 (was running 1.0.0), armed for 1 boot(s); fetched"),
        "{}",
        u.stdout
    );
    let r = boot("v2");
    assert_eq!(r.code, Some(0), "{}", r.stdout);
    assert!(
        r.stdout
            .contains("kiln-boot: slot b (ab 2.0.0, 0 tries left after this one)"),
        "{}",
        r.stdout
    );
    assert!(
        k::container_lines(&r.stdout, "app").contains(&"app version 2"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("slot b: healthy, marked good"),
        "{}",
        r.stdout
    );
    // The disk was 64 MiB larger than the image: the data partition took
    // it, and its ext4 was grown online to fill it.
    assert!(
        r.stdout.contains("partition grown from") && r.stdout.contains("ext4 grown from 32 to"),
        "{}",
        r.stdout
    );
    let lines = k::container_lines(&r.stdout, "app");
    assert_eq!(lines, ["boots before 0", "app version 2"], "{}", r.stdout);
    assert!(r.stdout.contains("watchdog: armed, 60 s"), "{}", r.stdout);
    data_fsck("after an update");
    assert!(
        next().contains("b (ab 2.0.0): good  <- boots next"),
        "{}",
        next()
    );

    // Refusals leave the disk as it was.
    for (image, why) in [
        (&v2, "version 2.0.0 is not newer than 2.0.0"),
        (&v1, "version 1.0.0 is not newer than 2.0.0"),
        (
            &other,
            "the update is a build of \"other\", the disk runs \"ab\"",
        ),
    ] {
        let r = update(image);
        assert!(!r.ok && r.stderr.contains(why), "{}", r.stderr);
    }
    let qcow = out.join("disk.qcow2");
    std::fs::write(&qcow, b"QFI\xfb\0\0\0\x03").unwrap();
    let r = kiln_cmd(&["rollback".as_ref(), qcow.as_os_str()]);
    assert!(
        !r.ok && r.stderr.contains("qemu-img convert -O raw"),
        "{}",
        r.stderr
    );

    // Rollback to v1 offline, which boots; and back again from inside,
    // through the control socket (this second boot's container asks).
    let r = kiln_cmd(&["rollback".as_ref(), disk.as_os_str()]);
    assert!(
        r.ok && r.stdout.contains("slot a boots next"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    let r = boot("rollback");
    assert_eq!(r.code, Some(0), "{}", r.stdout);
    let lines = k::container_lines(&r.stdout, "app");
    assert_eq!(
        lines,
        [
            "boots before 1",
            r#"{"next":"b","ok":true}"#,
            "app version 1"
        ],
        "{}",
        r.stdout
    );
    assert!(
        next().contains("b (ab 2.0.0): good  <- boots next"),
        "{}",
        next()
    );

    // A flipped byte in a file of slot B's root: the app reads every file
    // it has, dm-verity finds it (verity_error = "restart"), the slot is
    // marked failed and v1 boots in the same run.
    let parts = k::partitions(&disk);
    {
        use std::os::unix::fs::FileExt;
        let start = parts[2].1 * 512;
        let mut used = [0u8; 8];
        std::fs::File::open(&disk)
            .unwrap()
            .read_exact_at(&mut used, start + 40)
            .unwrap();
        // Three tenths in: file data (busybox, netcat and its libraries).
        k::flip_byte(&disk, start + u64::from_le_bytes(used) * 3 / 10);
    }
    let r = boot("corrupt");
    assert_eq!(r.code, Some(0), "{}", r.stdout);
    let c = &r.stdout;
    assert!(c.contains("device-mapper: verity"), "{c}");
    let found = c
        .find("root: dm-verity found a corrupt block")
        .unwrap_or_else(|| panic!("{c}"));
    assert!(
        c[found..].contains("slot b marked failed: its root is corrupt")
            && c[found..].contains("kiln-boot: slot a (ab 1.0.0, good)"),
        "{c}"
    );
    let lines = k::container_lines(c, "app");
    assert_eq!(
        lines,
        [
            "boots before 2",
            "app version 2",
            "boots before 3",
            "app version 1"
        ],
        "{c}"
    );
    assert!(next().contains("b (ab 2.0.0): failed"), "{}", next());

    // v3 fails its one try; the same run ends on v1.
    let u = update(&v3);
    assert!(
        u.ok && u
            .stdout
            .contains("slot b now holds 3.0.0 (was running 1.0.0)"),
        "{}{}",
        u.stdout,
        u.stderr
    );
    let r = boot("v3");
    assert_eq!(r.code, Some(0), "{}", r.stdout);
    let c = &r.stdout;
    let failed_at = c
        .find("slot b failed its trial: essential containers failed: app")
        .unwrap_or_else(|| panic!("{c}"));
    let v1_at = c
        .rfind("app| app version 1")
        .unwrap_or_else(|| panic!("{c}"));
    assert!(c.contains("app| app version 3") && failed_at < v1_at, "{c}");
    assert!(
        c[failed_at..].contains("kiln-boot: slot a (ab 1.0.0, good)"),
        "{c}"
    );
    let lines = k::container_lines(c, "app");
    assert_eq!(
        lines,
        [
            "boots before 4",
            "app version 3",
            "boots before 5",
            "app version 1"
        ],
        "{c}"
    );
    let s = next();
    assert!(
        s.contains("a (ab 1.0.0): good  <- boots next") && s.contains("b (ab 3.0.0): failed"),
        "{s}"
    );
    // v2 again, on trial, its root's first block flipped: the mount fails,
    // slot B is marked failed, and the fatal error restarts the machine
    // into v1 (not a power-off).
    let u = update(&v2);
    assert!(u.ok, "kiln update: {}{}", u.stdout, u.stderr);
    let parts = k::partitions(&disk);
    assert_eq!(parts[2].4, "slot-b");
    k::flip_byte(&disk, parts[2].1 * 512 + 2000);
    let r = boot("unmountable");
    assert_eq!(r.code, Some(0), "{}", r.stdout);
    let c = &r.stdout;
    let restart_at = c
        .find("slot b marked failed; the other slot boots next")
        .unwrap_or_else(|| panic!("{c}"));
    assert!(
        c[restart_at..].contains("FATAL: slot b: mount")
            && c[restart_at..].contains("restarting in 5 seconds")
            && c[restart_at..].contains("kiln-boot: slot a (ab 1.0.0, good)"),
        "{c}"
    );
    assert_eq!(
        k::container_lines(c, "app"),
        ["boots before 6", "app version 1"],
        "{c}"
    );
    assert!(next().contains("b (ab 2.0.0): failed"), "{}", next());
    data_fsck("at the end");
}

/// A TCP relay on 127.0.0.1 whose upstream port the test switches: the
/// guest's one update source reaches whichever registry it names, a new
/// choice for each connection.
fn switch() -> (u16, std::sync::Arc<std::sync::atomic::AtomicU16>) {
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::atomic::Ordering;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let to = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(0));
    let upstream = to.clone();
    std::thread::spawn(move || {
        for down in listener.incoming().flatten() {
            let Ok(up) = TcpStream::connect(("127.0.0.1", upstream.load(Ordering::SeqCst))) else {
                continue;
            };
            for (mut from, mut to) in [
                (down.try_clone().unwrap(), up.try_clone().unwrap()),
                (up, down),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        }
    });
    (port, to)
}

/// A host updates itself from registries it reads over TLS (a private CA,
/// `[update] ca`), checking when a container asks through the control
/// socket: wrong keys, expired and frozen metadata are refused; v2 is
/// fetched in part, written, booted and marked good; killed while writing
/// v3, the host boots v2 and writes v3 again.
#[test]
fn online_updates_from_a_registry() {
    use std::sync::atomic::Ordering;
    let out = k::scratch("online");
    let openssl = |args: &[&str]| {
        let r = k::run(Command::new("openssl").args(args).current_dir(&out));
        assert!(r.ok, "openssl {args:?}: {}", r.stderr);
    };
    openssl(&["genpkey", "-algorithm", "ed25519", "-out", "update.pem"]);
    openssl(&["pkey", "-pubout", "-in", "update.pem", "-out", "update.pub"]);
    openssl(&["genpkey", "-algorithm", "ed25519", "-out", "other.pem"]);
    // The registries the guest reads speak TLS with a certificate of a
    // private CA, which the recipe's `ca` adds to the guest's roots.
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-subj",
                "/CN=kiln-test-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"],
            &ec[..],
            &[
                "-subj",
                "/CN=registry",
                "-keyout",
                "tls.key",
                "-out",
                "tls.csr",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        out.join("tls.ext"),
        "subjectAltName = IP:10.0.2.100\nbasicConstraints = CA:FALSE\nextendedKeyUsage = serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509", "-req", "-in", "tls.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-extfile",
        "tls.ext", "-out", "tls.pem", "-days", "2",
    ]);
    // The guest reaches its update source at 10.0.2.100:5000 (QEMU's
    // guestfwd): the switch picks the registry that answers. The schedule
    // is hourly: every check after the first at boot is one that `poke`
    // asks for through the control socket.
    let recipe = |version: &str| {
        format!(
            "name = \"online\"\nversion = \"{version}\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\ncmdline = \"console=ttyS0 loglevel=4\"\n\
             [[service]]\nname = \"app\"\nimage = {{ debian = [\"busybox-static\"], scripts = false }}\nessential = true\n\
             command = [\"/bin/busybox\", \"sh\", \"-c\", \"echo app version {version}; exec /bin/busybox sleep 100000\"]\n\
             [[service]]\nname = \"poke\"\nimage = {{ debian = [\"busybox-static\", \"netcat-openbsd\"], scripts = false }}\ncontrol = true\n\
             command = [\"/bin/busybox\", \"sh\", \"-c\", \"while /bin/busybox sleep 2; do r=$(echo check | /bin/nc.openbsd -U -N /run/kiln/state/control.sock); \
             case $r in *true*) ;; *) echo $r;; esac; done\"]\n\
             [host]\nhealthy_after = \"2s\"\n[disk]\nsize = \"256M\"\n\
             [update]\ntries = 1\nsource = \"oci://10.0.2.100:5000/kiln/online\"\nroot_keys = [\"../update.pub\"]\nca = [\"../ca.pem\"]\ncheck = \"1h\"\n"
        )
    };
    let build = |version: &str| {
        let dir = out.join(version);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("online.toml"), recipe(version)).unwrap();
        k::build(&kiln(), &dir.join("online.toml"), &dir);
        dir.join("online.raw")
    };
    let (v1, v2, v3) = (build("1.0.0"), build("2.0.0"), build("3.0.0"));

    // kiln publishes to a plain registry on loopback; its TLS twin serves
    // the same storage to the guest.
    let port_of = |r: &kiln_tests::registry::Registry| -> u16 {
        r.host().rsplit(':').next().unwrap().parse().unwrap()
    };
    let start = || {
        let r = kiln_tests::registry::Registry::start()
            .expect("docker-registry (scripts/install-deps.sh)");
        let tls = r.tls_twin(&out.join("tls.pem"), &out.join("tls.key"));
        let (port, tls_port) = (port_of(&r), port_of(&tls));
        ((r, tls), port, tls_port)
    };
    let publish = |key: &str, port: u16, image: &Path, extra: &[&str]| {
        let r = k::run(
            Command::new(kiln())
                .current_dir(&out)
                .args(["publish-update", "--json", "--key", key, "--to"])
                .arg(format!("oci://127.0.0.1:{port}/kiln/online"))
                .args(extra)
                .arg(image),
        );
        assert!(r.ok, "kiln publish-update: {}", r.stderr);
        serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap()
    };
    // main: v1, then signed again (metadata version 2); stale: v1 only
    // (what a mirror that froze main would serve); wrong: v1 under
    // another key; expired: v2, its timestamp valid one second.
    let ((_main, main), main_port, main_tls) = start();
    let (_stale, stale_port, stale_tls) = start();
    let (_wrong, wrong_port, wrong_tls) = start();
    let (_expired, expired_port, expired_tls) = start();
    publish("update.pem", main_port, &v1, &[]);
    let r = k::run(
        Command::new(kiln())
            .current_dir(&out)
            .args(["publish-update", "--refresh", "--key", "update.pem", "--to"])
            .arg(format!("oci://127.0.0.1:{main_port}/kiln/online")),
    );
    assert!(r.ok, "{}", r.stderr);
    publish("update.pem", stale_port, &v1, &[]);
    publish("other.pem", wrong_port, &v1, &[]);
    publish("update.pem", expired_port, &v2, &["--expires", "1s"]);

    let disk = out.join("disk.raw");
    std::fs::copy(&v1, &disk).unwrap();
    let (port, to) = switch();
    to.store(wrong_tls, Ordering::SeqCst);
    let forward = format!("10.0.2.100:5000={port}");
    // Each refusal moves the switch on; the last publishes v2 to main.
    let mut step = 0;
    let mut v2_bytes = 0;
    let (mut served_before, mut served_until) = (0, 0);
    let (mut fetching, mut good) = (None, None);
    let console = k::boot_until_with(
        &kiln(),
        &disk,
        400,
        &["--persist", "--net", "restricted", "--forward", &forward],
        |l| {
            let said = |s: &str| l.contains("kiln-update| ") && l.contains(s);
            match step {
                0 if said("are not all among the keys trusted") => {
                    to.store(expired_tls, Ordering::SeqCst);
                    step = 1;
                }
                1 if said("expired") => {
                    to.store(main_tls, Ordering::SeqCst);
                    step = 2;
                }
                2 if said("online 1.0.0 is the newest published") => {
                    to.store(stale_tls, Ordering::SeqCst);
                    step = 3;
                }
                3 if said("refused: ") && said("timestamp") => {
                    v2_bytes = publish("update.pem", main_port, &v2, &[])["bytes"]
                        .as_u64()
                        .unwrap();
                    served_before = main.log().len();
                    to.store(main_tls, Ordering::SeqCst);
                    step = 4;
                }
                4 if said("online 2.0.0 is published; fetching") => {
                    fetching = Some(std::time::Instant::now());
                }
                4 if l.contains("slot b: healthy, marked good") => {
                    good = Some(std::time::Instant::now());
                    step = 5;
                }
                // v3 is published; QEMU is killed while the init writes
                // it into slot a.
                5 if said("online 2.0.0 is the newest published") => {
                    served_until = main.log().len();
                    publish("update.pem", main_port, &v3, &[]);
                    step = 6;
                }
                6 if said("writing the other slot") => {
                    std::thread::sleep(std::time::Duration::from_millis(1500));
                    step = 7;
                }
                _ => {}
            }
            step == 7
        },
    )
    .replace('\r', "");
    let _ = std::fs::write(out.join("console.log"), &console);
    let lines = container_lines(&console, "kiln-update");
    // Each asked-for check says what it found, the same refusal again too.
    let mut refusals: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("refused: "))
        .collect();
    refusals.dedup();
    assert!(step == 7 && refusals.len() == 3, "step {step}:\n{console}");
    assert!(
        refusals[0].contains("are not all among the keys trusted"),
        "{console}"
    );
    assert!(refusals[1].contains("expired"), "{console}");
    assert!(
        refusals[2].contains("timestamp") && refusals[2].contains("version"),
        "{console}"
    );
    assert_eq!(
        container_lines(&console, "app"),
        ["app version 1.0.0", "app version 2.0.0"],
        "{console}"
    );
    assert!(
        console.contains("kiln-boot: slot b (online 2.0.0, 0 tries left after this one)"),
        "{console}"
    );
    assert!(
        lines.contains(&"slot b now holds online 2.0.0, armed for 1 boot(s)"),
        "{console}"
    );
    // What main served for the update: metadata, the manifest and the
    // chunks v1 lacks.
    let served =
        kiln_tests::registry::Registry::served_bytes(&main.log()[served_before..served_until]);
    assert!(
        served > 0 && served * 5 <= v2_bytes,
        "the update fetched {served} bytes of a {v2_bytes}-byte slot"
    );

    // Killed mid-write, the host boots v2 again, and the service writes v3
    // anew and boots it.
    let mut done = false;
    let console = k::boot_until_with(
        &kiln(),
        &disk,
        400,
        &["--persist", "--net", "restricted", "--forward", &forward],
        |l| {
            done |= l.contains("kiln-update| online 3.0.0 is the newest published");
            done
        },
    )
    .replace('\r', "");
    let _ = std::fs::write(out.join("killed.console.log"), &console);
    assert!(done, "{console}");
    assert!(
        console.contains("kiln-boot: slot b (online 2.0.0, good)")
            && console.contains("kiln-boot: slot a (online 3.0.0, 0 tries left after this one)"),
        "{console}"
    );
    assert_eq!(
        container_lines(&console, "app"),
        ["app version 2.0.0", "app version 3.0.0"],
        "{console}"
    );

    let (fetching, good) = (fetching.unwrap(), good.unwrap());
    eprintln!(
        "online update: {served} of {v2_bytes} bytes fetched; {:.1} s from the fetch to v2 marked good",
        (good - fetching).as_secs_f64()
    );
}
