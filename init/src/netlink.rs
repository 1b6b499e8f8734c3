//! The little of rtnetlink the init needs: list links, bring one up with
//! an MTU, add and remove IPv4 addresses and routes. Messages are built
//! and parsed by pure functions (tested below); [`Socket`] sends them.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_PID: u16 = 19;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const IFA_CACHEINFO: u16 = 6;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;

const RT_TABLE_MAIN: u8 = 254;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
/// Who added a route (`proto dhcp` / `proto static` in `ip route`).
pub const RTPROT_STATIC: u8 = 4;
pub const RTPROT_DHCP: u8 = 16;

/// Address families, as the one-byte fields hold them.
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;
const HEADER: usize = 16;

/// A network interface as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Its hardware address (six bytes for Ethernet).
    pub mac: Vec<u8>,
    /// Ethernet hardware, not loopback nor a virtual link (a bridge, a
    /// veth): what DHCP runs on by default.
    pub ethernet: bool,
    pub up: bool,
}

/// An IPv4 address with its prefix length, `10.0.2.15/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// The netmask's bits.
    pub fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix.min(32)))
        }
    }

    /// The subnet's own address (host bits zero).
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// Whether `ip` is in this address's subnet.
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }

    /// The subnet's broadcast address.
    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Appends one attribute, padded to four bytes.
pub(crate) fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A whole message: header, then `body` (the fixed part and attributes).
pub(crate) fn message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(HEADER + body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(body);
    out
}

/// ifinfomsg: family, type, index, flags, change.
fn ifinfo(index: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut b = vec![AF_UNSPEC, 0, 0, 0];
    b.extend_from_slice(&index.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&change.to_ne_bytes());
    b
}

/// Creates a link of `kind` named `name` (up, on `master` if given);
/// `data` is the kind's IFLA_INFO_DATA, if any.
fn new_link(seq: u32, name: &str, kind: &str, master: Option<u32>, data: Option<&[u8]>) -> Vec<u8> {
    let up = libc::IFF_UP as u32;
    let mut body = ifinfo(0, up, up);
    attr(&mut body, IFLA_IFNAME, format!("{name}\0").as_bytes());
    if let Some(m) = master {
        attr(&mut body, IFLA_MASTER, &m.to_ne_bytes());
    }
    let mut info = Vec::new();
    attr(&mut info, IFLA_INFO_KIND, kind.as_bytes());
    if let Some(d) = data {
        attr(&mut info, IFLA_INFO_DATA, d);
    }
    attr(&mut body, IFLA_LINKINFO, &info);
    message(
        RTM_NEWLINK,
        NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK,
        seq,
        &body,
    )
}

/// Creates the bridge `name`, up.
pub fn new_bridge(seq: u32, name: &str) -> Vec<u8> {
    new_link(seq, name, "bridge", None, None)
}

/// Creates a veth pair: `name` here, up on bridge `master`, and `peer`
/// in the network namespace of process `pid` (configured from there).
pub fn new_veth(seq: u32, name: &str, master: u32, peer: &str, pid: u32) -> Vec<u8> {
    let mut peer_info = ifinfo(0, 0, 0);
    attr(&mut peer_info, IFLA_IFNAME, format!("{peer}\0").as_bytes());
    attr(&mut peer_info, IFLA_NET_NS_PID, &pid.to_ne_bytes());
    let mut data = Vec::new();
    attr(&mut data, VETH_INFO_PEER, &peer_info);
    new_link(seq, name, "veth", Some(master), Some(&data))
}

/// Deletes the link `name` (a veth's peer goes with it).
pub fn del_link(seq: u32, name: &str) -> Vec<u8> {
    let mut body = ifinfo(0, 0, 0);
    attr(&mut body, IFLA_IFNAME, format!("{name}\0").as_bytes());
    message(RTM_DELLINK, NLM_F_ACK, seq, &body)
}

/// Asks for every link.
pub fn get_links(seq: u32) -> Vec<u8> {
    message(RTM_GETLINK, NLM_F_DUMP, seq, &ifinfo(0, 0, 0))
}

/// Brings link `index` up, with `mtu` if given.
pub fn set_up(seq: u32, index: u32, mtu: Option<u32>) -> Vec<u8> {
    let up = libc::IFF_UP as u32;
    let mut body = ifinfo(index, up, up);
    if let Some(mtu) = mtu {
        attr(&mut body, IFLA_MTU, &mtu.to_ne_bytes());
    }
    message(RTM_NEWLINK, NLM_F_ACK, seq, &body)
}

/// Adds (or replaces) `cidr` on link `index`; `lifetime` in seconds makes
/// the kernel drop it when a lease ends unrenewed (`None`: forever).
pub fn add_address(seq: u32, index: u32, cidr: Cidr, lifetime: Option<u32>) -> Vec<u8> {
    address(
        RTM_NEWADDR,
        NLM_F_CREATE | NLM_F_REPLACE,
        seq,
        index,
        cidr,
        lifetime,
    )
}

/// Removes `cidr` from link `index`.
pub fn del_address(seq: u32, index: u32, cidr: Cidr) -> Vec<u8> {
    address(RTM_DELADDR, 0, seq, index, cidr, None)
}

fn address(
    kind: u16,
    flags: u16,
    seq: u32,
    index: u32,
    cidr: Cidr,
    lifetime: Option<u32>,
) -> Vec<u8> {
    let mut body = vec![AF_INET, cidr.prefix, 0, RT_SCOPE_UNIVERSE];
    body.extend_from_slice(&index.to_ne_bytes());
    attr(&mut body, IFA_LOCAL, &cidr.addr.octets());
    attr(&mut body, IFA_ADDRESS, &cidr.addr.octets());
    if cidr.prefix < 31 {
        attr(&mut body, IFA_BROADCAST, &cidr.broadcast().octets());
    }
    if let Some(secs) = lifetime {
        // ifa_cacheinfo: preferred, valid, then two timestamps the kernel sets.
        let mut info = Vec::with_capacity(16);
        info.extend_from_slice(&secs.to_ne_bytes());
        info.extend_from_slice(&secs.to_ne_bytes());
        info.extend_from_slice(&[0; 8]);
        attr(&mut body, IFA_CACHEINFO, &info);
    }
    message(kind, flags | NLM_F_ACK, seq, &body)
}

/// Adds (or replaces) a route to `dst` (None: the default route) through
/// `gateway` (None: on the link itself) on link `index`.
pub fn add_route(
    seq: u32,
    index: u32,
    dst: Option<Cidr>,
    gateway: Option<Ipv4Addr>,
    protocol: u8,
) -> Vec<u8> {
    let scope = if gateway.is_some() {
        RT_SCOPE_UNIVERSE
    } else {
        RT_SCOPE_LINK
    };
    let dst_len = dst.map_or(0, |d| d.prefix);
    let mut body = vec![
        AF_INET,
        dst_len,
        0,
        0,
        RT_TABLE_MAIN,
        protocol,
        scope,
        RTN_UNICAST,
    ];
    body.extend_from_slice(&0u32.to_ne_bytes());
    if let Some(d) = dst {
        attr(&mut body, RTA_DST, &d.addr.octets());
    }
    if let Some(g) = gateway {
        attr(&mut body, RTA_GATEWAY, &g.octets());
    }
    attr(&mut body, RTA_OIF, &index.to_ne_bytes());
    message(
        RTM_NEWROUTE,
        NLM_F_CREATE | NLM_F_REPLACE | NLM_F_ACK,
        seq,
        &body,
    )
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// One reply message: its type and body.
struct Reply<'a> {
    kind: u16,
    body: &'a [u8],
}

/// The messages in one datagram; a malformed tail ends the list.
fn replies(mut buf: &[u8]) -> Vec<Reply<'_>> {
    let mut out = Vec::new();
    while let (Some(len), Some(kind)) = (u32_at(buf, 0), u16_at(buf, 4)) {
        let len = len as usize;
        if len < HEADER || len > buf.len() {
            break;
        }
        out.push(Reply {
            kind,
            body: &buf[HEADER..len],
        });
        buf = &buf[(len + 3) & !3..];
        if buf.len() < HEADER {
            break;
        }
    }
    out
}

/// Attributes after a fixed part of `skip` bytes: (type, payload).
fn attrs(body: &[u8], skip: usize) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = skip;
    while let (Some(len), Some(kind)) = (u16_at(body, at), u16_at(body, at + 2)) {
        let len = usize::from(len);
        if len < 4 || at + len > body.len() {
            break;
        }
        out.push((kind & 0x3fff, &body[at + 4..at + len]));
        at += (len + 3) & !3;
    }
    out
}

/// A link from an RTM_NEWLINK message body.
fn parse_link(body: &[u8]) -> Option<Link> {
    let kind = u16_at(body, 2)?;
    let index = u32_at(body, 4)?;
    let flags = u32_at(body, 8)?;
    let mut link = Link {
        index,
        name: String::new(),
        mac: Vec::new(),
        ethernet: kind == ARPHRD_ETHER && kind != ARPHRD_LOOPBACK,
        up: flags & libc::IFF_UP as u32 != 0,
    };
    for (t, v) in attrs(body, 16) {
        match t {
            // Only virtual links (bridge, veth) have a kind.
            IFLA_LINKINFO => link.ethernet = false,
            IFLA_IFNAME => {
                let v = v.split(|&b| b == 0).next().unwrap_or(v);
                link.name = String::from_utf8_lossy(v).into_owned();
            }
            IFLA_ADDRESS => link.mac = v.to_vec(),
            _ => {}
        }
    }
    Some(link)
}

/// An rtnetlink socket.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    /// An rtnetlink socket, in the caller's network namespace.
    pub fn open() -> io::Result<Socket> {
        Socket::open_protocol(libc::NETLINK_ROUTE)
    }

    /// A netlink socket of another family (netfilter's, say).
    pub fn open_protocol(protocol: libc::c_int) -> io::Result<Socket> {
        // SAFETY: plain socket creation.
        let fd = crate::sys::owned(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        })?;
        Ok(Socket { fd, seq: 0 })
    }

    /// Sends `msg` (one message, or a batch of them) and reads `acks`
    /// acknowledgements, failing with the first error among them.
    pub fn transact(&mut self, msg: &[u8], acks: usize) -> io::Result<()> {
        self.send(msg)?;
        let mut first_err = None;
        for _ in 0..acks {
            if let Err(e) = self.receive(&mut |_, _| {}) {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    return Err(e);
                }
                first_err.get_or_insert(e);
                // The batch is refused whole: later answers add nothing.
                break;
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The next sequence number, for messages built outside.
    pub fn seq(&mut self) -> u32 {
        self.next_seq()
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: pointer and length describe `msg`; the kernel is the peer.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads replies until the acknowledgement or the end of a dump,
    /// passing each data message's body to `each`.
    fn receive(&self, each: &mut dyn FnMut(u16, &[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = crate::sys::read(
                // SAFETY: the socket outlives the borrow.
                unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd.as_raw_fd()) },
                &mut buf,
            )?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            for r in replies(&buf[..n]) {
                match r.kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = u32_at(r.body, 0).map_or(0, |c| c as i32);
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    kind => each(kind, r.body),
                }
            }
        }
    }

    /// Sends a request that asks for an acknowledgement and waits for it.
    fn request(&mut self, build: impl FnOnce(u32) -> Vec<u8>) -> io::Result<()> {
        let seq = self.next_seq();
        self.send(&build(seq))?;
        self.receive(&mut |_, _| {})
    }

    /// Every link.
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let seq = self.next_seq();
        self.send(&get_links(seq))?;
        let mut out = Vec::new();
        self.receive(&mut |kind, body| {
            if kind == RTM_NEWLINK {
                out.extend(parse_link(body));
            }
        })?;
        Ok(out)
    }

    /// The link named `name`.
    pub fn link(&mut self, name: &str) -> io::Result<Link> {
        self.links()?
            .into_iter()
            .find(|l| l.name == name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no link {name}")))
    }

    pub fn new_bridge(&mut self, name: &str) -> io::Result<()> {
        self.request(|seq| new_bridge(seq, name))
    }

    /// A veth pair (see [`new_veth`]); a leftover of the same name (the
    /// peer of a namespace the kernel has not finished tearing down) is
    /// deleted first.
    pub fn new_veth(&mut self, name: &str, master: u32, peer: &str, pid: u32) -> io::Result<()> {
        match self.request(|seq| new_veth(seq, name, master, peer, pid)) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                self.request(|seq| del_link(seq, name))?;
                self.request(|seq| new_veth(seq, name, master, peer, pid))
            }
            r => r,
        }
    }

    pub fn set_up(&mut self, index: u32, mtu: Option<u32>) -> io::Result<()> {
        self.request(|seq| set_up(seq, index, mtu))
    }

    pub fn add_address(&mut self, index: u32, cidr: Cidr, lifetime: Option<u32>) -> io::Result<()> {
        self.request(|seq| add_address(seq, index, cidr, lifetime))
    }

    pub fn del_address(&mut self, index: u32, cidr: Cidr) -> io::Result<()> {
        self.request(|seq| del_address(seq, index, cidr))
    }

    /// The default route through `gateway`; when the gateway is outside
    /// the address's subnet (a /32 lease), a link route to it first.
    pub fn add_default_route(
        &mut self,
        index: u32,
        cidr: Cidr,
        gateway: Ipv4Addr,
        protocol: u8,
    ) -> io::Result<()> {
        if !cidr.contains(gateway) {
            let host = Cidr {
                addr: gateway,
                prefix: 32,
            };
            self.request(|seq| add_route(seq, index, Some(host), None, protocol))?;
        }
        self.request(|seq| add_route(seq, index, None, Some(gateway), protocol))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        let (a, p) = s.split_once('/').unwrap();
        Cidr {
            addr: a.parse().unwrap(),
            prefix: p.parse().unwrap(),
        }
    }

    #[test]
    fn subnets() {
        let c = cidr("10.0.2.15/24");
        assert!(c.contains("10.0.2.2".parse().unwrap()));
        assert!(!c.contains("10.0.3.2".parse().unwrap()));
        assert_eq!(c.broadcast(), "10.0.2.255".parse::<Ipv4Addr>().unwrap());
        assert!(!cidr("10.128.0.5/32").contains("10.128.0.1".parse().unwrap()));
        assert!(cidr("0.0.0.0/0").contains("1.2.3.4".parse().unwrap()));
        assert_eq!(c.to_string(), "10.0.2.15/24");
    }

    /// The bytes `ip addr add 10.0.2.15/24 dev 2` sends, in the layout of
    /// linux/if_addr.h (native endian).
    #[test]
    fn address_message_layout() {
        let m = add_address(7, 2, cidr("10.0.2.15/24"), Some(86400));
        assert_eq!(u32_at(&m, 0).map(|l| l as usize), Some(m.len()));
        assert_eq!(u16_at(&m, 4), Some(RTM_NEWADDR));
        assert_eq!(
            u16_at(&m, 6),
            Some(NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE)
        );
        assert_eq!(u32_at(&m, 8), Some(7));
        let body = &m[HEADER..];
        assert_eq!(&body[..4], &[AF_INET, 24, 0, 0]);
        assert_eq!(u32_at(body, 4), Some(2));
        let a = attrs(body, 8);
        let kinds: Vec<u16> = a.iter().map(|(t, _)| *t).collect();
        assert_eq!(
            kinds,
            [IFA_LOCAL, IFA_ADDRESS, IFA_BROADCAST, IFA_CACHEINFO]
        );
        assert_eq!(a[0].1, &[10, 0, 2, 15]);
        assert_eq!(a[2].1, &[10, 0, 2, 255]);
        assert_eq!(u32_at(a[3].1, 4), Some(86400));
        assert_eq!(m.len() % 4, 0);
    }

    #[test]
    fn route_messages() {
        let m = add_route(1, 3, None, Some("10.0.2.2".parse().unwrap()), RTPROT_DHCP);
        let body = &m[HEADER..];
        assert_eq!(
            &body[..8],
            &[
                AF_INET,
                0,
                0,
                0,
                RT_TABLE_MAIN,
                RTPROT_DHCP,
                RT_SCOPE_UNIVERSE,
                RTN_UNICAST
            ]
        );
        let a = attrs(body, 12);
        assert_eq!(a[0], (RTA_GATEWAY, &[10u8, 0, 2, 2][..]));
        assert_eq!(a[1], (RTA_OIF, &3u32.to_ne_bytes()[..]));
        let host = add_route(2, 3, Some(cidr("10.0.0.1/32")), None, RTPROT_STATIC);
        let body = &host[HEADER..];
        assert_eq!((body[1], body[6]), (32, RT_SCOPE_LINK));
        assert_eq!(attrs(body, 12)[0], (RTA_DST, &[10u8, 0, 0, 1][..]));
    }

    /// `ip link add kv2 master 3 up type veth peer name eth0 netns 42`.
    #[test]
    fn veth_message_layout() {
        let m = new_veth(5, "kv2", 3, "eth0", 42);
        assert_eq!(u16_at(&m, 4), Some(RTM_NEWLINK));
        assert_eq!(
            u16_at(&m, 6),
            Some(NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
        );
        let body = &m[HEADER..];
        assert_eq!(u32_at(body, 8), Some(libc::IFF_UP as u32));
        let a = attrs(body, 16);
        assert_eq!(a[0], (IFLA_IFNAME, &b"kv2\0"[..]));
        assert_eq!(a[1], (IFLA_MASTER, &3u32.to_ne_bytes()[..]));
        assert_eq!(a[2].0, IFLA_LINKINFO);
        let info = attrs(a[2].1, 0);
        assert_eq!(info[0], (IFLA_INFO_KIND, &b"veth"[..]));
        let data = attrs(info[1].1, 0);
        assert_eq!(data[0].0, VETH_INFO_PEER);
        // The peer: its own ifinfomsg, then its name and namespace.
        let peer = attrs(data[0].1, 16);
        assert_eq!(peer[0], (IFLA_IFNAME, &b"eth0\0"[..]));
        assert_eq!(peer[1], (IFLA_NET_NS_PID, &42u32.to_ne_bytes()[..]));
        // A link with a kind is virtual: DHCP leaves it alone.
        let mut listed = ifinfo(4, 0, 0);
        listed[2..4].copy_from_slice(&ARPHRD_ETHER.to_ne_bytes());
        attr(&mut listed, IFLA_IFNAME, b"kiln0\0");
        attr(&mut listed, IFLA_LINKINFO, a[2].1);
        assert!(!parse_link(&listed).unwrap().ethernet);
    }

    #[test]
    fn link_replies_parse() {
        // What the kernel answers: an RTM_NEWLINK per link, then DONE.
        let mut body = ifinfo(2, libc::IFF_UP as u32, 0);
        body[2..4].copy_from_slice(&ARPHRD_ETHER.to_ne_bytes());
        attr(&mut body, IFLA_IFNAME, b"eth0\0");
        attr(&mut body, IFLA_ADDRESS, &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        attr(&mut body, 99, &[1, 2, 3]);
        let mut lo = ifinfo(1, 0, 0);
        lo[2..4].copy_from_slice(&ARPHRD_LOOPBACK.to_ne_bytes());
        attr(&mut lo, IFLA_IFNAME, b"lo\0");
        let mut buf = message(RTM_NEWLINK, 0, 1, &body);
        buf.extend(message(RTM_NEWLINK, 0, 1, &lo));
        buf.extend(message(NLMSG_DONE, 0, 1, &[0; 4]));
        let got: Vec<Link> = replies(&buf)
            .iter()
            .filter(|r| r.kind == RTM_NEWLINK)
            .filter_map(|r| parse_link(r.body))
            .collect();
        assert_eq!(
            got,
            [
                Link {
                    index: 2,
                    name: "eth0".into(),
                    mac: vec![0x52, 0x54, 0, 0x12, 0x34, 0x56],
                    ethernet: true,
                    up: true
                },
                Link {
                    index: 1,
                    name: "lo".into(),
                    mac: vec![],
                    ethernet: false,
                    up: false
                }
            ]
        );
        // Truncated input ends the list instead of failing.
        assert_eq!(replies(&buf[..10]).len(), 0);
        assert_eq!(attrs(&[8, 0, 1, 0, 1], 0).len(), 0);
    }
}
