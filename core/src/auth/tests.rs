//! `Auth::check` end to end over headers: who is let in, with which role, how often.

use super::*;
use http::HeaderValue;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::json;
use std::path::Path;

const INFER_KEY: &str = "infer-key-0123456789";
const ADMIN_KEY: &str = "admin-key-0123456789";
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

struct Setup {
    dir: PathBuf,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let dir = std::env::temp_dir().join(format!("um-auth-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Setup { dir }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    h
}

fn x_api_key(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-api-key", HeaderValue::from_str(key).unwrap());
    h
}

fn kind(r: Result<Grant, Denial>) -> Option<DenialKind> {
    r.err().map(|d| d.kind)
}

fn keys_auth(s: &Setup, rate: Option<Rate>) -> Auth {
    let file = s.write(
        "keys",
        &format!("{INFER_KEY} infer\n{ADMIN_KEY} admin rps=1 burst=2\n"),
    );
    let cfg = AuthConfig {
        api_key_file: Some(file),
        rate,
        ..Default::default()
    };
    Auth::load(&cfg).unwrap().unwrap()
}

#[test]
fn auth_is_off_without_keys_and_refuses_a_rate_limit_alone() {
    assert!(Auth::load(&AuthConfig::default()).unwrap().is_none());
    let cfg = AuthConfig {
        rate: Some(Rate {
            per_second: 1.0,
            burst: 1,
        }),
        ..Default::default()
    };
    assert!(matches!(
        Auth::load(&cfg),
        Err(ConfigError::NoCredentials {
            flag: "--rate-limit"
        })
    ));
    let cfg = AuthConfig {
        health: true,
        ..Default::default()
    };
    let err = Auth::load(&cfg).err().unwrap().to_string();
    assert!(err.starts_with("--auth-health needs credentials"), "{err}");
}

#[test]
fn api_keys_get_their_roles_by_either_header() {
    let s = Setup::new("keys");
    let auth = keys_auth(&s, None);
    let grant = auth.check(&bearer(INFER_KEY), Role::Infer).unwrap();
    assert!(grant.caller.to_string().starts_with("key:"));
    assert_eq!(grant.caller.to_string().len(), 12);
    assert!(auth.check(&x_api_key(INFER_KEY), Role::Infer).is_ok());
    assert_eq!(
        kind(auth.check(&bearer(INFER_KEY), Role::Admin)),
        Some(DenialKind::Forbidden)
    );
    assert!(auth.check(&x_api_key(ADMIN_KEY), Role::Admin).is_ok());
    for headers in [
        HeaderMap::new(),
        bearer("not-a-key-of-ours-at-all"),
        x_api_key("not-a-key-of-ours-at-all"),
        bearer("a.b.c"),
    ] {
        assert_eq!(
            kind(auth.check(&headers, Role::Infer)),
            Some(DenialKind::Unauthenticated)
        );
    }
}

#[test]
fn a_key_over_its_rate_is_told_when_to_come_back() {
    let s = Setup::new("rate");
    let auth = keys_auth(
        &s,
        Some(Rate {
            per_second: 1000.0,
            burst: 1000,
        }),
    );
    // The admin key's own line says rps=1 burst=2.
    assert!(auth.check(&bearer(ADMIN_KEY), Role::Admin).is_ok());
    assert!(auth.check(&bearer(ADMIN_KEY), Role::Admin).is_ok());
    let denied = auth.check(&bearer(ADMIN_KEY), Role::Admin).unwrap_err();
    assert_eq!(denied.kind.retry_after_secs(), Some(1));
    assert_eq!(denied.kind.to_string(), "rate limit exceeded");
    // Another key's bucket is untouched.
    assert!(auth.check(&bearer(INFER_KEY), Role::Infer).is_ok());
}

fn jwt(claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

#[test]
fn jwt_subjects_get_roles_from_the_claim_and_buckets_by_sub() {
    let s = Setup::new("jwt");
    let secret = s.write("secret", std::str::from_utf8(SECRET).unwrap());
    let cfg = AuthConfig {
        jwt: JwtSettings {
            secret_file: Some(secret),
            ..Default::default()
        },
        rate: Some(Rate {
            per_second: 0.01,
            burst: 1,
        }),
        ..Default::default()
    };
    let auth = Auth::load(&cfg).unwrap().unwrap();
    let exp = get_current_timestamp() + 60;
    let alice = jwt(json!({"sub": "alice", "roles": ["admin"], "exp": exp}));
    let bob = jwt(json!({"sub": "bob", "roles": ["infer"], "exp": exp}));
    let grant = auth.check(&bearer(&alice), Role::Admin).unwrap();
    assert_eq!(grant.caller.to_string(), "sub:alice");
    assert_eq!(
        kind(auth.check(&bearer(&bob), Role::Admin)),
        Some(DenialKind::Forbidden)
    );
    // bob's forbidden call took no token; his first granted one does.
    assert!(auth.check(&bearer(&bob), Role::Infer).is_ok());
    assert!(matches!(
        kind(auth.check(&bearer(&alice), Role::Infer)),
        Some(DenialKind::RateLimited { .. })
    ));
    // A JWT is a bearer token only, and an API key file is not needed.
    assert_eq!(
        kind(auth.check(&x_api_key(&alice), Role::Infer)),
        Some(DenialKind::Unauthenticated)
    );
    let expired = jwt(json!({"sub": "alice", "roles": ["admin"], "exp": 1}));
    let denied = auth.check(&bearer(&expired), Role::Infer).unwrap_err();
    assert_eq!(denied.kind, DenialKind::Unauthenticated);
    assert!(
        denied.reason.to_string().contains("xpired"),
        "{}",
        denied.reason
    );
    assert_eq!(denied.to_string(), "authentication required");
}

#[test]
fn a_malformed_key_file_names_its_line() {
    let s = Setup::new("malformed");
    let file = s.write(
        "keys",
        &format!("# keys\n{INFER_KEY} infer\n{ADMIN_KEY} root\n"),
    );
    let cfg = AuthConfig {
        api_key_file: Some(file.clone()),
        ..Default::default()
    };
    let err = Auth::load(&cfg).err().unwrap().to_string();
    assert!(
        err.starts_with(&format!("{}:3: unknown role `root`", file.display())),
        "{err}"
    );
    let missing = AuthConfig {
        api_key_file: Some(Path::new("/nonexistent/keys").to_path_buf()),
        ..Default::default()
    };
    let err = Auth::load(&missing).err().unwrap().to_string();
    assert!(
        err.contains("cannot read API key file '/nonexistent/keys'"),
        "{err}"
    );
}
