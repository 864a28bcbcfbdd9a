//! The SSRF guard: which resolved addresses a host-side connection may reach.
//!
//! It judges the address a connection is about to use, after DNS, so a name that
//! resolves (or rebinds) to loopback is refused like the literal. Loopback, private,
//! link-local (cloud metadata lives there), unspecified and other special ranges are
//! refused unless the configuration allows a range explicitly.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address range, `10.0.0.0/8` or `::1/128` (a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: not an IP address or CIDR range"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: prefix must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Which addresses may be reached: public ones, plus the ranges allowed explicitly.
#[derive(Debug, Clone, Default)]
pub struct AddressGuard {
    allowed: Vec<Cidr>,
}

impl AddressGuard {
    pub fn new(allowed: Vec<Cidr>) -> AddressGuard {
        AddressGuard { allowed }
    }

    /// `Err` names the class of a refused address.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        if self.allowed.iter().any(|c| c.contains(ip)) {
            return Ok(());
        }
        match special(ip) {
            None => Ok(()),
            Some(class) => Err(format!(
                "{ip} is a {class} address (allow it in ironvmm.toml to reach it)"
            )),
        }
    }
}

/// The class of a non-public address, or None for a public one.
fn special(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => special_v4(a),
        IpAddr::V6(a) => {
            // Addresses that carry an IPv4 address are judged by it.
            if let Some(v4) = a.to_ipv4_mapped() {
                return special_v4(v4).or(None);
            }
            let seg = a.segments();
            if seg[0] == 0x64 && seg[1] == 0xff9b {
                // NAT64 (64:ff9b::/96): the embedded IPv4 address is reached.
                let [.., a, b, c, d] = a.octets();
                return special_v4(Ipv4Addr::new(a, b, c, d));
            }
            if seg[0] == 0x2002 {
                // 6to4: the relay reaches the embedded IPv4 address.
                let o = a.octets();
                return special_v4(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
            }
            special_v6(a)
        }
    }
}

fn special_v4(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    Some(match o {
        [127, ..] => "loopback",
        [0, ..] => "unspecified (0.0.0.0/8)",
        [10, ..] => "private",
        [172, b, ..] if (16..32).contains(&b) => "private",
        [192, 168, ..] => "private",
        [169, 254, ..] => "link-local (cloud metadata)",
        [100, b, ..] if (64..128).contains(&b) => "shared (CGNAT, some cloud metadata)",
        [192, 0, 0, _] => "IETF protocol assignment",
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => "documentation",
        [198, b, ..] if b == 18 || b == 19 => "benchmarking",
        [a, ..] if a >= 224 => "multicast, reserved or broadcast",
        _ => return None,
    })
}

fn special_v6(a: Ipv6Addr) -> Option<&'static str> {
    let seg = a.segments();
    Some(if a.is_loopback() {
        "loopback"
    } else if a.is_unspecified() {
        "unspecified"
    } else if seg[0] & 0xfe00 == 0xfc00 {
        "unique local (private, cloud metadata)"
    } else if seg[0] & 0xffc0 == 0xfe80 || seg[0] & 0xffc0 == 0xfec0 {
        "link-local"
    } else if seg[0] & 0xff00 == 0xff00 {
        "multicast"
    } else if seg[..6] == [0, 0, 0, 0, 0, 0] {
        // IPv4-compatible (deprecated), e.g. ::127.0.0.1.
        "IPv4-compatible"
    } else if seg[0] == 0x2001 && seg[1] == 0x0db8 {
        "documentation"
    } else if seg[0] == 0x0100 && seg[1..4] == [0, 0, 0] {
        "discard"
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(g: &AddressGuard, s: &str) -> bool {
        g.check(s.parse().unwrap()).is_err()
    }

    #[test]
    fn special_ranges_are_refused() {
        let g = AddressGuard::default();
        for a in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "::127.0.0.1",
        ] {
            assert!(refused(&g, a), "{a} passed");
        }
        for a in ["1.1.1.1", "172.32.0.1", "93.184.216.34", "2606:4700::1111"] {
            assert!(!refused(&g, a), "{a} refused");
        }
    }

    #[test]
    fn allowed_ranges_open_exactly_themselves() {
        let g = AddressGuard::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(!refused(&g, "127.0.0.1"));
        assert!(refused(&g, "::1"));
        assert!(refused(&g, "10.0.0.1"));
        let e = g.check("10.0.0.1".parse().unwrap()).unwrap_err();
        assert!(e.contains("private"), "{e}");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
        assert!("0.0.0.0/0"
            .parse::<Cidr>()
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
    }
}
