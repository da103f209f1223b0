//! `shoald demo`: a local cluster on 127.0.0.1 — demo backends that answer with their own
//! name, and N `shoald run` child processes seeded to each other — until Ctrl-C.

pub fn run(_nodes: usize, _backends: usize, _base_port: u16) -> anyhow::Result<()> {
    anyhow::bail!("the demo is not built yet (issue 5)")
}
