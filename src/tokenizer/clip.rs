//! CLIP tokenizer from `vocab.json` + `merges.txt`, built as transformers' `CLIPTokenizer` builds its backend
//! (transformers/models/clip/tokenization_clip.py): NFC, whitespace runs → one space, lowercase; the CLIP regex
//! split; byte-level; BPE with the `</w>` end-of-word suffix; `<|startoftext|> … <|endoftext|>` around the text.
//!
//! Like transformers, every special token (bos, eos, unk, pad) is an added token matched in the raw prompt before
//! normalisation, so with CLIP-G's pad token `!` a `!` in a prompt becomes id 0 rather than BPE's `!</w>`.

use super::config::{read_bytes, read_json, SpecialTokens};
use super::{Result, TokenizerError, CLIP_MAX_LENGTH};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior, Tokenizer,
    TruncationDirection, TruncationParams, TruncationStrategy,
};

/// The pre-tokenizer split of transformers' CLIPTokenizer (the text is already lowercased).
const CLIP_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";

/// One CLIP tokenizer (CLIP-L or CLIP-G), padding and truncating to `max_length` (77).
#[derive(Debug)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    dir: PathBuf,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl ClipTokenizer {
    /// Loads `vocab.json`, `merges.txt` and the special tokens (`special_tokens_map.json` and/or
    /// `tokenizer_config.json`, at least one of them) from a tokenizer folder.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(TokenizerError::MissingDir(dir.to_path_buf()));
        }
        let vocab = read_vocab(&dir.join("vocab.json"))?;
        let merges = read_merges(&dir.join("merges.txt"), &vocab)?;
        let special = SpecialTokens::read(dir, true)?;
        let token = |key: &str, default: &str| -> Result<(String, PathBuf)> {
            Ok(special.token(key)?.unwrap_or_else(|| (default.to_string(), special.describe(dir))))
        };
        let (bos, bos_src) = token("bos_token", DEFAULT_BOS)?;
        let (eos, eos_src) = token("eos_token", DEFAULT_EOS)?;
        let (unk, unk_src) = token("unk_token", DEFAULT_EOS)?;
        let (pad, pad_src) = token("pad_token", DEFAULT_EOS)?;
        let id_of = |role: &'static str, tok: &str, src: &Path| -> Result<u32> {
            vocab.get(tok).copied().ok_or_else(|| TokenizerError::UnknownToken {
                path: src.to_path_buf(),
                role,
                token: tok.to_string(),
            })
        };
        let bos_id = id_of("bos", &bos, &bos_src)?;
        let eos_id = id_of("eos", &eos, &eos_src)?;
        id_of("unk", &unk, &unk_src)?;
        let pad_id = id_of("pad", &pad, &pad_src)?;
        let max_length = match special.model_max_length() {
            // transformers stores a huge sentinel when no length is set; CLIP's context is 77.
            Some(n) if (2..=4096).contains(&n) => n as usize,
            _ => CLIP_MAX_LENGTH,
        };

        let vocab_path = dir.join("vocab.json");
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
            .unk_token(unk.clone())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .fuse_unk(false)
            .build()
            .map_err(|e| corrupt(&vocab_path, "CLIP vocabulary", e))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(internal)?;
        tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![NFC.into(), whitespace.into(), Lowercase.into()])));
        let split = Split::new(SplitPattern::Regex(CLIP_SPLIT.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(internal)?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new((eos.clone(), eos_id), (bos.clone(), bos_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        let specials: Vec<AddedToken> = [&bos, &eos, &unk, &pad].iter().map(|t| AddedToken::from(*t, true)).collect();
        tokenizer.add_special_tokens(&specials);
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(internal)?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad,
        }));
        Ok(Self { tokenizer, dir: dir.to_path_buf(), max_length, bos_id, eos_id, pad_id })
    }

    /// `max_length` ids: BOS, the prompt's tokens (cut to `max_length - 2`), EOS, then pad ids.
    pub fn encode(&self, prompt: &str) -> Result<Vec<i64>> {
        let encoding = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| TokenizerError::Encode { path: self.dir.clone(), reason: e.to_string() })?;
        let ids: Vec<i64> = encoding.get_ids().iter().map(|&id| id as i64).collect();
        debug_assert_eq!(ids.len(), self.max_length);
        Ok(ids)
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

fn read_vocab(path: &Path) -> Result<HashMap<String, u32>> {
    let value = read_json(path, "CLIP vocab.json")?;
    let map = value.as_object().ok_or_else(|| TokenizerError::Corrupt {
        path: path.to_path_buf(),
        what: "CLIP vocab.json",
        reason: "expected a JSON object of token → id".into(),
    })?;
    let mut vocab = HashMap::with_capacity(map.len());
    for (token, id) in map {
        let id = id.as_u64().filter(|&id| id <= u32::MAX as u64).ok_or_else(|| TokenizerError::Corrupt {
            path: path.to_path_buf(),
            what: "CLIP vocab.json",
            reason: format!("the id of {token:?} is {id}, not a token id"),
        })?;
        vocab.insert(token.clone(), id as u32);
    }
    if vocab.is_empty() {
        return Err(TokenizerError::Corrupt {
            path: path.to_path_buf(),
            what: "CLIP vocab.json",
            reason: "the vocabulary is empty".into(),
        });
    }
    Ok(vocab)
}

/// `merges.txt`: an optional `#version` header, then one `left right` pair per line, both parts in the vocabulary.
fn read_merges(path: &Path, vocab: &HashMap<String, u32>) -> Result<Vec<(String, String)>> {
    let bytes = read_bytes(path, "CLIP merges.txt")?;
    let text = String::from_utf8(bytes).map_err(|e| corrupt(path, "CLIP merges.txt", e))?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.is_empty() {
            continue;
        }
        let bad = |reason: String| TokenizerError::Corrupt {
            path: path.to_path_buf(),
            what: "CLIP merges.txt",
            reason: format!("line {}: {reason}", n + 1),
        };
        let parts: Vec<&str> = line.split(' ').collect();
        if parts.len() != 2 {
            return Err(bad(format!("expected two tokens separated by a space, found {line:?}")));
        }
        for part in &parts {
            if !vocab.contains_key(*part) {
                return Err(bad(format!("{part:?} is not in vocab.json")));
            }
        }
        let merged = format!("{}{}", parts[0], parts[1]);
        if !vocab.contains_key(&merged) {
            return Err(bad(format!("the merge result {merged:?} is not in vocab.json")));
        }
        merges.push((parts[0].to_string(), parts[1].to_string()));
    }
    Ok(merges)
}

fn corrupt(path: &Path, what: &'static str, e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Corrupt { path: path.to_path_buf(), what, reason: e.to_string() }
}

/// Errors from fixed, known-good settings (a constant regex); reported rather than panicking.
fn internal(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Encode { path: PathBuf::from("<built-in CLIP settings>"), reason: e.to_string() }
}
