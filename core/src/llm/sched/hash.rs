//! Chained block hashes: a full block of tokens is named by its parent block's hash and its
//! own token ids, so equal hashes mean (barring a collision, which `blocks` rules out by
//! comparing tokens) equal prefixes from position 0.

use std::hash::{DefaultHasher, Hash, Hasher};

/// How a block's hash is computed; tests swap in a colliding one.
pub(super) type HashFn = fn(Option<u64>, &[u32]) -> u64;

/// SipHash with fixed keys: the same tokens hash the same for the process's lifetime.
pub(super) fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut hasher = DefaultHasher::new();
    parent.hash(&mut hasher);
    tokens.hash(&mut hasher);
    hasher.finish()
}
