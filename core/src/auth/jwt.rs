//! JWT bearer tokens: HS256 with `--jwt-secret-file`, RS256 or ES256 (P-256) with
//! `--jwt-public-key-file` (PEM) or `--jwks-file` (keys by `kid`).
//!
//! Each configured key carries its own algorithm, decided when the key is read: the
//! token's header only selects among the configured keys (`alg` must equal the key's,
//! `kid` must match when both name one), so `alg: none` and HS256-signed-with-the-RSA-
//! public-key tokens find no key. `exp` is required, `nbf` honoured, both with a small
//! leeway for clock skew; `aud` and `iss` are checked when configured. Roles come from the
//! `roles` claim (an array of strings; unknown names are ignored), the caller's name from
//! `sub` (required and non-empty: the audit log and the rate limit need it). A header with
//! `crit` is refused: it names extensions this server does not implement.

use super::error::{ConfigError, Reason};
use super::role::{Role, Roles};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_S: u64 = 5;

/// HMAC secrets shorter than this are refused (RFC 7518 §3.2: at least the hash size).
const MIN_SECRET_BYTES: usize = 32;

/// The JWT flags.
#[derive(Clone, Debug, Default)]
pub struct JwtSettings {
    pub secret_file: Option<PathBuf>,
    pub public_key_file: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
    pub audience: Option<String>,
    pub issuer: Option<String>,
}

impl JwtSettings {
    pub fn any_key(&self) -> bool {
        self.secret_file.is_some() || self.public_key_file.is_some() || self.jwks_file.is_some()
    }
}

/// One trusted key and the only algorithm it verifies.
struct TrustedKey {
    kid: Option<String>,
    key: DecodingKey,
    validation: Validation,
}

impl TrustedKey {
    fn alg(&self) -> Algorithm {
        self.validation.algorithms[0]
    }
}

/// The claims we read; `exp`, `nbf`, `aud` and `iss` are checked by `jsonwebtoken`.
#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    roles: Vec<String>,
}

/// A verified token's caller.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    pub subject: String,
    pub roles: Roles,
}

pub struct JwtVerifier {
    keys: Vec<TrustedKey>,
}

/// Compact JWS: three base64url parts.
pub fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|&b| b == b'.').count() == 2
}

impl JwtVerifier {
    /// Reads every configured key; `None` when no JWT key is configured.
    pub fn load(s: &JwtSettings) -> Result<Option<JwtVerifier>, ConfigError> {
        if !s.any_key() {
            if s.audience.is_some() || s.issuer.is_some() {
                return Err(ConfigError::JwtClaimsWithoutKey);
            }
            return Ok(None);
        }
        let mut keys = Vec::new();
        if let Some(file) = &s.secret_file {
            let secret = read(file, "JWT secret file")?;
            let secret = trim_newline(&secret);
            if secret.len() < MIN_SECRET_BYTES {
                return Err(key_error(
                    file,
                    format!(
                        "the HS256 secret has {} bytes; use at least {MIN_SECRET_BYTES} (e.g. \
                         `openssl rand -hex 32`)",
                        secret.len()
                    ),
                ));
            }
            keys.push(trusted(
                s,
                None,
                Algorithm::HS256,
                DecodingKey::from_secret(secret),
            ));
        }
        if let Some(file) = &s.public_key_file {
            let pem = read(file, "JWT public key file")?;
            let (alg, key) = if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                (Algorithm::RS256, key)
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                (Algorithm::ES256, key)
            } else {
                return Err(key_error(
                    file,
                    "expected a PEM public key (`-----BEGIN PUBLIC KEY-----`, RSA for RS256 or \
                     EC P-256 for ES256)"
                        .into(),
                ));
            };
            keys.push(trusted(s, None, alg, key));
        }
        if let Some(file) = &s.jwks_file {
            keys.extend(jwks(s, file)?);
        }
        Ok(Some(JwtVerifier { keys }))
    }

    /// Verifies `token` with the configured key its header selects.
    pub fn verify(&self, token: &str) -> Result<Verified, Reason> {
        let bad =
            |what: &str, e: jsonwebtoken::errors::Error| Reason::BadToken(format!("{what}: {e}"));
        let header = jsonwebtoken::decode_header(token).map_err(|e| bad("header", e))?;
        // RFC 7515 §4.1.11: a token whose `crit` names an extension the recipient does not
        // understand must be refused. This server understands none (and an empty list is
        // itself invalid), so any `crit` is refused, before any key is tried.
        if let Some(crit) = &header.crit {
            let listed = format!("{crit:?}");
            return Err(Reason::BadToken(format!(
                "the header's crit lists {}; this server implements no critical JWS \
                 extension, so it refuses any token with crit (RFC 7515 section 4.1.11)",
                crate::echo::Echo(&listed)
            )));
        }
        let mut candidates = self.keys.iter().filter(|k| {
            k.alg() == header.alg
                && match (&header.kid, &k.kid) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                }
        });
        let Some(first) = candidates.next() else {
            return Err(Reason::BadToken(format!(
                "no configured key verifies alg {:?}{}",
                header.alg,
                header
                    .kid
                    .as_deref()
                    .map(|k| format!(" with kid {k:?}"))
                    .unwrap_or_default()
            )));
        };
        let mut result = jsonwebtoken::decode::<Claims>(token, &first.key, &first.validation);
        // Without a kid, any key of that algorithm may be the signer (a JWKS in rotation).
        for next in candidates {
            match &result {
                Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature) => {
                    result = jsonwebtoken::decode::<Claims>(token, &next.key, &next.validation);
                }
                _ => break,
            }
        }
        let claims = result.map_err(|e| bad("claims", e))?.claims;
        // The subject names the caller in the audit log and keys its rate-limit bucket: an
        // empty one would make every such token one anonymous caller sharing one bucket.
        if claims.sub.trim().is_empty() {
            return Err(Reason::BadToken(
                "the sub claim is empty; a token must name its caller in a non-empty sub".into(),
            ));
        }
        Ok(Verified {
            subject: claims.sub,
            roles: claims.roles.iter().filter_map(|r| Role::parse(r)).collect(),
        })
    }
}

fn read(file: &Path, what: &'static str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(file).map_err(|source| ConfigError::Read {
        what,
        file: file.to_path_buf(),
        source,
    })
}

fn key_error(file: &Path, message: String) -> ConfigError {
    ConfigError::JwtKey {
        file: file.to_path_buf(),
        message,
    }
}

/// A secret file written by `echo` ends with a newline that is not part of the secret.
fn trim_newline(secret: &[u8]) -> &[u8] {
    let secret = secret.strip_suffix(b"\n").unwrap_or(secret);
    secret.strip_suffix(b"\r").unwrap_or(secret)
}

fn trusted(s: &JwtSettings, kid: Option<String>, alg: Algorithm, key: DecodingKey) -> TrustedKey {
    let mut v = Validation::new(alg);
    v.leeway = LEEWAY_S;
    v.validate_nbf = true;
    let mut required = vec!["exp"];
    match &s.audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            required.push("aud");
        }
        None => v.validate_aud = false,
    }
    if let Some(iss) = &s.issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    v.set_required_spec_claims(&required);
    TrustedKey {
        kid,
        key,
        validation: v,
    }
}

/// The RS256 and ES256 keys of a JWKS file.
fn jwks(s: &JwtSettings, file: &Path) -> Result<Vec<TrustedKey>, ConfigError> {
    let text = read(file, "JWKS file")?;
    let set: JwkSet = serde_json::from_slice(&text).map_err(|e| {
        key_error(
            file,
            format!("expected a JWKS (`{{\"keys\": [...]}}`): {e}"),
        )
    })?;
    if set.keys.is_empty() {
        return Err(key_error(file, "the JWKS holds no key".into()));
    }
    let mut keys: Vec<TrustedKey> = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let kid = jwk.common.key_id.clone();
        let name = match &kid {
            Some(k) => format!("key {i} (kid {k:?})"),
            None => format!("key {i}"),
        };
        let alg = match (&jwk.algorithm, jwk.common.key_algorithm.as_ref()) {
            (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
            (AlgorithmParameters::EllipticCurve(p), None | Some(KeyAlgorithm::ES256))
                if p.curve == EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            _ => {
                return Err(key_error(
                    file,
                    format!(
                        "{name}: only RSA keys for RS256 and EC P-256 keys for ES256 are supported"
                    ),
                ));
            }
        };
        if kid.is_some() && keys.iter().any(|k| k.kid == kid) {
            return Err(key_error(file, format!("{name}: the kid is used twice")));
        }
        let key =
            DecodingKey::from_jwk(jwk).map_err(|e| key_error(file, format!("{name}: {e}")))?;
        keys.push(trusted(s, kid, alg, key));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn settings(dir: &Path) -> JwtSettings {
        let file = dir.join("secret");
        std::fs::write(&file, [SECRET, b"\n"].concat()).unwrap();
        JwtSettings {
            secret_file: Some(file),
            audience: Some("unimodel".into()),
            issuer: Some("tests".into()),
            ..Default::default()
        }
    }

    fn token(claims: serde_json::Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn good_claims() -> serde_json::Value {
        json!({
            "sub": "alice", "roles": ["infer", "other"], "aud": "unimodel", "iss": "tests",
            "exp": get_current_timestamp() + 60,
        })
    }

    #[test]
    fn hs256_tokens_are_verified_and_their_claims_checked() {
        let dir = tempdir("hs256");
        let v = JwtVerifier::load(&settings(&dir)).unwrap().unwrap();
        let ok = v.verify(&token(good_claims(), SECRET)).unwrap();
        assert_eq!(ok.subject, "alice");
        assert!(ok.roles.allows(Role::Infer));
        assert!(!ok.roles.allows(Role::Admin));

        let now = get_current_timestamp();
        let mut bad = Vec::new();
        let mut with = |k: &str, val: serde_json::Value| {
            let mut c = good_claims();
            c[k] = val;
            bad.push((k.to_string(), token(c, SECRET)));
        };
        with("exp", json!(now - 60));
        with("nbf", json!(now + 60));
        with("aud", json!("someone-else"));
        with("iss", json!("mallory"));
        with("roles", json!("admin"));
        with("sub", json!(null));
        with("sub", json!(""));
        with("sub", json!("  "));
        let mut no_exp = good_claims();
        no_exp.as_object_mut().unwrap().remove("exp");
        bad.push(("no exp".into(), token(no_exp, SECRET)));
        bad.push((
            "wrong secret".into(),
            token(good_claims(), b"another secret of 32 bytes......"),
        ));
        for (what, t) in bad {
            assert!(matches!(v.verify(&t), Err(Reason::BadToken(_))), "{what}");
        }
        // Within the leeway, exp just past is still accepted.
        let mut c = good_claims();
        c["exp"] = json!(now - 1);
        assert!(v.verify(&token(c, SECRET)).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn any_crit_header_is_refused_and_named() {
        let dir = tempdir("crit");
        let v = JwtVerifier::load(&settings(&dir)).unwrap().unwrap();
        for crit in [vec!["exp".to_string()], vec!["b64".into()], vec![]] {
            let mut header = Header::new(Algorithm::HS256);
            header.crit = Some(crit.clone());
            let t = encode(&header, &good_claims(), &EncodingKey::from_secret(SECRET)).unwrap();
            match v.verify(&t) {
                Err(Reason::BadToken(m)) => assert!(m.contains("crit"), "{m}"),
                other => panic!("crit {crit:?} was not refused: {other:?}"),
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_algorithm_comes_from_the_key_never_from_the_token() {
        let dir = tempdir("alg");
        let v = JwtVerifier::load(&settings(&dir)).unwrap().unwrap();
        // alg none: header.payload. with an empty signature.
        let b64 = |v: serde_json::Value| {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let none = format!(
            "{}.{}.",
            b64(json!({"alg": "none", "typ": "JWT"})),
            b64(good_claims())
        );
        assert!(v.verify(&none).is_err());
        // A token claiming RS256 finds no RSA key here.
        let rs = format!(
            "{}.{}.AAAA",
            b64(json!({"alg": "RS256"})),
            b64(good_claims())
        );
        assert!(
            matches!(v.verify(&rs), Err(Reason::BadToken(m)) if m.contains("no configured key"))
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_key_files_are_refused_with_what_was_expected() {
        let dir = tempdir("badkeys");
        let short = dir.join("short");
        std::fs::write(&short, "tooshort\n").unwrap();
        let s = JwtSettings {
            secret_file: Some(short),
            ..Default::default()
        };
        let err = JwtVerifier::load(&s).err().unwrap().to_string();
        assert!(err.contains("the HS256 secret has 8 bytes"), "{err}");

        let pem = dir.join("key.pem");
        std::fs::write(&pem, "not a key").unwrap();
        let s = JwtSettings {
            public_key_file: Some(pem),
            ..Default::default()
        };
        let err = JwtVerifier::load(&s).err().unwrap().to_string();
        assert!(err.contains("expected a PEM public key"), "{err}");

        let jwks_file = dir.join("jwks.json");
        std::fs::write(&jwks_file, r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).unwrap();
        let s = JwtSettings {
            jwks_file: Some(jwks_file),
            ..Default::default()
        };
        let err = JwtVerifier::load(&s).err().unwrap().to_string();
        assert!(err.contains("only RSA keys for RS256"), "{err}");

        let s = JwtSettings {
            audience: Some("a".into()),
            ..Default::default()
        };
        assert!(matches!(
            JwtVerifier::load(&s),
            Err(ConfigError::JwtClaimsWithoutKey)
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("um-jwt-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
