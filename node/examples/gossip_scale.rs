//! Gossip at scale: N Shoal gossip members in one process over UDP on loopback, with Shoal's
//! chitchat settings, its encrypted transport, its gossip pace (`BUDGET` bytes/s, default
//! Shoal's; 0 = no limit) and its spreading of hot changes. Each member publishes per-backend
//! in-flight counts every interval, like a loaded node. Measures: time until all members see
//! each other, gossip bytes per member per second, time for one registry change to reach every
//! member, and time until a killed member is dead on every other.
//!
//!     [BUDGET=8192] cargo run --release -p shoal-node --example gossip_scale -- [NODES=50] [BACKENDS=4]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use chitchat::{ChitchatHandle, ChitchatId, spawn_chitchat};
use shoal_node::cluster::pace::Pace;
use shoal_node::cluster::{chitchat_config, keys, rumor, transport};
use shoal_node::config::DEFAULT_GOSSIP_BUDGET;
use tokio::sync::Notify;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let nodes = args.first().copied().unwrap_or(50);
    let backends = args.get(1).copied().unwrap_or(4);
    let budget = std::env::var("BUDGET").ok().and_then(|b| b.parse().ok()).unwrap_or(DEFAULT_GOSSIP_BUDGET);
    let interval = Duration::from_millis(150);
    let base = 27000u16;
    let counters = Arc::new(transport::GossipCounters::default());
    let secret = b"gossip-scale-benchmark-secret";
    let mut handles: Vec<Arc<ChitchatHandle>> = Vec::new();
    let mut paces: Vec<Arc<Pace>> = Vec::new();
    let mut spreaders = Vec::new();
    let mut subscriptions = Vec::new();
    let seeds: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", base + i)).collect();
    for i in 0..nodes {
        let addr = SocketAddr::from(([127, 0, 0, 1], base + i as u16));
        let id = ChitchatId::new(format!("n{i}"), 1, addr);
        let config = chitchat_config(id, "scale", interval, addr, seeds.clone());
        let pace = Arc::new(Pace::new(budget));
        let t = transport::SealedTransport::new(secret, counters.clone(), pace.clone());
        let handle = Arc::new(spawn_chitchat(config, vec![(keys::STATE.into(), "alive".into())], &t).await?);
        let hot = Arc::new(Notify::new());
        subscriptions.push(rumor::watch(&handle.chitchat(), std::slice::from_ref(&hot)).await);
        let h = handle.clone();
        let gossip = move |peer| {
            let _ = h.gossip(peer);
        };
        spreaders.push(tokio::spawn(rumor::spread_loop(handle.chitchat(), pace.clone(), hot, gossip)));
        handles.push(handle);
        paces.push(pace);
    }
    let started = Instant::now();
    loop {
        let mut min_live = usize::MAX;
        for h in &handles {
            min_live = min_live.min(h.with_chitchat(|c| c.live_nodes().count()).await);
        }
        if min_live == nodes {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "membership did not converge in 60 s (min live {min_live})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "members: {nodes}, backends per member: {backends}, gossip interval {interval:?}, budget {budget} B/s{}",
        if budget == 0 { " (no limit)" } else { "" }
    );
    println!("membership converged (every member sees all {nodes}) in {:.2} s", started.elapsed().as_secs_f64());

    // Load traffic: every member changes its in-flight counts every interval.
    let chitchats: Vec<_> = handles.iter().map(|h| h.chitchat()).collect();
    let load_task = {
        let chitchats = chitchats.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            for round in 0u64.. {
                tick.tick().await;
                for (i, c) in chitchats.iter().enumerate() {
                    let mut c = c.lock().await;
                    for b in 0..backends {
                        let backend = SocketAddr::from(([10, 0, 0, b as u8 + 1], 8000));
                        c.self_node_state()
                            .set(keys::load_key("default", backend), ((round + i as u64 + b as u64) % 17).to_string());
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = || paces.iter().map(|p| p.held_back.load(Relaxed)).sum::<u64>();
    let (b0, d0, h0, t0) =
        (counters.sent_bytes.load(Relaxed), counters.sent_datagrams.load(Relaxed), held(), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let secs = t0.elapsed().as_secs_f64();
    let bytes = counters.sent_bytes.load(Relaxed) - b0;
    let per_node = bytes as f64 / secs / nodes as f64;
    let datagrams = (counters.sent_datagrams.load(Relaxed) - d0) as f64 / secs / nodes as f64;
    let held = (held() - h0) as f64 / secs / nodes as f64;
    println!(
        "gossip sent with load updates: {:.1} KB/s per member ({datagrams:.1} datagrams/s; {held:.1} SYNs/s held back by the pace)",
        per_node / 1024.0,
    );

    // Propagation of one registry change from member 0 to every member.
    let mut times = Vec::new();
    for round in 0..5 {
        let backend = SocketAddr::from(([10, 9, 9, round as u8 + 1], 80));
        let value = format!("{}|add|1|0|0|n0", 1000 + round);
        let t = Instant::now();
        chitchats[0].lock().await.self_node_state().set(keys::reg_key("default", backend), value.clone());
        let key = keys::reg_key("default", backend);
        let source = handles[0].chitchat_id().clone();
        loop {
            let mut all = true;
            for c in &chitchats {
                let c = c.lock().await;
                if c.node_state(&source).and_then(|s| s.get(&key)) != Some(value.as_str()) {
                    all = false;
                    break;
                }
            }
            if all {
                break;
            }
            anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "change did not reach every member in 30 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "registry change reached all {nodes} members: median {:.0} ms, max {:.0} ms (5 changes)",
        times[2], times[4]
    );

    // A member killed (silent at once): how long until every other member has it dead.
    let victim = nodes - 1;
    let victim_id = handles[victim].chitchat_id().clone();
    spreaders[victim].abort();
    handles[victim].abort();
    let t = Instant::now();
    let mut dead_at: Vec<Option<f64>> = vec![None; nodes - 1];
    while dead_at.iter().any(Option::is_none) {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "a killed member was not dead everywhere in 60 s");
        for (i, c) in chitchats[..nodes - 1].iter().enumerate() {
            if dead_at[i].is_none() && !c.lock().await.live_nodes().any(|id| *id == victim_id) {
                dead_at[i] = Some(t.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut dead_at: Vec<f64> = dead_at.into_iter().flatten().collect();
    dead_at.sort_by(|a, b| a.total_cmp(b));
    println!(
        "killed member dead on the others: median {:.2} s, last {:.2} s",
        dead_at[dead_at.len() / 2],
        dead_at[dead_at.len() - 1]
    );
    println!("rejected datagrams: {}", counters.rejected.load(Relaxed));
    load_task.abort();
    spreaders.iter().for_each(|s| s.abort());
    drop(subscriptions);
    for h in handles {
        let _ = h.initiate_shutdown();
    }
    Ok(())
}
