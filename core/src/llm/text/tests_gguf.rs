//! The GGUF reader on synthetic files (every value type, every truncation, corrupt
//! headers) and the tokenizer built from GGUF metadata (supported and refused kinds).

use super::gguf::{Problem, Value, parse, read_metadata};
use super::test_util::{byte_level_gguf, gguf_bytes, s, temp_path};
use super::{PRE_SPLITS, TextError, TextTokenizer};

fn every_type() -> Vec<(&'static str, Value)> {
    vec![
        ("u8", Value::U8(200)),
        ("i8", Value::I8(-5)),
        ("u16", Value::U16(60_000)),
        ("i16", Value::I16(-30_000)),
        ("u32", Value::U32(4_000_000_000)),
        ("i32", Value::I32(-2_000_000_000)),
        ("u64", Value::U64(u64::MAX)),
        ("i64", Value::I64(i64::MIN)),
        ("f32", Value::F32(1.5)),
        ("f64", Value::F64(-0.25)),
        ("bool", Value::Bool(true)),
        ("string", s("héllo 🎉")),
        ("array", Value::Array(vec![s("a"), s(""), s("ccc")])),
        (
            "nested",
            Value::Array(vec![Value::Array(vec![Value::I32(1), Value::I32(2)])]),
        ),
        ("empty", Value::Array(vec![])),
    ]
}

fn bad(bytes: &[u8]) -> String {
    match parse(bytes, bytes.len() as u64) {
        Err(Problem::Bad(what)) => what,
        other => panic!("expected a format error, got {other:?}"),
    }
}

#[test]
fn every_value_type_reads_back() {
    let entries = every_type();
    let bytes = gguf_bytes(&entries);
    let meta = parse(&bytes[..], bytes.len() as u64).expect("a valid file parses");
    assert_eq!(meta.version, 3);
    assert_eq!(meta.entries.len(), entries.len());
    for (key, value) in &entries {
        assert_eq!(meta.get(key), Some(value), "{key}");
    }
}

#[test]
fn every_truncation_is_a_clear_error() {
    let bytes = gguf_bytes(&every_type());
    for cut in 0..bytes.len() {
        let what = bad(&bytes[..cut]);
        assert!(what.starts_with("truncated:"), "cut at {cut}: {what}");
    }
}

#[test]
fn corrupt_headers_say_what_is_wrong() {
    let good = gguf_bytes(&[("k", Value::U8(1))]);
    let mut magic = good.clone();
    magic[..4].copy_from_slice(b"GGML");
    assert!(bad(&magic).contains("not the GGUF magic"));
    for (version, expected) in [
        (0u32, "version 0"),
        (1, "version 1"),
        (4, "version 4"),
        (3u32.swap_bytes(), "big-endian"),
    ] {
        let mut v = good.clone();
        v[4..8].copy_from_slice(&version.to_le_bytes());
        let what = bad(&v);
        assert!(what.contains(expected), "{version}: {what}");
    }
}

#[test]
fn corrupt_values_say_which_key() {
    // Header, then one entry: key "key", then the type and the value under test.
    let entry = |ty: u32, value: &[u8]| {
        let mut b = gguf_bytes(&[]);
        b[16..24].copy_from_slice(&1u64.to_le_bytes());
        b.extend(3u64.to_le_bytes());
        b.extend(b"key");
        b.extend(ty.to_le_bytes());
        b.extend(value);
        b
    };
    assert!(bad(&entry(13, &[0; 8])).contains("`key` has value type 13"));
    assert!(bad(&entry(7, &[2])).contains("bool byte 2"));
    let huge_string = entry(8, &u64::MAX.to_le_bytes());
    assert!(bad(&huge_string).starts_with("truncated:"));
    let mut huge_array = 8u32.to_le_bytes().to_vec();
    huge_array.extend((u64::MAX / 2).to_le_bytes());
    assert!(bad(&entry(9, &huge_array)).starts_with("truncated:"));
    let mut not_utf8 = 2u64.to_le_bytes().to_vec();
    not_utf8.extend([0xC3, 0x28]);
    assert!(bad(&entry(8, &not_utf8)).contains("not UTF-8"));
    let mut count = gguf_bytes(&[]);
    count[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(bad(&count).starts_with("truncated:"));
}

#[test]
fn a_missing_file_names_its_path() {
    let path = temp_path("absent.gguf");
    match read_metadata(&path) {
        Err(TextError::Io { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    let err = TextTokenizer::load(&format!("gguf:{}", path.display())).unwrap_err();
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

fn load(bytes: &[u8]) -> Result<TextTokenizer, TextError> {
    let path = temp_path("t.gguf");
    std::fs::write(&path, bytes).expect("write the test GGUF");
    let result = TextTokenizer::load(&format!("gguf:{}", path.display()));
    let _ = std::fs::remove_file(&path);
    result
}

#[test]
fn the_gguf_tokenizer_carries_specials_template_and_context() {
    let tok = load(&byte_level_gguf("gpt2", "smollm")).expect("loads");
    assert_eq!(tok.specials().bos, Some(1));
    assert_eq!(tok.specials().eos, Some(2));
    assert_eq!(tok.specials().eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.specials().stop_ids(), vec![2]);
    assert_eq!(tok.context_length(), Some(64));
    assert!(
        tok.chat_template()
            .is_some_and(|t| t.contains("<|im_start|>"))
    );
    // Control tokens match whole, with or without special tokens; everything else is bytes.
    let ids = tok
        .encode("<|im_start|>hello wé<|im_end|>", false)
        .expect("encodes");
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(
        tok.decode(&ids, false).expect("decodes"),
        "<|im_start|>hello wé<|im_end|>"
    );
    assert_eq!(tok.decode(&ids, true).expect("decodes"), "hello wé");
    // "smollm" isolates digits: "12" is two pieces even though the bytes are one pre-token in GPT-2.
    let digits = tok.encode("a12", false).expect("encodes");
    assert_eq!(digits.len(), 3);
}

#[test]
fn unsupported_tokenizers_are_named() {
    let err = load(&byte_level_gguf("llama", "default")).unwrap_err();
    assert!(matches!(err, TextError::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("\"llama\""), "{err}");
    let err = load(&byte_level_gguf("gpt2", "tekken")).unwrap_err();
    assert!(err.to_string().contains("\"tekken\""), "{err}");
    let err = load(&gguf_bytes(&[("tokenizer.ggml.model", s("gpt2"))])).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.tokens"), "{err}");
    let err = load(&gguf_bytes(&[("general.architecture", s("llama"))])).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.model"), "{err}");
}

#[test]
fn every_listed_pre_tokenizer_builds_and_round_trips() {
    let text = "Hello, world! It's 2026:  tabs\tand\nnew lines — ça va? 日本語 🎉";
    for (pre, _) in PRE_SPLITS {
        let tok = load(&byte_level_gguf("gpt2", pre)).unwrap_or_else(|e| panic!("{pre}: {e}"));
        let ids = tok.encode(text, true).expect("encodes");
        assert_eq!(tok.decode(&ids, false).expect("decodes"), text, "{pre}");
    }
}

#[test]
fn stop_ids_list_each_end_marker_once() {
    let s = super::Specials {
        eos: Some(2),
        eot: Some(7),
        eom: Some(2),
        ..Default::default()
    };
    assert_eq!(s.stop_ids(), vec![2, 7]);
}

/// The scheduler and the routes share these across tasks and threads.
#[test]
fn the_text_types_can_be_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<TextTokenizer>();
    shared::<super::ChatTemplate>();
    shared::<super::TextStream>();
}

/// A header with one key whose value starts with `value` (its type and what follows).
fn one_entry(value: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata entries
    b.extend(3u64.to_le_bytes());
    b.extend(b"key");
    b.extend(value);
    b
}

#[test]
fn huge_claimed_lengths_in_a_big_file_are_errors_not_huge_allocations() {
    // The file claims 16 GiB (a model's tensors follow the metadata), so the counts below
    // fit the bytes left; reserving them would still ask for tens of gigabytes.
    let claimed = 16u64 << 30;
    let mut array = 9u32.to_le_bytes().to_vec();
    array.extend(4u32.to_le_bytes()); // u32 items
    array.extend((1u64 << 31).to_le_bytes());
    let bytes = one_entry(&array);
    match parse(&bytes[..], claimed) {
        Err(Problem::Bad(what)) => assert!(what.starts_with("truncated:"), "{what}"),
        other => panic!("expected a truncation error, got {other:?}"),
    }
    let mut string = 8u32.to_le_bytes().to_vec();
    string.extend((1u64 << 32).to_le_bytes());
    let bytes = one_entry(&string);
    match parse(&bytes[..], claimed) {
        Err(Problem::Bad(what)) => assert!(what.contains("metadata strings are at most"), "{what}"),
        other => panic!("expected a length error, got {other:?}"),
    }
}
