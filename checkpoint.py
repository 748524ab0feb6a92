"""
Every weight on disk: one atomic write, this project's training checkpoints, and the official Hugging
Face directories in and out.

Where this sits in the flow: it fills the weights of every box in
    image -> ViT (SigLIP2) -> projector -> token sequence -> LLaDA -> masked diffusion
from the released files, and writes our models back in the same layout.

Atomic write: write to `path.tmp.<pid>`, fsync, rename over `path`. A crash at any moment leaves the old
file or the new one, never a torn one; every file this project writes goes through atomic_write().

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

Key names (REFERENCE 1.3, 2.2-2.4). Ours on the left; three official namings on the right:
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
import errno
import hashlib
import json
import os
import re
import sys

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from model import LLaDA, LLaDAConfig, LLaDAV, LLaDAVConfig
from tokenizer import LLADA_MASK_ID, Tokenizer, config_mask_id, get_tokenizer
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
# The one atomic write

def atomic_write(path, write):
    """write(tmp_path), fsync, then rename over path: a crash leaves the old file or the new one.
    The temporary file is removed if anything fails (an 8B checkpoint's is ~100 GB). Two failures a user
    causes end in one line naming the file instead of a traceback from inside torch.save: a full disk
    (SystemExit) and Ctrl-C (the line on stderr, then SystemExit(130), the status of an interrupted
    program; like KeyboardInterrupt it runs every `finally`, so train.py's lock is released)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would (safetensors creates files 0600)
        os.replace(tmp, path)          # atomic on POSIX and Windows
    except BaseException as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        stop = write_stopped(path, [e], "its temporary is removed, " + (
            "the previous file unchanged" if os.path.exists(path) else "nothing left behind"))
        if stop is None:
            raise  # anything else (a bug, a permission error) keeps its type: callers handle OSError
        raise stop from None


def write_stopped(path, causes, kept: str):
    """A write of `path` that failed with one of `causes` -> the SystemExit that says so in one line, or None
    where none of them is the user's doing. Ctrl-C: the line goes to stderr and the status is 130 (an
    interrupted program's). distributed.save_dcp words its failures with it too."""
    if any(isinstance(c, KeyboardInterrupt) for c in causes):
        print(f"{path}: interrupted (Ctrl-C) while writing it; not written, {kept}", file=sys.stderr, flush=True)
        return SystemExit(130)
    if any(isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT) for c in causes):
        return SystemExit(f"{path} was not written: disk full; {kept}; free some space (or pick another folder) "
                          f"and run again")
    return None


def write_text(path, text: str):
    def w(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
    atomic_write(path, w)


# ----------------------------------------------------------------------------------------------
# This project's checkpoints (train.py's ckpt.pt)

def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype, bf16 included: viewed as uint8, nothing converted)."""
    t = t.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


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
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


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
    checkpoint, the tokenizer from the one stored beside it (toy checkpoints written before tokenizers
    travelled with them get the toy tokenizer, which is learnt deterministically)."""
    ckpt = load_state_file(path, device)
    try:
        cfg = LLaDAVConfig.from_dict(ckpt["config"])
    except Exception as e:
        raise ValueError(f"{path} is not a checkpoint written by train.py ({type(e).__name__}: {e})") from None
    model = LLaDAV(cfg).to(device)
    load_state(model, ckpt["model"], path)
    if "tokenizer" in ckpt:
        tok = Tokenizer.from_dict(ckpt["tokenizer"])
    elif cfg.tokenizer == "toy":
        from synthetic import toy_tokenizer
        tok = toy_tokenizer()
    else:
        tok = get_tokenizer(cfg.tokenizer, config_mask_id(cfg.lm.mask_id))
    return model, tok, ckpt


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
    out = {}
    for name in model.state_dict():
        if isinstance(model, LLaDA):
            out[name] = llada_key(name, layout)
        elif isinstance(model, VisionTower):
            out[name] = vision_key(name)
        elif name.startswith("llm."):
            out[name] = llada_key(name[4:], "llama")  # LLaDA-V always uses the LLaMA-style names
        elif name.startswith("vision."):
            out[name] = LLADA_V_VISION + vision_key(name[7:])
        elif name.startswith("projector."):
            out[name] = "model.mm_projector." + name[10:].replace("linear_1", "0").replace("linear_2", "2")
        elif name == "image_newline":
            out[name] = "model.image_newline"
        else:
            raise KeyError(f"no official name for parameter {name}")
    return out


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
        cfg = LLaDAConfig(vocab_size=c.get("embedding_size") or c["vocab_size"], d_model=c["d_model"],
                          n_layers=c["n_layers"], n_heads=c["n_heads"], n_kv_heads=c.get("n_kv_heads") or 0,
                          mlp_hidden=c["mlp_hidden_size"], max_seq_len=c.get("max_sequence_length", 4096),
                          tie_embeddings=bool(c.get("weight_tying", False)),
                          rope_fp32=bool(c.get("rope_full_precision", True)), **shared)
    elif "hidden_size" in c:  # LLaMA-style
        cfg = LLaDAConfig(vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
                          n_heads=c["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads") or 0,
                          mlp_hidden=c["intermediate_size"], max_seq_len=c.get("max_position_embeddings", 4096),
                          tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                          rope_fp32=bool(c.get("rope_full_precision", False)), **shared)
    else:
        raise ValueError("config.json is not a LLaDA config (no d_model or hidden_size); point at the model's directory")
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
    return VisionConfig(image_size=c.get("image_size", d.image_size), patch_size=c.get("patch_size", d.patch_size),
                        d_model=c.get("hidden_size", d.d_model), n_layers=c.get("num_hidden_layers", d.n_layers),
                        n_heads=c.get("num_attention_heads", d.n_heads),
                        mlp_hidden=c.get("intermediate_size", d.mlp_hidden), ln_eps=c.get("layer_norm_eps", d.ln_eps))


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
    f = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{f} does not exist; pass a Hugging Face model directory (config.json + "
                                f"*.safetensors), e.g. a download of GSAI-ML/LLaDA-V")
    with open(f) as fh:
        return json.load(fh)


def checkpoint_index(path) -> dict:
    """{official key: safetensors file path} from the index, or from the one model.safetensors."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, INDEX)):
        with open(os.path.join(path, INDEX)) as fh:
            weight_map = json.load(fh)["weight_map"]
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if absent:
            raise FileNotFoundError(f"{path}: the index names shards that are not there: {absent}; download them")
        return {k: os.path.join(path, f) for k, f in weight_map.items()}
    single = os.path.join(path, SINGLE)
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(f"{path} has neither {INDEX} nor {SINGLE}; download the repo's *.safetensors files")


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
    Checks every key first (from the headers only) and raises one error listing every problem."""
    tied = tied or {}
    index = checkpoint_index(path)
    own = model.state_dict()
    by_official = {off: ours for ours, off in names.items()}
    shapes = {}
    for file in sorted(set(index.values())):
        with safe_open(file, framework="pt") as f:
            for k in f.keys():
                if index.get(k) == file:
                    shapes[k] = tuple(f.get_slice(k).get_shape())
    missing = sorted(k for k in by_official if k not in shapes)
    unexpected = sorted(k for k in shapes if k not in by_official and k not in tied and not _skipped(k, n_vision_layers))
    bad = [f"{k}: checkpoint {shapes[k]} vs model {tuple(own[by_official[k]].shape)}"
           for k in sorted(shapes) if k in by_official and shapes[k] != tuple(own[by_official[k]].shape)]
    if missing or unexpected or bad:
        raise ValueError(f"{os.fspath(path)} does not match the model built from its config.json: "
                         f"{len(missing)} missing {missing}, {len(unexpected)} unexpected {unexpected}, "
                         f"{len(bad)} mis-shaped {bad}")
    nonfinite = []
    for file in sorted(set(index.values())):  # shard by shard
        with safe_open(file, framework="pt") as f:
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
        raise ValueError(f"{os.fspath(path)} holds non-finite weights (NaN or Inf) in {len(nonfinite)} tensor(s): "
                         f"{', '.join(nonfinite[:3])}{' ...' if len(nonfinite) > 3 else ''}; download it again")
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"parameters/buffers not filled by the checkpoint: {left}")
    for head, emb in tied.items():  # a tied model has one matrix: a stored head must be that same matrix
        if head in index:
            with safe_open(index[head], framework="pt") as f, safe_open(index[emb], framework="pt") as g:
                if not torch.equal(f.get_tensor(head), g.get_tensor(emb)):
                    raise ValueError(f"{os.fspath(path)}: config.json ties the embeddings, but {head} differs from "
                                     f"{emb}; set tie_word_embeddings/weight_tying to false to load them apart")
    return model


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
    c = read_config(path)
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
    if is_llada_v(c):
        cfg = llada_v_config_from_hf(c)
        cls, nv = LLaDAV, cfg.vision.n_layers  # nv: layers of the ViT in the checkpoint's config
    elif "vision_config" in c or str(c.get("model_type", "")).startswith("siglip"):
        cfg = vision_config_from_hf(c)
        cls, nv = VisionTower, cfg.n_layers
    else:
        cfg, cls, nv = llada_config_from_hf(c), LLaDA, 0
    with torch.device("meta"):  # shapes only: no memory, no init
        model = cls(cfg)
    index = checkpoint_index(path)
    layout = "original" if any(k.startswith("model.transformer.") for k in index) else "llama"
    names = official_names(model, layout)
    if isinstance(model, VisionTower) and not any(k.startswith("vision_model.") for k in index):
        # a SiglipVisionModel saved by recent transformers versions has no "vision_model." prefix
        names = {ours: off[len("vision_model."):] for ours, off in names.items()}
    return load_weights(model, path, names, nv, dtype, device, tied_head_key(model, layout)).eval()


# ----------------------------------------------------------------------------------------------
# Writing

def _write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_pretrained(model: nn.Module, path, layout: str = "llama", max_shard_size: int = 5 * 10**9, dtype=None):
    """Write `model` as a Hugging Face directory: config.json and safetensors (sharded with an index when
    over max_shard_size bytes), in the official key names (`layout` picks LLaDA's naming; LLaDA-V is
    always LLaMA-style). Files are written aside and renamed into place; stale shards are removed last."""
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
    state = model.state_dict()
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
        atomic_write(os.path.join(path, file), lambda tmp, part=part: save_file(part, tmp, metadata={"format": "pt"}))
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
# python checkpoint.py --selftest_memory=1: the 8B shapes at reduced depth, peak memory of a fresh load

def _proc_status(field):
    with open("/proc/self/status") as fh:  # Linux; values in kB
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))


def _memory_report(path):
    """In a fresh process: load `path`, touch every weight, run a forward, print peak RSS vs checkpoint size."""
    import resource
    import time
    start = _proc_status("VmHWM")  # python + torch imported
    with torch.device("meta"):  # torch initialises its meta-device machinery once (~80 MB, ~2 s): not the loader's
        LLaDA(LLaDAConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, mlp_hidden=8))
    base = _proc_status("VmHWM")
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    n_files = sum(f.endswith(".safetensors") for f in os.listdir(path))
    t0 = time.time()
    m = from_pretrained(path)
    t_load = time.time() - t0
    with torch.no_grad():
        for p in m.parameters():  # read every byte, in small pieces (no full-size temporaries)
            for piece in p.view(-1).split(1 << 20):
                piece.float().sum()
        loaded = _proc_status("VmHWM")  # every weight resident; the forward below adds its own working set
        ids = torch.tensor([[126080, 598, 126081, 126346, 126347, 126348, 100, 200]])
        logits = m(ids)
        feats = m.encode_images(torch.zeros(1, 3, m.cfg.vision.image_size, m.cfg.vision.image_size))
    # ru_maxrss (KiB on Linux) is inherited over fork + exec, so a child of a big process reports the
    # parent's peak; VmHWM is the same high-water mark kept per address space, which exec resets
    maxrss, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, _proc_status("VmHWM")
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
    # (model.parse_config: --key=value, the comments below are --help; a bad option is one line)
    from dataclasses import dataclass

    from model import opt, parse_config, run_cli

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
