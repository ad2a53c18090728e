//! Bounded echoes of what a client sent, for error messages.
//!
//! Error messages name the client's own values (a model name, a version, an input name, a
//! path, a header) so the client can see what was wrong. A hostile or buggy client can make
//! those values as long as the request allows (a 60 KB model name in a URL), and echoing them
//! whole turns every refusal into an amplifier and every log line into a flood. `Echo` is the
//! one way messages show such a value: whole up to `ECHO_MAX_CHARS` characters, else that many
//! followed by an ellipsis and the original length. `bound_message` is the last guard over a
//! whole message (`api::error` applies it to every REST body and gRPC status), for a value
//! some message formats without `Echo`.

use std::fmt;

/// Characters of a client's value shown in a message before it is cut.
pub const ECHO_MAX_CHARS: usize = 128;

/// Characters of a whole error message before it is cut: room for every bounded echo plus
/// the lists of expected names a message carries.
pub const MESSAGE_MAX_CHARS: usize = 4096;

/// Shows a client-supplied value in a message, cut at `ECHO_MAX_CHARS` characters.
#[derive(Clone, Copy)]
pub struct Echo<'a>(pub &'a str);

impl fmt::Display for Echo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&cut(self.0, ECHO_MAX_CHARS))
    }
}

impl fmt::Debug for Echo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", cut(self.0, ECHO_MAX_CHARS))
    }
}

/// `message` unchanged up to `MESSAGE_MAX_CHARS` characters, else cut like an `Echo`.
pub fn bound_message(message: String) -> String {
    match cut(&message, MESSAGE_MAX_CHARS) {
        std::borrow::Cow::Borrowed(_) => message,
        std::borrow::Cow::Owned(cut) => cut,
    }
}

/// The first `max` characters of `s` and "… (N bytes in all)" when `s` is longer.
fn cut(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => std::borrow::Cow::Borrowed(s),
        Some((end, _)) => {
            std::borrow::Cow::Owned(format!("{}… ({} bytes in all)", &s[..end], s.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_shown_whole_and_long_ones_cut_with_their_length() {
        assert_eq!(Echo("doubler").to_string(), "doubler");
        let exact = "a".repeat(ECHO_MAX_CHARS);
        assert_eq!(Echo(&exact).to_string(), exact);
        let long = "b".repeat(60_000);
        let shown = Echo(&long).to_string();
        assert_eq!(
            shown,
            format!("{}… (60000 bytes in all)", "b".repeat(ECHO_MAX_CHARS))
        );
        assert_eq!(format!("{:?}", Echo("x\"y")), r#""x\"y""#);
    }

    #[test]
    fn cuts_fall_on_character_boundaries() {
        let wide = "é".repeat(200);
        let shown = Echo(&wide).to_string();
        assert!(shown.starts_with(&"é".repeat(ECHO_MAX_CHARS)));
        assert!(shown.ends_with("… (400 bytes in all)"), "{shown}");
    }

    #[test]
    fn whole_messages_are_bounded_too() {
        assert_eq!(bound_message("short".into()), "short");
        let long = bound_message("m".repeat(MESSAGE_MAX_CHARS + 1));
        assert!(long.ends_with(&format!("… ({} bytes in all)", MESSAGE_MAX_CHARS + 1)));
        assert!(long.chars().count() < MESSAGE_MAX_CHARS + 40);
    }
}
