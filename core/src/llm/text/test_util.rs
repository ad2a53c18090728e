//! Test helpers: a GGUF writer for synthetic files, small tokenizers built in code, temp
//! paths and a seeded random generator (no extra crates).

use super::gguf::Value;
use super::gguf_tokenizer::byte_alphabet;
use super::{Specials, TextTokenizer};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The bytes of a GGUF v3 file with these metadata entries and no tensors.
pub fn gguf_bytes(entries: &[(&str, Value)]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    out.extend((entries.len() as u64).to_le_bytes());
    for (key, value) in entries {
        put_str(&mut out, key);
        out.extend(type_of(value).to_le_bytes());
        put_value(&mut out, value);
    }
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

pub fn type_of(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.extend(x.to_le_bytes()),
        Value::I8(x) => out.extend(x.to_le_bytes()),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
        Value::Bool(b) => out.push(u8::from(*b)),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            let item_type = items.first().map(type_of).unwrap_or(0);
            out.extend(item_type.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

pub fn s(text: &str) -> Value {
    Value::String(text.to_string())
}

pub fn strs(items: &[String]) -> Value {
    Value::Array(items.iter().map(|t| Value::String(t.clone())).collect())
}

/// A byte-level BPE vocabulary: the 256 byte characters, three control tokens and merges
/// that cut characters in odd places: "©a" joins the last byte of "é" to the "a" after it,
/// and the four bytes of "🎉" pair up across the middle of the character.
pub fn byte_level_gguf(model: &str, pre: &str) -> Vec<u8> {
    let alphabet = byte_alphabet();
    let spell = |text: &str| -> String { text.bytes().map(|b| alphabet[b as usize]).collect() };
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![Value::I32(3); 3];
    tokens.extend(alphabet.iter().map(|c| c.to_string()));
    types.extend((0..256).map(|_| Value::I32(1)));
    let party = spell("🎉");
    let p: Vec<char> = party.chars().collect();
    let merges: Vec<(String, String)> = vec![
        ("©".into(), "a".into()),
        (p[1].to_string(), p[2].to_string()),
        ("h".into(), "e".into()),
        ("he".into(), "l".into()),
        ("hel".into(), "l".into()),
        ("hell".into(), "o".into()),
        ("Ġ".into(), "w".into()),
    ];
    for (a, b) in &merges {
        tokens.push(format!("{a}{b}"));
        types.push(Value::I32(1));
    }
    let merges: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
    gguf_bytes(&[
        ("general.architecture", s("llama")),
        ("llama.context_length", Value::U32(64)),
        ("tokenizer.ggml.model", s(model)),
        ("tokenizer.ggml.pre", s(pre)),
        ("tokenizer.ggml.tokens", strs(&tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", strs(&merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        (
            "tokenizer.chat_template",
            s(
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
            ),
        ),
    ])
}

/// A fresh path under the system temp dir, unique in this process.
pub fn temp_path(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("unimodel-text-{}-{n}-{name}", std::process::id()))
}

/// The byte-level test tokenizer, loaded through a real GGUF file.
pub fn byte_level_tokenizer() -> TextTokenizer {
    let path = temp_path("byte-level.gguf");
    std::fs::write(&path, byte_level_gguf("gpt2", "smollm")).expect("write the test GGUF");
    let tok =
        TextTokenizer::load(&format!("gguf:{}", path.display())).expect("the test GGUF loads");
    let _ = std::fs::remove_file(&path);
    tok
}

/// A SentencePiece-style tokenizer with byte fallback (`<0xE6>` tokens for bytes that have
/// no piece), as Llama 2 and Mistral ship: pieces for a few words, bytes for the rest.
pub fn byte_fallback_tokenizer() -> TextTokenizer {
    use tokenizers::decoders::{
        byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence, strip::Strip,
    };
    use tokenizers::models::bpe::{BPE, Vocab};
    use tokenizers::normalizers::{Prepend, Replace};
    use tokenizers::{DecoderWrapper, NormalizerWrapper, Tokenizer};
    let mut vocab: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    vocab.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let pieces = ["▁", "h", "i", "▁h", "▁hi", "a", "b", "c", "x"];
    vocab.extend(pieces.iter().map(|p| p.to_string()));
    let ids: Vocab = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = vec![
        ("▁".to_string(), "h".to_string()),
        ("▁h".to_string(), "i".to_string()),
    ];
    let bpe = BPE::builder()
        .vocab_and_merges(ids, merges)
        .unk_token("<unk>".into())
        .byte_fallback(true)
        .build()
        .expect("the byte-fallback BPE builds");
    let mut inner = Tokenizer::new(bpe);
    let normalizer = tokenizers::normalizers::Sequence::new(vec![
        NormalizerWrapper::from(Prepend::new("▁".into())),
        NormalizerWrapper::from(Replace::new(" ", "▁").expect("a plain pattern")),
    ]);
    inner.with_normalizer(Some(normalizer));
    let decoder = Sequence::new(vec![
        DecoderWrapper::from(Replace::new("▁", " ").expect("a plain pattern")),
        DecoderWrapper::from(ByteFallback::new()),
        DecoderWrapper::from(Fuse::new()),
        DecoderWrapper::from(Strip::new(' ', 1, 0)),
    ]);
    inner.with_decoder(Some(decoder));
    let specials = Specials {
        bos: Some(1),
        eos: Some(2),
        ..Specials::default()
    };
    TextTokenizer::from_tokenizer(inner, specials, "byte-fallback test tokenizer")
}

/// xorshift64*: a seeded generator, so a failing case can be replayed from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
