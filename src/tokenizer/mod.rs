//! The three SD3 tokenizers, giving the same ids as transformers' `CLIPTokenizer` and `T5Tokenizer` called the way
//! diffusers' `StableDiffusion3Pipeline` calls them (`padding="max_length"`, `truncation=True`).
//!
//! - CLIP-L (`tokenizer/`) and CLIP-G (`tokenizer_2/`): byte-level BPE built from `vocab.json` + `merges.txt` (the
//!   published repos ship no `tokenizer.json` for them), padded/truncated to 77 keeping BOS and EOS; the pad token
//!   comes from the folder's own `special_tokens_map.json`/`tokenizer_config.json` (CLIP-L: `<|endoftext|>`,
//!   CLIP-G: `!`). See [`clip`].
//! - T5 (`tokenizer_3/`): `tokenizer.json`, or `spiece.model` when that is all there is; padded/truncated to
//!   `max_sequence_length` (default 256, at most 512) keeping `</s>`. See [`t5`].

pub mod clip;
mod config;
mod spiece;
pub mod t5;

use std::path::{Path, PathBuf};

pub use clip::ClipTokenizer;
pub use t5::T5Tokenizer;

/// CLIP's context length (`tokenizer.model_max_length` in the published configs).
pub const CLIP_MAX_LENGTH: usize = 77;
/// diffusers' default `max_sequence_length` for T5.
pub const T5_DEFAULT_MAX_LENGTH: usize = 256;
/// The largest `max_sequence_length` diffusers accepts.
pub const T5_MAX_LENGTH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer folder {0} does not exist")]
    MissingDir(PathBuf),
    #[error("missing tokenizer file {path} ({expected})")]
    MissingFile { path: PathBuf, expected: &'static str },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid {what}: {reason}")]
    Corrupt { path: PathBuf, what: &'static str, reason: String },
    #[error("{path}: the {role} token {token:?} is not in the vocabulary")]
    UnknownToken { path: PathBuf, role: &'static str, token: String },
    #[error("max_sequence_length {0} is out of range: it must be between 1 and {T5_MAX_LENGTH}")]
    MaxSequenceLength(usize),
    #[error("tokenizing with {path} failed: {reason}")]
    Encode { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// Token ids of one prompt for the three encoders, as i64 (what the embedding lookups take).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIds {
    /// 77 ids for CLIP-L.
    pub clip_l: Vec<i64>,
    /// 77 ids for CLIP-G.
    pub clip_g: Vec<i64>,
    /// `max_sequence_length` ids for T5; empty when the model has no T5 tokenizer.
    pub t5: Vec<i64>,
}

/// The tokenizers of an SD3 model folder.
#[derive(Debug)]
pub struct Sd3Tokenizers {
    pub clip_l: ClipTokenizer,
    pub clip_g: ClipTokenizer,
    /// `None` when the model has no T5 (`tokenizer_3` absent or null in `model_index.json`).
    pub t5: Option<T5Tokenizer>,
}

impl Sd3Tokenizers {
    /// Loads `tokenizer/`, `tokenizer_2/` and (when the model has one) `tokenizer_3/` from a diffusers model folder.
    pub fn load(model_dir: &Path) -> Result<Self> {
        if !model_dir.is_dir() {
            return Err(TokenizerError::MissingDir(model_dir.to_path_buf()));
        }
        let clip_l = ClipTokenizer::load(&model_dir.join("tokenizer"))?;
        let clip_g = ClipTokenizer::load(&model_dir.join("tokenizer_2"))?;
        let t5 =
            if has_t5_tokenizer(model_dir)? { Some(T5Tokenizer::load(&model_dir.join("tokenizer_3"))?) } else { None };
        Ok(Self { clip_l, clip_g, t5 })
    }

    /// Ids of `prompt` for the three encoders; T5 is padded/truncated to `max_sequence_length`.
    pub fn encode(&self, prompt: &str, max_sequence_length: usize) -> Result<TokenIds> {
        if max_sequence_length == 0 || max_sequence_length > T5_MAX_LENGTH {
            return Err(TokenizerError::MaxSequenceLength(max_sequence_length));
        }
        Ok(TokenIds {
            clip_l: self.clip_l.encode(prompt)?,
            clip_g: self.clip_g.encode(prompt)?,
            t5: match &self.t5 {
                Some(t5) => t5.encode(prompt, max_sequence_length)?,
                None => Vec::new(),
            },
        })
    }
}

/// Whether the model has a T5 tokenizer: listed (non-null) in `model_index.json`, or, without that file, present.
fn has_t5_tokenizer(model_dir: &Path) -> Result<bool> {
    let index_path = model_dir.join("model_index.json");
    if !index_path.exists() {
        return Ok(model_dir.join("tokenizer_3").is_dir());
    }
    let index = config::read_json(&index_path, "model_index.json")?;
    Ok(match index.get("tokenizer_3") {
        None => false,
        Some(entry) => entry.as_array().is_some_and(|parts| parts.iter().any(|p| !p.is_null())),
    })
}
