//! `shoal import-nginx`: reads nginx `upstream { ... }` blocks (and the `limit_req`, proxy
//! timeouts and `check` directives around them) and prints the equivalent Shoal config, with
//! a warning for every directive it cannot map.

pub struct Converted {
    pub toml: String,
    pub warnings: Vec<String>,
}

pub fn convert(_text: &str) -> Result<Converted, String> {
    Err("import-nginx is not built yet (issue 5)".into())
}
