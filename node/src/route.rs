//! Route table (placeholder with the final API; replaced by the real table).

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Any,
    Exact(String),
    Suffix(String),
}

impl HostPattern {
    pub fn parse(s: Option<&str>) -> Result<Self, String> {
        Ok(match s {
            None | Some("") | Some("*") => HostPattern::Any,
            Some(s) if s.starts_with("*.") => HostPattern::Suffix(s[1..].to_ascii_lowercase()),
            Some(s) if s.contains(':') || s.contains(' ') => return Err(format!("host {s:?} is not a host name")),
            Some(s) => HostPattern::Exact(s.to_ascii_lowercase()),
        })
    }
    pub fn text(&self) -> String {
        match self {
            HostPattern::Any => String::new(),
            HostPattern::Exact(h) => h.clone(),
            HostPattern::Suffix(s) => format!("*{s}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Prefix(String),
    Exact(String),
}

impl PathPattern {
    pub fn parse(s: Option<&str>) -> Result<Self, String> {
        Ok(match s {
            None => PathPattern::Prefix("/".into()),
            Some(s) if s.starts_with("=/") => PathPattern::Exact(s[1..].into()),
            Some(s) if s.starts_with('/') => PathPattern::Prefix(s.into()),
            Some(s) => return Err(format!("path {s:?} must start with /")),
        })
    }
    pub fn text(&self) -> String {
        match self {
            PathPattern::Prefix(p) => p.clone(),
            PathPattern::Exact(p) => format!("={p}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteAction {
    Pool { upstream: String, strip_prefix: bool },
    Redirect { origin: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub host: HostPattern,
    pub path: PathPattern,
    pub action: RouteAction,
}

impl RouteSpec {
    pub fn describe(&self) -> String {
        let host = self.host.text();
        format!("{}{}", if host.is_empty() { "*".to_string() } else { host }, self.path.text())
    }
}

pub fn parse_origin(s: &str) -> Result<String, String> {
    if s.starts_with("http://") || s.starts_with("https://") {
        Ok(s.trim_end_matches('/').to_ascii_lowercase())
    } else {
        Err(format!("redirect {s:?} is not an http(s) origin"))
    }
}

#[derive(Debug, Clone)]
pub struct Entry<T> {
    pub spec: RouteSpec,
    pub target: T,
}

#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    entries: Vec<Entry<T>>,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        RouteTable { entries: Vec::new() }
    }
}

impl<T> RouteTable<T> {
    pub fn new(routes: Vec<(RouteSpec, T)>) -> Self {
        RouteTable { entries: routes.into_iter().map(|(spec, target)| Entry { spec, target }).collect() }
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn entries(&self) -> &[Entry<T>] {
        &self.entries
    }
    pub fn find(&self, host: &[u8], target: &str) -> Option<&Entry<T>> {
        let host = String::from_utf8_lossy(host).to_ascii_lowercase();
        let host = host.split(':').next().unwrap_or("");
        let path = target.split('?').next().unwrap_or("");
        let rank = |e: &Entry<T>| -> Option<(u8, usize, u8, usize)> {
            let h = match &e.spec.host {
                HostPattern::Any => (0, 0),
                HostPattern::Exact(x) if x == host => (2, 0),
                HostPattern::Suffix(s) if host.ends_with(s.as_str()) => (1, s.len()),
                _ => return None,
            };
            let p = match &e.spec.path {
                PathPattern::Exact(x) if x == path => (1, 0),
                PathPattern::Prefix(x) if path.starts_with(x.as_str()) => (0, x.len()),
                _ => return None,
            };
            Some((h.0, h.1, p.0, p.1))
        };
        self.entries.iter().filter_map(|e| rank(e).map(|r| (r, e))).max_by_key(|(r, _)| *r).map(|(_, e)| e)
    }
}

impl<T> Entry<T> {
    pub fn upstream_path<'a>(&self, target: &'a str) -> Cow<'a, str> {
        match (&self.spec.action, &self.spec.path) {
            (RouteAction::Pool { strip_prefix: true, .. }, PathPattern::Prefix(p) | PathPattern::Exact(p)) => {
                let rest = target.get(p.len()..).unwrap_or("");
                if rest.starts_with('/') { Cow::Borrowed(rest) } else { Cow::Owned(format!("/{rest}")) }
            }
            _ => Cow::Borrowed(target),
        }
    }
}
