//! Owns `[server] trusted_proxies` and the resolution of the real client IP from the
//! `X-Forwarded-For` / `Forwarded` headers that those proxies add.
//!
//! The resolved address is what per-IP limits are keyed on, so the rules are strict:
//! - headers are read only when the TCP peer itself is a trusted proxy; an untrusted
//!   peer's headers are ignored entirely (a client cannot dodge its limit by sending one);
//! - the chain is walked right to left (the right end is what our own proxies appended),
//!   skipping trusted hops; the first untrusted address is the client;
//! - when an element cannot be parsed (`unknown`, `_obfuscated`, garbage), or the work
//!   bound below is reached, the walk stops and the *last trusted hop reached* is used
//!   (possibly the peer itself): it is the nearest address we can still vouch for. The
//!   alternative, skipping the bad element, would let whatever sits left of it (possibly
//!   client-written text) become the key.
//! - when every address is trusted, the leftmost one parsed is used.
//!
//! All addresses are returned in canonical form: an IPv4-mapped IPv6 address
//! (`::ffff:1.2.3.4`, as seen on dual-stack listeners) becomes the IPv4 address, so one
//! client always gets one limit key.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hyper::http::header::{HeaderMap, HeaderName, HeaderValue};

/// At most this many header bytes are examined per request (summed over all lines of the
/// header in use, taken from the right end). Real chains are a few hundred bytes; the
/// bound keeps a hostile, huge header from costing more than a fixed amount of work.
pub const MAX_FORWARDED_BYTES: usize = 8 * 1024;

/// At most this many non-empty list elements are examined per request. Reaching the
/// bound ends the walk like an unparsable element does.
pub const MAX_FORWARDED_ELEMENTS: usize = 64;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// The set of networks whose `X-Forwarded-For` / `Forwarded` headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    /// (network, prefix length), network already masked.
    v4: Vec<(u32, u8)>,
    v6: Vec<(u128, u8)>,
}

impl TrustedProxies {
    /// Parses `server.trusted_proxies`: `"10.0.0.0/8"`, `"::1/128"`, or a bare IP meaning
    /// a single host. Every bad entry is reported, each naming its index.
    ///
    /// An entry with host bits set (`"10.0.0.1/8"`) is rejected rather than silently
    /// widened: trusting a whole /8 by a typo would let that range spoof client IPs.
    pub fn parse(entries: &[String]) -> Result<Self, Vec<String>> {
        let mut out = TrustedProxies::default();
        let mut errors = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            match parse_cidr(entry) {
                Ok((IpAddr::V4(net), prefix)) => out.v4.push((u32::from(net), prefix)),
                Ok((IpAddr::V6(net), prefix)) => out.v6.push((u128::from(net), prefix)),
                Err(why) => errors.push(format!("server.trusted_proxies[{i}]: {entry:?} {why}")),
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }

    /// True when no proxy is trusted (then `resolve` always returns the peer).
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Whether `ip` lies in a trusted network. IPv4-mapped IPv6 addresses are checked
    /// as the IPv4 address they carry.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let ip = u32::from(v4);
                self.v4.iter().any(|&(net, prefix)| ip & mask_v4(prefix) == net)
            }
            IpAddr::V6(v6) => {
                let ip = u128::from(v6);
                self.v6.iter().any(|&(net, prefix)| ip & mask_v6(prefix) == net)
            }
        }
    }

    /// The real client address for a connection from `peer` carrying `headers`.
    ///
    /// `X-Forwarded-For` is used when present (all lines, in order); `Forwarded`
    /// (RFC 7239 `for=`) only when there is no `X-Forwarded-For`. So a trusted proxy that
    /// writes only `Forwarded` must strip a client-sent `X-Forwarded-For`.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.contains(peer) {
            return peer;
        }
        let xff = headers.get_all(X_FORWARDED_FOR);
        if xff.iter().next().is_some() {
            self.walk(peer, xff.iter().rev(), List::XForwardedFor)
        } else {
            self.walk(peer, headers.get_all(FORWARDED).iter().rev(), List::Forwarded)
        }
    }

    /// Walks the list right to left; `lines` yields the header lines last first.
    fn walk<'a>(&self, peer: IpAddr, lines: impl Iterator<Item = &'a HeaderValue>, list: List) -> IpAddr {
        // The last trusted hop reached: what we fall back to when the walk must stop.
        let mut current = peer;
        let mut bytes_left = MAX_FORWARDED_BYTES;
        let mut elements_left = MAX_FORWARDED_ELEMENTS;
        for line in lines {
            let bytes = line.as_bytes();
            // Only the right end of an over-long line is looked at: that is the part our
            // proxies wrote. The cut-off leftmost piece is not an element we can trust.
            let (tail, truncated) = if bytes.len() > bytes_left {
                (bytes.split_at(bytes.len() - bytes_left).1, true)
            } else {
                (bytes, false)
            };
            bytes_left -= tail.len();
            let mut elements = RevSplit::new(tail, b',', list == List::Forwarded).peekable();
            while let Some(element) = elements.next() {
                let leftmost = elements.peek().is_none();
                if leftmost && truncated {
                    return current;
                }
                // RFC 9110 §5.6.1: recipients must accept empty list elements.
                if trim_ows(element).is_empty() {
                    continue;
                }
                if elements_left == 0 {
                    return current;
                }
                elements_left -= 1;
                let parsed = match list {
                    List::XForwardedFor => parse_node(trim_ows(element)),
                    List::Forwarded => forwarded_for(element),
                };
                let Some(ip) = parsed else {
                    return current;
                };
                let ip = ip.to_canonical();
                if !self.contains(ip) {
                    return ip;
                }
                current = ip;
            }
            if truncated {
                return current;
            }
        }
        // Every address was trusted (or there were none): the leftmost one parsed.
        current
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum List {
    XForwardedFor,
    Forwarded,
}

fn mask_v4(prefix: u8) -> u32 {
    // checked_shl: a shift by 32 (prefix 0) would overflow.
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_v6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// Parses one `trusted_proxies` entry; the error completes `server.trusted_proxies[i]: "…" `.
fn parse_cidr(entry: &str) -> Result<(IpAddr, u8), String> {
    let (addr_text, prefix_text) = match entry.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (entry, None),
    };
    let addr: IpAddr = addr_text.parse().map_err(|_| {
        format!("is not a valid CIDR ({addr_text:?} is not an IP address; expected e.g. \"10.0.0.0/8\" or \"::1\")")
    })?;
    let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix_text {
        None => max,
        Some(p) => {
            // u8::from_str accepts a leading '+': insist on plain digits.
            let ok = !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit());
            match p.parse::<u8>() {
                Ok(n) if ok && n <= max => n,
                _ => return Err(format!("is not a valid CIDR (prefix must be 0..={max})")),
            }
        }
    };
    let (net, prefix) = match addr {
        IpAddr::V4(v4) => {
            let net = u32::from(v4) & mask_v4(prefix);
            (IpAddr::V4(Ipv4Addr::from(net)), prefix)
        }
        IpAddr::V6(v6) => {
            let net = u128::from(v6) & mask_v6(prefix);
            (IpAddr::V6(Ipv6Addr::from(net)), prefix)
        }
    };
    if net != addr {
        return Err(format!(
            "has host bits set (the network address is \"{net}/{prefix}\"; write that, or a bare IP for one host)"
        ));
    }
    // Addresses are compared in canonical form, so an IPv4-mapped entry must be stored
    // as IPv4 to ever match.
    if let IpAddr::V6(v6) = net {
        if let Some(v4) = v6.to_ipv4_mapped() {
            if prefix >= 96 {
                return Ok((IpAddr::V4(v4), prefix - 96));
            }
        }
    }
    Ok((net, prefix))
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if !is_ows(*first) {
            break;
        }
        s = rest;
    }
    while let [rest @ .., last] = s {
        if !is_ows(*last) {
            break;
        }
        s = rest;
    }
    s
}

/// Splits a `sep`-separated list from the right. With `quotes`, separators inside
/// quoted-strings (RFC 9110 §5.6.4, as used by `Forwarded`) do not split; a quote
/// preceded by an odd number of backslashes is escaped.
struct RevSplit<'a> {
    rest: Option<&'a [u8]>,
    sep: u8,
    quotes: bool,
}

impl<'a> RevSplit<'a> {
    fn new(s: &'a [u8], sep: u8, quotes: bool) -> Self {
        RevSplit {
            rest: Some(s),
            sep,
            quotes,
        }
    }
}

impl<'a> Iterator for RevSplit<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let s = self.rest?;
        let mut in_quotes = false;
        for (i, &b) in s.iter().enumerate().rev() {
            if b == b'"' && self.quotes {
                let (before, _) = s.split_at(i);
                let slashes = before.iter().rev().take_while(|&&c| c == b'\\').count();
                if slashes % 2 == 0 {
                    in_quotes = !in_quotes;
                }
            } else if b == self.sep && !in_quotes {
                let (left, right) = s.split_at(i);
                self.rest = Some(left);
                return Some(right.get(1..).unwrap_or_default());
            }
        }
        self.rest = None;
        Some(s)
    }
}

/// The `for=` node of one `Forwarded` element, if it names a usable IP address.
/// An element without exactly one `for=` is unusable.
fn forwarded_for(element: &[u8]) -> Option<IpAddr> {
    let mut found: Option<&[u8]> = None;
    // Pairs are `;`-separated; split from the right with the same quote rules.
    for pair in RevSplit::new(element, b';', true) {
        let pair = trim_ows(pair);
        if pair.is_empty() {
            continue;
        }
        let eq = pair.iter().position(|&b| b == b'=')?;
        let (name, value) = pair.split_at(eq);
        if trim_ows(name).eq_ignore_ascii_case(b"for") {
            if found.is_some() {
                return None;
            }
            found = Some(trim_ows(value.get(1..).unwrap_or_default()));
        }
    }
    let value = found?;
    let node = match value {
        [b'"', inner @ .., b'"'] => {
            // A node never needs escapes; refusing them keeps the parser trivial.
            if inner.iter().any(|&b| b == b'"' || b == b'\\') {
                return None;
            }
            inner
        }
        _ => value,
    };
    parse_node(node)
}

/// Parses a node as proxies write it: `1.2.3.4`, `2001:db8::1`, `[2001:db8::1]`,
/// `[2001:db8::1]:4711`, `1.2.3.4:80` (a port, numeric or `_obfuscated`, is ignored).
/// `unknown` and `_obfuscated` identifiers name no address and give `None`.
fn parse_node(node: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(node).ok()?;
    if s.eq_ignore_ascii_case("unknown") || s.starts_with('_') {
        return None;
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        let ip: Ipv6Addr = inner.parse().ok()?;
        if !after.is_empty() && !valid_port(after.strip_prefix(':')?) {
            return None;
        }
        return Some(IpAddr::V6(ip));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    let (host, port) = s.rsplit_once(':')?;
    let ip: Ipv4Addr = host.parse().ok()?;
    valid_port(port).then_some(IpAddr::V4(ip))
}

/// RFC 7239 §6: `node-port = port / obfport`.
fn valid_port(port: &str) -> bool {
    let b = port.as_bytes();
    match b {
        [b'_', rest @ ..] => {
            !rest.is_empty()
                && rest
                    .iter()
                    .all(|&c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-')
        }
        _ => !b.is_empty() && b.len() <= 5 && b.iter().all(u8::is_ascii_digit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn trusted() -> TrustedProxies {
        TrustedProxies::parse(&[
            "10.0.0.0/8".to_string(),
            "127.0.0.1/32".to_string(),
            "::1/128".to_string(),
            "fd00::/8".to_string(),
        ])
        .expect("valid config")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test ip")
    }

    fn headers(name: &str, lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(l).expect("value"),
            );
        }
        h
    }

    #[test]
    fn parse_accepts_cidrs_and_bare_ips() {
        let t = TrustedProxies::parse(&[
            "10.0.0.0/8".into(),
            "192.168.1.7".into(),
            "::1".into(),
            "2001:db8::/32".into(),
            "0.0.0.0/0".into(),
            "::ffff:172.16.0.0/108".into(),
        ])
        .expect("valid");
        assert!(!t.is_empty());
        assert!(t.contains(ip("10.1.2.3")));
        assert!(t.contains(ip("192.168.1.7")));
        assert!(t.contains(ip("::1")));
        assert!(t.contains(ip("2001:db8:ffff::1")));
        assert!(!t.contains(ip("2001:db9::1")));
        assert!(t.contains(ip("8.8.8.8")), "0.0.0.0/0 covers all IPv4");
        assert!(TrustedProxies::parse(&[]).expect("empty ok").is_empty());
    }

    #[test]
    fn parse_errors_name_the_entry() {
        let err = TrustedProxies::parse(&[
            "10.0.0.0/8".into(),
            "127.0.0.1/32".into(),
            "10.0.0.0/33".into(),
            "::1/129".into(),
            "banana".into(),
            "10.0.0.1/8".into(),
            "10.0.0.0/+8".into(),
            "10.0.0.0/".into(),
            " 10.0.0.0/8".into(),
        ])
        .expect_err("invalid");
        assert_eq!(err.len(), 7, "{err:#?}");
        assert_eq!(
            err[0],
            "server.trusted_proxies[2]: \"10.0.0.0/33\" is not a valid CIDR (prefix must be 0..=32)"
        );
        assert!(err[1].starts_with("server.trusted_proxies[3]: \"::1/129\""));
        assert!(err[1].contains("0..=128"));
        assert!(err[2].starts_with("server.trusted_proxies[4]: \"banana\" is not a valid CIDR"));
        assert!(err[3].contains("host bits") && err[3].contains("10.0.0.0/8"));
        assert!(err[4].starts_with("server.trusted_proxies[6]"));
        assert!(err[5].starts_with("server.trusted_proxies[7]"));
        assert!(err[6].starts_with("server.trusted_proxies[8]"));
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4() {
        let t = trusted();
        assert!(t.contains(ip("::ffff:10.1.2.3")));
        assert!(t.contains(ip("::ffff:127.0.0.1")));
        assert!(!t.contains(ip("::ffff:11.0.0.1")));
        // The resolved address is canonical too.
        assert_eq!(t.resolve(ip("::ffff:8.8.8.8"), &HeaderMap::new()), ip("8.8.8.8"));
        let h = headers("x-forwarded-for", &["::ffff:9.9.9.9"]);
        assert_eq!(t.resolve(ip("::ffff:10.0.0.1"), &h), ip("9.9.9.9"));
    }

    #[test]
    fn masks_at_the_edges() {
        assert_eq!(mask_v4(0), 0);
        assert_eq!(mask_v4(32), u32::MAX);
        assert_eq!(mask_v6(0), 0);
        assert_eq!(mask_v6(128), u128::MAX);
        assert_eq!(mask_v4(8), 0xff00_0000);
    }

    #[test]
    fn resolve_table() {
        let t = trusted();
        // (peer, header name, lines, expected)
        let cases: &[(&str, &str, &[&str], &str)] = &[
            // Untrusted peer: headers ignored entirely.
            ("203.0.113.9", "x-forwarded-for", &["1.1.1.1"], "203.0.113.9"),
            ("203.0.113.9", "forwarded", &["for=1.1.1.1"], "203.0.113.9"),
            // Trusted peer, no header.
            ("10.0.0.1", "x-other", &["x"], "10.0.0.1"),
            // Simple chain.
            ("10.0.0.1", "x-forwarded-for", &["1.1.1.1"], "1.1.1.1"),
            // Rightmost untrusted wins; a spoofed left part is ignored.
            ("10.0.0.1", "x-forwarded-for", &["6.6.6.6, 1.1.1.1"], "1.1.1.1"),
            // Trusted hops are skipped.
            (
                "10.0.0.1",
                "x-forwarded-for",
                &["6.6.6.6, 1.1.1.1, 10.0.0.2, 127.0.0.1"],
                "1.1.1.1",
            ),
            // Several lines are one list, in order.
            (
                "10.0.0.1",
                "x-forwarded-for",
                &["6.6.6.6, 1.1.1.1", "10.0.0.2"],
                "1.1.1.1",
            ),
            (
                "10.0.0.1",
                "x-forwarded-for",
                &["6.6.6.6", "1.1.1.1, 10.0.0.2"],
                "1.1.1.1",
            ),
            // All trusted: leftmost parsed.
            ("10.0.0.1", "x-forwarded-for", &["10.0.0.3, 10.0.0.2"], "10.0.0.3"),
            // Unparsable element: stop at the last trusted hop reached.
            (
                "10.0.0.1",
                "x-forwarded-for",
                &["1.1.1.1, garbage, 10.0.0.2"],
                "10.0.0.2",
            ),
            ("10.0.0.1", "x-forwarded-for", &["1.1.1.1, unknown"], "10.0.0.1"),
            ("10.0.0.1", "x-forwarded-for", &["1.1.1.1, 01.2.3.4"], "10.0.0.1"),
            // Empty elements are skipped.
            (
                "10.0.0.1",
                "x-forwarded-for",
                &["1.1.1.1, ,  ,10.0.0.2"],
                "1.1.1.1",
            ),
            ("10.0.0.1", "x-forwarded-for", &[""], "10.0.0.1"),
            // IPv6, bracketed, with ports.
            ("::1", "x-forwarded-for", &["2001:db8::1"], "2001:db8::1"),
            ("::1", "x-forwarded-for", &["[2001:db8::1]:4711"], "2001:db8::1"),
            ("::1", "x-forwarded-for", &["1.2.3.4:80"], "1.2.3.4"),
            ("::1", "x-forwarded-for", &["[2001:db8::1]x"], "::1"),
            ("::1", "x-forwarded-for", &["1.2.3.4:123456"], "::1"),
            // Forwarded: used only without X-Forwarded-For.
            ("10.0.0.1", "forwarded", &["for=1.1.1.1"], "1.1.1.1"),
            (
                "10.0.0.1",
                "forwarded",
                &["for=192.0.2.60;proto=http;by=203.0.113.43"],
                "192.0.2.60",
            ),
            (
                "10.0.0.1",
                "forwarded",
                &["For=\"[2001:db8:cafe::17]:4711\""],
                "2001:db8:cafe::17",
            ),
            ("10.0.0.1", "forwarded", &["for=\"1.2.3.4:80\""], "1.2.3.4"),
            (
                "10.0.0.1",
                "forwarded",
                &["for=6.6.6.6, for=1.1.1.1;proto=https, for=10.0.0.5"],
                "1.1.1.1",
            ),
            (
                "10.0.0.1",
                "forwarded",
                &["for=1.1.1.1", "for=10.0.0.5"],
                "1.1.1.1",
            ),
            ("10.0.0.1", "forwarded", &["for=1.1.1.1, for=unknown"], "10.0.0.1"),
            ("10.0.0.1", "forwarded", &["for=1.1.1.1, for=_hidden"], "10.0.0.1"),
            (
                "10.0.0.1",
                "forwarded",
                &["for=1.1.1.1, for=10.0.0.7, for=\"_x:_y\""],
                "10.0.0.1",
            ),
            // An element without `for=` names no address: stop.
            (
                "10.0.0.1",
                "forwarded",
                &["for=1.1.1.1, for=10.0.0.7, by=1.2.3.4"],
                "10.0.0.1",
            ),
            (
                "10.0.0.1",
                "forwarded",
                &["for=1.1.1.1, by=1.2.3.4;for=10.0.0.7"],
                "1.1.1.1",
            ),
            ("10.0.0.1", "forwarded", &["for=1.1.1.1;for=2.2.2.2"], "10.0.0.1"),
            ("10.0.0.1", "forwarded", &["for=\"1.1.1.1"], "10.0.0.1"),
            // A quoted comma does not split an element.
            (
                "10.0.0.1",
                "forwarded",
                &["for=9.9.9.9;ext=\"a, for=6.6.6.6\""],
                "9.9.9.9",
            ),
            (
                "10.0.0.1",
                "forwarded",
                &["for=9.9.9.9;ext=\"a;for=6.6.6.6\""],
                "9.9.9.9",
            ),
        ];
        for (peer, name, lines, want) in cases {
            let h = headers(name, lines);
            assert_eq!(t.resolve(ip(peer), &h), ip(want), "peer {peer} {name}: {lines:?}");
        }
    }

    #[test]
    fn x_forwarded_for_takes_precedence_over_forwarded() {
        let t = trusted();
        let mut h = headers("forwarded", &["for=2.2.2.2"]);
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        assert_eq!(t.resolve(ip("10.0.0.1"), &h), ip("1.1.1.1"));
    }

    #[test]
    fn work_is_bounded() {
        let t = trusted();
        // A huge client-written prefix does not hide what our proxy appended on the right.
        let line = format!("{}, 1.1.1.1", "6.6.6.6, ".repeat(10_000));
        assert_eq!(
            t.resolve(ip("10.0.0.1"), &headers("x-forwarded-for", &[&line])),
            ip("1.1.1.1")
        );
        // More trusted hops than the element bound: stop at the last one examined.
        let many: Vec<String> = (0..100).map(|i| format!("10.0.1.{i}")).collect();
        let line = format!("1.1.1.1, {}", many.join(", "));
        assert_eq!(
            t.resolve(ip("10.0.0.1"), &headers("x-forwarded-for", &[&line])),
            ip(&format!("10.0.1.{}", 100 - MAX_FORWARDED_ELEMENTS))
        );
        // Past the byte bound, the cut-off leftmost element is not used.
        let long = format!("1.1.1.1,{}, 10.0.0.9", " ".repeat(MAX_FORWARDED_BYTES));
        assert_eq!(
            t.resolve(ip("10.0.0.1"), &headers("x-forwarded-for", &[&long])),
            ip("10.0.0.9")
        );
        // Byte budget spans lines: the earlier line is then cut.
        let filler = " ".repeat(MAX_FORWARDED_BYTES - 8 - 5);
        let second = format!("{filler}10.0.0.9");
        assert_eq!(
            t.resolve(ip("10.0.0.1"), &headers("x-forwarded-for", &["1.1.1.1", &second])),
            ip("10.0.0.9")
        );
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(n))),
            // Bias towards trusted ranges so chains have trusted hops.
            any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (n & 0x00ff_ffff)))),
            any::<u128>().prop_map(|n| IpAddr::V6(Ipv6Addr::from(n))),
            Just(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_headers_never_panic(
            peer in arb_ip(),
            xff in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..4),
            fwd in proptest::collection::vec(
                proptest::collection::vec(
                    prop_oneof![Just(b'"'), Just(b','), Just(b';'), Just(b'\\'), Just(b'['), Just(b']'), Just(b':'), Just(b'='), any::<u8>()],
                    0..300),
                0..4),
        ) {
            let t = trusted();
            let mut h = HeaderMap::new();
            for line in &xff {
                if let Ok(v) = HeaderValue::from_bytes(line) { h.append(X_FORWARDED_FOR, v); }
            }
            let mut f = HeaderMap::new();
            for line in &fwd {
                if let Ok(v) = HeaderValue::from_bytes(line) { f.append(FORWARDED, v); }
            }
            for map in [&h, &f] {
                let got = t.resolve(peer, map);
                if !t.contains(peer) {
                    prop_assert_eq!(got, peer.to_canonical());
                }
                prop_assert!(got == got.to_canonical());
            }
        }

        #[test]
        fn untrusted_peer_always_resolves_to_peer(
            peer in any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(n))).prop_filter("untrusted", |p| !trusted().contains(*p)),
            line in "[0-9a-f.:, \\[\\]]{0,200}",
        ) {
            let t = trusted();
            let mut h = headers("x-forwarded-for", &[&line]);
            if let Ok(v) = HeaderValue::from_str(&format!("for={line}")) { h.append(FORWARDED, v); }
            prop_assert_eq!(t.resolve(peer, &h), peer);
        }

        /// Against a model: the rightmost untrusted address of a well-formed chain wins.
        #[test]
        fn well_formed_chain_matches_model(chain in proptest::collection::vec(arb_ip(), 1..20)) {
            let t = trusted();
            let line = chain.iter().map(|ip| ip.to_string()).collect::<Vec<_>>().join(", ");
            let h = headers("x-forwarded-for", &[&line]);
            let want = chain
                .iter()
                .rev()
                .map(|ip| ip.to_canonical())
                .find(|ip| !t.contains(*ip))
                .unwrap_or_else(|| chain[0].to_canonical());
            prop_assert_eq!(t.resolve(ip("127.0.0.1"), &h), want);
            let fwd = chain
                .iter()
                .map(|ip| match ip { IpAddr::V6(v6) => format!("for=\"[{v6}]\""), IpAddr::V4(v4) => format!("for={v4}") })
                .collect::<Vec<_>>()
                .join(", ");
            let h = headers("forwarded", &[&fwd]);
            prop_assert_eq!(t.resolve(ip("127.0.0.1"), &h), want);
        }
    }
}
