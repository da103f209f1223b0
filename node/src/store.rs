//! On-disk state in `data_dir` (the only module that uses bincode): the registry (backends of
//! every pool, routes and sealed cluster certificates) and the last generation this node ran
//! with. Written atomically (temp file + rename), so a crash
//! leaves either the old or the new state, never half of one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cluster::registry::{CertEntry, RegEntry, RegOp, RouteEntry};
use crate::config::DEFAULT_POOL;

/// Bumped when the layout changes; an unknown version is refused, not misread. Versions 1 (no
/// certificates) and 2 (one pool, no routes) are still read.
const FORMAT_VERSION: u32 = 3;
const FILE_NAME: &str = "shoal-state.bin";

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    pub format: u32,
    pub generation: u64,
    pub registry: Vec<RegEntry>,
    /// Cluster certificates, still sealed with the cluster secret.
    pub certs: Vec<CertEntry>,
    pub routes: Vec<RouteEntry>,
}

/// A backend entry of versions 1 and 2 (one pool: the default).
#[derive(Clone, Serialize, Deserialize)]
struct RegEntryV2 {
    addr: std::net::SocketAddr,
    hlc: u64,
    op: RegOp,
    weight: u32,
    max_conns: u32,
    backup: bool,
    origin: String,
}

impl From<RegEntryV2> for RegEntry {
    fn from(e: RegEntryV2) -> Self {
        RegEntry {
            pool: DEFAULT_POOL.into(),
            addr: e.addr,
            hlc: e.hlc,
            op: e.op,
            weight: e.weight,
            max_conns: e.max_conns,
            backup: e.backup,
            origin: e.origin,
        }
    }
}

/// The layout of format version 1.
#[derive(Serialize, Deserialize)]
struct PersistedV1 {
    format: u32,
    generation: u64,
    registry: Vec<RegEntryV2>,
}

/// The layout of format version 2.
#[derive(Serialize, Deserialize)]
struct PersistedV2 {
    format: u32,
    generation: u64,
    registry: Vec<RegEntryV2>,
    certs: Vec<CertEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: corrupt state file: {message}")]
    Corrupt { path: String, message: String },
}

pub fn path_in(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Loads the state, or the empty state if there is no file yet.
pub fn load(dir: &Path) -> Result<Persisted, StoreError> {
    let path = path_in(dir);
    let shown = path.display().to_string();
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Persisted { format: FORMAT_VERSION, ..Default::default() });
        }
        Err(source) => return Err(StoreError::Io { path: shown, source }),
    };
    let corrupt = |message: String| StoreError::Corrupt { path: shown.clone(), message };
    let cfg = bincode::config::standard();
    // The format number comes first in every version.
    let (format, _): (u32, usize) =
        bincode::serde::decode_from_slice(&bytes, cfg).map_err(|e| corrupt(e.to_string()))?;
    let state = match format {
        FORMAT_VERSION => {
            bincode::serde::decode_from_slice::<Persisted, _>(&bytes, cfg).map_err(|e| corrupt(e.to_string()))?.0
        }
        1 | 2 => {
            let v2: PersistedV2 = if format == 2 {
                bincode::serde::decode_from_slice(&bytes, cfg).map_err(|e| corrupt(e.to_string()))?.0
            } else {
                let (v1, _): (PersistedV1, usize) =
                    bincode::serde::decode_from_slice(&bytes, cfg).map_err(|e| corrupt(e.to_string()))?;
                PersistedV2 { format: v1.format, generation: v1.generation, registry: v1.registry, certs: Vec::new() }
            };
            Persisted {
                format: v2.format,
                generation: v2.generation,
                registry: v2.registry.into_iter().map(RegEntry::from).collect(),
                certs: v2.certs,
                routes: Vec::new(),
            }
        }
        other => return Err(corrupt(format!("format version {other} is not {FORMAT_VERSION}"))),
    };
    Ok(state)
}

/// Saves the state atomically.
pub fn save(dir: &Path, state: &Persisted) -> Result<(), StoreError> {
    let io = |source, p: &Path| StoreError::Io { path: p.display().to_string(), source };
    std::fs::create_dir_all(dir).map_err(|e| io(e, dir))?;
    let path = path_in(dir);
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    let mut state = state.clone();
    state.format = FORMAT_VERSION;
    let bytes = bincode::serde::encode_to_vec(&state, bincode::config::standard())
        .map_err(|e| StoreError::Corrupt { path: path.display().to_string(), message: e.to_string() })?;
    std::fs::write(&tmp, bytes).map_err(|e| io(e, &tmp))?;
    std::fs::rename(&tmp, &path).map_err(|e| io(e, &path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("shoal-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(load(&dir).unwrap().registry.len(), 0);
        let state = Persisted {
            format: FORMAT_VERSION,
            generation: 7,
            registry: vec![RegEntry {
                pool: "default".into(),
                addr: "10.0.0.1:80".parse().unwrap(),
                hlc: 1,
                op: RegOp::Add,
                weight: 2,
                max_conns: 0,
                backup: false,
                origin: "a".into(),
            }],
            certs: vec![CertEntry {
                name: "www.example".into(),
                hlc: 2,
                op: crate::cluster::registry::CertOp::Add,
                origin: "a".into(),
                sealed: vec![1, 2, 3],
            }],
            routes: vec![RouteEntry {
                host: "api.example.com".into(),
                path: "/v1/".into(),
                hlc: 3,
                op: crate::cluster::registry::CertOp::Add,
                upstream: "api".into(),
                strip_prefix: true,
                redirect: String::new(),
                origin: "a".into(),
            }],
        };
        save(&dir, &state).unwrap();
        assert_eq!(load(&dir).unwrap(), state);
        let old_entries = vec![RegEntryV2 {
            addr: "10.0.0.1:80".parse().unwrap(),
            hlc: 1,
            op: RegOp::Add,
            weight: 2,
            max_conns: 0,
            backup: false,
            origin: "a".into(),
        }];
        // a version-2 file (one pool, no routes) is still read: its backends are the default pool's
        let v2 = PersistedV2 { format: 2, generation: 7, registry: old_entries.clone(), certs: state.certs.clone() };
        std::fs::write(path_in(&dir), bincode::serde::encode_to_vec(&v2, bincode::config::standard()).unwrap())
            .unwrap();
        let read = load(&dir).unwrap();
        assert_eq!((read.registry, read.certs, read.routes.len()), (state.registry.clone(), state.certs.clone(), 0));
        // a version-1 file (before certificates) is still read
        let v1 = PersistedV1 { format: 1, generation: 7, registry: old_entries };
        std::fs::write(path_in(&dir), bincode::serde::encode_to_vec(&v1, bincode::config::standard()).unwrap())
            .unwrap();
        let read = load(&dir).unwrap();
        assert_eq!((read.generation, read.registry, read.certs.len()), (7, state.registry.clone(), 0));
        std::fs::write(path_in(&dir), b"\xff\xff garbage").unwrap();
        assert!(matches!(load(&dir), Err(StoreError::Corrupt { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
