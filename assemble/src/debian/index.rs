//! The `Packages` index: parsing paragraphs and resolving dependency
//! closures over them.

use super::version::{self, Relation};
use super::{DebianError, Package};
use crate::cache::Digest;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// One alternative of a dependency: `name[:arch] [(rel version)]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dep {
    /// Package (or provided) name, without any `:arch` qualifier.
    pub name: String,
    /// Version relation and version, if the dependency has one.
    pub constraint: Option<(Relation, String)>,
}

impl Dep {
    fn matches_version(&self, version: &str) -> bool {
        match &self.constraint {
            None => true,
            Some((rel, want)) => rel.holds(version, want),
        }
    }
}

impl std::fmt::Display for Dep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.constraint {
            None => write!(f, "{}", self.name),
            Some((r, v)) => write!(f, "{} ({} {})", self.name, r.as_str(), v),
        }
    }
}

/// `a | b (>= 1)` — satisfied by any one alternative.
pub type Group = Vec<Dep>;

/// A parsed paragraph: the recorded [`Package`] plus what resolution needs.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The package as recorded in lock files.
    pub package: Package,
    /// Pre-Depends then Depends, as written: parsed only for packages
    /// resolution reaches (a few hundred of the index's 70,000).
    pub depends: String,
    /// Provided names with an optional exact version (`Provides: x (= 1)`).
    pub provides: Vec<(String, Option<String>)>,
    /// `Essential: yes`: dpkg and maintainer scripts assume it installed.
    pub essential: bool,
}

/// Parses one alternative. Arch qualifiers (`:any`, `:native`, `:amd64`)
/// are dropped: only one architecture (plus `all`) is ever indexed.
fn parse_dep(s: &str) -> Result<Dep, String> {
    // Arch restrictions `[...]` and build profiles `<...>` only appear in
    // source packages' fields; strip them defensively.
    let s = match s.find(['[', '<']) {
        Some(i) if !s[..i].contains('(') => &s[..i],
        _ => s,
    };
    let s = s.trim();
    let (name_part, constraint) = match s.split_once('(') {
        Some((n, rest)) => {
            let inner = rest
                .strip_suffix(')')
                .ok_or_else(|| format!("unclosed `(` in {s:?}"))?
                .trim();
            let op_len = inner
                .find(|c: char| !matches!(c, '<' | '>' | '='))
                .unwrap_or(inner.len());
            let rel = Relation::parse(&inner[..op_len])
                .ok_or_else(|| format!("bad relation in {s:?}"))?;
            let ver = inner[op_len..].trim();
            if ver.is_empty() {
                return Err(format!("missing version in {s:?}"));
            }
            (n.trim(), Some((rel, ver.to_string())))
        }
        None => (s, None),
    };
    let name = name_part.split(':').next().unwrap_or("").trim();
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(format!("bad package name in {s:?}"));
    }
    Ok(Dep {
        name: name.to_string(),
        constraint,
    })
}

/// Parses a `Depends`-style field into groups of alternatives.
pub fn parse_depends(field: &str) -> Result<Vec<Group>, String> {
    field
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(|g| g.split('|').map(parse_dep).collect())
        .collect()
}

/// Splits a deb822 file into paragraphs of (field, value) with
/// continuation lines joined by `\n`.
pub fn paragraphs(text: &str) -> Vec<BTreeMap<&str, String>> {
    let mut out = Vec::new();
    let mut cur: BTreeMap<&str, String> = BTreeMap::new();
    let mut last: Option<&str> = None;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            last = None;
        } else if line.starts_with([' ', '\t']) {
            if let Some(v) = last.and_then(|k| cur.get_mut(k)) {
                v.push('\n');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            cur.insert(k, v.trim().to_string());
            last = Some(k);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The fields of a Packages paragraph that resolution and fetching use.
const KEPT: [&str; 10] = [
    "Package",
    "Architecture",
    "Version",
    "Pre-Depends",
    "Depends",
    "Provides",
    "Essential",
    "Filename",
    "SHA256",
    "Size",
];

/// Parses a Packages file as it streams in, keeping amd64 and `all`
/// packages and only the fields in [`KEPT`]: the 57 MB text of trixie's
/// index is never held whole. A paragraph without the fields needed to
/// fetch it is an error: the index was signed, so it should be complete.
pub fn parse_packages(
    mut r: impl std::io::BufRead,
    mut each: impl FnMut(Entry),
) -> Result<(), DebianError> {
    let mut fields: Vec<(&'static str, String)> = Vec::new();
    let mut line = String::new();
    // Whether the last field line was kept (its continuations are too).
    let mut keeping = false;
    loop {
        line.clear();
        let n = r.read_line(&mut line).map_err(|e| DebianError::Index {
            what: e.to_string(),
        })?;
        let text = line.trim_end_matches(['\n', '\r']);
        if n == 0 || text.trim().is_empty() {
            if !fields.is_empty() {
                if let Some(e) = entry(&fields)? {
                    each(e);
                }
                fields.clear();
            }
            if n == 0 {
                return Ok(());
            }
            keeping = false;
        } else if text.starts_with([' ', '\t']) {
            if let (true, Some((_, v))) = (keeping, fields.last_mut()) {
                v.push('\n');
                v.push_str(text.trim());
            }
        } else if let Some((k, v)) = text.split_once(':') {
            let kept = KEPT.iter().find(|f| **f == k);
            keeping = kept.is_some();
            if let Some(k) = kept {
                fields.push((k, v.trim().to_string()));
            }
        }
    }
}

/// The entry of one paragraph, if it is of an indexed architecture.
fn entry(p: &[(&'static str, String)]) -> Result<Option<Entry>, DebianError> {
    let get = |k: &str| p.iter().find(|(f, _)| *f == k).map(|(_, v)| v.as_str());
    let field = |k: &str| -> Result<&str, DebianError> {
        get(k).ok_or_else(|| DebianError::Index {
            what: format!(
                "package {:?}: missing field {k}",
                get("Package").unwrap_or("?")
            ),
        })
    };
    let arch = field("Architecture")?;
    if arch != super::ARCH && arch != "all" {
        return Ok(None);
    }
    let name = field("Package")?;
    let bad = |what: String| DebianError::Index {
        what: format!("package {name}: {what}"),
    };
    let depends = ["Pre-Depends", "Depends"]
        .iter()
        .filter_map(|k| get(k))
        .collect::<Vec<_>>()
        .join(", ");
    let mut provides = Vec::new();
    if let Some(v) = get("Provides") {
        for g in parse_depends(v).map_err(bad)? {
            for d in g {
                let ver = match d.constraint {
                    Some((Relation::Eq, v)) => Some(v),
                    _ => None,
                };
                provides.push((d.name, ver));
            }
        }
    }
    let sha256 = Digest::from_hex(field("SHA256")?).map_err(|e| bad(e.to_string()))?;
    let size = field("Size")?.parse().map_err(|_| bad("bad Size".into()))?;
    Ok(Some(Entry {
        package: Package {
            name: name.to_string(),
            version: field("Version")?.to_string(),
            architecture: arch.to_string(),
            filename: field("Filename")?.to_string(),
            sha256,
            size,
        },
        depends,
        provides,
        essential: get("Essential") == Some("yes"),
    }))
}

/// All packages by name (highest version first) and who provides what.
#[derive(Debug, Default)]
pub struct Index {
    by_name: BTreeMap<String, Vec<Entry>>,
    /// Provided name → (provider name, provider version, provided version).
    providers: BTreeMap<String, Vec<(String, String, Option<String>)>>,
}

impl Index {
    /// The index of a Packages file (see [`parse_packages`]), each name's
    /// candidates highest version first.
    pub fn read(r: impl std::io::BufRead) -> Result<Self, DebianError> {
        let mut idx = Index::default();
        parse_packages(r, |e| {
            for (pname, pver) in &e.provides {
                idx.providers.entry(pname.clone()).or_default().push((
                    e.package.name.clone(),
                    e.package.version.clone(),
                    pver.clone(),
                ));
            }
            idx.by_name
                .entry(e.package.name.clone())
                .or_default()
                .push(e);
        })?;
        for v in idx.by_name.values_mut() {
            v.sort_by(|a, b| version::compare(&b.package.version, &a.package.version));
        }
        for v in idx.providers.values_mut() {
            // By provider name, then highest version first: deterministic.
            v.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| version::compare(&b.1, &a.1)));
        }
        Ok(idx)
    }

    /// Number of distinct package names.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether the index has no packages.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Names of the Essential packages, sorted.
    pub fn essential(&self) -> Vec<String> {
        self.by_name
            .iter()
            .filter(|(_, v)| v.first().is_some_and(|e| e.essential))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The highest version of `name`.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name).and_then(|v| v.first())
    }

    fn entry(&self, name: &str, version: &str) -> Option<&Entry> {
        self.by_name
            .get(name)?
            .iter()
            .find(|e| e.package.version == version)
    }

    /// Whether an already chosen package satisfies `dep`.
    fn chosen_satisfies(&self, chosen: &BTreeMap<String, &Entry>, dep: &Dep) -> bool {
        if let Some(e) = chosen.get(&dep.name) {
            if dep.matches_version(&e.package.version) {
                return true;
            }
        }
        chosen.values().any(|e| {
            e.provides.iter().any(|(n, v)| {
                n == &dep.name
                    && match (&dep.constraint, v) {
                        (None, _) => true,
                        (Some((rel, want)), Some(v)) => rel.holds(v, want),
                        (Some(_), None) => false,
                    }
            })
        })
    }

    /// The package that would satisfy `dep` if chosen now: the highest
    /// matching version of the real package, else the first provider.
    fn candidate(&self, dep: &Dep) -> Option<&Entry> {
        if let Some(e) = self
            .by_name
            .get(&dep.name)
            .and_then(|v| v.iter().find(|e| dep.matches_version(&e.package.version)))
        {
            return Some(e);
        }
        self.providers
            .get(&dep.name)?
            .iter()
            .find_map(|(n, v, pv)| {
                let ok = match (&dep.constraint, pv) {
                    (None, _) => true,
                    (Some((rel, want)), Some(pv)) => rel.holds(pv, want),
                    (Some(_), None) => false,
                };
                if ok {
                    self.entry(n, v)
                } else {
                    None
                }
            })
    }

    /// Dependency closure of `roots` over Pre-Depends and Depends, sorted
    /// by name. For each group the first satisfiable alternative wins,
    /// unless a package already chosen satisfies the group.
    pub fn resolve(&self, roots: &[String]) -> Result<Vec<Package>, DebianError> {
        let mut chosen: BTreeMap<String, &Entry> = BTreeMap::new();
        // (entry, chain of names that led to it)
        let mut queue: VecDeque<(&Entry, Vec<String>)> = VecDeque::new();
        for r in roots {
            let dep = parse_dep(r).map_err(|what| DebianError::Index { what })?;
            if self.chosen_satisfies(&chosen, &dep) {
                continue;
            }
            let e = self
                .candidate(&dep)
                .ok_or_else(|| DebianError::Unsatisfiable {
                    dependency: dep.to_string(),
                    chain: Vec::new(),
                })?;
            chosen.insert(e.package.name.clone(), e);
            queue.push_back((e, vec![e.package.name.clone()]));
        }
        while let Some((e, chain)) = queue.pop_front() {
            let groups = parse_depends(&e.depends).map_err(|what| DebianError::Index {
                what: format!("package {}: {what}", e.package.name),
            })?;
            for group in &groups {
                if group.iter().any(|d| self.chosen_satisfies(&chosen, d)) {
                    continue;
                }
                let Some(next) = group.iter().find_map(|d| self.candidate(d)) else {
                    let dependency = group
                        .iter()
                        .map(Dep::to_string)
                        .collect::<Vec<_>>()
                        .join(" | ");
                    return Err(DebianError::Unsatisfiable { dependency, chain });
                };
                if let Some(prev) = chosen.get(&next.package.name) {
                    // Two versions of one package would be needed.
                    return Err(DebianError::Conflict {
                        package: next.package.name.clone(),
                        have: prev.package.version.clone(),
                        want: group
                            .iter()
                            .map(Dep::to_string)
                            .collect::<Vec<_>>()
                            .join(" | "),
                        chain,
                    });
                }
                chosen.insert(next.package.name.clone(), next);
                let mut c = chain.clone();
                c.push(next.package.name.clone());
                queue.push_back((next, c));
            }
        }
        let names: BTreeSet<&String> = chosen.keys().collect();
        Ok(names
            .into_iter()
            .map(|n| chosen[n].package.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDEX: &str = "\
Package: app
Version: 1.0
Architecture: amd64
Depends: libc6 (>= 2.36), mta | mail-transport-agent, libfoo:any (>= 2), debconf (>= 0.5) | debconf-2.0
Pre-Depends: init-system-helpers (>= 1.54~)
Filename: pool/main/a/app/app_1.0_amd64.deb
Size: 100
SHA256: 0000000000000000000000000000000000000000000000000000000000000001

Package: libc6
Version: 2.36-9
Architecture: amd64
Filename: pool/main/g/glibc/libc6_2.36-9_amd64.deb
Size: 1
SHA256: 0000000000000000000000000000000000000000000000000000000000000002

Package: libc6
Version: 2.41-12
Architecture: amd64
Filename: pool/main/g/glibc/libc6_2.41-12_amd64.deb
Size: 1
SHA256: 0000000000000000000000000000000000000000000000000000000000000003

Package: libc6
Version: 9.0
Architecture: arm64
Filename: pool/main/g/glibc/libc6_9.0_arm64.deb
Size: 1
SHA256: 0000000000000000000000000000000000000000000000000000000000000004

Package: exim4
Version: 4.96
Architecture: amd64
Provides: mail-transport-agent
Depends: libc6
Filename: pool/main/e/exim4/exim4_4.96_amd64.deb
Size: 1
SHA256: 0000000000000000000000000000000000000000000000000000000000000005

Package: libfoo
Version: 1.5
Architecture: amd64
Filename: pool/main/f/foo/libfoo_1.5_amd64.deb
Size: 1
SHA256: 0000000000000000000000000000000000000000000000000000000000000006

Package: libfoo-ng
Version: 3.0
Architecture: amd64
Provides: libfoo (= 2.5)
Filename: pool/main/f/foo/libfoo-ng_3.0_amd64.deb
Size: 1
SHA256: 0000000000000000000000000000000000000000000000000000000000000007

Package: cdebconf
Version: 0.270
Architecture: amd64
Provides: debconf-2.0
Filename: pool/main/c/cdebconf/cdebconf_0.270_amd64.deb
Size: 1
SHA256: 0000000000000000000000000000000000000000000000000000000000000008

Package: init-system-helpers
Version: 1.54~rc1
Architecture: all
Filename: pool/main/i/ish/init-system-helpers_1.54~rc1_all.deb
Size: 1
SHA256: 0000000000000000000000000000000000000000000000000000000000000009
Description: long
 continued line
 .
 more

Package: broken
Version: 1
Architecture: all
Depends: app, nothere (>= 1) | libc6 (>> 3)
Filename: pool/b.deb
Size: 1
SHA256: 000000000000000000000000000000000000000000000000000000000000000a
";

    fn index() -> Index {
        Index::read(INDEX.as_bytes()).unwrap()
    }

    fn names(p: &[Package]) -> Vec<String> {
        p.iter()
            .map(|p| format!("{}={}", p.name, p.version))
            .collect()
    }

    #[test]
    fn parses_fields_and_skips_foreign_arch() {
        let mut e = Vec::new();
        parse_packages(INDEX.as_bytes(), |x| e.push(x)).unwrap();
        assert_eq!(e.len(), 9);
        let app = &e[0];
        assert_eq!(app.package.filename, "pool/main/a/app/app_1.0_amd64.deb");
        assert_eq!(app.package.size, 100);
        // Pre-Depends come first.
        let depends = parse_depends(&app.depends).unwrap();
        assert_eq!(depends[0][0].name, "init-system-helpers");
        assert_eq!(depends[2].len(), 2);
        assert_eq!(depends[3][0].name, "libfoo");
        assert_eq!(depends[3][0].constraint, Some((Relation::Ge, "2".into())));
        let idx = index();
        assert_eq!(idx.get("libc6").unwrap().package.version, "2.41-12");
    }

    #[test]
    fn missing_field_is_an_error() {
        let r = parse_packages(&b"Package: x\nArchitecture: all\nVersion: 1\n"[..], drop);
        assert!(matches!(r, Err(DebianError::Index { .. })));
    }

    #[test]
    fn closure_with_alternatives_provides_and_versions() {
        let got = index().resolve(&["app".to_string()]).unwrap();
        assert_eq!(
            names(&got),
            vec![
                "app=1.0",
                // debconf is not a package: debconf-2.0 via its provider.
                "cdebconf=0.270",
                // mta does not exist: the provider of mail-transport-agent.
                "exim4=4.96",
                "init-system-helpers=1.54~rc1",
                // highest version wins.
                "libc6=2.41-12",
                // libfoo 1.5 is too old; libfoo-ng provides libfoo (= 2.5).
                "libfoo-ng=3.0",
            ]
        );
    }

    #[test]
    fn root_with_version_constraint() {
        let got = index().resolve(&["libc6 (<< 2.40)".to_string()]).unwrap();
        assert_eq!(names(&got), vec!["libc6=2.36-9"]);
    }

    #[test]
    fn unsatisfiable_names_chain() {
        let err = index().resolve(&["broken".to_string()]).unwrap_err();
        match err {
            DebianError::Unsatisfiable { dependency, chain } => {
                assert_eq!(dependency, "nothere (>= 1) | libc6 (>> 3)");
                assert_eq!(chain, vec!["broken".to_string()]);
            }
            e => panic!("unexpected {e}"),
        }
        assert!(matches!(
            index().resolve(&["nope".to_string()]),
            Err(DebianError::Unsatisfiable { .. })
        ));
    }

    #[test]
    fn dep_parsing() {
        let g = parse_depends("a:any (>= 1:2.0~) | b, c:native, d (<<3)").unwrap();
        assert_eq!(g.len(), 3);
        assert_eq!(g[0][0].name, "a");
        assert_eq!(g[0][0].constraint, Some((Relation::Ge, "1:2.0~".into())));
        assert_eq!(g[1][0].name, "c");
        assert_eq!(g[2][0].constraint, Some((Relation::Lt, "3".into())));
        assert!(parse_depends("a (>= )").is_err());
        assert!(parse_depends("a (~ 1)").is_err());
        assert!(parse_depends("a (>= 1").is_err());
    }
}
