//! The container bridge's NAT rules in nftables, sent over netlink (no
//! `nft` in the image): one `ip kiln` table whose chains masquerade what
//! leaves the bridge subnet and forward published ports to containers.
//! The messages are built by pure functions (tested below) and sent as
//! one batch, which the kernel applies whole or not at all.
//!
//! What [`ruleset`] sets up, in `nft` syntax:
//!
//! ```text
//! table ip kiln {
//!   chain prerouting  { type nat hook prerouting priority dstnat; PORTS }
//!   chain output      { type nat hook output priority dstnat; PORTS }
//!   chain postrouting { type nat hook postrouting priority srcnat;
//!     ip saddr SUBNET masquerade
//!     oifname "kiln0" ip saddr 127.0.0.0/8 masquerade }
//! }
//! PORTS, one rule each:
//!   fib daddr type local [ip daddr HOST_IP] meta l4proto P th dport HOST_PORT
//!     dnat to ADDRESS:PORT
//! ```
//!
//! Traffic between containers stays on the bridge (layer 2) and meets
//! none of these; a container reaching a published port through a host
//! address comes back through the bridge masqueraded, so replies return
//! the way they came.

use crate::netlink::{attr, message, Cidr, Socket};
use kiln_init::config::Port;
use std::io;
use std::net::Ipv4Addr;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;

const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;

const NFPROTO_IPV4: u8 = 2;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;

/// Hooks (`NF_INET_*`) and the NAT priorities `nft` calls dstnat and srcnat.
const HOOK_PREROUTING: u32 = 0;
const HOOK_OUTPUT: u32 = 3;
const HOOK_POSTROUTING: u32 = 4;
const PRIO_DSTNAT: i32 = -100;
const PRIO_SRCNAT: i32 = 100;

/// The 16-byte registers 1 and 2.
const REG1: u32 = 1;
const REG2: u32 = 2;

/// The table's name.
pub const TABLE: &str = "kiln";

/// One expression: its name and its attributes.
struct Expr {
    name: &'static str,
    data: Vec<u8>,
}

fn be32(out: &mut Vec<u8>, kind: u16, v: u32) {
    attr(out, kind, &v.to_be_bytes());
}

fn nested(out: &mut Vec<u8>, kind: u16, inner: &[u8]) {
    attr(out, kind | NLA_F_NESTED, inner);
}

fn string(out: &mut Vec<u8>, kind: u16, s: &str) {
    attr(out, kind, format!("{s}\0").as_bytes());
}

/// `NFTA_DATA_VALUE` nested in `kind`.
fn value(out: &mut Vec<u8>, kind: u16, bytes: &[u8]) {
    let mut v = Vec::new();
    attr(&mut v, NFTA_DATA_VALUE, bytes);
    nested(out, kind, &v);
}

/// Loads `len` bytes at `offset` of a header (1: network, 2: transport).
fn payload(base: u32, offset: u32, len: u32) -> Expr {
    let mut d = Vec::new();
    be32(&mut d, 1, REG1); // NFTA_PAYLOAD_DREG
    be32(&mut d, 2, base);
    be32(&mut d, 3, offset);
    be32(&mut d, 4, len);
    Expr {
        name: "payload",
        data: d,
    }
}

/// Compares register 1 with `data`: 0 equal, 1 not equal.
fn cmp(op: u32, data: &[u8]) -> Expr {
    let mut d = Vec::new();
    be32(&mut d, 1, REG1); // NFTA_CMP_SREG
    be32(&mut d, 2, op);
    value(&mut d, 3, data);
    Expr {
        name: "cmp",
        data: d,
    }
}

/// Register 1 &= `mask` (of its length).
fn and(mask: &[u8]) -> Expr {
    let mut d = Vec::new();
    be32(&mut d, 1, REG1); // NFTA_BITWISE_SREG
    be32(&mut d, 2, REG1);
    be32(&mut d, 3, u32::try_from(mask.len()).unwrap_or(0));
    value(&mut d, 4, mask);
    value(&mut d, 5, &vec![0; mask.len()]);
    Expr {
        name: "bitwise",
        data: d,
    }
}

/// Loads a packet's meta key into register 1 (7: oifname, 16: l4proto).
fn meta(key: u32) -> Expr {
    let mut d = Vec::new();
    be32(&mut d, 1, REG1); // NFTA_META_DREG
    be32(&mut d, 2, key);
    Expr {
        name: "meta",
        data: d,
    }
}

/// `fib daddr type`: the route type of the destination, into register 1.
fn fib_daddr_type() -> Expr {
    let mut d = Vec::new();
    be32(&mut d, 1, REG1); // NFTA_FIB_DREG
    be32(&mut d, 2, 3); // NFT_FIB_RESULT_ADDRTYPE
    be32(&mut d, 3, 2); // NFTA_FIB_F_DADDR
    Expr {
        name: "fib",
        data: d,
    }
}

fn immediate(reg: u32, data: &[u8]) -> Expr {
    let mut d = Vec::new();
    be32(&mut d, 1, reg); // NFTA_IMMEDIATE_DREG
    value(&mut d, 2, data);
    Expr {
        name: "immediate",
        data: d,
    }
}

/// Destination NAT to the address in register 1 and port in register 2.
fn dnat() -> Expr {
    let mut d = Vec::new();
    be32(&mut d, 1, 1); // NFTA_NAT_TYPE: NFT_NAT_DNAT
    be32(&mut d, 2, u32::from(NFPROTO_IPV4));
    be32(&mut d, 3, REG1); // NFTA_NAT_REG_ADDR_MIN
    be32(&mut d, 5, REG2); // NFTA_NAT_REG_PROTO_MIN
    Expr {
        name: "nat",
        data: d,
    }
}

fn masquerade() -> Expr {
    Expr {
        name: "masq",
        data: Vec::new(),
    }
}

/// An interface name as the meta key holds it: 16 bytes, NUL padded.
fn ifname(name: &str) -> [u8; 16] {
    let mut b = [0; 16];
    for (d, s) in b.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    b
}

/// `ip saddr CIDR`.
fn source_in(net: Cidr) -> Vec<Expr> {
    let mask = net.mask();
    vec![
        payload(1, 12, 4),
        and(&mask.to_be_bytes()),
        cmp(0, &(u32::from(net.addr) & mask).to_be_bytes()),
    ]
}

/// A message of the nftables subsystem: nfgenmsg, then attributes.
fn nft_message(kind: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) -> Vec<u8> {
    let mut body = vec![family, 0];
    body.extend_from_slice(&0u16.to_be_bytes());
    body.extend_from_slice(attrs);
    message(
        (NFNL_SUBSYS_NFTABLES << 8) | kind,
        flags | NLM_F_ACK,
        seq,
        &body,
    )
}

/// The batch markers around the messages.
fn batch_marker(kind: u16, seq: u32) -> Vec<u8> {
    let mut body = vec![0, 0];
    body.extend_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
    message(kind, 0, seq, &body)
}

fn table(seq: u32) -> Vec<u8> {
    let mut a = Vec::new();
    string(&mut a, NFTA_TABLE_NAME, TABLE);
    nft_message(NFT_MSG_NEWTABLE, NLM_F_CREATE, seq, NFPROTO_IPV4, &a)
}

fn nat_chain(seq: u32, name: &str, hook: u32, priority: i32) -> Vec<u8> {
    let mut a = Vec::new();
    string(&mut a, NFTA_CHAIN_TABLE, TABLE);
    string(&mut a, NFTA_CHAIN_NAME, name);
    let mut h = Vec::new();
    be32(&mut h, NFTA_HOOK_HOOKNUM, hook);
    be32(&mut h, NFTA_HOOK_PRIORITY, priority as u32);
    nested(&mut a, NFTA_CHAIN_HOOK, &h);
    string(&mut a, NFTA_CHAIN_TYPE, "nat");
    nft_message(NFT_MSG_NEWCHAIN, NLM_F_CREATE, seq, NFPROTO_IPV4, &a)
}

fn rule(seq: u32, chain: &str, exprs: &[Expr]) -> Vec<u8> {
    let mut a = Vec::new();
    string(&mut a, NFTA_RULE_TABLE, TABLE);
    string(&mut a, NFTA_RULE_CHAIN, chain);
    let mut list = Vec::new();
    for e in exprs {
        let mut elem = Vec::new();
        string(&mut elem, NFTA_EXPR_NAME, e.name);
        if !e.data.is_empty() {
            nested(&mut elem, NFTA_EXPR_DATA, &e.data);
        }
        nested(&mut list, NFTA_LIST_ELEM, &elem);
    }
    nested(&mut a, NFTA_RULE_EXPRESSIONS, &list);
    nft_message(
        NFT_MSG_NEWRULE,
        NLM_F_CREATE | NLM_F_APPEND,
        seq,
        NFPROTO_IPV4,
        &a,
    )
}

/// The expressions of one published port's rule.
fn forward(port: &Port, to: Ipv4Addr) -> Vec<Expr> {
    let mut e = vec![
        fib_daddr_type(),
        cmp(0, &u32::from(libc::RTN_LOCAL).to_ne_bytes()),
    ];
    if let Some(ip) = port.host_ip {
        e.push(payload(1, 16, 4));
        e.push(cmp(0, &ip.octets()));
    }
    e.extend([
        meta(16),
        cmp(0, &[port.protocol.number()]),
        payload(2, 2, 2),
        cmp(0, &port.host_port.to_be_bytes()),
        immediate(REG1, &to.octets()),
        immediate(REG2, &port.port.to_be_bytes()),
        dnat(),
    ]);
    e
}

/// The batch that creates the table: its messages (framed by the batch
/// markers) and how many acknowledgements to expect. `forwards` are the
/// published ports with the container address each goes to.
pub fn ruleset(
    first_seq: u32,
    bridge: &str,
    subnet: Cidr,
    forwards: &[(Port, Ipv4Addr)],
) -> (Vec<u8>, usize) {
    let mut seq = first_seq;
    let mut next = || {
        seq = seq.wrapping_add(1);
        seq
    };
    let mut msgs = vec![
        table(next()),
        nat_chain(next(), "prerouting", HOOK_PREROUTING, PRIO_DSTNAT),
        nat_chain(next(), "output", HOOK_OUTPUT, PRIO_DSTNAT),
        nat_chain(next(), "postrouting", HOOK_POSTROUTING, PRIO_SRCNAT),
    ];
    for (port, to) in forwards {
        for chain in ["prerouting", "output"] {
            msgs.push(rule(next(), chain, &forward(port, *to)));
        }
    }
    let mut out_of_subnet = source_in(subnet);
    out_of_subnet.push(masquerade());
    msgs.push(rule(next(), "postrouting", &out_of_subnet));
    let loopback = Cidr {
        addr: Ipv4Addr::new(127, 0, 0, 0),
        prefix: 8,
    };
    let mut from_localhost = vec![meta(7), cmp(0, &ifname(bridge))];
    from_localhost.extend(source_in(loopback));
    from_localhost.push(masquerade());
    msgs.push(rule(next(), "postrouting", &from_localhost));

    let acks = msgs.len();
    let mut out = batch_marker(NFNL_MSG_BATCH_BEGIN, first_seq);
    for m in msgs {
        out.extend(m);
    }
    out.extend(batch_marker(NFNL_MSG_BATCH_END, next()));
    (out, acks)
}

/// Creates the table in the caller's network namespace.
pub fn apply(bridge: &str, subnet: Cidr, forwards: &[(Port, Ipv4Addr)]) -> io::Result<()> {
    let mut sock = Socket::open_protocol(libc::NETLINK_NETFILTER)?;
    let seq = sock.seq();
    let (batch, acks) = ruleset(seq, bridge, subnet, forwards);
    sock.transact(&batch, acks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_init::config::Protocol;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes(b[at..at + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// (type, payload) of the attributes in `b`.
    fn attrs(b: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 4 <= b.len() {
            let len = usize::from(u16_at(b, at));
            out.push((u16_at(b, at + 2), &b[at + 4..at + len]));
            at += (len + 3) & !3;
        }
        out
    }

    /// The messages of a batch: (type, flags, body).
    fn messages(b: &[u8]) -> Vec<(u16, u16, &[u8])> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < b.len() {
            let len = u32_at(b, at) as usize;
            out.push((u16_at(b, at + 4), u16_at(b, at + 6), &b[at + 16..at + len]));
            at += len;
        }
        out
    }

    fn subnet() -> Cidr {
        Cidr {
            addr: Ipv4Addr::new(172, 31, 0, 0),
            prefix: 24,
        }
    }

    #[test]
    fn batch_frames_table_chains_and_rules() {
        let port = Port {
            host_ip: None,
            host_port: 8080,
            port: 80,
            protocol: Protocol::Tcp,
        };
        let (b, acks) = ruleset(
            0,
            "kiln0",
            subnet(),
            &[(port, Ipv4Addr::new(172, 31, 0, 2))],
        );
        let m = messages(&b);
        // Begin, table, three chains, two port rules, two masquerades, end.
        assert_eq!(m.len(), 10);
        assert_eq!(acks, 8);
        assert_eq!(m[0].0, NFNL_MSG_BATCH_BEGIN);
        // The batch is for the nftables subsystem (res_id, big endian).
        assert_eq!(&m[0].2[2..4], &[0, 10]);
        assert_eq!(m[9].0, NFNL_MSG_BATCH_END);
        let kinds: Vec<u16> = m[1..9].iter().map(|x| x.0 & 0xff).collect();
        assert_eq!(kinds, [0, 3, 3, 3, 6, 6, 6, 6]);
        assert!(m[1..9]
            .iter()
            .all(|x| x.0 >> 8 == 10 && x.1 & NLM_F_ACK != 0));
        assert!(m[1..9].iter().all(|x| x.2[0] == NFPROTO_IPV4));
        // The postrouting chain: nat type, hook 4, priority 100.
        let chain = attrs(&m[4].2[4..]);
        assert_eq!(chain[1], (NFTA_CHAIN_NAME, &b"postrouting\0"[..]));
        let hook = attrs(chain[2].1);
        assert_eq!(chain[2].0, NFTA_CHAIN_HOOK | NLA_F_NESTED);
        assert_eq!(hook[0].1, 4u32.to_be_bytes());
        assert_eq!(hook[1].1, 100i32.to_be_bytes());
        assert_eq!(chain[3], (NFTA_CHAIN_TYPE, &b"nat\0"[..]));
        // prerouting's priority is negative, as nft's dstnat.
        let pre = attrs(&m[2].2[4..]);
        assert_eq!(attrs(pre[2].1)[1].1, (-100i32).to_be_bytes());
    }

    /// An expression's attributes: (type, payload).
    type ExprAttrs = Vec<(u16, Vec<u8>)>;

    /// The expressions of a rule: (name, attributes).
    fn exprs(body: &[u8]) -> Vec<(String, ExprAttrs)> {
        let rule = attrs(&body[4..]);
        let list = rule
            .iter()
            .find(|a| a.0 & 0xff == NFTA_RULE_EXPRESSIONS)
            .unwrap();
        attrs(list.1)
            .iter()
            .map(|(_, elem)| {
                let e = attrs(elem);
                let name = String::from_utf8(e[0].1.split_last().unwrap().1.to_vec()).unwrap();
                let data = e
                    .get(1)
                    .map(|d| attrs(d.1).iter().map(|(t, v)| (*t, v.to_vec())).collect())
                    .unwrap_or_default();
                (name, data)
            })
            .collect()
    }

    #[test]
    fn published_udp_port_on_one_address() {
        let port = Port {
            host_ip: Some(Ipv4Addr::new(10, 0, 2, 15)),
            host_port: 5353,
            port: 53,
            protocol: Protocol::Udp,
        };
        let (b, _) = ruleset(
            0,
            "kiln0",
            subnet(),
            &[(port, Ipv4Addr::new(172, 31, 0, 9))],
        );
        let m = messages(&b);
        let e = exprs(m[5].2);
        let names: Vec<&str> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "fib",
                "cmp",
                "payload",
                "cmp",
                "meta",
                "cmp",
                "payload",
                "cmp",
                "immediate",
                "immediate",
                "nat"
            ]
        );
        let value = |i: usize, attr: u16| {
            let a = &e[i].1.iter().find(|(t, _)| t & 0xff == attr).unwrap().1;
            attrs(a)[0].1.to_vec()
        };
        // fib daddr type local: RTN_LOCAL in host order.
        assert_eq!(value(1, 3), 2u32.to_ne_bytes());
        // ip daddr at offset 16 of the network header.
        assert_eq!(e[2].1[2].1, 16u32.to_be_bytes());
        assert_eq!(value(3, 3), [10, 0, 2, 15]);
        // meta l4proto udp, then th dport 5353 (big endian).
        assert_eq!(e[4].1[1].1, 16u32.to_be_bytes());
        assert_eq!(value(5, 3), [17]);
        assert_eq!(value(7, 3), 5353u16.to_be_bytes());
        assert_eq!(value(8, 2), [172, 31, 0, 9]);
        assert_eq!(value(9, 2), 53u16.to_be_bytes());
        // dnat, ipv4, address in register 1, port in register 2.
        let nat: Vec<Vec<u8>> = e[10].1.iter().map(|(_, v)| v.clone()).collect();
        assert_eq!(
            nat,
            [1u32, 2, 1, 2].map(|v| v.to_be_bytes().to_vec()).to_vec()
        );
        // The same rule in output, for the host's own connections.
        assert_eq!(exprs(m[6].2).len(), 11);
        assert_eq!(attrs(&m[6].2[4..])[1].1, b"output\0");
    }

    #[test]
    fn masquerade_rules() {
        let (b, _) = ruleset(0, "kiln0", subnet(), &[]);
        let m = messages(&b);
        let out = exprs(m[5].2);
        let names: Vec<&str> = out.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, ["payload", "bitwise", "cmp", "masq"]);
        // saddr & 255.255.255.0 == 172.31.0.0
        assert_eq!(attrs(&out[1].1[3].1)[0].1, [255, 255, 255, 0]);
        assert_eq!(attrs(&out[2].1[2].1)[0].1, [172, 31, 0, 0]);
        let local = exprs(m[6].2);
        // oifname "kiln0": 16 bytes, NUL padded.
        let name = attrs(&local[1].1[2].1)[0].1.to_vec();
        assert_eq!(&name[..6], b"kiln0\0");
        assert_eq!(name.len(), 16);
        assert_eq!(attrs(&local[4].1[2].1)[0].1, [127, 0, 0, 0]);
    }

    /// The kernel itself accepts the batch, in a network namespace of a
    /// child process (needs root and nf_tables; skipped without them).
    #[test]
    fn kernel_accepts_the_ruleset() {
        // SAFETY: the child only makes syscalls and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: unshare of the child's own network namespace.
            let code = if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                77
            } else {
                let port = Port {
                    host_ip: None,
                    host_port: 8080,
                    port: 80,
                    protocol: Protocol::Tcp,
                };
                match apply("kiln0", subnet(), &[(port, Ipv4Addr::new(172, 31, 0, 2))]) {
                    Ok(()) => 0,
                    Err(e) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) => 77,
                    Err(e) => {
                        eprintln!("nftables batch refused: {e}");
                        1
                    }
                }
            };
            // SAFETY: leaving the forked test process at once.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let code = libc::WEXITSTATUS(status);
        if code == 77 {
            eprintln!("skipped: no network namespace or nf_tables here");
            return;
        }
        assert_eq!(code, 0, "the kernel refused the ruleset");
    }
}
