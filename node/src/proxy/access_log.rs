//! The access log: one line per request in nginx `combined` format, followed by the backend,
//! its pool, the route that chose the pool, the upstream time and the node
//! (`backend=10.0.0.1:8000 pool=api route=api.example.com/v1/ upstream_time=0.004 node=lb-1`;
//! `-` for what does not apply).
//! Lines go through a bounded channel to one writer task; when the disk cannot keep up, lines
//! are dropped and counted rather than slowing requests.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, StatusCode};

/// Lines buffered between requests and the writer.
const QUEUE: usize = 8192;

pub struct AccessLog {
    tx: tokio::sync::mpsc::Sender<String>,
    pub dropped: AtomicU64,
}

/// The request half of a log line, captured before the request is consumed.
#[derive(Debug)]
pub struct RequestLine {
    remote: std::net::IpAddr,
    request: String,
    referer: String,
    user_agent: String,
    /// The pool the request went to, and the route that chose it.
    pool: Option<std::sync::Arc<str>>,
    route: Option<std::sync::Arc<str>>,
}

impl RequestLine {
    pub fn new(remote: std::net::IpAddr, request: String, referer: Option<String>, user_agent: Option<String>) -> Self {
        RequestLine {
            remote,
            request,
            referer: referer.unwrap_or_else(|| "-".to_owned()),
            user_agent: user_agent.unwrap_or_else(|| "-".to_owned()),
            pool: None,
            route: None,
        }
    }

    /// Names the pool and route of the request.
    pub fn routed(mut self, pool: &std::sync::Arc<str>, route: Option<&std::sync::Arc<str>>) -> Self {
        self.pool = Some(pool.clone());
        self.route = route.cloned();
        self
    }
}

impl AccessLog {
    /// Opens (appends to) the log file and starts its writer task.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(QUEUE);
        std::thread::Builder::new().name("access-log".into()).spawn(move || {
            let mut out = std::io::BufWriter::with_capacity(64 * 1024, file);
            while let Some(line) = rx.blocking_recv() {
                let _ = out.write_all(line.as_bytes());
                while let Ok(more) = rx.try_recv() {
                    let _ = out.write_all(more.as_bytes());
                }
                let _ = out.flush();
            }
        })?;
        Ok(AccessLog { tx, dropped: AtomicU64::new(0) })
    }

    /// Queues one line; `bytes` is the response body size when known.
    pub fn write(
        &self,
        line: &RequestLine,
        status: StatusCode,
        bytes: Option<u64>,
        backend: Option<&str>,
        upstream: Duration,
        node: &HeaderValue,
    ) {
        let bytes = bytes.map_or_else(|| "-".to_string(), |n| n.to_string());
        let text = format!(
            "{} - - [{}] \"{}\" {} {} \"{}\" \"{}\" backend={} pool={} route={} upstream_time={:.3} node={}\n",
            line.remote,
            time_local(SystemTime::now()),
            line.request.escape_debug(),
            status.as_u16(),
            bytes,
            line.referer.escape_debug(),
            line.user_agent.escape_debug(),
            backend.unwrap_or("-"),
            line.pool.as_deref().unwrap_or("-"),
            line.route.as_deref().unwrap_or("-"),
            upstream.as_secs_f64(),
            node.to_str().unwrap_or("-"),
        );
        if self.tx.try_send(text).is_err() {
            self.dropped.fetch_add(1, Relaxed);
        }
    }
}

/// nginx `$time_local` in UTC: `10/Oct/2000:13:55:36 +0000`.
pub fn time_local(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = crate::civil::ymd(secs);
    format!(
        "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_format() {
        let t = UNIX_EPOCH + Duration::from_secs(971_185_736); // 2000-10-10 13:48:56 UTC
        assert_eq!(time_local(t), "10/Oct/2000:13:48:56 +0000");
    }
}
