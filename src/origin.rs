//! Owns `[server] allowed_origins`: the Origin allowlist checked on every WebSocket
//! handshake, the defence against cross-site WebSocket hijacking (a page on another site
//! opening a socket that rides on the user's cookies).
//!
//! Rules:
//! - list omitted: any origin is allowed; list present (even empty): only listed origins;
//! - no `Origin` header: allowed. Browsers always send one on a WebSocket handshake, so
//!   a request without it comes from a non-browser client, which could forge any Origin
//!   anyway; the allowlist only protects browser users;
//! - exact match on scheme, host and port after lowercasing. An explicit default port
//!   equals the implicit one (`https://a.com:443` == `https://a.com`, `http` 80, also
//!   `ws`/`wss`), since browsers omit it and config writers sometimes don't;
//! - `scheme://*.example.com` matches any subdomain at any depth, never `example.com`
//!   itself and never a mere suffix (`evilexample.com`); scheme and port must match too;
//! - `Origin: null` (sandboxed iframes, `file:` pages, some redirects: anyone can produce
//!   it) and anything that does not parse as `scheme://host[:port]` are rejected when a
//!   list is configured. The `null` origin cannot be put on the list.

use std::net::Ipv6Addr;

use hyper::http::HeaderValue;

/// Longer values are refused outright: a real origin (host ≤ 253 bytes) is far shorter.
const MAX_ORIGIN_LEN: usize = 1024;

/// The Origin allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPolicy {
    /// `None`: any origin is allowed.
    allowed: Option<Vec<Pattern>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    scheme: String,
    host: HostPattern,
    /// Explicit port, or the scheme's default; `None` for an unknown scheme without one.
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.example.com`, stored as `example.com`.
    Subdomains(String),
}

/// A parsed, lowercased origin (from the config or a header).
struct Parsed {
    scheme: String,
    host: HostPattern,
    host_is_ip: bool,
    port: Option<u16>,
}

impl OriginPolicy {
    /// A policy that allows every origin (the default when the key is omitted).
    pub fn allow_any() -> Self {
        OriginPolicy { allowed: None }
    }

    /// Parses `server.allowed_origins` (`None` when the key is omitted). Every bad entry
    /// is reported, naming `server.allowed_origins[i]` and what is wrong with it.
    pub fn parse(entries: Option<&[String]>) -> Result<Self, Vec<String>> {
        let Some(entries) = entries else {
            return Ok(Self::allow_any());
        };
        let mut patterns = Vec::with_capacity(entries.len());
        let mut errors = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            match parse_origin(entry, true) {
                Ok(p) => patterns.push(Pattern {
                    scheme: p.scheme,
                    host: p.host,
                    port: p.port,
                }),
                Err(why) => errors.push(format!("server.allowed_origins[{i}]: {entry:?} {why}")),
            }
        }
        if errors.is_empty() {
            Ok(OriginPolicy {
                allowed: Some(patterns),
            })
        } else {
            Err(errors)
        }
    }

    /// True when no list is configured.
    pub fn allows_any(&self) -> bool {
        self.allowed.is_none()
    }

    /// Whether a handshake with this `Origin` header (the caller passes
    /// `headers.get(ORIGIN)`) may proceed.
    pub fn allows(&self, origin: Option<&HeaderValue>) -> bool {
        let Some(allowed) = &self.allowed else {
            return true;
        };
        let Some(origin) = origin else {
            return true;
        };
        // to_str fails on obs-text (non-ASCII) bytes: such a value is no origin.
        let Ok(text) = origin.to_str() else {
            return false;
        };
        let Ok(o) = parse_origin(text, false) else {
            return false;
        };
        let HostPattern::Exact(host) = &o.host else {
            return false; // unreachable: headers are parsed without wildcards
        };
        allowed.iter().any(|p| {
            p.scheme == o.scheme
                && p.port == o.port
                && match &p.host {
                    HostPattern::Exact(h) => h == host,
                    HostPattern::Subdomains(suffix) => {
                        !o.host_is_ip
                            && host
                                .strip_suffix(suffix.as_str())
                                .and_then(|rest| rest.strip_suffix('.'))
                                // The host was validated label by label, so a
                                // non-empty rest is one or more whole labels.
                                .is_some_and(|labels| !labels.is_empty())
                    }
                }
        })
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// Parses `scheme://host[:port]`. The error text completes `key: "value" `.
fn parse_origin(s: &str, config: bool) -> Result<Parsed, String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.len() > MAX_ORIGIN_LEN {
        return Err(format!("is longer than {MAX_ORIGIN_LEN} bytes"));
    }
    if !s.is_ascii() {
        return Err("contains non-ASCII characters (write an internationalized host name in its punycode \"xn--\" form, as browsers send it)".into());
    }
    if s.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err("contains whitespace or control characters".into());
    }
    if s.eq_ignore_ascii_case("null") {
        return Err("is the opaque \"null\" origin, which any page can produce (sandboxed iframes, file: pages); it cannot be allowed".into());
    }
    if s == "*" {
        return Err("is a bare wildcard; to allow any origin, omit server.allowed_origins".into());
    }
    let Some((scheme, rest)) = s.split_once("://") else {
        return Err("has no scheme (expected scheme://host[:port], e.g. \"https://app.example.com\")".into());
    };
    let scheme = scheme.to_ascii_lowercase();
    let scheme_ok = scheme.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.');
    if !scheme_ok {
        return Err(format!("has an invalid scheme {scheme:?}"));
    }
    if rest
        .strip_suffix('/')
        .is_some_and(|authority| !authority.contains(['/', '?', '#']))
    {
        return Err("ends with '/': an origin has no path, remove the trailing slash".into());
    }
    if rest.contains(['/', '?', '#']) {
        return Err("has a path, query or fragment; an origin is only scheme://host[:port]".into());
    }
    if rest.contains('@') {
        return Err("has user info ('@'); an origin is only scheme://host[:port]".into());
    }
    // Split host and port; an IPv6 literal is bracketed and contains colons.
    let (host, port) = if let Some(after_bracket) = rest.strip_prefix('[') {
        let Some((inner, after)) = after_bracket.split_once(']') else {
            return Err("has an unterminated IPv6 literal ('[' without ']')".into());
        };
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(p) => Some(p),
                None => return Err("has text after the IPv6 literal that is not a :port".into()),
            },
        };
        let Ok(ip) = inner.parse::<Ipv6Addr>() else {
            return Err(format!("has an invalid IPv6 literal {inner:?}"));
        };
        // Ipv6Addr's Display is the canonical compressed form, as browsers serialize it.
        (format!("[{ip}]"), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_ascii_lowercase(), Some(p)),
            None => (rest.to_ascii_lowercase(), None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => {
            let n = if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) {
                p.parse::<u16>().ok().filter(|&n| n != 0)
            } else {
                None
            };
            match n {
                Some(n) => Some(n),
                None => return Err(format!("has an invalid port {p:?} (must be 1..=65535)")),
            }
        }
    };
    let port = port.or_else(|| default_port(&scheme));
    if host.is_empty() {
        return Err("has no host".into());
    }
    let host_is_ip = host.starts_with('[') || host.parse::<std::net::Ipv4Addr>().is_ok();
    let host = if host_is_ip {
        HostPattern::Exact(host)
    } else if let Some(suffix) = host.strip_prefix("*.") {
        if !config {
            return Err("has a wildcard host".into());
        }
        if suffix.contains('*') {
            return Err(wildcard_misplaced());
        }
        check_dns_name(suffix)?;
        HostPattern::Subdomains(suffix.to_string())
    } else {
        if host.contains('*') {
            return Err(wildcard_misplaced());
        }
        check_dns_name(&host)?;
        HostPattern::Exact(host)
    };
    Ok(Parsed {
        scheme,
        host,
        host_is_ip,
        port,
    })
}

fn wildcard_misplaced() -> String {
    "has a wildcard that is not the whole first label of the host (only the form \"https://*.example.com\" is supported)".into()
}

/// Lowercase LDH labels (underscore tolerated, as some internal names use it), no empty
/// labels: so no trailing dot and no `a..b`, which could confuse suffix matching.
fn check_dns_name(host: &str) -> Result<(), String> {
    let ok = host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("has an invalid host name {host:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(entries: &[&str]) -> OriginPolicy {
        let v: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        OriginPolicy::parse(Some(&v)).expect("valid config")
    }

    fn allows(p: &OriginPolicy, origin: Option<&str>) -> bool {
        let v = origin.map(|o| HeaderValue::from_str(o).expect("test header"));
        p.allows(v.as_ref())
    }

    #[test]
    fn allow_table() {
        let p = policy(&[
            "https://app.example.com",
            "https://*.example.com",
            "http://localhost:3000",
            "HTTPS://Admin.Example.ORG:443",
            "http://[::1]:8080",
            "http://127.0.0.1:5173",
            "capacitor://localhost",
        ]);
        let cases: &[(Option<&str>, bool, &str)] = &[
            (None, true, "absent: non-browser client"),
            (Some("https://app.example.com"), true, "exact"),
            (Some("https://a.example.com"), true, "subdomain wildcard"),
            (Some("https://a.b.example.com"), true, "deep subdomain wildcard"),
            (
                Some("https://example.com"),
                false,
                "wildcard never matches the apex",
            ),
            (Some("https://evilexample.com"), false, "suffix attack"),
            (Some("https://example.com.evil.net"), false, "prefix attack"),
            (
                Some("https://app.example.com.evil.net"),
                false,
                "prefix attack on exact",
            ),
            (Some("https://.example.com"), false, "empty label"),
            (Some("https://a..example.com"), false, "empty label inside"),
            (Some("https://a.example.com."), false, "trailing dot"),
            (Some("http://app.example.com"), false, "scheme mismatch"),
            (Some("http://a.example.com"), false, "scheme mismatch on wildcard"),
            (Some("https://app.example.com:8443"), false, "port mismatch"),
            (
                Some("https://a.example.com:8443"),
                false,
                "port mismatch on wildcard",
            ),
            (Some("https://app.example.com:443"), true, "explicit default port"),
            (Some("null"), false, "null origin"),
            (Some("NULL"), false, "null origin, uppercase"),
            (Some("HTTPS://APP.EXAMPLE.COM"), true, "uppercase"),
            (
                Some("https://admin.example.org"),
                true,
                "entry written in uppercase with :443",
            ),
            (Some("http://localhost:3000"), true, "port"),
            (Some("http://localhost"), false, "port missing"),
            (Some("http://localhost:03000"), true, "same port number"),
            (Some("http://[::1]:8080"), true, "ipv6"),
            (Some("http://[0:0::1]:8080"), true, "ipv6 non-canonical"),
            (Some("http://127.0.0.1:5173"), true, "ipv4"),
            (Some("capacitor://localhost"), true, "app scheme"),
            (Some("https://app.example.com/"), false, "path"),
            (Some("https://app.example.com/x"), false, "path"),
            (Some("https://user@app.example.com"), false, "userinfo"),
            (Some("app.example.com"), false, "no scheme"),
            (Some("https://*.example.com"), false, "wildcard in header"),
            (Some("https://app.example.com https://x.y"), false, "list"),
            (Some(""), false, "empty"),
            (Some("https://"), false, "no host"),
            (Some("https://app.example.com:0"), false, "port 0"),
            (Some("https://app.example.com:99999"), false, "port too large"),
            (Some("https://app.example.com:"), false, "empty port"),
        ];
        for (origin, want, why) in cases {
            assert_eq!(allows(&p, *origin), *want, "{why}: {origin:?}");
        }
    }

    #[test]
    fn non_ascii_header_is_rejected() {
        let p = policy(&["https://app.example.com"]);
        let v = HeaderValue::from_bytes(b"https://app.ex\xc3\xa4mple.com").expect("obs-text");
        assert!(!p.allows(Some(&v)));
    }

    #[test]
    fn omitted_list_allows_anything_and_empty_list_nothing() {
        let any = OriginPolicy::parse(None).expect("ok");
        assert!(any.allows_any());
        assert!(allows(&any, Some("https://evil.net")));
        assert!(allows(&any, Some("null")));
        assert!(allows(&any, None));
        let none = policy(&[]);
        assert!(!none.allows_any());
        assert!(!allows(&none, Some("https://app.example.com")));
        assert!(allows(&none, None));
    }

    #[test]
    fn config_errors_name_the_entry_and_the_problem() {
        let entries: Vec<String> = [
            "https://ok.example.com",
            "app.example.com",
            "https://app.example.com/path",
            "https://app.example.com/",
            "https://a.*.example.com",
            "https://app*.example.com",
            "https://*",
            "null",
            "*",
            "https://app.example.com:70000",
            "https://user@app.example.com",
            "https://bücher.example",
            "https://[::1",
            "ht tp://x",
            "https://a..b",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let errs = OriginPolicy::parse(Some(&entries)).expect_err("invalid");
        let expect: &[(usize, &str)] = &[
            (1, "no scheme"),
            (2, "path"),
            (3, "trailing slash"),
            (4, "wildcard"),
            (5, "wildcard"),
            (6, "wildcard"),
            (7, "null"),
            (8, "omit server.allowed_origins"),
            (9, "invalid port"),
            (10, "user info"),
            (11, "punycode"),
            (12, "IPv6"),
            (13, "whitespace"),
            (14, "invalid host"),
        ];
        assert_eq!(errs.len(), expect.len(), "{errs:#?}");
        for (err, (i, needle)) in errs.iter().zip(expect) {
            assert!(
                err.starts_with(&format!("server.allowed_origins[{i}]: ")),
                "{err}"
            );
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_header_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let p = policy(&["https://*.example.com", "http://[::1]:80"]);
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                let _ = p.allows(Some(&v));
            }
        }

        #[test]
        fn arbitrary_config_never_panics(s in "\\PC{0,60}") {
            let _ = OriginPolicy::parse(Some(&[s]));
        }

        /// Against a model of the wildcard rule, on inputs built to probe suffix tricks.
        #[test]
        fn wildcard_matches_model(
            scheme in "(https?|HTTPS|wss)",
            prefix in "[a-zA-Z0-9.*_-]{0,12}",
            suffix in prop::sample::select(vec!["example.com", ".example.com", "EXAMPLE.com", "evilexample.com", "example.com.evil.net", "example.com.", ""]),
            port in proptest::option::of(prop::sample::select(vec![443u16, 80, 8443])),
        ) {
            let p = policy(&["https://*.example.com"]);
            let origin = match port {
                Some(n) => format!("{scheme}://{prefix}{suffix}:{n}"),
                None => format!("{scheme}://{prefix}{suffix}"),
            };
            let full = format!("{prefix}{suffix}").to_ascii_lowercase();
            let model = scheme.eq_ignore_ascii_case("https")
                && port.is_none_or(|n| n == 443)
                && full.strip_suffix(".example.com").is_some_and(|labels| {
                    !labels.is_empty()
                        && labels.split('.').all(|l| {
                            !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                        })
                });
            let v = HeaderValue::from_str(&origin).expect("printable");
            prop_assert_eq!(p.allows(Some(&v)), model, "{}", origin);
        }
    }
}
