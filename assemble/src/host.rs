//! Inputs → host tree: the container roots under /containers, the
//! recipe's files, the init's config, and the checks that can only be made
//! once the trees exist (a command missing from its image, a bind whose
//! source is not in the host root), reported against the recipe.

use crate::fetch::ContainerImage;
use crate::oci::ImageConfig;
use crate::recipe::{ContainerSpec, Kind, Recipe, RecipeError};
use crate::users;
use kiln_formats::tree::{Meta, Node, Tree, TreeError};
pub use kiln_init::config::DEFAULT_PATH;
use kiln_init::config::{
    self as initcfg, Bind, Container, FileEntry, HostConfig, CONTAINER_MOUNTPOINTS,
    HOST_MOUNTPOINTS, RUNTIME_PREFIXES,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Errors from assembling the host root.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The recipe is invalid.
    #[error(transparent)]
    Recipe(#[from] Box<RecipeError>),
    /// Adding to the host tree failed.
    #[error("{what}")]
    Tree {
        /// What was being added.
        what: String,
        /// The underlying error.
        source: TreeError,
    },
    /// Reading a container's users failed.
    #[error("container {container}")]
    Users {
        /// The container.
        container: String,
        /// The underlying error.
        source: crate::users::UserError,
    },
    /// Reading a file the recipe names failed.
    #[error("reading {}", path.display())]
    Io {
        /// The file read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
}

/// The host root and what the init runs from it.
#[derive(Debug)]
pub struct Host {
    /// The root filesystem tree.
    pub tree: Tree,
    /// What the init runs, written into the tree as `/kiln/config.json`.
    pub config: HostConfig,
}

/// Assembles the host root from the container images (in recipe order).
pub fn assemble(
    recipe: &Recipe,
    images: Vec<ContainerImage>,
    updater: &[u8],
    source_date_epoch: u64,
) -> Result<Host, HostError> {
    let mut host = Tree::new();
    let mut config = HostConfig {
        hostname: recipe.host.hostname.clone(),
        when_done: recipe.host.when_done,
        healthy_after_ms: recipe.host.healthy_after_ms,
        healthy_within_ms: recipe.update.healthy_within_ms,
        files: Vec::new(),
        onboot: Vec::new(),
        services: Vec::new(),
        onshutdown: Vec::new(),
        network: recipe.network.clone(),
        hostname_pinned: recipe.host.hostname_pinned,
    };
    let tree_err = |what: String| move |source| HostError::Tree { what, source };

    // Recipe files first: bind sources are checked against them. (Those
    // for a container's image are in it already.)
    for f in recipe.files.iter().filter(|f| f.container.is_none()) {
        let node = crate::fetch::file_node(f, source_date_epoch)
            .map_err(|(path, source)| HostError::Io { path, source })?;
        let path = &f.path.value;
        // A tmpfs covers these at boot: the init copies them into place.
        let at = if initcfg::is_runtime_file(path) {
            config.files.push(FileEntry {
                path: path.clone(),
                mode: f.mode,
                uid: f.uid,
                gid: f.gid,
            });
            format!("{}{path}", initcfg::RUNTIME_FILES_DIR)
        } else {
            path.clone()
        };
        host.insert(Path::new(&at), node)
            .map_err(tree_err(format!("[[file]] {path}")))?;
    }

    // Each userns container's ids follow the previous one's.
    let mut userns_ranges = (0..).map(|n| initcfg::USERNS_FIRST + n * initcfg::USERNS_SIZE);
    for (spec, image) in recipe.containers.iter().zip(images) {
        let mut rootfs = image.tree;
        let userns = if spec.userns {
            userns_ranges.next()
        } else {
            None
        };
        let c = container_config(recipe, spec, &mut rootfs, &image.config, &host, userns)?;
        clamp_mtimes(&mut rootfs.root, source_date_epoch);
        host.insert(Path::new(&c.rootfs), Node::Dir(rootfs.root))
            .map_err(tree_err(format!("container {}", c.name)))?;
        match spec.kind {
            Kind::Onboot => config.onboot.push(c),
            Kind::Service => config.services.push(c),
            Kind::Onshutdown => config.onshutdown.push(c),
        }
    }

    if let Some(online) = &recipe.update.online {
        let (mut rootfs, spec) = update_service(online, updater, source_date_epoch)?;
        let image = ImageConfig {
            entrypoint: vec![UPDATER.into()],
            ..ImageConfig::default()
        };
        let c = container_config(recipe, &spec, &mut rootfs, &image, &host, None)?;
        clamp_mtimes(&mut rootfs.root, source_date_epoch);
        host.insert(Path::new(&c.rootfs), Node::Dir(rootfs.root))
            .map_err(tree_err(format!("container {}", c.name)))?;
        config.services.push(c);
    }

    for dir in HOST_MOUNTPOINTS
        .iter()
        .chain(&[initcfg::CONTAINERS_DIR, "/kiln", initcfg::DATA_DIR])
    {
        host.mkdir_p(Path::new(dir), &Meta::root(0o755))
            .map_err(tree_err(format!("host directory {dir}")))?;
    }
    let json = serde_json::to_vec_pretty(&config).unwrap_or_else(|e| {
        // Strings, numbers and lists only: serialising cannot fail.
        unreachable!("host config serialises: {e}")
    });
    let mut node = Node::file(0o644, json);
    node.meta_mut().mtime = source_date_epoch;
    host.insert(Path::new(initcfg::HOST_CONFIG_PATH), node)
        .map_err(tree_err("init config".into()))?;
    Ok(Host { tree: host, config })
}

/// The update service's program in its container.
const UPDATER: &str = "/usr/bin/kiln-update";
/// Where its TLS client looks for CA roots (Debian's bundle path).
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Mozilla's CA roots (webpki-root-certs) and the recipe's `[update] ca`
/// (DER) as a PEM bundle.
fn ca_bundle(extra: &[Vec<u8>]) -> Vec<u8> {
    use base64::Engine;
    let mut pem = String::new();
    let mozilla = webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .map(|c| c.as_ref());
    for cert in mozilla.chain(extra.iter().map(Vec::as_slice)) {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert);
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    pem.into_bytes()
}

/// The update service kiln adds for `[update] source`: its root (the
/// static program and its configuration) and its container, as a recipe
/// would declare it. It gets no capability; the host's network, its
/// volume (the TUF datastore and the staged update) and the control
/// socket, through which the init writes the slot: no disk.
fn update_service(
    online: &crate::recipe::OnlineSpec,
    updater: &[u8],
    epoch: u64,
) -> Result<(Tree, ContainerSpec), HostError> {
    use crate::recipe::{At, ImageRef, ImageSource};
    use kiln_update::service;
    let config = service::Config {
        source: online.source.value.clone(),
        root_keys: online.root_keys.clone(),
        check_secs: online.check_secs,
        window: online.window,
    };
    let json = serde_json::to_vec_pretty(&config).unwrap_or_else(|e| {
        // Strings, numbers and lists only: serialising cannot fail.
        unreachable!("update service config serialises: {e}")
    });
    let mut rootfs = Tree::new();
    let tree_err = |what: &str| {
        let what = format!("container {}: {what}", service::NAME);
        move |source| HostError::Tree { what, source }
    };
    for (path, mode, data) in [
        (UPDATER, 0o755, updater.to_vec()),
        (service::CONFIG_PATH, 0o644, json),
        (CA_BUNDLE, 0o644, ca_bundle(&online.ca)),
    ] {
        let mut node = Node::file(mode, data);
        node.meta_mut().mtime = epoch;
        rootfs
            .insert(Path::new(path), node)
            .map_err(tree_err(path))?;
    }
    let spec = ContainerSpec {
        kind: Kind::Service,
        name: At {
            value: service::NAME.to_string(),
            loc: online.source.loc.clone(),
        },
        // Never fetched: errors about its image name the source's line.
        image: At {
            value: ImageSource::Oci(ImageRef::Registry(format!("kiln/{}", service::NAME))),
            loc: online.source.loc.clone(),
        },
        command: None,
        env: BTreeMap::new(),
        cwd: None,
        user: None,
        net: initcfg::Net::Host,
        address: None,
        ports: Vec::new(),
        // A volume is also a writable bind, as the recipe makes it.
        binds: vec![At {
            value: crate::recipe::BindSpec {
                source: format!("{}/{}", initcfg::VOLUMES_DIR, service::NAME),
                target: service::STATE_DIR.into(),
                readonly: false,
            },
            loc: online.source.loc.clone(),
        }],
        volumes: vec![(service::NAME.into(), service::STATE_DIR.into())],
        tmpfs: Vec::new(),
        restart: initcfg::Restart::Always,
        max_restarts: 0,
        essential: false,
        control: Some(At {
            value: true,
            loc: online.source.loc.clone(),
        }),
        stop_signal: "SIGTERM".into(),
        stop_timeout_ms: 2000,
        depends_on: Vec::new(),
        ready: None,
        init: false,
        resources: initcfg::Resources::default(),
        // Root owns its volume and the socket: it needs no capability.
        capabilities: Vec::new(),
        seccomp: true,
        sysctl: BTreeMap::new(),
        rlimits: BTreeMap::new(),
        userns: false,
    };
    Ok((rootfs, spec))
}

/// No timestamp in the image is later than the lock's epoch.
fn clamp_mtimes(dir: &mut kiln_formats::tree::Dir, epoch: u64) {
    dir.meta.mtime = dir.meta.mtime.min(epoch);
    for node in dir.entries.values_mut() {
        match node {
            Node::Dir(d) => clamp_mtimes(d, epoch),
            other => {
                let m = other.meta_mut();
                m.mtime = m.mtime.min(epoch);
            }
        }
    }
}

/// Follows symlinks in `tree` like the kernel would inside the container
/// (absolute targets from the container root, at most 40 hops); returns the
/// final path and node.
pub fn lookup<'t>(tree: &'t Tree, path: &str) -> Option<(PathBuf, &'t Node)> {
    let mut pending: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .rev()
        .map(String::from)
        .collect();
    let mut at: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            at.pop();
            continue;
        }
        at.push(c);
        let here = PathBuf::from(format!("/{}", at.join("/")));
        if let Node::Symlink { target, .. } = tree.get(&here)? {
            hops += 1;
            if hops > 40 {
                return None;
            }
            at.pop();
            let target = target.to_string_lossy();
            if target.starts_with('/') {
                at.clear();
            }
            pending.extend(
                target
                    .split('/')
                    .filter(|c| !c.is_empty() && *c != ".")
                    .rev()
                    .map(String::from),
            );
        }
    }
    let final_path = PathBuf::from(format!("/{}", at.join("/")));
    let node = if at.is_empty() {
        return None;
    } else {
        tree.get(&final_path)?
    };
    Some((final_path, node))
}

/// The mode and owner a `d PATH MODE USER GROUP` line of the image's
/// tmpfiles.d gives `path`, if one does.
fn tmpfiles_dir(rootfs: &Tree, path: &str) -> Option<Meta> {
    for dir in ["/etc/tmpfiles.d", "/usr/lib/tmpfiles.d"] {
        let Some(d) = rootfs.dir(Path::new(dir)) else {
            continue;
        };
        for (name, node) in &d.entries {
            let Node::File { data, .. } = node else {
                continue;
            };
            if !name.to_string_lossy().ends_with(".conf") {
                continue;
            }
            let Ok(text) = data.bytes() else { continue };
            for line in String::from_utf8_lossy(&text).lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 5 || !matches!(f[0], "d" | "D") || f[1] != path {
                    continue;
                }
                let mode = u32::from_str_radix(f[2], 8).unwrap_or(0o755);
                let id = users::resolve(rootfs, &format!("{}:{}", f[3], f[4])).ok()?;
                return Some(Meta {
                    mode,
                    uid: id.uid,
                    gid: id.gid,
                    mtime: 0,
                    xattrs: Default::default(),
                });
            }
        }
    }
    None
}

/// How much of a command's file is read to check it.
const HEAD: usize = 64 * 1024;

/// The ELF interpreter (`PT_INTERP`) named by `data`, if it is a
/// dynamically linked ELF file.
pub fn elf_interpreter(data: &[u8]) -> Option<String> {
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[5] != 1 {
        return None;
    }
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let wide = data[4] == 2;
    let (phoff, phentsize, phnum) = if wide {
        (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?)
    } else {
        (u64::from(u32_at(0x1c)?), u16_at(0x2a)?, u16_at(0x2c)?)
    };
    for i in 0..u64::from(phnum) {
        let ph = usize::try_from(phoff + i * u64::from(phentsize)).ok()?;
        if u32_at(ph)? != 3 {
            continue;
        }
        let (off, size) = if wide {
            (u64_at(ph + 8)?, u64_at(ph + 0x20)?)
        } else {
            (u64::from(u32_at(ph + 4)?), u64::from(u32_at(ph + 0x10)?))
        };
        let start = usize::try_from(off).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        let raw = data.get(start..end)?;
        let raw = raw.split(|b| *b == 0).next()?;
        return Some(String::from_utf8_lossy(raw).into_owned());
    }
    None
}

/// Why `program` cannot run in `tree` with `path` (the container's PATH),
/// or `None` when it can.
pub fn command_problem(tree: &Tree, program: &str, path: &str) -> Option<String> {
    let candidates: Vec<String> = if program.contains('/') {
        vec![program.to_string()]
    } else {
        path.split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| format!("{}/{program}", d.trim_end_matches('/')))
            .collect()
    };
    let mut found = None;
    for c in &candidates {
        if let Some((real, node @ Node::File { meta, .. })) = lookup(tree, c) {
            if meta.mode & 0o111 != 0 {
                found = Some((c.clone(), real, node));
                break;
            }
        }
    }
    let Some((at, real, node)) = found else {
        return Some(if program.contains('/') {
            match lookup(tree, program) {
                Some((_, Node::File { .. })) => format!("{program} is not executable"),
                Some(_) => format!("{program} is not a file"),
                None => format!("{program} does not exist in the image"),
            }
        } else {
            format!("{program} is not in the image's PATH ({path})")
        });
    };
    let Node::File { data, .. } = node else {
        return None;
    };
    // The head holds the ELF headers and interpreter, or the #! line. A
    // read error skips the check: writing the root reads the file again
    // and reports it.
    let mut head = vec![0; usize::try_from(data.len()).map_or(HEAD, |l| l.min(HEAD))];
    data.read_at(0, &mut head).ok()?;
    let data = &head[..];
    if let Some(interp) = elf_interpreter(data) {
        if !matches!(lookup(tree, &interp), Some((_, Node::File { .. }))) {
            return Some(format!(
                "{at} ({}) needs the ELF interpreter {interp}, which the image lacks",
                real.display()
            ));
        }
    } else if let Some(line) = data.strip_prefix(b"#!") {
        let line = line.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        if let Some(interp) = line.split_whitespace().next() {
            if !matches!(lookup(tree, interp), Some((_, Node::File { .. }))) {
                return Some(format!(
                    "{at} is a script for {interp}, which the image lacks"
                ));
            }
        }
    }
    None
}

/// The init's view of one container; adds the mount points it needs to
/// `rootfs` (which is read-only at run time).
fn container_config(
    recipe: &Recipe,
    spec: &ContainerSpec,
    rootfs: &mut Tree,
    image: &ImageConfig,
    host: &Tree,
    userns: Option<u32>,
) -> Result<Container, HostError> {
    let name = spec.name.value.clone();
    let at_image = |message: String| recipe.error(&spec.image.loc, message);

    let (args, args_loc) = match &spec.command {
        Some(c) => (c.value.clone(), &c.loc),
        None => (
            image.entrypoint.iter().chain(&image.cmd).cloned().collect(),
            &spec.image.loc,
        ),
    };
    if args.is_empty() {
        return Err(
            at_image("no `command` given and the image has no Entrypoint or Cmd".into()).into(),
        );
    }

    let (user_spec, user_loc) = match &spec.user {
        Some(u) => (u.value.clone(), &u.loc),
        None => (image.user.clone(), &spec.image.loc),
    };
    let id = users::resolve(rootfs, &user_spec).map_err(|e| match e {
        users::UserError::Read { .. } => HostError::Users {
            container: name.to_string(),
            source: e,
        },
        e => recipe
            .error(user_loc, format!("container {name}: {e}"))
            .into(),
    })?;
    if userns.is_some() {
        let ids = [id.uid, id.gid]
            .into_iter()
            .chain(id.groups.iter().copied());
        if let Some(out) = ids.into_iter().find(|&i| i >= initcfg::USERNS_SIZE) {
            return Err(recipe
                .error(
                    user_loc,
                    format!(
                        "container {name}: id {out} is outside the {} ids its user namespace maps (userns = true)",
                        initcfg::USERNS_SIZE
                    ),
                )
                .into());
        }
    }

    // Image Env, then the recipe's over it; PATH and HOME as Docker does.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for kv in &image.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if env.insert(k.to_string(), v.to_string()).is_none() {
            order.push(k.to_string());
        }
    }
    for (k, v) in &spec.env {
        if env.insert(k.clone(), v.clone()).is_none() {
            order.push(k.clone());
        }
    }
    let mut env_list: Vec<String> = order.iter().map(|k| format!("{k}={}", env[k])).collect();
    if !env.contains_key("PATH") {
        env_list.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    if !env.contains_key("HOME") {
        env_list.push(format!(
            "HOME={}",
            id.home.clone().unwrap_or_else(|| "/".into())
        ));
    }
    let path = env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
    if let Some(problem) = command_problem(rootfs, &args[0], path) {
        return Err(recipe
            .error(args_loc, format!("container {name}: {problem}"))
            .into());
    }

    let cwd = spec
        .cwd
        .as_ref()
        .map(|c| c.value.clone())
        .or_else(|| Some(image.working_dir.clone()).filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());

    let mut binds = Vec::new();
    let mut mountpoints: Vec<(String, bool)> = CONTAINER_MOUNTPOINTS
        .iter()
        .map(|d| (d.to_string(), false))
        .collect();
    let mut spec_binds = spec.binds.clone();
    if let Some(c) = spec.control.as_ref().filter(|c| c.value) {
        if recipe.disk.update != crate::recipe::UpdateMode::Ab {
            return Err(recipe
                .error(
                    &c.loc,
                    "the control socket is an A/B disk's: control needs [disk] update = \"ab\"",
                )
                .into());
        }
        spec_binds.push(crate::recipe::At {
            value: crate::recipe::BindSpec {
                source: initcfg::CONTROL_SOCKET.into(),
                target: initcfg::CONTROL_SOCKET.into(),
                readonly: false,
            },
            loc: c.loc.clone(),
        });
    }
    for b in &spec_binds {
        let runtime = RUNTIME_PREFIXES
            .iter()
            .any(|p| b.source == *p || b.source.starts_with(&format!("{p}/")));
        let source_node = host.get(Path::new(&b.source)).or_else(|| {
            initcfg::is_runtime_file(&b.source)
                .then(|| {
                    host.get(Path::new(&format!(
                        "{}{}",
                        initcfg::RUNTIME_FILES_DIR,
                        b.source
                    )))
                })
                .flatten()
        });
        if !runtime && source_node.is_none() {
            return Err(recipe
                .error(
                    &b.loc,
                    format!(
                        "source {} is not in the host root: declare it as a [[file]], or bind from a run-time path ({})",
                        b.source,
                        RUNTIME_PREFIXES.join(", ")
                    ),
                )
                .into());
        }
        let is_file = matches!(source_node, Some(Node::File { .. }));
        mountpoints.push((b.target.clone(), is_file));
        binds.push(Bind {
            source: b.source.clone(),
            target: b.target.clone(),
            readonly: b.readonly,
        });
    }
    // On the host network: the init's view of it, kept current (what
    // Docker gives), unless the recipe binds these itself.
    // On the bridge: the same name servers (reached through masquerade),
    // and every bridge container by name.
    let hosts = match spec.net {
        initcfg::Net::Host => Some(initcfg::HOSTS_FILE),
        initcfg::Net::Bridge => Some(initcfg::BRIDGE_HOSTS_FILE),
        initcfg::Net::None => None,
    };
    if let Some(hosts) = hosts {
        for (source, target) in [
            (initcfg::RESOLV_CONF, "/etc/resolv.conf"),
            (hosts, "/etc/hosts"),
        ] {
            if binds.iter().any(|b: &Bind| b.target == target) {
                continue;
            }
            // An image's symlink (to systemd-resolved's file, say) would
            // send the bind elsewhere: a plain file takes its place.
            if !matches!(
                rootfs.get(Path::new(target)),
                Some(Node::File { .. }) | None
            ) {
                let _ = rootfs.remove(Path::new(target));
            }
            mountpoints.push((target.to_string(), true));
            binds.push(Bind {
                source: source.to_string(),
                target: target.to_string(),
                readonly: true,
            });
        }
    }
    mountpoints.push((cwd.clone(), false));

    // A tmpfs takes the mode and owner of the image's directory, else of
    // the image's tmpfiles.d entry for it (what systemd would make at
    // boot: /run/postgresql), else 0755 root; a mount point must exist.
    let mut tmpfs = Vec::new();
    for t in &spec.tmpfs {
        let path = &t.value.path;
        let meta = match rootfs.get(Path::new(path)) {
            Some(Node::Dir(d)) => d.meta.clone(),
            Some(_) => {
                return Err(recipe
                    .error(
                        &t.loc,
                        format!("container {name}: {path} in the image is not a directory"),
                    )
                    .into())
            }
            None => {
                let meta = tmpfiles_dir(rootfs, path).unwrap_or_else(|| Meta::root(0o755));
                rootfs
                    .mkdir_p(Path::new(path), &meta)
                    .map_err(|source| HostError::Tree {
                        what: format!("container {name}: tmpfs {path}"),
                        source,
                    })?;
                meta
            }
        };
        tmpfs.push(initcfg::Tmpfs {
            path: path.clone(),
            size: t.value.size,
            mode: meta.mode & 0o7777,
            uid: meta.uid,
            gid: meta.gid,
        });
    }

    // Mount points must exist in the read-only root.
    for (path, is_file) in mountpoints {
        let mount_err = |what: &str| {
            recipe.error(
                &spec.name.loc,
                format!("container {name}: {path} in the image is not a {what} (it is needed as a mount point)"),
            )
        };
        match rootfs.get(Path::new(&path)) {
            Some(Node::Dir(_)) if !is_file => {}
            Some(Node::File { .. }) if is_file => {}
            Some(_) => return Err(mount_err(if is_file { "file" } else { "directory" }).into()),
            None if is_file => {
                rootfs
                    .insert(Path::new(&path), Node::file(0o644, Vec::new()))
                    .map_err(|source| HostError::Tree {
                        what: format!("container {name}: mount point {path}"),
                        source,
                    })?;
            }
            None => {
                rootfs
                    .mkdir_p(Path::new(&path), &Meta::root(0o755))
                    .map_err(|source| HostError::Tree {
                        what: format!("container {name}: mount point {path}"),
                        source,
                    })?;
            }
        }
    }

    Ok(Container {
        volumes: spec.volumes.clone(),
        rootfs: format!("{}/{name}/rootfs", initcfg::CONTAINERS_DIR),
        name,
        args,
        env: env_list,
        cwd,
        uid: id.uid,
        gid: id.gid,
        groups: id.groups,
        net: spec.net,
        address: spec.address.map(|a| (a, recipe.network.bridge_subnet.1)),
        ports: spec.ports.clone(),
        binds,
        tmpfs,
        capabilities: spec.capabilities.clone(),
        restart: spec.restart,
        max_restarts: spec.max_restarts,
        essential: spec.essential,
        stop_signal: spec.stop_signal.clone(),
        stop_timeout_ms: spec.stop_timeout_ms,
        depends_on: spec.depends_on.clone(),
        ready: spec.ready.clone(),
        init: spec.init,
        resources: spec.resources.clone(),
        seccomp: spec.seccomp,
        sysctl: spec.sysctl.clone(),
        rlimits: spec.rlimits.clone(),
        userns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Tree {
        let mut t = Tree::new();
        t.insert(Path::new("/usr/bin/busybox"), Node::file(0o755, "static"))
            .unwrap();
        t.insert(Path::new("/usr/bin/sh"), Node::symlink("busybox"))
            .unwrap();
        t.insert(Path::new("/bin"), Node::symlink("usr/bin"))
            .unwrap();
        t.insert(Path::new("/usr/bin/data"), Node::file(0o644, "x"))
            .unwrap();
        t.insert(Path::new("/usr/bin/loop"), Node::symlink("loop"))
            .unwrap();
        t.insert(
            Path::new("/usr/bin/script"),
            Node::file(0o755, "#!/usr/bin/python3\nprint(1)\n"),
        )
        .unwrap();
        t.insert(
            Path::new("/usr/bin/dyn"),
            Node::file(0o755, fake_elf("/lib64/ld.so")),
        )
        .unwrap();
        t
    }

    /// A minimal 64-bit ELF header with one PT_INTERP program header.
    fn fake_elf(interp: &str) -> Vec<u8> {
        let mut d = vec![0u8; 0x40 + 0x38];
        d[..4].copy_from_slice(b"\x7fELF");
        d[4] = 2;
        d[5] = 1;
        d[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        d[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        d[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let off = d.len() as u64;
        d[0x40..0x44].copy_from_slice(&3u32.to_le_bytes());
        d[0x48..0x50].copy_from_slice(&off.to_le_bytes());
        d[0x60..0x68].copy_from_slice(&(interp.len() as u64 + 1).to_le_bytes());
        d.extend_from_slice(interp.as_bytes());
        d.push(0);
        d
    }

    /// `[update] source` adds the update service: its program, its
    /// configuration and CA roots (Mozilla's and the recipe's), on the
    /// host network with its volume and the control socket, and no
    /// capability.
    #[test]
    fn online_updates_add_the_update_service() {
        let dir = tempfile::tempdir().unwrap();
        let sh = |cmd: &str| {
            let o = std::process::Command::new("sh")
                .args(["-c", cmd])
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(o.status.success(), "{cmd}: {o:?}");
        };
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        sh(&format!(
            "openssl req -x509 {ec} -subj /CN=corp-ca -keyout ca.key -out corp-ca.pem -days 2"
        ));
        sh(&format!(
            "openssl req {ec} -subj /CN=updates.example -keyout leaf.key -out leaf.csr"
        ));
        sh("openssl x509 -req -in leaf.csr -CA corp-ca.pem -CAkey ca.key -out leaf.pem -days 1");
        std::fs::write(
            dir.path().join("update.pub"),
            "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAyTmmSnVfwd6DaR0nNytys/WygMatCOjSK9uL+Fj2oOk=\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        let recipe = crate::recipe::parse(
            &dir.path().join("x.toml"),
            "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"k\"\n[[service]]\nname = \"web\"\nimage = { debian = [\"busybox-static\"] }\ncommand = [\"/bin/sh\"]\n\
             [update]\nsource = \"https://updates.example/x\"\nroot_keys = [\"update.pub\"]\nca = [\"corp-ca.pem\"]\nwindow = \"01:00-02:30\"\n",
        )
        .unwrap();
        let images = vec![crate::fetch::ContainerImage {
            tree: image(),
            config: Default::default(),
        }];
        let host = assemble(&recipe, images, b"\x7fELF updater", 7).unwrap();
        let c = &host.config.services[1];
        assert_eq!(c.name, "kiln-update");
        assert_eq!(c.args, ["/usr/bin/kiln-update"]);
        assert_eq!(c.net, initcfg::Net::Host);
        assert_eq!(c.restart, initcfg::Restart::Always);
        assert!(!c.essential && c.seccomp && c.userns.is_none());
        assert_eq!(
            c.volumes,
            [(
                "kiln-update".to_string(),
                "/var/lib/kiln-update".to_string()
            )]
        );
        assert!(c.binds.iter().any(|b| b.source == initcfg::CONTROL_SOCKET));
        assert!(c
            .binds
            .iter()
            .any(|b| b.source == "/var/lib/kiln/volumes/kiln-update"
                && b.target == "/var/lib/kiln-update"
                && !b.readonly));
        assert!(c.capabilities.is_empty());
        let file = |p: &str| match host.tree.get(&Path::new(&c.rootfs).join(&p[1..])) {
            Some(Node::File { data, .. }) => {
                let mut buf = vec![0; usize::try_from(data.len()).unwrap()];
                data.read_at(0, &mut buf).unwrap();
                buf
            }
            other => panic!("{p}: {other:?}"),
        };
        assert_eq!(file("/usr/bin/kiln-update"), b"\x7fELF updater");
        let cfg: kiln_update::service::Config =
            serde_json::from_slice(&file("/etc/kiln-update.json")).unwrap();
        assert_eq!(cfg.source, "https://updates.example/x");
        assert_eq!((cfg.check_secs, cfg.root_keys.len()), (6 * 3600, 1));
        assert_eq!(cfg.window.map(|w| (w.start, w.end)), Some((60, 150)));
        // The bundle is one openssl reads: every root a certificate, the
        // recipe's CA among them.
        let pem = dir.path().join("bundle.pem");
        std::fs::write(&pem, file("/etc/ssl/certs/ca-certificates.crt")).unwrap();
        let out = std::process::Command::new("openssl")
            .args(["storeutl", "-noout", "-certs"])
            .arg(&pem)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        let n = webpki_root_certs::TLS_SERVER_ROOT_CERTS.len();
        assert!(n > 100 && out.status.success(), "{said}");
        assert!(said.contains(&format!("Total found: {}", n + 1)), "{said}");
        sh("openssl verify -CAfile bundle.pem leaf.pem");
    }

    /// A tmpfs is owned as the image's directory, or 0755 root where the
    /// image has none (the mount point is made); a file there is an error
    /// on the tmpfs entry.
    #[test]
    fn tmpfs_takes_the_image_directory_owner_and_mode() {
        let text = |tmpfs: &str| {
            format!("name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"k\"\n[[service]]\nname = \"web\"\nimage = {{ debian = [\"busybox-static\"] }}\ncommand = [\"/bin/sh\"]\ntmpfs = {tmpfs}\n")
        };
        let recipe = crate::recipe::parse(
            Path::new("/r/x.toml"),
            &text("[\"/var/lib/web:size=1M\", \"/cache\"]"),
        )
        .unwrap();
        let mut t = image();
        let meta = Meta {
            mode: 0o750,
            uid: 33,
            gid: 34,
            mtime: 0,
            xattrs: Default::default(),
        };
        t.insert(
            Path::new("/var/lib/web"),
            Node::Dir(kiln_formats::tree::Dir::new(meta)),
        )
        .unwrap();
        let images = || {
            vec![crate::fetch::ContainerImage {
                tree: t.clone(),
                config: Default::default(),
            }]
        };
        let host = assemble(&recipe, images(), b"", 0).unwrap();
        let tmpfs = |path: &str, size, mode, uid, gid| initcfg::Tmpfs {
            path: path.into(),
            size,
            mode,
            uid,
            gid,
        };
        assert_eq!(
            host.config.services[0].tmpfs,
            vec![
                tmpfs("/var/lib/web", 1 << 20, 0o750, 33, 34),
                tmpfs("/cache", 64 << 20, 0o755, 0, 0),
            ]
        );
        assert!(matches!(
            host.tree.get(Path::new("/containers/web/rootfs/cache")),
            Some(Node::Dir(_))
        ));
        let recipe =
            crate::recipe::parse(Path::new("/r/x.toml"), &text("[\"/usr/bin/data\"]")).unwrap();
        let Err(HostError::Recipe(e)) = assemble(&recipe, images(), b"", 0) else {
            panic!("a file as a tmpfs must be refused")
        };
        assert_eq!(e.loc.field, "service[0].tmpfs[0]", "{e}");
    }

    /// Each userns container gets the next range; ids it cannot map are
    /// refused on the user field.
    #[test]
    fn userns_ranges_follow_each_other() {
        let svc = |name: &str, extra: &str| {
            format!("[[service]]\nname = \"{name}\"\nimage = {{ debian = [\"busybox-static\"] }}\ncommand = [\"/bin/sh\"]\n{extra}")
        };
        let head = "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"k\"\n";
        let text = format!(
            "{head}{}{}{}",
            svc("a", "userns = true\n"),
            svc("b", ""),
            svc("c", "userns = true\n")
        );
        let recipe = crate::recipe::parse(Path::new("/r/x.toml"), &text).unwrap();
        let images = |n| {
            (0..n)
                .map(|_| crate::fetch::ContainerImage {
                    tree: image(),
                    config: Default::default(),
                })
                .collect()
        };
        let host = assemble(&recipe, images(3), b"", 0).unwrap();
        let ranges: Vec<Option<u32>> = host.config.services.iter().map(|c| c.userns).collect();
        assert_eq!(ranges, [Some(100_000), None, Some(165_536)]);
        let text = format!("{head}{}", svc("d", "userns = true\nuser = \"70000\"\n"));
        let recipe = crate::recipe::parse(Path::new("/r/x.toml"), &text).unwrap();
        let Err(HostError::Recipe(e)) = assemble(&recipe, images(1), b"", 0) else {
            panic!("an id beyond the range must be refused")
        };
        assert_eq!(e.loc.field, "service[0].user", "{e}");
        assert!(e.to_string().contains("id 70000 is outside"), "{e}");
    }

    #[test]
    fn lookup_follows_symlinks() {
        let t = image();
        let (p, _) = lookup(&t, "/bin/sh").unwrap();
        assert_eq!(p, Path::new("/usr/bin/busybox"));
        assert!(lookup(&t, "/usr/bin/loop").is_none());
        assert!(lookup(&t, "/nope").is_none());
        assert_eq!(
            lookup(&t, "/usr/../bin/./sh").unwrap().0,
            Path::new("/usr/bin/busybox")
        );
    }

    #[test]
    fn elf_interpreter_is_read() {
        assert_eq!(
            elf_interpreter(&fake_elf("/lib64/ld-linux-x86-64.so.2")).as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert_eq!(elf_interpreter(b"#!/bin/sh\n"), None);
    }

    #[test]
    fn commands_are_checked() {
        let t = image();
        assert_eq!(command_problem(&t, "sh", DEFAULT_PATH), None);
        assert_eq!(command_problem(&t, "/bin/sh", DEFAULT_PATH), None);
        let p = command_problem(&t, "nginx", DEFAULT_PATH).unwrap();
        assert!(p.contains("not in the image's PATH"), "{p}");
        let p = command_problem(&t, "/usr/bin/data", DEFAULT_PATH).unwrap();
        assert!(p.contains("not executable"), "{p}");
        let p = command_problem(&t, "/usr/sbin/x", DEFAULT_PATH).unwrap();
        assert!(p.contains("does not exist"), "{p}");
        let p = command_problem(&t, "script", DEFAULT_PATH).unwrap();
        assert!(p.contains("/usr/bin/python3"), "{p}");
        let p = command_problem(&t, "dyn", DEFAULT_PATH).unwrap();
        assert!(p.contains("ELF interpreter /lib64/ld.so"), "{p}");
        let mut t = t;
        t.insert(Path::new("/usr/lib64/ld.so"), Node::file(0o755, "ld"))
            .unwrap();
        t.insert(Path::new("/lib64"), Node::symlink("usr/lib64"))
            .unwrap();
        assert_eq!(command_problem(&t, "dyn", DEFAULT_PATH), None);
        assert!(command_problem(&t, "sh", "/opt/bin").is_some());
    }
}
