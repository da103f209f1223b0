//! The certificate table SNI reads: built once per certificate change and swapped whole, so a
//! handshake only looks things up. A name matches exactly first, then by wildcard (`*.b.example`
//! covers `a.b.example`, one label, like browsers), else the first certificate is served. Among
//! several certificates for one name, the one the client can verify (RSA or ECDSA, by its
//! signature schemes) with the latest expiry wins, so adding a renewed certificate takes over.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::certs::Loaded;

/// An immutable name -> certificates table.
#[derive(Debug, Default)]
pub struct SniTable {
    /// In order of preference: the first is served when no name matches.
    certs: Vec<Loaded>,
    /// Exact name -> indices into `certs`, latest expiry first.
    exact: HashMap<String, Vec<usize>>,
    /// The part after `*.` of a wildcard name -> indices, latest expiry first.
    wildcard: HashMap<String, Vec<usize>>,
}

impl SniTable {
    pub fn new(certs: Vec<Loaded>) -> Self {
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, c) in certs.iter().enumerate() {
            for name in &c.info.names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(rest) => (&mut wildcard, rest),
                    None => (&mut exact, name.as_str()),
                };
                let list = map.entry(key.to_string()).or_default();
                if !list.contains(&i) {
                    list.push(i);
                }
            }
        }
        for list in exact.values_mut().chain(wildcard.values_mut()) {
            list.sort_by_key(|&i| std::cmp::Reverse(certs[i].info.not_after));
        }
        SniTable { certs, exact, wildcard }
    }

    pub fn certs(&self) -> &[Loaded] {
        &self.certs
    }

    /// The certificate for `name` that `usable` accepts: exact, wildcard, else the first usable.
    pub fn pick(&self, name: Option<&str>, usable: impl Fn(&CertifiedKey) -> bool) -> Option<Arc<CertifiedKey>> {
        let from = |list: Option<&Vec<usize>>| {
            list.into_iter().flatten().map(|&i| &self.certs[i].key).find(|k| usable(k)).cloned()
        };
        if let Some(name) = name {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(k) = from(self.exact.get(&name)) {
                return Some(k);
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(k) = from(self.wildcard.get(parent))
            {
                return Some(k);
            }
        }
        self.certs.iter().map(|c| &c.key).find(|k| usable(k)).cloned()
    }
}

impl SniTable {
    /// Whether a connection whose client asked for `sni` may carry requests for `host` (the
    /// `Host` field or authority as sent, port and all): the same name, or a name one of the
    /// certificates served for `sni` also covers (HTTP/2 connection reuse across names of one
    /// certificate). When no certificate has `sni`'s name, the first one was served.
    pub fn serves(&self, sni: &str, host: &[u8]) -> bool {
        let host = host_name(host);
        if host.eq_ignore_ascii_case(sni.trim_end_matches('.').as_bytes()) {
            return true;
        }
        let Ok(host) = std::str::from_utf8(host) else { return false };
        let named: Vec<&Loaded> =
            self.certs.iter().filter(|c| c.info.names.iter().any(|n| name_covers(n, sni))).collect();
        let served = if named.is_empty() { self.certs.first().into_iter().collect() } else { named };
        served.iter().any(|c| c.info.names.iter().any(|n| name_covers(n, host)))
    }
}

impl SniTable {
    /// Whether some certificate has a name that covers `name`.
    pub fn covers(&self, name: &str) -> bool {
        self.certs.iter().any(|c| c.info.names.iter().any(|n| name_covers(n, name)))
    }
}

/// The name part of a `Host` value: without a port or a trailing dot (`[v6]` kept whole).
fn host_name(host: &[u8]) -> &[u8] {
    let name = if host.first() == Some(&b'[') {
        host.iter().position(|&b| b == b']').map_or(host, |i| &host[..=i])
    } else {
        host.iter().rposition(|&b| b == b':').map_or(host, |i| &host[..i])
    };
    name.strip_suffix(b".").unwrap_or(name)
}

/// Whether a certificate name (`www.example.com` or `*.example.com`, one label) covers `name`.
fn name_covers(pattern: &str, name: &str) -> bool {
    let name = name.trim_end_matches('.');
    match pattern.strip_prefix("*.") {
        Some(parent) => name.split_once('.').is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(parent)),
        None => pattern.eq_ignore_ascii_case(name),
    }
}

/// rustls's view of the current table.
#[derive(Debug)]
pub struct Resolver(pub Arc<ArcSwap<SniTable>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let schemes = hello.signature_schemes();
        self.0.load().pick(hello.server_name(), |k| k.key.choose_scheme(schemes).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::certs::{parse_pem, tests::self_signed};

    fn loaded(names: &[&str], source: &str) -> Loaded {
        let (c, k) = self_signed(names);
        parse_pem(c.as_bytes(), k.as_bytes(), source, "k").unwrap()
    }

    fn source_of(t: &SniTable, name: Option<&str>) -> String {
        let k = t.pick(name, |_| true).unwrap();
        t.certs().iter().find(|c| Arc::ptr_eq(&c.key, &k)).unwrap().info.source.clone()
    }

    #[test]
    fn exact_then_wildcard_then_first() {
        let t = SniTable::new(vec![
            loaded(&["default.example"], "first"),
            loaded(&["*.shop.example"], "wild"),
            loaded(&["www.shop.example", "API.example"], "exact"),
        ]);
        assert_eq!(source_of(&t, Some("www.shop.example")), "exact");
        assert_eq!(source_of(&t, Some("WWW.Shop.Example.")), "exact");
        assert_eq!(source_of(&t, Some("api.example")), "exact");
        assert_eq!(source_of(&t, Some("cart.shop.example")), "wild");
        // a wildcard covers one label only
        assert_eq!(source_of(&t, Some("a.cart.shop.example")), "first");
        assert_eq!(source_of(&t, Some("shop.example")), "first");
        assert_eq!(source_of(&t, None), "first");
    }

    #[test]
    fn a_connection_serves_the_names_of_its_certificate() {
        let t = SniTable::new(vec![
            loaded(&["default.example"], "first"),
            loaded(&["www.shop.example", "*.shop.example"], "shop"),
        ]);
        assert!(t.serves("www.shop.example", b"www.shop.example"));
        assert!(t.serves("www.shop.example", b"WWW.shop.example:8443"));
        // the same certificate covers the other name: HTTP/2 may reuse the connection
        assert!(t.serves("www.shop.example", b"cart.shop.example"));
        assert!(!t.serves("www.shop.example", b"default.example"));
        assert!(!t.serves("www.shop.example", b"evil.example"));
        assert!(!t.serves("cart.shop.example", b"a.cart.shop.example"));
        // no certificate has the SNI name: the first was served, and its names count
        assert!(t.serves("unknown.example", b"default.example"));
        assert!(t.serves("unknown.example", b"unknown.example"));
        assert!(!t.serves("unknown.example", b"www.shop.example"));
        assert!(t.serves("[::1]", b"[::1]:8443"));
    }

    #[test]
    fn unusable_keys_are_skipped() {
        let t = SniTable::new(vec![loaded(&["a.example"], "one"), loaded(&["a.example"], "two")]);
        let one: *const CertifiedKey = &*t.certs()[0].key;
        // a client that cannot verify "one" (say, RSA only while "one" is ECDSA) gets "two"
        let k = t.pick(Some("a.example"), |k| !std::ptr::eq(k, one)).unwrap();
        assert!(Arc::ptr_eq(&k, &t.certs()[1].key));
        assert!(t.pick(Some("a.example"), |_| false).is_none());
        assert!(SniTable::default().pick(Some("a.example"), |_| true).is_none());
    }
}
