//! The committed fixtures keep the contract fixtures/README.md documents (names, shapes, dtypes, sizes), so the
//! model and pipeline tests can rely on it.

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn f32_values(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let view = st.tensor(name).unwrap_or_else(|_| panic!("tensor {name} missing"));
    assert_eq!(view.dtype(), Dtype::F32, "{name}");
    let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    (view.shape().to_vec(), values)
}

fn golden_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(fixtures().join("golden")).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    dirs
}

#[test]
fn goldens_have_the_documented_tensors() {
    let dirs = golden_dirs();
    assert_eq!(dirs.len(), 7);
    for dir in dirs {
        let case = dir.file_name().unwrap().to_string_lossy().to_string();
        let params = json(&dir.join("params.json"));
        let (h, w) = (params["height"].as_u64().unwrap() as usize, params["width"].as_u64().unwrap() as usize);
        let steps = params["steps"].as_u64().unwrap() as usize;
        let t = params["max_sequence_length"].as_u64().unwrap() as usize;
        let cfg = params["cfg"].as_bool().unwrap();
        let no_t5 = params["no_t5"].as_bool().unwrap();
        assert_eq!(cfg, params["guidance"].as_f64().unwrap() > 1.0, "{case}");
        let image_diff = params["f32_vs_f64_image_max_abs_diff"].as_f64().unwrap();
        assert!(image_diff < 0.5 / 255.0, "{case}: float32 vs float64 differ by {image_diff}");

        let bytes = fs::read(dir.join("golden.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let latent = vec![1, 16, h / 8, w / 8];
        let b = if cfg { 2 } else { 1 };
        let mut expected: Vec<(String, Vec<usize>)> = vec![
            ("latents".into(), latent.clone()),
            ("timesteps".into(), vec![steps]),
            ("sigmas".into(), vec![steps + 1]),
            ("step0_hidden_states".into(), vec![b, 16, h / 8, w / 8]),
            ("step0_timestep".into(), vec![b]),
            ("step0_output".into(), vec![b, 16, h / 8, w / 8]),
            ("step_latents".into(), vec![steps, 1, 16, h / 8, w / 8]),
            ("final_latents".into(), latent.clone()),
            ("vae_input".into(), latent.clone()),
            ("vae_output".into(), vec![1, 3, h, w]),
            ("image".into(), vec![1, h, w, 3]),
        ];
        for p in if cfg { vec!["", "neg_"] } else { vec![""] } {
            expected.extend([
                (format!("{p}clip_l_hidden"), vec![1, 77, 32]),
                (format!("{p}clip_l_last_hidden"), vec![1, 77, 32]),
                (format!("{p}clip_l_pooled"), vec![1, 32]),
                (format!("{p}clip_g_hidden"), vec![1, 77, 48]),
                (format!("{p}clip_g_last_hidden"), vec![1, 77, 48]),
                (format!("{p}clip_g_pooled"), vec![1, 48]),
                (format!("{p}prompt_embeds"), vec![1, 77 + t, 96]),
                (format!("{p}pooled_projections"), vec![1, 80]),
            ]);
            if no_t5 {
                assert!(st.tensor(&format!("{p}t5_ids")).is_err() && st.tensor(&format!("{p}t5_hidden")).is_err());
            } else {
                expected.push((format!("{p}t5_hidden"), vec![1, t, 96]));
            }
            let ids: &[(&str, usize)] = if no_t5 {
                &[("clip_l_ids", 77), ("clip_g_ids", 77)]
            } else {
                &[("clip_l_ids", 77), ("clip_g_ids", 77), ("t5_ids", t)]
            };
            for &(name, len) in ids {
                let view = st.tensor(&format!("{p}{name}")).unwrap();
                assert_eq!((view.dtype(), view.shape()), (Dtype::I64, &[1, len][..]), "{case}: {p}{name}");
            }
        }
        for (name, shape) in &expected {
            let (got, values) = f32_values(&st, name);
            assert_eq!(&got, shape, "{case}: shape of {name}");
            assert!(values.iter().all(|v| v.is_finite()), "{case}: {name} has non-finite values");
        }

        // The documented relations between tensors.
        let (_, sigmas) = f32_values(&st, "sigmas");
        let (_, timesteps) = f32_values(&st, "timesteps");
        assert_eq!((sigmas[0], sigmas[steps]), (1.0, 0.0), "{case}");
        assert_eq!(timesteps[0], 1000.0, "{case}");
        let (_, noise) = f32_values(&st, "latents");
        let (_, step0) = f32_values(&st, "step0_hidden_states");
        assert_eq!(&step0[..noise.len()], &noise[..], "{case}: step0 input is the injected noise");
        let (_, fin) = f32_values(&st, "final_latents");
        let (_, vae_in) = f32_values(&st, "vae_input");
        for (z, x) in fin.iter().zip(&vae_in) {
            assert!((z / 1.5305 + 0.0609 - x).abs() < 1e-5, "{case}: vae_input = final/1.5305 + 0.0609");
        }
        let (_, embeds) = f32_values(&st, "prompt_embeds");
        let (_, l) = f32_values(&st, "clip_l_hidden");
        let (_, g) = f32_values(&st, "clip_g_hidden");
        // Without T5, diffusers uses zeros (1, T, 96) in its place.
        let t5 = if no_t5 { vec![0.0; t * 96] } else { f32_values(&st, "t5_hidden").1 };
        for tok in 0..77 {
            let row = &embeds[tok * 96..(tok + 1) * 96];
            assert_eq!(&row[..32], &l[tok * 32..(tok + 1) * 32], "{case}: CLIP-L part of prompt_embeds");
            assert_eq!(&row[32..80], &g[tok * 48..(tok + 1) * 48], "{case}: CLIP-G part of prompt_embeds");
            assert!(row[80..].iter().all(|&v| v == 0.0), "{case}: zero padding 80..96");
        }
        assert_eq!(&embeds[77 * 96..], &t5[..], "{case}: T5 part of prompt_embeds");

        // init_noise.safetensors is what --init-noise takes.
        let noise_bytes = fs::read(dir.join("init_noise.safetensors")).unwrap();
        let init = SafeTensors::deserialize(&noise_bytes).unwrap();
        assert_eq!(init.names().len(), 1);
        assert_eq!(f32_values(&init, "latents"), (latent.clone(), noise.clone()), "{case}");

        // image.png = round(image * 255) in float32, ties to even (numpy).
        let (_, image) = f32_values(&st, "image");
        let decoder = png::Decoder::new(std::io::BufReader::new(fs::File::open(dir.join("image.png")).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width as usize, info.height as usize), (w, h), "{case}");
        assert_eq!(info.color_type, png::ColorType::Rgb, "{case}");
        for (p, v) in pixels.iter().zip(&image) {
            assert_eq!(*p, (v * 255.0).round_ties_even() as u8, "{case}: image.png vs image");
        }
    }
}

#[test]
fn tiny_models_are_float16_and_small() {
    for model in ["sd3-tiny", "sd35-tiny"] {
        let dir = fixtures().join(model);
        let mut total = 0u64;
        for component in ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"] {
            for entry in fs::read_dir(dir.join(component)).unwrap() {
                let path = entry.unwrap().path();
                total += fs::metadata(&path).unwrap().len();
                if path.extension().is_some_and(|e| e == "safetensors") {
                    let bytes = fs::read(&path).unwrap();
                    let st = SafeTensors::deserialize(&bytes).unwrap();
                    for (name, view) in st.tensors() {
                        assert_eq!(view.dtype(), Dtype::F16, "{}: {name}", path.display());
                    }
                }
            }
        }
        assert!(total < 4_000_000, "{model} weighs {total} bytes");
    }
    // The tiny T5 is sharded and its index names only files that exist.
    let t5 = fixtures().join("sd3-tiny/text_encoder_3");
    let index = json(&t5.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    assert!(map.len() > 10);
    let mut shards: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    shards.sort();
    shards.dedup();
    assert!(shards.len() >= 2);
    for shard in shards {
        assert!(t5.join(shard).exists(), "{shard}");
    }
    // The transformer stores the pos_embed buffer.
    let bytes = fs::read(fixtures().join("sd35-tiny/transformer/diffusion_pytorch_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("pos_embed.pos_embed").unwrap().shape(), &[1, 100, 64]);
}
