//! On-disk state in `data_dir` (the only module that uses bincode): the backend registry and
//! the last generation this node ran with. Written atomically (temp file + rename), so a crash
//! leaves either the old or the new state, never half of one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cluster::registry::RegEntry;

/// Bumped when the layout changes; an unknown version is refused, not misread.
const FORMAT_VERSION: u32 = 1;
const FILE_NAME: &str = "shoal-state.bin";

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    pub format: u32,
    pub generation: u64,
    pub registry: Vec<RegEntry>,
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
    let (state, _): (Persisted, usize) = bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
        .map_err(|e| StoreError::Corrupt { path: shown.clone(), message: e.to_string() })?;
    if state.format != FORMAT_VERSION {
        return Err(StoreError::Corrupt {
            path: shown,
            message: format!("format version {} is not {FORMAT_VERSION}", state.format),
        });
    }
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
    use crate::cluster::registry::RegOp;

    #[test]
    fn round_trip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("shoal-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(load(&dir).unwrap().registry.len(), 0);
        let state = Persisted {
            format: FORMAT_VERSION,
            generation: 7,
            registry: vec![RegEntry {
                addr: "10.0.0.1:80".parse().unwrap(),
                hlc: 1,
                op: RegOp::Add,
                weight: 2,
                max_conns: 0,
                backup: false,
                origin: "a".into(),
            }],
        };
        save(&dir, &state).unwrap();
        assert_eq!(load(&dir).unwrap(), state);
        std::fs::write(path_in(&dir), b"\xff\xff garbage").unwrap();
        assert!(matches!(load(&dir), Err(StoreError::Corrupt { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
