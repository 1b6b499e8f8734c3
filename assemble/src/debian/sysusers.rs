//! Users and groups for Debian images, as a configured system has them:
//! `/etc/passwd` and `/etc/group` from base-passwd's masters (what its
//! preinst does), plus every user and group the packages declare in
//! `sysusers.d` (what `systemd-sysusers` does at install time), and
//! `/etc/shadow` and `/etc/gshadow` with every account locked (what
//! `pwconv` and `grpconv` give).
//!
//! Ids of new system users and groups are taken downward from 999, in
//! sorted file order, so the same packages always get the same ids.

use crate::users::{parse_group, parse_passwd, GroupEntry as Group, PasswdEntry as User};
use kiln_formats::tree::{Node, Tree, TreeError};
use std::collections::BTreeMap;
use std::path::Path;

const MASTERS: &str = "/usr/share/base-passwd";
const DIRS: [&str; 2] = ["/usr/lib/sysusers.d", "/etc/sysusers.d"];
/// systemd's SYS_UID_MAX: system ids are allocated from here down.
const SYSTEM_MAX: u32 = 999;
const NOLOGIN: &str = "/usr/sbin/nologin";

/// Errors reading the image's account files.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    /// A file could not be read from the cache.
    #[error("reading {path}")]
    Read {
        /// The file in the image.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Writing the result into the tree failed.
    #[error("writing /etc/passwd and /etc/group")]
    Tree(#[from] TreeError),
}

fn text(tree: &Tree, path: &str) -> Result<Option<String>, UsersError> {
    match tree.get(Path::new(path)) {
        Some(Node::File { data, .. }) => data
            .bytes()
            .map(|b| Some(String::from_utf8_lossy(&b).into_owned()))
            .map_err(|source| UsersError::Read {
                path: path.to_string(),
                source,
            }),
        _ => Ok(None),
    }
}

/// Splits a sysusers.d line into fields; `"..."` quotes a field.
fn fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&c) = chars.peek() else { break };
        let mut field = String::new();
        if c == '"' {
            chars.next();
            for c in chars.by_ref() {
                if c == '"' {
                    break;
                }
                field.push(c);
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                field.push(c);
                chars.next();
            }
        }
        out.push(field);
    }
    out
}

/// The sysusers.d lines of the image, by file name (`/etc` overrides
/// `/usr/lib`), files in sorted order.
fn declarations(tree: &Tree) -> Result<Vec<Vec<String>>, UsersError> {
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for dir in DIRS {
        let Some(d) = tree.dir(Path::new(dir)) else {
            continue;
        };
        for name in d.entries.keys() {
            let name = name.to_string_lossy();
            if name.ends_with(".conf") {
                files.insert(name.to_string(), format!("{dir}/{name}"));
            }
        }
    }
    let mut out = Vec::new();
    for path in files.values() {
        let Some(t) = text(tree, path)? else {
            continue;
        };
        for line in t.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.push(fields(line));
        }
    }
    Ok(out)
}

/// The lowest-numbered free id at or below [`SYSTEM_MAX`], searching down.
fn free(used: &dyn Fn(u32) -> bool, from: &mut u32) -> Option<u32> {
    while *from > 0 {
        let id = *from;
        *from -= 1;
        if !used(id) {
            return Some(id);
        }
    }
    None
}

/// Creates `/etc/passwd` and `/etc/group` from base-passwd's masters when
/// the image has none, then adds the sysusers.d users and groups. Does
/// nothing for an image with neither.
pub fn apply(tree: &mut Tree, mtime: u64) -> Result<(), UsersError> {
    let mut passwd = match text(tree, "/etc/passwd")? {
        Some(t) => Some(t),
        None => text(tree, &format!("{MASTERS}/passwd.master"))?,
    };
    let mut group = match text(tree, "/etc/group")? {
        Some(t) => Some(t),
        None => text(tree, &format!("{MASTERS}/group.master"))?,
    };
    let decls = declarations(tree)?;
    if passwd.is_none() && group.is_none() && decls.is_empty() {
        return Ok(());
    }
    let mut users = parse_passwd(passwd.get_or_insert_with(String::new));
    let mut groups = parse_group(group.get_or_insert_with(String::new));

    // Groups first (`g`, and the group of each `u`), as systemd-sysusers.
    let mut next_gid = SYSTEM_MAX;
    let mut next_uid = SYSTEM_MAX;
    for d in &decls {
        let (kind, name, id) = (d[0].as_str(), d.get(1), d.get(2).map(String::as_str));
        let Some(name) = name else { continue };
        if !matches!(kind, "g" | "u") || groups.iter().any(|g| &g.name == name) {
            continue;
        }
        // `u name uid:gid` names an existing group; `u name uid` wants a
        // group with the same id; a path or `-` takes any.
        let wanted = match (kind, id) {
            ("u", Some(id)) if id.contains(':') => continue,
            (_, Some(id)) => id.parse::<u32>().ok(),
            _ => None,
        };
        let taken = |gid: u32| groups.iter().any(|g| g.gid == gid);
        let gid = match wanted.filter(|w| !taken(*w)) {
            Some(g) => g,
            None => match free(
                &|g| taken(g) || users.iter().any(|u| u.uid == g && kind == "u"),
                &mut next_gid,
            ) {
                Some(g) => g,
                None => continue,
            },
        };
        groups.push(Group {
            name: name.clone(),
            gid,
            members: Vec::new(),
        });
    }
    for d in &decls {
        let Some(name) = d.get(1) else { continue };
        match d[0].as_str() {
            "u" if !users.iter().any(|u| &u.name == name) => {
                let id = d.get(2).map(String::as_str).unwrap_or("-");
                let (uid_s, gid_s) = id.split_once(':').unwrap_or((id, ""));
                let gid = if gid_s.is_empty() {
                    groups.iter().find(|g| &g.name == name).map(|g| g.gid)
                } else {
                    gid_s
                        .parse()
                        .ok()
                        .or_else(|| groups.iter().find(|g| g.name == gid_s).map(|g| g.gid))
                };
                let Some(gid) = gid else { continue };
                let taken = |u: u32| users.iter().any(|x| x.uid == u);
                let uid = match uid_s.parse::<u32>().ok().filter(|u| !taken(*u)) {
                    Some(u) => u,
                    // Same number as its group when free, as sysusers does.
                    None if !taken(gid) && gid <= SYSTEM_MAX => gid,
                    None => match free(&taken, &mut next_uid) {
                        Some(u) => u,
                        None => continue,
                    },
                };
                let field = |i: usize, default: &str| {
                    d.get(i)
                        .filter(|v| v.as_str() != "-")
                        .cloned()
                        .unwrap_or_else(|| default.to_string())
                };
                users.push(User {
                    name: name.clone(),
                    uid,
                    gid,
                    gecos: field(3, ""),
                    home: field(4, "/"),
                    shell: field(5, NOLOGIN),
                });
            }
            "m" => {
                let Some(gname) = d.get(2) else { continue };
                if let Some(g) = groups.iter_mut().find(|g| &g.name == gname) {
                    if !g.members.contains(name) {
                        g.members.push(name.clone());
                    }
                }
            }
            _ => {}
        }
    }

    let passwd: String = users
        .iter()
        .map(|u| {
            format!(
                "{}:x:{}:{}:{}:{}:{}\n",
                u.name, u.uid, u.gid, u.gecos, u.home, u.shell
            )
        })
        .collect();
    let group: String = groups
        .iter()
        .map(|g| format!("{}:x:{}:{}\n", g.name, g.gid, g.members.join(",")))
        .collect();
    // Shadow entries as pwconv and grpconv add them: locked (`*`),
    // changed on the build's day. Existing entries are kept.
    let day = mtime / 86_400;
    let shadow = with_missing(
        text(tree, "/etc/shadow")?,
        users.iter().map(|u| &u.name),
        |name| format!("{name}:*:{day}:0:99999:7:::\n"),
    );
    let gshadow = with_missing(
        text(tree, "/etc/gshadow")?,
        groups.iter().map(|g| &g.name),
        |name| {
            let members = groups
                .iter()
                .find(|g| &g.name == name)
                .map(|g| g.members.join(","))
                .unwrap_or_default();
            format!("{name}:*::{members}\n")
        },
    );
    // Readable by group shadow (base-passwd's 42) where it exists.
    let shadow_gid = groups.iter().find(|g| g.name == "shadow").map(|g| g.gid);
    for (path, text, mode, gid) in [
        ("/etc/passwd", passwd, 0o644, 0),
        ("/etc/group", group, 0o644, 0),
        ("/etc/shadow", shadow, 0o640, shadow_gid.unwrap_or(0)),
        ("/etc/gshadow", gshadow, 0o640, shadow_gid.unwrap_or(0)),
    ] {
        let mode = if shadow_gid.is_none() && mode == 0o640 {
            0o600
        } else {
            mode
        };
        let mut node = Node::file(mode, text);
        node.meta_mut().mtime = mtime;
        node.meta_mut().gid = gid;
        tree.insert(Path::new(path), node)?;
    }
    Ok(())
}

/// `existing` plus a `line(name)` for each of `names` it has no line for.
fn with_missing<'a>(
    existing: Option<String>,
    names: impl Iterator<Item = &'a String>,
    line: impl Fn(&String) -> String,
) -> String {
    let mut out = existing.unwrap_or_default();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let have: std::collections::BTreeSet<String> = out
        .lines()
        .filter_map(|l| l.split(':').next())
        .map(String::from)
        .collect();
    for name in names {
        if !have.contains(name) {
            out.push_str(&line(name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(tree: &Tree, path: &str) -> String {
        text(tree, path).unwrap().unwrap()
    }

    #[test]
    fn masters_then_sysusers() {
        let mut t = Tree::new();
        t.insert(
            Path::new("/usr/share/base-passwd/passwd.master"),
            Node::file(
                0o644,
                "root:*:0:0:root:/root:/bin/bash\nwww-data:*:33:33:www-data:/var/www:/usr/sbin/nologin\n",
            ),
        )
        .unwrap();
        t.insert(
            Path::new("/usr/share/base-passwd/group.master"),
            Node::file(0o644, "root:*:0:\nwww-data:*:33:\n"),
        )
        .unwrap();
        t.insert(
            Path::new("/usr/lib/sysusers.d/b.conf"),
            Node::file(
                0o644,
                "# comment\ng  _ssh -\nu postgres - \"PostgreSQL administrator\" /var/lib/postgresql /bin/bash\nm postgres _ssh\nu www-data 33 \"ignored: exists\"\nu fixed 400:33 - /srv\n",
            ),
        )
        .unwrap();
        t.insert(
            Path::new("/usr/lib/sysusers.d/a.conf"),
            Node::file(0o644, "u messagebus - \"System Message Bus\"\n"),
        )
        .unwrap();
        apply(&mut t, 0).unwrap();
        // Masters keep their passwords field as `x` entries of the shadow era.
        assert_eq!(
            read(&t, "/etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\n\
             www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n\
             messagebus:x:999:999:System Message Bus:/:/usr/sbin/nologin\n\
             postgres:x:997:997:PostgreSQL administrator:/var/lib/postgresql:/bin/bash\n\
             fixed:x:400:33::/srv:/usr/sbin/nologin\n"
        );
        assert_eq!(
            read(&t, "/etc/group"),
            "root:x:0:\nwww-data:x:33:\nmessagebus:x:999:\n_ssh:x:998:postgres\npostgres:x:997:\n"
        );
        assert_eq!(
            read(&t, "/etc/shadow"),
            "root:*:0:0:99999:7:::\nwww-data:*:0:0:99999:7:::\nmessagebus:*:0:0:99999:7:::\n\
             postgres:*:0:0:99999:7:::\nfixed:*:0:0:99999:7:::\n"
        );
        assert_eq!(
            read(&t, "/etc/gshadow"),
            "root:*::\nwww-data:*::\nmessagebus:*::\n_ssh:*::postgres\npostgres:*::\n"
        );
        // No group `shadow`: only root reads them.
        let meta = t.get(Path::new("/etc/shadow")).unwrap().meta();
        assert_eq!((meta.mode, meta.gid), (0o600, 0));
        // Applying again changes nothing.
        let before = t.clone();
        apply(&mut t, 0).unwrap();
        assert_eq!(t, before);
    }

    #[test]
    fn nothing_to_do_without_accounts() {
        let mut t = Tree::new();
        apply(&mut t, 0).unwrap();
        assert!(t.get(Path::new("/etc/passwd")).is_none());
    }

    #[test]
    fn quoted_fields() {
        assert_eq!(
            fields("u  a 1 \"x y\" /h"),
            vec!["u", "a", "1", "x y", "/h"]
        );
    }
}
