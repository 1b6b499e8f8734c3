//! Kernel module loading driven by device modaliases, without modules.dep:
//! the builder's [`ModuleIndex`] carries each module's path, depends and
//! alias patterns.

use crate::glob;
use crate::sys::Sys;
use kiln_init::config::ModuleIndex;
use std::collections::BTreeSet;

/// What a round of loading did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Modules loaded, in load order.
    pub loaded: Vec<String>,
    /// Modules that failed, with the reason.
    pub failed: Vec<(String, String)>,
}

/// `name` and its `depends` closure, dependencies first, each once.
/// Unknown names and cycles are skipped rather than fatal.
pub fn closure(index: &ModuleIndex, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut visiting = BTreeSet::new();
    visit(index, name, &mut visiting, &mut out);
    out
}

fn visit(index: &ModuleIndex, name: &str, visiting: &mut BTreeSet<String>, out: &mut Vec<String>) {
    let name = normalize(name);
    if out.contains(&name) || !visiting.insert(name.clone()) {
        return;
    }
    if let Some(info) = index.modules.get(&name) {
        for dep in &info.depends {
            visit(index, dep, visiting, out);
        }
        out.push(name);
    }
}

/// Module names use `_` and `-` interchangeably; the index uses `_`.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Modules of the index whose alias patterns match any of `modaliases`,
/// sorted by name.
pub fn matching(index: &ModuleIndex, modaliases: &BTreeSet<String>) -> Vec<String> {
    index
        .modules
        .iter()
        .filter(|(_, info)| {
            info.aliases
                .iter()
                .any(|pat| modaliases.iter().any(|m| glob::matches(pat, m)))
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Every `/sys/bus/*/devices/*/modalias` currently present.
pub fn read_modaliases(sys: &dyn Sys) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Ok(buses) = sys.list_dir("/sys/bus") else {
        return out;
    };
    for bus in buses {
        let dir = format!("/sys/bus/{bus}/devices");
        let Ok(devs) = sys.list_dir(&dir) else {
            continue;
        };
        for dev in devs {
            if let Ok(data) = sys.read_file(&format!("{dir}/{dev}/modalias")) {
                let s = String::from_utf8_lossy(&data).trim().to_string();
                if !s.is_empty() {
                    out.insert(s);
                }
            }
        }
    }
    out
}

/// Loads `always` modules, then modules matching present devices, pass
/// after pass until a pass loads nothing new (a loaded bus driver can make
/// new devices appear). Each module is tried at most once.
pub fn load_all(sys: &dyn Sys, index: &ModuleIndex) -> LoadReport {
    let mut report = LoadReport::default();
    let mut tried: BTreeSet<String> = BTreeSet::new();
    let mut wanted: Vec<String> = index.always.iter().map(|n| normalize(n)).collect();
    // Bounded: each pass must try a new module or the loop ends.
    for _ in 0..=index.modules.len() + 1 {
        wanted.extend(matching(index, &read_modaliases(sys)));
        let mut progressed = false;
        for name in std::mem::take(&mut wanted) {
            for m in closure(index, &name) {
                if !tried.insert(m.clone()) {
                    continue;
                }
                progressed = true;
                let Some(info) = index.modules.get(&m) else {
                    continue;
                };
                let compressed = info.path.ends_with(".xz") || info.path.ends_with(".zst");
                match sys.finit_module(&info.path, compressed) {
                    Ok(()) => report.loaded.push(m),
                    Err(e) => report.failed.push((m, e.to_string())),
                }
            }
        }
        if !progressed {
            break;
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::FakeSys;
    use kiln_init::config::ModuleInfo;

    fn module(path: &str, depends: &[&str], aliases: &[&str]) -> ModuleInfo {
        ModuleInfo {
            path: path.to_string(),
            depends: depends.iter().map(|s| s.to_string()).collect(),
            aliases: aliases.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn index() -> ModuleIndex {
        let mut idx = ModuleIndex::default();
        let m = &mut idx.modules;
        m.insert("virtio".into(), module("/m/virtio.ko", &[], &[]));
        m.insert("virtio_ring".into(), module("/m/virtio_ring.ko", &[], &[]));
        m.insert(
            "virtio_pci_modern_dev".into(),
            module("/m/virtio_pci_modern_dev.ko", &[], &[]),
        );
        m.insert(
            "virtio_pci".into(),
            module(
                "/m/virtio_pci.ko",
                &["virtio_pci_modern_dev", "virtio-ring", "virtio"],
                &["pci:v00001AF4d*sv*sd*bc*sc*i*"],
            ),
        );
        m.insert(
            "virtio_blk".into(),
            module(
                "/m/virtio_blk.ko.xz",
                &["virtio", "virtio_ring"],
                &["virtio:d00000002v*"],
            ),
        );
        m.insert(
            "squashfs".into(),
            module("/m/squashfs.ko.zst", &[], &["fs-squashfs"]),
        );
        m.insert(
            "e1000".into(),
            module(
                "/m/e1000.ko",
                &[],
                &["pci:v00008086d0000100Esv*sd*bc*sc*i*"],
            ),
        );
        idx.always = vec!["squashfs".into()];
        idx
    }

    #[test]
    fn closure_puts_dependencies_first() {
        let idx = index();
        assert_eq!(
            closure(&idx, "virtio_pci"),
            vec![
                "virtio_pci_modern_dev",
                "virtio_ring",
                "virtio",
                "virtio_pci"
            ]
        );
        assert_eq!(closure(&idx, "unknown"), Vec::<String>::new());
    }

    #[test]
    fn closure_survives_cycles() {
        let mut idx = ModuleIndex::default();
        idx.modules.insert("a".into(), module("/a.ko", &["b"], &[]));
        idx.modules.insert("b".into(), module("/b.ko", &["a"], &[]));
        assert_eq!(closure(&idx, "a"), vec!["b", "a"]);
    }

    #[test]
    fn loads_until_fixpoint() {
        let mut sys = FakeSys::default();
        sys.add(
            "/sys/bus/pci/devices/0000:00:04.0/modalias",
            b"pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00\n",
        );
        sys.add(
            "/sys/bus/pci/devices/0000:00:00.0/modalias",
            b"pci:v00008086d00001237sv00001AF4sd00001100bc06sc00i00\n",
        );
        // Loading virtio_pci makes the virtio block device appear.
        sys.on_load = Some(Box::new(|path, s: &FakeSys| {
            if path == "/m/virtio_pci.ko" {
                s.add(
                    "/sys/bus/virtio/devices/virtio0/modalias",
                    b"virtio:d00000002v00001AF4\n",
                );
            }
        }));
        let report = load_all(&sys, &index());
        assert_eq!(
            report.loaded,
            vec![
                "squashfs",
                "virtio_pci_modern_dev",
                "virtio_ring",
                "virtio",
                "virtio_pci",
                "virtio_blk"
            ]
        );
        assert!(report.failed.is_empty());
        let loaded = sys.loaded.borrow();
        assert!(loaded.contains(&("/m/virtio_blk.ko.xz".to_string(), true)));
        assert!(loaded.contains(&("/m/squashfs.ko.zst".to_string(), true)));
        assert!(loaded.contains(&("/m/virtio.ko".to_string(), false)));
    }

    #[test]
    fn failures_are_reported_once() {
        let sys = FakeSys {
            fail_load: vec!["/m/squashfs.ko.zst".into()],
            ..Default::default()
        };
        let report = load_all(&sys, &index());
        assert!(report.loaded.is_empty());
        assert_eq!(report.failed.len(), 1);
        assert_eq!(report.failed[0].0, "squashfs");
    }
}
