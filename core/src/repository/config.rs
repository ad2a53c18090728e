//! A model's `config.toml`: optional overrides of what the plugin class declares.
//!
//! ```toml
//! class = "Doubler"            # which um.Model subclass, when plugin.py defines several
//! max_batch_size = 8
//! max_queue_delay_ms = 2.0
//! instances = 2
//! device = "cpu"
//! version_policy = { latest = 2 }   # or { all = true }, { specific = [1, 3] }
//! max_concurrency = 64         # requests admitted at once (queued + running); 429 past it
//! retry_on_worker_failure = true    # retry a crashed batch's requests once (idempotent models)
//! memory_limit_bytes = 4294967296   # RLIMIT_AS of each worker (virtual memory: be generous)
//! concurrency = 16             # requests one worker runs at once (async predict, or threads)
//! [parameters]                 # ctx.parameters in setup()
//! factor = 3
//! ```
//!
//! Unknown keys are refused (a typo must not be silently ignored); errors name the key.

use super::policy::{PolicyTable, VersionPolicy};
use crate::engine::MAX_INSTANCES;
use crate::engine::model::{MAX_BATCH_SIZE, MAX_QUEUE_DELAY_MS};
use serde::Deserialize;
use std::collections::BTreeMap;

/// The keys of `config.toml`, all optional.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    pub class: Option<String>,
    pub max_batch_size: Option<u32>,
    pub max_queue_delay_ms: Option<f64>,
    pub instances: Option<u32>,
    pub device: Option<String>,
    /// Scalars only (strings, numbers, booleans); setup() sees them as strings.
    #[serde(default)]
    pub parameters: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub version_policy: PolicyTable,
    pub max_concurrency: Option<u64>,
    pub retry_on_worker_failure: Option<bool>,
    pub memory_limit_bytes: Option<u64>,
    pub concurrency: Option<u32>,
}

/// `ModelFile` checked and resolved.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelOverrides {
    pub class: Option<String>,
    pub max_batch_size: Option<u32>,
    pub max_queue_delay_ms: Option<f64>,
    pub instances: Option<u32>,
    pub device: Option<String>,
    pub parameters: BTreeMap<String, String>,
    pub version_policy: VersionPolicy,
    pub max_concurrency: Option<u64>,
    pub retry_on_worker_failure: Option<bool>,
    pub memory_limit_bytes: Option<u64>,
    pub concurrency: Option<u32>,
}

impl ModelFile {
    /// Parses the text of a `config.toml`; the error names the key and the line.
    pub fn parse(text: &str) -> Result<ModelFile, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// Checks ranges and turns parameters into strings.
    pub fn resolve(&self) -> Result<ModelOverrides, String> {
        if let Some(n) = self.instances
            && !(1..=MAX_INSTANCES).contains(&n)
        {
            return Err(format!(
                "instances must be between 1 and {MAX_INSTANCES}, got {n}"
            ));
        }
        if let Some(ms) = self.max_queue_delay_ms
            && !(ms.is_finite() && (0.0..=MAX_QUEUE_DELAY_MS).contains(&ms))
        {
            return Err(format!(
                "max_queue_delay_ms must be a number of milliseconds from 0 to {MAX_QUEUE_DELAY_MS} (1 hour), got {ms}"
            ));
        }
        if let Some(n) = self.max_batch_size
            && n > MAX_BATCH_SIZE
        {
            return Err(format!(
                "max_batch_size must be between 0 and {MAX_BATCH_SIZE}, got {n}"
            ));
        }
        if self.max_concurrency == Some(0) {
            return Err("max_concurrency must be at least 1 (omit it for no limit), got 0".into());
        }
        if let Some(n) = self.memory_limit_bytes
            && n < MIN_MEMORY_LIMIT
        {
            return Err(format!(
                "memory_limit_bytes must be at least {MIN_MEMORY_LIMIT} (64 MiB: the Python worker alone needs about that much virtual memory), got {n}"
            ));
        }
        if let Some(n) = self.concurrency
            && !(1..=MAX_CONCURRENCY).contains(&n)
        {
            return Err(format!(
                "concurrency must be between 1 and {MAX_CONCURRENCY} (requests one worker runs at once), got {n}"
            ));
        }
        let parameters = self
            .parameters
            .iter()
            .map(|(k, v)| Ok((k.clone(), parameter(k, v)?)))
            .collect::<Result<_, String>>()?;
        Ok(ModelOverrides {
            class: self.class.clone(),
            max_batch_size: self.max_batch_size,
            max_queue_delay_ms: self.max_queue_delay_ms,
            instances: self.instances,
            device: self.device.clone(),
            parameters,
            version_policy: self.version_policy.resolve()?,
            max_concurrency: self.max_concurrency,
            retry_on_worker_failure: self.retry_on_worker_failure,
            memory_limit_bytes: self.memory_limit_bytes,
            concurrency: self.concurrency,
        })
    }

    /// `self` with every key `over` sets replaced (parameters merged key by key).
    pub fn overlay(mut self, over: ModelFile) -> ModelFile {
        self.class = over.class.or(self.class);
        self.max_batch_size = over.max_batch_size.or(self.max_batch_size);
        self.max_queue_delay_ms = over.max_queue_delay_ms.or(self.max_queue_delay_ms);
        self.instances = over.instances.or(self.instances);
        self.device = over.device.or(self.device);
        self.parameters.extend(over.parameters);
        self.max_concurrency = over.max_concurrency.or(self.max_concurrency);
        self.retry_on_worker_failure = over
            .retry_on_worker_failure
            .or(self.retry_on_worker_failure);
        self.memory_limit_bytes = over.memory_limit_bytes.or(self.memory_limit_bytes);
        self.concurrency = over.concurrency.or(self.concurrency);
        if over.version_policy != PolicyTable::default() {
            self.version_policy = over.version_policy;
        }
        self
    }
}

/// The smallest `memory_limit_bytes` accepted: below it no worker could even start.
pub const MIN_MEMORY_LIMIT: u64 = 64 << 20;

/// The largest `concurrency` accepted (the SDK's limit too: each running request holds its
/// input block, and a plain `predict` a thread).
pub const MAX_CONCURRENCY: u32 = 1024;

fn parameter(key: &str, v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "parameters.{key} must be a string, number or boolean, got a {}",
            other.type_str()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let file = ModelFile::parse(
            r#"
            class = "Doubler"
            max_batch_size = 8
            max_queue_delay_ms = 2.5
            instances = 2
            device = "cpu"
            version_policy = { specific = [1, 3] }
            max_concurrency = 5
            retry_on_worker_failure = true
            memory_limit_bytes = 1073741824
            concurrency = 16
            [parameters]
            factor = 3
            name = "x"
            on = true
            "#,
        )
        .unwrap();
        let o = file.resolve().unwrap();
        assert_eq!(o.class.as_deref(), Some("Doubler"));
        assert_eq!(o.max_batch_size, Some(8));
        assert_eq!(o.max_queue_delay_ms, Some(2.5));
        assert_eq!(o.instances, Some(2));
        assert_eq!(o.version_policy, VersionPolicy::Specific(vec![1, 3]));
        assert_eq!(o.max_concurrency, Some(5));
        assert_eq!(o.retry_on_worker_failure, Some(true));
        assert_eq!(o.memory_limit_bytes, Some(1 << 30));
        assert_eq!(o.concurrency, Some(16));
        assert_eq!(o.parameters["factor"], "3");
        assert_eq!(o.parameters["name"], "x");
        assert_eq!(o.parameters["on"], "true");
    }

    #[test]
    fn an_empty_file_overrides_nothing() {
        let o = ModelFile::parse("").unwrap().resolve().unwrap();
        assert_eq!(o, ModelOverrides::default());
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let err = ModelFile::parse("max_batch = 4").unwrap_err();
        assert!(err.contains("max_batch"), "{err}");
        let err = ModelFile::parse("max_batch_size = \"big\"").unwrap_err();
        assert!(err.contains("max_batch_size"), "{err}");
        let err = ModelFile::parse("[version_policy]\nnewest = 1").unwrap_err();
        assert!(err.contains("newest"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let bad = |text: &str| ModelFile::parse(text).unwrap().resolve().unwrap_err();
        assert!(bad("instances = 0").contains("instances"));
        assert!(bad("max_queue_delay_ms = -1.0").contains("max_queue_delay_ms"));
        assert!(bad("[parameters]\nx = [1]").contains("parameters.x"));
        assert!(bad("version_policy = { latest = 0 }").contains("latest"));
        assert!(bad("max_concurrency = 0").contains("max_concurrency"));
        assert!(bad("memory_limit_bytes = 1000").contains("memory_limit_bytes"));
        assert!(bad("concurrency = 0").contains("concurrency must be between 1 and 1024"));
        assert!(bad("concurrency = 1025").contains("got 1025"));
    }

    #[test]
    fn overlay_replaces_set_keys_and_merges_parameters() {
        let base = ModelFile::parse("instances = 2\n[parameters]\na = 1\nb = 2").unwrap();
        let over = ModelFile::parse("max_batch_size = 4\n[parameters]\nb = 3").unwrap();
        let o = base.overlay(over).resolve().unwrap();
        assert_eq!(o.instances, Some(2));
        assert_eq!(o.max_batch_size, Some(4));
        assert_eq!(o.parameters["a"], "1");
        assert_eq!(o.parameters["b"], "3");
    }
}
