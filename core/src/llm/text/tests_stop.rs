//! Stop strings, property style: any split of a text into deltas gives the same output as
//! the whole text at once, and that output is the text up to the first stop to complete.
//! Then the whole stream (`TextStream`) with a real tokenizer: stop ids, stop strings
//! across tokens, `max_tokens`, the context, usage.

use super::test_util::{Rng, byte_level_tokenizer};
use super::{Finish, StopMatcher, StopParams, TextError, TextStream, new_token_budget};

/// Feed `chunks`, return (released text, matched stop).
fn run(stops: &[&str], chunks: &[&str]) -> (String, Option<String>) {
    let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()));
    let mut out = String::new();
    for chunk in chunks {
        let r = m.push(chunk);
        out.push_str(&r.text);
        if r.stopped.is_some() {
            return (out, r.stopped);
        }
    }
    out.push_str(&m.flush());
    (out, None)
}

/// What the output must be, found by brute force: the stop whose first occurrence ends
/// first (ties: the one starting first) cuts the text at its start.
fn expected(stops: &[&str], text: &str) -> (String, Option<String>) {
    let best = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s).map(|at| (at + s.len(), at, s.to_string())))
        .min_by_key(|(end, start, _)| (*end, *start));
    match best {
        Some((_, start, stop)) => (text[..start].to_string(), Some(stop)),
        None => (text.to_string(), None),
    }
}

/// Split `text` at random char boundaries (empty chunks included).
fn random_split<'a>(rng: &mut Rng, text: &'a str) -> Vec<&'a str> {
    let bounds: Vec<usize> = (0..=text.len())
        .filter(|&i| text.is_char_boundary(i))
        .collect();
    let mut cuts: Vec<usize> = (0..rng.below(6) + 1)
        .map(|_| bounds[rng.below(bounds.len())])
        .collect();
    cuts.push(0);
    cuts.push(text.len());
    cuts.sort_unstable();
    cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect()
}

#[test]
fn any_split_gives_the_whole_texts_output() {
    let alphabet = ["a", "b", "c", "é", "日", "🎉", " ", "\n"];
    let stop_sets: [&[&str]; 6] = [
        &["ab"],
        &["abc", "bc"],
        &["aab", "ab", "b🎉"],
        &["é日", "日🎉"],
        &["\n\n", "c c"],
        &["", "cab", "abcab"],
    ];
    for seed in 0..3000u64 {
        let mut rng = Rng::new(seed);
        let text: String = (0..rng.below(14))
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect();
        let stops = stop_sets[rng.below(stop_sets.len())];
        let want = expected(stops, &text);
        assert_eq!(
            run(stops, &[&text]),
            want,
            "seed {seed}: whole {text:?} stops {stops:?}"
        );
        let chunks = random_split(&mut rng, &text);
        assert_eq!(
            run(stops, &chunks),
            want,
            "seed {seed}: chunks {chunks:?} stops {stops:?}"
        );
    }
}

#[test]
fn a_possible_stop_prefix_is_held_then_released() {
    let mut m = StopMatcher::new(["</end>".to_string()]);
    assert_eq!(m.push("answer </e").text, "answer ");
    assert_eq!(m.push("xtra").text, "</extra");
    assert_eq!(m.push(" </en").text, " ");
    assert_eq!(m.flush(), "</en");
}

fn stream(params: StopParams, prompt: usize, max_len: usize) -> (TextStream, super::TextTokenizer) {
    let tok = byte_level_tokenizer();
    let prompt: Vec<u32> = (0..prompt as u32).map(|i| 40 + i % 20).collect();
    let s = TextStream::new(&tok, params, &prompt, max_len).expect("fits");
    (s, tok)
}

/// Push every id of `text`, then `tail` ids; collect the text and the finish.
fn drive(
    s: &mut TextStream,
    tok: &super::TextTokenizer,
    text: &str,
    tail: &[u32],
) -> (String, Option<Finish>) {
    let mut ids = tok.encode(text, false).expect("encodes");
    ids.extend(tail);
    let mut out = String::new();
    for id in ids {
        let d = s.push(tok, id).expect("pushes");
        out.push_str(&d.text);
        if d.finish.is_some() {
            return (out, d.finish);
        }
    }
    (out, None)
}

#[test]
fn eos_ends_the_stream_without_its_text() {
    let (mut s, tok) = stream(StopParams::default(), 5, 64);
    let (text, finish) = drive(&mut s, &tok, "hello wé", &[2, 40]);
    assert_eq!(text, "hello wé");
    assert_eq!(finish, Some(Finish::StopId(2)));
    assert_eq!(finish.as_ref().map(Finish::reason), Some("stop"));
    let n = tok.encode("hello wé", false).expect("encodes").len();
    assert_eq!(
        s.usage().completion_tokens,
        n + 1,
        "the EOS counts, the id after it does not"
    );
    assert_eq!(s.usage().prompt_tokens, 5);
}

#[test]
fn a_stop_string_across_tokens_cuts_before_it() {
    for (text, stop, want) in [
        ("hello world", "o w", "hell"),
        ("say héa🎉 now", "é", "say h"),
        ("say héa🎉 now", "a🎉", "say hé"),
        ("say héa🎉 now", "🎉 n", "say héa"),
    ] {
        let params = StopParams {
            stop: vec![stop.to_string()],
            ..StopParams::default()
        };
        let (mut s, tok) = stream(params, 1, 64);
        let (out, finish) = drive(&mut s, &tok, text, &[]);
        assert_eq!(out, want, "{text:?} stop {stop:?}");
        assert_eq!(finish, Some(Finish::StopString(stop.to_string())));
    }
}

#[test]
fn max_tokens_and_the_context_end_with_length() {
    let params = StopParams {
        max_tokens: Some(3),
        stop: vec!["zzz".into()],
        ..StopParams::default()
    };
    let (mut s, tok) = stream(params, 1, 64);
    let ids = tok.encode("hello wzz", false).expect("encodes");
    let (out, finish) = drive(&mut s, &tok, "hello wzz", &[]);
    assert_eq!(finish, Some(Finish::MaxTokens));
    assert_eq!(out, tok.decode(&ids[..3], true).expect("decodes"));
    assert_eq!(s.usage().completion_tokens, 3);

    let (mut s, tok) = stream(StopParams::default(), 60, 64);
    let (_, finish) = drive(&mut s, &tok, "abcdefgh", &[]);
    assert_eq!(finish, Some(Finish::ModelLength));
    assert_eq!(finish.as_ref().map(Finish::reason), Some("length"));
    assert_eq!(s.usage().total_tokens(), 64);
}

#[test]
fn held_text_comes_out_when_the_stream_ends_otherwise() {
    let params = StopParams {
        stop: vec!["o world".into()],
        ..StopParams::default()
    };
    let (mut s, tok) = stream(params, 1, 64);
    let (out, finish) = drive(&mut s, &tok, "hello wo", &[2]);
    assert_eq!(out, "hello wo");
    assert_eq!(finish, Some(Finish::StopId(2)));
}

#[test]
fn prompts_and_max_tokens_past_the_context_are_client_errors() {
    assert_eq!(new_token_budget(10, None, 64).expect("fits"), 54);
    assert_eq!(new_token_budget(10, Some(54), 64).expect("fits"), 54);
    let err = new_token_budget(64, None, 64).unwrap_err();
    assert!(matches!(err, TextError::PromptTooLong { .. }) && err.is_client_error());
    assert!(err.to_string().contains("64 tokens"), "{err}");
    let err = new_token_budget(10, Some(0), 64).unwrap_err();
    assert!(matches!(err, TextError::MaxTokensZero) && err.is_client_error());
    let err = new_token_budget(10, Some(55), 64).unwrap_err();
    assert!(err.is_client_error());
    assert!(
        err.to_string().contains("max_tokens is 55") && err.to_string().contains("at most 54"),
        "{err}"
    );
}
