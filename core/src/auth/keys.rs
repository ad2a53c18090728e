//! The API key file (`--api-key-file`) and the constant-time lookup.
//!
//! ```text
//! # one key per line: KEY ROLES [rps=N] [burst=N]
//! 3f9c0e4b7a2d41c8b6e5a9d0c7f1e2b4 infer        # a comment may end a line
//! sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 admin,infer rps=50
//! ```
//!
//! Only digests are kept in memory: a plain key is hashed when the file is read. A
//! presented key is hashed with sha256 and compared with every digest with `subtle`'s
//! constant-time equality, whatever matches, so plain and hashed entries are one path and
//! the time taken says nothing about how close a guess was.

use super::error::ConfigError;
use super::limit::{KeyBucket, Rate};
use super::role::{Role, Roles};
use sha2::{Digest as _, Sha256};
use std::path::Path;
use subtle::{ConditionallySelectable as _, ConstantTimeEq as _};

/// Plain keys shorter than this are refused: they could be guessed.
const MIN_KEY_CHARS: usize = 16;

/// An API key's audit name: the first 4 bytes (8 hex digits) of its sha256.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyId([u8; 4]);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// One line of the key file.
pub struct KeyEntry {
    digest: [u8; 32],
    pub roles: Roles,
    /// `None`: this key is not rate limited.
    pub bucket: Option<KeyBucket>,
}

/// Every configured key.
#[derive(Default)]
pub struct ApiKeys {
    entries: Vec<KeyEntry>,
}

impl ApiKeys {
    /// Reads and parses `file`; `rate` is every key's bucket unless its line sets its own.
    pub fn load(file: &Path, rate: Option<Rate>) -> Result<ApiKeys, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            what: "API key file",
            file: file.to_path_buf(),
            source,
        })?;
        ApiKeys::parse(&text, file, rate)
    }

    pub fn parse(text: &str, file: &Path, rate: Option<Rate>) -> Result<ApiKeys, ConfigError> {
        let mut entries: Vec<(usize, KeyEntry)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |message: String| ConfigError::KeyLine {
                file: file.to_path_buf(),
                line,
                message,
            };
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let entry = parse_line(content, rate).map_err(err)?;
            if let Some((first, _)) = entries.iter().find(|(_, e)| e.digest == entry.digest) {
                return Err(err(format!("the same key as line {first}")));
            }
            entries.push((line, entry));
        }
        if entries.is_empty() {
            return Err(ConfigError::NoKeys {
                file: file.to_path_buf(),
            });
        }
        Ok(ApiKeys {
            entries: entries.into_iter().map(|(_, e)| e).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The presented key's audit id, and its entry if it is one of ours. Every digest is
    /// compared (constant time), so the time does not depend on which entry matched.
    pub fn find(&self, presented: &str) -> (KeyId, Option<&KeyEntry>) {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = u32::MAX;
        for (i, entry) in self.entries.iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            found.conditional_assign(&index, entry.digest[..].ct_eq(&digest[..]));
        }
        let id = KeyId([digest[0], digest[1], digest[2], digest[3]]);
        (id, self.entries.get(found as usize))
    }
}

/// `KEY ROLES [rps=N] [burst=N]` (already trimmed, not a comment).
fn parse_line(content: &str, default_rate: Option<Rate>) -> Result<KeyEntry, String> {
    // A field starting with `#` starts a trailing comment.
    let mut fields = content
        .split_whitespace()
        .take_while(|f| !f.starts_with('#'));
    let key = fields.next().unwrap_or_default();
    let digest = digest_of(key)?;
    let roles = parse_roles(fields.next().ok_or("no roles after the key")?)?;
    let mut rps = None;
    let mut burst = None;
    for option in fields {
        match option.split_once('=') {
            Some(("rps", v)) => {
                rps =
                    Some(v.parse::<f64>().map_err(|_| {
                        format!("rps={v}: expected a number of requests per second")
                    })?)
            }
            Some(("burst", v)) => {
                burst = Some(
                    v.parse::<u32>()
                        .map_err(|_| format!("burst={v}: expected a whole number of requests"))?,
                )
            }
            _ => {
                return Err(format!(
                    "unexpected `{option}` (options are rps=N and burst=N)"
                ));
            }
        }
    }
    let rate = match (rps, burst, default_rate) {
        (None, None, default) => default,
        (None, Some(_), None) => return Err("burst= needs rps= (or --rate-limit)".into()),
        (None, Some(b), Some(d)) => Some(Rate {
            per_second: d.per_second,
            burst: b,
        }),
        // A key's own rate without a burst: one second's worth of it.
        (Some(r), b, _) => Some(Rate {
            per_second: r,
            burst: b.unwrap_or_else(|| Rate::default_burst(r)),
        }),
    };
    let bucket = rate.map(KeyBucket::new).transpose()?;
    Ok(KeyEntry {
        digest,
        roles,
        bucket,
    })
}

/// The digest of a `KEY` field: `sha256:HEX` as given, a plain key hashed.
fn digest_of(key: &str) -> Result<[u8; 32], String> {
    if let Some(hex) = key.strip_prefix("sha256:") {
        return parse_hex_digest(hex)
            .ok_or_else(|| "`sha256:` must be followed by 64 hex digits".to_string());
    }
    let chars = key.chars().count();
    if chars < MIN_KEY_CHARS {
        return Err(format!(
            "a key of {chars} characters is too easy to guess; use at least {MIN_KEY_CHARS} \
             (e.g. `openssl rand -hex 32`)"
        ));
    }
    Ok(Sha256::digest(key.as_bytes()).into())
}

fn parse_hex_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn parse_roles(list: &str) -> Result<Roles, String> {
    let mut roles = Roles::default();
    for name in list.split(',') {
        let role = Role::parse(name).ok_or_else(|| {
            format!("unknown role `{name}` in `{list}` (roles are infer and admin)")
        })?;
        roles = roles.with(role);
    }
    Ok(roles)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef-infer";

    fn parse(text: &str) -> Result<ApiKeys, String> {
        ApiKeys::parse(text, Path::new("keys.txt"), None).map_err(|e| e.to_string())
    }

    fn sha_hex(key: &str) -> String {
        Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn plain_and_hashed_keys_are_found_by_the_presented_key() {
        let admin = "0123456789abcdef-admin";
        let text = format!(
            "# comment\n\n  {KEY} infer  # trailing comment\nsha256:{} admin,infer rps=5 burst=2\n",
            sha_hex(admin).to_uppercase()
        );
        let keys = parse(&text).unwrap();
        assert_eq!(keys.len(), 2);
        let (id, entry) = keys.find(KEY);
        assert_eq!(id.to_string(), sha_hex(KEY)[..8]);
        let entry = entry.unwrap();
        assert!(entry.roles.allows(Role::Infer));
        assert!(!entry.roles.allows(Role::Admin));
        assert!(entry.bucket.is_none());
        let (_, entry) = keys.find(admin);
        let entry = entry.unwrap();
        assert!(entry.roles.allows(Role::Admin));
        assert!(entry.bucket.is_some());
        let (id, entry) = keys.find("0123456789abcdef-wrong");
        assert!(entry.is_none());
        assert_eq!(id.to_string(), sha_hex("0123456789abcdef-wrong")[..8]);
        // The hashed form is not itself a key.
        assert!(keys.find(&format!("sha256:{}", sha_hex(admin))).1.is_none());
    }

    #[test]
    fn the_default_rate_applies_unless_a_line_sets_its_own() {
        let rate = Rate {
            per_second: 10.0,
            burst: 3,
        };
        let text = format!("{KEY} infer\n0123456789abcdef-other admin burst=1\n");
        let keys = ApiKeys::parse(&text, Path::new("k"), Some(rate)).unwrap();
        assert!(keys.entries.iter().all(|e| e.bucket.is_some()));
    }

    #[test]
    fn malformed_lines_name_the_file_the_line_and_what_was_expected() {
        let cases = [
            (format!("{KEY}\n"), "keys.txt:1: no roles after the key"),
            (format!("\n{KEY} root\n"), "keys.txt:2: unknown role `root`"),
            (format!("{KEY} infer,\n"), "keys.txt:1: unknown role ``"),
            (
                "short infer\n".to_string(),
                "keys.txt:1: a key of 5 characters",
            ),
            (
                "sha256:abcd infer\n".to_string(),
                "keys.txt:1: `sha256:` must be followed by 64 hex",
            ),
            (
                format!("sha256:{} infer\n", "zz".repeat(32)),
                "keys.txt:1: `sha256:` must be followed by 64 hex",
            ),
            (
                format!("{KEY} infer rps=fast\n"),
                "keys.txt:1: rps=fast: expected a number",
            ),
            (format!("{KEY} infer rps=0\n"), "keys.txt:1: rps=0"),
            (
                format!("{KEY} infer burst=0 rps=1\n"),
                "keys.txt:1: burst=0",
            ),
            (
                format!("{KEY} infer burst=2\n"),
                "keys.txt:1: burst= needs rps=",
            ),
            (
                format!("{KEY} infer colour=blue\n"),
                "keys.txt:1: unexpected `colour=blue`",
            ),
            (
                format!("{KEY} infer\n{KEY} admin\n"),
                "keys.txt:2: the same key as line 1",
            ),
            (
                format!("{KEY} infer\nsha256:{} admin\n", sha_hex(KEY)),
                "keys.txt:2: the same key as line 1",
            ),
            ("# nothing\n\n".to_string(), "keys.txt: holds no API key"),
        ];
        for (text, want) in cases {
            let err = parse(&text)
                .err()
                .unwrap_or_else(|| panic!("accepted {text:?}"));
            assert!(err.starts_with(want), "{text:?}: {err}");
            if !want.contains("holds no") {
                assert!(err.contains("expected `KEY ROLES"), "{err}");
            }
        }
    }
}
