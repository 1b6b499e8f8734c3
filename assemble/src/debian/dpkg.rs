//! dpkg's database for images built from .debs: `/var/lib/dpkg/status`
//! and `info/PKG.{list,md5sums,conffiles}`, so that tools reading it
//! (`dpkg-query`, trivy, grype, syft) see what is installed.

use kiln_formats::tree::{Meta, Node, Tree, TreeError};
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::Path;

/// The files of a package's `control.tar` that dpkg keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    /// `control`: the package's fields.
    pub control: Vec<u8>,
    /// `md5sums`, if the package has one.
    pub md5sums: Option<Vec<u8>>,
    /// `conffiles`, if the package has one.
    pub conffiles: Option<Vec<u8>>,
    /// Maintainer scripts and debconf files by name (`postinst`, ...).
    pub scripts: BTreeMap<String, Vec<u8>>,
}

/// The control.tar files dpkg keeps in `info/` besides md5sums and
/// conffiles (maintainer scripts, debconf's, triggers).
const KEPT: [&str; 7] = [
    "preinst",
    "postinst",
    "prerm",
    "postrm",
    "config",
    "templates",
    "triggers",
];

impl Control {
    /// Reads a (decompressed) `control.tar` stream.
    pub fn from_tar(r: impl Read) -> io::Result<Control> {
        let mut control = None;
        let mut md5sums = None;
        let mut conffiles = None;
        let mut scripts = BTreeMap::new();
        let mut archive = tar::Archive::new(r);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = entry.path_bytes().into_owned();
            let name = path.strip_prefix(b"./").unwrap_or(&path);
            // Text files of a few KiB; a bigger one is not a control file.
            let mut data = Vec::new();
            let mut read = |entry: &mut tar::Entry<'_, _>| -> io::Result<Vec<u8>> {
                entry.take(16 << 20).read_to_end(&mut data)?;
                Ok(std::mem::take(&mut data))
            };
            match name {
                b"control" => control = Some(read(&mut entry)?),
                b"md5sums" => md5sums = Some(read(&mut entry)?),
                b"conffiles" => conffiles = Some(read(&mut entry)?),
                n => {
                    let n = String::from_utf8_lossy(n).into_owned();
                    if KEPT.contains(&n.as_str()) {
                        scripts.insert(n, read(&mut entry)?);
                    }
                }
            }
        }
        let control = control.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "control.tar has no control file",
            )
        })?;
        Ok(Control {
            control,
            md5sums,
            conffiles,
            scripts,
        })
    }

    /// The value of a field of `control`.
    pub fn field(&self, name: &str) -> Option<String> {
        let text = String::from_utf8_lossy(&self.control);
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.eq_ignore_ascii_case(name)).then(|| v.trim().to_string())
        })
    }

    /// dpkg's name for the package's info files: `NAME`, or `NAME:ARCH`
    /// for `Multi-Arch: same` packages.
    pub fn info_name(&self) -> Option<String> {
        let name = self.field("Package")?;
        Some(
            match (self.field("Multi-Arch"), self.field("Architecture")) {
                (Some(m), Some(arch)) if m == "same" => format!("{name}:{arch}"),
                _ => name,
            },
        )
    }

    /// The directives of its `triggers` file, as (directive, trigger):
    /// `("interest-noawait", "/usr/lib/sysctl.d")`, `("activate-noawait",
    /// "ldconfig")`. A trigger starting with `/` is a file trigger.
    pub fn triggers(&self) -> Vec<(String, String)> {
        let Some(text) = self.scripts.get("triggers") else {
            return Vec::new();
        };
        String::from_utf8_lossy(text)
            .lines()
            .filter_map(|l| {
                let l = l.split('#').next().unwrap_or_default();
                let mut words = l.split_whitespace();
                Some((words.next()?.to_string(), words.next()?.to_string()))
            })
            .collect()
    }

    /// The status stanza: the control fields with `Status` after `Package`.
    fn stanza(&self) -> String {
        let text = String::from_utf8_lossy(&self.control);
        let mut out = String::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            out.push_str(line);
            out.push('\n');
            if line.starts_with("Package:") {
                out.push_str("Status: install ok installed\n");
            }
        }
        out
    }
}

/// One installed package: its control files and the paths it unpacked.
#[derive(Debug, Clone)]
pub struct Installed {
    /// From its `control.tar`.
    pub control: Control,
    /// Absolute paths of its `data.tar` entries, in archive order.
    pub paths: Vec<String>,
}

/// Where dpkg keeps its database.
pub const ADMINDIR: &str = "/var/lib/dpkg";

/// Writes dpkg's database for `installed` into `tree`.
pub fn write(tree: &mut Tree, installed: &[Installed], mtime: u64) -> Result<(), TreeError> {
    let file = |mode: u32, data: Vec<u8>| {
        let mut n = Node::file(mode, data);
        n.meta_mut().mtime = mtime;
        n
    };
    let dir_meta = Meta {
        mtime,
        ..Meta::root(0o755)
    };
    let mut sorted: Vec<(String, &Installed)> = installed
        .iter()
        .filter_map(|i| Some((i.control.info_name()?, i)))
        .collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted.dedup_by(|a, b| a.0 == b.0);
    let mut status = String::new();
    let info = Path::new(ADMINDIR).join("info");
    tree.mkdir_p(&info, &dir_meta)?;
    for (name, i) in &sorted {
        if !status.is_empty() {
            status.push('\n');
        }
        status.push_str(&i.control.stanza());
        let mut list = String::from("/.\n");
        for p in &i.paths {
            list.push_str(p);
            list.push('\n');
        }
        tree.insert(
            &info.join(format!("{name}.list")),
            file(0o644, list.into_bytes()),
        )?;
        for (ext, data) in [
            ("md5sums", &i.control.md5sums),
            ("conffiles", &i.control.conffiles),
        ] {
            if let Some(d) = data {
                tree.insert(&info.join(format!("{name}.{ext}")), file(0o644, d.clone()))?;
            }
        }
        for (script, data) in &i.control.scripts {
            let mode = if matches!(script.as_str(), "templates" | "triggers") {
                0o644
            } else {
                0o755
            };
            tree.insert(
                &info.join(format!("{name}.{script}")),
                file(mode, data.clone()),
            )?;
        }
    }
    let admin = Path::new(ADMINDIR);
    // Trigger interests, where dpkg-trigger and later dpkg runs look them
    // up: `triggers/File` for file triggers, `triggers/NAME` for others.
    let mut files = BTreeMap::<String, Vec<String>>::new();
    for (name, i) in &sorted {
        for (directive, trigger) in i.control.triggers() {
            let who = match directive.as_str() {
                "interest" | "interest-await" => name.clone(),
                "interest-noawait" => format!("{name}/noawait"),
                _ => continue,
            };
            let (file, line) = match trigger.strip_prefix('/') {
                Some(_) => ("File".to_string(), format!("{trigger} {who}\n")),
                None => (trigger, format!("{who}\n")),
            };
            files.entry(file).or_default().push(line);
        }
    }
    let triggers = admin.join("triggers");
    tree.mkdir_p(&triggers, &dir_meta)?;
    files.entry("Unincorp".into()).or_default();
    for (name, mut lines) in files {
        lines.sort();
        tree.insert(
            &triggers.join(name),
            file(0o644, lines.concat().into_bytes()),
        )?;
    }
    tree.insert(&admin.join("status"), file(0o644, status.into_bytes()))?;
    tree.insert(&admin.join("available"), file(0o644, Vec::new()))?;
    tree.mkdir_p(&admin.join("updates"), &dir_meta)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn control_tar(files: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, text) in files {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(text.len() as u64);
            h.set_cksum();
            b.append_data(&mut h, name, text.as_bytes()).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// What is written is what `dpkg-query --admindir` reads.
    #[test]
    fn status_and_lists_read_by_dpkg_query() {
        let a = Control::from_tar(&control_tar(&[
            ("./control", "Package: zlib1g\nVersion: 1:1.3\nArchitecture: amd64\nMulti-Arch: same\nSource: zlib\nDescription: compression\n x\n"),
            ("./md5sums", "d41d8cd98f00b204e9800998ecf8427e  usr/lib/libz.so.1\n"),
            ("./postinst", "#!/bin/sh\n"),
            ("./triggers", "# comment\ninterest-noawait /usr/share/z\ninterest zlib-reload\nactivate-noawait ldconfig\n"),
        ])[..])
        .unwrap();
        assert_eq!(a.field("source").as_deref(), Some("zlib"));
        assert_eq!(
            a.scripts.keys().collect::<Vec<_>>(),
            ["postinst", "triggers"]
        );
        assert_eq!(
            a.triggers(),
            [
                ("interest-noawait".into(), "/usr/share/z".into()),
                ("interest".into(), "zlib-reload".into()),
                ("activate-noawait".to_string(), "ldconfig".to_string())
            ]
        );
        assert!(a.md5sums.is_some() && a.conffiles.is_none());
        let b = Control::from_tar(&control_tar(&[(
            "control",
            "Package: busybox-static\nVersion: 1:1.37.0-4\nArchitecture: amd64\nDescription: tools\n",
        )])[..])
        .unwrap();
        assert!(Control::from_tar(&control_tar(&[("./md5sums", "")])[..]).is_err());
        let mut tree = Tree::new();
        let installed = [
            Installed {
                control: b,
                paths: vec!["/usr".into(), "/usr/bin".into(), "/usr/bin/busybox".into()],
            },
            Installed {
                control: a,
                paths: vec!["/usr/lib/libz.so.1".into()],
            },
        ];
        write(&mut tree, &installed, 7).unwrap();
        let Some(Node::File { data, .. }) = tree.get(Path::new("/var/lib/dpkg/status")) else {
            panic!("no status")
        };
        let status = String::from_utf8(data.bytes().unwrap().to_vec()).unwrap();
        assert!(
            status.starts_with("Package: busybox-static\nStatus: install ok installed\n"),
            "{status}"
        );
        assert!(tree
            .get(Path::new("/var/lib/dpkg/info/zlib1g:amd64.list"))
            .is_some());
        assert!(matches!(
            tree.get(Path::new("/var/lib/dpkg/info/zlib1g:amd64.postinst")),
            Some(Node::File { meta, .. }) if meta.mode == 0o755
        ));
        // Interests as dpkg records them; activations are not interests.
        let text = |p: &str| match tree.get(Path::new(p)) {
            Some(Node::File { data, .. }) => String::from_utf8(data.bytes().unwrap().to_vec()).ok(),
            _ => None,
        };
        assert_eq!(
            text("/var/lib/dpkg/triggers/File").as_deref(),
            Some("/usr/share/z zlib1g:amd64/noawait\n")
        );
        assert_eq!(
            text("/var/lib/dpkg/triggers/zlib-reload").as_deref(),
            Some("zlib1g:amd64\n")
        );
        assert_eq!(text("/var/lib/dpkg/triggers/Unincorp").as_deref(), Some(""));
        assert!(text("/var/lib/dpkg/triggers/ldconfig").is_none());

        if Command::new("dpkg-query")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("note: dpkg-query not installed; skipping");
            return;
        }
        let dir = std::env::temp_dir().join(format!("kiln-dpkg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, node) in tree.walk() {
            let p = dir.join(path.strip_prefix("/").unwrap());
            match node {
                Node::Dir(_) => std::fs::create_dir_all(&p).unwrap(),
                Node::File { data, .. } => std::fs::write(&p, data.bytes().unwrap()).unwrap(),
                _ => {}
            }
        }
        let admindir = dir.join("var/lib/dpkg");
        let out = Command::new("dpkg-query")
            .arg("--admindir")
            .arg(&admindir)
            .args(["-W", "-f", "${Package} ${Version} ${source:Package}\\n"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "busybox-static 1:1.37.0-4 busybox-static\nzlib1g 1:1.3 zlib\n"
        );
        let out = Command::new("dpkg-query")
            .arg("--admindir")
            .arg(&admindir)
            .args(["-S", "/usr/bin/busybox"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "busybox-static: /usr/bin/busybox\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
