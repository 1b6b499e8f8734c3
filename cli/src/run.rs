//! `kiln run`: boot an image under QEMU with OVMF, serial console on stdout.

use anyhow::{bail, Context, Result};
use kiln_init::config::{RunResult, RESULT_PREFIX};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Image to boot: a raw, qcow2, VHD or VMDK disk, a GCE tarball, an
    /// ISO, a kernel (NAME-kernel) or a UKI, told by its content.
    image: PathBuf,
    /// Use KVM instead of TCG software emulation.
    #[arg(long)]
    kvm: bool,
    /// Kill the guest after this many seconds and exit non-zero.
    #[arg(long)]
    timeout: Option<u64>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// OVMF firmware code (read-only).
    #[arg(long, default_value = "/usr/share/OVMF/OVMF_CODE_4M.fd")]
    ovmf_code: PathBuf,
    /// OVMF variable store template; the guest gets a private copy.
    #[arg(long, default_value = "/usr/share/OVMF/OVMF_VARS_4M.fd")]
    ovmf_vars: PathBuf,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// A network card, repeatable (one each): `restricted` (the default:
    /// user-mode networking that reaches nothing past QEMU but what
    /// --publish allows), `user` (outbound NAT through this machine,
    /// which includes its networks and, on a cloud VM, its metadata
    /// service and credentials), or `none` (no card).
    #[arg(long = "net", value_enum)]
    nets: Vec<NetMode>,
    /// Publish a guest port on this machine, [ADDR:]HOST:GUEST[/tcp|udp]
    /// (ADDR 127.0.0.1 unless given), through the first card. Repeatable.
    #[arg(long)]
    publish: Vec<String>,
    /// Let the guest reach GUEST_IP:PORT (an address inside the user-mode
    /// network, 10.0.2.0/24), each connection forwarded to HOST_PORT on
    /// this machine's 127.0.0.1, through the first card. Repeatable.
    #[arg(long)]
    forward: Vec<String>,
    /// With `--net user`, let the guest's init ask the metadata service it
    /// would reach, which is this machine's own on a cloud VM (by default
    /// it is told not to, through an SMBIOS string systemd-stub adds to the
    /// kernel command line: `kiln.metadata=off`).
    #[arg(long)]
    allow_host_metadata: bool,
    /// Attach another drive (virtio): an `.iso` read
    /// only (a NoCloud or OpenStack config drive), a `.qcow2`, or raw; a
    /// data disk is written in place. Repeatable.
    #[arg(long)]
    disk: Vec<PathBuf>,
    /// Attach an ISO image as a disk (as if written to a USB stick), not
    /// as a CD-ROM.
    #[arg(long)]
    as_disk: bool,
    /// Write to the image as a VM writes to its disk: what an A/B slot's
    /// boots leave (tries used, marked good), updates, the data
    /// partition. Without it the image is left as built (a throw-away
    /// overlay takes the writes; within one run, across the guest's
    /// reboots, they persist).
    #[arg(long)]
    persist: bool,
}

/// What systemd-stub appends to the kernel command line from SMBIOS
/// (type 11), when Secure Boot is off as with OVMF's default variables.
const CMDLINE_EXTRA: &str = "io.systemd.stub.kernel-cmdline-extra=";

/// What a `--net` card reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum NetMode {
    Restricted,
    User,
    None,
}

/// QEMU's `hostfwd` for a `--publish` value.
fn hostfwd(spec: &str) -> Result<String> {
    let (ports, proto) = match spec.rsplit_once('/') {
        Some((p, proto @ ("tcp" | "udp"))) => (p, proto),
        Some(_) => bail!("--publish {spec}: the protocol is tcp or udp"),
        None => (spec, "tcp"),
    };
    let parts: Vec<&str> = ports.split(':').collect();
    let (addr, host, guest) = match parts[..] {
        [host, guest] => ("127.0.0.1", host, guest),
        [addr, host, guest] => (addr, host, guest),
        _ => bail!("--publish {spec}: expected [ADDR:]HOST:GUEST[/tcp|udp]"),
    };
    if addr.parse::<std::net::Ipv4Addr>().is_err() {
        bail!("--publish {spec}: {addr} is not an IPv4 address");
    }
    for p in [host, guest] {
        if !p.parse::<u16>().is_ok_and(|p| p > 0) {
            bail!("--publish {spec}: {p} is not a port (1 to 65535)");
        }
    }
    Ok(format!("hostfwd={proto}:{addr}:{host}-:{guest}"))
}

/// QEMU's `guestfwd` for a `--forward` value: a `kiln relay` per
/// connection (QEMU's socket form opens one connection, at start).
fn guestfwd(spec: &str, kiln: &Path) -> Result<String> {
    let parsed = spec.split_once('=').and_then(|(guest, host)| {
        let (ip, port) = guest.rsplit_once(':')?;
        Some((
            ip.parse::<std::net::Ipv4Addr>().ok()?,
            port.parse::<u16>().ok().filter(|&p| p > 0)?,
            host.parse::<u16>().ok().filter(|&p| p > 0)?,
        ))
    });
    let Some((ip, port, host)) = parsed else {
        bail!("--forward {spec}: expected GUEST_IP:PORT=HOST_PORT");
    };
    let kiln = kiln.display().to_string();
    if kiln.contains(char::is_whitespace) {
        bail!("--forward: kiln's path {kiln} has spaces, which QEMU's guestfwd cannot pass");
    }
    // Commas are doubled in QEMU's option syntax.
    Ok(format!(
        "guestfwd=tcp:{ip}:{port}-cmd:{} relay 127.0.0.1:{host}",
        kiln.replace(',', ",,")
    ))
}

/// `kiln relay`: stdin to the connection, the connection to stdout.
pub fn relay(to: std::net::SocketAddr) -> Result<ExitCode> {
    let conn = std::net::TcpStream::connect(to).with_context(|| format!("connecting to {to}"))?;
    let mut up = conn.try_clone()?;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut up);
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    let mut down = conn;
    // Flushed per read: stdout is line-buffered, which would hold back a
    // body's last bytes when they end without a newline.
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = std::io::Read::read(&mut down, &mut buf)?;
        if n == 0 {
            return Ok(ExitCode::SUCCESS);
        }
        std::io::Write::write_all(&mut out, &buf[..n])?;
        std::io::Write::flush(&mut out)?;
    }
}

/// `-drive` arguments for `--disk` files.
fn disk_args(disks: &[PathBuf]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for d in disks {
        if !d.is_file() {
            bail!("--disk {}: not found (or not a file)", d.display());
        }
        let ext = d.extension().and_then(|e| e.to_str()).unwrap_or("");
        let opts = match ext {
            "iso" => "if=virtio,format=raw,readonly=on",
            "qcow2" => "if=virtio,format=qcow2",
            _ => "if=virtio,format=raw",
        };
        out.push("-drive".to_string());
        out.push(drive_arg(opts, d));
    }
    Ok(out)
}

/// Under `--net user` the guest could reach this machine's metadata
/// service (its cloud credentials): its init is told to ask none.
fn metadata_args(nets: &[NetMode], allow: bool) -> Vec<String> {
    if nets.contains(&NetMode::User) && !allow {
        vec![
            "-smbios".into(),
            format!("type=11,value={CMDLINE_EXTRA}kiln.metadata=off"),
        ]
    } else {
        Vec::new()
    }
}

/// `-nic` arguments for the cards asked for.
fn nic_args(nets: &[NetMode], publish: &[String], forward: &[String]) -> Result<Vec<String>> {
    let nets = if nets.is_empty() {
        &[NetMode::Restricted][..]
    } else {
        nets
    };
    if nets.contains(&NetMode::None) {
        if nets.len() > 1 {
            bail!("--net none is no card: it cannot be combined with others");
        }
        if !publish.is_empty() || !forward.is_empty() {
            bail!("--publish and --forward need a network card (not --net none)");
        }
        return Ok(vec!["-nic".into(), "none".into()]);
    }
    let mut fwd = Vec::new();
    for p in publish {
        fwd.push(hostfwd(p)?);
    }
    if !forward.is_empty() {
        let kiln = std::env::current_exe().context("finding kiln's own path for --forward")?;
        for f in forward {
            fwd.push(guestfwd(f, &kiln)?);
        }
    }
    let mut out = Vec::new();
    for (i, n) in nets.iter().enumerate() {
        let mut nic = String::from("user,model=virtio-net-pci");
        if *n == NetMode::Restricted {
            nic.push_str(",restrict=on");
        }
        if i == 0 {
            for f in &fwd {
                nic.push(',');
                nic.push_str(f);
            }
        }
        out.push("-nic".into());
        out.push(nic);
    }
    Ok(out)
}

/// An image to boot, its form told by its content: a disk (what QEMU
/// reads it with, and where: a GCE tarball's disk or a UKI's generated
/// ESP is a temp file), or a kernel to boot directly.
struct Disk {
    driver: &'static str,
    path: PathBuf,
    /// Kernel, initrd and command line, for direct boot (no drive).
    direct: Option<(PathBuf, PathBuf, String)>,
    /// An ISO attached as a CD-ROM.
    cdrom: bool,
    _unpacked: Option<TempFile>,
}

impl Disk {
    /// QEMU's arguments for it; `persist`: writes reach the file.
    fn args(&self, persist: bool) -> Vec<std::ffi::OsString> {
        match &self.direct {
            Some((kernel, initrd, cmdline)) => vec![
                "-kernel".into(),
                kernel.into(),
                "-initrd".into(),
                initrd.into(),
                "-append".into(),
                cmdline.into(),
            ],
            None if self.cdrom => vec![
                "-drive".into(),
                drive_arg("media=cdrom,format=raw,readonly=on", &self.path).into(),
            ],
            None => vec![
                "-drive".into(),
                // Unless asked, the image stays as built: boot a
                // throw-away overlay of it.
                drive_arg(
                    &format!(
                        "if=virtio,format={},snapshot={}",
                        self.driver,
                        if persist && self._unpacked.is_none() {
                            "off"
                        } else {
                            "on"
                        }
                    ),
                    &self.path,
                )
                .into(),
            ],
        }
    }

    fn detect(image: &Path, as_disk: bool) -> Result<Disk> {
        use std::os::unix::fs::FileExt;
        let f =
            std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
        let len = f.metadata()?.len();
        let mut head = [0u8; 1024];
        let mut tail = [0u8; 512];
        let _ = f.read_at(&mut head, 0)?;
        if len >= 512 {
            f.read_exact_at(&mut tail, len - 512)?;
        }
        let plain = |driver| Disk {
            driver,
            path: image.to_path_buf(),
            direct: None,
            cdrom: false,
            _unpacked: None,
        };
        let mut vd = [0u8; 6];
        let _ = f.read_at(&mut vd, 0x8000)?;
        if &vd[1..6] == b"CD001" {
            return Ok(Disk {
                cdrom: !as_disk,
                ..plain("raw")
            });
        }
        if head.starts_with(b"QFI\xfb") {
            return Ok(plain("qcow2"));
        }
        if head.starts_with(b"KDMV") {
            return Ok(plain("vmdk"));
        }
        // A dynamic VHD starts with its footer, a fixed one ends with it.
        if head.starts_with(b"conectix") || tail.starts_with(b"conectix") {
            return Ok(plain("vpc"));
        }
        if head.starts_with(&[0x1f, 0x8b]) {
            return unpack_gce(image);
        }
        // A bzImage (its setup header at 0x202), or another PE: a UKI.
        if head.starts_with(b"MZ") {
            return if &head[0x202..0x206] == b"HdrS" {
                direct_boot(image)
            } else {
                esp_for_uki(image)
            };
        }
        // Refuse what OVMF would only boot into its shell after a timeout.
        let mut f = f;
        kiln_formats::gpt::read_table(&mut f).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a bootable disk image (no GPT: {e})",
                image.display()
            )
        })?;
        Ok(plain("raw"))
    }
}

/// Unpacks `disk.raw` from a GCE image tarball into a sparse temp file.
fn unpack_gce(image: &Path) -> Result<Disk> {
    let f = std::fs::File::open(image)?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let temp = TempFile(std::env::temp_dir().join(format!("kiln-gce-{}.raw", std::process::id())));
    for entry in archive
        .entries()
        .with_context(|| format!("{}: not a tar.gz", image.display()))?
    {
        let mut entry = entry.with_context(|| format!("reading {}", image.display()))?;
        if entry.path()?.as_os_str() != "disk.raw" {
            continue;
        }
        let mut out = std::fs::File::create(&temp.0)
            .with_context(|| format!("creating {}", temp.0.display()))?;
        // Holes stay holes: zero blocks are skipped, not written.
        let mut buf = vec![0u8; 64 << 10];
        let mut at = 0u64;
        loop {
            let n = read_full(&mut entry, &mut buf)
                .with_context(|| format!("reading disk.raw from {}", image.display()))?;
            if n == 0 {
                break;
            }
            if buf[..n].iter().any(|&b| b != 0) {
                std::os::unix::fs::FileExt::write_all_at(&out, &buf[..n], at)?;
            }
            at += n as u64;
        }
        out.set_len(at)?;
        out.flush()?;
        return Ok(Disk {
            driver: "raw",
            path: temp.0.clone(),
            direct: None,
            cdrom: false,
            _unpacked: Some(temp),
        });
    }
    bail!("{}: no disk.raw in this tarball", image.display())
}

/// `NAME-kernel` with `NAME-initrd.img` and `NAME-cmdline` beside it.
fn direct_boot(kernel: &Path) -> Result<Disk> {
    let name = kernel.to_string_lossy();
    let Some(stem) = name.strip_suffix("-kernel") else {
        bail!(
            "{}: a kernel to boot directly is named NAME-kernel, with NAME-initrd.img and NAME-cmdline beside it",
            kernel.display()
        );
    };
    let initrd = PathBuf::from(format!("{stem}-initrd.img"));
    let cmdline_path = PathBuf::from(format!("{stem}-cmdline"));
    if !initrd.is_file() {
        bail!("{}: not found (the kernel's initrd)", initrd.display());
    }
    let cmdline = std::fs::read_to_string(&cmdline_path).with_context(|| {
        format!(
            "reading {} (the kernel's command line)",
            cmdline_path.display()
        )
    })?;
    Ok(Disk {
        driver: "raw",
        path: kernel.to_path_buf(),
        direct: Some((kernel.to_path_buf(), initrd, cmdline.trim().to_string())),
        cdrom: false,
        _unpacked: None,
    })
}

/// A temp disk whose ESP holds the UKI as the removable-media boot
/// loader, so OVMF starts it.
fn esp_for_uki(uki: &Path) -> Result<Disk> {
    use kiln_formats::{disk, fat, gpt, tree};
    let data = std::fs::File::open(uki).with_context(|| format!("opening {}", uki.display()))?;
    let len = data.metadata()?.len();
    let backing = tree::Backing::new(data, uki.display().to_string());
    let mut t = tree::Tree::new();
    t.insert(
        Path::new("/EFI/BOOT/BOOTX64.EFI"),
        tree::Node::File {
            meta: tree::Meta::root(0o644),
            data: tree::FileData::extent(&backing, 0, len),
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let size = ((len + len / 4 + (8 << 20)).max(64 << 20)).div_ceil(1 << 20) << 20;
    let esp = fat::plan_fat32(&t, size, 0x6b69_6c6e, "KILN-ESP")
        .map_err(|e| anyhow::anyhow!("ESP for {}: {e}", uki.display()))?;
    let layout = disk::Layout {
        disk_guid: gpt::Guid::derive("kiln run uki disk", &len.to_le_bytes()),
        size: esp.size() + (2 << 20),
        partitions: vec![disk::PartitionSpec {
            name: "esp".into(),
            type_guid: gpt::ESP_TYPE,
            guid: gpt::Guid::derive("kiln run uki esp", &len.to_le_bytes()),
            size: esp.size(),
            attributes: 0,
        }],
    };
    let temp = TempFile(std::env::temp_dir().join(format!("kiln-uki-{}.raw", std::process::id())));
    let out =
        std::fs::File::create(&temp.0).with_context(|| format!("creating {}", temp.0.display()))?;
    disk::write_raw(&layout, vec![Box::new(fat::FatImage::reader(&esp))], out)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", temp.0.display()))?;
    Ok(Disk {
        driver: "raw",
        path: temp.0.clone(),
        direct: None,
        cdrom: false,
        _unpacked: Some(temp),
    })
}

/// Reads until `buf` is full or the input ends.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Removes the private OVMF vars copy however `run` ends.
struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn run(a: &RunArgs) -> Result<ExitCode> {
    if !a.image.is_file() {
        bail!("{}: not found (or not a file)", a.image.display());
    }
    let disk = Disk::detect(&a.image, a.as_disk)?;
    for (what, p) in [("OVMF code", &a.ovmf_code), ("OVMF vars", &a.ovmf_vars)] {
        if !p.is_file() {
            bail!(
                "{what} {} not found (Debian/Ubuntu: apt-get install ovmf qemu-system-x86)",
                p.display()
            );
        }
    }
    let vars =
        TempFile(std::env::temp_dir().join(format!("kiln-ovmf-vars-{}.fd", std::process::id())));
    std::fs::copy(&a.ovmf_vars, &vars.0)
        .with_context(|| format!("copying {} to {}", a.ovmf_vars.display(), vars.0.display()))?;
    let qmp = TempFile(std::env::temp_dir().join(format!("kiln-qmp-{}.sock", std::process::id())));
    let _ = std::fs::remove_file(&qmp.0);
    // Registered before QEMU starts, so no signal is missed.
    let signals = watch_signals()?;
    // Keys go to the guest's serial console when a person is typing.
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());

    let mut cmd = Command::new(&a.qemu);
    cmd.args([
        "-machine",
        "q35",
        "-accel",
        if a.kvm { "kvm" } else { "tcg" },
    ])
    .args(["-m", &a.memory.to_string(), "-smp", &a.cpus.to_string()])
    // A guest's reboot restarts the machine, as a VM's would: A/B updates
    // and rollbacks take one.
    .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
    .args(nic_args(&a.nets, &a.publish, &a.forward)?)
    .args(metadata_args(&a.nets, a.allow_host_metadata))
    .args(disk_args(&a.disk)?)
    .arg("-qmp")
    .arg(format!(
        "unix:{},server=on,wait=off",
        qmp.0.display().to_string().replace(',', ",,")
    ))
    .arg("-drive")
    .arg(drive_arg("if=pflash,format=raw,readonly=on", &a.ovmf_code))
    .arg("-drive")
    .arg(drive_arg("if=pflash,format=raw", &vars.0))
    .args(disk.args(a.persist))
    .stdin(if interactive {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "starting {} (apt-get install qemu-system-x86)",
            a.qemu.display()
        )
    })?;
    let console = child.stdout.take().context("QEMU's console")?;
    let watcher = std::thread::spawn(move || forward_console(console, std::io::stdout()));
    let (quit_tx, quit) = std::sync::mpsc::channel();
    // Restores the terminal however this function returns.
    let _terminal = match child.stdin.take() {
        Some(keys) => {
            let t = RawTerminal::enter().context("setting the terminal up for the console")?;
            eprintln!("kiln: console attached (Ctrl-A X quits)");
            std::thread::spawn(move || forward_keys(keys, quit_tx));
            Some(t)
        }
        None => None,
    };

    let deadline = a.timeout.map(|s| Instant::now() + Duration::from_secs(s));
    // Set by SIGINT/SIGTERM: the exit status, and when to stop waiting.
    let mut interrupted: Option<(u8, Instant)> = None;
    loop {
        if let Ok(code) = signals.try_recv() {
            match interrupted {
                None => {
                    eprintln!("kiln: asking the guest to shut down (again to stop it now)");
                    if let Err(e) = powerdown(&qmp.0) {
                        eprintln!("kiln: QMP: {e}; stopping the guest");
                        let _ = child.kill();
                    }
                    interrupted = Some((code, Instant::now() + SHUTDOWN_GRACE));
                }
                Some(_) => {
                    let _ = child.kill();
                }
            }
        }
        if quit.try_recv().is_ok() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = watcher.join();
            eprintln!("kiln: quit (Ctrl-A X): guest stopped");
            return Ok(ExitCode::from(130));
        }
        if let Some(status) = child.try_wait()? {
            let result = watcher.join().unwrap_or(None);
            if let Some((code, _)) = interrupted {
                return Ok(ExitCode::from(code));
            }
            if !status.success() {
                eprintln!("kiln: QEMU exited with {status}");
                return Ok(ExitCode::FAILURE);
            }
            return Ok(match result {
                Some(r) if r.failed_essential.is_empty() => ExitCode::SUCCESS,
                Some(r) => {
                    eprintln!(
                        "kiln: the guest powered off with failed essential containers: {}",
                        r.failed_essential.join(", ")
                    );
                    ExitCode::from(EXIT_FAILED_ESSENTIAL)
                }
                None => {
                    eprintln!("kiln: the guest stopped without its init's final report (a crash or panic?)");
                    ExitCode::from(EXIT_NO_REPORT)
                }
            });
        }
        if interrupted.is_some_and(|(_, d)| Instant::now() >= d) {
            eprintln!(
                "kiln: the guest did not power off within {}s: stopped",
                SHUTDOWN_GRACE.as_secs()
            );
            let _ = child.kill();
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = watcher.join();
            eprintln!(
                "kiln: guest still running after {}s: killed",
                a.timeout.unwrap_or(0)
            );
            return Ok(ExitCode::from(124));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How long a guest asked to shut down may take before QEMU is stopped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// SIGINT and SIGTERM, as the exit status they give (130, 143), from a
/// thread that waits for them.
fn watch_signals() -> Result<std::sync::mpsc::Receiver<u8>> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting the signal watcher")?;
    let (mut int, mut term) = {
        let _entered = rt.enter();
        (
            signal(SignalKind::interrupt()).context("watching SIGINT")?,
            signal(SignalKind::terminate()).context("watching SIGTERM")?,
        )
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        rt.block_on(async move {
            loop {
                let code = tokio::select! {
                    _ = int.recv() => 130,
                    _ = term.recv() => 143,
                };
                if tx.send(code).is_err() {
                    return;
                }
            }
        })
    });
    Ok(rx)
}

/// Presses the guest's ACPI power button through QEMU's QMP socket.
fn powerdown(socket: &Path) -> std::io::Result<()> {
    use std::io::BufRead;
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut r = std::io::BufReader::new(s.try_clone()?);
    let reply = |r: &mut std::io::BufReader<_>| -> std::io::Result<()> {
        // Events may come first: the answer has `return` or `error`.
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if line.contains("\"error\"") {
                return Err(std::io::Error::other(line.trim().to_string()));
            }
            if line.contains("\"return\"") {
                return Ok(());
            }
        }
    };
    let mut greeting = String::new();
    r.read_line(&mut greeting)?;
    s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
    reply(&mut r)?;
    s.write_all(b"{\"execute\":\"system_powerdown\"}\n")?;
    reply(&mut r)
}

/// Exit status: the guest reported failed essential containers.
pub const EXIT_FAILED_ESSENTIAL: u8 = 3;
/// Exit status: the guest stopped without the init's final report.
pub const EXIT_NO_REPORT: u8 = 4;

/// Copies the guest's console to `out` as it comes, and returns the
/// init's final report if a line carried one.
fn forward_console(mut from: impl Read, mut out: impl Write) -> Option<RunResult> {
    let mut buf = [0u8; 8192];
    let mut line = Vec::new();
    let mut result = None;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return result,
            Ok(n) => n,
        };
        let _ = out.write_all(&buf[..n]).and_then(|()| out.flush());
        for &b in &buf[..n] {
            if b != b'\n' {
                // A report line is short; longer lines are not one.
                if line.len() < 4096 {
                    line.push(b);
                }
                continue;
            }
            let text = String::from_utf8_lossy(&line);
            if let Some(json) = text.trim_end_matches('\r').strip_prefix(RESULT_PREFIX) {
                result = serde_json::from_str(json).ok();
            }
            line.clear();
        }
    }
}

/// The terminal's modes as they were, put back when dropped.
struct RawTerminal(rustix::termios::Termios);

impl RawTerminal {
    /// Sets stdin's terminal as QEMU's `-serial stdio` does: keys reach
    /// the guest as typed (Ctrl-C too), output keeps its line endings.
    fn enter() -> std::io::Result<RawTerminal> {
        use rustix::termios::{tcgetattr, tcsetattr, OptionalActions, OutputModes};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        raw.output_modes |= OutputModes::OPOST;
        tcsetattr(&stdin, OptionalActions::Now, &raw)?;
        Ok(RawTerminal(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        use rustix::termios::{tcsetattr, OptionalActions};
        let _ = tcsetattr(std::io::stdin(), OptionalActions::Now, &self.0);
    }
}

/// Keys typed at the console, read QEMU's way: Ctrl-A X quits, Ctrl-A
/// Ctrl-A types one Ctrl-A, Ctrl-A and another key is dropped, the rest
/// goes to the guest.
#[derive(Default)]
struct Keys {
    /// The last key was Ctrl-A.
    escape: bool,
}

const CTRL_A: u8 = 0x01;

impl Keys {
    /// Appends what `input` sends to the guest to `out`; true on Ctrl-A X
    /// (what follows it is not read).
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &b in input {
            if std::mem::take(&mut self.escape) {
                match b {
                    b'x' | b'X' => return true,
                    CTRL_A => out.push(CTRL_A),
                    _ => {}
                }
            } else if b == CTRL_A {
                self.escape = true;
            } else {
                out.push(b);
            }
        }
        false
    }
}

/// Copies keys from stdin to QEMU's serial input until Ctrl-A X, which
/// it reports on `quit`, or the end of either side.
fn forward_keys(mut to: std::process::ChildStdin, quit: std::sync::mpsc::Sender<()>) {
    let mut keys = Keys::default();
    let mut buf = [0u8; 256];
    let mut stdin = std::io::stdin().lock();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut out = Vec::new();
        let stop = keys.feed(&buf[..n], &mut out);
        if !out.is_empty() && to.write_all(&out).and_then(|()| to.flush()).is_err() {
            return;
        }
        if stop {
            let _ = quit.send(());
            return;
        }
    }
}

/// `-drive` value; QEMU needs commas in file names doubled.
fn drive_arg(opts: &str, file: &Path) -> String {
    format!(
        "{opts},file={}",
        file.display().to_string().replace(',', ",,")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_keys_as_qemu_reads_them() {
        let mut k = Keys::default();
        let mut out = Vec::new();
        assert!(!k.feed(b"ls\r\x03", &mut out));
        assert_eq!(out, b"ls\r\x03");
        out.clear();
        // Ctrl-A Ctrl-A is one Ctrl-A; Ctrl-A and another key: nothing.
        assert!(!k.feed(&[CTRL_A, CTRL_A, b'a', CTRL_A, b'c', b'b'], &mut out));
        assert_eq!(out, [CTRL_A, b'a', b'b']);
        out.clear();
        // Split across reads, and what follows the quit is not sent.
        assert!(!k.feed(b"q\x01", &mut out));
        assert!(k.feed(b"Xzz", &mut out));
        assert_eq!(out, b"q");
    }

    #[test]
    fn forwards_run_a_relay_per_connection() {
        let k = Path::new("/opt/k,1/kiln");
        assert_eq!(
            guestfwd("10.0.2.100:80=8080", k).unwrap(),
            "guestfwd=tcp:10.0.2.100:80-cmd:/opt/k,,1/kiln relay 127.0.0.1:8080"
        );
        for bad in [
            "10.0.2.100:80",
            "x:80=1",
            "10.0.2.100:0=1",
            "10.0.2.100:80=http",
        ] {
            let e = guestfwd(bad, k).unwrap_err().to_string();
            assert!(e.contains("GUEST_IP:PORT=HOST_PORT"), "{e}");
        }
        assert!(guestfwd("10.0.2.100:80=1", Path::new("/a b/kiln")).is_err());
    }

    #[test]
    fn user_networking_keeps_the_guest_off_host_metadata() {
        let user = [NetMode::Restricted, NetMode::User];
        assert_eq!(
            metadata_args(&user, false),
            [
                "-smbios",
                "type=11,value=io.systemd.stub.kernel-cmdline-extra=kiln.metadata=off"
            ]
        );
        assert!(metadata_args(&user, true).is_empty());
        assert!(metadata_args(&[], false).is_empty());
        assert!(metadata_args(&[NetMode::Restricted], false).is_empty());
    }

    #[test]
    fn network_cards() {
        let nic = |nets: &[NetMode], publish: &[&str]| {
            let p: Vec<String> = publish.iter().map(|s| s.to_string()).collect();
            nic_args(nets, &p, &[]).map_err(|e| e.to_string())
        };
        assert_eq!(
            nic(&[], &["8080:80", "0.0.0.0:5353:53/udp"]).unwrap(),
            [
                "-nic",
                "user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp:0.0.0.0:5353-:53"
            ]
        );
        assert_eq!(
            nic(&[NetMode::Restricted, NetMode::User], &[]).unwrap(),
            [
                "-nic",
                "user,model=virtio-net-pci,restrict=on",
                "-nic",
                "user,model=virtio-net-pci"
            ]
        );
        assert_eq!(nic(&[NetMode::None], &[]).unwrap(), ["-nic", "none"]);
        for (nets, publish, says) in [
            (&[NetMode::None][..], &["80:80"][..], "need a network card"),
            (
                &[NetMode::None, NetMode::User][..],
                &[][..],
                "cannot be combined",
            ),
            (&[][..], &["80"][..], "expected [ADDR:]HOST:GUEST"),
            (&[][..], &["80:0"][..], "not a port"),
            (&[][..], &["80:80/sctp"][..], "tcp or udp"),
            (&[][..], &["host:80:80"][..], "not an IPv4 address"),
        ] {
            let e = nic(nets, publish).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn the_console_is_copied_and_the_report_read() {
        let console = b"boot\r\nweb| kiln-init: result {\"failed_essential\":[\"x\"]}\r\nkiln-init: result {\"failed_essential\":[\"db\"]}\r\npowering off\r\n";
        let mut out = Vec::new();
        let r = forward_console(&console[..], &mut out);
        assert_eq!(out, console);
        // Only the init's own line counts, not a container's.
        assert_eq!(r.unwrap().failed_essential, ["db"]);
        assert!(forward_console(&b"panic\n"[..], std::io::sink()).is_none());
    }
}
