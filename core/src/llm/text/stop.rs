//! Stop strings over a stream of text deltas. A stop string may span deltas (and tokens),
//! so the longest tail that could still start a stop string is held back until the next
//! delta settles it. On a match the text before the stop is released and the rest dropped.
//!
//! The stop that ends first wins (ties: the longer, which starts earlier); the held-back
//! tail guarantees that any split of a text into deltas gives the same output as the whole
//! text at once (`stop_tests.rs` checks it on random splits).

#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What one delta releases.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Released {
    /// Text that is final: no stop string can include it.
    pub text: String,
    /// The stop string that matched; the stream ends here.
    pub stopped: Option<String>,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match before any text).
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, delta: &str) -> Released {
        self.held.push_str(delta);
        if self.stops.is_empty() {
            return Released {
                text: std::mem::take(&mut self.held),
                stopped: None,
            };
        }
        // (end, start, stop) of each stop's first occurrence; the smallest end wins.
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at + s.len(), at, s)))
            .min_by_key(|(end, start, _)| (*end, *start));
        if let Some((_, start, stop)) = first {
            let stopped = Some(stop.clone());
            let mut text = std::mem::take(&mut self.held);
            text.truncate(start);
            return Released { text, stopped };
        }
        let keep = self.stop_prefix_len();
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        Released {
            text,
            stopped: None,
        }
    }

    /// The held-back text, released at the end of a stream that no stop string ended.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest tail of `held` that is a proper prefix of some stop string.
    fn stop_prefix_len(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let len = self.held.len();
        (1..longest.min(len + 1))
            .rev()
            .find(|&k| {
                self.held.is_char_boundary(len - k)
                    && self
                        .stops
                        .iter()
                        .any(|s| s.starts_with(&self.held[len - k..]))
            })
            .unwrap_or(0)
    }
}
