//! Who may call which device: bearer API keys and JWTs, scopes, and per-caller rate limits.
//!
//! A caller proves who it is with `Authorization: Bearer <token>`: either an API key from the
//! keys file (stored there only as its SHA-256, so the file reveals no key) or a JWT signed with
//! the configured HS256 secret or RS256 public key, whose `exp`, `nbf` and `aud` are checked. Each
//! caller has scopes such as `devices/kitchen-*/services/*`; a call outside them is refused
//! (403) before anything reaches MQTT. Without any of this configured, the gateway is open, and
//! it refuses to start that way on a non-loopback address unless told `--insecure-no-auth`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, Mutex};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// One permission: devices and services matching two glob patterns (`*` matches any run of
/// characters within the level, so no scope can reach beyond one device id or service name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    device: String,
    service: String,
}

impl Scope {
    /// Parses `devices/<device pattern>/services/<service pattern>`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let bad = || {
            format!("scope {raw:?} must look like devices/<pattern>/services/<pattern>, e.g. devices/kitchen-*/services/*")
        };
        let rest = raw.strip_prefix("devices/").ok_or_else(bad)?;
        let (device, service) = rest.split_once("/services/").ok_or_else(bad)?;
        if device.is_empty() || service.is_empty() || device.contains('/') || service.contains('/')
        {
            return Err(bad());
        }
        Ok(Self {
            device: device.to_owned(),
            service: service.to_owned(),
        })
    }

    pub fn allows(&self, device: &str, service: &str) -> bool {
        glob(&self.device, device) && glob(&self.service, service)
    }
}

/// `*` matches any run of characters (none included); everything else matches itself.
pub(crate) fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no '*' at all: exact match
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// An authenticated HTTP caller (an API key or a JWT subject): who the per-caller limits and
/// log lines name. Not to be confused with [`mqtt_rpc::Caller`], the MQTT requester.
#[derive(Debug, Clone)]
pub struct ApiCaller {
    /// The key's name or the token's `sub`: what logs, rate limits and in-flight limits are
    /// keyed by.
    pub name: Arc<str>,
    pub scopes: Arc<Vec<Scope>>,
    /// This caller's own in-flight limit, if its key sets one (else `--max-in-flight-per-caller`).
    pub max_in_flight: Option<u32>,
    /// The largest `timeout_ms` this caller may ask for, if its key sets one (at most
    /// `--max-timeout-ms` all the same).
    pub max_timeout_ms: Option<u64>,
}

impl ApiCaller {
    pub fn may_call(&self, device: &str, service: &str) -> bool {
        self.scopes.iter().any(|s| s.allows(device, service))
    }

    /// Whether any scope covers this device (for some service): the registry shows it.
    pub fn may_see_device(&self, device: &str) -> bool {
        self.scopes.iter().any(|s| glob(&s.device, device))
    }
}

/// Why a caller was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("this route needs `Authorization: Bearer <API key or JWT>`")]
    Missing,
    #[error("the bearer token is not a known API key or a valid JWT{0}")]
    Invalid(String),
}

/// The API keys file: `{"keys": [{"name": ..., "sha256": ..., "scopes": [...]}]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    keys: Vec<KeyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    /// Hex SHA-256 of the key. API keys are long random strings, so a fast hash is enough: no
    /// dictionary can guess one.
    sha256: String,
    scopes: Vec<String>,
    /// Calls this key may have in flight at once (default: `--max-in-flight-per-caller`).
    #[serde(default)]
    max_in_flight: Option<u32>,
    /// The largest `timeout_ms` this key may ask for (default: `--max-timeout-ms`).
    #[serde(default)]
    max_timeout_ms: Option<u64>,
}

/// The claims a JWT must carry.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    /// Space-separated scopes (the OAuth 2 `scope` claim)...
    #[serde(default)]
    scope: Option<String>,
    /// ...or a list.
    #[serde(default)]
    scopes: Option<Vec<String>>,
}

/// How JWTs are checked.
pub struct JwtSettings {
    pub hs256_secret: Option<Vec<u8>>,
    pub rs256_public_key_pem: Option<Vec<u8>>,
    pub audience: String,
    pub issuer: Option<String>,
}

struct JwtVerifier {
    keys: Vec<(DecodingKey, Validation)>,
}

/// Checks bearer tokens. Built once at startup.
pub struct Authenticator {
    keys: HashMap<[u8; 32], ApiCaller>,
    jwt: Option<JwtVerifier>,
}

impl Authenticator {
    /// The API keys of a keys file (its path, for messages, and its text), and the JWT
    /// settings; either may be absent. The caller has read the file (see `settings`).
    pub fn new(keys_file: Option<(&Path, &str)>, jwt: Option<JwtSettings>) -> Result<Self, String> {
        let mut keys = HashMap::new();
        if let Some((path, text)) = keys_file {
            let file: KeysFile = serde_json::from_str(text)
                .map_err(|e| format!("API keys file {}: {e}", path.display()))?;
            for entry in file.keys {
                let hash = decode_sha256(&entry.sha256).ok_or_else(|| {
                    format!("API key {:?}: sha256 must be 64 hex digits", entry.name)
                })?;
                let scopes = parse_scopes(&entry.scopes)
                    .map_err(|e| format!("API key {:?}: {e}", entry.name))?;
                if entry.max_in_flight == Some(0) {
                    return Err(format!(
                        "API key {:?}: max_in_flight must be at least 1",
                        entry.name
                    ));
                }
                keys.insert(
                    hash,
                    ApiCaller {
                        name: entry.name.into(),
                        scopes: Arc::new(scopes),
                        max_in_flight: entry.max_in_flight,
                        max_timeout_ms: entry.max_timeout_ms,
                    },
                );
            }
        }
        let jwt = jwt.map(JwtVerifier::new).transpose()?;
        Ok(Self { keys, jwt })
    }

    /// Whether any way of authenticating is configured.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty() || self.jwt.is_some()
    }

    /// The caller behind an `Authorization` header value.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<ApiCaller, AuthError> {
        let header = authorization.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(caller) = self.keys.get(&hash) {
            return Ok(caller.clone());
        }
        match &self.jwt {
            Some(jwt) => jwt.verify(token),
            None => Err(AuthError::Invalid(String::new())),
        }
    }
}

impl JwtVerifier {
    fn new(settings: JwtSettings) -> Result<Self, String> {
        let validation = |alg| {
            let mut v = Validation::new(alg);
            v.set_audience(&[settings.audience.as_str()]);
            v.set_required_spec_claims(&["exp", "aud", "sub"]);
            v.validate_nbf = true;
            // Clocks drift a little; five seconds, not jsonwebtoken's default minute.
            v.leeway = 5;
            if let Some(iss) = &settings.issuer {
                v.set_issuer(&[iss.as_str()]);
            }
            v
        };
        let mut keys = Vec::new();
        if let Some(secret) = &settings.hs256_secret {
            if secret.len() < 32 {
                return Err("the HS256 secret must be at least 32 bytes".into());
            }
            keys.push((
                DecodingKey::from_secret(secret),
                validation(Algorithm::HS256),
            ));
        }
        if let Some(pem) = &settings.rs256_public_key_pem {
            let key = DecodingKey::from_rsa_pem(pem)
                .map_err(|e| format!("the RS256 public key is not a PEM RSA public key: {e}"))?;
            keys.push((key, validation(Algorithm::RS256)));
        }
        if keys.is_empty() {
            return Err("JWT needs --jwt-hs256-secret-file or --jwt-rs256-public-key-file".into());
        }
        Ok(Self { keys })
    }

    fn verify(&self, token: &str) -> Result<ApiCaller, AuthError> {
        let mut last = String::new();
        for (key, validation) in &self.keys {
            match jsonwebtoken::decode::<Claims>(token, key, validation) {
                Ok(data) => {
                    let claims = data.claims;
                    let raw: Vec<String> = match (claims.scopes, claims.scope) {
                        (Some(list), _) => list,
                        (None, Some(s)) => s.split_whitespace().map(str::to_owned).collect(),
                        (None, None) => Vec::new(),
                    };
                    let scopes =
                        parse_scopes(&raw).map_err(|e| AuthError::Invalid(format!(": {e}")))?;
                    return Ok(ApiCaller {
                        name: claims.sub.into(),
                        scopes: Arc::new(scopes),
                        max_in_flight: None,
                        max_timeout_ms: None,
                    });
                }
                Err(e) => last = format!(" ({e})"),
            }
        }
        Err(AuthError::Invalid(last))
    }
}

fn parse_scopes(raw: &[String]) -> Result<Vec<Scope>, String> {
    raw.iter().map(|s| Scope::parse(s)).collect()
}

fn decode_sha256(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A new API key and its keys-file entry: 32 random bytes, base64url, with a recognisable
/// prefix so leaked keys can be found by secret scanners.
pub fn new_api_key(name: &str, scopes: &[String]) -> Result<(String, String), String> {
    use base64::Engine;
    parse_scopes(scopes)?;
    let key = format!(
        "mgw_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
    );
    let hash: String = Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let entry = serde_json::json!({ "name": name, "sha256": hash, "scopes": scopes });
    Ok((key, entry.to_string()))
}

/// Past this many callers tracked, the limiter forgets idle ones at once instead of waiting for
/// the gateway's periodic sweep. Callers are the keys file's keys and the subjects of validly
/// signed tokens, so the map holds only callers seen since the last sweep (every few seconds)
/// whose bucket has not refilled yet.
pub(crate) const SWEEP_PAST_CALLERS: usize = 100_000;

/// Per-caller token buckets.
pub struct RateLimits {
    limiter: DefaultKeyedRateLimiter<Arc<str>>,
}

impl RateLimits {
    /// `per_second` calls a second on average, bursts of `burst`.
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        Self {
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
        }
    }

    /// Ok, or how many whole seconds to wait (at least 1).
    pub fn check(&self, caller: &Arc<str>) -> Result<(), u64> {
        if self.limiter.len() >= SWEEP_PAST_CALLERS {
            self.forget_idle();
        }
        self.limiter.check_key(caller).map_err(Self::seconds)
    }

    fn seconds(not_until: governor::NotUntil<governor::clock::QuantaInstant>) -> u64 {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
    }

    /// Forgets callers whose bucket is full again: they are indistinguishable from new ones.
    /// The gateway calls this every few seconds, so the map holds only recently active callers.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Callers tracked now.
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

/// Calls in flight per authenticated caller, so one caller cannot take every slot of
/// `--max-in-flight` (`--max-in-flight-per-caller`, or its key's own `max_in_flight`).
/// Only callers with a call in flight have an entry.
pub(crate) struct CallerSlots {
    default_limit: u32,
    in_flight: Mutex<HashMap<Arc<str>, u32>>,
}

impl CallerSlots {
    pub(crate) fn new(default_limit: u32) -> Arc<Self> {
        Arc::new(Self {
            default_limit: default_limit.max(1),
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one call of `caller`, or the caller's limit when it has that many in flight.
    pub(crate) fn take(self: &Arc<Self>, caller: &ApiCaller) -> Result<CallerSlot, u32> {
        let limit = caller.max_in_flight.unwrap_or(self.default_limit);
        let mut in_flight = self.lock();
        match in_flight.get_mut(&caller.name) {
            Some(n) if *n >= limit => return Err(limit),
            Some(n) => *n += 1,
            None => {
                in_flight.insert(caller.name.clone(), 1);
            }
        }
        Ok(CallerSlot {
            slots: self.clone(),
            name: caller.name.clone(),
        })
    }

    /// Calls `caller` has in flight now.
    #[cfg(test)]
    pub(crate) fn in_flight(&self, caller: &str) -> u32 {
        self.lock().get(caller).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, u32>> {
        // Every critical section is one map operation: a poisoned lock is still consistent.
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One call's place in its caller's in-flight count; given back when dropped.
pub(crate) struct CallerSlot {
    slots: Arc<CallerSlots>,
    name: Arc<str>,
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        let mut in_flight = self.slots.lock();
        if let Some(n) = in_flight.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_within_one_level() {
        assert!(glob("*", "anything"));
        assert!(glob("kitchen-*", "kitchen-7"));
        assert!(!glob("kitchen-*", "garage-7"));
        assert!(glob("*-lamp", "hall-lamp"));
        assert!(glob("a*b*c", "a-x-b-y-c"));
        assert!(!glob("a*b*c", "a-x-c"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(glob("ab*", "ab"));
        assert!(!glob("ab*ba", "aba"));
    }

    #[test]
    fn scopes_parse_and_allow() {
        let s = Scope::parse("devices/kitchen-*/services/get_*").unwrap();
        assert!(s.allows("kitchen-1", "get_config"));
        assert!(!s.allows("kitchen-1", "control"));
        assert!(!s.allows("garage", "get_config"));
        for bad in [
            "kitchen-*",
            "devices/*",
            "devices//services/x",
            "devices/a/b/services/x",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn api_keys_are_found_by_their_hash_only() {
        let (key, entry) = new_api_key("app", &["devices/*/services/*".into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        std::fs::write(&path, format!(r#"{{"keys": [{entry}]}}"#)).unwrap();
        assert!(!std::fs::read_to_string(&path).unwrap().contains(&key));
        let text = std::fs::read_to_string(&path).unwrap();
        let auth = Authenticator::new(Some((&path, &text)), None).unwrap();
        let caller = auth.authenticate(Some(&format!("Bearer {key}"))).unwrap();
        assert_eq!(&*caller.name, "app");
        assert_eq!(
            auth.authenticate(Some("Bearer nope")).unwrap_err(),
            AuthError::Invalid(String::new())
        );
        assert_eq!(auth.authenticate(None).unwrap_err(), AuthError::Missing);
        assert_eq!(
            auth.authenticate(Some(&format!("Basic {key}")))
                .unwrap_err(),
            AuthError::Missing
        );
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    fn caller(name: &str, max_in_flight: Option<u32>) -> ApiCaller {
        ApiCaller {
            name: name.into(),
            scopes: Arc::new(vec![]),
            max_in_flight,
            max_timeout_ms: None,
        }
    }

    #[test]
    fn each_caller_has_its_own_in_flight_limit_and_idle_callers_leave_no_entry() {
        let slots = CallerSlots::new(2);
        let (a, b) = (caller("a", None), caller("b", Some(3)));
        let a1 = slots.take(&a).unwrap();
        let _a2 = slots.take(&a).unwrap();
        assert_eq!(slots.take(&a).err(), Some(2), "a is at the default limit");
        let bs: Vec<_> = (0..3).map(|_| slots.take(&b).unwrap()).collect();
        assert_eq!(slots.take(&b).err(), Some(3), "b's key sets its own");
        drop(a1);
        assert!(slots.take(&a).is_ok(), "a slot came back");
        drop(bs);
        assert_eq!(slots.in_flight("b"), 0);
        assert!(
            !slots.lock().contains_key("b"),
            "no entry for an idle caller"
        );
    }

    #[test]
    fn the_rate_limiter_forgets_idle_callers() {
        let limits = RateLimits::new(NonZeroU32::new(1000).unwrap(), NonZeroU32::new(1).unwrap());
        for i in 0..5000 {
            let _ = limits.check(&Arc::from(format!("subject-{i}")));
        }
        assert_eq!(limits.tracked(), 5000);
        // At 1000 a second with a burst of 1, every bucket is full again after a millisecond.
        std::thread::sleep(std::time::Duration::from_millis(20));
        limits.forget_idle();
        assert_eq!(limits.tracked(), 0, "idle callers are forgotten");
    }
}
