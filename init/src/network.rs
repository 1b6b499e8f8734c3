//! The host's network: every Ethernet interface brought up and configured
//! by DHCP (renewed for as long as the host runs) or as the recipe says,
//! /etc/resolv.conf and /etc/hosts for containers on the host network,
//! and "network up" for the supervisor to start them by.
//!
//! Driven by the supervisor's poll loop: [`Network::fds`] and
//! [`Network::deadline`] say what to wait for, [`Network::handle`] acts.

use crate::console::log;
use crate::dhcp::{self, Action, Lease};
use crate::metadata;
use crate::netlink::{self, Cidr, Link};
use crate::sys::{self, check, owned, RealSys, Sys};
use kiln_init::config::{self as cfg, HOSTS_FILE, NET_DIR, RESOLV_CONF};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

const DHCP_CLIENT_PORT: u16 = 68;
const DHCP_SERVER_PORT: u16 = 67;
/// rtnetlink's multicast group for link changes (a NIC appearing).
const RTMGRP_LINK: u32 = 1;

/// How an interface gets its address.
enum How {
    Dhcp {
        client: dhcp::Client,
        sock: OwnedFd,
    },
    /// Configured once (or only brought up).
    Fixed,
}

struct Iface {
    link: Link,
    how: How,
    /// Configured (a lease taken, or the static settings applied).
    ready: bool,
    lease: Option<Lease>,
}

/// Where the metadata lookup is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Meta {
    /// Waiting for the network.
    Pending,
    /// A child process asks the providers.
    Asking(libc::pid_t),
    Done,
}

pub struct Network {
    meta: Meta,
    cmdline: String,
    /// The hostname came from metadata: DHCP's does not replace it.
    named_by_metadata: bool,
    nl: netlink::Socket,
    monitor: Option<OwnedFd>,
    cfg: cfg::Network,
    ifaces: Vec<Iface>,
    hostname: String,
    pinned: bool,
    started: Instant,
    said_up: bool,
}

/// A UDP socket on port 68 of interface `name` that can broadcast before
/// the interface has an address.
fn dhcp_socket(name: &str) -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation.
    let fd = owned(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    let one: libc::c_int = 1;
    for opt in [libc::SO_REUSEADDR, libc::SO_BROADCAST] {
        // SAFETY: an int option of the right size.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const one).cast(),
                socklen::<libc::c_int>(),
            )
        })?;
    }
    // SAFETY: the name's bytes and length.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            libc::socklen_t::try_from(name.len()).unwrap_or(0),
        )
    })?;
    let addr = sockaddr(Ipv4Addr::UNSPECIFIED, DHCP_CLIENT_PORT);
    // SAFETY: a valid sockaddr_in of the size given.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            socklen::<libc::sockaddr_in>(),
        )
    })?;
    Ok(fd)
}

/// The size of a socket option or address, as the calls take it.
fn socklen<T>() -> libc::socklen_t {
    // Small structs: always fits.
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(0)
}

fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        // AF_INET (2) fits.
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(0),
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// A netlink socket that hears of links coming and going.
fn link_monitor() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation.
    let fd = owned(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    })?;
    // SAFETY: a zeroed sockaddr_nl is valid; the fields are set below.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::sa_family_t::try_from(libc::AF_NETLINK).unwrap_or(0);
    addr.nl_groups = RTMGRP_LINK;
    // SAFETY: a valid sockaddr_nl of the size given.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            socklen::<libc::sockaddr_nl>(),
        )
    })?;
    Ok(fd)
}

/// A transaction id nobody else on the link guesses.
fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: the buffer and its length; GRND_NONBLOCK never blocks boot.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    u32::from_ne_bytes(b)
}

/// Rewrites `path` in place: containers bind the file, and a new inode
/// (a rename) would not reach them.
fn rewrite(path: &str, text: &str) {
    use std::io::Write;
    let r = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = r {
        log(&format!("net: cannot write {path}: {e}"));
    }
}

/// resolv.conf for these name servers and search domain.
pub fn resolv_conf(dns: &[Ipv4Addr], domain: Option<&str>) -> String {
    let mut out = String::new();
    // The resolver reads three at most.
    for d in dns.iter().take(3) {
        out.push_str(&format!("nameserver {d}\n"));
    }
    if let Some(d) = domain {
        out.push_str(&format!("search {d}\n"));
    }
    out
}

/// /etc/hosts: localhost, and the host's name at its first address.
pub fn hosts(hostname: &str, addr: Option<Ipv4Addr>) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    out.push_str(&format!(
        "{}\t{hostname}\n",
        addr.map_or("127.0.1.1".to_string(), |a| a.to_string())
    ));
    out
}

impl Network {
    /// Sets IPv6 up or off, writes the files containers bind and brings
    /// up the interfaces present (more are taken as they appear).
    pub fn start(
        config: &cfg::Network,
        hostname: &str,
        pinned: bool,
        now: Instant,
    ) -> io::Result<Network> {
        // Containers bind these: they must exist whatever happens next.
        let _ = std::fs::create_dir_all(NET_DIR);
        let dns: Vec<Ipv4Addr> = config
            .interfaces
            .iter()
            .flat_map(|i| i.dns.clone())
            .collect();
        rewrite(RESOLV_CONF, &resolv_conf(&dns, None));
        let addr = config
            .interfaces
            .iter()
            .find_map(|i| i.address.map(|(a, _)| a));
        rewrite(HOSTS_FILE, &hosts(hostname, addr));
        if !config.ipv6 {
            for scope in ["default", "all"] {
                let knob = format!("/proc/sys/net/ipv6/conf/{scope}/disable_ipv6");
                let _ = std::fs::write(knob, "1");
            }
        }
        // Read-only once the metadata is in; a tmpfs so it can be made so.
        let _ = std::fs::create_dir_all(metadata::CONFIG_DIR);
        if let Err(e) = sys::mount(
            Some("tmpfs"),
            metadata::CONFIG_DIR,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some("mode=755,size=4m"),
        ) {
            log(&format!("net: cannot mount {}: {e}", metadata::CONFIG_DIR));
        }
        let mut net = Network {
            meta: Meta::Pending,
            cmdline: std::fs::read_to_string("/proc/cmdline").unwrap_or_default(),
            named_by_metadata: false,
            nl: netlink::Socket::open()?,
            monitor: link_monitor()
                .map_err(|e| log(&format!("net: no link notifications: {e}")))
                .ok(),
            cfg: config.clone(),
            ifaces: Vec::new(),
            hostname: hostname.to_string(),
            pinned,
            started: now,
            said_up: false,
        };
        net.scan(now);
        // With no NIC (or only static ones) nothing else would start it.
        if net.links_up() {
            net.ask_metadata();
        }
        Ok(net)
    }

    /// Takes links not seen before.
    fn scan(&mut self, now: Instant) {
        let links = match self.nl.links() {
            Ok(l) => l,
            Err(e) => {
                log(&format!("net: cannot list links: {e}"));
                return;
            }
        };
        for link in links {
            if !link.ethernet || self.ifaces.iter().any(|i| i.link.index == link.index) {
                continue;
            }
            let iface = self.take(link, now);
            self.ifaces.push(iface);
        }
        self.write_files();
    }

    /// Brings `link` up and configures it as the recipe says.
    fn take(&mut self, link: Link, now: Instant) -> Iface {
        let conf = self.cfg.interfaces.iter().find(|i| i.name == link.name);
        let mtu = conf.and_then(|c| c.mtu);
        if !self.cfg.ipv6 {
            let knob = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", link.name);
            let _ = std::fs::write(knob, "1");
        }
        if let Err(e) = self.nl.set_up(link.index, mtu) {
            log(&format!("net: {}: cannot bring up: {e}", link.name));
        }
        let mac = link
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        match conf {
            Some(c) if !c.dhcp => {
                let c = c.clone();
                self.configure_static(&link, &c);
                Iface {
                    link,
                    how: How::Fixed,
                    ready: true,
                    lease: None,
                }
            }
            _ => {
                let mut hw = [0u8; 6];
                let n = link.mac.len().min(6);
                hw[..n].copy_from_slice(&link.mac[..n]);
                match dhcp_socket(&link.name) {
                    Ok(sock) => {
                        log(&format!("net: {} ({mac}) up, asking DHCP", link.name));
                        Iface {
                            how: How::Dhcp {
                                client: dhcp::Client::new(hw, random_u32(), now),
                                sock,
                            },
                            link,
                            ready: false,
                            lease: None,
                        }
                    }
                    Err(e) => {
                        // Given up on: it must not hold the network back.
                        log(&format!("net: {}: no DHCP socket: {e}", link.name));
                        Iface {
                            link,
                            how: How::Fixed,
                            ready: true,
                            lease: None,
                        }
                    }
                }
            }
        }
    }

    fn configure_static(&mut self, link: &Link, c: &cfg::Interface) {
        let Some((addr, prefix)) = c.address else {
            log(&format!("net: {} up (no address)", link.name));
            return;
        };
        let cidr = Cidr { addr, prefix };
        let mut problems = Vec::new();
        if let Err(e) = self.nl.add_address(link.index, cidr, None) {
            problems.push(format!("address {cidr}: {e}"));
        }
        if let Some(g) = c.gateway {
            if let Err(e) = self
                .nl
                .add_default_route(link.index, cidr, g, netlink::RTPROT_STATIC)
            {
                problems.push(format!("route via {g}: {e}"));
            }
        }
        log(&format!(
            "net: {} {cidr}{} (static){}",
            link.name,
            c.gateway.map_or(String::new(), |g| format!(" via {g}")),
            if problems.is_empty() {
                String::new()
            } else {
                format!("; failed: {}", problems.join(", "))
            }
        ));
    }

    /// Whether every interface is configured (with none, at once) and
    /// the metadata providers have answered or failed.
    pub fn up(&self) -> bool {
        self.links_up() && self.meta == Meta::Done
    }

    fn links_up(&self) -> bool {
        self.ifaces.iter().all(|i| i.ready)
    }

    /// Asks the metadata providers in a child process (a hostile server
    /// or config drive can only end that): over the network once an
    /// interface has an address, else only a config drive and the
    /// command line.
    fn ask_metadata(&mut self) {
        let has_address = self.ifaces.iter().any(|i| i.lease.is_some())
            || self.cfg.interfaces.iter().any(|i| i.address.is_some());
        // SAFETY: the init is single-threaded, so the child may run Rust code.
        match unsafe { libc::fork() } {
            0 => {
                let found = if has_address {
                    metadata::discover(&self.cmdline, &log)
                } else {
                    metadata::discover_offline(&self.cmdline, &log)
                };
                let code = match metadata::write(metadata::CONFIG_DIR, found.as_ref(), &log) {
                    Ok(()) => 0,
                    Err(e) => {
                        log(&format!("metadata: writing {}: {e}", metadata::CONFIG_DIR));
                        1
                    }
                };
                // SAFETY: leaving the child without the parent's cleanup.
                unsafe { libc::_exit(code) }
            }
            pid if pid < 0 => {
                log("metadata: cannot fork");
                if let Err(e) = metadata::write(metadata::CONFIG_DIR, None, &log) {
                    log(&format!("metadata: writing {}: {e}", metadata::CONFIG_DIR));
                }
                self.meta = Meta::Done;
                self.take_metadata();
            }
            pid => self.meta = Meta::Asking(pid),
        }
    }

    /// Whether `pid` was the metadata child; then takes its results.
    pub fn reaped(&mut self, pid: libc::pid_t) -> bool {
        if self.meta != Meta::Asking(pid) {
            return false;
        }
        self.meta = Meta::Done;
        self.take_metadata();
        true
    }

    /// Makes /run/config read-only, names the host as the metadata says.
    fn take_metadata(&mut self) {
        let dir = metadata::CONFIG_DIR;
        let flags =
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if let Err(e) = sys::mount(None, dir, None, flags, None) {
            log(&format!("metadata: cannot make {dir} read-only: {e}"));
        }
        let provider = std::fs::read_to_string(format!("{dir}/provider")).unwrap_or_default();
        log(&format!("metadata: provider {}", provider.trim()));
        let name = std::fs::read_to_string(format!("{dir}/hostname")).unwrap_or_default();
        let name = name.trim();
        let rename = !name.is_empty() && !self.pinned && name != self.hostname;
        if rename && RealSys.sethostname(name).is_ok() {
            log(&format!("hostname {name} (from metadata)"));
            self.hostname = name.to_string();
            self.named_by_metadata = true;
            self.write_files();
        }
    }

    /// Descriptors to poll: link notifications and DHCP sockets.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut out: Vec<RawFd> = self.monitor.iter().map(AsRawFd::as_raw_fd).collect();
        for i in &self.ifaces {
            if let How::Dhcp { sock, .. } = &i.how {
                out.push(sock.as_raw_fd());
            }
        }
        out
    }

    /// When a DHCP timer is due.
    pub fn deadline(&self) -> Option<Instant> {
        self.ifaces
            .iter()
            .filter_map(|i| match &i.how {
                How::Dhcp { client, .. } => Some(client.deadline()),
                How::Fixed => None,
            })
            .min()
    }

    /// Reads what `ready` descriptors hold and runs due timers.
    pub fn handle(&mut self, ready: &[RawFd], now: Instant) {
        if let Some(m) = &self.monitor {
            if ready.contains(&m.as_raw_fd()) {
                let mut buf = [0u8; 8192];
                while sys::read(m.as_fd(), &mut buf).is_ok_and(|n| n > 0) {}
                self.scan(now);
            }
        }
        for k in 0..self.ifaces.len() {
            let mut actions = Vec::new();
            if let How::Dhcp { client, sock } = &mut self.ifaces[k].how {
                if ready.contains(&sock.as_raw_fd()) {
                    let mut buf = [0u8; 1500];
                    while let Ok(n) = sys::read(sock.as_fd(), &mut buf) {
                        actions.extend(client.receive(&buf[..n], now));
                    }
                }
                actions.extend(client.tick(now));
            }
            for a in actions {
                self.apply(k, a);
            }
        }
        if self.meta == Meta::Pending && self.links_up() {
            self.ask_metadata();
        }
        if !self.said_up && self.up() {
            self.said_up = true;
            let ms = now.duration_since(self.started).as_millis();
            log(&format!("network up in {ms}ms"));
        }
    }

    fn apply(&mut self, k: usize, action: Action) {
        let name = self.ifaces[k].link.name.clone();
        let index = self.ifaces[k].link.index;
        match action {
            Action::Send { to, packet } => {
                let How::Dhcp { sock, .. } = &self.ifaces[k].how else {
                    return;
                };
                let addr = sockaddr(to, DHCP_SERVER_PORT);
                // SAFETY: the packet's bytes and a valid sockaddr_in.
                let r = unsafe {
                    libc::sendto(
                        sock.as_raw_fd(),
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        (&raw const addr).cast(),
                        socklen::<libc::sockaddr_in>(),
                    )
                };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    log(&format!("net: {name}: DHCP to {to}: {e}"));
                }
            }
            Action::Configure(lease) => {
                let mut problems = Vec::new();
                let conf_mtu = self
                    .cfg
                    .interfaces
                    .iter()
                    .find(|i| i.name == name)
                    .and_then(|i| i.mtu);
                if let Some(mtu) = conf_mtu.or(lease.mtu) {
                    if let Err(e) = self.nl.set_up(index, Some(mtu)) {
                        problems.push(format!("mtu {mtu}: {e}"));
                    }
                }
                // The kernel drops the address itself if renewals fail.
                let life = (lease.lease != u32::MAX).then_some(lease.lease);
                if let Err(e) = self.nl.add_address(index, lease.address, life) {
                    problems.push(format!("address: {e}"));
                }
                if let Some(r) = lease.router {
                    if let Err(e) =
                        self.nl
                            .add_default_route(index, lease.address, r, netlink::RTPROT_DHCP)
                    {
                        problems.push(format!("route via {r}: {e}"));
                    }
                }
                let renewed = self.ifaces[k].lease.as_ref() == Some(&lease);
                if !renewed {
                    log(&format!(
                        "net: {name} {} from DHCP server {} (router {}, dns {}, lease {}s){}",
                        lease.address,
                        lease.server,
                        lease.router.map_or("none".into(), |r| r.to_string()),
                        if lease.dns.is_empty() {
                            "none".to_string()
                        } else {
                            lease
                                .dns
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(" ")
                        },
                        lease.lease,
                        if problems.is_empty() {
                            String::new()
                        } else {
                            format!("; failed: {}", problems.join(", "))
                        }
                    ));
                }
                let dhcp_names = !self.pinned && !self.named_by_metadata;
                if let Some(h) = lease.hostname.as_ref().filter(|_| dhcp_names) {
                    if *h != self.hostname && RealSys.sethostname(h).is_ok() {
                        log(&format!("hostname {h} (from DHCP)"));
                        self.hostname = h.clone();
                    }
                }
                self.ifaces[k].lease = Some(lease);
                self.ifaces[k].ready = true;
                self.write_files();
            }
            Action::Deconfigure(cidr) => {
                if let Err(e) = self.nl.del_address(index, cidr) {
                    if e.raw_os_error() != Some(libc::EADDRNOTAVAIL) {
                        log(&format!("net: {name}: removing {cidr}: {e}"));
                    }
                }
                log(&format!("net: {name} lost {cidr}"));
                self.ifaces[k].lease = None;
                self.write_files();
            }
        }
    }

    /// resolv.conf and hosts from the static settings and the leases.
    fn write_files(&self) {
        let mut dns: Vec<Ipv4Addr> = Vec::new();
        let statics = self.cfg.interfaces.iter().flat_map(|i| i.dns.iter());
        let leased = self
            .ifaces
            .iter()
            .filter_map(|i| i.lease.as_ref())
            .flat_map(|l| l.dns.iter());
        for d in statics.chain(leased) {
            if !dns.contains(d) {
                dns.push(*d);
            }
        }
        let domain = self
            .ifaces
            .iter()
            .filter_map(|i| i.lease.as_ref()?.domain.as_deref())
            .next();
        rewrite(RESOLV_CONF, &resolv_conf(&dns, domain));
        let addr = self
            .ifaces
            .iter()
            .find_map(|i| i.lease.as_ref().map(|l| l.address.addr))
            .or_else(|| {
                self.cfg
                    .interfaces
                    .iter()
                    .find_map(|i| i.address.map(|(a, _)| a))
            });
        rewrite(HOSTS_FILE, &hosts(&self.hostname, addr));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_for_containers() {
        let dns = [Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(1, 1, 1, 1)];
        assert_eq!(
            resolv_conf(&dns, Some("example.internal")),
            "nameserver 10.0.2.3\nnameserver 1.1.1.1\nsearch example.internal\n"
        );
        let many: Vec<Ipv4Addr> = (1..=5).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        assert_eq!(resolv_conf(&many, None).lines().count(), 3);
        assert_eq!(resolv_conf(&[], None), "");
        let h = hosts("web", Some(Ipv4Addr::new(10, 0, 2, 15)));
        assert!(h.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(h.ends_with("10.0.2.15\tweb\n"));
        assert!(hosts("web", None).ends_with("127.0.1.1\tweb\n"));
    }
}
