"""
Every weight on disk: this project's training checkpoints (save, resume, the final export), the official
Hugging Face directories in and out, and LoRA adapters in PEFT's format.

Where this sits in the flow: it fills the weights of every box in
    image -> ViT (SigLIP2) -> projector -> token sequence -> LLaDA -> masked diffusion
from the released files, and writes our models back in the same layout.

Every file here is written through cli.atomic_write: to `path.tmp.<pid>`, fsync, rename over `path`, so a
crash at any moment leaves the old file or the new one, never a torn one.

Our checkpoints (train.py's out/ckpt.pt): torch.save of plain containers of tensors, numbers and strings
(config, train_config, model, optimizer, step, the toy tokenizer's ranks), read back with
torch.load(weights_only=True): a file that carries anything else (a pickled object) is refused, so
nothing runs from a file we load. train.py keeps the one before the newest as ckpt.prev.pt, so a damaged
newest file can fall back to it.

Integrity: every file we write carries a manifest, sha256 of each tensor's bytes, inside the file itself
(ckpt.pt's "manifest" entry; the metadata of a safetensors header; a manifest.json written into a DCP
folder before it is renamed into place). Being part of the same atomic write, data and checksums cannot
disagree after a crash; they disagree only when bytes were damaged on disk or in a copy, and loading
then stops with one line. Model weights holding NaN or Inf are refused on load too (ours and official).

A Hugging Face directory holds config.json and either one model.safetensors or shards
model-0000k-of-0000n.safetensors with model.safetensors.index.json = {"weight_map": {key: shard file}}.
A safetensors file is  [8-byte header length][JSON header: key -> dtype, shape, byte range][raw bytes].
Before any module is built, from_pretrained reads config.json (its sizes within LIMITS) and every header alone,
and checks them against each other (layer count, widths, vocabulary): a damaged or mismatched folder costs
nothing but one line naming the file. save_pretrained's shards carry the sha256 manifest as our own files do.

Key names (ML-GSAI/LLaDA-V train/llada_v_prepare/rename_checkpoint.py,
train/llava/model/multimodal_encoder/siglip_encoder.py,
train/llava/model/multimodal_projector/builder.py::build_vision_projector,
train/llava/model/llava_arch.py::LlavaMetaModel; google/siglip2-so400m-patch14-384 config.json). Ours on the left; three
official namings on the right:
    LLaDA          original (GSAI-ML/LLaDA-8B-*)          LLaMA-style (LLaDA-V's renaming)
    embed_tokens   model.transformer.wte                  model.embed_tokens
    layers.i.      model.transformer.blocks.i.            model.layers.i.
      attn_norm      attn_norm                              input_layernorm
      q/k/v_proj     q_proj / k_proj / v_proj               self_attn.q_proj / k_proj / v_proj
      o_proj         attn_out                               self_attn.o_proj
      mlp_norm       ff_norm                                post_attention_layernorm
      gate_proj      ff_proj  (goes through SiLU)           mlp.gate_proj
      up_proj        up_proj                                mlp.up_proj
      down_proj      ff_out                                 mlp.down_proj
    norm           model.transformer.ln_f                 model.norm
    lm_head        model.transformer.ff_out               lm_head     (no such key when the embeddings are
                                                          tied: config weight_tying / tie_word_embeddings)
    SigLIP tower   vision_model.{embeddings.patch_embedding, embeddings.position_embedding,
                   encoder.layers.i.*, post_layernorm}; in LLaDA-V under model.vision_tower.vision_tower.
                   (A vision-only SiglipVisionModel saved by recent transformers drops "vision_model.".)
    projector      model.mm_projector.0 (linear_1), model.mm_projector.2 (linear_2)
    image_newline  model.image_newline
A full SigLIP checkpoint also has a text tower, logit_scale/bias and an attention-pooling head: LLaDA-V
never uses them, so they are skipped. LLaDA-V deletes the tower's last encoder layer (it reads the
penultimate layer's output), so that layer is skipped too. Everything else is strict: any missing,
unexpected or mis-shaped key is reported, all of them in one error.

Loading never holds two copies: the model is built on the meta device (no memory), then each tensor
is read shard by shard and assigned in place of its meta parameter, converted to the target dtype and
device on the way. On the CPU, with no dtype change, the tensor stays a copy-on-write view of the
memory-mapped file, so peak memory is the checkpoint's size (see --selftest_memory=1).
"""
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import asdict

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from cli import atomic_write, proc_status, write_text
from distributed import (barrier, dcp_checkpoints, full_state_dict, load_dcp, read_extra, save_dcp,
                         verify_dcp)
from model import LLaDA, LLaDAConfig, LLaDAV, LLaDAVConfig, LoRALinear, add_lora
from tokenizer import LLADA_MASK_ID, MAX_VOCAB, Tokenizer, config_mask_id, get_tokenizer
from vision import MODES, VisionConfig, VisionTower, grid_pinpoints

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
LAYOUTS = ("original", "llama")  # the two LLaDA namings
LLADA_V_VISION = "model.vision_tower.vision_tower."

# our block parameter -> (original name, LLaMA-style name)
_BLOCK = {"attn_norm": ("attn_norm", "input_layernorm"), "q_proj": ("q_proj", "self_attn.q_proj"),
          "k_proj": ("k_proj", "self_attn.k_proj"), "v_proj": ("v_proj", "self_attn.v_proj"),
          "o_proj": ("attn_out", "self_attn.o_proj"), "mlp_norm": ("ff_norm", "post_attention_layernorm"),
          "gate_proj": ("ff_proj", "mlp.gate_proj"), "up_proj": ("up_proj", "mlp.up_proj"),
          "down_proj": ("ff_out", "mlp.down_proj")}
_TOP = {"embed_tokens": ("model.transformer.wte", "model.embed_tokens"),
        "norm": ("model.transformer.ln_f", "model.norm"),
        "lm_head": ("model.transformer.ff_out", "lm_head")}
# keys of a SigLIP checkpoint that LLaDA-V does not use (besides the deleted last encoder layer)
_SIGLIP_UNUSED = re.compile(r"(text_model\.|logit_scale|logit_bias|(vision_model\.)?head\.)")


# ----------------------------------------------------------------------------------------------
# This project's checkpoints (train.py's ckpt.pt)

def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype, bf16 included: viewed as uint8, nothing converted)."""
    t = t.detach().contiguous().cpu().reshape(-1)
    # hashlib reads the array's buffer in place: no copy (a loader that verifies must not hold two)
    return hashlib.sha256(t.view(torch.uint8).numpy() if t.numel() else b"").hexdigest()


def _tensors(obj, prefix=""):
    """Every tensor in nested dicts / lists, as (dotted path, tensor): what a manifest covers."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i))


def tensor_manifest(state) -> dict:
    """{path: sha256} of every tensor in `state`. Stored inside the file it describes (a "manifest"
    entry of ckpt.pt, the metadata of a safetensors header), so the data and its checksums are written
    by the same atomic rename and can never disagree because of a crash; only damage makes them differ."""
    return {k: tensor_sha256(v) for k, v in _tensors(state)}


def check_manifest(state, manifest: dict, source: str):
    """Recompute every tensor's sha256 and compare with `manifest`: a flipped bit, a bad copy or a
    half-written download is refused here instead of silently lowering accuracy."""
    got = tensor_manifest(state)
    bad = sorted(k for k in set(got) | set(manifest) if got.get(k) != manifest.get(k))
    if bad:
        raise ValueError(f"{source} is corrupt: {len(bad)} tensor(s) fail their sha256 checksum "
                         f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); use an intact copy")


def all_finite(t: torch.Tensor, chunk: int = 1 << 16) -> bool:
    """torch.isfinite(t).all(), 65,536 elements at a time: isfinite makes temporaries as large as
    what it checks (abs, compare), and a loader that holds one copy of the weights must not briefly
    hold two; 64K elements keep them at a few hundred KB."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(piece).all()) for piece in flat.split(chunk))


def check_finite(state: dict, source: str):
    """Refuse weights holding NaN or Inf: such a model answers garbage (e.g. all NUL tokens) with exit 0."""
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not all_finite(v)]
    if bad:
        raise ValueError(f"{source} holds non-finite weights (NaN or Inf) in {len(bad)} tensor(s): "
                         f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; the run that wrote it diverged")


def save_checkpoint(path, state: dict, keep_prev: bool = False):
    """Atomic torch.save of `state` (plain containers of tensors, numbers and strings only), with a
    "manifest" entry {tensor path: sha256} that load_state_file verifies.
    keep_prev: the file being replaced stays as <name>.prev.pt, a fallback should the new one later turn
    out damaged. It is hard-linked there before the rename, so `path` exists at every moment of a save."""
    state = {k: v for k, v in state.items() if k != "manifest"}
    state["manifest"] = tensor_manifest(state)

    def w(tmp):
        with open(tmp, "wb") as f:
            torch.save(state, f)
        prev, link = prev_path(path), f"{prev_path(path)}.tmp.{os.getpid()}"
        # a kill just after the last rotation leaves prev and path one file (two names, one inode): then
        # it is already in place, and a rename between two names of one file would do nothing at all
        if keep_prev and os.path.exists(path) and not (os.path.exists(prev) and os.path.samefile(path, prev)):
            try:
                os.link(path, link)          # a second name for the current file (no copy) ...
                os.replace(link, prev)       # ... atomically becomes the previous checkpoint
            except OSError:                  # no hard links here (e.g. FAT): rename; a resume in the
                os.replace(path, prev)       # moment until the new file lands falls back to prev
            finally:                         # Ctrl-C between the two: no second name left behind
                if os.path.lexists(link):
                    os.remove(link)
    atomic_write(path, w)


def prev_path(path) -> str:
    """out/ckpt.pt -> out/ckpt.prev.pt: the checkpoint before the newest one."""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.prev{ext}"


def save_safetensors(path, tensors: dict):
    """Atomic safetensors write whose header metadata carries {key: sha256} of every tensor (the manifest)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": "pt", "sha256": json.dumps(tensor_manifest(tensors))}

    def write(tmp):
        save_file(tensors, tmp, metadata=meta)
        _fix_metadata_order(tmp)
    atomic_write(path, write)


def _fix_metadata_order(file):
    """The safetensors library writes __metadata__ from a Rust HashMap, whose order changes from call to call:
    rewrite it sorted, in place (same content, so the same length), so that one model saves to the same bytes."""
    with open(file, "rb+") as fh:
        n = int.from_bytes(fh.read(8), "little")
        h = json.loads(fh.read(n))
        h["__metadata__"] = dict(sorted(h["__metadata__"].items()))
        text = json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:  # serde_json and json.dumps agree on these ASCII keys and values
            fh.seek(8)
            fh.write(text + b" " * (n - len(text)))  # safetensors pads its header with spaces too


def load_state_file(path, device="cpu") -> dict:
    """A ckpt.pt (torch.load with weights_only=True: no pickled objects, nothing runs) or a
    .safetensors file -> its dict. One-line errors for what is not such a file, for a file whose
    tensors fail the checksums stored with them, and for non-finite model weights."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; train one with `python train.py` "
                                f"(it writes out/ckpt.pt) or pass --checkpoint=<path>")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(path, device=str(device))
        except Exception as e:
            raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
        if "sha256" in meta:  # written by this project; official files carry no manifest
            check_manifest(state, json.loads(meta["sha256"]), path)
        check_finite(state, path)
        return state
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a checkpoint written by train.py, or it holds more than tensors, "
                         f"numbers and strings (refused: loading it could run code); "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint written by train.py (it holds a {type(ckpt).__name__})")
    if isinstance(ckpt.get("manifest"), dict):  # checkpoints from before manifests load unverified
        check_manifest({k: v for k, v in ckpt.items() if k != "manifest"}, ckpt["manifest"], path)
    if isinstance(ckpt.get("model"), dict):
        check_finite(ckpt["model"], path)
    return ckpt


def load_checkpoint(path, device="cpu"):
    """-> (model, tokenizer, checkpoint dict). The model is rebuilt from the config stored in the
    checkpoint, the tokenizer from the one stored beside it (or the file its config names)."""
    ckpt = load_state_file(path, device)
    try:
        cfg = LLaDAVConfig.from_dict(ckpt["config"])
    except Exception as e:
        raise ValueError(f"{path} is not a checkpoint written by train.py ({type(e).__name__}: {e})") from None
    model = LLaDAV(cfg).to(device)
    tc = ckpt.get("train_config") or {}
    if tc.get("lora_rank"):  # a train.py --lora_rank run's checkpoint: the base and its adapters
        add_lora(model, tc["lora_rank"], tc["lora_alpha"], tc["lora_targets"], tc["lora_dropout"])
    load_state(model, ckpt["model"], path)
    if "tokenizer" in ckpt:
        tok = Tokenizer.from_dict(ckpt["tokenizer"])
    elif cfg.tokenizer != "toy":
        tok = get_tokenizer(cfg.tokenizer, config_mask_id(cfg.lm.mask_id))
    else:  # a toy checkpoint of the first editions, before the tokenizer travelled with the weights
        raise ValueError(f"{path} carries no tokenizer (an early train.py wrote it); train it again with this one")
    check_tokenizer_fits(tok, model, f"{path} (its tokenizer)")
    return model, tok, ckpt


def check_tokenizer_fits(tok: Tokenizer, model: nn.Module, source: str):
    """Refuse a tokenizer whose ids reach past the model's vocabulary (a two-million-id tokenizer.json for a
    512-id model): the embedding lookup would fail on the first such id, or, on a GPU, read out of bounds.
    A smaller tokenizer is fine (LLaDA's embedding is padded to 126,464 rows for 126,349 ids). A model
    without a language model (a bare ViT) has nothing to check."""
    lm = model.llm if isinstance(model, LLaDAV) else model
    if not isinstance(lm, LLaDA):
        return
    top = max(tok.vocab_size, tok.mask_id + 1)  # ids 0..top-1 can reach the embedding
    if top > lm.cfg.vocab_size:
        raise ValueError(f"{source}: the tokenizer has ids up to {top - 1:,}, but the model's vocabulary has "
                         f"{lm.cfg.vocab_size:,} ids (0..{lm.cfg.vocab_size - 1:,}); pass the tokenizer that came "
                         f"with the model (--tokenizer=<its tokenizer.json or folder>)")


def load_state(model: nn.Module, state: dict, source="checkpoint"):
    """load_state_dict with one error that lists every missing, unexpected and mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{source} does not fit this model config (was it trained with another preset or "
                         f"overrides? use the same ones): missing {missing}, unexpected {unexpected}, "
                         f"mis-shaped {shapes}")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# Key names

def llada_key(name: str, layout: str) -> str:
    """Our LLaDA parameter name (e.g. 'layers.3.gate_proj.weight') -> the official one."""
    j = LAYOUTS.index(layout)
    mod, _, leaf = name.rpartition(".")
    if mod in _TOP:
        return f"{_TOP[mod][j]}.{leaf}"
    i, part = re.fullmatch(r"layers\.(\d+)\.(\w+)", mod).groups()
    return f"{('model.transformer.blocks', 'model.layers')[j]}.{i}.{_BLOCK[part][j]}.{leaf}"


def vision_key(name: str) -> str:
    """Our VisionTower parameter name -> SigLIP's (HF SiglipVisionModel) name."""
    if name.startswith(("patch_embedding.", "position_embedding.")):
        return "vision_model.embeddings." + name
    if name.startswith("layers."):
        return "vision_model.encoder." + name
    return "vision_model." + name  # post_layernorm


def official_names(model: nn.Module, layout: str = "llama") -> dict:
    """{our state-dict name: official key} for a LLaDA (either layout), a VisionTower or a LLaDAV."""
    return {name: official_name(model, name, layout) for name in model.state_dict()}


def official_name(model: nn.Module, name: str, layout: str = "llama") -> str:
    """The official key of one of our parameter names. A LoRA factor (model.LoRALinear's X.lora_A.weight)
    is named after its layer, as PEFT names it: <official key of X.weight, less "weight">lora_A.weight."""
    if ".lora_" in name:
        base, _, factor = name.partition(".lora_")
        return official_name(model, base + ".weight", layout)[:-len("weight")] + "lora_" + factor
    if isinstance(model, LLaDA):
        return llada_key(name, layout)
    if isinstance(model, VisionTower):
        return vision_key(name)
    if name.startswith("llm."):
        return llada_key(name[4:], "llama")  # LLaDA-V always uses the LLaMA-style names
    if name.startswith("vision."):
        return LLADA_V_VISION + vision_key(name[7:])
    if name.startswith("projector."):
        return "model.mm_projector." + name[10:].replace("linear_1", "0").replace("linear_2", "2")
    if name == "image_newline":
        return "model.image_newline"
    raise KeyError(f"no official name for parameter {name}")


def _skipped(key: str, n_vision_layers: int) -> bool:
    """Keys the official models read but do not use: SigLIP's text tower and head, the last ViT layer."""
    if not n_vision_layers:  # a language model skips nothing
        return False
    m = re.search(r"(?:^|vision_model\.)encoder\.layers\.(\d+)\.", key)
    return bool(_SIGLIP_UNUSED.match(key)) or (m is not None and int(m[1]) == n_vision_layers - 1)


# ----------------------------------------------------------------------------------------------
# config.json <-> our configs

def _require(c, key, ok, what):
    if key in c and c[key] not in ok:
        raise ValueError(f"config.json has {key}={c[key]!r}, but this code implements only {what}")


# Bounds on a config.json's sizes, checked before any module is built: a typo such as num_hidden_layers=100000
# would otherwise spend minutes building layers on the meta device before anything else is looked at.
# Generous: LLaDA-8B is 32 layers x 4096 wide (32 heads, MLP 12,288, 126,464 ids), SigLIP so400m 27 x 1152
# (MLP 4304) at 384 px; each bound is 16x or more above the largest released model of its kind.
LIMITS = {"layers": 1024, "heads": 1024, "width": 1 << 16, "mlp": 1 << 18, "vocab": MAX_VOCAB, "context": 1 << 24,
          "image": 1 << 13}
_REQUIRED = object()


def _size(c, key, limit, default=_REQUIRED, lo=1):
    """c[key] as an integer in lo..LIMITS[limit]; absent (or null) gives `default`, or an error naming the key."""
    v = c.get(key)
    if v is None:
        if default is _REQUIRED:
            raise ValueError(f"config.json lacks {key}, which the model's shape needs")
        return default
    hi = LIMITS[limit]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"config.json has {key}={v!r}, not an integer; fix the file")
    if not lo <= v <= hi:
        raise ValueError(f"config.json has {key}={v:,}, outside {lo}..{hi:,} (the sane range for a model of this "
                         f"kind); fix the file")
    return v


def llada_config_from_hf(c: dict) -> LLaDAConfig:
    """Either LLaDA config.json: the original OLMo-style one (d_model, n_layers, ...) or the LLaMA-style one.
    Also read: key/value heads (n_kv_heads / num_key_value_heads; absent or null = n_heads), tied embeddings
    (weight_tying / tie_word_embeddings; absent = untied, as LLaDA), the [MASK] id (mask_token_id) and the
    RoPE precision: the original code rotates in fp32 (rope_full_precision, true in LLaDA-8B's config), the
    LLaMA-style port (LLaDA-V) in the activation dtype; an explicit rope_full_precision wins."""
    _require(c, "rope_scaling", (None,), "RoPE without scaling")
    for k in ("include_bias", "attention_bias", "mlp_bias"):
        _require(c, k, (False,), f"{k}=false (no biases)")
    _require(c, "activation_type", ("silu",), "SwiGLU with silu")
    _require(c, "hidden_act", ("silu",), "SwiGLU with silu")
    rope = c.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling here
    _require(rope, "rope_type", ("default",), "RoPE without scaling")
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    shared = dict(rope_theta=theta, norm_eps=c.get("rms_norm_eps", 1e-5), mask_id=c.get("mask_token_id", LLADA_MASK_ID))
    if "d_model" in c:  # original
        names = ("embedding_size" if c.get("embedding_size") else "vocab_size", "d_model", "n_layers", "n_heads",
                 "n_kv_heads", "mlp_hidden_size", "max_sequence_length", "weight_tying", True)
    elif "hidden_size" in c:  # LLaMA-style
        names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "max_position_embeddings", "tie_word_embeddings", False)
    else:
        raise ValueError("config.json is not a LLaDA config (no d_model or hidden_size); point at the model's directory")
    V, D, L, H, KV, M, ctx, tie, fp32 = names  # the field names in this config's naming; fp32: RoPE's default
    cfg = LLaDAConfig(vocab_size=_size(c, V, "vocab"), d_model=_size(c, D, "width"), n_layers=_size(c, L, "layers"),
                      n_heads=_size(c, H, "heads"), n_kv_heads=_size(c, KV, "heads", 0, lo=0),
                      mlp_hidden=_size(c, M, "mlp"), max_seq_len=_size(c, ctx, "context", 4096),
                      tie_embeddings=bool(c.get(tie, False)), rope_fp32=bool(c.get("rope_full_precision", fp32)),
                      **shared)
    if cfg.d_model % cfg.n_heads or cfg.head_dim % 2:
        raise ValueError(f"config.json: {D}={cfg.d_model} does not split into {H}={cfg.n_heads} heads of even size")
    if cfg.n_heads % cfg.kv_heads:
        raise ValueError(f"config.json: num_key_value_heads / n_kv_heads = {cfg.n_kv_heads} does not divide the "
                         f"{cfg.n_heads} attention heads (grouped-query attention needs a divisor)")
    if cfg.n_kv_heads == cfg.n_heads:
        cfg.n_kv_heads = 0  # plain multi-head attention, stored as the default so that configs compare equal
    return cfg


def llada_config_to_hf(cfg: LLaDAConfig, layout: str) -> dict:
    """Our LLaDAConfig -> config.json in either naming. rope_full_precision is written in both (the LLaMA-style
    readers ignore it) so that save -> load gives back the same RoPE precision."""
    ids = {"bos_token_id": 126080, "eos_token_id": 126081, "pad_token_id": 126081, "mask_token_id": cfg.mask_id}
    if layout == "original":
        return {"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": cfg.d_model,
                "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.kv_heads,
                "mlp_hidden_size": cfg.mlp_hidden, "mlp_ratio": 4, "vocab_size": cfg.vocab_size,
                "embedding_size": cfg.vocab_size, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
                "max_sequence_length": cfg.max_seq_len, "weight_tying": cfg.tie_embeddings, "include_bias": False,
                "activation_type": "silu", "layer_norm_type": "rms", "block_type": "llama",
                "rope_full_precision": cfg.rope_fp32, **ids}
    return {"architectures": ["LLaDAModelLM"], "model_type": "llada", "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads, "intermediate_size": cfg.mlp_hidden, "vocab_size": cfg.vocab_size,
            "rope_theta": cfg.rope_theta, "rope_scaling": None, "rms_norm_eps": cfg.norm_eps,
            "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
            "attention_bias": False, "hidden_act": "silu", "rope_full_precision": cfg.rope_fp32, **ids}


def vision_config_from_hf(c: dict) -> VisionConfig:
    """A SigLIP config.json (full: {"vision_config": {...}}, or vision-only) -> VisionConfig."""
    c = c.get("vision_config", c)
    _require(c, "hidden_act", ("gelu_pytorch_tanh",), "SigLIP's gelu_pytorch_tanh")
    d = VisionConfig()  # SigLIP's class defaults are the so400m/14-384 shapes, which HF configs omit
    cfg = VisionConfig(image_size=_size(c, "image_size", "image", d.image_size),
                       patch_size=_size(c, "patch_size", "image", d.patch_size),
                       d_model=_size(c, "hidden_size", "width", d.d_model),
                       n_layers=_size(c, "num_hidden_layers", "layers", d.n_layers, lo=2),  # the last is dropped
                       n_heads=_size(c, "num_attention_heads", "heads", d.n_heads),
                       mlp_hidden=_size(c, "intermediate_size", "mlp", d.mlp_hidden),
                       ln_eps=c.get("layer_norm_eps", d.ln_eps))
    if cfg.patch_size > cfg.image_size:
        raise ValueError(f"config.json: the vision tower's patch_size={cfg.patch_size} exceeds its image_size={cfg.image_size}")
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"config.json: the vision tower's hidden_size={cfg.d_model} does not split into "
                         f"num_attention_heads={cfg.n_heads} heads")
    return cfg


def vision_config_to_hf(cfg: VisionConfig) -> dict:
    return {"hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "layer_norm_eps": cfg.ln_eps, "hidden_act": "gelu_pytorch_tanh", "num_channels": 3}


def is_llada_v(c: dict) -> bool:
    return "mm_hidden_size" in c or "mm_vision_tower" in c


def llada_v_config_from_hf(c: dict) -> LLaDAVConfig:
    """LLaDA-V's config.json: the LLaMA-style LLaDA fields plus LLaVA's mm_* fields. The released config
    names the SigLIP repo but not its shapes; without a vision_config the so400m defaults apply."""
    _require(c, "mm_projector_type", ("mlp2x_gelu",), "the mlp2x_gelu projector")
    _require(c, "image_aspect_ratio", MODES, f"the image modes {MODES}")
    vision = vision_config_from_hf(c["vision_config"]) if "vision_config" in c else VisionConfig()
    pins = c.get("image_grid_pinpoints")
    if isinstance(pins, str):  # the training scripts' "(1x1),...,(6x6)", stored as given
        pins = [(int(a) * vision.image_size, int(b) * vision.image_size) for a, b in re.findall(r"\((\d+)x(\d+)\)", pins)]
        pins = pins if len(pins) != 2 else grid_pinpoints(vision.image_size, pins[0][0] // vision.image_size,
                                                           pins[1][0] // vision.image_size)
    if pins is not None and [tuple(p) for p in pins] != grid_pinpoints(vision.image_size):
        raise ValueError(f"config.json: image_grid_pinpoints {c['image_grid_pinpoints']} differ from LLaDA-V's "
                         f"(1x1)..(6x6) grid, the only one vision.py implements")
    if c.get("mm_hidden_size", vision.d_model) != vision.d_model:
        raise ValueError(f"config.json: mm_hidden_size {c['mm_hidden_size']} != vision width {vision.d_model}")
    return LLaDAVConfig(lm=llada_config_from_hf(c), vision=vision, tokenizer="llada",
                        image_aspect_ratio=c.get("image_aspect_ratio", "square"),
                        mm_patch_merge_type=c.get("mm_patch_merge_type", "flat"))


def llada_v_config_to_hf(cfg: LLaDAVConfig) -> dict:
    c = llada_config_to_hf(cfg.lm, "llama")
    c.update(architectures=["LlavaLLaDAModelLM"], model_type="llava_llada", mm_hidden_size=cfg.vision.d_model,
             mm_projector_type="mlp2x_gelu", mm_vision_tower="google/siglip2-so400m-patch14-384",
             mm_vision_select_layer=-2, image_aspect_ratio=cfg.image_aspect_ratio,
             mm_patch_merge_type=cfg.mm_patch_merge_type,
             image_grid_pinpoints="(1x1),...,(6x6)", vision_config=vision_config_to_hf(cfg.vision))
    return c


# ----------------------------------------------------------------------------------------------
# Reading

def read_config(path) -> dict:
    """path/config.json as a dict; one error naming the file when it is absent, not JSON or not an object."""
    f = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{f} does not exist; pass a Hugging Face model directory (config.json + "
                                f"*.safetensors), e.g. a download of GSAI-ML/LLaDA-V")
    try:
        with open(f, encoding="utf-8") as fh:
            c = json.load(fh)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{f} is not valid JSON ({type(e).__name__}: {e}); download it again") from None
    if not isinstance(c, dict):
        raise ValueError(f"{f} holds a JSON {type(c).__name__}, not an object of model settings; download it again")
    return c


def hf_config(path):
    """path/config.json -> (config, model class, ViT layers in the checkpoint), the model kind chosen from the
    fields: LLaDA-V (mm_* fields), SigLIP (vision_config, or model_type siglip*), else LLaDA. Every problem
    with the file is one ValueError that names it."""
    path = os.fspath(path)
    c, f = read_config(path), os.path.join(path, "config.json")
    if isinstance(c.get("lm"), dict) and isinstance(c.get("vision"), dict):  # train.py's LLaDAVConfig.to_dict()
        pt = os.path.join(path, "ckpt.pt")
        raise ValueError(f"{path} is a train.py run folder in this project's own format (its config.json holds "
                         f"our LLaDAVConfig), not a Hugging Face model folder; pass "
                         f"{pt if os.path.exists(pt) else os.path.join(path, SINGLE)} instead")
    try:
        if is_llada_v(c):
            cfg = llada_v_config_from_hf(c)
            return cfg, LLaDAV, cfg.vision.n_layers
        if "vision_config" in c or str(c.get("model_type", "")).startswith("siglip"):
            cfg = vision_config_from_hf(c)
            return cfg, VisionTower, cfg.n_layers
        return llada_config_from_hf(c), LLaDA, 0
    except ValueError as e:  # the readers' messages start "config.json ...": name the file instead
        msg = str(e)
        raise ValueError(f + msg[len("config.json"):] if msg.startswith("config.json") else f"{f}: {msg}") from None
    except (KeyError, TypeError, AttributeError) as e:  # a field of the wrong kind (a list for an object, ...)
        raise ValueError(f"{f} is malformed ({type(e).__name__}: {e}); download it again") from None


# safetensors dtypes -> bytes per element. A file is [8-byte little-endian header length n][n bytes of JSON:
# key -> {"dtype", "shape", "data_offsets": [begin, end) within the data}][the data].
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # what a weight may be stored as here
MAX_HEADER = 100_000_000  # the safetensors library's own limit on n


def read_header(file) -> tuple[dict, dict]:
    """The header of one safetensors file, read without touching its data: -> ({key: (dtype, shape)}, metadata).
    Checked as the safetensors library checks on open, but as one ValueError naming the file: a header length
    beyond the file (truncated, garbage), a header that is not a JSON object, an entry whose byte range does not
    hold its dtype x shape, ranges that overlap or leave gaps, a data section longer or shorter than they cover."""
    file = os.fspath(file)

    def bad(what):
        raise ValueError(f"{file} is not a readable safetensors file: {what}; download it again")

    size = os.path.getsize(file)
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            bad(f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER):
            bad(f"its header length {n:,} exceeds the file's {size:,} bytes (a truncated or non-safetensors file)")
        try:
            h = json.loads(fh.read(n))
        except ValueError:
            h = None
    if not isinstance(h, dict):
        bad("its header is not a JSON object")
    meta = h.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        bad("its __metadata__ is not an object")
    info, spans = {}, []
    for k, v in h.items():
        try:
            dtype, shape, (a, b) = v["dtype"], v["shape"], v["data_offsets"]
            ok = dtype in DTYPE_BYTES and all(type(x) is int and x >= 0 for x in [*shape, a, b])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            bad(f"the header entry of {k!r} is malformed ({v!r:.100})")
        if b - a != math.prod(shape) * DTYPE_BYTES[dtype]:
            bad(f"{k!r} spans bytes {a}..{b} of the data, but {dtype} x {tuple(shape)} needs "
                f"{math.prod(shape) * DTYPE_BYTES[dtype]:,}")
        info[k] = (dtype, tuple(shape))
        spans.append((a, b, k))
    end = 0
    for a, b, k in sorted(spans):  # the tensors tile the data section exactly, in offset order
        if a != end:
            bad(f"{k!r} starts at byte {a:,} of the data where the previous tensor ends at {end:,} "
                f"({'overlapping' if a < end else 'gapped'} offsets)")
        end = b
    if end != size - 8 - n:
        bad(f"the header describes {end:,} bytes of data, the file holds {size - 8 - n:,} (a truncated or padded file)")
    return info, meta


def _within(name: str) -> bool:
    """name is a relative path that stays inside folder, by its text: no absolute path, no "..". (Lexical on
    purpose: a Hugging Face cache folder holds symlinks into ../../blobs, which resolving them would refuse.)"""
    return name != "" and not os.path.isabs(name) and os.path.normpath(name).split(os.sep)[0] != ".."


def checkpoint_index(path) -> dict:
    """{official key: safetensors file path} from the index, or from the one model.safetensors (its header)."""
    path = os.fspath(path)
    idx = os.path.join(path, INDEX)
    if os.path.isfile(idx):
        try:
            with open(idx, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
            ok = isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())
        except (ValueError, KeyError, TypeError):  # not JSON, no weight_map, not an object
            ok = False
        if not ok:
            raise ValueError(f"{idx} is not a shard index ({{\"weight_map\": {{key: shard file}}}}); download it again")
        outside = sorted({f for f in weight_map.values() if not _within(f)})
        if outside:  # an index must not make us read (or hash) files elsewhere on the disk
            raise ValueError(f"{idx} names shards outside the model folder: {outside[:3]}; a shard is a file "
                             f"inside {path} (a relative path without ..); download the index again")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if absent:
            raise FileNotFoundError(f"{path}: the index names shards that are not there: {absent}; download them")
        return {k: os.path.join(path, f) for k, f in weight_map.items()}
    single = os.path.join(path, SINGLE)
    if os.path.isfile(single):
        return {k: single for k in read_header(single)[0]}
    raise FileNotFoundError(f"{path} has neither {INDEX} nor {SINGLE}; download the repo's *.safetensors files")


def read_headers(path) -> tuple[dict, dict, dict]:
    """-> (index {key: file}, {key: (dtype, shape)} of the keys the index places in that file, {file: metadata}),
    from the headers alone: every shard's header is read and checked, no tensor data is."""
    index = checkpoint_index(path)
    info, meta = {}, {}
    for file in sorted(set(index.values())):
        got, meta[file] = read_header(file)
        info.update({k: v for k, v in got.items() if index.get(k) == file})
    return index, info, meta


def check_config_against_weights(cfg, info: dict, path, layout: str = "llama", vision_prefix: str = "vision_model."):
    """Before a model is built: the sizes in config.json against the tensor shapes in the safetensors headers
    (info: {key: (dtype, shape)}) -> one ValueError naming every disagreement: the number of layers, and the
    shapes that vocab_size, the width, the key/value heads and the MLP size imply for the embeddings and the
    first layer. (Absent keys are left to load_weights, which lists them all.)"""
    problems = []

    def compare(name_of, want, layer_key, counts, what):
        """name_of: our parameter name -> official key; want: {our name: shape}; counts: allowed layer counts."""
        rx = re.compile(re.escape(name_of(layer_key.format(987654321))).replace("987654321", r"(\d+)"))
        held = {int(m[1]) for m in map(rx.fullmatch, info) if m}  # the layer numbers in the files
        if held and not any(held == set(range(n)) for n in counts):
            problems.append(f"config.json gives the {what} {counts[0]} layers, the weights hold {len(held)} "
                            f"(numbered {min(held)}..{max(held)})")
        problems.extend(f"{name_of(k)} is {info[name_of(k)][1]} in the weights, config.json implies {shape}"
                        for k, shape in want.items() if name_of(k) in info and info[name_of(k)][1] != shape)

    def lm(c, name_of):
        want = {"embed_tokens.weight": (c.vocab_size, c.d_model), "layers.0.q_proj.weight": (c.d_model, c.d_model),
                "layers.0.k_proj.weight": (c.kv_heads * c.head_dim, c.d_model),
                "layers.0.gate_proj.weight": (c.mlp_hidden, c.d_model)}
        compare(name_of, want, "layers.{}.q_proj.weight", (c.n_layers,), "language model")

    def vision(c, name_of):
        want = {"patch_embedding.weight": (c.d_model, 3, c.patch_size, c.patch_size),
                "position_embedding.weight": (c.n_patches, c.d_model), "layers.0.mlp.fc1.weight": (c.mlp_hidden, c.d_model)}
        # a checkpoint holds all n_layers, or n_layers - 1 when the unused last one was deleted
        compare(name_of, want, "layers.{}.self_attn.q_proj.weight", (c.n_layers, c.n_layers - 1), "vision tower")

    if isinstance(cfg, LLaDAVConfig):
        lm(cfg.lm, lambda n: llada_key(n, "llama"))
        vision(cfg.vision, lambda n: LLADA_V_VISION + vision_key(n))
    elif isinstance(cfg, VisionConfig):
        strip = len("vision_model.") - len(vision_prefix)  # a SiglipVisionModel saved without the prefix
        vision(cfg, lambda n: vision_key(n)[strip:])
    else:
        lm(cfg, lambda n: llada_key(n, layout))
    if problems:
        raise ValueError(f"{os.fspath(path)}: config.json does not match the safetensors weights: "
                         f"{'; '.join(problems)}; is config.json the one that came with these weights?")


def tied_head_key(model: nn.Module, layout: str = "llama") -> dict:
    """{official head key: official embedding key} for a LLaDA / LLaDAV with tied embeddings, else {}. A tied
    checkpoint usually has no head key (transformers drops it on save); if it has one, it must equal E."""
    lm = model.llm if isinstance(model, LLaDAV) else model
    if not isinstance(lm, LLaDA) or not lm.cfg.tie_embeddings:
        return {}
    j = LAYOUTS.index("llama" if isinstance(model, LLaDAV) else layout)
    return {_TOP["lm_head"][j] + ".weight": _TOP["embed_tokens"][j] + ".weight"}


def load_weights(model: nn.Module, path, names: dict, n_vision_layers: int = 0, dtype=None, device="cpu",
                 tied: dict | None = None):
    """Fill `model` (built on the meta device) from the safetensors files of `path`. names: {ours: official}.
    tied: {head key: embedding key} (tied_head_key) may be present in the files, equal to the embedding.
    Checks every key, shape and dtype first (from the headers only) and raises one error listing every problem;
    then, shard by shard, the sha256 of each tensor where the file carries them (save_pretrained's files do;
    official ones do not), and NaN / Inf."""
    tied = tied or {}
    path = os.fspath(path)
    index, info, meta = read_headers(path)
    own = model.state_dict()
    by_official = {off: ours for ours, off in names.items()}
    shapes = {k: shape for k, (_, shape) in info.items()}
    missing = sorted(k for k in by_official if k not in shapes)
    unexpected = sorted(k for k in shapes if k not in by_official and k not in tied and not _skipped(k, n_vision_layers))
    bad = [f"{k}: checkpoint {shapes[k]} vs model {tuple(own[by_official[k]].shape)}"
           for k in sorted(shapes) if k in by_official and shapes[k] != tuple(own[by_official[k]].shape)]
    if missing or unexpected or bad:
        raise ValueError(f"{path} does not match the model built from its config.json: "
                         f"{len(missing)} missing {missing}, {len(unexpected)} unexpected {unexpected}, "
                         f"{len(bad)} mis-shaped {bad}")
    not_float = [f"{k} ({info[k][0]})" for k in sorted(info) if (k in by_official or k in tied)
                 and info[k][0] not in FLOAT_DTYPES]
    if not_float:
        raise ValueError(f"{path}: {len(not_float)} weight(s) are not floating point: {', '.join(not_float[:3])}"
                         f"{' ...' if len(not_float) > 3 else ''}; a weight is stored as one of {', '.join(FLOAT_DTYPES)}")
    nonfinite = []
    for file in sorted(set(index.values())):  # shard by shard
        with _open(file) as f:
            if "sha256" in meta[file]:  # written by save_pretrained: verify before anything is used
                try:
                    manifest = json.loads(meta[file]["sha256"])
                except ValueError:
                    raise ValueError(f"{file}: the sha256 checksums in its metadata are not JSON; download it again") from None
                # views of the memory-mapped file, hashed one at a time: nothing is held twice
                check_manifest({k: f.get_tensor(k) for k in f.keys()}, manifest, file)
            for k in f.keys():
                if k in by_official and index[k] == file:
                    t = f.get_tensor(k)  # a view of the memory-mapped file: nothing is read yet
                    # to the device first, then convert there (a GPU converts faster; no CPU-side copy)
                    t = t.to(device)
                    if t.is_floating_point() and dtype is not None:
                        t = t.to(dtype)
                    if t.is_floating_point() and not all_finite(t):
                        nonfinite.append(k)  # NaN / Inf weights: refused below, all named at once
                    _assign(model, by_official[k], t)
    if nonfinite:
        raise ValueError(f"{path} holds non-finite weights (NaN or Inf) in {len(nonfinite)} tensor(s): "
                         f"{', '.join(nonfinite[:3])}{' ...' if len(nonfinite) > 3 else ''}; download it again")
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"parameters/buffers not filled by the checkpoint: {left}")
    for head, emb in tied.items():  # a tied model has one matrix: a stored head must be that same matrix
        if head in index:
            with _open(index[head]) as f, _open(index[emb]) as g:
                if not torch.equal(f.get_tensor(head), g.get_tensor(emb)):
                    raise ValueError(f"{path}: config.json ties the embeddings, but {head} differs from "
                                     f"{emb}; set tie_word_embeddings/weight_tying to false to load them apart")
    return model


def _open(file):
    """safe_open, whose errors (SafetensorError, OSError) become one line naming the file. read_header has
    already checked what the library checks on open, so this is the guard for what is left (a read error)."""
    try:
        return safe_open(file, framework="pt")
    except Exception as e:
        raise ValueError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e}); download it again") from None


def _assign(model, name, t):
    """Put tensor t in place of parameter `name` (a meta tensor): no copy, no second allocation."""
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    old = mod._parameters[leaf]
    mod._parameters[leaf] = nn.Parameter(t, requires_grad=old.requires_grad)


def from_pretrained(path, dtype=None, device="cpu", vision_path=None):
    """Load a Hugging Face directory as LLaDAV (LLaDA-V: config.json with mm_* fields), LLaDA (either
    key layout) or VisionTower (a SigLIP checkpoint), chosen from config.json. dtype None keeps the
    checkpoint's. With vision_path (a SigLIP dir), path is a LLaDA LM and the result is a LLaDAV whose
    projector is freshly initialised: the start of LLaDA-V's stage-1 training."""
    if vision_path is not None:
        lm = from_pretrained(path, dtype, device)
        vt = from_pretrained(vision_path, dtype, device)
        if not (isinstance(lm, LLaDA) and isinstance(vt, VisionTower)):
            raise ValueError("from_pretrained(llm_dir, vision_path=siglip_dir) needs a LLaDA dir and a SigLIP dir")
        lm.cfg.rope_fp32 = False  # LLaDA-V runs the LM through its LLaMA-style port: RoPE in the activation dtype
        with torch.device("meta"):
            m = LLaDAV(LLaDAVConfig(lm=lm.cfg, vision=vt.cfg))
        m.llm, m.vision = lm, vt
        m.projector.to_empty(device=device)
        for lin in (m.projector.linear_1, m.projector.linear_2):
            lin.reset_parameters()
        return m.to(lm.embed_tokens.weight.dtype)
    # Everything is checked before any module is built: config.json (fields, kinds, sane sizes), every
    # safetensors header, and the sizes in config.json against the tensor shapes in those headers.
    cfg, cls, nv = hf_config(path)  # nv: layers of the ViT in the checkpoint's config
    index, info, _ = read_headers(path)
    layout = "original" if any(k.startswith("model.transformer.") for k in index) else "llama"
    prefix = "" if cls is VisionTower and not any(k.startswith("vision_model.") for k in index) else "vision_model."
    check_config_against_weights(cfg, info, path, layout, prefix)
    with torch.device("meta"):  # shapes only: no memory, no init
        model = cls(cfg)
    names = official_names(model, layout)
    if not prefix:
        # a SiglipVisionModel saved by recent transformers versions has no "vision_model." prefix
        names = {ours: off[len("vision_model."):] for ours, off in names.items()}
    return load_weights(model, path, names, nv, dtype, device, tied_head_key(model, layout)).eval()


# ----------------------------------------------------------------------------------------------
# Writing

def _write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_pretrained(model: nn.Module, path, layout: str = "llama", max_shard_size: int = 5 * 10**9, dtype=None,
                    state: dict | None = None, ids: dict | None = None):
    """Write `model` as a Hugging Face directory: config.json and safetensors (sharded with an index when
    over max_shard_size bytes), in the official key names (`layout` picks LLaDA's naming; LLaDA-V is
    always LLaMA-style). Each shard's metadata carries the sha256 of its tensors (save_safetensors), which
    from_pretrained checks. Files are written aside and renamed into place; stale shards are removed last.
    state: the weights to write in place of model.state_dict() (export's gathered FSDP state dict; `model`
    may then be a meta-device copy that only gives the config and the key order). ids: config.json's
    bos / eos / pad / mask_token_id when the vocabulary is not LLaDA's (export_hf: the tokenizer's own)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: use one of {LAYOUTS}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if isinstance(model, LLaDAV):
        config = llada_v_config_to_hf(model.cfg)
    elif isinstance(model, LLaDA):
        config = llada_config_to_hf(model.cfg, layout)
    elif isinstance(model, VisionTower):
        config = {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
                  **vision_config_to_hf(model.cfg)}
    else:
        raise TypeError(f"save_pretrained takes LLaDAV, LLaDA or VisionTower, not {type(model).__name__}")
    config.update(ids or {})
    state = merged_state(model) if state is None else state  # a model with LoRA adapters: W + (alpha / r) B A
    names = official_names(model, layout)
    order = list(state)
    if isinstance(model, LLaDAV):  # LlavaLLaDAModelLM's module order: LM body, tower, projector, newline, head
        rank = lambda k: (k == "llm.lm_head.weight", not k.startswith("llm."), k == "image_newline")
        order.sort(key=rank)  # stable: module order kept within each group
    tensors = {names[k]: (state[k] if dtype is None or not state[k].is_floating_point() else state[k].to(dtype))
               for k in order}
    shards, size = [[]], 0  # greedy, in module order (as HF does)
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    n = len(shards)
    files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for file, keys in zip(files, shards):
        part = {k: tensors[k].detach().contiguous().cpu() for k in keys}
        save_safetensors(os.path.join(path, file), part)  # its metadata: sha256 per tensor, which loading checks
        weight_map.update({k: file for k in keys})
        del part
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json(os.path.join(path, INDEX), {"metadata": {"total_size": total},
                                                "weight_map": dict(sorted(weight_map.items()))})
    elif os.path.exists(os.path.join(path, INDEX)):
        os.remove(os.path.join(path, INDEX))
    _write_json(os.path.join(path, "config.json"), config)
    for f in os.listdir(path):  # shards of an earlier save that the new one does not use
        if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", f) and f not in files:
            os.remove(os.path.join(path, f))


# ----------------------------------------------------------------------------------------------
# A training run's weights: --init_from in, a checkpoint out every ckpt_every steps, the newest intact one in
# on --resume=1, the final export

# The parts of a LLaDA-V model that --init_parts names (train.py's option takes exactly these, or all).
INIT_PARTS = ("llm", "vision", "projector", "image_newline")


def init_from(model, path: str, init_parts: str, log):
    """Copy weights from `path` (train.py --init_from) into the components `init_parts` names: a ckpt.pt or
    .safetensors of ours, or a Hugging Face directory (an official LLaDA-V, read by from_pretrained).
    `image_newline` comes along with "all" (or by name) when both sides have it; a model that has one keeps
    its fresh init when the source has none (stage 1 -> 2, as the official stage 2 starts it from randn / sqrt(d))."""
    if not os.path.exists(path):
        sys.exit(f"--init_from={path} does not exist; point it at a ckpt.pt, a model.safetensors (e.g. stage 1's) "
                 f"or a Hugging Face model directory (e.g. a download of GSAI-ML/LLaDA-V)")
    try:
        if os.path.isdir(path):
            from checkpoint import from_pretrained
            state = from_pretrained(path).state_dict()
        else:
            state = load_state_file(path)
    except (OSError, ValueError) as e:
        sys.exit(str(e))
    state = state.get("model", state) if isinstance(state.get("model"), dict) else state
    parts = list(INIT_PARTS) if init_parts == "all" else init_parts.split(",")  # train.py checked the names
    done = []
    for part in parts:
        if part == "image_newline":
            if hasattr(model, part) and part in state:
                with torch.no_grad():
                    model.image_newline.copy_(state[part])
                done.append(part)
            elif init_parts != "all":
                sys.exit(f"--init_parts=image_newline: {'the model' if not hasattr(model, part) else path} has none "
                         f"(it comes with mm_patch_merge_type=spatial_unpad)")
            continue
        sub = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
        load_state(getattr(model, part), sub, f"{path} ({part})")
        done.append(part)
    log(f"initialised {', '.join(done)} from {path}")


# The options that shape the trajectory: a resumed run with any of them changed is another experiment
# (another seed, batch or lr schedule, other data), so --resume=1 refuses it unless --resume_changed=1.
RESUME_KEYS = ("seed", "optimizer", "batch_size", "lr", "min_lr", "decay_frac", "warmup_steps", "warmup_from_zero",
               "max_steps", "weight_decay", "beta2", "grad_clip", "llm_lr_scale", "vision_lr_scale",
               "projector_lr_scale", "stratified_t", "exact_count", "weighting", "loss_mode", "single_object_steps",
               "kind_weights_from", "kind_weights", "one_object_share", "gen_length", "stage", "data", "image_root",
               "data_format", "max_len", "unignore_special", "pad_labels", "lora_rank", "lora_alpha", "lora_targets",
               "lora_dropout")


def resume(tc, mc, model, opt, info, log):
    """Load the newest intact checkpoint of out_dir into model and optimizer -> (step, bad-sample counts,
    its path). Candidates, newest first: the DCP folders (two are kept), else ckpt.pt then ckpt.prev.pt.
    One that is truncated or fails its checksums is skipped, and said; a changed model config stops the
    run, and so does a changed training config (RESUME_KEYS) unless --resume_changed=1."""
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
    candidates = dcp_checkpoints(tc.out_dir) or [p for p in (ckpt_path, prev_path(ckpt_path)) if os.path.exists(p)]
    if not candidates:
        sys.exit(f"--resume=1 but {ckpt_path} does not exist (nor {tc.out_dir}/dcp/step_*); drop --resume "
                 f"or point --out_dir at a run")
    # Why fall back rather than stop: a save killed before its fsync reached the disk, a full disk, or a
    # bad copy between machines damages the newest file only; the one before it is intact and costs a
    # few steps. A wrong config is another matter: it would be wrong for every candidate, so it stops.
    skipped = []
    for path in candidates:
        try:  # read (and verify) the candidate; anything wrong with it moves on to the next one
            if os.path.isdir(path):
                problem = verify_dcp(path, info)
                if problem:
                    raise ValueError(problem)
                ckpt = None
                saved = read_extra(path)
            else:
                ckpt = saved = load_state_file(path, info.device)
                if "optimizer" not in ckpt:
                    raise ValueError(f"a final export without optimizer state (resume from {tc.out_dir}/dcp)")
            saved_cfg = type(mc).from_dict(saved["config"]).to_dict()  # fields added since get defaults
        except Exception as e:  # noqa: BLE001 (truncated zip, bad DCP shard, ...): all mean "not intact"
            skipped.append(path)
            log(f"skipped {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        if saved_cfg != mc.to_dict():
            diff = [k for k in ("lm", "vision", "tokenizer") if saved_cfg[k] != mc.to_dict()[k]]
            sys.exit(f"{path} was trained with another model config (differs in {', '.join(diff)}); "
                     f"use the same --preset and overrides, or a new --out_dir")
        old = saved.get("train_config") or {}
        changed = [f"{k} {old[k]!r} -> {getattr(tc, k)!r}" for k in RESUME_KEYS if k in old and old[k] != getattr(tc, k)]
        if changed and not tc.resume_changed:
            sys.exit(f"{path} was trained with other options ({'; '.join(changed)}); resume with the same ones, "
                     f"or pass --resume_changed=1 to go on with the new ones")
        if ckpt is not None:
            load_state(model, ckpt["model"], path)
            opt.load_state_dict(ckpt["optimizer"])
            step, bad = ckpt["step"], {}
        else:
            extra = load_dcp(path, model, opt)
            step, bad = extra["step"], extra.get("bad", {})
        log(f"resumed from {path} at step {step}" + (f" (skipped {len(skipped)} damaged: {', '.join(skipped)})"
                                                     if skipped else "") + (f"; changed: {'; '.join(changed)}" if changed else ""))
        return step, bad, path
    sys.exit(f"no intact checkpoint in {tc.out_dir} to resume from (skipped {', '.join(skipped)}); "
             f"start over with --overwrite=1")


def save(tc, mc, fmt, step, model, opt, tok, bad, info) -> str:
    """One checkpoint with everything a resume needs -> its path. pt: ckpt.pt (the previous one kept as
    ckpt.prev.pt), written by rank 0; DCP: a collective, every rank writes its shards."""
    # train_config travels with every checkpoint: resume() compares it with the new command line
    if fmt == "dcp":
        save_dcp(tc.out_dir, step, model, opt, {"step": step, "config": mc.to_dict(), "train_config": asdict(tc),
                                                "bad": dict(bad.errors) if bad else {}}, info)
        return os.path.join(tc.out_dir, "dcp", f"step_{step:06d}")
    path = os.path.join(tc.out_dir, "ckpt.pt")
    if info.main:
        save_checkpoint(path, {"config": mc.to_dict(), "train_config": asdict(tc), "model": model.state_dict(),
                               "optimizer": opt.state_dict(), "step": step, "tokenizer": tok.to_dict()}, keep_prev=True)
    return path


# What export() writes beside the weights in out_dir/hf, and sample.load reads back from such a folder.
HF_DIR = "hf"                          # the Hugging Face folder inside a train.py run's out_dir
TOY_TOKENIZER = "toy_tokenizer.json"   # the toy's BPE (Tokenizer.to_dict): no tokenizer.json format exists for it
TRAIN_CONFIG = "train_config.json"     # the training options: toy (synthetic data) or LLaVA data, gen_length, seed


def export(model, out_dir: str, config: dict, info, write_pt: bool = True, extra: dict | None = None):
    """Final export: model.safetensors (full weights) + config.json, and (write_pt) a weights-only
    ckpt.pt, the file sample.py loads (a pt-format run has written its own, with optimizer state).
    extra: more entries for that ckpt.pt (the toy tokenizer, the training config). A LoRA run (train.py
    --lora_rank) writes the weights merged, and its adapter apart in PEFT's format (save_adapter).
    A LLaDA-V run also gets out_dir/hf, a Hugging Face folder (export_hf). Under FSDP the full state dict
    is gathered once (a collective) and every file is written by rank 0 alone."""
    sd = merged_state(model, full_state_dict(model))
    if info.main and any(isinstance(m, LoRALinear) for m in model.modules()):
        save_adapter(model, out_dir, (extra or {}).get("train_config", {}).get("init_from", ""))
    if info.main:
        save_safetensors(os.path.join(out_dir, "model.safetensors"), sd)  # with its per-tensor sha256 manifest
        write_text(os.path.join(out_dir, "config.json"), json.dumps(config, indent=1))
        if write_pt:
            save_checkpoint(os.path.join(out_dir, "ckpt.pt"), {"config": config, "model": sd, **(extra or {})})
        if "vision" in config:  # a LLaDAVConfig
            export_hf(sd, os.path.join(out_dir, HF_DIR), config, extra or {})
    barrier()


def export_hf(sd: dict, path: str, config: dict, extra: dict):
    """out_dir/hf: the trained model as the official LLaDA-V is published, so that every reader of the official
    weights (sample.py, --init_from, from_pretrained) reads it too:
      config.json + model.safetensors   save_pretrained: model_type llava_llada, the official tensor names, the
                                        image mode it trained with (image_aspect_ratio, mm_patch_merge_type);
      tokenizer.json (+ tokenizer_config.json)  copied from where training loaded them (the official vocabulary),
          or TOY_TOKENIZER, the toy's own BPE in this project's JSON (no Hugging Face format exists for it);
      TRAIN_CONFIG                      the training options, from which sample.load tells the toy (answered its
                                        own way, with its run's lengths) from a LLaVA-data model (answered as LLaDA-V).
    Each file is written aside and renamed into place; config.json comes last, so a folder with one is complete."""
    import shutil
    cfg = LLaDAVConfig.from_dict(config)
    with torch.device("meta"):  # no memory: the config, the parameter names and their order only
        shape = LLaDAV(cfg)
    os.makedirs(path, exist_ok=True)
    written = []
    if cfg.tokenizer == "toy":
        if "tokenizer" in extra:
            _write_json(os.path.join(path, TOY_TOKENIZER), extra["tokenizer"])
            written.append(TOY_TOKENIZER)
    else:  # --tokenizer was a tokenizer.json or a folder holding one (train.load_tokenizer)
        src = cfg.tokenizer if os.path.isdir(cfg.tokenizer) else os.path.dirname(cfg.tokenizer)
        files = {"tokenizer.json": cfg.tokenizer if os.path.isfile(cfg.tokenizer) else os.path.join(src, "tokenizer.json"),
                 "tokenizer_config.json": os.path.join(src, "tokenizer_config.json")}
        for name, f in files.items():
            if os.path.isfile(f):
                atomic_write(os.path.join(path, name), lambda tmp, f=f: shutil.copyfile(f, tmp))
                written.append(name)
    for stale in (TOY_TOKENIZER, "tokenizer.json", "tokenizer_config.json"):  # an earlier export's other tokenizer
        if stale not in written and os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if "train_config" in extra:
        _write_json(os.path.join(path, TRAIN_CONFIG), extra["train_config"])
    ids = None
    if "tokenizer" in extra:  # the special ids of the vocabulary it trained with (LLaDA's: 126080, 126081, 126336)
        st = extra["tokenizer"]["special_tokens"]
        ids = {"bos_token_id": st["<|startoftext|>"], "eos_token_id": st["<|endoftext|>"],
               "pad_token_id": st["<|endoftext|>"], "mask_token_id": extra["tokenizer"]["mask_id"]}
    save_pretrained(shape, path, state=sd, ids=ids)


def read_export(path) -> tuple[dict, Tokenizer | None]:
    """A Hugging Face folder -> (its TRAIN_CONFIG, {} for the official weights; its TOY_TOKENIZER or None):
    what export_hf wrote beside the weights, read with one-line errors naming the file."""
    out = {}
    for name in (TRAIN_CONFIG, TOY_TOKENIZER):
        f = os.path.join(os.fspath(path), name)
        if not os.path.isfile(f):
            continue
        try:
            with open(f, encoding="utf-8") as fh:
                out[name] = json.load(fh)
            if not isinstance(out[name], dict):
                raise ValueError("not a JSON object")
            if name == TOY_TOKENIZER:
                out[name] = Tokenizer.from_dict(out[name])
        except ValueError as e:
            raise ValueError(f"{f} is not what train.py's export writes ({e}); export the run again") from None
    return out.get(TRAIN_CONFIG, {}), out.get(TOY_TOKENIZER)


# ----------------------------------------------------------------------------------------------
# LoRA adapters (model.LoRALinear) in PEFT's format, so PEFT users and the official model can load them:
#   adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout", "target_modules", ...}
#   adapter_model.safetensors  base_model.model.<official module>.lora_A.weight (r, in) / .lora_B.weight (out, r)
# PEFT's own names carry the adapter's name (lora_A.default.weight); get_peft_model_state_dict (peft/utils/
# save_and_load.py) drops it on save and set_peft_model_state_dict puts it back on load. "base_model.model." is
# the path of the wrapped model inside PeftModel. target_modules lists the official module names in full, so
# "q_proj" does not also catch the SigLIP tower's q_proj.

ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."


def save_adapter(model: nn.Module, path, base_model: str = ""):
    """Write `model`'s LoRA factors (every LoRALinear; one r, alpha and dropout for all) as a PEFT adapter folder."""
    loras = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not loras:
        raise ValueError("save_adapter: the model has no LoRA layers (model.add_lora wraps them)")
    (r, alpha, p), = {(m.r, m.alpha, m.dropout.p) for m in loras.values()}
    names = official_names(model)
    os.makedirs(path, exist_ok=True)
    save_safetensors(os.path.join(path, ADAPTER_WEIGHTS), {PEFT_PREFIX + names[k]: v for k, v in
                                                             model.state_dict().items() if ".lora_" in k})
    targets = sorted(official_name(model, n + ".weight")[:-len(".weight")] for n in loras)
    is_lm = isinstance(model, LLaDA) or all(n.startswith("llm.") for n in loras)
    _write_json(os.path.join(path, ADAPTER_CONFIG), {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if is_lm else None, "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": p, "target_modules": targets, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True})


def _peft_targets(spec, name: str) -> bool:
    """PEFT's rule (check_target_module_exists): a string is a regex on the whole module name; a list
    matches a name that equals an entry or ends with "." + entry."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + t) for t in spec)


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Add the PEFT LoRA adapter in folder `path` (ours or PEFT's) to `model` -> model, adapted in place."""
    try:
        c = json.load(open(os.path.join(path, ADAPTER_CONFIG)))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: no readable {ADAPTER_CONFIG} ({type(e).__name__}: {e}); pass a PEFT LoRA adapter folder") from None
    unsupported = [k for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if c.get(k)]
    if c.get("peft_type") != "LORA" or unsupported or c.get("bias", "none") != "none":
        raise ValueError(f"{path}/{ADAPTER_CONFIG}: only plain LoRA adapters load here (peft_type LORA, bias none), "
                         f"not peft_type {c.get('peft_type')!r}, bias {c.get('bias')!r} with {unsupported}")
    state = load_state_file(os.path.join(path, ADAPTER_WEIGHTS))
    module_of = {official_name(model, n + ".weight")[:-len(".weight")]: n for n, m in model.named_modules()
                 if type(m) is nn.Linear and (n.startswith(("llm.", "vision.", "projector.")) or isinstance(model, LLaDA))}
    picked = [n for off, n in module_of.items() if _peft_targets(c["target_modules"], off)]
    for n in picked:
        parent, _, leaf = n.rpartition(".")
        setattr(model.get_submodule(parent), leaf, LoRALinear(model.get_submodule(n), c["r"], c["lora_alpha"]))
    names = {PEFT_PREFIX + v: k for k, v in official_names(model).items() if ".lora_" in k}
    missing, unexpected = sorted(set(names) - set(state)), sorted(set(state) - set(names))
    if missing or unexpected or not picked:
        raise ValueError(f"{path}/{ADAPTER_WEIGHTS} does not fit this model: {len(picked)} target layer(s), "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]} (an adapter of another base model?)")
    own = model.state_dict()
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(own[n].shape)}" for k, n in names.items() if state[k].shape != own[n].shape]
    if bad:
        raise ValueError(f"{path}/{ADAPTER_WEIGHTS}: {len(bad)} mis-shaped tensor(s), adapter vs model: {bad[0]}"
                         f"{' ...' if len(bad) > 1 else ''} (an adapter of another base model?)")
    with torch.no_grad():
        for k, n in names.items():
            own[n].copy_(state[k])
    return model


def merged_state(model: nn.Module, state: dict | None = None) -> dict:
    """The state dict of `model` with every LoRA layer merged, W' = W + (alpha / r) B A, and no lora_ keys:
    the weights of one plain model (save_pretrained writes it as a Hugging Face folder). `state`: the
    state dict to merge into (e.g. distributed.full_state_dict's), model.state_dict() if None."""
    state = dict(model.state_dict() if state is None else state)
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear) and n + ".lora_A.weight" in state:  # (a full_state_dict is empty off rank 0)
            state[n + ".weight"] = m.merged_weight().detach().to(state[n + ".weight"].device)
            del state[n + ".lora_A.weight"], state[n + ".lora_B.weight"]
    return state


# ----------------------------------------------------------------------------------------------
# python checkpoint.py --selftest_memory=1: the 8B shapes at reduced depth, peak memory of a fresh load

def _memory_report(path):
    """In a fresh process: load `path`, touch every weight, run a forward, print peak RSS vs checkpoint size."""
    import resource
    import time
    start = proc_status("VmHWM")  # python + torch imported
    with torch.device("meta"):  # torch initialises its meta-device machinery once (~80 MB, ~2 s): not the loader's
        LLaDA(LLaDAConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, mlp_hidden=8))
    base = proc_status("VmHWM")
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    n_files = sum(f.endswith(".safetensors") for f in os.listdir(path))
    t0 = time.time()
    m = from_pretrained(path)
    t_load = time.time() - t0
    with torch.no_grad():
        for p in m.parameters():  # read every byte, in small pieces (no full-size temporaries)
            for piece in p.view(-1).split(1 << 20):
                piece.float().sum()
        loaded = proc_status("VmHWM")  # every weight resident; the forward below adds its own working set
        ids = torch.tensor([[126080, 598, 126081, 126346, 126347, 126348, 100, 200]])
        logits = m(ids)
        feats = m.encode_images(torch.zeros(1, 3, m.cfg.vision.image_size, m.cfg.vision.image_size))
    # ru_maxrss (KiB on Linux) is inherited over fork + exec, so a child of a big process reports the
    # parent's peak; VmHWM is the same high-water mark kept per address space, which exec resets
    maxrss, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, proc_status("VmHWM")
    n = sum(p.numel() for p in m.parameters())
    print(f"checkpoint: {path}, {n_files} safetensors shards, {size / 1e9:.3f} GB, {n:,} parameters "
          f"({next(m.parameters()).dtype})")
    print(f"load time {t_load:.1f}s; forward ok: logits {tuple(logits.shape)}, vision features {tuple(feats.shape)}")
    print(f"peak RSS {peak / 1e9:.3f} GB = {peak / size:.3f} x checkpoint size "
          f"(python + torch: {start / 1e9:.3f} GB, {base / 1e9:.3f} GB once torch's meta device is set up; "
          f"ru_maxrss {maxrss / 1e9:.3f} GB)")
    print(f"added by loading (all weights resident): {(loaded - base) / size:.3f} x checkpoint size; "
          f"by loading and one forward: {(peak - base) / size:.3f} x")


def _write_reduced_8b(path, shard_bytes):
    """llada_v_8b at 2 language layers and 2 vision layers, full width and vocabulary, random bf16 weights."""
    from model import get_config
    cfg = get_config("llada_v_8b")
    cfg.lm.n_layers, cfg.vision.n_layers = 2, 3  # the tower runs n_layers - 1 = 2 layers
    cfg.image_aspect_ratio, cfg.mm_patch_merge_type = "anyres_max_4", "spatial_unpad"
    with torch.device("meta"):
        m = LLaDAV(cfg).to(torch.bfloat16)
    m.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02, generator=g)
    save_pretrained(m, path, max_shard_size=shard_bytes)


if __name__ == "__main__":
    # python checkpoint.py --selftest_memory=1 [--dir=/tmp/llada_v_8b_2layers]: one parser for every script
    # (cli.parse_config: --key=value, the comments below are --help; a bad option is one line)
    from dataclasses import dataclass

    from cli import opt, parse_config, run_cli

    @dataclass
    class CheckpointToolConfig:
        selftest_memory: bool = False  # write llada_v_8b at 2+2 layers (~3.1 GB) to --dir, load it in a fresh
                                       # process, print the peak resident memory against the checkpoint's size
        dir: str = opt("/tmp/llada_v_8b_2layers", out="dir")  # where --selftest_memory writes
        memory_report: str = opt("", path="dir")   # (the loader's half) load this Hugging Face folder and report
        write_reduced_8b: str = ""                   # (the writer's half) write the reduced 8B checkpoint here

    def main(argv):
        tc = parse_config(CheckpointToolConfig, argv, __doc__)
        if tc.memory_report:
            _memory_report(tc.memory_report)
        elif tc.selftest_memory:
            import shutil
            import subprocess
            out = tc.dir
            os.makedirs(out, exist_ok=True)
            free = shutil.disk_usage(out).free
            if free < 8e9:
                sys.exit(f"{free / 1e9:.1f} GB free at {out}: the checkpoint needs ~3.1 GB (and the writer ~3 GB RAM); "
                         f"pass another folder: python checkpoint.py --selftest_memory=1 --dir=<folder>")
            print(f"writing llada_v_8b at 2+2 layers to {out} (1 GB shards) ...", flush=True)
            # writer and loader each in their own process, started from this small one: Linux carries
            # ru_maxrss over fork and exec, so the loader must not descend from the 3 GB writer
            me = [sys.executable, os.path.abspath(__file__)]
            if subprocess.run(me + [f"--write_reduced_8b={out}"]).returncode == 0:
                sys.exit(subprocess.run(me + [f"--memory_report={out}"]).returncode)
            sys.exit(1)
        elif tc.write_reduced_8b:
            _write_reduced_8b(tc.write_reduced_8b, shard_bytes=10**9)
        else:
            sys.exit("nothing to do: python checkpoint.py --selftest_memory=1 [--dir=<folder>] (writes ~3.1 GB, loads "
                     "it in a fresh process, prints peak RSS vs checkpoint size); see --help")

    run_cli(main)
