//! The table of served models behind `Engine`, keyed by name and version.
//!
//! Requests read it on every call, loads and unloads change it rarely: the table is an
//! immutable `Arc<Table>` that readers clone under a read lock held for one pointer copy,
//! and a change builds a new table and swaps it in (copy on write). A request therefore
//! never waits for a model to load or drain, and an entry it already holds stays usable
//! until it is done with it.

use super::EngineError;
use super::executor::Executor;
use super::model::{ModelConfig, ModelState};
use super::scheduler::Scheduler;
use super::stats::StatsRecorder;
use crate::telemetry::metrics::ModelMetrics;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use tokio::sync::{Semaphore, watch};

/// One served version of a model: its scheduler, queue places, state and instances.
pub(super) struct ModelEntry {
    pub config: Arc<ModelConfig>,
    pub scheduler: Scheduler,
    /// One permit per place in the queue.
    pub places: Arc<Semaphore>,
    /// One permit per request admitted (queued or running), if the model sets
    /// `max_concurrency`; held until the request is answered.
    pub admitted: Option<Arc<Semaphore>>,
    pub state: watch::Receiver<ModelState>,
    pub stats: Arc<StatsRecorder>,
    pub metrics: ModelMetrics,
    pub instances: Vec<Arc<dyn Executor>>,
    /// Set when an unload starts: new requests are refused, queued ones still finish.
    pub unloading: AtomicBool,
}

impl ModelEntry {
    pub fn is_unloading(&self) -> bool {
        self.unloading.load(Ordering::Acquire)
    }

    /// The state as reported: UNLOADING once an unload started, else the scheduler's.
    pub fn state(&self) -> ModelState {
        if self.is_unloading() {
            ModelState::Stopping
        } else {
            self.state.borrow().clone()
        }
    }
}

/// The versions of one model, ordered by version number.
pub(super) type Versions = BTreeMap<u64, Arc<ModelEntry>>;
/// Every model by name.
pub(super) type Table = BTreeMap<String, Versions>;

pub(super) struct Registry {
    table: RwLock<Arc<Table>>,
}

impl Registry {
    pub fn new(table: Table) -> Registry {
        Registry {
            table: RwLock::new(Arc::new(table)),
        }
    }

    /// The current table; later changes do not affect it.
    pub fn snapshot(&self) -> Arc<Table> {
        // A panic while swapping cannot leave a half-built table: the write is one store.
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Applies `change` to a copy of the table and publishes the copy. Writers are
    /// serialised by the lock; readers keep the table they already cloned.
    pub fn update<R>(&self, change: impl FnOnce(&mut Table) -> R) -> R {
        let mut guard = self.table.write().unwrap_or_else(PoisonError::into_inner);
        let mut next = Table::clone(&guard);
        let result = change(&mut next);
        *guard = Arc::new(next);
        result
    }

    /// Every entry, by name then version.
    pub fn entries(&self) -> Vec<Arc<ModelEntry>> {
        self.snapshot()
            .values()
            .flat_map(|versions| versions.values().cloned())
            .collect()
    }

    /// The entry serving `name` at `version`, or at its default version when `None`.
    pub fn find(&self, name: &str, version: Option<&str>) -> Result<Arc<ModelEntry>, EngineError> {
        let table = self.snapshot();
        let Some(versions) = table.get(name) else {
            return Err(EngineError::ModelNotFound {
                name: name.to_string(),
                available: table.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        };
        let found = match version {
            None => default_version(versions),
            Some(v) => parse_version(v).and_then(|n| versions.get(&n)),
        };
        found.cloned().ok_or_else(|| EngineError::VersionNotFound {
            name: name.to_string(),
            version: version.unwrap_or_default().to_string(),
            available: versions
                .keys()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// A version as served: a canonical decimal number (Triton's version folders `1/`, `2/`,
/// ...). Canonical means one spelling per version: no sign, no whitespace and no leading
/// zero, so `01` names no version (404) instead of quietly meaning `1`.
pub fn parse_version(v: &str) -> Option<u64> {
    if !is_canonical_number(v) {
        return None;
    }
    v.parse().ok()
}

/// Digits only, and no leading zero unless the number is `0` itself.
fn is_canonical_number(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) && (v == "0" || !v.starts_with('0'))
}

/// Whether `v` is a number spelled other than canonically (`01`, `007`): a version folder so
/// named is refused rather than ignored or read as another version.
pub fn is_noncanonical_version(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) && !is_canonical_number(v)
}

/// The version a request without one gets: the highest READY one (a version still loading
/// does not take traffic from one that serves), else the highest not being unloaded, else
/// the highest.
fn default_version(versions: &Versions) -> Option<&Arc<ModelEntry>> {
    let serving = |e: &&Arc<ModelEntry>| !e.is_unloading() && e.state.borrow().is_ready();
    versions
        .values()
        .rev()
        .find(serving)
        .or_else(|| versions.values().rev().find(|e| !e.is_unloading()))
        .or_else(|| versions.values().next_back())
}

#[cfg(test)]
mod tests {
    use super::{is_noncanonical_version, parse_version};

    #[test]
    fn versions_are_decimal_numbers() {
        assert_eq!(parse_version("1"), Some(1));
        assert_eq!(parse_version("12"), Some(12));
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("-1"), None);
        assert_eq!(parse_version("v1"), None);
        assert_eq!(parse_version("1.0"), None);
        assert_eq!(parse_version("0"), Some(0));
    }

    #[test]
    fn only_the_canonical_spelling_names_a_version() {
        for v in [
            "01",
            "00",
            "007",
            "+1",
            " 1",
            "1 ",
            "1\n",
            "99999999999999999999999",
        ] {
            assert_eq!(parse_version(v), None, "{v:?}");
        }
        assert!(is_noncanonical_version("01"));
        assert!(!is_noncanonical_version("10"));
        assert!(!is_noncanonical_version("v1"));
    }
}
