"""
The model: LLaDA (a bidirectional transformer), the MLP projector, and the LLaDA-V glue.

Where this sits in the flow:  image -> ViT -> [projector -> token sequence -> LLaDA] -> masked diffusion.

LLaDA-8B (REFERENCE 1.1) is a LLaMA-shaped transformer with the causal mask removed:
    h_0     = E[x]                                                       (B, L, d), no scaling
    a_l     = h_{l-1} + W_o Attn(RoPE(W_q n), RoPE(W_k n), W_v n),  n = RMSNorm(h_{l-1})
    h_l     = a_l + W_down( silu(W_gate m) * W_up m ),               m = RMSNorm(a_l)
    logits  = W_head RMSNorm(h_N)                                        (B, L, V), head not tied to E
    RMSNorm(x) = w * x / sqrt(mean(x^2) + 1e-5)             computed in fp32, cast back, then * w
    Attn(q, k, v) = softmax(q k^T / sqrt(d_head) + pad_bias) v           no causal mask: every token
                                                                         sees every (non-pad) token
    RoPE (rotate-half): theta_i = 500000^(-2i / d_head), q' = q cos(pos theta) + rotate_half(q) sin(pos theta)
There are no biases anywhere, no dropout, and positions are always 0..L-1.

Projector (REFERENCE 2.3, "mlp2x_gelu"):   P(f) = W_2 gelu_erf(W_1 f + b_1) + b_2,   1152 -> 4096 -> 4096.

LLaDA-V glue (REFERENCE 2.5): the token sequence carries IMAGE_TOKEN_INDEX (-200) placeholders; their
embeddings are replaced, in order, by the projected visual features P(ViT(image)). From stage 2 on an
image is several crops whose features are re-assembled, unpadded and closed row by row with a learned
`image_newline` vector (anyres.py; LLaDAV.encode_image_crops). Official weights: pretrained.py.
"""
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from anyres import pack_features
from tokenizer import IMAGE_TOKEN_INDEX
from vision import VisionConfig, VisionTower


@dataclass
class LLaDAConfig:
    vocab_size: int = 126464
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32         # plain multi-head attention (n_kv_heads = n_heads), head_dim 128
    mlp_hidden: int = 12288   # SwiGLU hidden size
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 8192   # LLaDA-V trains at 8192 (16384 for OneVision); used only to reject prompts


@dataclass
class LLaDAVConfig:
    lm: LLaDAConfig = field(default_factory=LLaDAConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    tokenizer: str = "llada"  # "toy" (learnt in synthetic.py) or "llada" (the official tokenizer.json)
    # How images become visual tokens (anyres.py): "square" (stage 1, the toy), "pad" or "anyres_max_4"
    # (LLaDA-V from stage 2 on). "spatial_unpad" adds the learned `image_newline` vector (REFERENCE 2.4).
    image_aspect_ratio: str = "square"
    mm_patch_merge_type: str = "flat"

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        extra = {k: d[k] for k in ("image_aspect_ratio", "mm_patch_merge_type") if k in d}  # absent in old checkpoints
        return cls(lm=LLaDAConfig(**d["lm"]), vision=VisionConfig(**d["vision"]), tokenizer=d["tokenizer"], **extra)


PRESETS = {
    # Trains on a 2-core CPU in minutes on the synthetic shapes data (1.06M parameters). A 96-wide language
    # model learns more per second on a CPU than a 128-wide one (README, "What we learnt").
    "toy": LLaDAVConfig(
        lm=LLaDAConfig(vocab_size=512, d_model=96, n_layers=4, n_heads=6, mlp_hidden=256, max_seq_len=256),
        vision=VisionConfig(image_size=64, patch_size=16, d_model=128, n_layers=3, n_heads=4, mlp_hidden=512),
        tokenizer="toy"),
    # One GPU: the real vocabulary, GPT-2-small-sized language model, a small 224-pixel ViT (~300M).
    "small": LLaDAVConfig(
        lm=LLaDAConfig(d_model=768, n_layers=12, n_heads=12, mlp_hidden=2048),
        vision=VisionConfig(image_size=224, patch_size=14, d_model=384, n_layers=12, n_heads=6, mlp_hidden=1536)),
    # The official shapes: LLaDA-8B + SigLIP2 so400m/14 at 384 pixels + the mlp2x_gelu projector.
    "llada_v_8b": LLaDAVConfig(),
}


def get_config(preset: str) -> LLaDAVConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return LLaDAVConfig.from_dict(PRESETS[preset].to_dict())  # a fresh copy


# ----------------------------------------------------------------------------------------------
# LLaDA

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 statistics even under bf16 (LLaDARMSNorm): normalise, cast back, then scale
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device):
    """cos, sin of shape (L, head_dim), in fp32, in the rotate-half layout: angles = cat(freqs, freqs)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (L, hd/2)
    angles = torch.cat([freqs, freqs], dim=-1)                                                # (L, hd)
    return angles.cos(), angles.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):  # x (B, H, L, hd); rotation in fp32 (rope_full_precision), cast back
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class Block(nn.Module):
    """One pre-norm transformer block. Names follow LLaDA-V's LLaMA-style checkpoint (REFERENCE 1.3)."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads or (cfg.d_model // cfg.n_heads) % 2:
            raise ValueError(f"d_model {cfg.d_model} must split into n_heads {cfg.n_heads} heads of even size")
        d, self.n_heads = cfg.d_model, cfg.n_heads
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.gate_proj = nn.Linear(d, cfg.mlp_hidden, bias=False)  # original LLaDA name: ff_proj
        self.up_proj = nn.Linear(d, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, d, bias=False)  # original LLaDA name: ff_out

    def forward(self, x, cos, sin, attn_mask, cache=None, layer=0):
        B, L, D = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(B, L, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, L, hd)
        if cache is not None:  # approximate KV cache (fast.py): keys/values of the whole sequence
            k, v = cache.update(layer, k, v)                     # (B, H, L_full, hd)
        # is_causal=False is the whole difference to an autoregressive LLaMA: attention is bidirectional.
        # attn_mask (B, 1, 1, L) bool hides padding keys; None means no padding.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)
        x = x + self.o_proj(y.transpose(1, 2).reshape(B, L, D))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class LLaDA(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # untied
        self.checkpointing = False  # True: recompute each block's activations in backward (saves memory)
        self.head_chunk = 0         # > 0: forward(targets=...) runs the head + loss on this many rows at a time

    def forward(self, embeds, attention_mask=None, output_positions=None, cache=None, targets=None):
        """embeds (B, L, d) -> logits (B, L, V), or (N, V) for the N True entries of the bool
        `output_positions` (B, L): the head is the biggest matmul, and the loss needs masked rows only.
        With targets (N,) it returns the per-row cross-entropy (N,) instead (see chunked_head_ce).
        cache (KVCache, inference only): if it has no span yet, run everything and record every layer's
        keys/values; if it has a span (s, e), run only positions s..e-1 (RoPE positions s..e-1), attend
        to the cached keys/values elsewhere, and return logits (B, e - s, V)."""
        B, L, _ = embeds.shape
        cos, sin = rope_cos_sin(L, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta, embeds.device)
        # padding mask -> (B, 1, 1, L) bool, broadcast over heads and queries; skip it when nothing is padded
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask[:, None, None, :].bool()
        x = embeds
        if cache is not None and cache.span is not None:
            s, e = cache.span
            x, cos, sin = embeds[:, s:e], cos[s:e], sin[s:e]  # queries of the span only; keys stay (B, L)
        for i, block in enumerate(self.layers):
            if cache is not None:
                x = block(x, cos, sin, mask, cache, i)
            elif self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask)
        x = self.norm(x)
        if output_positions is not None:
            x = x[output_positions]  # (N, d)
        if targets is not None:
            return chunked_head_ce(x.reshape(-1, x.shape[-1]), self.lm_head, targets.reshape(-1), self.head_chunk)
        return self.lm_head(x)

    def init_weights(self):
        """From-scratch init, LLaDA's config "mitchell" (OLMo): trunc-normal(0, 1/sqrt(fan_in)) cut at
        3 std; the residual-stream outputs of layer i are further scaled by 1/sqrt(2(i+1))."""
        def tn(w, std):
            nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std)
        d = self.cfg.d_model
        tn(self.embed_tokens.weight, 1 / math.sqrt(d))
        tn(self.lm_head.weight, 1 / math.sqrt(d))
        for i, b in enumerate(self.layers):
            for lin in (b.q_proj, b.k_proj, b.v_proj, b.gate_proj, b.up_proj):
                tn(lin.weight, 1 / math.sqrt(lin.in_features))
            for lin in (b.o_proj, b.down_proj):
                tn(lin.weight, 1 / math.sqrt(lin.in_features) / math.sqrt(2 * (i + 1)))
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)


def chunked_head_ce(h, head: nn.Linear, targets, chunk: int = 0):
    """Per-row CE(head(h_i).float(), target_i) for h (N, d), targets (N,) -> (N,). With chunk > 0 the rows
    go through head + cross-entropy `chunk` at a time under activation checkpointing: only h is kept
    for backward and at most chunk x V logits exist at once (N x V fp32 logits, their log-softmax and
    two gradients of that size are what dominates the loss's memory at a 126k vocabulary)."""
    def ce(h_rows, t_rows):
        return F.cross_entropy(head(h_rows).float(), t_rows, reduction="none")
    if chunk <= 0 or not torch.is_grad_enabled() or h.shape[0] <= chunk:  # N = 0 included: the head stays
        return ce(h, targets)                                               # in the graph (DDP, FSDP2 need it)
    return torch.cat([torch.utils.checkpoint.checkpoint(ce, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                      for i in range(0, h.shape[0], chunk)])


class KVCache:
    """Every layer's keys and values (B, H, L, hd) of one full forward pass, for the approximate caches
    of fast diffusion decoding (Fast-dLLM; used by fast.py). A diffusion LM attends both ways, so cached
    keys go stale as soon as any token changes; the sampler decides when to refresh (record) them.

        cache = KVCache(); model(x, cache=cache)      # record: a full pass, keys/values stored
        cache.span = (s, e); model(x, cache=cache)    # reuse: only x[:, s:e] is recomputed, its fresh
                                                      # keys/values overwrite the cache's s..e-1
    prefix cache: span = (block start, L);  dual cache: span = (block start, block end)."""

    def __init__(self):
        self.k, self.v, self.span = [], [], None

    def update(self, layer, k, v):
        if self.span is None:                 # recording pass: k, v cover the whole sequence
            if layer == len(self.k):
                self.k.append(k)
                self.v.append(v)
            else:
                self.k[layer], self.v[layer] = k, v
            return k, v
        s, e = self.span
        self.k[layer][:, :, s:e] = k          # in place: the span is recomputed at every step anyway
        self.v[layer][:, :, s:e] = v
        return self.k[layer], self.v[layer]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


# ----------------------------------------------------------------------------------------------
# Projector and the LLaDA-V glue

class Projector(nn.Module):
    def __init__(self, d_vision: int, d_model: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_vision, d_model)  # official keys: mm_projector.0 / mm_projector.2
        self.linear_2 = nn.Linear(d_model, d_model)

    def forward(self, f):
        return self.linear_2(F.gelu(self.linear_1(f)))  # exact (erf) GELU, not tanh


class LLaDAV(nn.Module):
    def __init__(self, cfg: LLaDAVConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.projector = Projector(cfg.vision.d_model, cfg.lm.d_model)
        self.llm = LLaDA(cfg.lm)
        if "unpad" in cfg.mm_patch_merge_type:  # ends every row of an image's feature map (anyres.py)
            self.image_newline = nn.Parameter(torch.randn(cfg.lm.d_model) / math.sqrt(cfg.lm.d_model))

    def init_weights(self):
        self.vision.init_weights()
        self.llm.init_weights()
        for lin in (self.projector.linear_1, self.projector.linear_2):
            nn.init.normal_(lin.weight, std=1 / math.sqrt(lin.in_features))
            nn.init.zeros_(lin.bias)

    def encode_images(self, pixels):
        """(n_images, 3, S, S) -> visual tokens (n_images, N, d) in the language model's space."""
        return self.projector(self.vision(pixels))

    def encode_image_crops(self, crops, image_size):
        """One image's crops (K, 3, S, S) from anyres.process_image -> its visual tokens (N, d): 729 in
        square mode, 730 in pad mode, 729 + h'(w'+1) in anyres mode (see anyres.py)."""
        newline = getattr(self, "image_newline", None)
        return pack_features(self.encode_images(crops), image_size, self.cfg.image_aspect_ratio, newline,
                             self.cfg.vision.image_size)

    def embed(self, ids, image_features=None):
        """ids (B, L) with IMAGE_TOKEN_INDEX placeholders -> embeddings (B, L, d). The placeholders, read
        row by row, take the rows of image_features (n_images, N, d) or (n_rows, d) in order."""
        is_img = ids == IMAGE_TOKEN_INDEX
        x = self.llm.embed_tokens(ids.masked_fill(is_img, 0))  # (B, L, d)
        n_slots = int(is_img.sum())
        if image_features is not None and image_features.shape[-1] != x.shape[-1]:
            raise ValueError(f"image features have width {image_features.shape[-1]} but the language model's is "
                             f"{x.shape[-1]}; pass projected features (model.encode_images), not raw ViT outputs")
        n_feats = 0 if image_features is None else image_features.numel() // image_features.shape[-1]
        if n_slots != n_feats:
            raise ValueError(f"the token sequence has {n_slots} image placeholders but {n_feats} visual tokens "
                             f"were given; pass one image per '<image>' (each expands to the vision tower's token count)")
        if n_slots:
            x = x.masked_scatter(is_img[..., None], image_features.reshape(-1, x.shape[-1]).to(x.dtype))
        return x

    def forward(self, ids, pixels=None, attention_mask=None, image_features=None, output_positions=None,
                cache=None, targets=None):
        """ids (B, L) -> logits (B, L, V) (or (N, V) at output_positions). Images come either as pixels
        (n_images, 3, S, S) or as image_features already encoded (the sampler encodes them once).
        cache: see LLaDA.forward and KVCache (ids stay the whole sequence; the cache says what to run)."""
        if ids.shape[1] > self.cfg.lm.max_seq_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens is longer than the model's context "
                             f"max_seq_len={self.cfg.lm.max_seq_len}; shorten the prompt or lower gen_length")
        if pixels is not None:
            image_features = self.encode_images(pixels)
        return self.llm(self.embed(ids, image_features), attention_mask, output_positions, cache=cache, targets=targets)


# ----------------------------------------------------------------------------------------------
# Checkpoints (this project's training format; the Hugging Face layout is a separate converter)

def save_checkpoint(path, state: dict):
    """Atomic save: write to a temporary file beside `path`, flush it to disk, then rename over `path`.
    A crash at any moment leaves either the old checkpoint or the new one, never a torn file."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        if os.path.exists(tmp):  # do not leave a partial (possibly huge) file behind
            os.remove(tmp)
        raise


def load_checkpoint(path, device="cpu"):
    """-> (model, checkpoint dict). The model is rebuilt from the config stored in the checkpoint."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; train one with `python train.py` "
                                f"(it writes out/ckpt.pt) or pass --checkpoint=<path>")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        cfg = LLaDAVConfig.from_dict(ckpt["config"])
    except Exception as e:
        raise ValueError(f"{path} is not a checkpoint written by train.py ({type(e).__name__}: {e})") from None
    model = LLaDAV(cfg).to(device)
    load_state(model, ckpt["model"], path)
    return model, ckpt


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


def count_params(model: LLaDAV) -> dict:
    n = lambda m: sum(p.numel() for p in m.parameters())
    return {"language model": n(model.llm), "vision tower": n(model.vision),
            "projector": n(model.projector), "total": n(model)}


if __name__ == "__main__":
    # python model.py [preset]: parameter counts, built on the meta device (no memory, no time)
    import sys
    preset = sys.argv[1] if len(sys.argv) > 1 else "llada_v_8b"
    with torch.device("meta"):
        m = LLaDAV(get_config(preset))
    print(f"preset {preset}")
    for k, v in count_params(m).items():
        print(f"  {k:15s} {v:>15,d}")
