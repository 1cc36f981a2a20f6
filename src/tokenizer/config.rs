//! Reading the small JSON files that come with a tokenizer (`tokenizer_config.json`, `special_tokens_map.json`).

use super::{Result, TokenizerError};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub(crate) fn read_bytes(path: &Path, expected: &'static str) -> Result<Vec<u8>> {
    if !path.exists() {
        return Err(TokenizerError::MissingFile { path: path.to_path_buf(), expected });
    }
    std::fs::read(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })
}

pub(crate) fn read_json(path: &Path, what: &'static str) -> Result<Value> {
    let bytes = read_bytes(path, what)?;
    serde_json::from_slice(&bytes).map_err(|e| TokenizerError::Corrupt {
        path: path.to_path_buf(),
        what,
        reason: e.to_string(),
    })
}

/// The special-token settings of a tokenizer folder, as transformers resolves them: `tokenizer_config.json` first,
/// overridden by `special_tokens_map.json`.
#[derive(Debug, Default)]
pub(crate) struct SpecialTokens {
    files: Vec<(PathBuf, Value)>,
}

impl SpecialTokens {
    /// Reads whichever of the two files exist; `required` makes it an error when neither does.
    pub(crate) fn read(dir: &Path, required: bool) -> Result<Self> {
        let mut files = Vec::new();
        for (name, what) in
            [("tokenizer_config.json", "tokenizer_config.json"), ("special_tokens_map.json", "special_tokens_map.json")]
        {
            let path = dir.join(name);
            if path.exists() {
                let value = read_json(&path, what)?;
                if !value.is_object() {
                    return Err(TokenizerError::Corrupt { path, what, reason: "expected a JSON object".into() });
                }
                files.push((path, value));
            }
        }
        if required && files.is_empty() {
            return Err(TokenizerError::MissingFile {
                path: dir.join("special_tokens_map.json"),
                expected: "special_tokens_map.json or tokenizer_config.json, which name the pad token",
            });
        }
        Ok(Self { files })
    }

    /// The token named by `key` (`"pad_token"`, …): a string or an AddedToken object `{"content": …}`. Returns the
    /// token and the file it came from.
    pub(crate) fn token(&self, key: &str) -> Result<Option<(String, PathBuf)>> {
        let mut found = None;
        for (path, value) in &self.files {
            match value.get(key) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => found = Some((s.clone(), path.clone())),
                Some(obj @ Value::Object(_)) => match obj.get("content").and_then(Value::as_str) {
                    Some(s) => found = Some((s.to_string(), path.clone())),
                    None => {
                        return Err(TokenizerError::Corrupt {
                            path: path.clone(),
                            what: "tokenizer configuration",
                            reason: format!("{key} is an object without a string \"content\""),
                        })
                    }
                },
                Some(other) => {
                    return Err(TokenizerError::Corrupt {
                        path: path.clone(),
                        what: "tokenizer configuration",
                        reason: format!("{key} must be a string or an object, found {other}"),
                    })
                }
            }
        }
        Ok(found)
    }

    /// `model_max_length` from `tokenizer_config.json`, if given as an integer.
    pub(crate) fn model_max_length(&self) -> Option<u64> {
        self.files.iter().rev().find_map(|(_, v)| v.get("model_max_length").and_then(Value::as_u64))
    }

    /// A path to name in errors about values that may come from either file.
    pub(crate) fn describe(&self, dir: &Path) -> PathBuf {
        self.files.last().map(|(p, _)| p.clone()).unwrap_or_else(|| dir.to_path_buf())
    }
}
