//! T5 tokenizer (`tokenizer_3/`): `tokenizer.json` when present (the published SD3/SD3.5 repos ship one), otherwise
//! built from `spiece.model` the way transformers converts it (see [`super::spiece`]).
//!
//! Padding and truncation follow transformers' `tokenizer(prompt, padding="max_length", max_length=L,
//! truncation=True)`: the prompt's tokens are cut to `L - 1`, `</s>` is appended, then pad ids fill up to `L`.

use super::config::SpecialTokens;
use super::{spiece, Result, TokenizerError, T5_MAX_LENGTH};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

#[derive(Debug)]
pub struct T5Tokenizer {
    tokenizer: Tokenizer,
    /// The file the tokenizer was built from (named in errors).
    source: PathBuf,
    eos_id: u32,
    pad_id: u32,
}

impl T5Tokenizer {
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(TokenizerError::MissingDir(dir.to_path_buf()));
        }
        let json = dir.join("tokenizer.json");
        let model = dir.join("spiece.model");
        let (mut tokenizer, source) = if json.exists() {
            let tokenizer = Tokenizer::from_file(&json).map_err(|e| TokenizerError::Corrupt {
                path: json.clone(),
                what: "tokenizer.json",
                reason: e.to_string(),
            })?;
            (tokenizer, json)
        } else if model.exists() {
            (spiece::t5_tokenizer_from_spiece(&model)?, model)
        } else {
            return Err(TokenizerError::MissingFile { path: json, expected: "a T5 tokenizer.json or spiece.model" });
        };
        // Padding and truncation are applied by `encode`, whatever the file says.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| TokenizerError::Encode { path: source.clone(), reason: e.to_string() })?;
        let special = SpecialTokens::read(dir, false)?;
        let id_of = |key: &str, role: &'static str, default: &str| -> Result<u32> {
            let (token, path) = special.token(key)?.unwrap_or_else(|| (default.to_string(), source.clone()));
            tokenizer.token_to_id(&token).ok_or(TokenizerError::UnknownToken { path, role, token })
        };
        let eos_id = id_of("eos_token", "eos", "</s>")?;
        let pad_id = id_of("pad_token", "pad", "<pad>")?;
        let t5 = Self { tokenizer, source, eos_id, pad_id };
        t5.check_appends_eos()?;
        Ok(t5)
    }

    /// `max_length` ids: the prompt's tokens (at most `max_length - 1`), `</s>`, then pad ids.
    pub fn encode(&self, prompt: &str, max_length: usize) -> Result<Vec<i64>> {
        if max_length == 0 || max_length > T5_MAX_LENGTH {
            return Err(TokenizerError::MaxSequenceLength(max_length));
        }
        let mut ids = self.content_ids(prompt)?;
        ids.truncate(max_length - 1);
        ids.push(self.eos_id);
        ids.resize(max_length, self.pad_id);
        Ok(ids.into_iter().map(i64::from).collect())
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

    /// The prompt's ids without the special tokens the post-processor adds.
    fn content_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(prompt, false).map_err(|e| self.encode_error(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `encode` appends `</s>` itself, which is right only if the tokenizer's own post-processing does exactly that
    /// (T5's `$A </s>` template); anything else would silently change the ids.
    fn check_appends_eos(&self) -> Result<()> {
        let probe = "a b";
        let with = self.tokenizer.encode(probe, true).map_err(|e| self.encode_error(e))?;
        let mut expected = self.content_ids(probe)?;
        expected.push(self.eos_id);
        if with.get_ids() != expected.as_slice() {
            return Err(TokenizerError::Corrupt {
                path: self.source.clone(),
                what: "T5 tokenizer",
                reason: format!(
                    "its post-processor must append only </s> (id {}); \"a b\" gave {:?}, expected {:?}",
                    self.eos_id,
                    with.get_ids(),
                    expected
                ),
            });
        }
        Ok(())
    }

    fn encode_error(&self, e: impl std::fmt::Display) -> TokenizerError {
        TokenizerError::Encode { path: self.source.clone(), reason: e.to_string() }
    }
}
