//! The live dashboard served at the admin root: one self-contained page (no external assets)
//! that polls `/status` once a second.

pub const PAGE: &str = include_str!("dashboard.html");
