//! The plugin's own compute time, from the server's Triton-style statistics
//! (`GET /v2/models/{model}/stats`), read before and after a step's measured phase.
//!
//! Subtracting it from the client's latency shows what the core adds around the plugin.
//! `ns / count` of `compute_infer` is the plugin time per worker call whether the server counts
//! per batch or, like Triton, per request with each request charged its batch's full time.

use serde::{Deserialize, Serialize};

/// The counters the bench reads from one model's statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Worker calls (batches).
    pub execution_count: u64,
    /// Rows inferred (sum of request batch sizes).
    pub inference_count: u64,
    /// `inference_stats.compute_infer.count`.
    pub infer_count: u64,
    /// `inference_stats.compute_infer.ns`.
    pub infer_ns: u64,
}

/// Parses a statistics response, picking `model`'s entry (or the only one).
pub fn parse_stats(body: &[u8], model: &str) -> Result<StatsSnapshot, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let entries = v
        .get("model_stats")
        .and_then(|m| m.as_array())
        .ok_or("no model_stats array")?;
    let entry = entries
        .iter()
        .find(|e| e.get("name").and_then(|n| n.as_str()) == Some(model))
        .or(if entries.len() == 1 {
            entries.first()
        } else {
            None
        })
        .ok_or_else(|| format!("no model_stats entry for '{model}'"))?;
    let number = |pointer: &str| {
        entry
            .pointer(pointer)
            .and_then(|n| n.as_u64())
            .ok_or_else(|| format!("no {pointer}"))
    };
    Ok(StatsSnapshot {
        execution_count: number("/execution_count")?,
        inference_count: number("/inference_count")?,
        infer_count: number("/inference_stats/compute_infer/count")?,
        infer_ns: number("/inference_stats/compute_infer/ns")?,
    })
}

/// Plugin time during one measured phase.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PluginTime {
    /// Worker calls in the phase.
    pub worker_calls: u64,
    /// Rows inferred in the phase.
    pub rows: u64,
    /// Average rows per worker call: the dynamic batcher's batch size.
    pub rows_per_call: f64,
    /// The plugin's `predict` time per worker call.
    pub us_per_call: f64,
    /// Plugin time per request sent: per-call time times calls, over requests.
    pub us_per_request: f64,
}

/// Plugin time between two snapshots for `requests` requests; `None` when no worker call
/// was timed in between (or the counters went backwards: the server restarted).
pub fn plugin_time(
    before: StatsSnapshot,
    after: StatsSnapshot,
    requests: u64,
) -> Option<PluginTime> {
    let calls = after.execution_count.checked_sub(before.execution_count)?;
    let rows = after.inference_count.checked_sub(before.inference_count)?;
    let timed = after.infer_count.checked_sub(before.infer_count)?;
    let ns = after.infer_ns.checked_sub(before.infer_ns)?;
    if timed == 0 || calls == 0 || requests == 0 {
        return None;
    }
    let us_per_call = ns as f64 / timed as f64 / 1e3;
    Some(PluginTime {
        worker_calls: calls,
        rows,
        rows_per_call: rows as f64 / calls as f64,
        us_per_call,
        us_per_request: us_per_call * calls as f64 / requests as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{"model_stats":[
        {"name":"other","version":"1","execution_count":1,"inference_count":1,
         "inference_stats":{"compute_infer":{"count":1,"ns":1}}},
        {"name":"doubler","version":"1","last_inference":0,"execution_count":10,"inference_count":40,
         "inference_stats":{"success":{"count":40,"ns":9},"compute_infer":{"count":40,"ns":800000}},
         "batch_stats":[]}]}"#;

    #[test]
    fn parses_the_named_model() {
        let s = parse_stats(BODY.as_bytes(), "doubler").unwrap();
        assert_eq!(
            s,
            StatsSnapshot {
                execution_count: 10,
                inference_count: 40,
                infer_count: 40,
                infer_ns: 800_000
            }
        );
        assert!(
            parse_stats(BODY.as_bytes(), "missing")
                .unwrap_err()
                .contains("missing")
        );
        assert!(parse_stats(b"{}", "m").is_err());
        assert!(parse_stats(b"<html>", "m").is_err());
        let no_infer = r#"{"model_stats":[{"name":"m","execution_count":1,"inference_count":1}]}"#;
        assert!(
            parse_stats(no_infer.as_bytes(), "m")
                .unwrap_err()
                .contains("compute_infer")
        );
    }

    #[test]
    fn per_call_and_per_request_times() {
        let before = StatsSnapshot {
            execution_count: 10,
            inference_count: 40,
            infer_count: 40,
            infer_ns: 800_000,
        };
        // 100 requests in 25 batches of 4; Triton style: each request charged its batch's 20 µs.
        let after = StatsSnapshot {
            execution_count: 35,
            inference_count: 140,
            infer_count: 140,
            infer_ns: 800_000 + 100 * 20_000,
        };
        let t = plugin_time(before, after, 100).unwrap();
        assert_eq!((t.worker_calls, t.rows), (25, 100));
        assert!((t.rows_per_call - 4.0).abs() < 1e-9);
        assert!((t.us_per_call - 20.0).abs() < 1e-9);
        assert!((t.us_per_request - 5.0).abs() < 1e-9);
        // Counted per batch instead: same per-call time.
        let per_batch = StatsSnapshot {
            infer_count: 35,
            infer_ns: 800_000 + 25 * 20_000,
            ..after
        };
        let before = StatsSnapshot {
            infer_count: 10,
            ..before
        };
        assert!((plugin_time(before, per_batch, 100).unwrap().us_per_call - 20.0).abs() < 1e-9);
    }

    #[test]
    fn no_calls_or_a_restarted_server_give_none() {
        let s = StatsSnapshot {
            execution_count: 5,
            inference_count: 5,
            infer_count: 5,
            infer_ns: 50,
        };
        assert_eq!(plugin_time(s, s, 10), None);
        assert_eq!(plugin_time(s, StatsSnapshot::default(), 10), None);
    }
}
