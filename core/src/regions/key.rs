//! Which shared-memory keys a client may make the server open.
//!
//! A key is a POSIX shared-memory name as tritonclient passes it (`"/input_data"`): one
//! leading slash, then a single path component. Anything else could make `shm_open` reach
//! outside `/dev/shm` or mean something other than what the client thinks, so it is refused.

use super::RegionError;

/// Longest name `shm_open` accepts (NAME_MAX).
const MAX_KEY_BYTES: usize = 255;

/// Checks `key`; returns it unchanged when acceptable.
pub fn check_key(key: &str) -> Result<&str, RegionError> {
    let bad = |reason: &str| {
        Err(RegionError::BadKey {
            key: key.to_string(),
            reason: reason.to_string(),
        })
    };
    let name = key.strip_prefix('/').unwrap_or(key);
    if name.is_empty() {
        return bad("it is empty; expected a name such as \"/input_data\"");
    }
    if name.len() > MAX_KEY_BYTES {
        return bad("it is longer than 255 bytes");
    }
    if name.contains('/') {
        return bad("only one leading '/' is allowed, e.g. \"/input_data\"");
    }
    if name == "." || name.contains("..") {
        return bad("it must not contain \"..\" or be \".\"");
    }
    if name.chars().any(|c| c.is_control()) {
        return bad("it contains a control character");
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_tritonclient_passes() {
        for key in ["/input_data", "/output0_data", "plain", "/a.b-c_d"] {
            assert_eq!(check_key(key), Ok(key));
        }
    }

    #[test]
    fn refuses_paths_dots_and_empty_names() {
        for key in [
            "",
            "/",
            "//x",
            "/a/b",
            "/../etc/passwd",
            "/..",
            "/.",
            "/x..y",
            "a\0b",
            "/a\nb",
        ] {
            let err = check_key(key).unwrap_err();
            assert!(
                matches!(err, RegionError::BadKey { .. }),
                "{key:?}: {err:?}"
            );
        }
        let long = format!("/{}", "k".repeat(256));
        assert!(check_key(&long).is_err());
    }
}
