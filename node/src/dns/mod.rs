//! The health-aware DNS responder (PRODUCT.md §5.6): for the configured name, A/AAAA records
//! of the *alive* members' advertise addresses only (never draining, left or dead ones),
//! shuffled per answer, with a short TTL. Every node answers from its own cluster view, so any
//! node gives the same set once gossip has converged. Other names get REFUSED; malformed
//! queries get FORMERR (or are dropped when not even the id can be read). UDP only: answers
//! for a few dozen nodes fit in one datagram.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::Node;
use crate::config::DnsSettings;
use crate::lifecycle::MemberState;

/// Builds the reply to one query datagram. `None` = drop it.
pub fn answer(query: &[u8], name: &Name, ttl: u32, alive: &[IpAddr]) -> Option<Vec<u8>> {
    let request = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => {
            if query.len() < 2 {
                return None;
            }
            let id = u16::from_be_bytes([query[0], query[1]]);
            return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec().ok();
        }
    };
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let id = request.metadata.id;
    if request.metadata.op_code != OpCode::Query || request.queries.len() != 1 {
        return Message::error_msg(id, request.metadata.op_code, ResponseCode::NotImp).to_vec().ok();
    }
    let q = &request.queries[0];
    let mut reply = Message::response(id, OpCode::Query);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.add_query(q.clone());
    if q.name().to_lowercase().to_string().trim_end_matches('.')
        != name.to_lowercase().to_string().trim_end_matches('.')
    {
        reply.metadata.response_code = ResponseCode::Refused;
        return reply.to_vec().ok();
    }
    reply.metadata.authoritative = true;
    let mut addrs: Vec<IpAddr> = alive
        .iter()
        .copied()
        .filter(|a| match q.query_type() {
            RecordType::A => a.is_ipv4(),
            RecordType::AAAA => a.is_ipv6(),
            _ => false,
        })
        .collect();
    addrs.sort();
    addrs.dedup();
    fastrand::shuffle(&mut addrs);
    for a in addrs {
        let rdata = match a {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        reply.add_answer(Record::from_rdata(q.name().clone(), ttl, rdata));
    }
    reply.to_vec().ok()
}

/// The advertise addresses of the members that should receive clients now.
pub fn alive_addresses(node: &Node) -> Vec<IpAddr> {
    let Some(cluster) = node.cluster.get() else { return Vec::new() };
    cluster
        .view
        .load()
        .members
        .iter()
        .filter(|m| if m.is_self { node.lifecycle.get() == MemberState::Alive } else { m.state == MemberState::Alive })
        .filter_map(|m| m.proxy_addr.map(|a| a.ip()))
        .collect()
}

/// Answers queries on `socket` until `stop` fires.
pub async fn serve(socket: UdpSocket, node: Arc<Node>, settings: DnsSettings, stop: CancellationToken) {
    let name = match Name::from_ascii(&settings.name) {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(name = %settings.name, error = %e, "bad dns.name; DNS responder off");
            return;
        }
    };
    let ttl = settings.ttl.as_secs().clamp(0, u32::MAX as u64) as u32;
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = tokio::select! {
            _ = stop.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "dns recv failed");
                    continue;
                }
            },
        };
        if let Some(reply) = answer(&buf[..n], &name, ttl, &alive_addresses(&node)) {
            let _ = socket.send_to(&reply, from).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(42, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    #[test]
    fn answers_alive_members_only_for_its_name() {
        let name = Name::from_ascii("lb.example.internal").unwrap();
        let alive: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), "::1".parse().unwrap()];
        let r = Message::from_vec(&answer(&query("LB.example.internal.", RecordType::A), &name, 5, &alive).unwrap())
            .unwrap();
        assert_eq!(r.metadata.id, 42);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 2);
        assert!(r.answers.iter().all(|a| a.ttl == 5));
        let r = Message::from_vec(&answer(&query("lb.example.internal", RecordType::AAAA), &name, 5, &alive).unwrap())
            .unwrap();
        assert_eq!(r.answers.len(), 1);
        let r = Message::from_vec(&answer(&query("other.example", RecordType::A), &name, 5, &alive).unwrap()).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        assert!(r.answers.is_empty());
        // garbage: FORMERR with the id, or dropped
        let r = Message::from_vec(&answer(&[0, 7, 0xff, 0xff, 1], &name, 5, &alive).unwrap()).unwrap();
        assert_eq!((r.metadata.id, r.metadata.response_code), (7, ResponseCode::FormErr));
        assert!(answer(&[1], &name, 5, &alive).is_none());
    }
}
