//! Incremental detokenization with byte-level BPE (a GGUF vocabulary whose merges cut
//! characters in odd places) and with SentencePiece byte fallback (`<0xE6>` tokens): for
//! every prefix of the ids, the deltas never hold a U+FFFD that a split made, and deltas
//! plus the final flush are exactly the full decode.

use super::test_util::{byte_fallback_tokenizer, byte_level_tokenizer};
use super::{IncrementalDecoder, TextTokenizer};

const TEXTS: &[&str] = &[
    "hello wé",
    "héa🎉🎉 a🎉é",
    "日本語のテキスト",
    "emoji 👩‍👩‍👧 family, flag 🇫🇷, e\u{301} combining",
    "hi abc x 日",
    "ascii only",
];

/// Check every prefix of `text`'s ids. `exact_prefixes`: deltas plus flush equal the full
/// decode of every prefix too. That holds for byte-level BPE (a broken tail decodes to one
/// U+FFFD); SentencePiece's `ByteFallback` decoder turns every byte token of a broken run
/// into U+FFFD, even the complete characters before it, which the deltas already gave.
fn check(tok: &TextTokenizer, text: &str, exact_prefixes: bool) {
    let ids = tok.encode(text, false).expect("encodes");
    assert_eq!(
        tok.decode(&ids, true).expect("decodes"),
        text,
        "the tokenizer round-trips"
    );
    for end in 0..=ids.len() {
        let mut d = IncrementalDecoder::new(true);
        let mut out = String::new();
        for &id in &ids[..end] {
            let delta = d.push(tok, id).expect("pushes");
            assert!(
                !delta.contains(char::REPLACEMENT_CHARACTER),
                "{text:?}: U+FFFD in a delta after {} of {} ids",
                out.len(),
                end
            );
            out.push_str(&delta);
        }
        assert!(
            text.starts_with(&out),
            "{text:?}[..{end}]: {out:?} is not a prefix of the text"
        );
        out.push_str(&d.flush(tok).expect("flushes"));
        if exact_prefixes || end == ids.len() {
            assert_eq!(
                out,
                tok.decode(&ids[..end], true).expect("decodes"),
                "{text:?}: ids[..{end}]"
            );
        }
    }
}

#[test]
fn byte_level_bpe_never_emits_a_split_character() {
    let tok = byte_level_tokenizer();
    for text in TEXTS {
        check(&tok, text, true);
    }
    // The merges really cut characters: "é" + "a" is two tokens, the first half a character.
    let ids = tok.encode("éa", false).expect("encodes");
    assert_eq!(ids.len(), 2);
    assert!(
        tok.decode(&ids[..1], true)
            .expect("decodes")
            .contains(char::REPLACEMENT_CHARACTER)
    );
}

#[test]
fn byte_fallback_never_emits_a_split_character() {
    let tok = byte_fallback_tokenizer();
    for text in TEXTS {
        check(&tok, text, false);
    }
    let ids = tok.encode("日", false).expect("encodes");
    assert!(ids.len() >= 3, "日 falls back to its bytes: {ids:?}");
}

#[test]
fn bytes_that_never_complete_come_out_at_flush() {
    let tok = byte_level_tokenizer();
    let ids = tok.encode("🎉", false).expect("encodes");
    let mut d = IncrementalDecoder::new(true);
    // Only the first byte of the emoji, then an ASCII letter: the character is broken for
    // good, so the letter releases it as U+FFFD, as a full decode shows it.
    assert_eq!(d.push(&tok, ids[0]).expect("pushes"), "");
    let a = tok.encode("a", false).expect("encodes")[0];
    let out = d.push(&tok, a).expect("pushes");
    assert_eq!(out, tok.decode(&[ids[0], a], true).expect("decodes"));
    assert!(out.ends_with('a'));
    let mut d = IncrementalDecoder::new(true);
    assert_eq!(d.push(&tok, ids[0]).expect("pushes"), "");
    assert_eq!(
        d.flush(&tok).expect("flushes"),
        tok.decode(&ids[..1], true).expect("decodes")
    );
}

#[test]
fn special_tokens_are_skipped_or_kept() {
    let tok = byte_level_tokenizer();
    let ids = tok
        .encode("<|im_start|>hi<|im_end|>", false)
        .expect("encodes");
    let run = |skip: bool| {
        let mut d = IncrementalDecoder::new(skip);
        let mut out: String = ids
            .iter()
            .map(|&id| d.push(&tok, id).expect("pushes"))
            .collect();
        out.push_str(&d.flush(&tok).expect("flushes"));
        out
    };
    assert_eq!(run(true), "hi");
    assert_eq!(run(false), "<|im_start|>hi<|im_end|>");
}

#[test]
fn prompt_context_keeps_the_first_words_leading_space() {
    let tok = byte_fallback_tokenizer();
    let prompt = tok.encode("hi", false).expect("encodes");
    let all = tok.encode("hi abc", false).expect("encodes");
    assert_eq!(&all[..prompt.len()], &prompt[..]);
    let generated = &all[prompt.len()..];
    let run = |mut d: IncrementalDecoder| {
        let mut out: String = generated
            .iter()
            .map(|&id| d.push(&tok, id).expect("pushes"))
            .collect();
        out.push_str(&d.flush(&tok).expect("flushes"));
        assert_eq!(d.ids(), generated);
        out
    };
    // Alone, SentencePiece's decoder drops the space a text starts with; after the prompt
    // the space is part of the answer.
    assert_eq!(run(IncrementalDecoder::new(true)), "abc");
    assert_eq!(run(IncrementalDecoder::with_context(true, &prompt)), " abc");
}
