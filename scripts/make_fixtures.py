#!/usr/bin/env python3
"""Generate the golden fixtures of the sd3 project with diffusers (see fixtures/README.md).

Writes, under fixtures/:
  sd3-tiny/, sd35-tiny/       tiny random pipelines in the published diffusers on-disk layout (float16 weights)
  golden/<case>/              golden.safetensors + params.json + image.png, made by StableDiffusion3Pipeline
  lora/sd3-tiny-lora.safetensors   a diffusers/PEFT-format LoRA for sd3-tiny
  tokenizers/                 the real CLIP vocabulary (from open_clip's BPE file) and transformers' ids for
                              tricky prompts (tokenizers/cases.json)

Every golden is made by reloading the saved files with from_pretrained (float32), and re-run in float64 to check
that the fixture can judge: the float32 and float64 images must agree to well under 1/255.

Usage:  python scripts/make_fixtures.py --open-clip-vocab PATH/bpe_simple_vocab_16e6.txt.gz [--out fixtures]
"""

import argparse
import gzip
import inspect
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers
import transformers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

CLIP_MAX = 77
# Stored weights are float16; goldens are computed in float32 from the float16 values.
STORE_DTYPE = torch.float16
# The float32 and float64 images must agree to this (well under 1/255 = 0.0039).
F64_IMAGE_TOL = 5e-4


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers


def bytes_to_unicode():
    """GPT-2/CLIP byte -> printable unicode map (same order as OpenAI's CLIP SimpleTokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab_and_merges(bpe_gz, n_merges=None):
    """The CLIP vocabulary built the way OpenAI's/OpenCLIP's SimpleTokenizer builds it from its BPE file.

    n_merges=None keeps all 48 894 merges (49 408 tokens, the real CLIP vocabulary); a smaller number keeps the first
    merges only (a tiny but real-looking vocabulary where BOS/EOS are still the two highest ids).
    """
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    if n_merges is not None:
        merges = merges[:n_merges]
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def added_token(content):
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_clip_tokenizer(dirname, vocab, merges, pad_token):
    """vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json as in the published SD3 repos.

    The published repos ship no tokenizer.json for the CLIP tokenizers; tokenizer_2 (CLIP-G) pads with "!".
    """
    os.makedirs(dirname, exist_ok=True)
    with open(os.path.join(dirname, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(dirname, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges))
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    decoder = {str(vocab[t]): dict(added_token(t), special=True) for t in [bos, eos]}
    if pad_token not in (bos, eos):
        decoder[str(vocab[pad_token])] = dict(added_token(pad_token), special=True)
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": dict(sorted(decoder.items(), key=lambda kv: int(kv[0]))),
        "bos_token": bos,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": eos,
        "errors": "replace",
        "model_max_length": CLIP_MAX,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": eos,
    }
    with open(os.path.join(dirname, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    special = {
        "bos_token": added_token(bos),
        "eos_token": added_token(eos),
        "pad_token": pad_token if pad_token != eos else added_token(eos),
        "unk_token": added_token(eos),
    }
    with open(os.path.join(dirname, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)


def t5_corpus():
    """Training text for the tiny T5 SentencePiece model: docstrings of a fixed list of stdlib modules."""
    import argparse as m1, collections as m2, email as m3, json as m4, logging as m5, pathlib as m6, string as m7
    import textwrap as m8, typing as m9, unittest as m10, zipfile as m11, http.client as m12, decimal as m13

    texts = []
    for mod in [m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13]:
        for _, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
            if doc:
                texts.append(doc)
    texts.append("A cat holding a sign that says hello world. Café naïve résumé, 東京 猫 🐱, 1234.5 !?")
    return "\n".join(t for t in "\n".join(texts).split("\n") if t.strip())


def write_t5_tokenizer(dirname, workdir):
    """A tiny T5 tokenizer: SentencePiece unigram (1000 pieces, pad 0, eos 1, unk 2) + 100 <extra_id_*> = 1100."""
    import sentencepiece as spm

    corpus = os.path.join(workdir, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write(t5_corpus())
    prefix = os.path.join(workdir, "spiece")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, vocab_size=1000, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, character_coverage=1.0, normalization_rule_name="nmt_nfkc", num_threads=1,
        minloglevel=2,
    )
    # The trainer records its input path and prefix in the model; fix them so regenerating gives identical bytes.
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(prefix + ".model", "rb") as f:
        proto.ParseFromString(f.read())
    proto.trainer_spec.ClearField("input")
    proto.trainer_spec.model_prefix = "spiece"
    with open(prefix + ".model", "wb") as f:
        f.write(proto.SerializeToString())
    src = os.path.join(workdir, "t5src")
    os.makedirs(src, exist_ok=True)
    shutil.copy(prefix + ".model", os.path.join(src, "spiece.model"))
    tok = T5Tokenizer.from_pretrained(src, model_max_length=512, legacy=True)
    tok.save_pretrained(dirname)
    shutil.copy(prefix + ".model", os.path.join(dirname, "spiece.model"))
    return T5Tokenizer.from_pretrained(dirname)


# ---------------------------------------------------------------------------------------------------------------
# Models


def round_to_store_dtype(model):
    """Round every float parameter and buffer (persistent ones such as pos_embed included) to float16 values."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(STORE_DTYPE).to(t.dtype))
    return model.eval()


def clip_config(kind, vocab_size, bos, eos, pad):
    hidden, heads, ff, act = {"l": (32, 4, 64, "quick_gelu"), "g": (48, 4, 96, "gelu")}[kind]
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ff, projection_dim=hidden,
        num_hidden_layers=3, num_attention_heads=heads, max_position_embeddings=CLIP_MAX, hidden_act=act,
        layer_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, initializer_range=0.02,
        attention_dropout=0.0, dropout=0.0,
    )


def make_text_encoders(tiny_vocab, t5_vocab_size, seed):
    bos, eos = tiny_vocab["<|startoftext|>"], tiny_vocab["<|endoftext|>"]
    torch.manual_seed(seed)
    te1 = CLIPTextModelWithProjection(clip_config("l", len(tiny_vocab), bos, eos, eos))
    torch.manual_seed(seed + 1)
    te2 = CLIPTextModelWithProjection(clip_config("g", len(tiny_vocab), bos, eos, 0))
    torch.manual_seed(seed + 2)
    t5cfg = T5Config(
        vocab_size=t5_vocab_size, d_model=96, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
        layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
    )
    te3 = T5EncoderModel(t5cfg)
    return [round_to_store_dtype(m) for m in (te1, te2, te3)]


def make_vae(seed):
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32), layers_per_block=1, act_fn="silu", latent_channels=16,
        norm_num_groups=4, sample_size=64, scaling_factor=1.5305, shift_factor=0.0609, force_upcast=True,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    )
    return round_to_store_dtype(vae)


def make_transformer(seed, **cfg):
    torch.manual_seed(seed)
    base = dict(
        patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=96, caption_projection_dim=64, pooled_projection_dim=32 + 48,
    )
    base.update(cfg)
    return round_to_store_dtype(SD3Transformer2DModel(**base))


def save_pipeline(out, transformer, vae, encoders, tiny_vocab, merges, t5_tok_dir, shift):
    te1, te2, te3 = encoders
    if os.path.exists(out):
        shutil.rmtree(out)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    tmp_tok = tempfile.mkdtemp()
    write_clip_tokenizer(os.path.join(tmp_tok, "l"), tiny_vocab, merges, "<|endoftext|>")
    write_clip_tokenizer(os.path.join(tmp_tok, "g"), tiny_vocab, merges, "!")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=te1, tokenizer=CLIPTokenizer.from_pretrained(os.path.join(tmp_tok, "l")),
        text_encoder_2=te2, tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(tmp_tok, "g")),
        text_encoder_3=te3, tokenizer_3=T5Tokenizer.from_pretrained(t5_tok_dir),
    )
    pipe.to(STORE_DTYPE)
    pipe.save_pretrained(out, safe_serialization=True)
    # The text encoders again: T5 sharded (as published), and tokenizers exactly in the published file set.
    for name in ["text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"]:
        shutil.rmtree(os.path.join(out, name))
    te3.to(STORE_DTYPE).save_pretrained(os.path.join(out, "text_encoder_3"), max_shard_size="200KB")
    shutil.copytree(os.path.join(tmp_tok, "l"), os.path.join(out, "tokenizer"))
    shutil.copytree(os.path.join(tmp_tok, "g"), os.path.join(out, "tokenizer_2"))
    shutil.copytree(t5_tok_dir, os.path.join(out, "tokenizer_3"))
    shutil.rmtree(tmp_tok)
    pipe.to(torch.float32)
    index = os.path.join(out, "text_encoder_3", "model.safetensors.index.json")
    assert os.path.exists(index), "the tiny T5 must be sharded"
    check_reload(out, pipe)
    return pipe


def check_reload(out, pipe):
    """The saved files must hold exactly the rounded models (parameters and all buffers, pos_embed included)."""
    again = StableDiffusion3Pipeline.from_pretrained(out, torch_dtype=torch.float32)
    for name in ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"]:
        a, b = getattr(pipe, name), getattr(again, name)
        ta = dict(list(a.named_parameters()) + list(a.named_buffers()))
        tb = dict(list(b.named_parameters()) + list(b.named_buffers()))
        assert ta.keys() == tb.keys(), (name, set(ta) ^ set(tb))
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{out}/{name}: {k} differs after reload"
        assert not b.training, f"{name} must load in eval mode"
    print(f"[{os.path.basename(out)}] reload check: parameters and buffers identical")


# ---------------------------------------------------------------------------------------------------------------
# Golden runs


class Recorder:
    """Forward hooks that record what the pipeline feeds each model and what it gets back."""

    def __init__(self, pipe):
        self.calls = {"text_encoder": [], "text_encoder_2": [], "text_encoder_3": [], "transformer": [], "vae": []}
        self.handles = []
        for name in ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer"]:
            module = getattr(pipe, name)
            if module is None:  # no T5
                continue
            self.handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
        self.handles.append(pipe.vae.decoder.register_forward_hook(self._hook("vae"), with_kwargs=True))

    def _hook(self, name):
        def hook(module, args, kwargs, output):
            self.calls[name].append((args, kwargs, output))

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def run_golden(model_dir, dtype, case, lora=None):
    extra = {"text_encoder_3": None, "tokenizer_3": None} if case.get("no_t5") else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, torch_dtype=dtype, **extra)
    pipe.set_progress_bar_config(disable=True)
    for m in [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer, pipe.vae]:
        if m is not None:
            m.eval()
    if lora is not None:
        pipe.load_lora_weights(lora["file"])
    rec = Recorder(pipe)
    step_latents = []

    def on_step_end(p, i, t, kw):
        step_latents.append(kw["latents"].detach().clone())
        return {}

    noise = case["noise"].to(dtype)
    kwargs = dict(
        prompt=case["prompt"], negative_prompt=case.get("negative_prompt"), height=case["height"],
        width=case["width"], num_inference_steps=case["steps"], guidance_scale=case["guidance"],
        max_sequence_length=case["max_sequence_length"], latents=noise, output_type="np",
        callback_on_step_end=on_step_end,
    )
    if lora is not None:
        kwargs["joint_attention_kwargs"] = {"scale": lora["scale"]}
    if "slg" in case:
        kwargs.update(case["slg"])
    with torch.no_grad():
        image = pipe(**kwargs).images
    rec.remove()
    return pipe, rec, step_latents, image


def f32(t):
    return t.detach().to(torch.float32).contiguous().clone()


def collect(pipe, rec, step_latents, image, case):
    """The named tensors of a golden (documented in fixtures/README.md)."""
    cfg = case["guidance"] > 1.0
    out = {"latents": f32(case["noise"])}
    prefixes = ["", "neg_"] if cfg else [""]
    for call_index, p in enumerate(prefixes):
        for enc, key in [("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")]:
            args, kwargs, o = rec.calls[enc][call_index]
            ids = args[0] if args else kwargs["input_ids"]
            out[f"{p}{key}_ids"] = ids.to(torch.int64).contiguous().clone()
            out[f"{p}{key}_hidden"] = f32(o.hidden_states[-2])
            out[f"{p}{key}_last_hidden"] = f32(o.last_hidden_state)
            out[f"{p}{key}_pooled"] = f32(o.text_embeds)
        if case.get("no_t5"):
            continue  # diffusers uses zeros (B, max_sequence_length, joint_attention_dim) for T5
        args, kwargs, o = rec.calls["text_encoder_3"][call_index]
        ids = args[0] if args else kwargs["input_ids"]
        out[f"{p}t5_ids"] = ids.to(torch.int64).contiguous().clone()
        out[f"{p}t5_hidden"] = f32(o.last_hidden_state)
    # Assembled embeddings, as the transformer receives them (batch order: negative, prompt).
    first = rec.calls["transformer"][0][1]
    enc, pooled = first["encoder_hidden_states"], first["pooled_projections"]
    out["prompt_embeds"] = f32(enc[-1:])
    out["pooled_projections"] = f32(pooled[-1:])
    if cfg:
        out["neg_prompt_embeds"] = f32(enc[:1])
        out["neg_pooled_projections"] = f32(pooled[:1])
    out["timesteps"] = f32(pipe.scheduler.timesteps)
    out["sigmas"] = f32(pipe.scheduler.sigmas)
    out["step0_hidden_states"] = f32(first["hidden_states"])
    out["step0_timestep"] = f32(first["timestep"])
    out["step0_output"] = f32(rec.calls["transformer"][0][2][0])
    slg_calls = [c for c in rec.calls["transformer"] if c[1].get("skip_layers") is not None]
    if slg_calls:
        kw = slg_calls[0][1]
        out["slg0_hidden_states"] = f32(kw["hidden_states"])
        out["slg0_timestep"] = f32(kw["timestep"])
        out["slg0_output"] = f32(slg_calls[0][2][0])
    out["step_latents"] = torch.stack([f32(x) for x in step_latents])
    out["final_latents"] = f32(step_latents[-1])
    (vae_args, vae_kwargs, vae_out) = rec.calls["vae"][0]
    out["vae_input"] = f32(vae_args[0] if vae_args else vae_kwargs["z"])
    out["vae_output"] = f32(vae_out)
    out["image"] = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32)
    return out


def make_golden(root, name, model_rel, case, lora=None):
    model_dir = os.path.join(root, model_rel)
    pipe32, rec, steps32, img32 = run_golden(model_dir, torch.float32, case, lora)
    tensors = collect(pipe32, rec, steps32, img32, case)
    _, _, steps64, img64 = run_golden(model_dir, torch.float64, case, lora)
    img_diff = float(np.abs(img32.astype(np.float64) - img64).max())
    lat_diff = float((steps32[-1].double() - steps64[-1]).abs().max())
    img = tensors["image"]
    clamped = float(((img <= 0) | (img >= 1)).float().mean())
    print(f"[{name}] f32 vs f64: image max |diff| = {img_diff:.2e} ({img_diff * 255:.3f}/255), "
          f"final latents max |diff| = {lat_diff:.2e}; image std {float(img.std()):.3f}, clamped {clamped:.1%}")
    if img_diff >= F64_IMAGE_TOL:
        sys.exit(f"[{name}] float32 vs float64 differ by {img_diff} >= {F64_IMAGE_TOL}: the fixture cannot judge")
    if clamped > 0.05 or float(img.std()) < 0.02:
        sys.exit(f"[{name}] the image is degenerate (std {float(img.std())}, {clamped:.1%} clamped)")

    out = os.path.join(root, "golden", name)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    save_file(tensors, os.path.join(out, "golden.safetensors"))
    save_file({"latents": tensors["latents"]}, os.path.join(out, "init_noise.safetensors"))
    Image.fromarray((img32[0] * 255).round().astype("uint8")).save(os.path.join(out, "image.png"))
    params = {k: v for k, v in case.items() if k not in ("noise",)}
    params.update(
        model=model_rel, cfg=case["guidance"] > 1.0, seed=case["seed"],
        noise="torch.randn(shape, generator=torch.Generator('cpu').manual_seed(seed), dtype=float32)",
        latent_shape=list(tensors["latents"].shape),
        f32_vs_f64_image_max_abs_diff=img_diff, f32_vs_f64_final_latents_max_abs_diff=lat_diff,
        versions=versions(),
    )
    if lora is not None:
        params["lora"] = {"file": os.path.relpath(lora["file"], root), "scale": lora["scale"]}
    with open(os.path.join(out, "params.json"), "w") as f:
        json.dump(params, f, indent=2, ensure_ascii=False)
        f.write("\n")


def make_case(transformer_cfg, vae_scale, seed, **case):
    h, w = case["height"] // vae_scale, case["width"] // vae_scale
    g = torch.Generator("cpu").manual_seed(seed)
    case["noise"] = torch.randn((1, transformer_cfg["in_channels"], h, w), generator=g, dtype=torch.float32)
    case["seed"] = seed
    case.setdefault("negative_prompt", None)
    case.setdefault("no_t5", False)
    return case


def versions():
    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "numpy": np.__version__,
    }


# ---------------------------------------------------------------------------------------------------------------
# LoRA


def make_lora(path, pipe, seed, rank_transformer=4, rank_text=2):
    """A LoRA in diffusers' SD3 key format (what StableDiffusion3Pipeline.save_lora_weights writes), by hand.

    Transformer: every joint-attention projection of every block; text encoders: q/k/v/out of every CLIP layer.
    No adapter metadata, so diffusers uses alpha = rank (scale alpha/r = 1).
    """
    g = torch.Generator("cpu").manual_seed(seed)
    tensors = {}

    def add(prefix, linear, rank, strength):
        out_f, in_f = linear.weight.shape
        a = torch.randn((rank, in_f), generator=g) / in_f**0.5
        b = torch.randn((out_f, rank), generator=g) * strength / rank**0.5
        # Relative to the layer's own weight scale, so the LoRA visibly moves the output but stays well-conditioned.
        b = b * float(linear.weight.float().std())
        tensors[f"{prefix}.lora_A.weight"] = a.to(STORE_DTYPE).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.to(STORE_DTYPE).contiguous()

    names = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    for i, block in enumerate(pipe.transformer.transformer_blocks):
        for n in names:
            mod = block.attn
            for part in n.split("."):
                mod = getattr(mod, part, None) if not part.isdigit() else mod[int(part)]
                if mod is None:
                    break
            if mod is not None:
                add(f"transformer.transformer_blocks.{i}.attn.{n}", mod, rank_transformer, 3.0)
    for enc in ["text_encoder", "text_encoder_2"]:
        for i, layer in enumerate(getattr(pipe, enc).text_model.encoder.layers):
            for n in ["q_proj", "k_proj", "v_proj", "out_proj"]:
                add(f"{enc}.text_model.encoder.layers.{i}.self_attn.{n}", getattr(layer.self_attn, n), rank_text, 3.0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, path)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer cases (tests/tokenizer.rs)

TRICKY_PROMPTS = [
    "A cat holding a sign that says hello world",
    "a photo of a really, functistaner big cat.",
    "",
    "   ",
    "Hello!!! What's up?? (it's 3:45pm) -- ok; [done] {x} <y> @home #tag $5 50% a&b a*b ~tilde~ `code` |pipe|",
    "hello! wow!",
    "Café naïve résumé ÉCOLE Straße Ångström façade",
    "e\u0301 combining accent vs é precomposed",
    "東京の猫が好きです。北京烤鸭 한국어 텍스트",
    "emoji 🐱👍🏽 👨‍👩‍👧 🏳️‍🌈 ❤️",
    "tabs\tand\nnewlines\r\nand  multiple   spaces",
    "UPPER lower MiXeD 12345 3.14159 1,000,000",
    "<|startoftext|> literal special tokens <|endoftext|> inside",
    "don't can't I'm we're they've she'll he'd it's",
    "a " * 100,
    "An extremely detailed, ultra high resolution photograph of a majestic snow leopard resting on a rocky "
    "outcrop high in the Himalayan mountains at golden hour, with dramatic clouds, soft rim lighting, shallow depth "
    "of field, intricate fur texture, piercing blue eyes, prayer flags fluttering in the distance, and a winding "
    "river far below reflecting the warm orange sky, shot on a medium format camera with an 85mm lens, f/1.8, "
    "award-winning wildlife photography, National Geographic style, 8k, hyperrealistic, cinematic composition.",
]


def tokenizer_cases(root, tiny_dirs):
    """transformers' ids, exactly as StableDiffusion3Pipeline asks for them, for tricky prompts."""
    real = os.path.join(root, "tokenizers", "clip-real")
    cases = {"versions": versions(), "clip_max_length": CLIP_MAX, "tokenizers": {}}
    toks = {
        "clip-real-l": CLIPTokenizer.from_pretrained(real),
        "clip-real-g": CLIPTokenizer.from_pretrained(real, pad_token="!"),
        "sd3-tiny/tokenizer": CLIPTokenizer.from_pretrained(tiny_dirs["tokenizer"]),
        "sd3-tiny/tokenizer_2": CLIPTokenizer.from_pretrained(tiny_dirs["tokenizer_2"]),
        "sd3-tiny/tokenizer_3": T5Tokenizer.from_pretrained(tiny_dirs["tokenizer_3"]),
    }
    for name, tok in toks.items():
        entry = {"pad_token": tok.pad_token, "pad_id": tok.pad_token_id, "cases": []}
        is_t5 = name.endswith("tokenizer_3")
        for prompt in TRICKY_PROMPTS:
            for max_len in ([256, 512, 16] if is_t5 else [CLIP_MAX]):
                ids = tok(prompt, padding="max_length", max_length=max_len, truncation=True,
                          add_special_tokens=True).input_ids
                untruncated = tok(prompt).input_ids
                entry["cases"].append({"prompt": prompt, "max_length": max_len, "ids": ids,
                                       "untruncated_len": len(untruncated)})
        cases["tokenizers"][name] = entry
    with open(os.path.join(root, "tokenizers", "cases.json"), "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False)
        f.write("\n")


# ---------------------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--open-clip-vocab", required=True,
                    help="open_clip/bpe_simple_vocab_16e6.txt.gz from the open_clip_torch wheel")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
    ap.add_argument("--only", nargs="*", help="golden cases to (re)make; default all")
    args = ap.parse_args()
    root = os.path.abspath(args.out)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    print("versions:", versions())

    # Tokenizers: the real CLIP vocabulary (tests only) and the tiny one the tiny models use.
    vocab, merges = clip_vocab_and_merges(args.open_clip_vocab)
    assert len(vocab) == 49408
    write_clip_tokenizer(os.path.join(root, "tokenizers", "clip-real"), vocab, merges, "<|endoftext|>")
    tiny_vocab, tiny_merges = clip_vocab_and_merges(args.open_clip_vocab, n_merges=1000 - 512 - 2)
    assert len(tiny_vocab) == 1000 and tiny_vocab["<|endoftext|>"] == 999
    work = tempfile.mkdtemp()
    t5_dir = os.path.join(work, "tokenizer_3")
    t5_tok = write_t5_tokenizer(t5_dir, work)
    assert len(t5_tok) == 1100, len(t5_tok)

    encoders = make_text_encoders(tiny_vocab, 1100, seed=1)
    vae = make_vae(seed=2)

    # sd3-tiny: SD3-medium style. sample_size 8 -> default 64x64 pixels (8x8 latent, 4x4 patches).
    sd3_cfg = dict(sample_size=8, pos_embed_max_size=16, qk_norm=None, dual_attention_layers=())
    sd3 = save_pipeline(os.path.join(root, "sd3-tiny"), make_transformer(3, **sd3_cfg), vae, encoders,
                        tiny_vocab, tiny_merges, t5_dir, shift=3.0)
    # sd35-tiny: SD3.5-medium style. Same text encoders and VAE (git stores identical files once).
    sd35_cfg = dict(sample_size=8, pos_embed_max_size=10, qk_norm="rms_norm", dual_attention_layers=(0,),
                    num_layers=3)
    save_pipeline(os.path.join(root, "sd35-tiny"), make_transformer(4, **sd35_cfg), vae, encoders,
                  tiny_vocab, tiny_merges, t5_dir, shift=3.0)
    tiny_dirs = {n: os.path.join(root, "sd3-tiny", n) for n in ["tokenizer", "tokenizer_2", "tokenizer_3"]}
    tokenizer_cases(root, tiny_dirs)

    lora_file = os.path.join(root, "lora", "sd3-tiny-lora.safetensors")
    make_lora(lora_file, sd3, seed=5)

    tcfg = {"in_channels": 16}
    long_prompt = TRICKY_PROMPTS[-1]
    cases = {
        "sd3-cfg": ("sd3-tiny", make_case(
            tcfg, 8, 42, prompt="A cat holding a sign that says hello world", height=64, width=64, steps=3,
            guidance=5.0, max_sequence_length=256), None),
        "sd3-nocfg": ("sd3-tiny", make_case(
            tcfg, 8, 43, prompt="a red apple on a wooden table", height=64, width=64, steps=2, guidance=1.0,
            max_sequence_length=256), None),
        "sd3-long-prompt": ("sd3-tiny", make_case(
            tcfg, 8, 44, prompt=long_prompt, negative_prompt="blurry, low quality, watermark", height=64, width=64,
            steps=2, guidance=4.0, max_sequence_length=32), None),
        "sd3-lora": ("sd3-tiny", make_case(
            tcfg, 8, 45, prompt="A cat holding a sign that says hello world", height=64, width=64, steps=2,
            guidance=5.0, max_sequence_length=64), {"file": lora_file, "scale": 0.8}),
        "sd3-no-t5": ("sd3-tiny", make_case(
            tcfg, 8, 48, prompt="A cat holding a sign that says hello world", height=64, width=64, steps=2,
            guidance=5.0, max_sequence_length=256, no_t5=True), None),
        "sd35-cfg": ("sd35-tiny", make_case(
            tcfg, 8, 46, prompt="a lighthouse on a cliff at dusk", height=96, width=64, steps=3, guidance=4.5,
            max_sequence_length=64), None),
        "sd35-slg": ("sd35-tiny", make_case(
            tcfg, 8, 47, prompt="a lighthouse on a cliff at dusk", height=96, width=64, steps=4, guidance=4.5,
            max_sequence_length=64, slg=dict(skip_guidance_layers=[1], skip_layer_guidance_scale=2.8,
                                             skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.6)), None),
    }
    for name, (model, case, lora) in cases.items():
        if args.only and name not in args.only:
            continue
        make_golden(root, name, model, case, lora)
    shutil.rmtree(work)
    print("done:", root)


if __name__ == "__main__":
    main()
