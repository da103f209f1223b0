//! # The route table: host and path to a named pool, or a redirect
//!
//! Owns the route patterns ([`HostPattern`], [`PathPattern`]), their parsing and checking, the
//! redirect origin check ([`parse_origin`]), the immutable lookup structure ([`RouteTable`])
//! and the target a backend gets when a route strips its prefix ([`Entry::upstream_path`]).
//! Pure: no I/O, no state; the caller attaches what a route leads to (a pool index etc.).
//!
//! ## Matching (like nginx `server_name` + `location`)
//! - The request host (Host or `:authority`) loses its port and one trailing dot and is
//!   lowercased; a host that is not a plain name (bad bytes, over 253 bytes) matches only
//!   any-host routes.
//! - The request path (the target before `?`) is normalized before matching, as nginx does:
//!   `%XX` decoded, repeated slashes merged, `.` and `..` segments resolved (`..` stops at the
//!   root). So no spelling of a path reaches another route than the path itself does. With a
//!   bad `%` sequence nothing is decoded (slashes and dot segments are still resolved).
//!
//! ## Precedence
//! 1. Host: an exact host beats the longest matching `*.suffix`, which beats a shorter one,
//!    which beats any host. `*.example.com` matches `a.example.com` and `a.b.example.com`,
//!    not `example.com`.
//! 2. Within the most specific host level that matches: an exact path (`=/x`) beats prefixes,
//!    then the longest prefix wins. Prefixes match bytewise (`/api` matches `/apix`).
//! 3. A host level where no path matches is passed over: the next less specific host level is
//!    tried (shorter wildcards, then any host). No route at all: `None` (the default pool).
//!
//! ## Cost
//! One lookup is at most one hash probe for the exact host, one per `.` of the host whose
//! suffix length some wildcard has, and per host level tried one hash probe for exact paths
//! plus, for prefixes, one probe per distinct prefix length (a level with few lengths for
//! its prefixes) or one binary search; no allocation unless the path needs normalizing.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// Longest host name (RFC 1035, without the trailing dot).
const MAX_HOST: usize = 253;
/// Longest label of a host name.
const MAX_LABEL: usize = 63;
/// Longest path pattern, in bytes.
const MAX_PATH: usize = 1024;
/// Most hash probes per host level for its longest prefix (one per distinct prefix length,
/// longest first). A probe costs about 1.5 steps of the binary search (measured with
/// `examples/route_match.rs`: either way alone was slower on its mix), so a level probes by
/// length only when its distinct lengths are at most 2/3 of log2(its prefixes), and at most
/// this many; otherwise it searches (log2 of its prefixes, plus the nested prefixes of the
/// one found).
const MAX_LENGTH_PROBES: usize = 8;

/// How a host level finds its longest prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrefixLookup {
    /// By length probes when they cost less than the binary search (see [`MAX_LENGTH_PROBES`]).
    Auto,
    /// Always by length probes (tests).
    #[cfg(test)]
    Lengths,
    /// Always by binary search (tests).
    #[cfg(test)]
    Search,
}

/// Which hosts a route matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// Every host (no `host`, `""` or `"*"`).
    Any,
    /// One host name, lowercase, without a trailing dot (or an IPv4 or `[IPv6]` literal).
    Exact(String),
    /// `*.example.com`: every host ending in the suffix, held as `".example.com"` (lowercase,
    /// leading dot). Not the suffix's own name.
    Suffix(String),
}

impl HostPattern {
    /// Parses a route's host: `None`, `""` or `"*"` is any host; `"*.example.com"` a wildcard;
    /// anything else one host name (case and one trailing dot ignored), an IPv4 literal or an
    /// `[IPv6]` literal. A port is refused: routes match the host name only.
    pub fn parse(s: Option<&str>) -> Result<Self, String> {
        let s = match s {
            None | Some("") | Some("*") => return Ok(HostPattern::Any),
            Some(s) => s,
        };
        if let Some(rest) = s.strip_prefix("*.") {
            if rest.is_empty() {
                return Err(format!("host {s:?} is not a host name: nothing follows \"*.\""));
            }
            if rest.starts_with('[') {
                return Err(format!("host {s:?} is not a host name: a wildcard takes a DNS name, not an IP literal"));
            }
            return check_host(s, rest).map(|name| HostPattern::Suffix(format!(".{name}")));
        }
        check_host(s, s).map(HostPattern::Exact)
    }

    /// The pattern as it is written: `""` for any host, `"www.example.com"`, `"*.example.com"`.
    /// [`HostPattern::parse`] of it gives the pattern back.
    pub fn text(&self) -> String {
        match self {
            HostPattern::Any => String::new(),
            HostPattern::Exact(h) => h.clone(),
            HostPattern::Suffix(s) => format!("*{s}"),
        }
    }
}

/// Which paths a route matches (against the normalized request path).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathPattern {
    /// Every path starting with these bytes (`"/api"` matches `"/api/x"` and `"/apix"`).
    Prefix(String),
    /// Exactly this path (written `"=/x"`).
    Exact(String),
}

impl PathPattern {
    /// Parses a route's path: `None` is the prefix `/` (every path); `"=/x"` is the exact path
    /// `/x`; anything else a prefix. It must start with `/`, hold no whitespace, control byte,
    /// `?` or `#`, be at most 1024 bytes and be normalized (no `//`, no `.` or `..` segment, no
    /// `%`), since it is matched against the normalized request path.
    pub fn parse(s: Option<&str>) -> Result<Self, String> {
        let Some(s) = s else { return Ok(PathPattern::Prefix("/".into())) };
        let (exact, path) = match s.strip_prefix('=') {
            Some(p) => (true, p),
            None => (false, s),
        };
        check_path(s, path)?;
        Ok(if exact { PathPattern::Exact(path.into()) } else { PathPattern::Prefix(path.into()) })
    }

    /// The pattern as it is written: `"/v1/"` for a prefix, `"=/x"` for an exact path.
    /// [`PathPattern::parse`] of it gives the pattern back.
    pub fn text(&self) -> String {
        match self {
            PathPattern::Prefix(p) => p.clone(),
            PathPattern::Exact(p) => format!("={p}"),
        }
    }
}

/// What a matching request gets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RouteAction {
    /// Proxied to the named pool; with `strip_prefix`, without the route's path prefix (see
    /// [`Entry::upstream_path`]).
    Pool {
        /// The pool's name.
        upstream: String,
        /// Whether the backend gets the target without the route's prefix.
        strip_prefix: bool,
    },
    /// Redirected to the same target on another origin.
    Redirect {
        /// `scheme://host[:port]`, as [`parse_origin`] returns it.
        origin: String,
    },
}

/// One route: which requests, and what they get.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteSpec {
    /// The hosts it matches.
    pub host: HostPattern,
    /// The paths it matches.
    pub path: PathPattern,
    /// What a matching request gets.
    pub action: RouteAction,
}

impl RouteSpec {
    /// The route's stable name in logs, the access log and the CLI: host then path pattern,
    /// `"*"` for any host: `"api.example.com/v1/"`, `"*.example.com=/x"`, `"*/static/"`.
    pub fn describe(&self) -> String {
        match &self.host {
            HostPattern::Any => format!("*{}", self.path.text()),
            host => format!("{}{}", host.text(), self.path.text()),
        }
    }
}

/// Checks a redirect origin, `http://` or `https://` + host (name or IP literal) + optional
/// `:port`, with at most a trailing `/` and no user info, path, query or fragment. Returns it
/// normalized: scheme and host lowercase, no trailing `/`, the port in plain digits.
pub fn parse_origin(s: &str) -> Result<String, String> {
    let lower = s.chars().take(8).collect::<String>().to_ascii_lowercase();
    let (scheme, rest) = if lower.starts_with("http://") {
        ("http", &s[7..])
    } else if lower.starts_with("https://") {
        ("https", &s[8..])
    } else {
        return Err(format!("origin {s:?} must start with \"http://\" or \"https://\""));
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match tail {
        "" | "/" => {}
        _ if tail.contains('?') => return Err(format!("origin {s:?} has a query: give scheme://host[:port] only")),
        _ if tail.contains('#') => return Err(format!("origin {s:?} has a fragment: give scheme://host[:port] only")),
        _ => {
            return Err(format!(
                "origin {s:?} has a path: give scheme://host[:port] only (the request's own target is kept)"
            ));
        }
    }
    if authority.contains('@') {
        return Err(format!("origin {s:?} has user info: give scheme://host[:port] only"));
    }
    if authority.is_empty() {
        return Err(format!("origin {s:?} has no host"));
    }
    // The port: after "]" for an IPv6 literal, else after the first ':'.
    let host_end = if authority.starts_with('[') {
        authority.find(']').map_or(authority.len(), |i| i + 1)
    } else {
        authority.find(':').unwrap_or(authority.len())
    };
    let (host, port) = match authority.split_at(host_end) {
        (host, "") => (host, None),
        (host, p) if p.starts_with(':') => match p[1..].parse::<u16>() {
            Ok(n) if n > 0 && p[1..].bytes().all(|b| b.is_ascii_digit()) => (host, Some(n)),
            _ => return Err(format!("origin {s:?} has a bad port {p:?}: give :1 to :65535 or no port")),
        },
        // "[v6]x": the host check says what is wrong.
        _ => (authority, None),
    };
    if host.is_empty() {
        return Err(format!("origin {s:?} has no host"));
    }
    let host = check_host(host, host).map_err(|e| format!("origin {s:?}: {e}"))?;
    Ok(match port {
        Some(p) => format!("{scheme}://{host}:{p}"),
        None => format!("{scheme}://{host}"),
    })
}

/// Checks one host name (or IP literal) `name`, part of the pattern `whole` as given (for the
/// message); returns it lowercase without a trailing dot.
fn check_host(whole: &str, name: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("host {whole:?} is not a host name: {why}"));
    if name.starts_with('[') {
        let Some(close) = name.find(']') else { return bad("\"[\" without \"]\"") };
        if name[close + 1..].starts_with(':') {
            return Err(format!("host {whole:?}: no port: routes match the host name only"));
        }
        if close + 1 != name.len() {
            return bad("something follows \"]\"");
        }
        if name[1..close].parse::<std::net::Ipv6Addr>().is_err() {
            return bad("not an IPv6 address between \"[\" and \"]\"");
        }
        return Ok(name.to_ascii_lowercase());
    }
    if name.parse::<std::net::Ipv6Addr>().is_ok() {
        return bad("write an IPv6 address in brackets, \"[::1]\"");
    }
    if name.contains(':') {
        return Err(format!("host {whole:?}: no port: routes match the host name only"));
    }
    if name.contains('*') {
        return bad("\"*\" is allowed only as a leading \"*.\"");
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    if let Some(c) = name.chars().find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')) {
        return bad(&format!("{c:?} is not allowed (letters, digits, '-', '_' and '.')"));
    }
    if name.is_empty() {
        return bad("empty");
    }
    if name.starts_with('.') {
        return bad("starts with \".\"");
    }
    if name.len() > MAX_HOST {
        return bad(&format!("longer than {MAX_HOST} bytes"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return bad("empty label (\"..\")");
        }
        if label.len() > MAX_LABEL {
            return bad(&format!("label {label:?} is longer than {MAX_LABEL} bytes"));
        }
    }
    Ok(name.to_ascii_lowercase())
}

/// Checks a path pattern's `path` (`whole`: as given, for the message).
fn check_path(whole: &str, path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("path {whole:?} must start with \"/\" (or \"=/\" for an exact path)"));
    }
    if path.len() > MAX_PATH {
        return Err(format!("path {whole:?} is longer than {MAX_PATH} bytes"));
    }
    if let Some(c) = path.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("path {whole:?} contains {c:?}: no whitespace or control characters"));
    }
    if path.contains('?') {
        return Err(format!("path {whole:?} contains '?': routes match the path, not the query"));
    }
    if path.contains('#') {
        return Err(format!("path {whole:?} contains '#': a request target has no fragment"));
    }
    let why = "it is matched against the normalized request path";
    if path.contains('%') {
        return Err(format!("path {whole:?} contains '%': write the decoded character, since {why}"));
    }
    if path.contains("//") {
        return Err(format!("path {whole:?} contains \"//\", which never matches, since {why}"));
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(format!("path {whole:?} has a \".\" or \"..\" segment, which never matches, since {why}"));
    }
    Ok(())
}

/// One route of a [`RouteTable`] and what the caller attached to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<T> {
    /// The route.
    pub spec: RouteSpec,
    /// What the caller attached (a pool index etc.).
    pub target: T,
}

impl<T> Entry<T> {
    /// The request target the backend gets for `target` (path and optional `?query`), which
    /// this route matched ([`RouteTable::find`]). For a pool route with `strip_prefix`, the
    /// path loses the route's prefix (an exact path: all of it) and always starts with `/`; the
    /// query is kept: prefix `/v1/`: `/v1/users?a=1` -> `/users?a=1`; prefix `/v1`: `/v1` ->
    /// `/`, `/v1?x` -> `/?x`. Borrowed from `target` when it can be. A path that matched only
    /// once normalized (its raw spelling does not start with the prefix) loses the prefix from
    /// its normalized form, percent-encoded again where needed (owned). Without `strip_prefix`,
    /// for a redirect, or when neither spelling of the path starts with the prefix: `target`
    /// unchanged.
    pub fn upstream_path<'a>(&self, target: &'a str) -> Cow<'a, str> {
        let RouteAction::Pool { strip_prefix: true, .. } = self.spec.action else { return Cow::Borrowed(target) };
        let (path, query) = target.split_at(target.find('?').unwrap_or(target.len()));
        let root = |rest: &str| match (rest.is_empty(), query.is_empty()) {
            (true, true) => Cow::Borrowed("/"),
            _ => Cow::Owned(format!("/{rest}{query}")),
        };
        let prefix = match &self.spec.path {
            PathPattern::Exact(_) => return root(""),
            PathPattern::Prefix(p) => p.as_str(),
        };
        if let Some(rest) = path.strip_prefix(prefix) {
            return if rest.starts_with('/') {
                Cow::Borrowed(&target[prefix.len()..])
            } else if prefix.ends_with('/') {
                Cow::Borrowed(&target[prefix.len() - 1..])
            } else {
                root(rest)
            };
        }
        let (normal, decoded) = normalize_path(path.as_bytes());
        let Some(rest) = normal.strip_prefix(prefix.as_bytes()) else { return Cow::Borrowed(target) };
        let mut out = String::with_capacity(rest.len() + query.len() + 8);
        if rest.first() != Some(&b'/') {
            out.push('/');
        }
        for &b in rest {
            if path_byte_ok(b) || (b == b'%' && !decoded) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out.push_str(query);
        Cow::Owned(out)
    }
}

/// Whether `b` can stand as is in an origin-form path (RFC 3986 pchar or `/`, `%` aside).
fn path_byte_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b)
}

/// A map from a host name or path: the table's own maps.
type Map<V> = HashMap<Box<[u8]>, V, BuildHasherDefault<KeyHasher>>;

/// A fast hasher for the table's keys (8 bytes per multiply, then a final mix; SipHash took
/// a third of a lookup). Unkeyed is fine here: only the config puts keys in, and a request can
/// at worst probe the buckets the config's keys fill.
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl KeyHasher {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;

    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0 ^ word).wrapping_mul(Self::K).rotate_left(26);
    }
}

impl Hasher for KeyHasher {
    /// 8 bytes at a time; the tail as the last 8 bytes (overlapping), or for short keys as
    /// overlapping reads (the length went in before, so these still tell keys apart). Only
    /// fixed-size loads: no memcpy call.
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let n = bytes.len();
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let u32_at = |i: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&bytes[i..i + 4]);
            u32::from_le_bytes(w) as u64
        };
        if n >= 8 {
            let mut i = 0;
            while i + 8 <= n {
                self.add(u64_at(i));
                i += 8;
            }
            if i < n {
                self.add(u64_at(n - 8));
            }
        } else if n >= 4 {
            self.add(u32_at(0) | (u32_at(n - 4) << 32));
        } else if n > 0 {
            self.add(bytes[0] as u64 | ((bytes[n / 2] as u64) << 8) | ((bytes[n - 1] as u64) << 16));
        }
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // MurmurHash3's finalizer: every input bit reaches the top bits hashbrown uses.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// The routes of one host level: exact paths and prefixes.
#[derive(Debug, Clone, Default)]
struct PathTable {
    /// Exact path -> entry index.
    exact: Map<usize>,
    /// Prefixes in byte order, each with its longest proper prefix in the list.
    prefixes: Vec<Prefix>,
    /// With few distinct prefix lengths: those lengths, longest first, and every prefix ->
    /// entry index; the longest prefix is then found by one probe per length. Empty: by a
    /// binary search over `prefixes`.
    lengths: Vec<usize>,
    by_prefix: Map<usize>,
}

#[derive(Debug, Clone)]
struct Prefix {
    bytes: Box<[u8]>,
    entry: usize,
    /// Index (in `prefixes`) of the longest other prefix that is a prefix of this one.
    parent: Option<usize>,
}

impl PathTable {
    fn insert(&mut self, path: &PathPattern, entry: usize) {
        match path {
            PathPattern::Exact(p) => {
                self.exact.insert(p.as_bytes().into(), entry);
            }
            PathPattern::Prefix(p) => self.prefixes.push(Prefix { bytes: p.as_bytes().into(), entry, parent: None }),
        }
    }

    /// Sorts the prefixes and links each to its longest proper prefix. In byte order the
    /// prefixes of an element come before it and everything extending it right after it, so
    /// a stack of the current chain finds the links in one pass. Then, if `lookup` says so,
    /// the map for probing by length.
    fn finish(&mut self, lookup: PrefixLookup) {
        let mut lengths: Vec<usize> = self.prefixes.iter().map(|p| p.bytes.len()).collect();
        lengths.sort_unstable_by(|a, b| b.cmp(a));
        lengths.dedup();
        let (l, n) = (lengths.len(), self.prefixes.len());
        let probe = match lookup {
            PrefixLookup::Auto => n > 0 && l <= MAX_LENGTH_PROBES && 3 * l <= 2 * n.ilog2() as usize,
            #[cfg(test)]
            PrefixLookup::Lengths => n > 0,
            #[cfg(test)]
            PrefixLookup::Search => false,
        };
        if probe {
            self.lengths = lengths;
            self.by_prefix = self.prefixes.iter().map(|p| (p.bytes.clone(), p.entry)).collect();
        }
        self.prefixes.sort_by(|a, b| a.bytes.cmp(&b.bytes));
        let mut chain: Vec<usize> = Vec::new();
        for i in 0..self.prefixes.len() {
            while let Some(&top) = chain.last() {
                if self.prefixes[i].bytes.starts_with(&self.prefixes[top].bytes) {
                    break;
                }
                chain.pop();
            }
            self.prefixes[i].parent = chain.last().copied();
            chain.push(i);
        }
    }

    /// The entry for the normalized `path`: an exact path, else the longest prefix.
    ///
    /// Prefixes, by length: the first length (longest first) at which `path`'s first bytes
    /// are a prefix. By binary search: take the greatest prefix `c` that sorts at or before
    /// `path`. Every string between a prefix of `path` and `path` itself extends that prefix,
    /// so the longest matching prefix is a prefix of `c` too: one of `c`'s chain of parents,
    /// and the first of them no longer than the common prefix of `c` and `path`.
    #[inline]
    fn find(&self, path: &[u8]) -> Option<usize> {
        if !self.exact.is_empty()
            && let Some(&i) = self.exact.get(path)
        {
            return Some(i);
        }
        if !self.lengths.is_empty() {
            for &n in &self.lengths {
                if let Some(head) = path.get(..n)
                    && let Some(&e) = self.by_prefix.get(head)
                {
                    return Some(e);
                }
            }
            return None;
        }
        let after = self.prefixes.partition_point(|p| bytes_cmp(&p.bytes, path).is_le());
        let mut c = after.checked_sub(1)?;
        let candidate = &self.prefixes[c].bytes;
        let common = candidate.iter().zip(path).take_while(|(a, b)| a == b).count();
        loop {
            let p = &self.prefixes[c];
            if p.bytes.len() <= common {
                return Some(p.entry);
            }
            c = p.parent?;
        }
    }
}

/// `a.cmp(b)` for short byte strings, 8 bytes per compare inline (memcmp calls were a fifth
/// of a lookup).
#[inline]
fn bytes_cmp(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let (mut a8, mut b8) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in (&mut a8).zip(&mut b8) {
        let (mut wx, mut wy) = ([0u8; 8], [0u8; 8]);
        wx.copy_from_slice(x);
        wy.copy_from_slice(y);
        let (wx, wy) = (u64::from_be_bytes(wx), u64::from_be_bytes(wy));
        if wx != wy {
            return wx.cmp(&wy);
        }
    }
    let done = a.len().min(b.len()) / 8 * 8;
    for (x, y) in a[done..].iter().zip(&b[done..]) {
        if x != y {
            return x.cmp(y);
        }
    }
    a.len().cmp(&b.len())
}

/// The routes, indexed for lookup; immutable once built. `T` is what the caller attaches to
/// each route (a pool index etc.). [`Default`] is the empty table.
#[derive(Clone)]
pub struct RouteTable<T> {
    entries: Vec<Entry<T>>,
    /// Exact host -> its routes.
    exact: Map<PathTable>,
    /// Wildcard suffix (".example.com") -> its routes.
    wildcard: Map<PathTable>,
    /// Bit `n`: some wildcard suffix is `n` bytes long (skips the other probes).
    wildcard_lens: [u64; 4],
    /// Any-host routes.
    any: PathTable,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        RouteTable {
            entries: Vec::new(),
            exact: Map::default(),
            wildcard: Map::default(),
            wildcard_lens: [0; 4],
            any: PathTable::default(),
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for RouteTable<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteTable").field("entries", &self.entries).finish_non_exhaustive()
    }
}

/// Two tables are equal when their routes are (the index follows from them).
impl<T: PartialEq> PartialEq for RouteTable<T> {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl<T: Eq> Eq for RouteTable<T> {}

impl<T> RouteTable<T> {
    /// Builds the table. The same host and path pattern twice: the later route wins and the
    /// earlier one is left out of [`RouteTable::entries`] (config validation refuses
    /// duplicates before this); otherwise the entries keep the given order.
    pub fn new(routes: Vec<(RouteSpec, T)>) -> Self {
        Self::build(routes, PrefixLookup::Auto)
    }

    /// [`RouteTable::new`], with the host levels' longest prefix found as `lookup` says.
    fn build(routes: Vec<(RouteSpec, T)>, lookup: PrefixLookup) -> Self {
        let mut last: HashMap<(HostPattern, PathPattern), usize> = HashMap::with_capacity(routes.len());
        for (i, (spec, _)) in routes.iter().enumerate() {
            last.insert((spec.host.clone(), spec.path.clone()), i);
        }
        let mut table = RouteTable::default();
        for (i, (spec, target)) in routes.into_iter().enumerate() {
            if last.get(&(spec.host.clone(), spec.path.clone())) == Some(&i) {
                table.entries.push(Entry { spec, target });
            }
        }
        for (i, e) in table.entries.iter().enumerate() {
            let level = match &e.spec.host {
                HostPattern::Any => &mut table.any,
                HostPattern::Exact(h) => table.exact.entry(h.as_bytes().into()).or_default(),
                HostPattern::Suffix(s) => {
                    let n = s.len().min(255);
                    table.wildcard_lens[n / 64] |= 1 << (n % 64);
                    table.wildcard.entry(s.as_bytes().into()).or_default()
                }
            };
            level.insert(&e.spec.path, i);
        }
        table.any.finish(lookup);
        table.exact.values_mut().chain(table.wildcard.values_mut()).for_each(|t| t.finish(lookup));
        table
    }

    /// The route for a request: `host` is the raw Host header or `:authority` (port, one
    /// trailing dot and case ignored), `target` the raw request target (origin-form path and
    /// optional `?query`; the path is normalized before matching). `None`: no route matches.
    /// See the module documentation for the precedence.
    pub fn find(&self, host: &[u8], target: &str) -> Option<&Entry<T>> {
        let raw = target.as_bytes();
        let raw = &raw[..raw.iter().position(|&b| b == b'?').unwrap_or(raw.len())];
        let (path, _) = normalize_path(raw);
        let mut buf = [0u8; MAX_HOST];
        if let Some(host) = normalize_host(host, &mut buf) {
            if let Some(i) = self.exact.get(host).and_then(|t| t.find(&path)) {
                return Some(&self.entries[i]);
            }
            if !self.wildcard.is_empty() {
                // Longest suffix first: the leftmost '.' (not the host's first byte).
                for (i, &b) in host.iter().enumerate().skip(1) {
                    let n = host.len() - i;
                    if b == b'.'
                        && self.wildcard_lens[n / 64] & (1 << (n % 64)) != 0
                        && let Some(e) = self.wildcard.get(&host[i..]).and_then(|t| t.find(&path))
                    {
                        return Some(&self.entries[e]);
                    }
                }
            }
        }
        self.any.find(&path).map(|i| &self.entries[i])
    }

    /// How many routes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The routes, in the order given (a route overridden by a later one left out).
    pub fn entries(&self) -> &[Entry<T>] {
        &self.entries
    }
}

/// The request host as routes match it, written into `buf`: without a port (`[v6]:port`
/// keeps `[v6]`) and one trailing dot, lowercase. `None` for a host that is not a plain name
/// (bytes outside letters, digits, `-`, `_`, `.`; an IPv6 literal: hex digits, `:`, `.`), a
/// port that is not digits, or over 253 bytes: such a host matches only any-host routes.
#[inline]
fn normalize_host<'b>(raw: &[u8], buf: &'b mut [u8; MAX_HOST]) -> Option<&'b [u8]> {
    let bracketed = raw.first() == Some(&b'[');
    let end = if bracketed {
        raw.iter().position(|&b| b == b']')? + 1
    } else {
        raw.iter().position(|&b| b == b':').unwrap_or(raw.len())
    };
    let (name, port) = raw.split_at(end);
    match port.split_first() {
        None => {}
        Some((b':', digits)) if digits.iter().all(u8::is_ascii_digit) => {}
        Some(_) => return None,
    }
    let name = if bracketed { name } else { name.strip_suffix(b".").unwrap_or(name) };
    if name.is_empty() || name.len() > MAX_HOST {
        return None;
    }
    let out = &mut buf[..name.len()];
    if bracketed {
        let last = name.len() - 1;
        for (i, (o, &b)) in out.iter_mut().zip(name).enumerate() {
            let b = b.to_ascii_lowercase();
            let ok = match b {
                b'[' => i == 0,
                b']' => i == last,
                b'0'..=b'9' | b'a'..=b'f' | b':' | b'.' => true,
                _ => false,
            };
            if !ok {
                return None;
            }
            *o = b;
        }
    } else {
        // One table load per byte; OR the results so the loop has no early exit to predict.
        let mut bad = 0u8;
        for (o, &b) in out.iter_mut().zip(name) {
            let l = HOST_BYTES[b as usize];
            bad |= (l == 0) as u8;
            *o = l;
        }
        if bad != 0 {
            return None;
        }
    }
    Some(out)
}

/// A request host's byte, lowercase, or 0 for a byte no host name has.
static HOST_BYTES: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = (b as u8).to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_' || c == b'.' {
            t[b] = c;
        }
        b += 1;
    }
    t
};

/// Whether a raw path (starting with `/`) is already normalized: no `%`, no `//`, no `.` or
/// `..` segment.
#[inline]
fn is_normal(p: &[u8]) -> bool {
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'%' => return false,
            b'/' => match p.get(i + 1) {
                Some(b'/') => return false,
                Some(b'.') => match p.get(i + 2) {
                    None | Some(b'/') => return false,
                    Some(b'.') if matches!(p.get(i + 3), None | Some(b'/')) => return false,
                    _ => i += 2,
                },
                _ => i += 1,
            },
            _ => i += 1,
        }
    }
    true
}

/// The path routes match, as nginx normalizes it before location matching: `%XX` decoded (any
/// byte), repeated slashes merged, `.` and `..` segments resolved (`..` stops at the root).
/// With a bad `%` sequence nothing is decoded, the rest still applies. Returns whether it was
/// decoded too. A normalized path (the usual case) comes back borrowed; a path not starting
/// with `/` as is (it matches no route).
fn normalize_path(raw: &[u8]) -> (Cow<'_, [u8]>, bool) {
    if raw.first() != Some(&b'/') || is_normal(raw) {
        return (Cow::Borrowed(raw), false);
    }
    let decoded = if raw.contains(&b'%') { percent_decode(raw) } else { None };
    let p = decoded.as_deref().unwrap_or(raw);
    let mut out: Vec<u8> = Vec::with_capacity(p.len());
    out.push(b'/');
    // `out` ends with '/' except right after the last segment.
    let mut segments = p[1..].split(|&b| b == b'/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match seg {
            b"" | b"." => {}
            b".." => {
                if out.len() > 1 {
                    out.pop();
                    while out.last() != Some(&b'/') {
                        out.pop();
                    }
                }
            }
            _ => {
                out.extend_from_slice(seg);
                if !last {
                    out.push(b'/');
                }
            }
        }
    }
    let was_decoded = decoded.is_some();
    (Cow::Owned(out), was_decoded)
}

/// `%XX` decoded; `None` for a `%` not followed by two hex digits.
fn percent_decode(p: &[u8]) -> Option<Vec<u8>> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    let mut out = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        if p[i] == b'%' {
            let hi = hex(*p.get(i + 1)?)?;
            let lo = hex(*p.get(i + 2)?)?;
            out.push((hi << 4) | lo);
            i += 3;
        } else {
            out.push(p[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn host(s: &str) -> HostPattern {
        HostPattern::parse(Some(s)).unwrap()
    }

    fn path(s: &str) -> PathPattern {
        PathPattern::parse(Some(s)).unwrap()
    }

    fn pool(name: &str) -> RouteAction {
        RouteAction::Pool { upstream: name.into(), strip_prefix: false }
    }

    fn spec(h: &str, p: &str) -> RouteSpec {
        RouteSpec { host: host(h), path: path(p), action: pool("p") }
    }

    fn strip(p: &str) -> Entry<()> {
        Entry {
            spec: RouteSpec {
                host: HostPattern::Any,
                path: path(p),
                action: RouteAction::Pool { upstream: "p".into(), strip_prefix: true },
            },
            target: (),
        }
    }

    /// A table of `(host, path)` routes whose targets are their names `host path`.
    fn table(routes: &[(&str, &str)]) -> RouteTable<String> {
        RouteTable::new(routes.iter().map(|(h, p)| (spec(h, p), format!("{h} {p}"))).collect())
    }

    fn hit<'t>(t: &'t RouteTable<String>, h: &str, target: &str) -> Option<&'t str> {
        t.find(h.as_bytes(), target).map(|e| e.target.as_str())
    }

    #[test]
    fn host_parse_accepts() {
        for (s, want) in [
            (None, HostPattern::Any),
            (Some(""), HostPattern::Any),
            (Some("*"), HostPattern::Any),
            (Some("WWW.Example.COM"), HostPattern::Exact("www.example.com".into())),
            (Some("example.com."), HostPattern::Exact("example.com".into())),
            (Some("a_b-c.example"), HostPattern::Exact("a_b-c.example".into())),
            (Some("localhost"), HostPattern::Exact("localhost".into())),
            (Some("10.0.0.1"), HostPattern::Exact("10.0.0.1".into())),
            (Some("[::1]"), HostPattern::Exact("[::1]".into())),
            (Some("[2001:DB8::1]"), HostPattern::Exact("[2001:db8::1]".into())),
            (Some("*.Example.com"), HostPattern::Suffix(".example.com".into())),
            (Some("*.example.com."), HostPattern::Suffix(".example.com".into())),
            (Some("*.com"), HostPattern::Suffix(".com".into())),
        ] {
            assert_eq!(HostPattern::parse(s), Ok(want), "{s:?}");
        }
        let label = "a".repeat(63);
        assert!(HostPattern::parse(Some(&format!("{label}.com"))).is_ok());
        let long = [&label[..], &label, &label, &"b".repeat(61)].join(".");
        assert_eq!(long.len(), 253);
        assert_eq!(HostPattern::parse(Some(&long)), Ok(HostPattern::Exact(long.clone())));
        assert_eq!(HostPattern::parse(Some(&format!("{long}."))), Ok(HostPattern::Exact(long)));
    }

    #[test]
    fn host_parse_refuses() {
        let label = "a".repeat(64);
        let long = ["a".repeat(63), "a".repeat(63), "a".repeat(63), "b".repeat(62)].join(".");
        for (s, why) in [
            ("*.", "nothing follows"),
            ("a.*.com", "leading \"*.\""),
            ("*a.com", "leading \"*.\""),
            ("**.a.com", "leading \"*.\""),
            ("*.*.a.com", "leading \"*.\""),
            ("*.[::1]", "not an IP literal"),
            ("a.com:80", "no port: routes match the host name only"),
            ("a.com:", "no port"),
            ("[::1]:80", "no port"),
            ("::1", "in brackets"),
            ("[::1", "without \"]\""),
            ("[::1]x", "follows \"]\""),
            ("[zz]", "not an IPv6 address"),
            ("a b", "' ' is not allowed"),
            ("a/b", "'/' is not allowed"),
            ("é.com", "'é' is not allowed"),
            (".a.com", "starts with \".\""),
            (".", "empty"),
            ("a..b", "empty label"),
            ("a.com..", "empty label"),
            ("*.a..b", "empty label"),
            (&format!("{label}.com"), "longer than 63"),
            (&long, "longer than 253"),
        ] {
            let err = HostPattern::parse(Some(s)).unwrap_err();
            assert!(err.contains(why), "{s:?}: {err}");
            assert!(err.contains(&format!("{s:?}")), "{s:?}: names the value: {err}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn host_text_round_trips() {
        for s in ["", "www.example.com", "*.example.com", "[::1]", "10.1.2.3"] {
            let h = host(s);
            assert_eq!(h.text(), s);
            assert_eq!(HostPattern::parse(Some(&h.text())), Ok(h));
        }
    }

    #[test]
    fn path_parse_accepts() {
        for (s, want) in [
            (None, PathPattern::Prefix("/".into())),
            (Some("/"), PathPattern::Prefix("/".into())),
            (Some("/v1/"), PathPattern::Prefix("/v1/".into())),
            (Some("/api"), PathPattern::Prefix("/api".into())),
            (Some("=/x"), PathPattern::Exact("/x".into())),
            (Some("=/"), PathPattern::Exact("/".into())),
            (Some("/.well-known/"), PathPattern::Prefix("/.well-known/".into())),
            (Some("/a..b/c.d"), PathPattern::Prefix("/a..b/c.d".into())),
            (Some("/café"), PathPattern::Prefix("/café".into())),
        ] {
            assert_eq!(PathPattern::parse(s), Ok(want), "{s:?}");
            if let Some(s) = s {
                assert_eq!(PathPattern::parse(Some(s)).unwrap().text(), s);
            }
        }
        assert!(PathPattern::parse(Some(&format!("/{}", "a".repeat(1023)))).is_ok());
    }

    #[test]
    fn path_parse_refuses() {
        let long = format!("/{}", "a".repeat(1024));
        for (s, why) in [
            ("", "must start with \"/\""),
            ("v1", "must start with \"/\""),
            ("=", "must start with \"/\""),
            ("=x", "must start with \"/\""),
            ("==/x", "must start with \"/\""),
            ("/a b", "no whitespace"),
            ("/a\tb", "no whitespace"),
            ("/a\u{7f}", "control"),
            ("/a?b", "'?'"),
            ("/a#b", "'#'"),
            ("/a%20b", "'%'"),
            ("/a//b", "\"//\""),
            ("//", "\"//\""),
            ("/a/./b", "segment"),
            ("/a/../b", "segment"),
            ("/a/.", "segment"),
            ("/a/..", "segment"),
            ("/.", "segment"),
            ("=/..", "segment"),
            (&long, "longer than 1024"),
        ] {
            let err = PathPattern::parse(Some(s)).unwrap_err();
            assert!(err.contains(why), "{s:?}: {err}");
            assert!(err.contains(&format!("{s:?}")), "{s:?}: names the value: {err}");
        }
        assert!(PathPattern::parse(Some("/a%b")).unwrap_err().contains("normalized request path"));
    }

    #[test]
    fn origin_parse() {
        for (s, want) in [
            ("https://Example.COM", "https://example.com"),
            ("HTTP://a.com:8080/", "http://a.com:8080"),
            ("http://a.com.", "http://a.com"),
            ("http://[::1]:80", "http://[::1]:80"),
            ("https://[2001:DB8::1]", "https://[2001:db8::1]"),
            ("http://10.0.0.1:0080", "http://10.0.0.1:80"),
        ] {
            assert_eq!(parse_origin(s).as_deref(), Ok(want), "{s:?}");
        }
        for (s, why) in [
            ("ftp://a.com", "must start with"),
            ("a.com", "must start with"),
            ("http:/a.com", "must start with"),
            ("http://", "no host"),
            ("http:///", "no host"),
            ("http://:80", "no host"),
            ("http://u@a.com", "user info"),
            ("http://u:p@a.com", "user info"),
            ("http://a.com/x", "has a path"),
            ("http://a.com//", "has a path"),
            ("http://a.com?x", "query"),
            ("http://a.com/?x", "query"),
            ("http://a.com#x", "fragment"),
            ("http://a.com:", "bad port"),
            ("http://a.com:0", "bad port"),
            ("http://a.com:65536", "bad port"),
            ("http://a.com:+80", "bad port"),
            ("http://a.com:x", "bad port"),
            ("http://[::1]x", "follows \"]\""),
            ("http://[zz]", "IPv6"),
            ("http://*.a.com", "\"*\""),
            ("http://a b", "' '"),
        ] {
            let err = parse_origin(s).unwrap_err();
            assert!(err.contains(why), "{s:?}: {err}");
            assert!(err.contains(&format!("{s:?}")), "{s:?}: names the value: {err}");
        }
    }

    #[test]
    fn describe() {
        assert_eq!(spec("api.example.com", "/v1/").describe(), "api.example.com/v1/");
        assert_eq!(spec("*", "/static/").describe(), "*/static/");
        assert_eq!(spec("*.example.com", "=/x").describe(), "*.example.com=/x");
        assert_eq!(RouteSpec { host: HostPattern::Any, path: path("/"), action: pool("p") }.describe(), "*/");
    }

    #[test]
    fn host_precedence() {
        let t = table(&[
            ("*", "/"),
            ("*.example.com", "/"),
            ("*.b.example.com", "/"),
            ("a.b.example.com", "/"),
            ("*.com", "/"),
        ]);
        assert_eq!(hit(&t, "a.b.example.com", "/x"), Some("a.b.example.com /"));
        assert_eq!(hit(&t, "c.b.example.com", "/x"), Some("*.b.example.com /"));
        assert_eq!(hit(&t, "x.a.b.example.com", "/x"), Some("*.b.example.com /"));
        assert_eq!(hit(&t, "b.example.com", "/x"), Some("*.example.com /"));
        assert_eq!(hit(&t, "example.com", "/x"), Some("*.com /"));
        assert_eq!(hit(&t, "com", "/x"), Some("* /"));
        assert_eq!(hit(&t, "other.org", "/x"), Some("* /"));
        assert_eq!(hit(&t, "", "/x"), Some("* /"));
    }

    #[test]
    fn path_precedence() {
        let t = table(&[("h", "/"), ("h", "/api"), ("h", "/api/"), ("h", "/api/v1/"), ("h", "=/api/"), ("h", "=/x")]);
        assert_eq!(hit(&t, "h", "/api/"), Some("h =/api/"));
        assert_eq!(hit(&t, "h", "/api/?q"), Some("h =/api/"));
        assert_eq!(hit(&t, "h", "/api/v1/users"), Some("h /api/v1/"));
        assert_eq!(hit(&t, "h", "/api/v1"), Some("h /api/"));
        assert_eq!(hit(&t, "h", "/apix"), Some("h /api"));
        assert_eq!(hit(&t, "h", "/api"), Some("h /api"));
        assert_eq!(hit(&t, "h", "/x"), Some("h =/x"));
        assert_eq!(hit(&t, "h", "/xy"), Some("h /"));
        assert_eq!(hit(&t, "h", "/"), Some("h /"));
        // Not a path: nothing.
        assert_eq!(hit(&t, "h", "*"), None);
        assert_eq!(hit(&t, "h", ""), None);
    }

    #[test]
    fn longest_prefix_both_ways() {
        let prefixes = ["/", "/a", "/a/", "/a/b", "/a/b/c/", "/a/c", "/ab", "/b/", "/b/x/y/", "/c"];
        let routes: Vec<_> = prefixes.iter().map(|p| (spec("*", p), p.to_string())).collect();
        for lookup in [PrefixLookup::Search, PrefixLookup::Lengths, PrefixLookup::Auto] {
            let t = RouteTable::build(routes.clone(), lookup);
            // 10 prefixes of 5 lengths: Auto searches.
            assert_eq!(t.any.lengths.is_empty(), lookup != PrefixLookup::Lengths, "{lookup:?}");
            for (target, want) in [
                ("/", "/"),
                ("/a", "/a"),
                ("/a/b/c", "/a/b"),
                ("/a/b/c/d", "/a/b/c/"),
                ("/a/bb", "/a/b"),
                ("/a/c/x", "/a/c"),
                ("/a/d", "/a/"),
                ("/aa", "/a"),
                ("/abc", "/ab"),
                ("/b", "/"),
                ("/b/x/z", "/b/"),
                ("/b/x/y/z", "/b/x/y/"),
                ("/c/d", "/c"),
                ("/d", "/"),
                ("/\u{ff}", "/"),
            ] {
                let got = t.find(b"h", target).map(|e| e.target.as_str());
                assert_eq!(got, Some(want), "{target} {lookup:?}");
            }
            assert_eq!(t.find(b"h", "x"), None);
        }
    }

    #[test]
    fn falls_through_host_levels() {
        let t = table(&[
            ("a.example.com", "/admin/"),
            ("*.example.com", "/static/"),
            ("*.a.example.com", "=/x"),
            ("*", "/"),
        ]);
        assert_eq!(hit(&t, "a.example.com", "/admin/x"), Some("a.example.com /admin/"));
        assert_eq!(hit(&t, "a.example.com", "/static/x"), Some("*.example.com /static/"));
        assert_eq!(hit(&t, "a.example.com", "/other"), Some("* /"));
        assert_eq!(hit(&t, "b.a.example.com", "/x"), Some("*.a.example.com =/x"));
        assert_eq!(hit(&t, "b.a.example.com", "/static/y"), Some("*.example.com /static/"));
        assert_eq!(hit(&t, "b.a.example.com", "/y"), Some("* /"));
        let t = table(&[("a.example.com", "/admin/"), ("*.example.com", "/static/")]);
        assert_eq!(hit(&t, "a.example.com", "/other"), None);
        assert_eq!(hit(&t, "example.com", "/static/"), None);
        assert_eq!(hit(&t, "b.com", "/admin/"), None);
        assert!(RouteTable::<()>::default().find(b"a", "/").is_none());
    }

    #[test]
    fn request_hosts() {
        let t = table(&[
            ("www.example.com", "/"),
            ("[::1]", "/"),
            ("10.0.0.1", "/"),
            ("*.example.org", "/"),
            ("*", "=/any"),
        ]);
        for h in [
            "www.example.com",
            "WWW.Example.Com",
            "www.example.com.",
            "www.example.com:8080",
            "WWW.EXAMPLE.COM.:80",
            "www.example.com:",
        ] {
            assert_eq!(hit(&t, h, "/"), Some("www.example.com /"), "{h}");
        }
        for h in ["[::1]", "[::1]:8080"] {
            assert_eq!(hit(&t, h, "/"), Some("[::1] /"), "{h}");
        }
        assert_eq!(hit(&t, "10.0.0.1:80", "/"), Some("10.0.0.1 /"));
        assert_eq!(hit(&t, "A.Example.ORG.:443", "/"), Some("*.example.org /"));
        // Not plain names: any-host routes only.
        let long = format!("{}.example.org", "a".repeat(250));
        for h in [
            "www.example.com:x",
            "www.example.com:80:80",
            "[::1]:x",
            "[::1",
            "www example.com",
            "www.exämple.com",
            "",
            ".",
            &long,
        ] {
            assert_eq!(hit(&t, h, "/"), None, "{h:?}");
            assert_eq!(hit(&t, h, "/any"), Some("* =/any"), "{h:?}");
        }
        assert_eq!(t.find(b"www.example.com\xff", "/"), None);
    }

    #[test]
    fn request_paths_are_normalized() {
        let t = table(&[("*", "/"), ("*", "/api/"), ("*", "/admin/"), ("*", "=/api/x")]);
        for (target, want) in [
            ("/api/x", "* =/api/x"),
            ("/a/../api/x", "* =/api/x"),
            ("//api//x", "* =/api/x"),
            ("/%61pi/x", "* =/api/x"),
            ("/api%2Fx", "* =/api/x"),
            ("/./api/./x?q", "* =/api/x"),
            ("/../../api/x", "* =/api/x"),
            ("/api/y/..", "* /api/"),
            ("/api/y/../", "* /api/"),
            ("/api/%2e%2e/admin", "* /"),
            ("/api/%2e%2e/admin/x", "* /admin/"),
            ("/api/%2E%2e/admin/", "* /admin/"),
            ("/api/..%2fadmin/", "* /admin/"),
            ("/api/../", "* /"),
            ("/api/..", "* /"),
            ("/api/zz%zz/../../admin/", "* /admin/"),
            ("/api/%zz", "* /api/"),
            ("/a%/x", "* /"),
            ("/api/%2", "* /api/"),
            ("/api/x?/../admin/", "* =/api/x"),
            ("/api/x/%3F", "* /api/"),
            ("/.well-known/x", "* /"),
            ("/api/.x", "* /api/"),
        ] {
            assert_eq!(hit(&t, "h", target), Some(want), "{target}");
        }
        assert_eq!(normalize_path(b"/api/%ff/x"), (Cow::Owned(b"/api/\xff/x".to_vec()), true));
        assert!(matches!(normalize_path(b"/a/b.c/.d/..e"), (Cow::Borrowed(_), false)));
        assert_eq!(normalize_path(b"/a/%zz/../b").0.as_ref(), b"/a/b");
        assert_eq!(normalize_path(b"/a/.."), (Cow::Owned(b"/".to_vec()), false));
    }

    #[test]
    fn duplicates_later_wins() {
        let t = RouteTable::new(vec![(spec("h", "/"), 1), (spec("*", "/"), 2), (spec("H", "/"), 3)]);
        assert_eq!(t.len(), 2);
        assert!(!t.is_empty());
        assert_eq!(t.entries().iter().map(|e| e.target).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(t.find(b"h", "/").map(|e| e.target), Some(3));
        assert_eq!(t.find(b"g", "/").map(|e| e.target), Some(2));
        assert!(RouteTable::<u32>::default().is_empty());
        assert_eq!(t.clone(), t);
    }

    #[test]
    fn upstream_path_strips() {
        for (p, target, want, borrowed) in [
            ("/v1/", "/v1/users?a=1", "/users?a=1", true),
            ("/v1/", "/v1/", "/", true),
            ("/v1/", "/v1/?x", "/?x", true),
            ("/v1", "/v1/users", "/users", true),
            ("/v1", "/v1", "/", true),
            ("/v1", "/v1?x", "/?x", false),
            ("/v1", "/v1x/y", "/x/y", false),
            ("/", "/a?b", "/a?b", true),
            ("=/x", "/x", "/", true),
            ("=/x", "/x?q=1", "/?q=1", false),
            ("=/x", "/a/../x?q", "/?q", false),
            // Matched once normalized: stripped from the normalized path.
            ("/v1/", "//v1//users?a", "/users?a", false),
            ("/v1/", "/%76%31/a%20b/%3F", "/a%20b/%3F", false),
            ("/v1/", "/x/../v1/%zz", "/%zz", false),
            ("/v1", "/x/../v1", "/", false),
            ("/v1/", "/%76%31/%C3%A9", "/%C3%A9", false),
        ] {
            let got = strip(p).upstream_path(target);
            assert_eq!(got, want, "{p} {target}");
            assert_eq!(matches!(got, Cow::Borrowed(_)), borrowed, "{p} {target}");
        }
        // No strip, redirects, and targets the route does not match: unchanged.
        let mut e = strip("/v1/");
        assert_eq!(e.upstream_path("/other?x"), "/other?x");
        e.spec.action = pool("p");
        assert!(matches!(e.upstream_path("/v1/a?x"), Cow::Borrowed("/v1/a?x")));
        e.spec.action = RouteAction::Redirect { origin: "https://a".into() };
        assert!(matches!(e.upstream_path("/v1/a?x"), Cow::Borrowed("/v1/a?x")));
    }

    // ---- property tests: a brute-force reference ----

    /// The request host as routes see it, the obvious way.
    fn ref_host(raw: &[u8]) -> Option<Vec<u8>> {
        let s = std::str::from_utf8(raw).ok()?.to_ascii_lowercase();
        let (name, port) = if s.starts_with('[') {
            let close = s.find(']')?;
            (s[..=close].to_string(), s[close + 1..].to_string())
        } else {
            match s.split_once(':') {
                Some((n, p)) => (n.strip_suffix('.').unwrap_or(n).to_string(), format!(":{p}")),
                None => (s.strip_suffix('.').unwrap_or(&s).to_string(), String::new()),
            }
        };
        if !(port.is_empty() || (port.starts_with(':') && port[1..].chars().all(|c| c.is_ascii_digit()))) {
            return None;
        }
        let ok = if name.starts_with('[') {
            name.len() >= 2 && name[1..name.len() - 1].chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        } else {
            name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
        };
        (ok && !name.is_empty() && name.len() <= 253).then(|| name.into_bytes())
    }

    /// The request path as routes see it, the obvious way.
    fn ref_path(target: &str) -> Vec<u8> {
        let path = target.split('?').next().unwrap().as_bytes();
        if !path.starts_with(b"/") {
            return path.to_vec();
        }
        let mut bytes = Vec::new();
        let mut i = 0;
        let mut bad = false;
        while i < path.len() {
            if path[i] == b'%' {
                match path
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) if path[i + 1].is_ascii_hexdigit() && path[i + 2].is_ascii_hexdigit() => {
                        bytes.push(b);
                        i += 3;
                        continue;
                    }
                    _ => bad = true,
                }
            }
            bytes.push(path[i]);
            i += 1;
        }
        let p = if bad { path.to_vec() } else { bytes };
        let segments: Vec<&[u8]> = p[1..].split(|&b| b == b'/').collect();
        let mut stack: Vec<&[u8]> = Vec::new();
        let mut trailing = false;
        for (n, seg) in segments.iter().enumerate() {
            trailing = n + 1 == segments.len() && matches!(*seg, b"" | b"." | b"..");
            match *seg {
                b"" | b"." => {}
                b".." => {
                    stack.pop();
                }
                s => stack.push(s),
            }
        }
        let mut out = b"/".to_vec();
        out.extend(stack.join(&b'/'));
        if trailing && out.len() > 1 {
            out.push(b'/');
        }
        out
    }

    fn ref_host_matches(pattern: &HostPattern, host: Option<&[u8]>) -> bool {
        match (pattern, host) {
            (HostPattern::Any, _) => true,
            (HostPattern::Exact(h), Some(host)) => h.as_bytes() == host,
            (HostPattern::Suffix(s), Some(host)) => host.len() > s.len() && host.ends_with(s.as_bytes()),
            (_, None) => false,
        }
    }

    fn ref_path_matches(pattern: &PathPattern, path: &[u8]) -> bool {
        match pattern {
            PathPattern::Prefix(p) => path.starts_with(p.as_bytes()),
            PathPattern::Exact(p) => path == p.as_bytes(),
        }
    }

    /// The route for a request, by scanning every route for the most specific match.
    fn ref_find<'t>(routes: &'t [(RouteSpec, usize)], host: &[u8], target: &str) -> Option<&'t (RouteSpec, usize)> {
        let host = ref_host(host);
        let path = ref_path(target);
        routes
            .iter()
            .filter(|(s, _)| ref_host_matches(&s.host, host.as_deref()) && ref_path_matches(&s.path, &path))
            .max_by_key(|(s, _)| {
                let h = match &s.host {
                    HostPattern::Any => 0,
                    HostPattern::Suffix(x) => x.len(),
                    HostPattern::Exact(_) => 1000,
                };
                let p = match &s.path {
                    PathPattern::Prefix(x) => x.len(),
                    PathPattern::Exact(_) => usize::MAX,
                };
                (h, p)
            })
    }

    fn route_spec() -> impl Strategy<Value = RouteSpec> {
        let hosts = prop::sample::select(vec![
            "*",
            "a.com",
            "b.a.com",
            "x.b.a.com",
            "com",
            "*.a.com",
            "*.b.a.com",
            "*.com",
            "*.x.b.a.com",
            "[::1]",
            "10.0.0.1",
            "*.0.1",
        ]);
        let paths = prop::sample::select(vec![
            "/", "/a", "/a/", "/ab", "/a/b", "/a/b/", "/b", "/b/", "/ä", "=/", "=/a", "=/a/", "=/a/b", "=/b/", "=/ab",
        ]);
        (hosts, paths, any::<bool>()).prop_map(|(h, p, strip_prefix)| RouteSpec {
            host: host(h),
            path: path(p),
            action: RouteAction::Pool { upstream: "p".into(), strip_prefix },
        })
    }

    fn request_host() -> impl Strategy<Value = Vec<u8>> {
        let known = prop::sample::select(vec![
            "a.com",
            "A.COM.",
            "b.a.com:80",
            "x.b.a.com",
            "y.x.b.a.com.:443",
            "q.b.a.com",
            "com",
            "a.com:",
            "a.com:x",
            "[::1]",
            "[::1]:8080",
            "10.0.0.1",
            "9.10.0.1",
            "",
            ".",
            ".a.com",
            "a..com",
            "a b.com",
            "[::1",
        ])
        .prop_map(|s| s.as_bytes().to_vec());
        let random = prop::collection::vec(prop::sample::select(b"aAbcxXom.:[]19 _-\xc3".to_vec()), 0..14);
        prop_oneof![known, random]
    }

    fn request_target() -> impl Strategy<Value = String> {
        let tokens = prop::sample::select(vec![
            "/", "/", "/", "a", "b", "ab", "ä", ".", "..", "%61", "%2e", "%2E", "%2f", "%zz", "%", "%C3%A4", "?", "x",
            "=",
        ]);
        (prop::collection::vec(tokens, 0..10), any::<bool>()).prop_map(|(t, slash)| {
            let s = t.concat();
            if slash { format!("/{s}") } else { s }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn find_agrees_with_brute_force(
            specs in prop::collection::vec(route_spec(), 0..14),
            requests in prop::collection::vec((request_host(), request_target()), 1..8),
        ) {
            let routes: Vec<(RouteSpec, usize)> = specs.into_iter().enumerate().map(|(i, s)| (s, i)).collect();
            // Prefixes by binary search, by length probes, and as `new` chooses.
            for lookup in [PrefixLookup::Search, PrefixLookup::Lengths, PrefixLookup::Auto] {
                let t = RouteTable::build(routes.clone(), lookup);
                for (h, target) in &requests {
                    let got = t.find(h, target).map(|e| (&e.spec, e.target));
                    let want = ref_find(&routes, h, target).map(|(s, i)| (s, *i));
                    prop_assert_eq!(got, want, "host {:?} target {:?} {:?}", String::from_utf8_lossy(h), target, lookup);
                }
            }
        }

        #[test]
        fn upstream_path_starts_with_slash_keeps_query(
            specs in prop::collection::vec(route_spec(), 1..8),
            h in request_host(),
            target in request_target(),
        ) {
            let t = RouteTable::new(specs.into_iter().map(|s| (s, ())).collect());
            if let Some(e) = t.find(&h, &target) {
                let up = e.upstream_path(&target);
                let query = target.find('?').map_or("", |q| &target[q..]);
                prop_assert!(up.starts_with('/'), "{:?} -> {:?}", target, up);
                prop_assert!(up.ends_with(query), "{:?} -> {:?}", target, up);
                let up_path = &up[..up.len() - query.len()];
                prop_assert!(!up_path.contains('?'), "{:?} -> {:?}", target, up);
                if matches!(e.spec.action, RouteAction::Pool { strip_prefix: false, .. }) {
                    prop_assert_eq!(&*up, &*target);
                }
            }
        }
    }
}
