//! What a node persisted in `data_dir/shoal-state.bin` (OPERATIONS: "bincode, written
//! atomically"), read with mirror types of the documented layout, so a test can wait until a
//! node has written what it merged instead of sleeping.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum RegOp {
    Add,
    Remove,
    Drain,
}

/// One registry entry as persisted (format 3: the pool first).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RegEntry {
    pub pool: String,
    pub addr: SocketAddr,
    pub hlc: u64,
    pub op: RegOp,
    pub weight: u32,
    pub max_conns: u32,
    pub backup: bool,
    pub origin: String,
}

/// The layout's first fields (`format, generation, registry`, then certificates and routes).
#[derive(Debug, Clone, Deserialize)]
pub struct Persisted {
    pub format: u32,
    pub generation: u64,
    pub registry: Vec<RegEntry>,
}

/// Reads `<data_dir>/shoal-state.bin` (an error when absent or unreadable).
pub fn read(data_dir: &Path) -> anyhow::Result<Persisted> {
    let path = data_dir.join("shoal-state.bin");
    let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    let (state, _): (Persisted, usize) = bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
        .with_context(|| format!("decode {}", path.display()))?;
    Ok(state)
}

/// The persisted registry entry for `addr` in the default pool, if any.
pub fn entry(data_dir: &Path, addr: SocketAddr) -> Option<RegEntry> {
    entry_in(data_dir, "default", addr)
}

/// The persisted registry entry for `addr` in `pool`, if any.
pub fn entry_in(data_dir: &Path, pool: &str, addr: SocketAddr) -> Option<RegEntry> {
    read(data_dir).ok()?.registry.into_iter().find(|e| e.addr == addr && e.pool == pool)
}
