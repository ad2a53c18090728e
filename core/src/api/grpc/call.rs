//! What a gRPC call's metadata says about the request: its trace and its deadline.
//!
//! The same rules as REST (`api/observe.rs`): a valid W3C `traceparent` is adopted and
//! handed to the worker, an invalid one is ignored. The client's deadline (`grpc-timeout`)
//! becomes the engine request's timeout, so a request whose caller has given up is dropped
//! from the queue instead of being executed for nobody.
//!
//! The deadline is also ours to answer: tonic's server drops a call whose `grpc-timeout` has
//! passed with CANCELLED "Timeout expired", where the gRPC spec says DEADLINE_EXCEEDED (and a
//! client whose own timer is late under load reports what the server said). So every call is
//! stamped with its arrival (`stamp_arrival`, the outermost layer, whose `call` runs before
//! tonic arms its timer), and `ModelInfer` gives up at arrival + deadline with
//! DEADLINE_EXCEEDED: at or before tonic's instant, and tonic polls the call before its timer.

use crate::api::observe::RequestTrace;
use crate::telemetry::{self, TraceParent, trace_context::TRACEPARENT};
use std::time::Duration;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tracing::field;

/// Per-call context, taken from the metadata once per RPC (a stream shares one).
#[derive(Clone, Debug)]
pub struct CallContext {
    pub trace: RequestTrace,
    pub span: tracing::Span,
    pub deadline: Option<Duration>,
    /// When the client's deadline passes, counted from the call's arrival (`expiring`).
    pub expires: Option<Instant>,
}

/// When a call reached the server (an extension `stamp_arrival` puts on every request).
#[derive(Clone, Copy, Debug)]
pub struct Arrival(pub Instant);

/// Stamps a request with its arrival; the outermost gRPC layer, so the stamp is taken before
/// tonic arms its own `grpc-timeout` timer.
pub fn stamp_arrival<B>(mut req: http::Request<B>) -> http::Request<B> {
    req.extensions_mut().insert(Arrival(Instant::now()));
    req
}

impl CallContext {
    /// `method` names the RPC in the span ("ModelInfer", "ModelStreamInfer").
    pub fn new(metadata: &MetadataMap, method: &'static str) -> CallContext {
        let incoming = metadata
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse);
        // DEBUG, like every per-request span: exported over OTLP, free otherwise.
        let span = tracing::debug_span!("grpc", method, trace_id = field::Empty);
        let trace = telemetry::request_trace(&span, incoming.as_ref());
        span.record("trace_id", field::display(trace));
        let propagate = incoming.is_some() || telemetry::otlp_active();
        CallContext {
            trace: RequestTrace { trace, propagate },
            span,
            deadline: metadata
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_grpc_timeout),
            expires: None,
        }
    }

    /// Sets `expires` from the call's arrival stamp (now, if it has none) and its deadline.
    pub fn expiring(mut self, extensions: &http::Extensions) -> CallContext {
        let arrival = extensions
            .get::<Arrival>()
            .map_or_else(Instant::now, |a| a.0);
        self.expires = self.deadline.and_then(|d| arrival.checked_add(d));
        self
    }
}

/// Parses a `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m, u, n), as the
/// gRPC over HTTP/2 spec defines it. Anything else is ignored (no deadline).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_by_the_spec() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("10u"), Some(Duration::from_micros(10)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "123456789S", "5s", "-5S", "5", "1.5S", "5é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn traceparent_is_adopted_and_a_bad_one_ignored() {
        let mut md = MetadataMap::new();
        md.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        md.insert("grpc-timeout", "250m".parse().unwrap());
        let call = CallContext::new(&md, "ModelInfer");
        assert_eq!(
            call.trace.trace.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(call.trace.propagate);
        assert_eq!(call.deadline, Some(Duration::from_millis(250)));
        let arrived = Instant::now();
        let mut extensions = http::Extensions::new();
        extensions.insert(Arrival(arrived));
        let call = call.expiring(&extensions);
        assert_eq!(call.expires, Some(arrived + Duration::from_millis(250)));

        let mut bad = MetadataMap::new();
        bad.insert("traceparent", "00-zz-00".parse().unwrap());
        let call = CallContext::new(&bad, "ModelInfer");
        assert_ne!(
            call.trace.trace.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(!call.trace.propagate);
        assert_eq!(call.deadline, None);
    }
}
