//! Network front ends: KServe V2 over HTTP (axum). Parses and encodes; the engine serves.
