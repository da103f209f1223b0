//! `/cluster`: the dashboard's view of every member. This node asks each live peer's admin port
//! for its `/history` (all at once, each bounded in time and size) and answers with its own and
//! theirs, so a browser that reaches one node sees the whole cluster. A peer that does not
//! answer is listed with the reason, never waited for past [`TIMEOUT`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::history::History;
use crate::Node;

/// The longest a peer's answer is waited for (connect, request and body).
pub const TIMEOUT: Duration = Duration::from_millis(1500);

/// The largest `/history` body read from a peer.
const MAX_BODY: usize = 16 << 20;

/// This node's history and every member's, for the last `last` samples.
pub async fn cluster_json(node: &Arc<Node>, history: &Mutex<History>, last: usize) -> Value {
    let own = history.lock().unwrap_or_else(|e| e.into_inner()).to_json(node, last);
    let view = node.cluster.get().map(|c| c.view.load_full());
    let members = view.as_ref().map(|v| v.members.clone()).unwrap_or_default();
    let fetches = members.iter().filter(|m| !m.is_self).map(|m| {
        let (id, state, admin) = (m.node_id.clone(), m.state.name(), m.admin_addr);
        let serving = m.state.serves();
        async move {
            let result = match admin {
                _ if !serving => Err(format!("not asked: {state}")),
                None => Err("no admin address in gossip".to_string()),
                // A peer whose admin port is bound to loopback advertises 127.0.0.1, which is
                // this host: only an answer in the peer's own name counts.
                Some(addr) => fetch_history(addr, last).await.and_then(|h| match h["node"].as_str() {
                    Some(n) if n == id => Ok(h),
                    other => Err(format!(
                        "{addr} answers as node {} (is the peer's admin port reachable from here?)",
                        other.unwrap_or("?")
                    )),
                }),
            };
            match result {
                Ok(history) => json!({"id": id, "state": state, "ok": true, "history": history}),
                Err(error) => json!({"id": id, "state": state, "ok": false, "error": error}),
            }
        }
    });
    let mut nodes =
        vec![json!({"id": node.id(), "state": node.lifecycle.get().name(), "ok": true, "self": true, "history": own})];
    nodes.extend(join_all(fetches).await);
    json!({ "self": node.id(), "nodes": nodes })
}

/// Runs the futures concurrently and returns their outputs in order.
async fn join_all<F>(fs: impl Iterator<Item = F>) -> Vec<Value>
where
    F: std::future::Future<Output = Value> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    let mut n = 0;
    for (i, f) in fs.enumerate() {
        n += 1;
        set.spawn(async move { (i, f.await) });
    }
    // A fetch that panicked leaves its slot null; the others still count.
    let mut out = vec![Value::Null; n];
    while let Some(joined) = set.join_next().await {
        if let Ok((i, v)) = joined {
            out[i] = v;
        }
    }
    out
}

/// `GET /history?last=N` on a peer's admin port.
async fn fetch_history(addr: SocketAddr, last: usize) -> Result<Value, String> {
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        tokio::spawn(conn);
        let req = http::Request::get(format!("/history?last={last}"))
            .header(http::header::HOST, addr.to_string())
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| format!("{addr}: {e}"))?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("{addr} answered {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("{addr}: body: {e}"))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("{addr}: not JSON: {e}"))
    };
    match tokio::time::timeout(TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("{addr}: no answer within {TIMEOUT:?}")),
    }
}
