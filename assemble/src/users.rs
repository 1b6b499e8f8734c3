//! Resolving `USER[:GROUP]` against a container's own /etc/passwd and
//! /etc/group, as a container runtime does at start, but at build time.

use kiln_formats::tree::{Node, Tree};
use std::path::Path;

/// A resolved identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups the user is listed in.
    pub groups: Vec<u32>,
    /// Home directory from passwd, if the user is listed there.
    pub home: Option<String>,
}

/// Errors from resolving a user or group by name.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The file cannot be read from the cache.
    #[error("reading the image's {path}")]
    Read {
        /// The file in the image.
        path: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The user name is not in the image's /etc/passwd.
    #[error("user {0:?} is not in the image's /etc/passwd")]
    UnknownUser(String),
    /// The group name is not in the image's /etc/group.
    #[error("group {0:?} is not in the image's /etc/group")]
    UnknownGroup(String),
}

fn read_text(tree: &Tree, path: &'static str) -> Result<String, UserError> {
    match tree.get(Path::new(path)) {
        Some(Node::File { data, .. }) => data
            .bytes()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(|source| UserError::Read { path, source }),
        _ => Ok(String::new()),
    }
}

/// One `/etc/passwd` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub gecos: String,
    pub home: String,
    pub shell: String,
}

/// One `/etc/group` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// `name:x:uid:gid:gecos:home:shell` lines; malformed ones are skipped,
/// as libc's getpwent does.
pub(crate) fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() == 7).then_some(())?;
            Some(PasswdEntry {
                name: f[0].into(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                gecos: f[4].into(),
                home: f[5].into(),
                shell: f[6].into(),
            })
        })
        .collect()
}

/// `name:x:gid:member,member` lines.
pub(crate) fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() == 4).then_some(())?;
            Some(GroupEntry {
                name: f[0].into(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(String::from)
                    .collect(),
            })
        })
        .collect()
}

/// Resolves `spec` (`""` means root) in `tree`.
pub fn resolve(tree: &Tree, spec: &str) -> Result<Identity, UserError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let pw = parse_passwd(&read_text(tree, "/etc/passwd")?);
    let gr = parse_group(&read_text(tree, "/etc/group")?);
    let entry = match user.parse::<u32>() {
        Ok(uid) => pw.iter().find(|p| p.uid == uid).cloned(),
        Err(_) => Some(
            pw.iter()
                .find(|p| p.name == user)
                .cloned()
                .ok_or_else(|| UserError::UnknownUser(user.to_string()))?,
        ),
    };
    let uid = match &entry {
        Some(e) => e.uid,
        None => user.parse().unwrap_or(0),
    };
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => gr
                .iter()
                .find(|x| x.name == g)
                .map(|x| x.gid)
                .ok_or_else(|| UserError::UnknownGroup(g.to_string()))?,
        },
        None => entry.as_ref().map(|e| e.gid).unwrap_or(0),
    };
    // Supplementary groups only when the primary group was not overridden,
    // as Docker does.
    let mut supplementary: Vec<u32> = match (&entry, group) {
        (Some(e), None) => gr
            .iter()
            .filter(|g| g.members.contains(&e.name))
            .map(|g| g.gid)
            .collect(),
        _ => Vec::new(),
    };
    supplementary.sort_unstable();
    supplementary.dedup();
    Ok(Identity {
        uid,
        gid,
        groups: supplementary,
        home: entry.map(|e| e.home),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> Tree {
        let mut t = Tree::new();
        t.insert(
            Path::new("/etc/passwd"),
            Node::file(
                0o644,
                "root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1001:Web:/srv:/bin/sh\n",
            ),
        )
        .unwrap();
        t.insert(
            Path::new("/etc/group"),
            Node::file(0o644, "root:x:0:\nweb:x:1001:\nlogs:x:4:web,other\n"),
        )
        .unwrap();
        t
    }

    #[test]
    fn names_and_numbers() {
        let t = tree();
        let web = resolve(&t, "web").unwrap();
        assert_eq!(
            (web.uid, web.gid, web.groups.clone()),
            (1000, 1001, vec![4])
        );
        assert_eq!(web.home.as_deref(), Some("/srv"));
        let r = resolve(&t, "").unwrap();
        assert_eq!((r.uid, r.gid), (0, 0));
        let n = resolve(&t, "1234:55").unwrap();
        assert_eq!((n.uid, n.gid, n.groups), (1234, 55, vec![]));
        let g = resolve(&t, "web:logs").unwrap();
        assert_eq!((g.uid, g.gid, g.groups), (1000, 4, vec![]));
        assert!(matches!(
            resolve(&t, "nobody"),
            Err(UserError::UnknownUser(u)) if u == "nobody"
        ));
        assert!(matches!(
            resolve(&t, "0:wheel"),
            Err(UserError::UnknownGroup(g)) if g == "wheel"
        ));
    }
}
