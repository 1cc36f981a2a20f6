//! The tokenizers against transformers' ids (fixtures/tokenizers/cases.json, made by scripts/make_fixtures.py) and
//! against the token ids diffusers used in the golden runs; and their errors on missing or corrupt files.

use safetensors::SafeTensors;
use sd3::tokenizer::{ClipTokenizer, Sd3Tokenizers, T5Tokenizer, TokenizerError, CLIP_MAX_LENGTH};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A fresh empty folder under the system temp dir, unique per test and process.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd3-tokenizer-test-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy(from: &Path, names: &[&str], to: &Path) {
    for name in names {
        fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

fn cases() -> Value {
    let text = fs::read_to_string(fixtures().join("tokenizers/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Checks every case of `name` in cases.json with `encode(prompt, max_length)`; returns how many were checked.
fn check_cases(name: &str, encode: impl Fn(&str, usize) -> Vec<i64>) -> usize {
    let all = cases();
    let entry = &all["tokenizers"][name];
    let list = entry["cases"].as_array().unwrap_or_else(|| panic!("no cases for {name}"));
    for case in list {
        let prompt = case["prompt"].as_str().unwrap();
        let max_length = case["max_length"].as_u64().unwrap() as usize;
        let expected: Vec<i64> = case["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        let got = encode(prompt, max_length);
        assert_eq!(got, expected, "{name}: ids of {prompt:?} (max_length {max_length}) differ from transformers'");
    }
    list.len()
}

fn clip_cases(name: &str, tok: &ClipTokenizer) -> usize {
    check_cases(name, |prompt, max_length| {
        assert_eq!(max_length, tok.max_length());
        tok.encode(prompt).unwrap()
    })
}

#[test]
fn real_clip_l_vocabulary_matches_transformers() {
    let tok = ClipTokenizer::load(&fixtures().join("tokenizers/clip-real")).unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (49406, 49407, 49407));
    assert!(clip_cases("clip-real-l", &tok) >= 15);
    // The ids OpenAI's CLIP gives for this prompt (reference doc §4.3).
    let ids = tok.encode("a photo of a really, functistaner big cat.").unwrap();
    assert_eq!(ids[..15], [49406, 320, 1125, 539, 320, 1414, 267, 8679, 555, 2203, 528, 1205, 2368, 269, 49407]);
    assert!(ids[15..].iter().all(|&id| id == 49407));
}

#[test]
fn real_clip_g_vocabulary_pads_with_exclamation_mark() {
    // The real vocabulary with CLIP-G's special-token files (pad "!"), as in SD3's tokenizer_2.
    let dir = scratch("clip-real-g");
    copy(&fixtures().join("tokenizers/clip-real"), &["vocab.json", "merges.txt"], &dir);
    copy(&fixtures().join("sd3-tiny/tokenizer_2"), &["tokenizer_config.json", "special_tokens_map.json"], &dir);
    let tok = ClipTokenizer::load(&dir).unwrap();
    assert_eq!(tok.pad_id(), 0);
    assert!(clip_cases("clip-real-g", &tok) >= 15);
    // "!" is a special token for this tokenizer, as in transformers: id 0, not BPE's "!</w>" (256).
    assert_eq!(tok.encode("hello!").unwrap()[..4], [49406, 3306, 0, 49407]);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn tiny_tokenizers_match_transformers() {
    let model = fixtures().join("sd3-tiny");
    let l = ClipTokenizer::load(&model.join("tokenizer")).unwrap();
    let g = ClipTokenizer::load(&model.join("tokenizer_2")).unwrap();
    assert_eq!((l.bos_id(), l.eos_id(), l.pad_id(), g.pad_id()), (998, 999, 999, 0));
    clip_cases("sd3-tiny/tokenizer", &l);
    clip_cases("sd3-tiny/tokenizer_2", &g);
    let t5 = T5Tokenizer::load(&model.join("tokenizer_3")).unwrap();
    assert_eq!((t5.eos_id(), t5.pad_id(), t5.vocab_size()), (1, 0, 1100));
    let n = check_cases("sd3-tiny/tokenizer_3", |prompt, max_length| t5.encode(prompt, max_length).unwrap());
    assert!(n >= 45);
}

#[test]
fn t5_from_spiece_model_alone_matches_transformers() {
    let dir = scratch("t5-spiece");
    copy(&fixtures().join("sd3-tiny/tokenizer_3"), &["spiece.model", "tokenizer_config.json"], &dir);
    let t5 = T5Tokenizer::load(&dir).unwrap();
    assert_eq!(t5.vocab_size(), 1100);
    check_cases("sd3-tiny/tokenizer_3", |prompt, max_length| t5.encode(prompt, max_length).unwrap());
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn truncation_keeps_bos_and_eos() {
    let tokenizers = Sd3Tokenizers::load(&fixtures().join("sd3-tiny")).unwrap();
    let long = "a very long prompt with many words ".repeat(20);
    let ids = tokenizers.encode(&long, 16).unwrap();
    for clip in [&ids.clip_l, &ids.clip_g] {
        assert_eq!(clip.len(), CLIP_MAX_LENGTH);
        assert_eq!((clip[0], clip[76]), (998, 999));
        assert!(!clip[1..76].contains(&999), "one EOS, at the end");
    }
    assert_eq!(ids.t5.len(), 16);
    assert_eq!(ids.t5[15], 1);
    assert!(!ids.t5[..15].contains(&0) && !ids.t5[..15].contains(&1));
}

/// The ids diffusers fed the encoders in every golden run, prompt and negative prompt.
#[test]
fn ids_equal_the_golden_runs() {
    let mut checked = 0;
    for entry in fs::read_dir(fixtures().join("golden")).unwrap() {
        let dir = entry.unwrap().path();
        let params: Value = serde_json::from_str(&fs::read_to_string(dir.join("params.json")).unwrap()).unwrap();
        let tokenizers = Sd3Tokenizers::load(&fixtures().join(params["model"].as_str().unwrap())).unwrap();
        let bytes = fs::read(dir.join("golden.safetensors")).unwrap();
        let golden = SafeTensors::deserialize(&bytes).unwrap();
        let ids_of = |name: &str| -> Vec<i64> {
            let view = golden.tensor(name).unwrap();
            view.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
        };
        let max_len = params["max_sequence_length"].as_u64().unwrap() as usize;
        let mut prompts = vec![("", params["prompt"].as_str().unwrap())];
        if params["cfg"].as_bool().unwrap() {
            prompts.push(("neg_", params["negative_prompt"].as_str().unwrap_or("")));
        }
        for (prefix, prompt) in prompts {
            let ids = tokenizers.encode(prompt, max_len).unwrap();
            let case = dir.file_name().unwrap().to_string_lossy().to_string();
            assert_eq!(ids.clip_l, ids_of(&format!("{prefix}clip_l_ids")), "{case}: {prefix}clip_l_ids");
            assert_eq!(ids.clip_g, ids_of(&format!("{prefix}clip_g_ids")), "{case}: {prefix}clip_g_ids");
            if !params["no_t5"].as_bool().unwrap() {
                assert_eq!(ids.t5, ids_of(&format!("{prefix}t5_ids")), "{case}: {prefix}t5_ids");
            }
            checked += 1;
        }
    }
    assert!(checked >= 13, "checked {checked} prompts");
}

#[test]
fn model_without_t5_has_no_t5_ids() {
    let dir = scratch("no-t5");
    for sub in ["tokenizer", "tokenizer_2"] {
        fs::create_dir(dir.join(sub)).unwrap();
        let from = fixtures().join("sd3-tiny").join(sub);
        copy(&from, &["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"], &dir.join(sub));
    }
    let index = fs::read_to_string(fixtures().join("sd3-tiny/model_index.json")).unwrap();
    let mut index: Value = serde_json::from_str(&index).unwrap();
    index["tokenizer_3"] = serde_json::json!([null, null]);
    fs::write(dir.join("model_index.json"), index.to_string()).unwrap();
    let tokenizers = Sd3Tokenizers::load(&dir).unwrap();
    assert!(tokenizers.t5.is_none());
    let ids = tokenizers.encode("a cat", 256).unwrap();
    assert!(ids.t5.is_empty());
    assert_eq!(ids.clip_l.len(), 77);
    fs::remove_dir_all(dir).unwrap();
}

// ---- bad input ----

fn clip_dir(name: &str) -> PathBuf {
    let dir = scratch(name);
    let from = fixtures().join("sd3-tiny/tokenizer_2");
    copy(&from, &["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"], &dir);
    dir
}

fn message(e: TokenizerError) -> String {
    e.to_string()
}

#[test]
fn missing_folder_and_files_are_named() {
    let e = message(Sd3Tokenizers::load(Path::new("/nonexistent/model")).unwrap_err());
    assert!(e.contains("/nonexistent/model") && e.contains("does not exist"), "{e}");

    for file in ["vocab.json", "merges.txt"] {
        let dir = clip_dir(&format!("missing-{file}"));
        fs::remove_file(dir.join(file)).unwrap();
        let e = message(ClipTokenizer::load(&dir).unwrap_err());
        assert!(e.contains("missing tokenizer file") && e.contains(file), "{e}");
        fs::remove_dir_all(dir).unwrap();
    }

    let dir = clip_dir("missing-configs");
    fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
    fs::remove_file(dir.join("special_tokens_map.json")).unwrap();
    let e = message(ClipTokenizer::load(&dir).unwrap_err());
    assert!(e.contains("special_tokens_map.json") && e.contains("pad token"), "{e}");
    fs::remove_dir_all(dir).unwrap();

    // A model folder whose tokenizer_2/ is missing, then one whose model_index.json lists a missing tokenizer_3/.
    let model = scratch("missing-component");
    copy(&fixtures().join("sd3-tiny"), &["model_index.json"], &model);
    let clip_files = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"];
    fs::create_dir(model.join("tokenizer")).unwrap();
    copy(&fixtures().join("sd3-tiny/tokenizer"), &clip_files, &model.join("tokenizer"));
    let e = message(Sd3Tokenizers::load(&model).unwrap_err());
    assert!(e.contains("tokenizer_2") && e.contains("does not exist"), "{e}");
    fs::create_dir(model.join("tokenizer_2")).unwrap();
    copy(&fixtures().join("sd3-tiny/tokenizer_2"), &clip_files, &model.join("tokenizer_2"));
    let e = message(Sd3Tokenizers::load(&model).unwrap_err());
    assert!(e.contains("tokenizer_3") && e.contains("does not exist"), "{e}");
    fs::remove_dir_all(model).unwrap();

    let dir = scratch("t5-empty");
    let e = message(T5Tokenizer::load(&dir).unwrap_err());
    assert!(e.contains("tokenizer.json") && e.contains("spiece.model"), "{e}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn corrupt_files_are_named_with_the_reason() {
    let dir = clip_dir("corrupt-vocab");
    fs::write(dir.join("vocab.json"), "{\"a\": 1,").unwrap();
    let e = message(ClipTokenizer::load(&dir).unwrap_err());
    assert!(e.contains("vocab.json") && e.contains("is not a valid CLIP vocab.json"), "{e}");
    fs::write(dir.join("vocab.json"), "[1, 2]").unwrap();
    let e = message(ClipTokenizer::load(&dir).unwrap_err());
    assert!(e.contains("vocab.json") && e.contains("JSON object"), "{e}");
    fs::remove_dir_all(dir).unwrap();

    let dir = clip_dir("corrupt-merges");
    let merges = fs::read_to_string(dir.join("merges.txt")).unwrap();
    fs::write(dir.join("merges.txt"), merges.replacen('\n', "\nthree parts here\n", 1)).unwrap();
    let e = message(ClipTokenizer::load(&dir).unwrap_err());
    assert!(e.contains("merges.txt") && e.contains("line 2") && e.contains("two tokens"), "{e}");
    fs::write(dir.join("merges.txt"), "#version: 0.2\nzz qq\n").unwrap();
    let e = message(ClipTokenizer::load(&dir).unwrap_err());
    assert!(e.contains("merges.txt") && e.contains("\"zz\" is not in vocab.json"), "{e}");
    fs::remove_dir_all(dir).unwrap();

    let dir = clip_dir("unknown-pad");
    fs::write(dir.join("special_tokens_map.json"), r#"{"pad_token": "<notatoken>"}"#).unwrap();
    let e = message(ClipTokenizer::load(&dir).unwrap_err());
    assert!(e.contains("special_tokens_map.json") && e.contains("pad token \"<notatoken>\""), "{e}");
    fs::remove_dir_all(dir).unwrap();

    let dir = scratch("t5-corrupt-json");
    fs::write(dir.join("tokenizer.json"), "{\"version\": \"1.0\"").unwrap();
    let e = message(T5Tokenizer::load(&dir).unwrap_err());
    assert!(e.contains("tokenizer.json") && e.contains("not a valid"), "{e}");
    fs::remove_dir_all(dir).unwrap();

    let dir = scratch("t5-corrupt-spiece");
    let model = fs::read(fixtures().join("sd3-tiny/tokenizer_3/spiece.model")).unwrap();
    fs::write(dir.join("spiece.model"), &model[..model.len() / 2]).unwrap();
    let e = message(T5Tokenizer::load(&dir).unwrap_err());
    assert!(e.contains("spiece.model") && e.contains("not a valid SentencePiece model"), "{e}");
    fs::write(dir.join("spiece.model"), b"not a model at all").unwrap();
    assert!(T5Tokenizer::load(&dir).is_err());
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn max_sequence_length_is_checked() {
    let tokenizers = Sd3Tokenizers::load(&fixtures().join("sd3-tiny")).unwrap();
    for bad in [0, 513] {
        let e = message(tokenizers.encode("a cat", bad).unwrap_err());
        assert!(e.contains(&format!("max_sequence_length {bad}")) && e.contains("512"), "{e}");
    }
    assert_eq!(tokenizers.encode("a cat", 512).unwrap().t5.len(), 512);
}
