//! Kernel module loading driven by device modaliases, without modules.dep:
//! the builder's [`ModuleIndex`] carries each module's path, depends and
//! alias patterns.

use crate::glob;
use crate::sys::Sys;
use kiln_init::config::ModuleIndex;
use std::collections::{BTreeMap, BTreeSet};

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

/// The buses (`pci`, `virtio`, `acpi`...) some alias of `modules` names:
/// the part of each pattern before its first `:` or glob character.
fn buses_of<'i>(
    index: &ModuleIndex,
    modules: impl Iterator<Item = &'i String>,
) -> BTreeSet<String> {
    modules
        .filter_map(|m| index.modules.get(m))
        .flat_map(|info| info.aliases.iter())
        .filter_map(|pat| {
            let end = pat.find([':', '*', '?', '['])?;
            Some(pat[..end].to_string()).filter(|b| !b.is_empty())
        })
        .collect()
}

/// Where a module comes in the order of loading: bus drivers and the
/// power button first, then disk drivers (the slow, often idle AHCI
/// last), then everything else.
fn priority(name: &str) -> u8 {
    match name {
        "virtio_pci" | "virtio_pci_legacy_dev" | "virtio_pci_modern_dev" | "hv_vmbus" => 0,
        "button" | "evdev" => 0,
        "virtio_blk" | "virtio_scsi" | "nvme" | "xen_blkfront" | "hv_storvsc" | "sd_mod" => 1,
        "ahci" | "libahci" => 2,
        _ => 3,
    }
}

/// Loads modules as devices ask for them, remembering what was tried so a
/// later round (after the root is mounted) skips it.
#[derive(Debug, Default)]
pub struct Loader {
    tried: BTreeSet<String>,
    /// Each device's modalias by its sysfs path, read once: a device's
    /// never changes, and under emulation every sysfs read costs.
    seen: BTreeMap<String, String>,
    /// What this loader did so far.
    pub report: LoadReport,
}

impl Loader {
    /// Loads `always` modules (without looking at devices: a scan of
    /// sysfs costs as much as a small module under emulation), then
    /// modules matching present devices, the first by [`priority`] each
    /// time, looking at the devices again after each (a bus driver makes
    /// new devices appear), until none is left or `enough` holds: then it
    /// returns true, the rest left for a later call. Paths are read below
    /// `prefix` (`""`, or a directory fd's `/proc/self/fd/N` once the
    /// initramfs is not `/`).
    pub fn load(
        &mut self,
        sys: &dyn Sys,
        index: &ModuleIndex,
        prefix: &str,
        enough: &dyn Fn() -> bool,
    ) -> bool {
        for name in &index.always {
            self.load_closure(sys, index, prefix, &normalize(name));
        }
        if enough() {
            return true;
        }
        // Bounded: each round tries at least one new module.
        for _ in 0..=index.modules.len() {
            let present = self.modaliases(sys, index);
            let mut wanted: Vec<String> = matching(index, &present)
                .into_iter()
                .filter(|n| closure(index, n).iter().any(|m| !self.tried.contains(m)))
                .collect();
            // By priority, then by name (stable).
            wanted.sort_by_key(|n| priority(n));
            let Some(name) = wanted.first() else {
                return false;
            };
            self.load_closure(sys, index, prefix, &name.clone());
            if enough() {
                return true;
            }
        }
        false
    }

    /// Loads the modules present devices ask for whose path `wanted`
    /// accepts (network drivers, say), with what they depend on.
    pub fn load_where(
        &mut self,
        sys: &dyn Sys,
        index: &ModuleIndex,
        prefix: &str,
        wanted: &dyn Fn(&str) -> bool,
    ) {
        // Bounded: each round tries at least one new module.
        for _ in 0..=index.modules.len() {
            let present = self.modaliases(sys, index);
            let next = matching(index, &present)
                .into_iter()
                .filter(|n| index.modules.get(n).is_some_and(|i| wanted(&i.path)))
                .find(|n| closure(index, n).iter().any(|m| !self.tried.contains(m)));
            let Some(name) = next else {
                return;
            };
            self.load_closure(sys, index, prefix, &name);
        }
    }

    /// The modaliases of present devices on the buses that modules not
    /// tried yet have aliases for, reading only devices not seen before.
    fn modaliases(&mut self, sys: &dyn Sys, index: &ModuleIndex) -> BTreeSet<String> {
        let untried = index.modules.keys().filter(|m| !self.tried.contains(*m));
        let buses = buses_of(index, untried);
        for bus in sys.list_dir("/sys/bus").unwrap_or_default() {
            if !buses.contains(&bus) {
                continue;
            }
            let dir = format!("/sys/bus/{bus}/devices");
            for dev in sys.list_dir(&dir).unwrap_or_default() {
                let path = format!("{dir}/{dev}");
                if self.seen.contains_key(&path) {
                    continue;
                }
                // None yet may mean a device still being added: read again.
                let alias = sys
                    .read_file(&format!("{path}/modalias"))
                    .map(|d| String::from_utf8_lossy(&d).trim().to_string())
                    .unwrap_or_default();
                if !alias.is_empty() {
                    self.seen.insert(path, alias);
                }
            }
        }
        self.seen.values().cloned().collect()
    }

    /// Loads `name` and what it depends on, each once.
    /// Loads `name` and what it depends on, whatever the devices; true
    /// when all of them loaded (now or before).
    pub fn load_named(
        &mut self,
        sys: &dyn Sys,
        index: &ModuleIndex,
        prefix: &str,
        name: &str,
    ) -> bool {
        let name = normalize(name);
        self.load_closure(sys, index, prefix, &name);
        closure(index, &name)
            .iter()
            .all(|m| self.report.loaded.contains(m))
            && index.modules.contains_key(&name)
    }

    fn load_closure(&mut self, sys: &dyn Sys, index: &ModuleIndex, prefix: &str, name: &str) {
        for m in closure(index, name) {
            if !self.tried.insert(m.clone()) {
                continue;
            }
            let Some(info) = index.modules.get(&m) else {
                continue;
            };
            let compressed = info.path.ends_with(".xz") || info.path.ends_with(".zst");
            match sys.finit_module(&format!("{prefix}{}", info.path), compressed) {
                Ok(()) => self.report.loaded.push(m),
                Err(e) => self.report.failed.push((m, e.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::FakeSys;
    use kiln_init::config::ModuleInfo;

    /// Loads every module present devices ask for.
    fn load_all(sys: &dyn Sys, index: &ModuleIndex) -> LoadReport {
        let mut loader = Loader::default();
        loader.load(sys, index, "", &|| false);
        loader.report
    }

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

    /// Disk drivers before the idle AHCI controller's; once the root is
    /// there the rest waits, and a later round from another prefix loads
    /// only what was not tried.
    #[test]
    fn the_root_first_the_rest_later() {
        let mut sys = FakeSys::default();
        sys.add(
            "/sys/bus/pci/devices/0000:00:1f.2/modalias",
            b"pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01\n",
        );
        sys.add(
            "/sys/bus/pci/devices/0000:00:04.0/modalias",
            b"pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00\n",
        );
        sys.on_load = Some(Box::new(|path, s: &FakeSys| {
            if path == "/m/virtio_pci.ko" {
                s.add(
                    "/sys/bus/virtio/devices/virtio0/modalias",
                    b"virtio:d00000002v00001AF4\n",
                );
            }
        }));
        let mut idx = index();
        idx.modules.insert(
            "ahci".into(),
            module("/m/ahci.ko", &[], &["pci:v*d*sv*sd*bc01sc06i01*"]),
        );
        let mut loader = Loader::default();
        let root = || {
            sys.loaded
                .borrow()
                .iter()
                .any(|(p, _)| p.ends_with("virtio_blk.ko.xz"))
        };
        assert!(loader.load(&sys, &idx, "", &root));
        assert_eq!(
            loader.report.loaded.last().map(String::as_str),
            Some("virtio_blk")
        );
        assert!(!loader.report.loaded.contains(&"ahci".to_string()));
        assert!(!loader.load(&sys, &idx, "/proc/self/fd/3", &|| false));
        assert_eq!(
            loader.report.loaded.last().map(String::as_str),
            Some("ahci")
        );
        let loaded = sys.loaded.borrow();
        assert_eq!(
            loaded.last().map(|l| l.0.as_str()),
            Some("/proc/self/fd/3/m/ahci.ko")
        );
        assert_eq!(
            loaded
                .iter()
                .filter(|l| l.0.ends_with("squashfs.ko.zst"))
                .count(),
            1
        );
    }

    #[test]
    fn only_buses_some_alias_names_are_read() {
        let idx = index();
        let all = idx.modules.keys();
        assert_eq!(
            buses_of(&idx, all).into_iter().collect::<Vec<_>>(),
            ["pci", "virtio"]
        );
        // squashfs's "fs-squashfs" names no bus.
        let names = ["squashfs".to_string()];
        assert!(buses_of(&idx, names.iter()).is_empty());
        let sys = FakeSys::default();
        sys.add("/sys/bus/cpu/devices/cpu0/modalias", b"cpu:type:x86\n");
        sys.add(
            "/sys/bus/pci/devices/0000:00:04.0/modalias",
            b"pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00\n",
        );
        let mut loader = Loader::default();
        let got = loader.modaliases(&sys, &idx);
        assert_eq!(got.len(), 1);
        assert!(got.iter().all(|a| a.starts_with("pci:")));
        assert_eq!(loader.modaliases(&sys, &idx), got);
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
