//! The `by-client` answer policy: which group of `[[dns.clients]]` a client falls in, and how
//! wide a network that answer holds for (the ECS scope, RFC 7871 §7.2.1). No I/O.

use std::net::IpAddr;

use ipnet::IpNet;
use portcullis_config::file::ClientGroup;

/// Group 0 is the default (clients in no listed network); group `i + 1` is `[[dns.clients]]` i.
pub type Group = usize;

/// An address or network as 128 bits, IPv4 in the top 32, with its family's width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bits {
    v6: bool,
    value: u128,
    prefix: u8,
}

impl Bits {
    fn of(ip: IpAddr, prefix: u8) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Bits {
                v6: false,
                value: u128::from(u32::from(v4)) << 96,
                prefix: prefix.min(32),
            },
            IpAddr::V6(v6) => Bits {
                v6: true,
                value: u128::from(v6),
                prefix: prefix.min(128),
            },
        }
    }

    fn width(v6: bool) -> u8 {
        if v6 { 128 } else { 32 }
    }

    /// Leading bits `self` and `other` share.
    fn common(&self, other: &Bits) -> u8 {
        (self.value ^ other.value).leading_zeros().min(128) as u8
    }
}

#[derive(Debug, Default, Clone)]
pub struct ClientTable {
    /// Networks (normalized) and their group, most specific first.
    networks: Vec<(Bits, Group)>,
}

impl ClientTable {
    pub fn new(groups: &[ClientGroup]) -> Self {
        let mut networks: Vec<(Bits, Group)> = groups
            .iter()
            .enumerate()
            .flat_map(|(i, g)| {
                g.networks.iter().map(move |n: &IpNet| {
                    let n = n.trunc();
                    (Bits::of(n.addr(), n.prefix_len()), i + 1)
                })
            })
            .collect();
        networks.sort_by_key(|n| std::cmp::Reverse(n.0.prefix));
        ClientTable { networks }
    }

    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    /// The group of a client known by its full address.
    pub fn group_of(&self, ip: IpAddr) -> Group {
        let client = Bits::of(ip, 128);
        self.networks
            .iter()
            .find(|(n, _)| n.v6 == client.v6 && client.common(n) >= n.prefix)
            .map_or(0, |(_, g)| *g)
    }

    /// The group for a client known only by its first `source` bits (ECS), and the scope: the
    /// shortest prefix of the client's address all of whose addresses get the same answer.
    pub fn classify(&self, ip: IpAddr, source: u8) -> (Group, u8) {
        let width = Bits::width(!matches!(ip.to_canonical(), IpAddr::V4(_)));
        let client = Bits::of(ip, source);
        let source = client.prefix;
        // Only networks no longer than the source prefix can be known to contain the client.
        let matched = self
            .networks
            .iter()
            .find(|(n, _)| n.v6 == client.v6 && n.prefix <= source && client.common(n) >= n.prefix);
        let (group, mut scope) = match matched {
            Some((n, g)) => (*g, n.prefix),
            None => (0, 0),
        };
        for (other, other_group) in &self.networks {
            if other.v6 != client.v6 || *other_group == group || other.prefix <= scope {
                continue;
            }
            // A more specific network with another answer: narrow the scope until it is outside.
            let common = client.common(other).min(width);
            let needed = if common >= other.prefix {
                source
            } else {
                common + 1
            };
            scope = scope.max(needed.min(source));
        }
        (group, scope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(groups: &[&[&str]]) -> ClientTable {
        let groups: Vec<ClientGroup> = groups
            .iter()
            .map(|nets| ClientGroup {
                networks: nets.iter().map(|n| n.parse().expect("network")).collect(),
                nodes: Vec::new(),
                addresses: Vec::new(),
            })
            .collect();
        ClientTable::new(&groups)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn longest_match_wins() {
        let t = table(&[&["10.0.0.0/8"], &["10.1.0.0/16", "2001:db8::/32"]]);
        assert_eq!(t.group_of(ip("10.2.3.4")), 1);
        assert_eq!(t.group_of(ip("10.1.3.4")), 2);
        assert_eq!(t.group_of(ip("2001:db8::1")), 2);
        assert_eq!(t.group_of(ip("192.0.2.1")), 0);
        assert_eq!(t.group_of(ip("::ffff:10.1.0.1")), 2);
    }

    #[test]
    fn scope_is_as_wide_as_the_answer_holds() {
        let t = table(&[&["10.0.0.0/8"], &["10.1.0.0/16"]]);
        // 10.2.3.0/24 is in the /8, but the /8 holds a /16 with another answer: the answer
        // holds for 10.0.0.0/15 (10.0 and 10.1 differ at bit 16, so /15 would include 10.1).
        assert_eq!(t.classify(ip("10.2.3.0"), 24), (1, 15));
        assert_eq!(t.classify(ip("10.1.3.0"), 24), (2, 16));
        assert_eq!(t.classify(ip("10.200.0.0"), 24), (1, 9));
        // Outside every network: the default group, scoped to leave the networks out.
        assert_eq!(t.classify(ip("192.0.2.0"), 24), (0, 1));
        assert_eq!(t.classify(ip("11.0.0.0"), 24), (0, 8));
        // A source shorter than the most specific network: only the /8 is known to contain
        // the client, and the answer holds for no more than what the client sent.
        assert_eq!(t.classify(ip("10.0.0.0"), 12), (1, 12));
        // Source 0 (the client opted out): default group, scope 0 only when nothing differs.
        assert_eq!(t.classify(ip("0.0.0.0"), 0), (0, 0));
        assert_eq!(table(&[]).classify(ip("192.0.2.0"), 24), (0, 0));
    }

    #[test]
    fn networks_of_the_same_group_do_not_narrow_the_scope() {
        let t = table(&[&["10.0.0.0/8", "10.1.0.0/16"]]);
        assert_eq!(t.classify(ip("10.2.0.0"), 24), (1, 8));
        let v6 = table(&[&["2001:db8::/32"]]);
        assert_eq!(v6.classify(ip("2001:db8:1::"), 48), (1, 32));
        assert_eq!(v6.classify(ip("10.0.0.0"), 24), (0, 0));
    }
}
