//! Who may call what, and what cannot be forged, by theme:
//! - [`callers`]: API keys, JWTs, scopes, rate limits, CORS, authenticated docs;
//! - [`defaults`]: secure defaults (an open API is refused off loopback);
//! - [`topics`]: topic injection, forged and replayed replies;
//! - [`broker_link`]: broker credentials, TLS with client certificates, WebSocket.

mod broker_link;
mod callers;
mod defaults;
mod topics;

/// A keys file with one key per (name, scopes); returns the dir (keep it alive) and the keys.
pub fn keys_file(entries: &[(&str, &[&str])]) -> (tempfile::TempDir, String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let mut keys = Vec::new();
    let mut lines = Vec::new();
    for (name, scopes) in entries {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        let (key, entry) = mqtt_gateway::http::new_api_key(name, &scopes).unwrap();
        keys.push(key);
        lines.push(entry);
    }
    let path = dir.path().join("keys.json");
    std::fs::write(&path, format!(r#"{{"keys": [{}]}}"#, lines.join(","))).unwrap();
    let path = path.display().to_string();
    (dir, path, keys)
}
