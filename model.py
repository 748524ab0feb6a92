"""
The model: LLaDA (a bidirectional transformer), the MLP projector, and the LLaDA-V glue.

Where this sits in the flow:  image -> ViT -> [projector -> token sequence -> LLaDA] -> masked diffusion.

LLaDA-8B (GSAI-ML/LLaDA-8B-Instruct config.json; ML-GSAI/LLaDA-V train/llada_v_prepare/files/config.json) is a
LLaMA-shaped transformer with the causal mask removed:
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

Projector ("mlp2x_gelu", ML-GSAI/LLaDA-V train/llava/model/multimodal_projector/builder.py::build_vision_projector):
    P(f) = W_2 gelu_erf(W_1 f + b_1) + b_2,   1152 -> 4096 -> 4096.

LLaDA-V glue (ML-GSAI/LLaDA-V train/llava/model/llava_arch.py::prepare_inputs_labels_for_multimodal): the tokens
carry IMAGE_TOKEN_INDEX (-200) placeholders whose embeddings are replaced, in order, by the projected visual
features P(ViT(image)). From stage 2 on an image is several crops whose features are re-assembled, unpadded and
closed row by row with a learned `image_newline` vector (vision.py's image modes; LLaDAV.encode_image_crops for
one image, encode_crops for a micro-batch: one tower call over every crop, then packing image by image).

Also here: LoRA, y = W x + (alpha / r) B A x on frozen W (fine-tuning on one GPU), and the FLOPs of a training
step (MFU's numerator, as nanoGPT's estimate_mfu). The command line filling these configs is cli.py's.
"""
import math
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
    n_heads: int = 32         # query heads; head_dim = d_model / n_heads
    n_kv_heads: int = 0       # key/value heads: 0 = n_heads (plain multi-head attention, as LLaDA-8B); fewer =
                              # grouped-query attention (iLLaDA): each key/value head serves n_heads / n_kv_heads
                              # query heads, which shrinks k_proj, v_proj and the KV cache by that factor
    mlp_hidden: int = 12288   # SwiGLU hidden size
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 8192   # the longest sequence the model takes (longer prompts are refused); RoPE has no limit
    tie_embeddings: bool = False  # True: the output head is the input embedding E (logits = h E^T; iLLaDA);
                                  # LLaDA-8B and LLaDA-V have a separate head (GSAI-ML/LLaDA-8B-Instruct config.json;
                                  # ML-GSAI/LLaDA-V train/llada_v_prepare/files/config.json)
    mask_id: int = LLADA_MASK_ID  # [MASK]: the official vocabulary's <|mdm_mask|> (config.json's mask_token_id);
                                  # the toy and other tokenizers use their own <|mdm_mask|> id instead
    rope_fp32: bool = True    # rotate q, k in fp32 (original LLaDA, rope_full_precision); False: in the
                              # activation dtype, as LLaDA-V's LLaMA-style port does (ML-GSAI/LLaDA-V
                              # train/llava/model/language_model/modeling_llada.py::LLaDARotaryEmbedding).
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
    # (from stage 2 on); "spatial_unpad" adds the learned image_newline (ML-GSAI/LLaDA-V train/llava/model/llava_arch.py)
    image_aspect_ratio: str = "square"
    mm_patch_merge_type: str = "flat"

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        extra = {k: d[k] for k in ("image_aspect_ratio", "mm_patch_merge_type") if k in d}  # absent in old checkpoints
        return cls(lm=LLaDAConfig(**d["lm"]), vision=VisionConfig(**d["vision"]), tokenizer=d["tokenizer"], **extra)


PRESETS = {
    # Trains on a 2-core CPU in minutes on the synthetic shapes. The ViT runs n_layers - 1 = one layer: what that
    # saves buys the language model more steps for the same compute (docs/notebook.md, 2026-12-07).
    "toy": LLaDAVConfig(
        lm=LLaDAConfig(vocab_size=512, d_model=96, n_layers=4, n_heads=6, mlp_hidden=256, max_seq_len=256),
        vision=VisionConfig(image_size=64, patch_size=16, d_model=96, n_layers=2, n_heads=4, mlp_hidden=384),
        tokenizer="toy"),
    # One GPU: the real vocabulary, GPT-2-small-sized language model, a small 224-pixel ViT (~300M).
    "small": LLaDAVConfig(
        lm=LLaDAConfig(d_model=768, n_layers=12, n_heads=12, mlp_hidden=2048),
        vision=VisionConfig(image_size=224, patch_size=14, d_model=384, n_layers=12, n_heads=6, mlp_hidden=1536)),
    # The official shapes: LLaDA-8B + SigLIP2 so400m/14 at 384 pixels + the mlp2x_gelu projector; RoPE in the
    # activation dtype, as LLaDA-V's LLaMA-style port runs it (see LLaDAConfig.rope_fp32).
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
    """One pre-norm transformer block. Names follow LLaDA-V's LLaMA-style checkpoint (ML-GSAI/LLaDA-V
    train/llada_v_prepare/rename_checkpoint.py)."""

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
        # split the heads, (B, L, H hd) -> (B, H, L, hd), with view/transpose: einops' per-call cost shows in toy steps
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
        `output_positions` (B, L): the head is the biggest matmul, and the loss needs masked rows only (the
        sampler passes a window instead, (slice(None), slice(a, b)): logits (B, b - a, V), a view, no gather).
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
# LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Sec. 4.1): fine-tuning, one GPU

class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trained low-rank update (the LoRA paper's Eq. 3):
        y = W x + b + (alpha / r) B A dropout(x),    W (out, in) and b frozen, A (r, in), B (out, r) trained
    A ~ kaiming_uniform(a = sqrt(5)) and B = 0, as PEFT's LoraLayer.reset_lora_parameters: B A = 0, so
    training starts exactly at the base model. Merged: W' = W + (alpha / r) B A, a plain layer again.
    The base keeps its weight / bias names, A and B sit in lora_A / lora_B: PEFT's names (checkpoint.py)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear's: the base's parameters are taken over, not drawn anew
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)   # A (r, in)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)  # B (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        # the adapter runs in its own dtype (an fp32 adapter on a bf16 base; autocast decides on a GPU)
        delta = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return F.linear(x, self.weight, self.bias) + (delta * self.scaling).to(x.dtype)

    def merged_weight(self):
        """W + (alpha / r) B A, computed in fp32 (fp64 for an fp64 model), returned in W's dtype."""
        dt = torch.promote_types(self.weight.dtype, torch.float32)
        return (self.weight.to(dt) + self.scaling * self.lora_B.weight.to(dt) @ self.lora_A.weight.to(dt)).to(self.weight.dtype)


LORA_LM = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
           "down": "down_proj"}  # --lora_targets names of the language model's projections
LORA_TARGETS = tuple(LORA_LM) + ("vision", "projector")  # + every linear layer of the ViT / of the projector


def add_lora(model: nn.Module, r: int, alpha: float, targets: str = "q,k,v,o,gate,up,down", dropout: float = 0.0,
             base_dtype=None):
    """Wrap the `targets` linear layers of a LLaDAV (or bare LLaDA) in LoRALinear, freeze all but their A and B
    -> the wrapped modules' names. base_dtype (bf16 on a GPU) stores the frozen weights in it; A, B keep theirs."""
    want = targets.split(",")
    lm = {LORA_LM[t] for t in want if t in LORA_LM}
    picked = [n for n, m in model.named_modules() if type(m) is nn.Linear and (
        (n.split(".")[-1] in lm and n.split(".")[-3] == "layers" and not n.startswith("vision."))
        or ("vision" in want and n.startswith("vision.")) or ("projector" in want and n.startswith("projector.")))]
    for n in picked:
        parent, _, leaf = n.rpartition(".")
        setattr(model.get_submodule(parent), leaf, LoRALinear(model.get_submodule(n), r, alpha, dropout))
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
        if base_dtype is not None and ".lora_" not in n:
            p.data = p.data.to(base_dtype)
    return picked


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
#     MFU = FLOPs per step / step time / peak FLOP/s of the device (cli.device_peak: a GPU's data-sheet bf16
#     figure, a CPU's measured fp32 matmul rate). tests/test_model.py holds this count to torch's FLOP counter.


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
    return {"language model": n(model.llm), "vision tower": n(model.vision), "projector": n(model.projector),
            "total": n(model)}


if __name__ == "__main__":  # python model.py [preset]: parameter counts, on the meta device (no memory, no time)
    import sys
    preset = sys.argv[1] if len(sys.argv) > 1 else "llada_v_8b"
    with torch.device("meta"):
        m = LLaDAV(get_config(preset))
    print(f"preset {preset}")
    for k, v in count_params(m).items():
        print(f"  {k:15s} {v:>15,d}")
