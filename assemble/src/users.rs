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

/// `name:x:uid:gid:gecos:home:shell` lines.
fn passwd(tree: &Tree) -> Result<Vec<(String, u32, u32, String)>, UserError> {
    Ok(read_text(tree, "/etc/passwd")?
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some((
                f[0].to_string(),
                f[2].parse().ok()?,
                f[3].parse().ok()?,
                f[5].to_string(),
            ))
        })
        .collect())
}

/// `name:x:gid:member,member` lines.
fn groups(tree: &Tree) -> Result<Vec<(String, u32, Vec<String>)>, UserError> {
    Ok(read_text(tree, "/etc/group")?
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            let members = f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(String::from)
                .collect();
            Some((f[0].to_string(), f[2].parse().ok()?, members))
        })
        .collect())
}

/// Resolves `spec` (`""` means root) in `tree`.
pub fn resolve(tree: &Tree, spec: &str) -> Result<Identity, UserError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let pw = passwd(tree)?;
    let gr = groups(tree)?;
    let entry = match user.parse::<u32>() {
        Ok(uid) => pw.iter().find(|p| p.1 == uid).cloned(),
        Err(_) => Some(
            pw.iter()
                .find(|p| p.0 == user)
                .cloned()
                .ok_or_else(|| UserError::UnknownUser(user.to_string()))?,
        ),
    };
    let uid = match &entry {
        Some(e) => e.1,
        None => user.parse().unwrap_or(0),
    };
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => gr
                .iter()
                .find(|x| x.0 == g)
                .map(|x| x.1)
                .ok_or_else(|| UserError::UnknownGroup(g.to_string()))?,
        },
        None => entry.as_ref().map(|e| e.2).unwrap_or(0),
    };
    // Supplementary groups only when the primary group was not overridden,
    // as Docker does.
    let mut supplementary: Vec<u32> = match (&entry, group) {
        (Some(e), None) => gr
            .iter()
            .filter(|g| g.2.contains(&e.0))
            .map(|g| g.1)
            .collect(),
        _ => Vec::new(),
    };
    supplementary.sort_unstable();
    supplementary.dedup();
    Ok(Identity {
        uid,
        gid,
        groups: supplementary,
        home: entry.map(|e| e.3),
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
