//! The OpenAPI 3 document of the REST routes (`GET /openapi.json`) and a self-contained
//! HTML rendering of it (`GET /docs`).
//!
//! The document is hand-written (`openapi.json` next to this file): the routes are few and
//! their bodies are KServe's, which no derive would describe better. A test keeps it honest:
//! every route the router declares must be in it, and nothing else. The page is rendered
//! here from the document, with inline CSS and no scripts, so it works with no network
//! (no CDN, nothing fetched at run time or at build time).

use axum::http::header;
use axum::response::{Html, IntoResponse};
use serde_json::Value;
use std::fmt::Write as _;
use std::sync::OnceLock;

/// The document, exactly as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// HTTP methods an OpenAPI path item may hold, in display order.
const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// `GET /openapi.json`.
pub async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT)
}

/// `GET /docs`: rendered once, then served from memory.
pub async fn page() -> Html<&'static str> {
    static PAGE: OnceLock<String> = OnceLock::new();
    Html(PAGE.get_or_init(|| render(DOCUMENT)).as_str())
}

/// Renders an OpenAPI document as one HTML page; a document that does not parse renders
/// as an error paragraph (it is compiled in and tested, so that is a build mistake).
pub fn render(doc: &str) -> String {
    let spec: Value = match serde_json::from_str(doc) {
        Ok(v) => v,
        Err(e) => return format!("<p>invalid OpenAPI document: {}</p>", esc(&e.to_string())),
    };
    let text = |v: &Value| esc(v.as_str().unwrap_or(""));
    let mut out = String::with_capacity(32 * 1024);
    let title = text(&spec["info"]["title"]);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{title} API</title><style>{CSS}</style></head><body>\
         <h1>{title} <small>{}</small></h1><p>{}</p>\
         <p>Machine-readable: <a href=\"/openapi.json\">/openapi.json</a> (OpenAPI {}).</p>",
        text(&spec["info"]["version"]),
        text(&spec["info"]["description"]),
        text(&spec["openapi"]),
    );
    if let Some(paths) = spec["paths"].as_object() {
        for (path, item) in paths {
            for method in METHODS {
                if let Some(op) = item.get(method) {
                    render_operation(&mut out, &spec, path, method, op);
                }
            }
        }
    }
    out.push_str("<h2>Schemas</h2>");
    if let Some(schemas) = spec["components"]["schemas"].as_object() {
        for (name, schema) in schemas {
            let pretty = serde_json::to_string_pretty(schema).unwrap_or_default();
            let _ = write!(
                out,
                "<h3 id=\"schema-{0}\">{0}</h3><pre>{1}</pre>",
                esc(name),
                esc(&pretty)
            );
        }
    }
    out.push_str("</body></html>\n");
    out
}

fn render_operation(out: &mut String, spec: &Value, path: &str, method: &str, op: &Value) {
    let text = |v: &Value| esc(v.as_str().unwrap_or(""));
    let _ = write!(
        out,
        "<section><h2><span class=\"m {method}\">{}</span> <code>{}</code></h2><p><b>{}</b></p>",
        method.to_uppercase(),
        esc(path),
        text(&op["summary"]),
    );
    if op.get("description").is_some() {
        let _ = write!(out, "<p>{}</p>", text(&op["description"]));
    }
    if let Some(params) = op["parameters"].as_array().filter(|p| !p.is_empty()) {
        out.push_str(
            "<table><tr><th>parameter</th><th>in</th><th>required</th><th>meaning</th></tr>",
        );
        for p in params {
            let p = resolve(spec, p);
            let _ = write!(
                out,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                text(&p["name"]),
                text(&p["in"]),
                p["required"].as_bool().unwrap_or(false),
                text(&p["description"]),
            );
        }
        out.push_str("</table>");
    }
    if let Some(content) = op["requestBody"]["content"].as_object() {
        out.push_str("<p>Request body: ");
        for (i, (ctype, c)) in content.iter().enumerate() {
            let sep = if i > 0 { ", " } else { "" };
            let _ = write!(
                out,
                "{sep}<code>{}</code>{}",
                esc(ctype),
                schema_link(&c["schema"])
            );
        }
        out.push_str("</p>");
    }
    if let Some(responses) = op["responses"].as_object() {
        out.push_str("<table><tr><th>status</th><th>meaning</th><th>body</th></tr>");
        for (status, r) in responses {
            let body: Vec<String> = r["content"]
                .as_object()
                .map(|c| {
                    c.iter()
                        .map(|(t, c)| {
                            format!("<code>{}</code>{}", esc(t), schema_link(&c["schema"]))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(status),
                text(&r["description"]),
                body.join(", "),
            );
        }
        out.push_str("</table>");
    }
    out.push_str("</section>");
}

/// Follows a local `$ref` (`#/components/...`); anything else is returned as is.
fn resolve<'a>(spec: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str().and_then(|r| r.strip_prefix('#')) {
        Some(pointer) => spec.pointer(pointer).unwrap_or(v),
        None => v,
    }
}

/// " (Schema)" linking to the schema's section, for `$ref` schemas.
fn schema_link(schema: &Value) -> String {
    match schema["$ref"].as_str().and_then(|r| r.rsplit('/').next()) {
        Some(name) => format!(" (<a href=\"#schema-{0}\">{0}</a>)", esc(name)),
        None => String::new(),
    }
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}\
section{border-top:1px solid #ddd;padding:.5rem 0}table{border-collapse:collapse;margin:.5rem 0}\
td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}\
pre{background:#f6f6f6;padding:.5rem;overflow:auto}.m{color:#fff;padding:.1rem .4rem;border-radius:.2rem;font-size:.8em}\
.get{background:#2a7}.post{background:#27c}.put,.patch{background:#c82}.delete{background:#c33}";

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Every `.route("PATH", ...)` in the routers' sources, with the methods it registers.
    fn router_routes() -> BTreeSet<(String, String)> {
        let src = concat!(
            include_str!("http.rs"),
            include_str!("shm.rs"),
            include_str!("openai/mod.rs")
        );
        let mut routes = BTreeSet::new();
        let mut rest = src;
        while let Some(at) = rest.find(".route(") {
            rest = &rest[at + ".route(".len()..];
            let call = &rest[..rest
                .find(";")
                .unwrap_or(rest.len())
                .min(rest.find(".route(").unwrap_or(rest.len()))];
            let Some(path) = call.split('"').nth(1) else {
                continue;
            };
            // axum's catch-all `{*id}` is OpenAPI's `{id}`.
            let path = path.replace("{*", "{");
            for method in METHODS {
                if call.contains(&format!("{method}(")) {
                    routes.insert((path.clone(), method.to_string()));
                }
            }
        }
        routes
    }

    fn spec_routes() -> BTreeSet<(String, String)> {
        let spec: Value = serde_json::from_str(DOCUMENT).expect("openapi.json parses");
        let mut routes = BTreeSet::new();
        for (path, item) in spec["paths"].as_object().expect("paths") {
            for method in METHODS {
                if item.get(method).is_some() {
                    routes.insert((path.clone(), method.to_string()));
                }
            }
        }
        routes
    }

    #[test]
    fn the_document_lists_exactly_the_router_routes() {
        let router = router_routes();
        assert!(
            router.len() >= 16,
            "route scan found too little: {router:?}"
        );
        let spec = spec_routes();
        let missing: Vec<_> = router.difference(&spec).collect();
        assert!(
            missing.is_empty(),
            "routes missing from openapi.json: {missing:?}"
        );
        let extra: Vec<_> = spec.difference(&router).collect();
        assert!(
            extra.is_empty(),
            "openapi.json documents routes the router lacks: {extra:?}"
        );
    }

    #[test]
    fn every_operation_has_responses_and_refs_resolve() {
        let spec: Value = serde_json::from_str(DOCUMENT).unwrap();
        assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
        let text = DOCUMENT;
        let mut rest = text;
        while let Some(at) = rest.find("\"$ref\": \"#") {
            rest = &rest[at + "\"$ref\": \"#".len()..];
            let pointer = &rest[..rest.find('"').unwrap()];
            assert!(spec.pointer(pointer).is_some(), "dangling $ref #{pointer}");
        }
        for (path, item) in spec["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object();
                assert!(
                    responses.is_some_and(|r| !r.is_empty()),
                    "{method} {path} has no responses"
                );
            }
        }
    }

    #[test]
    fn page_is_self_contained_and_escaped() {
        let page = render(DOCUMENT);
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.contains("/v2/models/{model}/infer"));
        for needle in [
            "http://", "https://", "<script", "<link", "src=", "@import", "url(",
        ] {
            assert!(!page.contains(needle), "page contains {needle}");
        }
        let evil = r#"{"openapi":"3.0.3","info":{"title":"<b>x</b>"},"paths":{}}"#;
        let page = render(evil);
        assert!(page.contains("&lt;b&gt;x&lt;/b&gt;") && !page.contains("<b>x</b>"));
    }
}
