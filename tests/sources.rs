//! One image whose services come from each kind of container source (a
//! registry by tag, the same registry pinned by digest, an OCI layout and a
//! `docker save` archive), built by `kiln`, checked with the standard tools
//! and booted once under QEMU/OVMF. Each service runs a probe script that
//! prints what the container sees, so the image config (Env, Entrypoint,
//! Cmd, WorkingDir, User), the recipe overrides and the isolation are all
//! checked line by line. Plus builds without a boot: a wrong digest pin, the
//! lock keeping a moved tag, and a registry on a non-loopback address.

use kiln_tests::images::{self, Entry, TestImage, MT_OCI_MANIFEST};
use kiln_tests::kiln::{self as k, container_lines, toml_str};
use kiln_tests::registry::{Registry, TestNetns};
use std::path::{Path, PathBuf};
use std::process::Command;

fn kiln() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

/// Prints one `KEY value` line per property of the container. `busybox` is
/// called by name so that PATH resolution is part of the test.
const PROBE: &str = r#"echo "args $# $*"
echo "pid $$"
echo "hostname $(busybox hostname)"
echo "pwd $(pwd)"
echo "ids $(busybox id -u) $(busybox id -g) groups $(busybox id -G)"
echo "env FROM_IMAGE=$FROM_IMAGE OVERRIDE=$OVERRIDE HOME=$HOME"
echo "PATH=$PATH"
busybox grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb):' /proc/self/status
if busybox touch /probe 2>/dev/null; then echo "root writable"; else echo "root read-only"; fi
if busybox touch /tmp/probe 2>/dev/null; then echo "tmp writable"; else echo "tmp read-only"; fi
echo "netdev" $(busybox awk -F: 'NR>2 {sub(/^ */, "", $1); print $1}' /proc/net/dev)
echo "netns $(busybox readlink /proc/self/ns/net)"
echo "lo flags $(busybox cat /sys/class/net/lo/flags)"
if [ -e /etc/greeting ]; then
  echo "greeting $(busybox cat /etc/greeting)"
  if (echo x > /etc/greeting) 2>/dev/null; then echo "greeting writable"; else echo "greeting read-only"; fi
else
  echo "no greeting"
fi
echo "done"
"#;

const GREETING: &str = "baked by the recipe";
const CAPS: &str = "00000000a80425fb";
const NO_CAPS: &str = "0000000000000000";
/// kiln's PATH for images that set none (Docker's).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// busybox plus the probe script (and `extra` entries) in two layers.
fn probe_image(extra: Vec<Entry>) -> Option<TestImage> {
    let base = images::busybox_entries()?;
    let mut app = vec![Entry::file("probe.sh", PROBE, 0o755)];
    app.extend(extra);
    Some(TestImage::new(vec![
        images::layer_tar(&base),
        images::layer_tar(&app),
    ]))
}

/// Registry image: Entrypoint + Cmd, numeric User, a WorkingDir the image
/// does not contain.
fn registry_image(from: &str) -> Option<TestImage> {
    let mut img = probe_image(vec![])?;
    img.env = vec![
        "PATH=/bin".into(),
        format!("FROM_IMAGE={from}"),
        "OVERRIDE=image-a".into(),
    ];
    img.entrypoint = vec!["/bin/sh".into(), "/probe.sh".into()];
    img.cmd = vec!["reg-default".into()];
    img.working_dir = "/srv/a".into();
    img.user = "0:0".into();
    Some(img)
}

/// Layout image: Cmd only, a named User resolved through the image's own
/// /etc/passwd and /etc/group (supplementary groups, HOME).
fn layout_image(from: &str) -> Option<TestImage> {
    let mut img = probe_image(vec![
        Entry::dir("etc", 0o755),
        Entry::file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\napp:x:1001:1002:App:/home/app:/bin/sh\n",
            0o644,
        ),
        Entry::file(
            "etc/group",
            "root:x:0:\napp:x:1002:\naudio:x:29:app\nvideo:x:44:other\n",
            0o644,
        ),
    ])?;
    img.env = vec!["PATH=/bin:/usr/bin".into(), format!("FROM_IMAGE={from}")];
    img.entrypoint = vec![];
    img.cmd = vec![
        "/bin/sh".into(),
        "/probe.sh".into(),
        "layout-default".into(),
    ];
    img.working_dir = "/home/app".into();
    img.user = "app".into();
    Some(img)
}

/// Archive image: no PATH in Env, empty User and WorkingDir.
fn archive_image() -> Option<TestImage> {
    let mut img = probe_image(vec![])?;
    img.env = vec!["FROM_IMAGE=archive-c".into(), "OVERRIDE=image-c".into()];
    img.entrypoint = vec!["/bin/sh".into(), "/probe.sh".into()];
    img.cmd = vec!["archive-default".into()];
    img.working_dir = String::new();
    img.user = String::new();
    Some(img)
}

fn caps(prm: &str, eff: &str) -> Vec<String> {
    vec![
        format!("CapInh:\t{NO_CAPS}"),
        format!("CapPrm:\t{prm}"),
        format!("CapEff:\t{eff}"),
        format!("CapBnd:\t{CAPS}"),
        format!("CapAmb:\t{NO_CAPS}"),
    ]
}

/// What the probe prints, minus the `netns` line (compared across services).
struct Expect<'a> {
    name: &'a str,
    args: &'a str,
    pwd: &'a str,
    ids: &'a str,
    env: &'a str,
    path: &'a str,
    root: bool,
    netdev: &'a str,
    greeting: bool,
}

impl Expect<'_> {
    fn lines(&self) -> Vec<String> {
        let mut v = vec![
            format!("args {}", self.args),
            "pid 1".to_string(),
            format!("hostname {}", self.name),
            format!("pwd {}", self.pwd),
            format!("ids {}", self.ids),
            format!("env {}", self.env),
            format!("PATH={}", self.path),
        ];
        v.extend(if self.root {
            caps(CAPS, CAPS)
        } else {
            caps(NO_CAPS, NO_CAPS)
        });
        v.push("root read-only".into());
        v.push("tmp writable".into());
        v.push(format!("netdev {}", self.netdev));
        // IFF_UP | IFF_LOOPBACK: loopback is up, on the host network too.
        v.push("lo flags 0x9".into());
        if self.greeting {
            v.push(format!("greeting {GREETING}"));
            v.push("greeting read-only".into());
        } else {
            v.push("no greeting".into());
        }
        v.push("done".into());
        v
    }
}

#[test]
fn every_source_builds_and_boots_with_its_config() {
    let Some(mut reg) = Registry::start() else {
        return;
    };
    let (Some(pinned_img), Some(moved_img), Some(layout_img), Some(decoy), Some(archive_img)) = (
        registry_image("registry-pinned"),
        registry_image("registry-tag-moved"),
        layout_image("layout-v2"),
        layout_image("layout-wrong-tag"),
        archive_image(),
    ) else {
        eprintln!("note: /bin/busybox (busybox-static) not installed; skipping");
        return;
    };
    let dir = k::scratch("sources");
    let host = reg.host();

    // Registry: push one image as probe/a:1, then move the tag to another;
    // the pinned service must still get the first one.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pinned_digest = rt.block_on(pinned_img.push(&host, "probe/a", "1"));
    let moved_digest = rt.block_on(moved_img.push(&host, "probe/a", "1"));
    assert_ne!(pinned_digest, moved_digest);

    // OCI layout with two tags; the recipe names v2.
    let layout = dir.join("layout");
    let (b, d) = (layout_img.blobs(), decoy.blobs());
    let mut blobs = vec![
        b.config.clone(),
        b.manifest.clone(),
        d.config,
        d.manifest.clone(),
    ];
    blobs.extend(b.layers.iter().cloned());
    blobs.extend(d.layers.iter().cloned());
    images::write_layout(
        &layout,
        &blobs,
        &[
            (MT_OCI_MANIFEST, &d.manifest, Some("other"), None),
            (MT_OCI_MANIFEST, &b.manifest, Some("v2"), None),
        ],
    );
    let layout_digest = b.manifest_digest();

    // docker save archive.
    let archive = dir.join("archive.tar");
    archive_img.write_docker_archive(&archive, "probe/c:latest");
    let archive_id = images::sha256(&archive_img.config_json());

    let refs = [
        format!("{host}/probe/a:1"),
        format!("{host}/probe/a:1@{pinned_digest}"),
        format!("oci-layout:{}:v2", layout.display()),
        format!("docker-archive:{}", archive.display()),
    ];
    let recipe = dir.join("sources.toml");
    let text = format!(
        r#"name = "sources"
version = "1"

[kernel]
debian = "linux-image-cloud-amd64"
cmdline = "console=ttyS0 loglevel=4"

# Registry by tag: everything from the image config.
[[service]]
name = "reg"
image = {reg}
binds = ["/etc/kiln/greeting:/etc/greeting:ro"]

# Registry pinned by digest: image Entrypoint + Cmd, recipe overrides.
[[service]]
name = "pinned"
image = {pinned}
env = {{ OVERRIDE = "from-recipe" }}
cwd = "/opt/x"
user = "1000:1000"
net = "none"
binds = ["/etc/kiln/greeting:/etc/greeting:ro"]

# OCI layout: Cmd only, named user from the image's /etc/passwd.
[[service]]
name = "layout"
image = {layout}

# docker save archive: recipe command and env.
[[service]]
name = "archive"
image = {archive}
command = ["/bin/sh", "/probe.sh", "from-recipe", "two words"]
env = {{ OVERRIDE = "from-recipe-archive" }}
binds = ["/run/app/greeting:/etc/greeting:ro"]

[[file]]
path = "/etc/kiln/greeting"
contents = "{GREETING}\n"

# On the /run tmpfs: copied there by the init at boot.
[[file]]
path = "/run/app/greeting"
contents = "{GREETING}\n"

[host]
hostname = "sources-host"
when_done = "poweroff"

[disk]
size = "256M"
"#,
        reg = toml_str(&refs[0]),
        pinned = toml_str(&refs[1]),
        layout = toml_str(&refs[2]),
        archive = toml_str(&refs[3]),
    );
    std::fs::write(&recipe, text).unwrap();

    let out = dir.join("out");
    k::build(&kiln(), &recipe, &out);
    // Everything is in the image now: the boot needs no registry.
    reg.stop();
    let image = out.join("sources.raw");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 256 << 20);

    // The plan pins each source to what was pushed or written.
    let plan = k::read_json(&out.join("sources.plan.json"));
    let pins: Vec<(String, String, String)> = plan["image"]
        .as_array()
        .expect("plan.image")
        .iter()
        .map(|c| {
            (
                c["container"].as_str().unwrap_or_default().to_string(),
                c["source"].as_str().unwrap_or_default().to_string(),
                c["digest"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    // Local sources below the recipe are recorded relative to it.
    let want_pins: Vec<(String, String, String)> = [
        ("reg", &refs[0], &moved_digest),
        ("pinned", &refs[1], &pinned_digest),
        (
            "layout",
            &"oci-layout:layout:v2".to_string(),
            &layout_digest,
        ),
        (
            "archive",
            &"docker-archive:archive.tar".to_string(),
            &archive_id,
        ),
    ]
    .iter()
    .map(|(n, r, d)| (n.to_string(), r.to_string(), d.to_string()))
    .collect();
    assert_eq!(pins, want_pins);

    // GPT valid; slot A starts with a squashfs unsquashfs lists.
    let parts = k::partitions(&image);
    assert_eq!(parts.len(), 4, "{parts:?}");
    assert_eq!(parts[1].4, "slot-a");
    let root = out.join("root.img");
    k::extract_partition(&image, &parts[1], &root);
    let ls = k::run(Command::new("unsquashfs").arg("-lln").arg(&root));
    assert!(ls.ok, "unsquashfs: {}", ls.stderr);
    let listing = squashfs_listing(&ls.stdout);
    let entry = |path: &str| -> (String, String) {
        listing
            .iter()
            .find(|(_, _, p)| p == path)
            .map(|(m, o, _)| (m.clone(), o.clone()))
            .unwrap_or_else(|| panic!("root lacks {path}:\n{}", ls.stdout))
    };
    let file_0755 = ("-rwxr-xr-x".to_string(), "0/0".to_string());
    let file_0644 = ("-rw-r--r--".to_string(), "0/0".to_string());
    let dir_0755 = ("drwxr-xr-x".to_string(), "0/0".to_string());
    assert_eq!(entry("/etc/kiln/greeting"), file_0644);
    assert_eq!(entry("/kiln/files/run/app/greeting"), file_0644);
    assert_eq!(entry("/kiln/config.json"), file_0644);
    for name in ["reg", "pinned", "layout", "archive"] {
        let r = format!("/containers/{name}/rootfs");
        assert_eq!(entry(&format!("{r}/bin/busybox")), file_0755);
        assert_eq!(entry(&format!("{r}/probe.sh")), file_0755);
        for mp in ["/proc", "/sys", "/dev", "/tmp", "/run"] {
            assert_eq!(entry(&format!("{r}{mp}")), dir_0755, "{name}{mp}");
        }
    }
    // Working directories the images lack are created; bind targets of
    // [[file]]s are empty files.
    assert_eq!(entry("/containers/reg/rootfs/srv/a"), dir_0755);
    assert_eq!(entry("/containers/pinned/rootfs/opt/x"), dir_0755);
    assert_eq!(entry("/containers/layout/rootfs/home/app"), dir_0755);
    assert_eq!(entry("/containers/reg/rootfs/etc/greeting"), file_0644);
    assert_eq!(entry("/containers/layout/rootfs/etc/passwd"), file_0644);
    // The decoy tag of the layout was not used.
    let config_json = k::run(
        Command::new("unsquashfs")
            .arg("-cat")
            .arg(&root)
            .arg("kiln/config.json"),
    );
    assert!(config_json.ok, "{}", config_json.stderr);
    assert!(
        !config_json.stdout.contains("layout-wrong-tag"),
        "{}",
        config_json.stdout
    );
    // File contents stay out of the config: only what the init copies.
    let config: serde_json::Value = serde_json::from_str(&config_json.stdout).unwrap();
    assert_eq!(
        config["files"],
        serde_json::json!([{"path": "/run/app/greeting", "mode": 0o644, "uid": 0, "gid": 0}])
    );

    // Boot once; every service prints its probe, then the host powers off.
    let r = k::boot(&kiln(), &image, 300);
    let console = &r.stdout;
    assert!(
        r.ok,
        "guest did not power off cleanly:\n{console}\n{}",
        r.stderr
    );
    let expected = [
        Expect {
            name: "reg",
            args: "1 reg-default",
            pwd: "/srv/a",
            ids: "0 0 groups 0",
            env: "FROM_IMAGE=registry-tag-moved OVERRIDE=image-a HOME=/",
            path: "/bin",
            root: true,
            netdev: "lo eth0",
            greeting: true,
        },
        Expect {
            name: "pinned",
            args: "1 reg-default",
            pwd: "/opt/x",
            ids: "1000 1000 groups 1000",
            env: "FROM_IMAGE=registry-pinned OVERRIDE=from-recipe HOME=/",
            path: "/bin",
            root: false,
            netdev: "lo",
            greeting: true,
        },
        Expect {
            name: "layout",
            args: "1 layout-default",
            pwd: "/home/app",
            ids: "1001 1002 groups 1002 29",
            env: "FROM_IMAGE=layout-v2 OVERRIDE= HOME=/home/app",
            path: "/bin:/usr/bin",
            root: false,
            netdev: "lo eth0",
            greeting: false,
        },
        Expect {
            name: "archive",
            args: "2 from-recipe two words",
            pwd: "/",
            ids: "0 0 groups 0",
            env: "FROM_IMAGE=archive-c OVERRIDE=from-recipe-archive HOME=/",
            path: DEFAULT_PATH,
            root: true,
            netdev: "lo eth0",
            greeting: true,
        },
    ];
    let mut netns = Vec::new();
    for e in &expected {
        let lines = container_lines(console, e.name);
        let (ns, rest): (Vec<&str>, Vec<&str>) =
            lines.iter().partition(|l| l.starts_with("netns "));
        assert_eq!(ns.len(), 1, "{}: {lines:?}\n{console}", e.name);
        netns.push(ns[0].to_string());
        assert_eq!(rest, e.lines(), "{} printed:\n{console}", e.name);
        let exited = format!("] {}: exited with status 0", e.name);
        assert!(
            console
                .lines()
                .any(|l| l.starts_with("kiln-init: [") && l.trim_end().ends_with(&exited)),
            "{} did not exit 0:\n{console}",
            e.name
        );
    }
    // Host networking is shared; net = "none" is a namespace of its own.
    assert_eq!(netns[0], netns[2], "{netns:?}");
    assert_eq!(netns[0], netns[3], "{netns:?}");
    assert_ne!(netns[0], netns[1], "{netns:?}");
    assert!(console.contains("powering off"), "{console}");
}

/// `unsquashfs -lln` lines as (mode, uid/gid, path below squashfs-root).
fn squashfs_listing(out: &str) -> Vec<(String, String, String)> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // mode owner size date time path [-> target]
            let at = f.iter().position(|p| p.starts_with("squashfs-root"))?;
            let path = f[at].strip_prefix("squashfs-root")?;
            Some((
                f.first()?.to_string(),
                f.get(1)?.to_string(),
                if path.is_empty() { "/" } else { path }.to_string(),
            ))
        })
        .collect()
}

/// A digest pin that matches nothing in the registry fails the build with
/// exit code 1, an error naming the reference and the digest, and no output.
#[test]
fn wrong_digest_pin_fails_the_build() {
    let Some(reg) = Registry::start() else {
        return;
    };
    let Some(img) = registry_image("registry-pinned") else {
        eprintln!("note: /bin/busybox (busybox-static) not installed; skipping");
        return;
    };
    let host = reg.host();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let real = rt.block_on(img.push(&host, "probe/a", "1"));
    let wrong = images::sha256(b"not the manifest of probe/a:1");
    assert_ne!(real, wrong);

    let dir = k::scratch("sources-wrong-digest");
    let reference = format!("{host}/probe/a:1@{wrong}");
    let recipe = dir.join("wrong.toml");
    std::fs::write(
        &recipe,
        format!(
            "name = \"wrong\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\n\n\
             [[service]]\nname = \"s\"\nimage = {}\n",
            toml_str(&reference)
        ),
    )
    .unwrap();
    let out = dir.join("out");
    let r = k::try_build(&kiln(), &recipe, &out);
    eprintln!("kiln build (expected to fail):\n{}", r.stderr);
    assert_eq!(r.code, Some(1), "stderr:\n{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(
        r.stderr.contains(&reference),
        "stderr does not name {reference}:\n{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&wrong),
        "stderr does not name {wrong}:\n{}",
        r.stderr
    );
    assert!(!out.join("wrong.raw").exists());
    k::assert_no_files(&out);
}

/// A lock keeps a registry tag on the digest it resolved to until
/// `kiln lock --update` moves it (printing the change); a digest pinned for
/// one repository is not served from the cache because another repository
/// had it.
#[test]
fn lock_pins_tags_until_updated() {
    let Some(reg) = Registry::start() else {
        return;
    };
    let (Some(one), Some(two)) = (registry_image("lock-one"), registry_image("lock-two")) else {
        eprintln!("note: /bin/busybox (busybox-static) not installed; skipping");
        return;
    };
    let host = reg.host();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let d1 = rt.block_on(one.push(&host, "probe/locked", "1"));

    let dir = k::scratch("sources-lock");
    let recipe = dir.join("locked.toml");
    let write_recipe = |image: &str| {
        std::fs::write(
            &recipe,
            format!(
                "name = \"locked\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\n\n\
                 [[service]]\nname = \"s\"\nimage = {}\n",
                toml_str(image)
            ),
        )
        .unwrap();
    };
    write_recipe(&format!("{host}/probe/locked:1"));
    let kiln_cmd = |args: &[&str]| {
        let mut c = Command::new(kiln());
        c.args(args)
            .arg(&recipe)
            .arg("--cache")
            .arg(k::shared_cache());
        k::run(&mut c)
    };
    let r = kiln_cmd(&["lock"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout
            .contains(&format!("s: {host}/probe/locked:1 added")),
        "{}",
        r.stdout
    );
    let lock_path = dir.join("locked.lock");
    assert!(std::fs::read_to_string(&lock_path).unwrap().contains(&d1));

    // The tag moves; the lock does not.
    let d2 = rt.block_on(two.push(&host, "probe/locked", "1"));
    assert_ne!(d1, d2);
    let out = dir.join("out");
    let pinned_digest = |out: &Path| {
        k::read_json(&out.join("locked.plan.json"))["image"][0]["digest"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let r = kiln_cmd(&["build", "--quiet", "--locked", "-o", out.to_str().unwrap()]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(pinned_digest(&out), d1);

    let r = kiln_cmd(&["lock", "--update"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains(&format!("{d1} -> {d2}")), "{}", r.stdout);
    let r = kiln_cmd(&["lock"]);
    assert!(r.stdout.contains("up to date"), "{}", r.stdout);
    let r = kiln_cmd(&["build", "--quiet", "--locked", "-o", out.to_str().unwrap()]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(pinned_digest(&out), d2);

    // A recipe change is drift for --locked: exit 2, nothing written.
    write_recipe(&format!("{host}/probe/locked:1@{d1}"));
    let out2 = dir.join("out2");
    let r = kiln_cmd(&["build", "--quiet", "--locked", "-o", out2.to_str().unwrap()]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("--locked"), "{}", r.stderr);
    k::assert_no_files(&out2);

    // d1 is cached (probe/locked served it), but probe/other never had it.
    std::fs::remove_file(&lock_path).unwrap();
    write_recipe(&format!("{host}/probe/other:1@{d1}"));
    let r = kiln_cmd(&["build", "--quiet", "-o", out2.to_str().unwrap()]);
    assert_eq!(
        r.code,
        Some(1),
        "a digest of another repository was accepted"
    );
    assert!(r.stderr.contains("probe/other"), "{}", r.stderr);
    k::assert_no_files(&out2);
}

/// A registry on a non-loopback address (a veth into a network namespace
/// the test creates) is spoken to over HTTPS unless named insecure, with
/// `--insecure-registry` or in `$XDG_CONFIG_HOME/kiln/config.toml`; the
/// HTTPS failure shows its cause.
#[test]
fn insecure_registry_on_a_non_loopback_address() {
    let Some(ns) = TestNetns::create() else {
        return;
    };
    let Some(reg) = Registry::start_in_netns(&ns.name, &ns.ip) else {
        return;
    };
    let Some(img) = registry_image("insecure") else {
        eprintln!("note: /bin/busybox (busybox-static) not installed; skipping");
        return;
    };
    let host = reg.host();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let digest = rt.block_on(img.push(&host, "probe/insecure", "1"));

    let dir = k::scratch("sources-insecure");
    let recipe = dir.join("insecure.toml");
    std::fs::write(
        &recipe,
        format!(
            "name = \"insecure\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\n\n\
             [[service]]\nname = \"s\"\nimage = {}\n",
            toml_str(&format!("{host}/probe/insecure:1"))
        ),
    )
    .unwrap();
    let out = dir.join("out");
    let build = |extra: &[&str], config_home: &Path| {
        let mut c = Command::new(kiln());
        c.env("XDG_CONFIG_HOME", config_home)
            .args(["build", "--quiet"])
            .args(extra)
            .arg(&recipe)
            .arg("-o")
            .arg(&out)
            .arg("--cache")
            .arg(k::shared_cache());
        k::run(&mut c)
    };
    let no_config = dir.join("no-config");
    let r = build(&[], &no_config);
    assert_eq!(
        r.code,
        Some(1),
        "HTTPS to a plain-HTTP registry succeeded?\n{}",
        r.stderr
    );
    assert!(r.stderr.contains(&host), "{}", r.stderr);
    let lower = r.stderr.to_lowercase();
    assert!(
        ["tls", "ssl", "certificate", "corrupt", "handshake"]
            .iter()
            .any(|w| lower.contains(w)),
        "the cause is not shown:\n{}",
        r.stderr
    );
    k::assert_no_files(&out);

    let r = build(&["--insecure-registry", &host], &no_config);
    assert!(r.ok, "{}", r.stderr);
    let plan = k::read_json(&out.join("insecure.plan.json"));
    assert_eq!(plan["image"][0]["digest"], digest.as_str());

    // The same from the config file (no lock: the tag is resolved again).
    std::fs::remove_file(dir.join("insecure.lock")).unwrap();
    let config = dir.join("config");
    std::fs::create_dir_all(config.join("kiln")).unwrap();
    std::fs::write(
        config.join("kiln/config.toml"),
        format!("insecure_registries = [{}]\n", toml_str(&host)),
    )
    .unwrap();
    let r = build(&[], &config);
    assert!(r.ok, "{}", r.stderr);
}
