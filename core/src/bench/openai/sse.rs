//! An incremental Server-Sent Events parser: bytes in, in whatever pieces the network delivers
//! them (an event split anywhere, several events in one read), complete events out.
//!
//! Only what an OpenAI-compatible stream uses: `data:` lines (several joined by `\n`), a blank
//! line ending the event, `:` comment lines (keep-alives) and other fields (`event:`, `id:`,
//! `retry:`) ignored; lines end with `\n`, `\r\n` or `\r` (the SSE spec allows all three).

/// Parser state across reads.
#[derive(Debug, Default)]
pub struct SseParser {
    /// The current line, not yet ended.
    line: Vec<u8>,
    /// `data:` of the current event, lines joined by `\n`; `None` until its first `data:` line.
    data: Option<Vec<u8>>,
    /// The last byte fed was `\r`: a following `\n` belongs to the same line end.
    after_cr: bool,
}

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Feeds the next bytes; returns the data of every event they completed, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut events = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(&mut events),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(&mut events);
                }
                _ => self.line.push(b),
            }
        }
        events
    }

    fn end_line(&mut self, events: &mut Vec<Vec<u8>>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            // A blank line dispatches the event; one without data is dropped (spec).
            if let Some(data) = self.data.take() {
                events.push(data);
            }
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&c| c == b':') {
            Some(i) => {
                let value = &line[i + 1..];
                // One space after the colon is part of the syntax, not of the value.
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (&line[..], &[][..]),
        };
        if field == b"data" {
            match &mut self.data {
                Some(data) => {
                    data.push(b'\n');
                    data.extend_from_slice(value);
                }
                None => self.data = Some(value.to_vec()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &[u8] = b": keep-alive\n\ndata: {\"a\":1}\n\nevent: x\ndata: {\"b\":\ndata: 2}\r\n\r\ndata:[DONE]\r\r";

    fn texts(events: Vec<Vec<u8>>) -> Vec<String> {
        events
            .into_iter()
            .map(|e| String::from_utf8(e).unwrap())
            .collect()
    }

    #[test]
    fn events_comments_and_multi_line_data() {
        let mut p = SseParser::new();
        assert_eq!(
            texts(p.push(STREAM)),
            ["{\"a\":1}", "{\"b\":\n2}", "[DONE]"]
        );
    }

    #[test]
    fn the_same_events_whatever_the_split() {
        let whole = texts(SseParser::new().push(STREAM));
        // Every split into two pieces, and byte by byte.
        for cut in 0..=STREAM.len() {
            let mut p = SseParser::new();
            let mut got = p.push(&STREAM[..cut]);
            got.extend(p.push(&STREAM[cut..]));
            assert_eq!(texts(got), whole, "split at {cut}");
        }
        let mut p = SseParser::new();
        let got: Vec<Vec<u8>> = STREAM.iter().flat_map(|b| p.push(&[*b])).collect();
        assert_eq!(texts(got), whole);
    }

    #[test]
    fn an_unfinished_event_is_held_not_emitted() {
        let mut p = SseParser::new();
        assert!(p.push(b"data: {\"a\"").is_empty());
        assert!(p.push(b":1}\n").is_empty(), "no blank line yet");
        assert_eq!(texts(p.push(b"\n")), ["{\"a\":1}"]);
        // A comment alone, or an event with no data, dispatches nothing.
        assert!(p.push(b": ping\n\nid: 7\n\n").is_empty());
        // A field without a colon is a name with an empty value; `data` alone is an empty line.
        assert_eq!(texts(p.push(b"data\n\n")), [""]);
    }
}
