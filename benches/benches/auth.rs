//! What auth costs on the request path: `Auth::check` alone (an API key among 16, the same
//! with its token bucket, an HS256 JWT), and one request through an axum router whose only
//! route answers at once, without the auth layer (auth off: no layer at all) and with it.

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Request};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use tower::ServiceExt as _;
use unimodel::api::auth::{AuthGate, check};
use unimodel::auth::{Auth, AuthConfig, JwtSettings, Rate, Role};

const KEY: &str = "bench-key-0123456789abcdef-07";
const SECRET: &str = "bench-secret-0123456789abcdef-0123456789";

fn files() -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("um-auth-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys: String = (0..16)
        .map(|i| format!("bench-key-0123456789abcdef-{i:02} infer\n"))
        .collect();
    let key_file = dir.join("keys.txt");
    std::fs::write(&key_file, keys).unwrap();
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    (key_file, secret_file)
}

fn auth(rate: Option<Rate>) -> Arc<Auth> {
    let (key_file, secret_file) = files();
    let cfg = AuthConfig {
        api_key_file: Some(key_file),
        jwt: JwtSettings {
            secret_file: Some(secret_file),
            ..Default::default()
        },
        rate,
        ..Default::default()
    };
    Arc::new(Auth::load(&cfg).unwrap().unwrap())
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    let value = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
    h.insert(http::header::AUTHORIZATION, value);
    h
}

fn check_alone(c: &mut Criterion) {
    let plain = auth(None);
    let limited = auth(Some(Rate {
        per_second: 1e9,
        burst: 1_000_000,
    }));
    let key = bearer(KEY);
    c.bench_function("auth/check api key (1 of 16)", |b| {
        b.iter(|| plain.check(black_box(&key), Role::Infer).unwrap())
    });
    c.bench_function("auth/check api key + bucket", |b| {
        b.iter(|| limited.check(black_box(&key), Role::Infer).unwrap())
    });
    let claims = serde_json::json!({
        "sub": "bench", "roles": ["infer"], "exp": get_current_timestamp() + 3600,
    });
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let jwt = bearer(&token);
    c.bench_function("auth/check jwt hs256", |b| {
        b.iter(|| plain.check(black_box(&jwt), Role::Infer).unwrap())
    });
}

fn through_router(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let app = || Router::new().route("/v2/models/m/infer", post(|| async { "ok" }));
    let off = app();
    let gate = AuthGate::new(auth(None), None);
    let on = app().layer(axum::middleware::from_fn_with_state(gate, check));
    let request = || {
        Request::post("/v2/models/m/infer")
            .header("x-api-key", KEY)
            .body(Body::empty())
            .unwrap()
    };
    for (name, router) in [("router/auth off", off), ("router/auth on (api key)", on)] {
        c.bench_function(name, |b| {
            b.iter(|| {
                let response = rt.block_on(router.clone().oneshot(request())).unwrap();
                assert!(response.status().is_success());
            })
        });
    }
}

criterion_group!(benches, check_alone, through_router);
criterion_main!(benches);
