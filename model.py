"""
The model: LLaDA (a bidirectional transformer), the MLP projector, and the LLaDA-V glue.

Where this sits in the flow:  image -> ViT -> [projector -> token sequence -> LLaDA] -> masked diffusion.

LLaDA-8B (REFERENCE 1.1) is a LLaMA-shaped transformer with the causal mask removed:
    h_0     = E[x]                                                       (B, L, d), no scaling
    a_l     = h_{l-1} + W_o Attn(RoPE(W_q n), RoPE(W_k n), W_v n),  n = RMSNorm(h_{l-1})
    h_l     = a_l + W_down( silu(W_gate m) * W_up m ),               m = RMSNorm(a_l)
    logits  = W_head RMSNorm(h_N)                                        (B, L, V); W_head is its own matrix
                                                                         (LLaDA-8B) or E itself (tied, iLLaDA)
    RMSNorm(x) = w * x / sqrt(mean(x^2) + 1e-5)             computed in fp32, cast back, then * w
    Attn(q, k, v) = softmax(q k^T / sqrt(d_head) + pad_bias) v           no causal mask: every token
                                                                         sees every (non-pad) token
    RoPE (rotate-half): theta_i = 500000^(-2i / d_head), q' = q cos(pos theta) + rotate_half(q) sin(pos theta)
There are no biases anywhere, no dropout, and positions are always 0..L-1.
RoPE precision: the original LLaDA rotates q, k in fp32 (rope_full_precision); LLaDA-V's LLaMA-style port rotates
them in the activation dtype (cos.to(x.dtype)); LLaDAConfig.rope_fp32 picks one (the same in fp32, bf16 noise apart).
Grouped-query attention (iLLaDA; LLaDA-8B has n_kv_heads = n_heads): W_k, W_v make n_kv_heads heads, and
query head j reads key/value head floor(j / (n_heads / n_kv_heads)), as LLaMA's repeat_kv does.

Projector (REFERENCE 2.3, "mlp2x_gelu"):   P(f) = W_2 gelu_erf(W_1 f + b_1) + b_2,   1152 -> 4096 -> 4096.

LLaDA-V glue (REFERENCE 2.5): the token sequence carries IMAGE_TOKEN_INDEX (-200) placeholders; their
embeddings are replaced, in order, by the projected visual features P(ViT(image)). From stage 2 on an
image is several crops whose features are re-assembled, unpadded and closed row by row with a learned
`image_newline` vector (vision.py's image modes; LLaDAV.encode_image_crops for one image, encode_crops for
a training micro-batch: one tower call over every crop, then packing image by image). Official weights:
checkpoint.py.

Also here, because they belong to the configs: the FLOPs of a training step and the one table of GPU peaks
(MFU), and, last, the one command-line parser every script uses (`--key=value` into these dataclass
configs, each option checked against the rule declared beside its field; nanoGPT's configurator idea).
"""
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import repeat

from tokenizer import IMAGE_TOKEN_INDEX, LLADA_MASK_ID
from vision import VisionConfig, VisionTower, pack_features


@dataclass
class LLaDAConfig:
    vocab_size: int = 126464
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32         # query heads; head_dim = d_model / n_heads = 128
    n_kv_heads: int = 0       # key/value heads: 0 = n_heads (plain multi-head attention, LLaDA-8B); fewer =
                              # grouped-query attention (iLLaDA): each key/value head serves n_heads / n_kv_heads
                              # query heads, which shrinks k_proj, v_proj and the KV cache by that factor
    mlp_hidden: int = 12288   # SwiGLU hidden size
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 8192   # LLaDA-V trains at 8192 (16384 for OneVision); used only to reject prompts
    tie_embeddings: bool = False  # True: the output head is the input embedding E (logits = h E^T; iLLaDA);
                                  # LLaDA-8B and LLaDA-V have a separate head (REFERENCE 1.1)
    mask_id: int = LLADA_MASK_ID  # [MASK] (<|mdm_mask|>) of the official vocabulary; config.json's mask_token_id
                                  # (iLLaDA: 5). The toy takes its own from its tokenizer.
    rope_fp32: bool = True    # rotate q, k in fp32 (original LLaDA, rope_full_precision); False: in the
                              # activation dtype, as LLaDA-V's LLaMA-style port does (REFERENCE 11.4).
                              # from_pretrained sets it from the checkpoint's key layout.

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class LLaDAVConfig:
    lm: LLaDAConfig = field(default_factory=LLaDAConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    tokenizer: str = "llada"  # "toy" (learnt in synthetic.py) or "llada" (the official tokenizer.json)
    # How images become visual tokens (vision.py's image modes): "square" (stage 1, the toy), "pad" or "anyres_max_4"
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
    # Trains on a 2-core CPU in minutes on the synthetic shapes data. A 96-wide language
    # model learns more per second on a CPU than a 128-wide one (docs/notebook.md).
    "toy": LLaDAVConfig(
        lm=LLaDAConfig(vocab_size=512, d_model=96, n_layers=4, n_heads=6, mlp_hidden=256, max_seq_len=256),
        vision=VisionConfig(image_size=64, patch_size=16, d_model=128, n_layers=3, n_heads=4, mlp_hidden=512),
        tokenizer="toy"),
    # One GPU: the real vocabulary, GPT-2-small-sized language model, a small 224-pixel ViT (~300M).
    "small": LLaDAVConfig(
        lm=LLaDAConfig(d_model=768, n_layers=12, n_heads=12, mlp_hidden=2048),
        vision=VisionConfig(image_size=224, patch_size=14, d_model=384, n_layers=12, n_heads=6, mlp_hidden=1536)),
    # The official shapes: LLaDA-8B + SigLIP2 so400m/14 at 384 pixels + the mlp2x_gelu projector. RoPE in
    # the activation dtype, as LLaDA-V's LLaMA-style port trains and runs it (REFERENCE 11.4).
    "llada_v_8b": LLaDAVConfig(lm=LLaDAConfig(rope_fp32=False)),
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


def apply_rope(x, cos, sin, fp32: bool = True):
    """x (B, H, L, hd), cos/sin (L, hd) fp32. fp32=True: rotate in fp32 and cast back (the original LLaDA's
    rope_full_precision); False: cast cos/sin to x's dtype and rotate there (LLaDA-V's LLaMA-style port,
    `cos.to(x.dtype)`). Identical in fp32; in bf16 they differ by rounding noise only."""
    if fp32:
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Block(nn.Module):
    """One pre-norm transformer block. Names follow LLaDA-V's LLaMA-style checkpoint (REFERENCE 1.3)."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads or (cfg.d_model // cfg.n_heads) % 2:
            raise ValueError(f"d_model {cfg.d_model} must split into n_heads {cfg.n_heads} heads of even size")
        if cfg.n_kv_heads < 0 or cfg.n_heads % cfg.kv_heads:
            raise ValueError(f"n_kv_heads {cfg.n_kv_heads} must divide n_heads {cfg.n_heads} (0 = n_heads: no grouping)")
        d, self.n_heads, self.n_kv_heads, self.cfg = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg
        d_kv = cfg.kv_heads * cfg.head_dim  # = d without grouped-query attention
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d_kv, bias=False)
        self.v_proj = nn.Linear(d, d_kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.gate_proj = nn.Linear(d, cfg.mlp_hidden, bias=False)  # original LLaDA name: ff_proj
        self.up_proj = nn.Linear(d, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, d, bias=False)  # original LLaDA name: ff_out

    def forward(self, x, cos, sin, attn_mask, cache=None, layer=0):
        B, L, D = x.shape
        h = self.attn_norm(x)
        # split the heads: (B, L, H hd) -> (B, H, L, hd). Written with view/transpose, not einops: this runs
        # 4 times per layer per sampler step, and einops' per-call overhead is a visible share of a toy step
        q = self.q_proj(h).view(B, L, self.n_heads, -1).transpose(1, 2)     # (B, H, L, hd)
        k = self.k_proj(h).view(B, L, self.n_kv_heads, -1).transpose(1, 2)  # (B, H_kv, L, hd)
        v = self.v_proj(h).view(B, L, self.n_kv_heads, -1).transpose(1, 2)
        fp32 = self.cfg.rope_fp32  # read at every call: flipping model.cfg.rope_fp32 switches a built model
        q, k = apply_rope(q, cos, sin, fp32), apply_rope(k, cos, sin, fp32)
        if cache is not None:  # approximate KV cache (diffusion.KVCache): keys/values of the whole sequence,
            k, v = cache.update(layer, k, v)  # stored with H_kv heads (B, H_kv, L_full, hd): GQA's memory saving
        if self.n_kv_heads != self.n_heads:  # GQA: key/value head i serves query heads i*g .. i*g+g-1
            g = self.n_heads // self.n_kv_heads
            k, v = (repeat(t, "b h l d -> b (h g) l d", g=g) for t in (k, v))  # (B, H, L, hd)
        # is_causal=False is the whole difference to an autoregressive LLaMA: attention is bidirectional.
        # attn_mask (B, 1, 1, L) bool hides padding keys; None means no padding.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)  # (B, H, L, hd)
        x = x + self.o_proj(y.transpose(1, 2).reshape(B, y.shape[2], D))  # heads merged: (B, L_q, D)
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class LLaDA(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Untied (LLaDA-8B, LLaDA-V): a head of its own. Tied (iLLaDA): no head module at all; head() uses
        # embed_tokens.weight, so one tensor gets both gradients, and a state dict (like a tied Hugging Face
        # checkpoint) has no lm_head key. (A second Parameter that aliases the first would be split apart
        # again by .to() / to_empty() from the meta device.)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
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
        cos, sin = rope_cos_sin(L, self.cfg.head_dim, self.cfg.rope_theta, embeds.device)  # fp32 (L, hd)
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
            return chunked_head_ce(x.reshape(-1, x.shape[-1]), self.head, targets.reshape(-1), self.head_chunk)
        return self.head(x)

    def head(self, h):
        """h (..., d) -> logits (..., V): W_head h, with W_head = E when the embeddings are tied."""
        return self.lm_head(h) if self.lm_head is not None else F.linear(h, self.embed_tokens.weight)

    def init_weights(self):
        """From-scratch init, LLaDA's config "mitchell" (OLMo): trunc-normal(0, 1/sqrt(fan_in)) cut at
        3 std; the residual-stream outputs of layer i are further scaled by 1/sqrt(2(i+1))."""
        def tn(w, std):
            nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std)
        d = self.cfg.d_model
        tn(self.embed_tokens.weight, 1 / math.sqrt(d))
        if self.lm_head is not None:  # tied: E above is the head too
            tn(self.lm_head.weight, 1 / math.sqrt(d))
        for i, b in enumerate(self.layers):
            for lin in (b.q_proj, b.k_proj, b.v_proj, b.gate_proj, b.up_proj):
                tn(lin.weight, 1 / math.sqrt(lin.in_features))
            for lin in (b.o_proj, b.down_proj):
                tn(lin.weight, 1 / math.sqrt(lin.in_features) / math.sqrt(2 * (i + 1)))
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)


def chunked_head_ce(h, head, targets, chunk: int = 0):
    """Per-row CE(head(h_i).float(), target_i) for h (N, d), targets (N,) -> (N,); head: h -> logits (an
    nn.Linear, or LLaDA.head when tied). With chunk > 0 the rows
    go through head + cross-entropy `chunk` at a time under activation checkpointing: only h is kept
    for backward and at most chunk x V logits exist at once (N x V fp32 logits, their log-softmax and
    two gradients of that size are what dominates the loss's memory at a 126k vocabulary)."""
    def ce(h_rows, t_rows):
        return F.cross_entropy(head(h_rows).float(), t_rows, reduction="none")
    if chunk <= 0 or not torch.is_grad_enabled() or h.shape[0] <= chunk:  # N = 0 included: the head stays
        return ce(h, targets)                                               # in the graph (DDP, FSDP2 need it)
    return torch.cat([torch.utils.checkpoint.checkpoint(ce, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                      for i in range(0, h.shape[0], chunk)])


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
        if "unpad" in cfg.mm_patch_merge_type:  # ends every row of an image's feature map (vision.pack_features)
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
        """One image's crops (K, 3, S, S) from vision.process_image -> its visual tokens (N, d): 729 in
        square mode, 730 in pad mode, 729 + h'(w'+1) in anyres mode (see vision.py)."""
        newline = getattr(self, "image_newline", None)
        return pack_features(self.encode_images(crops), image_size, self.cfg.image_aspect_ratio, newline,
                             self.cfg.vision.image_size)

    def encode_crops(self, pixels, layout):
        """A micro-batch's images for training: pixels (sum_k K_k, 3, S, S), every crop of every image,
        image after image; layout [(K_k, (W_k, H_k), T_k)] per image, in placeholder order
        -> visual tokens (sum_k T_k, d).
        One tower + projector call over all the crops (the big matmuls see one large batch), then each
        image's K_k crops are packed on their own: a single crop (square / pad) gives n^2 tokens (+ the
        newline with spatial_unpad), K_k > 1 crops the anyres map with a newline per row. T_k is the number
        of the image's rows the sample kept: less than the packed length when truncation cut through it."""
        newline = getattr(self, "image_newline", None)
        feats = self.encode_images(pixels)                                    # (sum K, n^2, d)
        out = []
        for f, (K, size, keep) in zip(feats.split([K for K, _, _ in layout]), layout):
            # K > 1 only happens in anyres mode; pack_features ignores the mode for one crop (square, pad)
            packed = pack_features(f, size, self.cfg.image_aspect_ratio, newline, self.cfg.vision.image_size)
            out.append(packed[:keep])                                         # (T_k, d)
        return torch.cat(out)

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
                cache=None, targets=None, image_layout=None):
        """ids (B, L) -> logits (B, L, V) (or (N, V) at output_positions). Images come either as pixels
        (n_images, 3, S, S), one square crop per image whose n^2 raw tokens fill the placeholders, or as
        crops with image_layout (training from stage 2 on, see encode_crops), or as image_features
        already encoded (the sampler encodes them once).
        cache: see LLaDA.forward and KVCache (ids stay the whole sequence; the cache says what to run)."""
        if ids.shape[1] > self.cfg.lm.max_seq_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens is longer than the model's context "
                             f"max_seq_len={self.cfg.lm.max_seq_len}; shorten the prompt or lower gen_length")
        if pixels is not None:
            image_features = self.encode_images(pixels) if image_layout is None else self.encode_crops(pixels, image_layout)
        return self.llm(self.embed(ids, image_features), attention_mask, output_positions, cache=cache, targets=targets)


# ----------------------------------------------------------------------------------------------
# FLOPs and MFU (nanoGPT's estimate_mfu: the count lives beside what it counts)
#
# FLOPs of one training step (matmuls only, the usual convention; a multiply-add is 2 FLOPs). A matmul with
# P weights applied to one token costs 2P forward, 2P for the input gradient, 2P for the weight gradient:
#     per LLM token:    c_llm (P_blocks + 2 L d)        c = 6 if the LLM trains, 4 if frozen but the
#                                                     projector below it trains (input gradients only), 2 else
#                       (2 L d per layer = q k^T and attn @ v over the L positions, d = model width)
#     per masked token: c_llm d V                       the output head runs at masked positions only
#     per image:        c_vis N (P_vis + 2 N D)         N patches of width D (+ the projector's params, c_proj)
#     MFU = FLOPs per step / step time / peak FLOP/s of the device.
# The peak is the dense bf16 tensor-core figure of the one table below for known GPUs; on a CPU it is the
# fp32 matmul rate measured here, so CPU MFU says how close a step gets to the best this CPU does on a
# plain matmul.

# Dense bf16 peak FLOP/s from the vendors' data sheets (no sparsity), matched on the device name.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
                 "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}

_cpu_peak = None


def cpu_matmul_peak() -> float:
    """Best fp32 FLOP/s of a 1024 x 1024 x 1024 matmul on this CPU (measured once, ~0.3 s)."""
    global _cpu_peak
    if _cpu_peak is None:
        g = torch.Generator().manual_seed(0)  # not the global RNG: training must not depend on this
        a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        _cpu_peak = 2 * 1024 ** 3 / best
    return _cpu_peak


def device_peak(device: torch.device) -> tuple[float, str]:
    """-> (peak FLOP/s, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name} bf16 spec"
        return float("nan"), f"{name}: not in model.GPU_PEAK_BF16, add it"
    if device.type == "cpu":
        return cpu_matmul_peak(), "measured CPU fp32 matmul"
    return float("nan"), f"no peak for {device.type}"


def step_flops(mc, n_tokens: int, seq_len: int, n_masked: int, n_images: int, train_llm: bool,
               train_vision: bool, train_projector: bool) -> float:
    """Matmul FLOPs of one optimizer step (see the module docstring). n_tokens: non-pad tokens in the
    step (image tokens included), seq_len: padded length, n_masked: positions the head runs at."""
    lm, vc = mc.lm, mc.vision
    d_kv = lm.kv_heads * lm.head_dim  # = d_model without grouped-query attention
    p_block = lm.n_layers * (2 * lm.d_model ** 2 + 2 * lm.d_model * d_kv + 3 * lm.d_model * lm.mlp_hidden)
    c_llm = 6 if train_llm else 4 if (train_projector or train_vision) else 2
    flops = c_llm * n_tokens * (p_block + 2 * lm.n_layers * seq_len * lm.d_model)
    flops += c_llm * n_masked * lm.d_model * lm.vocab_size
    n, D = vc.n_patches, vc.d_model
    p_vis = (vc.n_layers - 1) * (4 * D * D + 2 * D * vc.mlp_hidden) + 3 * vc.patch_size ** 2 * D
    c_vis = 6 if train_vision else 2
    c_proj = 6 if train_projector else 4 if train_vision else 2
    flops += n_images * n * (c_vis * (p_vis + 2 * (vc.n_layers - 1) * n * D)
                             + c_proj * (D * lm.d_model + lm.d_model ** 2))
    return float(flops)



def count_params(model: LLaDAV) -> dict:
    n = lambda m: sum(p.numel() for p in m.parameters())
    return {"language model": n(model.llm), "vision tower": n(model.vision),
            "projector": n(model.projector), "total": n(model)}



# ----------------------------------------------------------------------------------------------
# Configuration from the command line
#
# nanoGPT's configurator idea, with types and rules. Every script's options are the fields of one dataclass
# (train.TrainConfig, sample.SampleConfig, tools.bench.BenchConfig, tools.plan.PlanConfig), written on the
# command line as --key=value with the field's own name: one spelling, underscores. A field may carry its
# rule beside it, and the comment after it is its --help:
#     steps: int = opt(16, min=1)      # sampler steps
# parse_config() reads argv in three passes, all before a script does any work, so that a typo costs one
# line and never a run (nor a checkpoint overwritten by a run that was meant to resume):
#     1. form:  every argument is --key=value (a bare --flag is a boolean's 1) and the key is a field
#     2. type:  the text becomes the field's type (int, float, bool, str, or one of them | None)
#     3. rules: each field against its own rule (RULES below), then the config's cross-field check()
# Errors are SystemExit("one line"): Python prints the line and exits with status 1, tests catch it, and
# run_cli() (every script's __main__) also turns a ValueError or FileNotFoundError raised deeper down into
# such a line. LLADA_DEBUG=1 brings the traceback back for whoever debugs the code itself.
#
# These imports belong to this section only (the model above needs none of them).
import copy
import difflib
import inspect
import io
import os
import re
import sys
import tempfile
import textwrap
import tokenize
import typing
from dataclasses import fields

# The rules a field may carry (its dataclasses.field metadata, written with opt()):
#   choices=(...)   the value is one of these             each=(...)   a comma list, every item one of these
#   min= / max=     inclusive bounds                      gt= / lt=    exclusive bounds
#   path="file" | "dir" | "any"   must exist when given (non-empty), unless it is one of also=(...)
#   out="dir" | "file"            an output: its folder exists or can be created, writably ("dir": a folder that
#                                 is always written, so not empty; "file": empty means none)
#   suffix=".gif"                 an output file must end so (nothing else gets overwritten by mistake)
#   device=True                   auto, cpu, mps, cuda or cuda:N, and present on this machine
RULES = ("choices", "each", "min", "max", "gt", "lt", "path", "also", "out", "suffix", "device")
# The only booleans, in any case. Anything else is refused: "--resume=on" once read as false, and the run
# then started over and overwrote the checkpoint it was meant to continue.
TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")


def opt(default, **rule):
    """A dataclass field whose command-line rule sits beside it: `x: int = opt(1, min=1)  # help`."""
    if set(rule) - set(RULES):  # a misspelt rule would silently check nothing: refuse it when the class is made
        raise TypeError(f"unknown option rule(s) {sorted(set(rule) - set(RULES))}; rules are {', '.join(RULES)}")
    return field(default=default, metadata=rule)


def field_notes(cls) -> list[tuple[str, str]]:
    """The `# ...` comments of a dataclass's fields, read from its source with tokenize ->
    [(field name, comment), ...] in source order. A comment on a field's line(s) is its note; a comment line
    indented deeper than the fields continues the note above; one at the fields' own column is a section
    heading (name ""). --help prints these, so the help cannot drift from the comments beside the code."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))  # dedent: a class defined inside a block or function
    except (OSError, TypeError):  # no source file (a class made in a REPL): names without notes
        return [(f.name, "") for f in fields(cls)]
    # tokenize, not a regex on lines: it knows where a statement ends (a field's opt(...) may span lines),
    # and what is a comment rather than a '#' inside a string default
    notes, in_field, body_col, line_start = [], False, None, True
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        kind, col = tok.type, tok.start[1]
        if kind == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if in_field or (notes and notes[-1][0] and body_col is not None and col > body_col):
                notes[-1] = (notes[-1][0], (notes[-1][1] + " " + text).strip())  # the field's note (goes on)
            elif col == body_col:
                notes.append(("", text))                                          # a section heading
        elif kind == tokenize.NEWLINE:
            in_field, line_start = False, True  # a statement ends: a field's definition is complete
        elif kind in (tokenize.INDENT, tokenize.DEDENT, tokenize.NL):
            continue  # layout only (NL: a blank line, a comment line, or a line break inside brackets)
        elif line_start and col > 0:  # the first token of a statement in the class body
            line_start = False
            if tok.string in ("def", "@", "class"):
                break  # methods (check()) follow the fields: their comments are not help
            body_col = col if body_col is None else body_col
            if kind == tokenize.NAME:  # `name: type = ...`; a docstring (a STRING) is skipped
                notes.append((tok.string, ""))
                in_field = True
        else:
            line_start = False
    names = {f.name for f in fields(cls)}
    return [(n, t) for n, t in notes if n == "" or n in names]


def _rule_text(rule) -> str:
    """What a rule allows, in words: the bracket after an option in --help, the tail of its error line."""
    parts = []
    if "choices" in rule:
        parts.append("one of " + ", ".join(str(c) if c != "" else '""' for c in rule["choices"]))
    if "each" in rule:
        parts.append("a comma list of " + ", ".join(rule["each"]))
    for k, op in (("min", ">="), ("gt", ">"), ("max", "<="), ("lt", "<")):
        if k in rule:
            parts.append(f"{op} {rule[k]}")
    if "path" in rule:
        kind = {"file": "an existing file", "dir": "an existing folder",
                "any": "an existing file or folder"}[rule["path"]]
        parts.append(kind + ("" if "also" not in rule else " or " + ", ".join(rule["also"])))
    if "out" in rule:
        parts.append("a writable " + ("folder" if rule["out"] == "dir" else "file path")
                     + (f" ending in {rule['suffix']}" if "suffix" in rule else ""))
    if rule.get("device"):
        parts.append("auto, cpu, cuda, cuda:N or mps")
    return ", ".join(parts)


def _fail(key, text, why, default=False) -> SystemExit:
    """The one error line: the option as typed (or its default, said so), what is wrong, what is allowed."""
    return SystemExit(f"--{key}={text}{' (the default)' if default else ''}: {why}")


def convert(key: str, text: str, typ):
    """The command-line string `text` of option --key as a value of type `typ` (str, int, float, bool, or
    one of them | None). Booleans take 1/0/true/false/yes/no in any case and nothing else."""
    base = next((t for t in typing.get_args(typ) if t is not type(None)), typ)  # `int | None` -> int
    if base is bool:
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise _fail(key, text, "not a boolean; use 1/0, true/false or yes/no")
    if base is int:  # int("1.5") and int("1e3") fail: a count is written as a whole number
        try:
            return int(text)
        except ValueError:
            raise _fail(key, text, "not an integer") from None
    if base is float:
        try:
            value = float(text)
        except ValueError:
            raise _fail(key, text, "not a number") from None
        if not math.isfinite(value):  # float() reads "nan" and "inf"; no option means either
            raise _fail(key, text, "not a finite number")
        return value
    return text


def _writable(path: str) -> str | None:
    """Why an output at `path` could not be written, or None: the nearest existing folder above it must be
    a writable folder (what is missing below it is created at the first save). Checked up front: an
    unwritable out_dir used to fail only at the first checkpoint, after the work it was meant to keep."""
    p = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        return f"{p} is a file, so no folder can be made under it"
    try:  # a real probe, not os.access: root passes every access test, yet cannot write into /proc
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        return f"{p} is not writable: {e.strerror}"
    return None


def check_option(key: str, value, rule: dict, text: str | None = None, default: bool = False):
    """Check one typed option against its field's rule (see RULES); raise the one-line SystemExit.
    text: the option as the user typed it (shown in the message); default: the value was not typed."""
    text = str(value) if text is None else text
    if value is None or not rule:  # None: "not given" (e.g. gen_length then comes from the checkpoint)
        return
    allowed = _rule_text(rule)
    if "choices" in rule and value not in rule["choices"]:
        raise _fail(key, text, f"not allowed; use {allowed}", default)
    if "each" in rule:  # a comma list: name the first item that is wrong
        bad = [v for v in value.split(",") if v not in rule["each"]]
        if bad or not value:
            raise _fail(key, text, f"{bad[0] if bad else 'empty'!r} is not allowed; use {allowed}", default)
    for k, ok in (("min", lambda v, b: v >= b), ("gt", lambda v, b: v > b), ("max", lambda v, b: v <= b),
                  ("lt", lambda v, b: v < b)):
        if k in rule and not ok(value, rule[k]):
            raise _fail(key, text, f"out of range; must be {allowed}", default)
    if rule.get("path") and value and value not in rule.get("also", ()):  # also: names that are not paths ("toy")
        exists = {"file": os.path.isfile, "dir": os.path.isdir, "any": os.path.exists}[rule["path"]]
        if not exists(value):
            what = "does not exist" if not os.path.exists(value) else "is the wrong kind"
            raise _fail(key, text, f"{what}; pass {allowed}", default)
    if "out" in rule and (value or rule["out"] == "dir"):
        if not value.strip():  # --out_dir= would write into the current folder
            raise _fail(key, text, f"empty; pass {allowed} (e.g. --{key}=out)", default)
        if rule["out"] == "dir" and os.path.exists(value) and not os.path.isdir(value):
            raise _fail(key, text, "is a file; pass a folder", default)
        if rule["out"] == "file" and os.path.isdir(value):
            raise _fail(key, text, "is a folder; pass a file path", default)
        if "suffix" in rule and not value.endswith(rule["suffix"]):
            raise _fail(key, text, f"must end in {rule['suffix']}", default)
        why = _writable(os.path.join(value, "x") if rule["out"] == "dir" else value)
        if why:
            raise _fail(key, text, f"cannot write there ({why})", default)
    if rule.get("device"):  # the name, and that this machine has it (torch's own error would be a traceback)
        m = re.fullmatch(r"auto|cpu|mps|cuda(?::(\d+))?", value)
        if m is None:
            raise _fail(key, text, f"not a device; use {allowed}", default)
        n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if value.startswith("cuda") and int(m.group(1) or 0) >= n_cuda:
            raise _fail(key, text, f"no such CUDA device here ({n_cuda} visible); use auto or cpu", default)
        if value == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise _fail(key, text, "MPS is not available here; use auto or cpu", default)


# --lm.<field> and --vision.<field> change the preset's model config: one implementation for every script
MODEL_SECTIONS = {"lm": LLaDAConfig, "vision": VisionConfig}


def model_option(key: str, value):
    """Type and check one --lm.<field> / --vision.<field> override ("2" or 2) -> (section, field name,
    value). A field is a size (int >= 1; n_kv_heads and mask_id may be 0), a positive float (rope_theta,
    norm_eps, ln_eps) or a switch (bool: tie_embeddings, rope_fp32)."""
    section, _, name = key.partition(".")
    part = MODEL_SECTIONS.get(section)
    names = [f.name for f in fields(part)] if part else []
    if name not in names:
        if name.replace("-", "_") in names:
            raise SystemExit(f"unknown option --{key}: options are spelled with underscores; "
                             f"use --{section}.{name.replace('-', '_')}")
        valid = [f"--{s}.{f.name}" for s, c in MODEL_SECTIONS.items() for f in fields(c)]
        near = difflib.get_close_matches(f"--{key}", valid, 1)
        raise SystemExit(f"unknown option --{key}; " + (f"did you mean {near[0]}? " if near else "")
                         + f"model options: {', '.join(valid)}")
    typ, text = typing.get_type_hints(part)[name], value if isinstance(value, str) else None
    if text is not None:
        value = convert(key, text, typ)
    if typ is not bool:
        check_option(key, value, {"min": 0 if name in ("n_kv_heads", "mask_id") else 1} if typ is int else {"gt": 0}, text)
    return section, name, value


def model_config(preset: str, overrides: dict | None = None) -> LLaDAVConfig:
    """The preset's LLaDAVConfig with --lm.* / --vision.* overrides ({"lm.n_layers": 2} or "2") applied and
    the shapes checked (heads split the widths; RoPE needs an even head size; a patch fits the image), so
    that a bad shape is one line here instead of a traceback from a layer's constructor."""
    if preset not in PRESETS:
        raise SystemExit(f"--preset={preset}: not allowed; use one of {', '.join(PRESETS)}")
    mc = get_config(preset)  # a fresh copy: the preset table itself never changes
    for key, value in (overrides or {}).items():
        section, name, value = model_option(key, value)
        setattr(getattr(mc, section), name, value)
    for s, c in (("lm", mc.lm), ("vision", mc.vision)):
        if c.d_model % c.n_heads or (s == "lm" and (c.d_model // c.n_heads) % 2):
            raise SystemExit(f"--{s}.d_model={c.d_model} does not split into --{s}.n_heads={c.n_heads} heads"
                             + (" of even size (RoPE rotates pairs)" if s == "lm" else "") + "; change one of them")
    if mc.lm.n_heads % mc.lm.kv_heads:
        raise SystemExit(f"--lm.n_kv_heads={mc.lm.n_kv_heads} does not divide --lm.n_heads={mc.lm.n_heads}: each "
                         f"key/value head serves a whole group of query heads; use a divisor (0 = n_heads)")
    if mc.vision.patch_size > mc.vision.image_size:
        raise SystemExit(f"--vision.patch_size={mc.vision.patch_size} is larger than --vision.image_size="
                         f"{mc.vision.image_size}; an image must hold at least one patch")
    return mc


def help_text(cfg, doc: str, model: bool) -> str:
    """--help: the script's docstring, then every option with its default, its field comment and its rule
    in brackets; with model=True also the preset's --lm.* / --vision.* fields and their values."""
    def row(option, value, note):  # one option per entry, its note wrapped under a hanging indent
        shown = int(value) if isinstance(value, bool) else "" if value is None else value  # None: not set
        return textwrap.fill(f"--{option}={shown}".ljust(32) + " " + note, 118, initial_indent="  ",
                             subsequent_indent=" " * 35)
    lines = [doc.strip(), "", "options (--key=value, spelled with underscores; booleans take 1/0, true/false or "
             "yes/no, and a bare --flag means 1):"]
    rules = {f.name: f.metadata for f in fields(cfg)}
    for name, note in field_notes(type(cfg)):
        rule = _rule_text(rules[name]) if name else ""
        lines.append(row(name, getattr(cfg, name), note + (f" [{rule}]" if rule else "")) if name else f"  {note}")
    if model:
        mc = get_config(cfg.preset)
        lines.append(f"  model overrides (the values of preset {cfg.preset}; --preset=... changes them):")
        for s, c in MODEL_SECTIONS.items():
            notes = dict(field_notes(c))
            lines += [row(f"{s}.{f.name}", getattr(getattr(mc, s), f.name), notes.get(f.name, "")) for f in fields(c)]
    return "\n".join(lines)


def parse_config(cfg, argv: list[str], doc: str = "", presets: tuple | None = None, model: bool = False):
    """argv ['--key=value', ...] -> a copy of the dataclass instance (or class) `cfg` with those fields set,
    each typed, checked against its rule, and then the whole config against its own check() method.
    presets=(key, table): that option is read first and table[value] sets defaults that the explicit
    options then override (train.py's --stage). model=True also takes --lm.<field> / --vision.<field> and
    returns (cfg, overrides) for model_config(). Any bad option raises SystemExit with one line; --help
    prints help_text() and exits with 0."""
    cfg = cfg() if isinstance(cfg, type) else copy.deepcopy(cfg)  # never change the caller's instance
    spec = {f.name: f for f in fields(cfg)}
    hints = typing.get_type_hints(type(cfg))  # real types even under `from __future__ import annotations`
    raw = {}  # key -> the text as typed
    # 1. form: --key=value with a known key
    for a in argv:
        if a in ("-h", "--help"):
            print(help_text(cfg, doc, model))
            raise SystemExit(0)
        key, eq, text = a[2:].partition("=")
        if not a.startswith("--") or not key:
            raise SystemExit(f"argument {a!r} is not of the form --key=value; see --help")
        if "." in key and model:
            if not eq:
                raise SystemExit(f"--{key} needs a value: --{key}=<value> (see --help)")
            model_option(key, text)  # unknown model fields and bad values fail here, before anything runs
        elif key not in spec:  # a hyphen for an underscore is the usual slip: say so; otherwise the nearest key
            fixed = key.replace("-", "_")
            if fixed in spec:
                raise SystemExit(f"unknown option --{key}: options are spelled with underscores; use --{fixed}")
            near = difflib.get_close_matches(key, spec, 1)
            raise SystemExit(f"unknown option --{key}; " + (f"did you mean --{near[0]}? " if near else "")
                             + "valid options: " + ", ".join("--" + k for k in spec) + " (see --help)")
        elif not eq:  # a bare --flag: only booleans, and it means true
            if hints[key] is not bool:
                raise SystemExit(f"--{key} needs a value: --{key}=<value> (see --help)")
            text = "1"
        raw.pop(key, None)
        raw[key] = text  # given twice: the later one wins (a script can append overrides to a base command)
    # 2. type, the preset table first: explicit options override its values, whatever their order
    if presets and presets[0] in raw:
        key = presets[0]
        value = convert(key, raw[key], hints[key])
        check_option(key, value, spec[key].metadata, raw[key])
        setattr(cfg, key, value)
        for k, v in presets[1].get(value, {}).items():
            setattr(cfg, k, v)
    overrides = {}
    for key, text in raw.items():
        if "." in key:
            overrides[key] = model_option(key, text)[2]
        else:
            setattr(cfg, key, convert(key, text, hints[key]))
    # 3. rules: every field, defaults too (a default path may not exist on this machine), the typed ones
    # first, so that a mistake the user made is named before a default that does not fit this machine
    for name in sorted(spec, key=lambda n: n not in raw):
        check_option(name, getattr(cfg, name), spec[name].metadata, raw.get(name), default=name not in raw)
    if hasattr(cfg, "check"):  # the options that must agree with each other (e.g. gen_length and block_length)
        try:
            cfg.check()
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if model:
        model_config(cfg.preset, overrides)  # the shapes too, before any work
        return cfg, overrides
    return cfg


def run_cli(main, argv: list[str] | None = None):
    """Every script's `if __name__ == "__main__":` calls run_cli(main). What a user can cause (a bad option,
    a missing or malformed file: SystemExit with a message, ValueError, FileNotFoundError) ends as ONE line on
    stderr and exit status 1, no traceback. LLADA_DEBUG=1 shows the full traceback too. Anything else (a
    KeyError, a RuntimeError) is a bug, not the user's doing, and keeps its traceback."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:  # `python train.py --help | head`: the reader left; nothing to report
        sys.stderr.close()
        sys.exit(0)
    except (SystemExit, ValueError, FileNotFoundError) as e:
        msg = e.code if isinstance(e, SystemExit) else str(e)
        if msg is None or isinstance(msg, int):  # sys.exit(0) after --help, or a plain status: pass it on
            raise
        if os.environ.get("LLADA_DEBUG", "") not in ("", "0"):
            import traceback
            traceback.print_exc()
        print(" ".join(str(msg).split()), file=sys.stderr)  # one line, whatever the message's layout
        sys.exit(1)



if __name__ == "__main__":
    # python model.py [preset]: parameter counts, built on the meta device (no memory, no time)
    import sys
    preset = sys.argv[1] if len(sys.argv) > 1 else "llada_v_8b"
    with torch.device("meta"):
        m = LLaDAV(get_config(preset))
    print(f"preset {preset}")
    for k, v in count_params(m).items():
        print(f"  {k:15s} {v:>15,d}")
