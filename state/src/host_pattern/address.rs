//! Which IP addresses are not the public internet: the node's own loopback, the link-local
//! range where cloud metadata services answer, private and shared networks, and addresses no
//! single host owns. A name on an allowlist must not be a way into any of them, so a caller
//! that resolves a name refuses these addresses unless a pattern names them (see
//! [`super::reachable_addresses`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The kind of a non-public address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressKind {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// 169.254.0.0/16 (cloud metadata services), fe80::/10.
    LinkLocal,
    /// RFC 1918 (10/8, 172.16/12, 192.168/16), fc00::/7 and the deprecated site-local fec0::/10.
    Private,
    /// 100.64.0.0/10, the carrier-grade NAT range (RFC 6598).
    Shared,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 0.0.0.0/8 ("this network": Linux connects 0.0.0.0 to the local host) and ::.
    Unspecified,
    /// 255.255.255.255.
    Broadcast,
}

impl AddressKind {
    fn describe(self) -> &'static str {
        match self {
            AddressKind::Loopback => "a loopback address",
            AddressKind::LinkLocal => "a link-local address",
            AddressKind::Private => "a private address",
            AddressKind::Shared => "a shared (carrier-grade NAT) address",
            AddressKind::Multicast => "a multicast address",
            AddressKind::Unspecified => "an unspecified address",
            AddressKind::Broadcast => "the broadcast address",
        }
    }
}

/// How an IPv6 address carries an IPv4 one that a dual-stack socket or a NAT64 gateway would
/// reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EmbeddedIpv4 {
    /// `::ffff:a.b.c.d`.
    Mapped(Ipv4Addr),
    /// `::a.b.c.d` (deprecated, still routed by some stacks).
    Compatible(Ipv4Addr),
    /// `64:ff9b::a.b.c.d`, the well-known NAT64 prefix (RFC 6052).
    Nat64(Ipv4Addr),
}

/// Why an address is not public: its kind, and the IPv4 address it embeds when it is an IPv6
/// form of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NonPublicAddress {
    pub kind: AddressKind,
    pub embedded: Option<EmbeddedIpv4>,
}

impl fmt::Display for NonPublicAddress {
    /// "a private address", or "an IPv4-mapped form of 127.0.0.1, a loopback address".
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind.describe();
        match self.embedded {
            None => formatter.write_str(kind),
            Some(EmbeddedIpv4::Mapped(ip)) => write!(formatter, "an IPv4-mapped form of {ip}, {kind}"),
            Some(EmbeddedIpv4::Compatible(ip)) => write!(formatter, "an IPv4-compatible form of {ip}, {kind}"),
            Some(EmbeddedIpv4::Nat64(ip)) => write!(formatter, "a NAT64 form of {ip}, {kind}"),
        }
    }
}

/// `None` for a public address; otherwise what kind of non-public address it is.
pub fn classify(ip: IpAddr) -> Option<NonPublicAddress> {
    match ip {
        IpAddr::V4(ip) => classify_v4(ip).map(|kind| NonPublicAddress { kind, embedded: None }),
        IpAddr::V6(ip) => classify_v6(ip),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<AddressKind> {
    let [first, second, _, _] = ip.octets();
    let kind = match (first, second) {
        _ if ip.is_broadcast() => AddressKind::Broadcast,
        (0, _) => AddressKind::Unspecified,
        (127, _) => AddressKind::Loopback,
        (169, 254) => AddressKind::LinkLocal,
        (10, _) | (192, 168) => AddressKind::Private,
        (172, 16..=31) => AddressKind::Private,
        (100, 64..=127) => AddressKind::Shared,
        (224..=239, _) => AddressKind::Multicast,
        _ => return None,
    };
    Some(kind)
}

fn classify_v6(ip: Ipv6Addr) -> Option<NonPublicAddress> {
    let plain = |kind| Some(NonPublicAddress { kind, embedded: None });
    if ip.is_unspecified() {
        return plain(AddressKind::Unspecified);
    }
    if ip.is_loopback() {
        return plain(AddressKind::Loopback);
    }
    if let Some(embedded) = embedded_ipv4(ip) {
        let (EmbeddedIpv4::Mapped(v4) | EmbeddedIpv4::Compatible(v4) | EmbeddedIpv4::Nat64(v4)) = embedded;
        return classify_v4(v4).map(|kind| NonPublicAddress {
            kind,
            embedded: Some(embedded),
        });
    }
    let first_segment = ip.segments()[0];
    let kind = match first_segment {
        _ if first_segment & 0xffc0 == 0xfe80 => AddressKind::LinkLocal,
        _ if first_segment & 0xffc0 == 0xfec0 => AddressKind::Private,
        _ if first_segment & 0xfe00 == 0xfc00 => AddressKind::Private,
        _ if first_segment & 0xff00 == 0xff00 => AddressKind::Multicast,
        _ => return None,
    };
    plain(kind)
}

/// The IPv4 address an IPv6 address stands for, if it is one of the forms that reach it.
/// `::` and `::1` are not IPv4-compatible forms (they are classified as themselves first).
pub fn embedded_ipv4(ip: Ipv6Addr) -> Option<EmbeddedIpv4> {
    let segments = ip.segments();
    let [high, low] = [segments[6], segments[7]];
    let v4 = Ipv4Addr::from((u32::from(high) << 16) | u32::from(low));
    match segments[..6] {
        [0, 0, 0, 0, 0, 0xffff] => Some(EmbeddedIpv4::Mapped(v4)),
        [0, 0, 0, 0, 0, 0] if !ip.is_unspecified() && !ip.is_loopback() => Some(EmbeddedIpv4::Compatible(v4)),
        [0x64, 0xff9b, 0, 0, 0, 0] => Some(EmbeddedIpv4::Nat64(v4)),
        _ => None,
    }
}
