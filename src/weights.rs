//! Loading a diffusers component folder (`transformer/`, `text_encoder/`, `vae/`, ...): safetensors files,
//! single or sharded (`*.safetensors.index.json` with a `weight_map`), memory-mapped, f32/f16/bf16 stored.
//!
//! Tensors are uploaded on request ([`Weights::tensor`]), once per call, converting the dtype on the host when
//! the stored dtype differs from the requested one. LoRA deltas registered with [`Weights::add_delta`] are merged
//! into the weight on the host (f32) before the upload, so every model loader gets LoRA for free.
//!
//! Each model defines its own config struct and reads it with [`read_config`].

use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors};
use sd3_core::{Backend, DType, Tensor};
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("model folder {} does not exist (expected a diffusers component folder with safetensors files)", .dir.display())]
    MissingDir { dir: PathBuf },
    #[error("no *.safetensors file in {}", .dir.display())]
    NoSafetensors { dir: PathBuf },
    #[error("{}: {reason}", .path.display())]
    Io { path: PathBuf, reason: String },
    #[error("{}: not a valid safetensors file (truncated or corrupt): {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{}: tensor `{name}` is listed in {} times", .dir.display(), .files.join(" and "))]
    Duplicate { dir: PathBuf, name: String, files: Vec<String> },
    #[error("tensor `{name}` not found in {}{}", .dir.display(), suggest(.suggestions))]
    MissingTensor { name: String, dir: PathBuf, suggestions: Vec<String> },
    #[error("tensor `{name}` in {}: expected shape {expected:?}, found {found:?}", .dir.display())]
    Shape { name: String, dir: PathBuf, expected: Vec<usize>, found: Vec<usize> },
    #[error("tensor `{name}` in {}: stored dtype {stored} is not supported (f32, f16, bf16{})", .path.display(), if *.int_ok { ", i32, i64" } else { "" })]
    UnsupportedDtype { name: String, path: PathBuf, stored: String, int_ok: bool },
    #[error("{}: {reason}", .path.display())]
    Config { path: PathBuf, reason: String },
    #[error("uploading tensor `{name}`: {source}")]
    Upload { name: String, source: sd3_core::Error },
}

fn suggest(s: &[String]) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(" (did you mean {}?)", s.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "))
    }
}

/// Where one tensor lives: which file, which byte range of it, its stored dtype and shape.
#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    start: usize,
    end: usize,
    dtype: StDtype,
    shape: Vec<usize>,
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    metadata: HashMap<String, String>,
}

/// A low-rank update `W += scale · B·A` of a 2-D weight `W [out, in]`, with `A [rank, in]`, `B [out, rank]` (f32).
/// `scale` already includes the user's LoRA scale and alpha/rank.
#[derive(Clone, Debug)]
pub struct WeightDelta {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    pub scale: f32,
}

/// The tensors of one component folder (or one file), memory-mapped.
pub struct Weights {
    dir: PathBuf,
    files: Vec<MappedFile>,
    entries: BTreeMap<String, Entry>,
    deltas: HashMap<String, Vec<WeightDelta>>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Weights({}, {} tensors in {} files)", self.dir.display(), self.entries.len(), self.files.len())
    }
}

impl Weights {
    /// Open a diffusers component folder: `*.safetensors.index.json` shards if present, else its safetensors
    /// file(s). When a folder holds several unindexed files, variant files (`model.fp16.safetensors`) are
    /// ignored if a plain one exists.
    pub fn open(dir: &Path) -> Result<Weights, WeightsError> {
        if !dir.is_dir() {
            return Err(WeightsError::MissingDir { dir: dir.to_path_buf() });
        }
        let read_dir = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
        let mut names: Vec<String> =
            read_dir.filter_map(|e| e.ok()).filter_map(|e| e.file_name().into_string().ok()).collect();
        names.sort();
        let indexes: Vec<&String> = names.iter().filter(|n| n.ends_with(".safetensors.index.json")).collect();
        let files: Vec<PathBuf> = if let Some(index) = pick_plain(&indexes, ".safetensors.index.json") {
            shards_of(&dir.join(index))?.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let singles: Vec<&String> = names.iter().filter(|n| n.ends_with(".safetensors")).collect();
            if singles.is_empty() {
                return Err(WeightsError::NoSafetensors { dir: dir.to_path_buf() });
            }
            let plain: Vec<&String> = singles.iter().copied().filter(|n| !has_variant(n, ".safetensors")).collect();
            let chosen = if plain.is_empty() { singles } else { plain };
            chosen.into_iter().map(|f| dir.join(f)).collect()
        };
        Weights::from_files(dir, &files)
    }

    /// Open one safetensors file (a LoRA, an init-noise file, a single-file component).
    pub fn open_file(path: &Path) -> Result<Weights, WeightsError> {
        if !path.is_file() {
            return Err(WeightsError::Io { path: path.to_path_buf(), reason: "file not found".into() });
        }
        Weights::from_files(path, &[path.to_path_buf()])
    }

    fn from_files(dir: &Path, paths: &[PathBuf]) -> Result<Weights, WeightsError> {
        let mut w =
            Weights { dir: dir.to_path_buf(), files: Vec::new(), entries: BTreeMap::new(), deltas: HashMap::new() };
        for path in paths {
            let file = File::open(path).map_err(|e| io_err(path, e))?;
            // SAFETY: the file is opened read-only; like every safetensors loader we assume nobody truncates it
            // while it is mapped.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
            let (header_len, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| WeightsError::Corrupt { path: path.clone(), reason: format!("{e:?}") })?;
            let base = 8 + header_len;
            let idx = w.files.len();
            for (name, info) in meta.tensors() {
                let entry = Entry {
                    file: idx,
                    start: base + info.data_offsets.0,
                    end: base + info.data_offsets.1,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                };
                if let Some(prev) = w.entries.insert(name.clone(), entry) {
                    return Err(WeightsError::Duplicate {
                        dir: dir.to_path_buf(),
                        name,
                        files: vec![file_name(&w.files[prev.file].path), file_name(path)],
                    });
                }
            }
            let metadata = meta.metadata().clone().unwrap_or_default();
            w.files.push(MappedFile { path: path.clone(), mmap, metadata });
        }
        Ok(w)
    }

    /// The folder (or file) these weights come from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.entries.get(name).map(|e| e.shape.clone())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The stored dtype, `None` when the tensor is missing or its dtype is not one of ours.
    pub fn dtype_of(&self, name: &str) -> Option<DType> {
        self.entries.get(name).and_then(|e| st_dtype(e.dtype))
    }

    /// A `__metadata__` value of the safetensors header (first file that has it).
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.files.iter().find_map(|f| f.metadata.get(key).map(|s| s.as_str()))
    }

    /// Error for a missing tensor, with the closest names as suggestions.
    pub fn missing(&self, name: &str) -> WeightsError {
        WeightsError::MissingTensor {
            name: name.to_string(),
            dir: self.dir.clone(),
            suggestions: self.near_names(name),
        }
    }

    fn entry(&self, name: &str) -> Result<&Entry, WeightsError> {
        self.entries.get(name).ok_or_else(|| self.missing(name))
    }

    /// Names within a small edit distance of `name` (at most three, closest first).
    pub fn near_names(&self, name: &str) -> Vec<String> {
        near_names(name, self.entries.keys().map(|k| k.as_str()))
    }

    /// A missing-tensor error whose suggestions come from `candidates` first (e.g. the tensors a model did not
    /// expect, which is where a misnamed tensor hides), then from all names.
    pub fn missing_among<'a>(&self, name: &str, candidates: impl Iterator<Item = &'a str>) -> WeightsError {
        let mut suggestions = near_names(name, candidates);
        if suggestions.is_empty() {
            suggestions = self.near_names(name);
        }
        WeightsError::MissingTensor { name: name.to_string(), dir: self.dir.clone(), suggestions }
    }

    /// Raw little-endian bytes of a tensor as stored (zero-copy).
    pub fn raw(&self, name: &str) -> Result<(&[u8], DType), WeightsError> {
        let e = self.entry(name)?;
        let f = &self.files[e.file];
        let dtype = st_dtype(e.dtype).ok_or_else(|| WeightsError::UnsupportedDtype {
            name: name.into(),
            path: f.path.clone(),
            stored: format!("{:?}", e.dtype),
            int_ok: true,
        })?;
        Ok((&f.mmap[e.start..e.end], dtype))
    }

    /// A float tensor's values as f32 on the host, with any registered LoRA deltas merged.
    pub fn host_f32(&self, name: &str) -> Result<Vec<f32>, WeightsError> {
        let (bytes, stored) = self.float_raw(name)?;
        let mut values = stored.bytes_to_f32(bytes);
        self.apply_deltas(name, &mut values);
        Ok(values)
    }

    fn float_raw(&self, name: &str) -> Result<(&[u8], DType), WeightsError> {
        let (bytes, dtype) = self.raw(name)?;
        if !dtype.is_float() {
            let e = &self.entries[name];
            return Err(WeightsError::UnsupportedDtype {
                name: name.into(),
                path: self.files[e.file].path.clone(),
                stored: dtype.name().into(),
                int_ok: false,
            });
        }
        Ok((bytes, dtype))
    }

    /// Upload a tensor as `dtype`. Float tensors convert between f32/f16/bf16 on the host; integer tensors
    /// must be requested in their stored dtype.
    pub fn tensor(&self, name: &str, backend: &Backend, dtype: DType) -> Result<Tensor, WeightsError> {
        let e = self.entry(name)?;
        let (bytes, stored) = self.raw(name)?;
        let upload = |bytes: &[u8]| {
            backend
                .from_bytes(bytes, &e.shape, dtype)
                .map_err(|source| WeightsError::Upload { name: name.into(), source })
        };
        let has_delta = self.deltas.contains_key(name);
        if stored == dtype && !has_delta {
            return upload(bytes);
        }
        if !stored.is_float() || !dtype.is_float() {
            return Err(WeightsError::UnsupportedDtype {
                name: name.into(),
                path: self.files[e.file].path.clone(),
                stored: format!("{stored} (requested as {dtype})"),
                int_ok: false,
            });
        }
        let mut values = stored.bytes_to_f32(bytes);
        self.apply_deltas(name, &mut values);
        upload(&dtype.f32_to_bytes(&values))
    }

    /// [`Weights::tensor`] after checking the stored shape.
    pub fn tensor_checked(
        &self,
        name: &str,
        expected_shape: &[usize],
        backend: &Backend,
        dtype: DType,
    ) -> Result<Tensor, WeightsError> {
        self.check_shape(name, expected_shape)?;
        self.tensor(name, backend, dtype)
    }

    /// Error unless the tensor exists with this shape.
    pub fn check_shape(&self, name: &str, expected: &[usize]) -> Result<(), WeightsError> {
        let e = self.entry(name)?;
        if e.shape != expected {
            return Err(WeightsError::Shape {
                name: name.into(),
                dir: self.dir.clone(),
                expected: expected.to_vec(),
                found: e.shape.clone(),
            });
        }
        Ok(())
    }

    /// Register a low-rank update of the 2-D weight `name`, merged by every later [`Weights::tensor`] call.
    pub fn add_delta(&mut self, name: &str, delta: WeightDelta) -> Result<(), WeightsError> {
        let shape = self.entry(name)?.shape.clone();
        let expected_a = shape.get(1).map(|&i| delta.rank * i);
        let expected_b = shape.first().map(|&o| o * delta.rank);
        if shape.len() != 2 || expected_a != Some(delta.a.len()) || expected_b != Some(delta.b.len()) {
            return Err(WeightsError::Shape {
                name: name.into(),
                dir: self.dir.clone(),
                expected: shape,
                found: vec![delta.b.len() / delta.rank.max(1), delta.a.len() / delta.rank.max(1)],
            });
        }
        self.deltas.entry(name.to_string()).or_default().push(delta);
        Ok(())
    }

    /// Names that carry LoRA deltas.
    pub fn delta_names(&self) -> impl Iterator<Item = &str> {
        self.deltas.keys().map(|s| s.as_str())
    }

    fn apply_deltas(&self, name: &str, w: &mut [f32]) {
        let Some(deltas) = self.deltas.get(name) else { return };
        let cols = self.entries[name].shape[1];
        for d in deltas {
            // W[o, i] += scale · Σ_r B[o, r]·A[r, i]
            for (o, row) in w.chunks_exact_mut(cols).enumerate() {
                for r in 0..d.rank {
                    let b = d.scale * d.b[o * d.rank + r];
                    if b == 0.0 {
                        continue;
                    }
                    let a = &d.a[r * cols..(r + 1) * cols];
                    for (wi, ai) in row.iter_mut().zip(a) {
                        *wi += b * ai;
                    }
                }
            }
        }
    }
}

/// Read `dir/config.json` into a model's config struct.
pub fn read_config<T: DeserializeOwned>(dir: &Path) -> Result<T, WeightsError> {
    read_json(&dir.join("config.json"))
}

/// Read any JSON file (a `config.json`, `scheduler_config.json`, `model_index.json`) with serde.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, WeightsError> {
    if let Some(dir) = path.parent() {
        if !dir.is_dir() {
            return Err(WeightsError::MissingDir { dir: dir.to_path_buf() });
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| WeightsError::Config { path: path.to_path_buf(), reason: e.to_string() })
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// The distinct shard files of an index, in order of first appearance by tensor name.
fn shards_of(index: &Path) -> Result<Vec<String>, WeightsError> {
    let idx: ShardIndex = read_json(index)?;
    let mut files: Vec<String> = Vec::new();
    for f in idx.weight_map.values() {
        if !files.contains(f) {
            files.push(f.clone());
        }
    }
    let dir = index.parent().unwrap_or(Path::new("."));
    for f in &files {
        if !dir.join(f).is_file() {
            return Err(WeightsError::Io {
                path: dir.join(f),
                reason: format!("shard listed in {} is missing", file_name(index)),
            });
        }
    }
    Ok(files)
}

/// `x.fp16.safetensors` has a variant; `x.safetensors` and `x-00001-of-00002.safetensors` do not.
fn has_variant(name: &str, suffix: &str) -> bool {
    name.strip_suffix(suffix).is_some_and(|stem| stem.contains('.'))
}

fn pick_plain<'a>(names: &[&'a String], suffix: &str) -> Option<&'a String> {
    names.iter().copied().find(|n| !has_variant(n, suffix)).or_else(|| names.first().copied())
}

fn st_dtype(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::I32 => DType::I32,
        StDtype::I64 => DType::I64,
        StDtype::U8 => DType::U8,
        _ => return None,
    })
}

fn io_err(path: &Path, e: std::io::Error) -> WeightsError {
    WeightsError::Io { path: path.to_path_buf(), reason: e.to_string() }
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}

fn near_names<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Vec<String> {
    let limit = (name.len() / 4).max(3);
    let mut scored: Vec<(usize, &str)> = candidates
        .filter(|k| k.len().abs_diff(name.len()) <= limit)
        .map(|k| (levenshtein(name, k), k))
        .filter(|(d, _)| *d <= limit)
        .collect();
    scored.sort();
    scored.into_iter().take(3).map(|(_, k)| k.to_string()).collect()
}

fn levenshtein(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_and_distance() {
        assert!(has_variant("diffusion_pytorch_model.fp16.safetensors", ".safetensors"));
        assert!(!has_variant("model-00001-of-00002.safetensors", ".safetensors"));
        assert_eq!(levenshtein("attn.to_q", "attn.to_k"), 1);
        assert_eq!(levenshtein("", "abc"), 3);
    }
}
