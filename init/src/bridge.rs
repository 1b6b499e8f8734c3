//! Containers with `net = "bridge"`: the `kiln0` bridge with the host's
//! address on the bridge subnet, a veth pair per container (its end
//! named `eth0` in the container's network namespace), masquerade and
//! published ports ([`crate::nftables`]), and an /etc/hosts naming every
//! container on the bridge.

use crate::netlink::{self, Cidr};
use crate::nftables;
use kiln_init::config::{Container, HostConfig, Net, Port, BRIDGE, BRIDGE_HOSTS_FILE};
use std::io;
use std::net::Ipv4Addr;

/// The bridge as the recipe's containers need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The host's address on the bridge: the subnet's first.
    pub host: Cidr,
    /// Every container on the bridge by name, in recipe order.
    pub members: Vec<(String, Ipv4Addr)>,
    /// Published ports and the container address each goes to.
    pub forwards: Vec<(Port, Ipv4Addr)>,
}

impl Plan {
    /// The bridge `cfg` needs, if any container is on it.
    pub fn of(cfg: &HostConfig) -> Option<Plan> {
        let all = cfg
            .onboot
            .iter()
            .chain(&cfg.services)
            .chain(&cfg.onshutdown);
        let on_bridge: Vec<&Container> = all.filter(|c| c.net == Net::Bridge).collect();
        if on_bridge.is_empty() {
            return None;
        }
        let (subnet, prefix) = cfg.network.bridge_subnet;
        let mut plan = Plan {
            host: Cidr {
                addr: Ipv4Addr::from(u32::from(subnet) + 1),
                prefix,
            },
            members: Vec::new(),
            forwards: Vec::new(),
        };
        for c in on_bridge {
            let Some((addr, _)) = c.address else { continue };
            plan.members.push((c.name.clone(), addr));
            plan.forwards.extend(c.ports.iter().map(|p| (*p, addr)));
        }
        Some(plan)
    }

    /// /etc/hosts for containers on the bridge.
    pub fn hosts(&self) -> String {
        let mut out =
            String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        for (name, addr) in &self.members {
            out.push_str(&format!("{addr}\t{name}\n"));
        }
        out
    }

    /// Creates the bridge with the host's address, lets the host route
    /// for it and installs the NAT rules. The bridge modules must be
    /// loaded.
    pub fn set_up(&self) -> io::Result<()> {
        // Containers bind it: it exists whatever happens next.
        std::fs::create_dir_all(kiln_init::config::NET_DIR)?;
        std::fs::write(BRIDGE_HOSTS_FILE, self.hosts())?;
        let mut nl = netlink::Socket::open()?;
        nl.new_bridge(BRIDGE)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {BRIDGE}: {e}")))?;
        let link = nl.link(BRIDGE)?;
        nl.add_address(link.index, self.host, None)?;
        nl.set_up(link.index, None)?;
        // Forwarding between the bridge and the uplinks; a published
        // port reached at 127.0.0.1 leaves through the bridge.
        for (knob, value) in [
            ("net/ipv4/ip_forward".to_string(), "1"),
            (format!("net/ipv4/conf/{BRIDGE}/route_localnet"), "1"),
        ] {
            std::fs::write(format!("/proc/sys/{knob}"), value)
                .map_err(|e| io::Error::new(e.kind(), format!("setting {knob}: {e}")))?;
        }
        let subnet = Cidr {
            addr: self.host.network(),
            prefix: self.host.prefix,
        };
        nftables::apply(BRIDGE, subnet, &self.forwards)
            .map_err(|e| io::Error::new(e.kind(), format!("nftables rules: {e}")))
    }
}

/// The host's end of a container's veth pair: `kv` and the container's
/// offset in the subnet, unique and at most 15 bytes.
pub fn veth_name(address: (Ipv4Addr, u8)) -> String {
    let (addr, prefix) = address;
    let host_bits = if prefix >= 32 { 0 } else { u32::MAX >> prefix };
    format!("kv{}", u32::from(addr) & host_bits)
}

/// Plugs the new network namespace of process `pid` into the bridge:
/// the host's end of the pair joins it, the other becomes `eth0` there.
/// Run by the init before the container goes on.
pub fn attach(address: (Ipv4Addr, u8), pid: libc::pid_t) -> io::Result<()> {
    let mut nl = netlink::Socket::open()?;
    let bridge = nl.link(BRIDGE)?;
    let pid = u32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    nl.new_veth(&veth_name(address), bridge.index, "eth0", pid)
}

/// Inside the container's namespace: loopback and `eth0` up, its address,
/// the default route through the host's end of the bridge.
pub fn configure_inside(address: (Ipv4Addr, u8)) -> io::Result<()> {
    let (addr, prefix) = address;
    let mut nl = netlink::Socket::open()?;
    for link in nl.links()? {
        if link.name == "lo" {
            nl.set_up(link.index, None)?;
        }
    }
    let eth0 = nl.link("eth0")?;
    let cidr = Cidr { addr, prefix };
    nl.add_address(eth0.index, cidr, None)?;
    nl.set_up(eth0.index, None)?;
    let gateway = Ipv4Addr::from(u32::from(cidr.network()) + 1);
    nl.add_default_route(eth0.index, cidr, gateway, netlink::RTPROT_STATIC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_init::config::{Network, Protocol, WhenDone};

    #[test]
    fn plan_names_and_forwards() {
        let mut web = crate::container::tests::container();
        web.name = "web".into();
        web.net = Net::Bridge;
        web.address = Some((Ipv4Addr::new(172, 31, 0, 2), 24));
        web.ports = vec![Port {
            host_ip: None,
            host_port: 8080,
            port: 80,
            protocol: Protocol::Tcp,
        }];
        let mut db = web.clone();
        db.name = "db".into();
        db.address = Some((Ipv4Addr::new(172, 31, 0, 3), 24));
        db.ports.clear();
        let host = crate::container::tests::container();
        let mut cfg = HostConfig {
            hostname: "h".into(),
            when_done: WhenDone::Stay,
            healthy_after_ms: 0,
            healthy_within_ms: 0,
            files: vec![],
            onboot: vec![],
            services: vec![host.clone()],
            onshutdown: vec![],
            network: Network::default(),
            hostname_pinned: false,
        };
        assert_eq!(Plan::of(&cfg), None);
        cfg.services = vec![web, host, db];
        let plan = Plan::of(&cfg).unwrap();
        assert_eq!(plan.host.to_string(), "172.31.0.1/24");
        assert_eq!(
            plan.hosts(),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n172.31.0.2\tweb\n172.31.0.3\tdb\n"
        );
        assert_eq!(plan.forwards.len(), 1);
        assert_eq!(plan.forwards[0].1, Ipv4Addr::new(172, 31, 0, 2));
        assert_eq!(veth_name((Ipv4Addr::new(172, 31, 0, 3), 24)), "kv3");
        assert_eq!(veth_name((Ipv4Addr::new(10, 200, 255, 254), 16)), "kv65534");
    }
}
