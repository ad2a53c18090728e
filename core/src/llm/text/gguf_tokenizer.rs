//! Build a `tokenizers::Tokenizer` from a GGUF file's `tokenizer.ggml.*` metadata, the way
//! llama.cpp and Hugging Face `transformers` (`integrations/gguf/gguf_tokenizer_mapping.py`)
//! read it. Supported: model "gpt2" (byte-level BPE: tokens, merges, token types) with the
//! pre-tokenizers in [`PRE_SPLITS`]; anything else fails naming what is unsupported.

use super::TextError;
use super::gguf::{Metadata, Value};
use super::specials::Specials;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// GPT-2's split: contractions, letters, numbers, other symbols, spaces.
const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` → the regexes llama.cpp applies in turn (`llama-vocab.cpp`) before
/// byte-level encoding. The "smollm" family first isolates every digit (`\p{N}`), as
/// SmolLM2's own `tokenizer.json` does (`Digits(individual_digits)`).
pub const PRE_SPLITS: &[(&str, &[&str])] = &[
    ("default", &[GPT2_SPLIT]),
    ("gpt-2", &[GPT2_SPLIT]),
    ("gpt2", &[GPT2_SPLIT]),
    ("smollm", &[r"\p{N}", GPT2_SPLIT]),
    ("starcoder", &[r"\p{N}", GPT2_SPLIT]),
    ("refact", &[r"\p{N}", GPT2_SPLIT]),
    ("codeshell", &[r"\p{N}", GPT2_SPLIT]),
    ("command-r", &[r"\p{N}", GPT2_SPLIT]),
    ("exaone", &[r"\p{N}", GPT2_SPLIT]),
    ("llama3", &[LLAMA3_SPLIT]),
    ("llama-v3", &[LLAMA3_SPLIT]),
    ("llama-bpe", &[LLAMA3_SPLIT]),
    ("qwen2", &[QWEN2_SPLIT]),
    ("deepseek-r1-qwen", &[QWEN2_SPLIT]),
];

/// The tokenizer, its special tokens and the GGUF's chat template, read from `meta`.
pub fn build(meta: &Metadata, name: &str) -> Result<(Tokenizer, Specials), TextError> {
    let bad = |what: String| TextError::Tokenizer {
        source_name: name.to_string(),
        what,
    };
    let model = meta
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no `tokenizer.ggml.model` string in the GGUF metadata".into()))?;
    if model != "gpt2" {
        return Err(TextError::Unsupported {
            source_name: name.to_string(),
            what: format!(
                "tokenizer model {model:?} is not supported (supported: \"gpt2\", byte-level BPE)"
            ),
        });
    }
    let tokens = strings(meta, "tokenizer.ggml.tokens").map_err(bad)?;
    let merges = strings(meta, "tokenizer.ggml.merges").map_err(bad)?;
    let types = match meta.get("tokenizer.ggml.token_type") {
        Some(v) => ints(v, "tokenizer.ggml.token_type", tokens.len()).map_err(bad)?,
        None => Vec::new(),
    };
    let alphabet = byte_alphabet();
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (respell(t, &alphabet), id as u32))
        .collect();
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    bad(format!(
                        "merge {m:?} is not two tokens separated by a space"
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| bad(format!("the BPE model does not build: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(meta, name)?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    add_special_tokens(&mut tokenizer, &tokens, &types, &alphabet);
    let specials = Specials::from_gguf(meta, &tokens);
    if let Some(post) = post_processor(&specials, &tokens).map_err(bad)? {
        tokenizer.with_post_processor(Some(post));
    }
    Ok((tokenizer, specials))
}

fn strings<'a>(meta: &'a Metadata, key: &str) -> Result<Vec<&'a str>, String> {
    let items = meta
        .get(key)
        .ok_or_else(|| format!("no `{key}` in the GGUF metadata"))?;
    let items = items.as_array().ok_or_else(|| {
        format!(
            "`{key}` is a {}, not an array of strings",
            items.type_name()
        )
    })?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .ok_or_else(|| format!("`{key}`[{i}] is a {}, not a string", v.type_name()))
        })
        .collect()
}

fn ints(value: &Value, key: &str, expected: usize) -> Result<Vec<i64>, String> {
    let items = value
        .as_array()
        .ok_or_else(|| format!("`{key}` is a {}, not an array", value.type_name()))?;
    if items.len() != expected {
        return Err(format!(
            "`{key}` has {} entries but there are {expected} tokens",
            items.len()
        ));
    }
    items
        .iter()
        .map(|v| {
            v.as_i64()
                .ok_or_else(|| format!("`{key}` holds a {}, not integers", v.type_name()))
        })
        .collect()
}

/// GPT-2's byte → printable character table (`bytes_to_unicode`): printable Latin-1 bytes
/// stand for themselves, the others map to U+0100 onwards in byte order.
pub fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let code = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).unwrap_or('\0');
    }
    table
}

/// A vocabulary entry written in raw text (some converters store added tokens that way) is
/// respelled in the byte alphabet, as `transformers` does, so the BPE model can match it.
fn respell(token: &str, alphabet: &[char; 256]) -> String {
    if token.chars().all(|c| alphabet.contains(&c)) {
        return token.to_string();
    }
    token.bytes().map(|b| alphabet[b as usize]).collect()
}

/// Control tokens (`<|im_start|>`) become special added tokens and user-defined ones plain
/// added tokens, so both match whole in text. A control token spelled outside the byte
/// alphabet is a converter's mislabel and is left out, as `transformers` does.
fn add_special_tokens(
    tokenizer: &mut Tokenizer,
    tokens: &[&str],
    types: &[i64],
    alphabet: &[char; 256],
) {
    let mut control = Vec::new();
    let mut user = Vec::new();
    for (token, ty) in tokens.iter().zip(types) {
        if *ty == CONTROL && token.chars().all(|c| alphabet.contains(&c)) {
            control.push(AddedToken::from(token.to_string(), true).normalized(false));
        } else if *ty == USER_DEFINED {
            user.push(AddedToken::from(token.to_string(), false).normalized(false));
        }
    }
    tokenizer.add_special_tokens(&control);
    tokenizer.add_tokens(&user);
}

fn pre_tokenizer(meta: &Metadata, name: &str) -> Result<PreTokenizerWrapper, TextError> {
    let pre = meta
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let Some((_, regexes)) = PRE_SPLITS.iter().find(|(p, _)| *p == pre) else {
        let known: Vec<&str> = PRE_SPLITS.iter().map(|(p, _)| *p).collect();
        return Err(TextError::Unsupported {
            source_name: name.to_string(),
            what: format!(
                "pre-tokenizer `tokenizer.ggml.pre` = {pre:?} is not supported (supported: {})",
                known.join(", ")
            ),
        });
    };
    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for regex in *regexes {
        let split = Split::new(
            SplitPattern::Regex((*regex).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TextError::Tokenizer {
            source_name: name.to_string(),
            what: format!("pre-tokenizer regex {regex:?} does not compile: {e}"),
        })?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, true, false).into());
    Ok(Sequence::new(steps).into())
}

/// BOS/EOS added around every encoding when the GGUF says so (`add_bos_token`).
fn post_processor(
    specials: &Specials,
    tokens: &[&str],
) -> Result<Option<TemplateProcessing>, String> {
    let mut single = Vec::new();
    let mut used = Vec::new();
    if let (true, Some(bos)) = (specials.add_bos, specials.bos) {
        let text = tokens
            .get(bos as usize)
            .copied()
            .unwrap_or_default()
            .to_string();
        single.push(text.clone());
        used.push((text, bos));
    }
    single.push("$A".to_string());
    if let (true, Some(eos)) = (specials.add_eos, specials.eos) {
        let text = tokens
            .get(eos as usize)
            .copied()
            .unwrap_or_default()
            .to_string();
        single.push(text.clone());
        used.push((text, eos));
    }
    if used.is_empty() {
        return Ok(None);
    }
    TemplateProcessing::builder()
        .try_single(single.join(" "))
        .map_err(|e| format!("BOS/EOS template: {e}"))?
        .special_tokens(used)
        .build()
        .map(Some)
        .map_err(|e| format!("BOS/EOS template: {e}"))
}
