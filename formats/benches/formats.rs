//! Speed and size of kiln's encoders against the standard tools on the same
//! input: `cargo bench -p kiln-formats --bench formats`.
//!
//! The input tree is a deterministic selection of the host's files (sorted
//! walk of /usr/share/doc and /usr/lib/x86_64-linux-gnu up to a byte budget),
//! loaded into a [`Tree`] for our writers and written to a scratch
//! directory for the tools, which then read it from the page cache. Every
//! case writes a file in the same scratch directory, runs several times and
//! reports the median. Ratios are ours / tool: below 1 means we are faster
//! or smaller.
//!
//! Environment: `KILN_BENCH_MB` (input budget, default 48: the
//! squashfs cases dominate and must stay quick on 2 cores),
//! `KILN_BENCH_RUNS` (runs per case, default 3).

use std::error::Error;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime};

use kiln_formats::disk::{self, Layout, PartitionSpec};
use kiln_formats::fat;
use kiln_formats::gpt::{Guid, ESP_TYPE, LINUX_ROOT_X86_64_TYPE};
use kiln_formats::squashfs::{self, Compression, SquashfsOptions};
use kiln_formats::tree::{Meta, Node, Tree};
use kiln_formats::{cpio, tree::Dir};

type Res<T> = Result<T, Box<dyn Error>>;

const MIB: u64 = 1 << 20;
/// Files above this are skipped so one library cannot eat the budget.
const MAX_FILE: u64 = 12 * MIB;
const ESP_SIZE: u64 = 64 * MIB;
const DISK_SIZE: u64 = 1 << 30;
const VOLUME_ID: u32 = 0x1234_5678;

/// Median wall time and output size of one side of a case.
#[derive(Clone, Copy)]
struct Measure {
    ms: f64,
    /// CPU time of this process plus waited-for children: robust against
    /// other load on the machine, and shows what extra threads cost.
    cpu_ms: f64,
    bytes: u64,
}

struct Row {
    case: String,
    ours: Option<Measure>,
    tool: Option<Measure>,
    note: String,
}

/// Removes the scratch directory however the run ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v| v > 0)
        .unwrap_or(default)
}

/// The tool's path, looking in `PATH` and the sbin directories that
/// non-login shells often leave out.
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn run(cmd: &mut Command) -> Res<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}

/// Runs `f` `runs` times after removing `out`; the median wall and CPU
/// times and the size `f` reports for its last run.
fn measure(runs: u64, out: &Path, mut f: impl FnMut() -> Res<u64>) -> Res<Measure> {
    let mut times = Vec::new();
    let mut cpu = Vec::new();
    let mut bytes = 0;
    for _ in 0..runs {
        let _ = fs::remove_file(out);
        let cpu0 = cpu_ms()?;
        let start = Instant::now();
        bytes = f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        cpu.push(cpu_ms()? - cpu0);
    }
    Ok(Measure {
        ms: median(times),
        cpu_ms: median(cpu),
        bytes,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// User + system time of this process and its waited-for children, from
/// /proc/self/stat (clock ticks, 100 per second on Linux).
fn cpu_ms() -> Res<f64> {
    let stat = fs::read_to_string("/proc/self/stat")?;
    // Fields after the parenthesised command name, which may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime, cstime are fields 14-17; `rest` starts at 3.
    let ticks: u64 = fields
        .get(11..15)
        .ok_or("short /proc/self/stat")?
        .iter()
        .map(|f| f.parse::<u64>())
        .sum::<Result<_, _>>()?;
    Ok(ticks as f64 * 10.0)
}

fn file_len(p: &Path) -> Res<u64> {
    Ok(fs::metadata(p)?.len())
}

/// Bytes actually allocated on disk (sparse files allocate less).
fn allocated(p: &Path) -> Res<u64> {
    Ok(fs::metadata(p)?.blocks() * 512)
}

/// Adds `src`'s regular files, directories and symlinks below `at`, in
/// sorted order, while `budget` lasts. Owner is root, as `-all-root` makes
/// it for mksquashfs.
fn load(tree: &mut Tree, src: &Path, at: &Path, budget: &mut u64) -> Res<()> {
    let mut names: Vec<OsString> = fs::read_dir(src)?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    names.sort();
    for name in names {
        if *budget == 0 {
            break;
        }
        let path = src.join(&name);
        let dst = at.join(&name);
        let Ok(md) = fs::symlink_metadata(&path) else {
            continue;
        };
        let meta = Meta {
            mode: md.mode() & 0o7777,
            uid: 0,
            gid: 0,
            mtime: md.mtime().max(0) as u64,
            xattrs: Default::default(),
        };
        let ft = md.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&path)?;
            tree.insert(
                &dst,
                Node::Symlink {
                    meta,
                    target: target.into(),
                },
            )?;
        } else if ft.is_dir() {
            tree.insert(&dst, Node::Dir(Dir::new(meta)))?;
            load(tree, &path, &dst, budget)?;
        } else if ft.is_file() && md.len() <= MAX_FILE && md.len() <= *budget {
            let Ok(data) = fs::read(&path) else {
                continue;
            };
            *budget -= data.len() as u64;
            tree.insert(
                &dst,
                Node::File {
                    meta,
                    data: data.into(),
                },
            )?;
        }
    }
    Ok(())
}

/// Writes `tree` below `dir` with its modes and mtimes (directory times
/// last, since filling a directory changes its mtime).
fn materialize(tree: &Tree, dir: &Path) -> Res<()> {
    fs::create_dir_all(dir)?;
    let walk = tree.walk();
    let rel = |p: &Path| dir.join(p.strip_prefix("/").unwrap_or(p));
    for (path, node) in &walk {
        let p = rel(path);
        let meta = node.meta();
        let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(meta.mtime);
        match node {
            Node::Dir(_) => fs::create_dir(&p)?,
            Node::File { data, .. } => {
                let f = File::create(&p)?;
                (&f).write_all(&data.bytes()?)?;
                f.set_modified(mtime)?;
                f.set_permissions(fs::Permissions::from_mode(meta.mode))?;
            }
            Node::Symlink { target, .. } => std::os::unix::fs::symlink(target, &p)?,
            _ => return Err(format!("{}: unexpected node kind", path.display()).into()),
        }
    }
    for (path, node) in walk.iter().rev() {
        if let Node::Dir(d) = node {
            let p = rel(path);
            let f = File::open(&p)?;
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(d.meta.mtime))?;
            f.set_permissions(fs::Permissions::from_mode(d.meta.mode))?;
        }
    }
    Ok(())
}

/// Copies `r` to a new file at `out`, seeking over all-zero chunks so the
/// file stays sparse; returns its length.
fn write_sparse(mut r: impl Read, out: &Path) -> Res<u64> {
    let mut f = File::create(out)?;
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            f.seek(SeekFrom::Start(pos))?;
            f.write_all(&buf[..n])?;
        }
        pos += n as u64;
    }
    f.set_len(pos)?;
    Ok(pos)
}

/// Deterministic incompressible bytes (xorshift64), standing in for a
/// kernel image.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// An ESP-like tree: one 40 MB image plus boot-loader configuration.
fn esp_tree() -> Res<Tree> {
    let mut t = Tree::new();
    t.insert(
        Path::new("/EFI/BOOT/BOOTX64.EFI"),
        Node::file(0o755, noise(40_000_000, 0x9e37_79b9_7f4a_7c15)),
    )?;
    t.insert(
        Path::new("/loader/loader.conf"),
        Node::file(0o644, "timeout 0\ndefault kiln.conf\n"),
    )?;
    for i in 0..32 {
        t.insert(
            Path::new(&format!("/loader/entries/kiln-entry-{i:02}.conf")),
            Node::file(
                0o644,
                format!(
                    "title kiln {i}\nlinux /EFI/Linux/kiln-{i}.efi\noptions console=ttyS0 quiet\n"
                ),
            ),
        )?;
    }
    for i in 0..8 {
        t.insert(
            Path::new(&format!("/EFI/Linux/Readme-{i}.txt")),
            Node::file(0o644, noise(3000 + i * 777, i as u64 + 1)),
        )?;
    }
    Ok(t)
}

fn squashfs_rows(
    tree: &Tree,
    src: &Path,
    work: &Path,
    runs: u64,
    rows: &mut Vec<Row>,
) -> Res<PathBuf> {
    let cases = [
        ("zstd-15", Compression::Zstd { level: 15 }, "zstd"),
        ("gzip", Compression::Gzip, "gzip"),
    ];
    for (label, compression, comp) in cases {
        let opts = SquashfsOptions {
            compression,
            ..SquashfsOptions::default()
        };
        let out = work.join(format!("ours-{comp}.sqfs"));
        let ours = measure(runs, &out, || {
            Ok(squashfs::write_squashfs(
                tree,
                BufWriter::new(File::create(&out)?),
                &opts,
            )?)
        })?;
        let Some(mksquashfs) = tool("mksquashfs") else {
            rows.push(Row {
                case: format!("squashfs {label}"),
                ours: Some(ours),
                tool: None,
                note: "mksquashfs not installed".into(),
            });
            continue;
        };
        for procs in [Some(1), None] {
            let tout = work.join("tool.sqfs");
            let theirs = measure(runs, &tout, || {
                let mut cmd = Command::new(&mksquashfs);
                cmd.arg(src).arg(&tout).args(["-comp", comp]);
                if comp == "zstd" {
                    cmd.args(["-Xcompression-level", "15"]);
                }
                cmd.args(["-noappend", "-all-root", "-no-progress", "-no-xattrs"]);
                if let Some(n) = procs {
                    cmd.args(["-processors", &n.to_string()]);
                }
                run(&mut cmd)?;
                file_len(&tout)
            })?;
            let who = match procs {
                Some(n) => format!("mksquashfs -processors {n}"),
                None => "mksquashfs default (all cores)".into(),
            };
            rows.push(Row {
                case: format!("squashfs {label}"),
                ours: Some(ours),
                tool: Some(theirs),
                note: format!("vs {who}; ours single-threaded"),
            });
        }
    }
    // The zstd image is what a kiln disk carries.
    Ok(work.join("ours-zstd.sqfs"))
}

fn fat_rows(work: &Path, runs: u64, rows: &mut Vec<Row>) -> Res<Vec<u8>> {
    let tree = esp_tree()?;
    let out = work.join("ours.fat");
    let ours = measure(runs, &out, || {
        let img = fat::plan_fat32(&tree, ESP_SIZE, VOLUME_ID, "KILN-ESP")?.to_vec()?;
        fs::write(&out, &img)?;
        file_len(&out)
    })?;
    let ours_alloc = allocated(&out)?;
    // Same image via the planner, streamed with zero runs skipped: most of
    // the time above is writing 24 MiB of zeros.
    let sparse_out = work.join("ours-sparse.fat");
    let sparse = measure(runs, &sparse_out, || {
        let plan = fat::plan_fat32(&tree, ESP_SIZE, VOLUME_ID, "KILN-ESP")?;
        write_sparse(fat::FatImage::reader(&plan), &sparse_out)
    })?;
    let sparse_alloc = allocated(&sparse_out)?;
    let image = fat::plan_fat32(&tree, ESP_SIZE, VOLUME_ID, "KILN-ESP")?.to_vec()?;
    if fs::read(&sparse_out)? != image {
        return Err("streamed with holes differs from the whole image".into());
    }
    let case = "fat32 64 MiB ESP (40 MB + 41 small)".to_string();
    let (Some(mkfs), Some(mcopy)) = (tool("mkfs.fat"), tool("mcopy")) else {
        for (o, what) in [
            (ours, "build_fat32 + write"),
            (sparse, "plan_fat32 streamed sparse"),
        ] {
            rows.push(Row {
                case: case.clone(),
                ours: Some(o),
                tool: None,
                note: format!("{what}; mkfs.fat or mcopy not installed"),
            });
        }
        return Ok(image);
    };
    let src = work.join("esp-src");
    materialize(&tree, &src)?;
    let mut tops: Vec<PathBuf> = fs::read_dir(&src)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    tops.sort();
    let tout = work.join("tool.fat");
    let theirs = measure(runs, &tout, || {
        run(Command::new(&mkfs)
            .args(["-F", "32", "-i", "12345678", "-n", "KILN-ESP", "-C"])
            .arg(&tout)
            .arg((ESP_SIZE / 1024).to_string()))?;
        run(Command::new(&mcopy)
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-s")
            .arg("-i")
            .arg(&tout)
            .args(&tops)
            .arg("::/"))?;
        file_len(&tout)
    })?;
    let tool_alloc = allocated(&tout)? / MIB;
    for (o, alloc, what) in [
        (ours, ours_alloc, "build_fat32 + write"),
        (sparse, sparse_alloc, "plan_fat32 streamed sparse"),
    ] {
        rows.push(Row {
            case: case.clone(),
            ours: Some(o),
            tool: Some(theirs),
            note: format!(
                "ours {what} vs mkfs.fat -C + mcopy -s; allocated MiB: ours {}, tool {tool_alloc}",
                alloc / MIB
            ),
        });
    }
    Ok(image)
}

fn cpio_rows(tree: &Tree, src: &Path, work: &Path, runs: u64, rows: &mut Vec<Row>) -> Res<()> {
    let out = work.join("ours.cpio");
    let ours = measure(runs, &out, || {
        let mut w = BufWriter::new(File::create(&out)?);
        cpio::write_newc(tree, &mut w)?;
        w.flush()?;
        file_len(&out)
    })?;
    let case = "cpio newc".to_string();
    if tool("cpio").is_none() {
        rows.push(Row {
            case,
            ours: Some(ours),
            tool: None,
            note: "cpio not installed".into(),
        });
        return Ok(());
    }
    let tout = work.join("tool.cpio");
    let theirs = measure(runs, &tout, || {
        run(Command::new("sh")
            .arg("-c")
            .arg("find . | LC_ALL=C sort | cpio -o -H newc --quiet > \"$1\"")
            .arg("sh")
            .arg(&tout)
            .current_dir(src))?;
        file_len(&tout)
    })?;
    rows.push(Row {
        case,
        ours: Some(ours),
        tool: Some(theirs),
        note: "vs find . | sort | cpio -o -H newc (names get ./)".into(),
    });
    Ok(())
}

fn disk_rows(esp: &[u8], root_img: &Path, work: &Path, runs: u64, rows: &mut Vec<Row>) -> Res<()> {
    let root = fs::read(root_img)?;
    let layout = Layout {
        disk_guid: Guid::derive("bench/disk", b"disk"),
        size: DISK_SIZE,
        partitions: vec![
            PartitionSpec {
                name: "esp".into(),
                type_guid: ESP_TYPE,
                guid: Guid::derive("bench/esp", b"esp"),
                size: esp.len() as u64,
                attributes: 0,
            },
            PartitionSpec {
                name: "root-a".into(),
                type_guid: LINUX_ROOT_X86_64_TYPE,
                guid: Guid::derive("bench/root", b"root"),
                size: (root.len() as u64).next_multiple_of(MIB),
                attributes: 0,
            },
        ],
    };
    let placement = disk::place(&layout)?;
    let out = work.join("ours.raw");
    let ours = measure(runs, &out, || {
        disk::write_raw(
            &layout,
            vec![Box::new(esp), Box::new(&root[..])],
            File::create(&out)?,
        )?;
        file_len(&out)
    })?;
    let ours_alloc = allocated(&out)?;
    let case = format!(
        "raw GPT disk 1 GiB (esp + {} MiB root)",
        root.len() as u64 / MIB
    );
    let (Some(sgdisk), Some(truncate), Some(dd)) = (tool("sgdisk"), tool("truncate"), tool("dd"))
    else {
        rows.push(Row {
            case,
            ours: Some(ours),
            tool: None,
            note: "sgdisk, truncate or dd not installed".into(),
        });
        return Ok(());
    };
    // Partition contents come from files for the tools (page-cached).
    let parts = [work.join("part-esp.img"), work.join("part-root.img")];
    fs::write(&parts[0], esp)?;
    fs::write(&parts[1], &root)?;
    let tout = work.join("tool.raw");
    let tool_run = |with_sgdisk: bool| -> Res<u64> {
        run(Command::new(&truncate)
            .args(["-s", &DISK_SIZE.to_string()])
            .arg(&tout))?;
        if with_sgdisk {
            sgdisk_run(&sgdisk, &layout, &placement, &tout)?;
        }
        for (p, file) in placement.partitions.iter().zip(&parts) {
            let mut if_arg = OsString::from("if=");
            if_arg.push(file);
            let mut of_arg = OsString::from("of=");
            of_arg.push(&tout);
            run(Command::new(&dd)
                .arg(if_arg)
                .arg(of_arg)
                .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
                .arg(format!("seek={}", p.offset() / MIB)))?;
        }
        file_len(&tout)
    };
    let theirs = measure(runs, &tout, || tool_run(true))?;
    let tool_alloc = allocated(&tout)? / MIB;
    let no_table = measure(runs, &tout, || tool_run(false))?;
    rows.push(Row {
        case: case.clone(),
        ours: Some(ours),
        tool: Some(theirs),
        note: format!(
            "vs truncate + sgdisk + dd conv=sparse (sgdisk does sync() + sleep 1 s); \
             allocated MiB: ours {}, tool {tool_alloc}",
            ours_alloc / MIB
        ),
    });
    rows.push(Row {
        case,
        ours: Some(ours),
        tool: Some(no_table),
        note: "vs truncate + dd conv=sparse only (no partition table: tool lower bound)".into(),
    });
    Ok(())
}

/// The virtual disk formats from the raw disk of [`disk_rows`], each
/// against `qemu-img convert` (GCE's tarball against GNU tar's sparse
/// `tar -Sczf`). Both sides run as child processes under `/usr/bin/time`
/// for their peak RSS: ours is this bench run again as one writer
/// (`KILN_BENCH_WRITE`).
fn vdisk_rows(work: &Path, runs: u64, rows: &mut Vec<Row>) -> Res<()> {
    let raw = work.join("ours.raw");
    let (Some(time), Some(qemu_img), Some(tar)) = (tool("time"), tool("qemu-img"), tool("tar"))
    else {
        rows.push(Row {
            case: "virtual disks".into(),
            ours: None,
            tool: None,
            note: "time, qemu-img or tar not installed".into(),
        });
        return Ok(());
    };
    let me = std::env::current_exe()?;
    let rss = work.join("rss");
    // Runs `cmd` under time(1); its peak RSS in KiB.
    let timed = |cmd: &mut Command| -> Res<u64> {
        let mut t = Command::new(&time);
        t.arg("-f")
            .arg("%M")
            .arg("-o")
            .arg(&rss)
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                t.env(k, v);
            }
        }
        run(&mut t)?;
        Ok(fs::read_to_string(&rss)?.trim().parse()?)
    };
    for (name, file, tool_args) in [
        ("qcow2", "d.qcow2", vec!["convert", "-O", "qcow2"]),
        (
            "qcow2-compressed",
            "dc.qcow2",
            vec!["convert", "-c", "-O", "qcow2"],
        ),
        (
            "vhd",
            "d.vhd",
            vec![
                "convert",
                "-O",
                "vpc",
                "-o",
                "subformat=fixed,force_size=on",
            ],
        ),
        (
            "vhd-dynamic",
            "d-dyn.vhd",
            vec![
                "convert",
                "-O",
                "vpc",
                "-o",
                "subformat=dynamic,force_size=on",
            ],
        ),
        (
            "vmdk",
            "d.vmdk",
            vec!["convert", "-O", "vmdk", "-o", "subformat=streamOptimized"],
        ),
        ("gce", "d.tar.gz", vec![]),
    ] {
        let out = work.join(file);
        let mut ours_rss = 0;
        let ours = measure(runs, &out, || {
            ours_rss = timed(
                Command::new(&me)
                    .env("KILN_BENCH_WRITE", name)
                    .arg(&raw)
                    .arg(&out),
            )?;
            allocated(&out)
        })?;
        let tout = work.join(format!("tool-{file}"));
        let mut tool_rss = 0;
        let theirs = if name == "gce" {
            // GNU tar wants the file named disk.raw.
            let dir = work.join("gce");
            fs::create_dir_all(&dir)?;
            let _ = fs::remove_file(dir.join("disk.raw"));
            fs::hard_link(&raw, dir.join("disk.raw"))?;
            measure(runs, &tout, || {
                tool_rss = timed(
                    Command::new(&tar)
                        .arg("-C")
                        .arg(&dir)
                        .args(["--format=oldgnu", "-Sczf"])
                        .arg(&tout)
                        .arg("disk.raw"),
                )?;
                allocated(&tout)
            })?
        } else {
            measure(runs, &tout, || {
                tool_rss = timed(
                    Command::new(&qemu_img)
                        .args(&tool_args)
                        .arg(&raw)
                        .arg(&tout),
                )?;
                allocated(&tout)
            })?
        };
        rows.push(Row {
            case: format!("{name} from a 1 GiB raw disk"),
            ours: Some(ours),
            tool: Some(theirs),
            note: format!(
                "vs {}; bytes: allocated; peak RSS MiB: ours {}, tool {}",
                if name == "gce" {
                    "tar --format=oldgnu -Sczf".to_string()
                } else {
                    format!("qemu-img {}", tool_args.join(" "))
                },
                ours_rss / 1024,
                tool_rss / 1024
            ),
        });
    }
    Ok(())
}

/// As a child of [`vdisk_rows`]: `KILN_BENCH_WRITE=FORMAT bench RAW OUT`
/// writes one container, so time(1) measures that writer alone.
fn child_write(format: &str) -> Res<()> {
    use kiln_formats::vdisk;
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [raw, out] = &args[..] else {
        return Err("usage: KILN_BENCH_WRITE=FORMAT bench RAW OUT".into());
    };
    let raw = File::open(raw)?;
    let size = raw.metadata()?.len();
    let mut out = File::create(out)?;
    let id = vdisk::Identity {
        id: [1; 16],
        time: 0,
    };
    match format {
        "qcow2" => vdisk::write_qcow2(&raw, size, &mut out, false)?,
        "qcow2-compressed" => vdisk::write_qcow2(&raw, size, &mut out, true)?,
        "vhd" => vdisk::write_vhd_fixed(&raw, size, &mut out, &id)?,
        "vhd-dynamic" => vdisk::write_vhd_dynamic(&raw, size, &mut out, &id)?,
        "vmdk" => vdisk::write_vmdk_stream(&raw, size, &mut out, &id, "d.vmdk")?,
        "gce" => vdisk::write_gce_tar_gz(&raw, size, &mut out, &id)?,
        _ => return Err(format!("unknown format {format}").into()),
    }
    Ok(())
}

/// Partitions `disk` exactly as `placement` does.
fn sgdisk_run(sgdisk: &Path, layout: &Layout, placement: &disk::Placement, disk: &Path) -> Res<()> {
    let mut cmd = Command::new(sgdisk);
    for (i, (p, spec)) in placement
        .partitions
        .iter()
        .zip(&layout.partitions)
        .enumerate()
    {
        let n = i + 1;
        let code = if spec.type_guid == ESP_TYPE {
            "ef00"
        } else {
            "8304"
        };
        cmd.arg(format!("--new={n}:{}:{}", p.first_lba, p.last_lba))
            .arg(format!("--typecode={n}:{code}"))
            .arg(format!("--change-name={n}:{}", spec.name));
    }
    run(cmd.arg(disk))
}

fn print_table(rows: &[Row]) {
    let ms = |m: Option<Measure>| m.map_or("-".into(), |m| format!("{:.1}", m.ms));
    let cpu = |m: Option<Measure>| m.map_or("-".into(), |m| format!("{:.0}", m.cpu_ms));
    let by = |m: Option<Measure>| m.map_or("-".into(), |m| m.bytes.to_string());
    println!(
        "{:<38} {:>9} {:>10} {:>9} {:>10} {:>8} {:>8} {:>6} {:>6}  notes",
        "case",
        "ours ms",
        "ours bytes",
        "tool ms",
        "tool bytes",
        "ours cpu",
        "tool cpu",
        "time",
        "size"
    );
    for r in rows {
        let (tr, sr) = match (r.ours, r.tool) {
            (Some(o), Some(t)) => (
                format!("{:.2}", o.ms / t.ms),
                format!("{:.3}", o.bytes as f64 / t.bytes as f64),
            ),
            _ => ("-".into(), "-".into()),
        };
        println!(
            "{:<38} {:>9} {:>10} {:>9} {:>10} {:>8} {:>8} {:>6} {:>6}  {}",
            r.case,
            ms(r.ours),
            by(r.ours),
            ms(r.tool),
            by(r.tool),
            cpu(r.ours),
            cpu(r.tool),
            tr,
            sr,
            r.note
        );
    }
}

fn bench() -> Res<()> {
    let budget_mb = env_u64("KILN_BENCH_MB", 48);
    let runs = env_u64("KILN_BENCH_RUNS", 3);
    let work = Scratch(std::env::temp_dir().join(format!("kiln-bench-{}", std::process::id())));
    let _ = fs::remove_dir_all(&work.0);
    fs::create_dir_all(&work.0)?;

    // Mostly-small text and compressed docs, then shared libraries.
    let mut tree = Tree::new();
    let sources = [
        ("/usr/share/doc", "/doc", budget_mb * MIB * 3 / 8),
        ("/usr/lib/x86_64-linux-gnu", "/lib", budget_mb * MIB * 5 / 8),
    ];
    for (src, at, mut budget) in sources {
        if Path::new(src).is_dir() {
            tree.insert(Path::new(at), Node::dir(0o755))?;
            load(&mut tree, Path::new(src), Path::new(at), &mut budget)?;
        }
    }
    let walk = tree.walk();
    let count = |f: fn(&Node) -> bool| walk.iter().filter(|(_, n)| f(n)).count();
    println!(
        "input: {} bytes in {} files, {} dirs, {} symlinks (first files in sorted order of /usr/share/doc and \
         /usr/lib/x86_64-linux-gnu, files <= {} MiB); {} runs per case, median; {} CPUs",
        tree.data_size(),
        count(|n| matches!(n, Node::File { .. })),
        count(|n| matches!(n, Node::Dir(_))),
        count(|n| matches!(n, Node::Symlink { .. })),
        MAX_FILE / MIB,
        runs,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    let src = work.0.join("src");
    materialize(&tree, &src)?;

    let mut rows = Vec::new();
    let root_img = squashfs_rows(&tree, &src, &work.0, runs, &mut rows)?;
    let esp = fat_rows(&work.0, runs, &mut rows)?;
    cpio_rows(&tree, &src, &work.0, runs, &mut rows)?;
    disk_rows(&esp, &root_img, &work.0, runs, &mut rows)?;
    vdisk_rows(&work.0, runs, &mut rows)?;
    println!();
    print_table(&rows);
    println!(
        "\nms: median wall time; cpu: median CPU ms incl. child processes (10 ms ticks); \
         time and size: ours / tool (< 1: ours faster or smaller)"
    );
    Ok(())
}

fn main() -> ExitCode {
    if let Some(format) = std::env::var_os("KILN_BENCH_WRITE") {
        return match child_write(&format.to_string_lossy()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}
