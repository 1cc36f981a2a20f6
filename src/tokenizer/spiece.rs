//! A T5 tokenizer from a SentencePiece `spiece.model`, built as transformers' `T5Tokenizer` builds its backend
//! (transformers/models/t5/tokenization_t5.py): Unigram over the model's pieces and scores followed by 100
//! `<extra_id_N>` sentinels (N = 99 … 0), the model's precompiled normalisation map, whitespace split + Metaspace
//! (`▁`, prepended to every word), and `$A </s>`.
//!
//! Only the few protobuf fields needed are decoded (sentencepiece_model.proto): `ModelProto.pieces` (1),
//! `.trainer_spec` (2: `model_type` 3), `.normalizer_spec` (3: `precompiled_charsmap` 2); `SentencePiece.piece` (1),
//! `.score` (2), `.type` (3).

use super::config::read_bytes;
use super::{Result, TokenizerError};
use std::path::Path;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// T5's number of sentinel tokens (`extra_ids`).
const EXTRA_IDS: usize = 100;
const UNIGRAM: u64 = 1;
/// `SentencePiece.Type`.
const TYPE_NORMAL: u64 = 1;
const TYPE_UNKNOWN: u64 = 2;
const TYPE_CONTROL: u64 = 3;

struct Piece {
    text: String,
    score: f32,
    kind: u64,
}

pub(crate) fn t5_tokenizer_from_spiece(path: &Path) -> Result<Tokenizer> {
    let bytes = read_bytes(path, "T5 spiece.model")?;
    let bad =
        |reason: String| TokenizerError::Corrupt { path: path.to_path_buf(), what: "SentencePiece model", reason };
    let model = parse_model(&bytes).map_err(bad)?;
    if model.model_type != UNIGRAM {
        return Err(bad(format!("model_type {} is not supported (only unigram, as T5 uses)", model.model_type)));
    }
    let unk_id =
        model.pieces.iter().position(|p| p.kind == TYPE_UNKNOWN).ok_or_else(|| bad("no <unk> piece".into()))?;
    let mut vocab: Vec<(String, f64)> = model.pieces.iter().map(|p| (p.text.clone(), p.score as f64)).collect();
    vocab.extend((0..EXTRA_IDS).rev().map(|i| (format!("<extra_id_{i}>"), 0.0)));
    let unigram = Unigram::from(vocab, Some(unk_id), false).map_err(|e| bad(e.to_string()))?;

    let mut tokenizer = Tokenizer::new(unigram);
    if !model.precompiled_charsmap.is_empty() {
        let normalizer = Precompiled::from(&model.precompiled_charsmap).map_err(|e| bad(e.to_string()))?;
        tokenizer.with_normalizer(Some(normalizer));
    }
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        WhitespaceSplit.into(),
        Metaspace::new('▁', PrependScheme::Always, true).into(),
    ])));
    let eos = model.pieces.iter().position(|p| p.text == "</s>").ok_or_else(|| bad("no </s> piece".into()))?;
    let template = TemplateProcessing::builder()
        .try_single("$A </s>")
        .and_then(|b| b.try_pair("$A </s> $B </s>"))
        .map_err(|e| bad(e.to_string()))?
        .special_tokens(vec![("</s>", eos as u32)])
        .build()
        .map_err(|e| bad(e.to_string()))?;
    tokenizer.with_post_processor(Some(template));
    let mut specials: Vec<AddedToken> = model
        .pieces
        .iter()
        .filter(|p| p.kind == TYPE_CONTROL || p.kind == TYPE_UNKNOWN)
        .map(|p| AddedToken::from(p.text.clone(), true))
        .collect();
    specials.extend((0..EXTRA_IDS).map(|i| AddedToken::from(format!("<extra_id_{i}>"), true)));
    tokenizer.add_special_tokens(&specials);
    Ok(tokenizer)
}

struct Model {
    pieces: Vec<Piece>,
    model_type: u64,
    precompiled_charsmap: Vec<u8>,
}

fn parse_model(bytes: &[u8]) -> std::result::Result<Model, String> {
    let mut model = Model { pieces: Vec::new(), model_type: UNIGRAM, precompiled_charsmap: Vec::new() };
    let mut r = Reader { buf: bytes, pos: 0 };
    while let Some((field, value)) = r.next_field()? {
        match (field, value) {
            (1, Value::Bytes(b)) => model.pieces.push(parse_piece(b)?),
            (2, Value::Bytes(b)) => {
                let mut t = Reader { buf: b, pos: 0 };
                while let Some((f, v)) = t.next_field()? {
                    if let (3, Value::Varint(n)) = (f, v) {
                        model.model_type = n;
                    }
                }
            }
            (3, Value::Bytes(b)) => {
                let mut n = Reader { buf: b, pos: 0 };
                while let Some((f, v)) = n.next_field()? {
                    if let (2, Value::Bytes(map)) = (f, v) {
                        model.precompiled_charsmap = map.to_vec();
                    }
                }
            }
            _ => {}
        }
    }
    if model.pieces.is_empty() {
        return Err("it has no pieces".into());
    }
    Ok(model)
}

fn parse_piece(bytes: &[u8]) -> std::result::Result<Piece, String> {
    let mut piece = Piece { text: String::new(), score: 0.0, kind: TYPE_NORMAL };
    let mut r = Reader { buf: bytes, pos: 0 };
    while let Some((field, value)) = r.next_field()? {
        match (field, value) {
            (1, Value::Bytes(b)) => {
                piece.text = String::from_utf8(b.to_vec()).map_err(|_| "a piece is not UTF-8".to_string())?
            }
            (2, Value::Fixed32(bits)) => piece.score = f32::from_bits(bits),
            (3, Value::Varint(n)) => piece.kind = n,
            _ => {}
        }
    }
    Ok(piece)
}

enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// A protobuf wire-format reader (only what a SentencePiece model uses).
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint too long".into())
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or("truncated field")?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn next_field(&mut self) -> std::result::Result<Option<(u64, Value<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "field length overflows")?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            wire => return Err(format!("unsupported protobuf wire type {wire} at byte {}", self.pos)),
        };
        Ok(Some((key >> 3, value)))
    }
}
