//! A DHCPv4 client (RFC 2131): the message codec and the state machine,
//! both pure (time and packets come in, packets and leases go out), so
//! every option and every timer is tested without a network.
//!
//! Own code rather than dhcproto: that crate brings hickory-proto and
//! rand into an init that must stay small, for the dozen options used.

use crate::netlink::Cidr;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use thiserror::Error;

const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// op .. file, then the magic cookie.
const FIXED: usize = 236;
const BROADCAST_FLAG: u16 = 0x8000;

const OPT_PAD: u8 = 0;
const OPT_SUBNET: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_HOSTNAME: u8 = 12;
const OPT_DOMAIN: u8 = 15;
const OPT_MTU: u8 = 26;
const OPT_REQUESTED: u8 = 50;
const OPT_LEASE: u8 = 51;
const OPT_TYPE: u8 = 53;
const OPT_SERVER: u8 = 54;
const OPT_PARAMS: u8 = 55;
const OPT_MAX_SIZE: u8 = 57;
const OPT_T1: u8 = 58;
const OPT_T2: u8 = 59;
const OPT_CLIENT_ID: u8 = 61;
const OPT_END: u8 = 255;

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Ack = 5,
    Nak = 6,
    Release = 7,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Discover,
            2 => Kind::Offer,
            3 => Kind::Request,
            5 => Kind::Ack,
            6 => Kind::Nak,
            7 => Kind::Release,
            _ => return None,
        })
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("shorter than a DHCP message ({0} bytes)")]
    Short(usize),
    #[error("not a BOOTP reply")]
    NotReply,
    #[error("no DHCP magic cookie")]
    NoMagic,
    #[error("option {0} runs past the end")]
    Truncated(u8),
    #[error("no message type")]
    NoType,
}

/// A DHCP message, as far as a client cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub op: u8,
    pub xid: u32,
    pub broadcast: bool,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub chaddr: [u8; 6],
    pub kind: Kind,
    /// Options other than the message type, in order, each code once
    /// (a repeated code's data is concatenated, RFC 3396).
    pub options: Vec<(u8, Vec<u8>)>,
}

impl Packet {
    pub fn option(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    }

    fn ip(&self, code: u8) -> Option<Ipv4Addr> {
        let v = self.option(code)?;
        Some(Ipv4Addr::new(
            *v.first()?,
            *v.get(1)?,
            *v.get(2)?,
            *v.get(3)?,
        ))
    }

    fn ips(&self, code: u8) -> Vec<Ipv4Addr> {
        self.option(code).map_or(Vec::new(), |v| {
            v.chunks_exact(4)
                .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
                .collect()
        })
    }

    fn u32(&self, code: u8) -> Option<u32> {
        let v = self.option(code)?;
        Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
    }

    fn text(&self, code: u8) -> Option<String> {
        let v = self.option(code)?;
        let v = v.split(|&b| b == 0).next().unwrap_or(v);
        std::str::from_utf8(v)
            .ok()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; FIXED];
        b[0] = self.op;
        b[1] = 1; // Ethernet
        b[2] = 6;
        b[4..8].copy_from_slice(&self.xid.to_be_bytes());
        if self.broadcast {
            b[10..12].copy_from_slice(&BROADCAST_FLAG.to_be_bytes());
        }
        b[12..16].copy_from_slice(&self.ciaddr.octets());
        b[16..20].copy_from_slice(&self.yiaddr.octets());
        b[28..34].copy_from_slice(&self.chaddr);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&[OPT_TYPE, 1, self.kind as u8]);
        for (code, data) in &self.options {
            // Long data in several options of the same code (RFC 3396).
            for chunk in data.chunks(255) {
                b.push(*code);
                b.push(u8::try_from(chunk.len()).unwrap_or(255));
                b.extend_from_slice(chunk);
            }
        }
        b.push(OPT_END);
        // Some servers ignore messages shorter than BOOTP's 300 bytes.
        if b.len() < 300 {
            b.resize(300, 0);
        }
        b
    }

    /// Parses a server's reply.
    pub fn decode(b: &[u8]) -> Result<Packet, DecodeError> {
        if b.len() < FIXED + 4 {
            return Err(DecodeError::Short(b.len()));
        }
        if b[0] != BOOTREPLY {
            return Err(DecodeError::NotReply);
        }
        if b[FIXED..FIXED + 4] != MAGIC {
            return Err(DecodeError::NoMagic);
        }
        let ip = |at: usize| Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3]);
        let mut options: Vec<(u8, Vec<u8>)> = Vec::new();
        let mut kind = None;
        let mut at = FIXED + 4;
        while at < b.len() {
            let code = b[at];
            if code == OPT_END {
                break;
            }
            if code == OPT_PAD {
                at += 1;
                continue;
            }
            let len = usize::from(*b.get(at + 1).ok_or(DecodeError::Truncated(code))?);
            let data = b
                .get(at + 2..at + 2 + len)
                .ok_or(DecodeError::Truncated(code))?;
            if code == OPT_TYPE {
                kind = data.first().copied().and_then(Kind::from_u8);
            } else if let Some((_, v)) = options.iter_mut().find(|(c, _)| *c == code) {
                v.extend_from_slice(data);
            } else {
                options.push((code, data.to_vec()));
            }
            at += 2 + len;
        }
        let mut chaddr = [0u8; 6];
        chaddr.copy_from_slice(&b[28..34]);
        Ok(Packet {
            op: b[0],
            xid: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            broadcast: u16::from_be_bytes([b[10], b[11]]) & BROADCAST_FLAG != 0,
            ciaddr: ip(12),
            yiaddr: ip(16),
            chaddr,
            kind: kind.ok_or(DecodeError::NoType)?,
            options,
        })
    }
}

/// What a server granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Cidr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub mtu: Option<u32>,
    pub hostname: Option<String>,
    pub domain: Option<String>,
    pub server: Ipv4Addr,
    /// Seconds; `u32::MAX` is forever.
    pub lease: u32,
    /// Renewal (T1) and rebinding (T2) times, seconds after the grant.
    pub renew: u32,
    pub rebind: u32,
}

/// The lease a server's ACK (or OFFER) describes.
pub fn lease(p: &Packet) -> Lease {
    let prefix = p
        .ip(OPT_SUBNET)
        .map(|m| u32::from(m).leading_ones())
        .and_then(|n| u8::try_from(n).ok())
        .unwrap_or(32);
    let lease = p.u32(OPT_LEASE).unwrap_or(3600);
    let part = |num: u64, den: u64| u32::try_from(u64::from(lease) * num / den).unwrap_or(u32::MAX);
    let renew = p.u32(OPT_T1).unwrap_or_else(|| part(1, 2));
    let rebind = p.u32(OPT_T2).unwrap_or_else(|| part(7, 8)).max(renew);
    Lease {
        address: Cidr {
            addr: p.yiaddr,
            prefix,
        },
        router: p.ip(OPT_ROUTER).filter(|r| !r.is_unspecified()),
        dns: p.ips(OPT_DNS),
        // Below 576 (IPv4's minimum datagram) is a broken server.
        mtu: p
            .option(OPT_MTU)
            .and_then(|v| Some(u16::from_be_bytes(v.get(..2)?.try_into().ok()?)))
            .map(u32::from)
            .filter(|&m| m >= 576),
        hostname: p.text(OPT_HOSTNAME),
        domain: p.text(OPT_DOMAIN),
        server: p.ip(OPT_SERVER).unwrap_or(Ipv4Addr::UNSPECIFIED),
        lease,
        renew: renew.min(lease),
        rebind: rebind.min(lease),
    }
}

/// Where a client is (RFC 2131 figure 5).
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Selecting,
    Requesting { offer: Lease },
    Bound { lease: Lease, at: Instant },
    Renewing { lease: Lease, at: Instant },
    Rebinding { lease: Lease, at: Instant },
}

/// What the client asks of the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this message to this server (broadcast: 255.255.255.255).
    Send { to: Ipv4Addr, packet: Vec<u8> },
    /// Configure the interface with this lease (new or renewed).
    Configure(Lease),
    /// Remove this address: the lease ended or was refused.
    Deconfigure(Cidr),
}

/// First retransmission delay; each retry doubles it up to the cap.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(32);
/// REQUESTs for one offer before starting over.
const REQUEST_TRIES: u32 = 4;
/// The shortest wait between renewal attempts (RFC 2131 4.4.5).
const RENEW_MIN: Duration = Duration::from_secs(60);

/// One interface's DHCP client.
#[derive(Debug)]
pub struct Client {
    mac: [u8; 6],
    xid: u32,
    state: State,
    tries: u32,
    next: Instant,
}

impl Client {
    /// A client in SELECTING whose first DISCOVER is due at `now`.
    pub fn new(mac: [u8; 6], xid: u32, now: Instant) -> Client {
        Client {
            mac,
            xid,
            state: State::Selecting,
            tries: 0,
            next: now,
        }
    }

    /// When [`Client::tick`] next has something to do.
    pub fn deadline(&self) -> Instant {
        self.next
    }

    /// The lease held, if bound (or renewing it).
    pub fn lease(&self) -> Option<&Lease> {
        match &self.state {
            State::Bound { lease, .. }
            | State::Renewing { lease, .. }
            | State::Rebinding { lease, .. } => Some(lease),
            _ => None,
        }
    }

    fn packet(&self, kind: Kind, ciaddr: Ipv4Addr, options: Vec<(u8, Vec<u8>)>) -> Vec<u8> {
        let mut id = vec![1u8];
        id.extend_from_slice(&self.mac);
        let mut opts = vec![
            (OPT_CLIENT_ID, id),
            (
                OPT_PARAMS,
                vec![
                    OPT_SUBNET,
                    OPT_ROUTER,
                    OPT_DNS,
                    OPT_HOSTNAME,
                    OPT_DOMAIN,
                    OPT_MTU,
                    OPT_LEASE,
                    OPT_SERVER,
                    OPT_T1,
                    OPT_T2,
                ],
            ),
            (OPT_MAX_SIZE, 1500u16.to_be_bytes().to_vec()),
        ];
        opts.extend(options);
        Packet {
            op: BOOTREQUEST,
            xid: self.xid,
            // Unconfigured, the client can only receive broadcast replies.
            broadcast: ciaddr.is_unspecified(),
            ciaddr,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: self.mac,
            kind,
            options: opts,
        }
        .encode()
    }

    fn backoff(&mut self, now: Instant) {
        let d = RETRY_FIRST
            .saturating_mul(1 << self.tries.min(5))
            .min(RETRY_CAP);
        self.tries += 1;
        self.next = now + d;
    }

    fn discover(&mut self, now: Instant) -> Vec<Action> {
        self.state = State::Selecting;
        self.xid = self.xid.wrapping_add(1);
        self.backoff(now);
        vec![Action::Send {
            to: Ipv4Addr::BROADCAST,
            packet: self.packet(Kind::Discover, Ipv4Addr::UNSPECIFIED, vec![]),
        }]
    }

    fn request_offer(&mut self, offer: &Lease, now: Instant) -> Vec<Action> {
        self.backoff(now);
        vec![Action::Send {
            to: Ipv4Addr::BROADCAST,
            packet: self.packet(
                Kind::Request,
                Ipv4Addr::UNSPECIFIED,
                vec![
                    (OPT_REQUESTED, offer.address.addr.octets().to_vec()),
                    (OPT_SERVER, offer.server.octets().to_vec()),
                ],
            ),
        }]
    }

    /// Half the time left to `until`, at least [`RENEW_MIN`] (or `until`).
    fn halfway(now: Instant, until: Instant) -> Instant {
        let left = until.saturating_duration_since(now);
        (now + (left / 2).max(RENEW_MIN)).min(until)
    }

    fn end_of(lease: &Lease, at: Instant, secs: u32) -> Instant {
        if lease.lease == u32::MAX {
            // Forever: nothing to do for a century.
            return at + Duration::from_secs(100 * 365 * 86400);
        }
        at + Duration::from_secs(u64::from(secs))
    }

    /// Timers: retransmissions, renewal, rebinding, expiry.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        if now < self.next {
            return Vec::new();
        }
        match self.state.clone() {
            State::Selecting => {
                // Same transaction on a retransmission.
                self.xid = self.xid.wrapping_sub(1);
                self.discover(now)
            }
            State::Requesting { offer } => {
                if self.tries >= REQUEST_TRIES {
                    self.tries = 0;
                    self.discover(now)
                } else {
                    self.request_offer(&offer, now)
                }
            }
            State::Bound { lease, at }
            | State::Renewing { lease, at }
            | State::Rebinding { lease, at } => {
                let t2 = Self::end_of(&lease, at, lease.rebind);
                let end = Self::end_of(&lease, at, lease.lease);
                if now >= end {
                    let cidr = lease.address;
                    self.tries = 0;
                    let mut out = vec![Action::Deconfigure(cidr)];
                    out.extend(self.discover(now));
                    return out;
                }
                // Renewing: unicast to the server that granted it;
                // rebinding: broadcast to any.
                let (to, state, until) = if now >= t2 {
                    (
                        Ipv4Addr::BROADCAST,
                        State::Rebinding {
                            lease: lease.clone(),
                            at,
                        },
                        end,
                    )
                } else {
                    (
                        lease.server,
                        State::Renewing {
                            lease: lease.clone(),
                            at,
                        },
                        t2,
                    )
                };
                self.state = state;
                self.next = Self::halfway(now, until);
                vec![Action::Send {
                    to,
                    packet: self.packet(Kind::Request, lease.address.addr, vec![]),
                }]
            }
        }
    }

    /// A datagram that arrived on the client's port.
    pub fn receive(&mut self, data: &[u8], now: Instant) -> Vec<Action> {
        let Ok(p) = Packet::decode(data) else {
            return Vec::new();
        };
        if p.xid != self.xid || p.chaddr != self.mac {
            return Vec::new();
        }
        match (self.state.clone(), p.kind) {
            (State::Selecting, Kind::Offer) if !p.yiaddr.is_unspecified() => {
                let offer = lease(&p);
                self.tries = 0;
                self.state = State::Requesting {
                    offer: offer.clone(),
                };
                self.request_offer(&offer, now)
            }
            (State::Requesting { .. }, Kind::Ack)
            | (State::Renewing { .. }, Kind::Ack)
            | (State::Rebinding { .. }, Kind::Ack)
                if !p.yiaddr.is_unspecified() =>
            {
                let new = lease(&p);
                let mut out = Vec::new();
                if let Some(old) = self.lease() {
                    if old.address != new.address {
                        out.push(Action::Deconfigure(old.address));
                    }
                }
                self.tries = 0;
                self.state = State::Bound {
                    lease: new.clone(),
                    at: now,
                };
                self.next = Self::end_of(&new, now, new.renew);
                out.push(Action::Configure(new));
                out
            }
            (State::Requesting { .. }, Kind::Nak)
            | (State::Renewing { .. }, Kind::Nak)
            | (State::Rebinding { .. }, Kind::Nak) => {
                let mut out: Vec<Action> = self
                    .lease()
                    .map(|l| Action::Deconfigure(l.address))
                    .into_iter()
                    .collect();
                self.tries = 0;
                out.extend(self.discover(now));
                out
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

    fn reply(xid: u32, kind: Kind, yiaddr: [u8; 4], options: Vec<(u8, Vec<u8>)>) -> Vec<u8> {
        let mut b = Packet {
            op: BOOTREPLY,
            xid,
            broadcast: true,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: yiaddr.into(),
            chaddr: MAC,
            kind,
            options,
        }
        .encode();
        b[0] = BOOTREPLY;
        b
    }

    /// What slirp sends under restrict=on: address and mask, no router.
    fn full_options() -> Vec<(u8, Vec<u8>)> {
        vec![
            (OPT_SUBNET, vec![255, 255, 255, 0]),
            (OPT_ROUTER, vec![10, 0, 2, 2]),
            (OPT_DNS, vec![10, 0, 2, 3, 1, 1, 1, 1]),
            (OPT_MTU, 1400u16.to_be_bytes().to_vec()),
            (OPT_HOSTNAME, b"web-1\0".to_vec()),
            (OPT_DOMAIN, b"example.internal".to_vec()),
            (OPT_LEASE, 600u32.to_be_bytes().to_vec()),
            (OPT_SERVER, SERVER.octets().to_vec()),
        ]
    }

    fn sent(actions: &[Action]) -> Vec<(Ipv4Addr, Packet)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { to, packet } => {
                    let mut p = packet.clone();
                    p[0] = BOOTREPLY; // decode reads replies
                    Some((*to, Packet::decode(&p).expect("decodes")))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn every_option_of_a_lease() {
        let p = Packet::decode(&reply(1, Kind::Ack, [10, 0, 2, 15], full_options())).unwrap();
        let l = lease(&p);
        assert_eq!(
            l,
            Lease {
                address: Cidr {
                    addr: Ipv4Addr::new(10, 0, 2, 15),
                    prefix: 24
                },
                router: Some(SERVER),
                dns: vec![Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(1, 1, 1, 1)],
                mtu: Some(1400),
                hostname: Some("web-1".into()),
                domain: Some("example.internal".into()),
                server: SERVER,
                lease: 600,
                renew: 300,
                rebind: 525,
            }
        );
        // Explicit T1/T2; no mask: a /32; a silly MTU ignored; a router
        // of 0.0.0.0 is none.
        let p = Packet::decode(&reply(
            1,
            Kind::Ack,
            [10, 128, 0, 5],
            vec![
                (OPT_T1, 100u32.to_be_bytes().to_vec()),
                (OPT_T2, 200u32.to_be_bytes().to_vec()),
                (OPT_LEASE, 1000u32.to_be_bytes().to_vec()),
                (OPT_MTU, 68u16.to_be_bytes().to_vec()),
                (OPT_ROUTER, vec![0, 0, 0, 0]),
            ],
        ))
        .unwrap();
        let l = lease(&p);
        assert_eq!((l.address.prefix, l.renew, l.rebind), (32, 100, 200));
        assert_eq!((l.mtu, l.router, l.hostname), (None, None, None));
        assert!(l.dns.is_empty());
    }

    #[test]
    fn hostile_packets_are_refused() {
        let good = reply(1, Kind::Offer, [10, 0, 2, 15], full_options());
        assert_eq!(Packet::decode(&good[..100]), Err(DecodeError::Short(100)));
        let mut req = good.clone();
        req[0] = BOOTREQUEST;
        assert_eq!(Packet::decode(&req), Err(DecodeError::NotReply));
        let mut nomagic = good.clone();
        nomagic[FIXED] = 0;
        assert_eq!(Packet::decode(&nomagic), Err(DecodeError::NoMagic));
        // An option whose length runs past the datagram.
        let mut cut = good[..FIXED + 4].to_vec();
        cut.extend_from_slice(&[OPT_DNS, 200, 1, 2]);
        assert_eq!(Packet::decode(&cut), Err(DecodeError::Truncated(OPT_DNS)));
        let mut untyped = good[..FIXED + 4].to_vec();
        untyped.push(OPT_END);
        assert_eq!(Packet::decode(&untyped), Err(DecodeError::NoType));
        // A non-UTF-8 hostname is no hostname.
        let p = Packet::decode(&reply(
            1,
            Kind::Ack,
            [1, 2, 3, 4],
            vec![(OPT_HOSTNAME, vec![0xff, 0xfe])],
        ))
        .unwrap();
        assert_eq!(lease(&p).hostname, None);
    }

    #[test]
    fn long_options_split_and_join() {
        let dns: Vec<u8> = (0..=255u8).flat_map(|i| [10, 0, 0, i]).collect();
        let b = reply(1, Kind::Ack, [10, 0, 0, 1], vec![(OPT_DNS, dns.clone())]);
        let p = Packet::decode(&b).unwrap();
        assert_eq!(p.option(OPT_DNS), Some(dns.as_slice()));
        assert_eq!(lease(&p).dns.len(), 256);
    }

    /// DISCOVER, OFFER, REQUEST, ACK; renewal unicast at T1, rebinding
    /// broadcast at T2, and the address dropped at expiry.
    #[test]
    fn a_lease_from_start_to_expiry() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, 41, t0);
        let a = c.tick(t0);
        let s = sent(&a);
        assert_eq!(s.len(), 1);
        let (to, discover) = &s[0];
        assert_eq!(*to, Ipv4Addr::BROADCAST);
        assert_eq!(discover.kind, Kind::Discover);
        assert!(discover.broadcast);
        assert_eq!(discover.chaddr, MAC);
        let xid = discover.xid;
        // A retransmission after a second keeps the transaction.
        assert!(c.tick(t0 + Duration::from_millis(500)).is_empty());
        let again = sent(&c.tick(t0 + Duration::from_secs(1)));
        assert_eq!(again[0].1.xid, xid);
        // Someone else's reply is ignored.
        assert!(c
            .receive(
                &reply(xid + 9, Kind::Offer, [10, 0, 2, 15], full_options()),
                t0
            )
            .is_empty());
        let a = c.receive(&reply(xid, Kind::Offer, [10, 0, 2, 15], full_options()), t0);
        let (_, request) = &sent(&a)[0];
        assert_eq!(request.kind, Kind::Request);
        assert_eq!(request.option(OPT_REQUESTED), Some(&[10u8, 0, 2, 15][..]));
        assert_eq!(request.option(OPT_SERVER), Some(&SERVER.octets()[..]));
        let a = c.receive(&reply(xid, Kind::Ack, [10, 0, 2, 15], full_options()), t0);
        let Action::Configure(l) = &a[0] else {
            panic!("{a:?}")
        };
        assert_eq!(l.address.to_string(), "10.0.2.15/24");
        assert_eq!(c.deadline(), t0 + Duration::from_secs(300));
        // T1: REQUEST unicast to the server, from our address.
        let a = c.tick(t0 + Duration::from_secs(300));
        let (to, renew) = &sent(&a)[0];
        assert_eq!(
            (*to, renew.ciaddr, renew.broadcast),
            (SERVER, l.address.addr, false)
        );
        assert!(renew.option(OPT_REQUESTED).is_none());
        // No answer until T2 (525 s): broadcast.
        let mut now = t0 + Duration::from_secs(300);
        let mut to = SERVER;
        while to == SERVER {
            now = c.deadline();
            to = sent(&c.tick(now))[0].0;
        }
        assert!(now >= t0 + Duration::from_secs(525), "{now:?}");
        assert_eq!(to, Ipv4Addr::BROADCAST);
        // Expiry: the address goes and discovery starts again.
        let a = c.tick(t0 + Duration::from_secs(600));
        assert_eq!(a[0], Action::Deconfigure(l.address));
        assert_eq!(sent(&a)[0].1.kind, Kind::Discover);
        assert!(c.lease().is_none());
    }

    #[test]
    fn renewal_ack_and_nak() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, 7, t0);
        let xid = sent(&c.tick(t0))[0].1.xid;
        c.receive(&reply(xid, Kind::Offer, [10, 0, 2, 15], full_options()), t0);
        c.receive(&reply(xid, Kind::Ack, [10, 0, 2, 15], full_options()), t0);
        let t1 = t0 + Duration::from_secs(300);
        c.tick(t1);
        // Renewed: bound again, next renewal from now.
        let a = c.receive(&reply(xid, Kind::Ack, [10, 0, 2, 15], full_options()), t1);
        assert!(matches!(a[..], [Action::Configure(_)]));
        assert_eq!(c.deadline(), t1 + Duration::from_secs(300));
        // A different address replaces the old one.
        c.tick(t1 + Duration::from_secs(300));
        let a = c.receive(&reply(xid, Kind::Ack, [10, 0, 2, 16], full_options()), t1);
        assert_eq!(
            a[0],
            Action::Deconfigure(Cidr {
                addr: Ipv4Addr::new(10, 0, 2, 15),
                prefix: 24
            })
        );
        // A NAK to a renewal drops the lease and starts over.
        c.tick(t1 + Duration::from_secs(300));
        let a = c.receive(&reply(xid, Kind::Nak, [0, 0, 0, 0], vec![]), t1);
        assert!(matches!(a[0], Action::Deconfigure(_)));
        assert_eq!(sent(&a)[0].1.kind, Kind::Discover);
    }

    /// An offer whose REQUESTs go unanswered is given up for a new DISCOVER.
    #[test]
    fn unanswered_requests_start_over() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, 1, t0);
        let xid = sent(&c.tick(t0))[0].1.xid;
        c.receive(&reply(xid, Kind::Offer, [10, 0, 2, 15], full_options()), t0);
        let mut kinds = Vec::new();
        for _ in 0..5 {
            let now = c.deadline();
            kinds.push(sent(&c.tick(now))[0].1.kind);
        }
        assert_eq!(
            kinds,
            [
                Kind::Request,
                Kind::Request,
                Kind::Request,
                Kind::Discover,
                Kind::Discover
            ]
        );
    }
}
