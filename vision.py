"""
The vision encoder: a SigLIP(2)-style Vision Transformer, written from scratch.

Where this sits in the flow:  [image -> ViT] -> projector -> token sequence -> masked diffusion.

Preprocessing (the SigLipImageProcessor that ML-GSAI/LLaDA-V hard-codes in
train/llava/model/multimodal_encoder/siglip_encoder.py):
    RGB -> bicubic resize to S x S (no aspect kept, no crop) -> x / 255 -> (x - 0.5) / 0.5  in [-1, 1]

Encoder, for an image of S x S pixels cut into N = (S / p)^2 patches of p x p:
    h_0      = Conv2d_{kernel p, stride p}(image) + E_pos                       (B, N, D), no CLS token
    a_l      = h_{l-1} + Attn(LN1(h_{l-1}))                                     pre-LayerNorm, eps 1e-6
    h_l      = a_l     + fc2(gelu_tanh(fc1(LN2(a_l))))
    Attn(x)  = out( softmax(q k^T / sqrt(d_head)) v ),  q, k, v = Linear(x)     (all with bias, no mask)
    features = h_{L-1}                                                         (B, N, D)

LLaDA-V deletes the last of the L encoder layers and feeds the projector the output of the layer
before it, *without* the post-LayerNorm and without the attention-pooling head. So a tower with
`n_layers = 27` (the SigLIP2 so400m checkpoint) runs 26 layers here; `post_layernorm` is kept only
so that checkpoints keep their official layout, and it is frozen because nothing reads it.

Image modes: how one picture becomes S x S crops and then visual tokens (ML-GSAI/LLaDA-V
train/llava/mm_utils.py::process_anyres_image, train/llava/model/llava_arch.py::prepare_inputs_labels_for_multimodal;
stage 2 on).

Three modes, all built from S x S crops (S = 384) that the ViT turns into n x n features (n = 27):
  square        stage 1: squash the image to S x S.                                  n^2        =  729 tokens
  pad           multi-image samples: pad to a square with grey (127,127,127), then
                squash; with a newline ("spatial_unpad" merge) one extra token.      n^2 + 1    =  730
  anyres_max_4  stages 2-3 and inference:
    1. grid choice: among the 36 resolutions (i S, j S), i, j = 1..6, take the one that maximises the
       effective resolution  min(w h s^2, w h),  s = min(W/w, H/h)  (ties: least wasted area W H - eff.)
    2. resize keeping the aspect ratio to fit (W, H), centre it on black, cut S x S crops row by row;
       a base image (the whole image squashed to S x S) goes first.
    3. features: base -> n^2 tokens as they are. Crops -> reassembled into a (rows n) x (cols n) map,
       the rows/columns that came from the black padding are cut off (unpad) -> h x w; if
       r = sqrt(h w / (4 n^2)) > 1.1 the map is bilinearly shrunk to (h // r) x (w // r) (about 4 crops'
       worth of tokens at most); then one learned `image_newline` vector ends every row.
       tokens = n^2 + h' (w' + 1):  384x384 -> 729 + 27*28 = 1485,  640x480 -> 729 + 40*55 = 2929.
Official functions: mm_utils.select_best_resolution, resize_and_pad_image, divide_to_patches,
process_anyres_image, expand2square, unpad_image; llava_arch.prepare_inputs_labels_for_multimodal.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image


@dataclass
class VisionConfig:
    image_size: int = 384   # S, the square input in pixels
    patch_size: int = 14    # p: (S // p)^2 patches, one visual token each ("valid" conv drops the remainder)
    d_model: int = 1152     # D, the tower's width
    n_layers: int = 27      # layers in the checkpoint; LLaDA-V runs n_layers - 1 of them
    n_heads: int = 16       # head_dim = D / n_heads
    mlp_hidden: int = 4304
    ln_eps: float = 1e-6

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        # (B, N, D) -> (B, H, N, D/H)
        q, k, v = (p(x).view(B, N, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.d_model)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # SigLIP's gelu_pytorch_tanh


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """pixels (B, 3, S, S) in [-1, 1] -> features (B, N, D): the penultimate layer, pre post-LN."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"vision d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}")
        if cfg.n_layers < 2:
            raise ValueError("the vision tower needs n_layers >= 2: LLaDA-V drops the last layer")
        self.cfg = cfg
        # "valid" convolution with bias: one D-vector per p x p patch
        self.patch_embedding = nn.Conv2d(3, cfg.d_model, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.n_patches, cfg.d_model)  # learned, one per patch
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers - 1))  # last one deleted
        self.post_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.post_layernorm.requires_grad_(False)  # unused by LLaDA-V (see docstring)

    def forward(self, pixels):  # (B, 3, S, S)
        if pixels.shape[-2:] != (self.cfg.image_size,) * 2:
            raise ValueError(f"expected {self.cfg.image_size}x{self.cfg.image_size} images, got "
                             f"{tuple(pixels.shape[-2:])}; run them through vision.preprocess first")
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, D, S/p, S/p)
        x = x.flatten(2).transpose(1, 2) + self.position_embedding.weight      # (B, N, D), row-major
        for layer in self.layers:
            x = layer(x)
        return x  # (B, N, D)

    def init_weights(self):
        """From-scratch init (only for toy training; real runs load SigLIP2): normal(0, 1/sqrt(fan_in))
        weights, zero biases, 2D sin-cos position embedding."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                nn.init.normal_(m.weight, std=1 / math.sqrt(fan_in))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):  # position embedding: 2D sin-cos, see sincos_2d
                with torch.no_grad():
                    m.weight.copy_(sincos_2d(self.cfg.image_size // self.cfg.patch_size, self.cfg.d_model))
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def sincos_2d(grid: int, dim: int, base: float = 10.0) -> torch.Tensor:
    """(grid*grid, dim) 2D sin-cos position codes (MAE), row-major: a quarter of the dims each holds
    sin(x w_k), cos(x w_k), sin(y w_k), cos(y w_k) with w_k = base^(-k / (dim/4)). The position
    embedding stays learned (SigLIP's); only the from-scratch init uses them, so that a patch's row and
    column are linear in its token from the first step, which the toy's spatial questions need.
    base 10 (not MAE's 10000): the toy board is only 4 patches wide, and with 10000 most w_k are so low
    that x w_k barely changes across it. init_weights installs the codes at unit scale: at a fraction of
    it the objects' content swamped them, and a linear probe read an object token's row and column after
    the projector much less often (the probes and runs: docs/notebook.md)."""
    q = dim // 4
    w = 1.0 / base ** (torch.arange(q, dtype=torch.float32) / q)                       # (q,)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    ox, oy = xs.reshape(-1, 1) * w, ys.reshape(-1, 1) * w                                # (grid^2, q)
    pe = torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], dim=1)                     # (grid^2, 4q)
    return F.pad(pe, (0, dim - 4 * q))                                # (grid^2, dim)


# Image modes pillow can hand us, and how each becomes 8-bit RGB.
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_RGB_CONVERTIBLE = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1", "RGBa"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any common pillow image to 8-bit RGB, as the official processor does with
    `img.convert("RGB")` (alpha is dropped, not composited). pillow's own conversion of 16-bit images
    clips every value above 255 to white, so those are rescaled here (x / 257 maps 0..65535 to 0..255)."""
    if img.mode in _16BIT_MODES:
        a = torch.from_numpy(np.asarray(img, dtype=np.float64))
        top = 65535.0 if img.mode != "I" or a.max() > 255 else 255.0
        a = (a.clamp(0, top) * (255.0 / top)).round().to(torch.uint8).numpy()
        return Image.fromarray(a, mode="L").convert("RGB")
    if img.mode == "La":  # premultiplied alpha: pillow converts it to RGB only via LA
        img = img.convert("LA")
    if img.mode not in _RGB_CONVERTIBLE:
        raise ValueError(f"image mode {img.mode!r} is not supported; save the image as 8-bit RGB "
                         f"(e.g. PIL: img.convert('RGB').save('x.png')) and try again")
    return img.convert("RGB")


def load_image(path) -> Image.Image:
    """Open an image file as RGB with one-line errors for the usual mistakes."""
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist; check the path") from None
    except Exception as e:
        raise ValueError(f"cannot read image {path} ({type(e).__name__}: {e}); pass a PNG or JPEG file") from None
    return to_rgb(img)


def preprocess(img: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) float tensor in [-1, 1] (SigLipImageProcessor)."""
    img = to_rgb(img).resize((size, size), Image.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    x = x.permute(2, 0, 1).float() / 255.0  # rescale by 1/255, HWC -> CHW
    return (x - 0.5) / 0.5                  # normalise with mean 0.5, std 0.5


# ----------------------------------------------------------------------------------------------
# Image modes: square, pad, anyres_max_4 (official mm_utils.py / llava_arch.py)
MODES = ("square", "pad", "anyres_max_4")
PAD_COLOR = (127, 127, 127)  # int(0.5 * 255) per channel: SigLIP's image_mean
MAX_CROPS = 4                # the "4" of anyres_max_4


def grid_pinpoints(size: int = 384, lo: int = 1, hi: int = 6):
    """"(1x1),...,(6x6)" -> [(width, height)] in pixels, in the official order (i outer, j inner)."""
    return [(i * size, j * size) for i in range(lo, hi + 1) for j in range(lo, hi + 1)]


def select_best_resolution(image_size, candidates):
    """image_size (W, H) -> the candidate (w, h) with the largest effective resolution, then least waste."""
    W, H = image_size
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in candidates:
        s = min(w / W, h / H)
        eff = min(int(W * s) * int(H * s), W * H)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    return best


def resize_and_pad(img: Image.Image, target):
    """Resize keeping the aspect ratio to fit target (w, h), centred on black (resize_and_pad_image)."""
    W, H = img.size
    tw, th = target
    sw, sh = tw / W, th / H
    if sw < sh:
        nw, nh = tw, min(math.ceil(H * sw), th)
    else:
        nw, nh = min(math.ceil(W * sh), tw), th
    out = Image.new("RGB", (tw, th), (0, 0, 0))
    out.paste(img.resize((nw, nh)), ((tw - nw) // 2, (th - nh) // 2))  # PIL's default filter: bicubic
    return out


def expand_to_square(img: Image.Image, color=PAD_COLOR):
    """Pad the short side to a square, image centred (expand2square)."""
    W, H = img.size
    if W == H:
        return img
    out = Image.new(img.mode, (max(W, H),) * 2, color)
    out.paste(img, ((max(W, H) - W) // 2, (max(W, H) - H) // 2))
    return out


def process_image(img: Image.Image, mode: str = "anyres_max_4", size: int = 384):
    """PIL image -> (crops (K, 3, S, S) in [-1, 1], original size (W, H)). K = 1 in square/pad mode;
    K = 1 + rows * cols in anyres mode, the base image first."""
    if mode not in MODES:
        raise ValueError(f"image mode {mode!r} is not supported; use one of {MODES}")
    img = to_rgb(img)
    if mode == "square":
        return preprocess(img, size)[None], img.size
    if mode == "pad":
        return preprocess(expand_to_square(img), size)[None], img.size
    w, h = select_best_resolution(img.size, grid_pinpoints(size))
    canvas = resize_and_pad(img, (w, h))
    crops = [canvas.crop((x, y, x + size, y + size)) for y in range(0, h, size) for x in range(0, w, size)]
    base = img.resize((size, size))
    return torch.stack([preprocess(c, size) for c in [base] + crops]), img.size


def unpad(feat, image_size):
    """feat (C, h, w) of the padded canvas -> the rows or columns covering the image only (unpad_image)."""
    W, H = image_size
    _, h, w = feat.shape
    if W / H > w / h:   # wider than the canvas: padding above and below
        new_h = int(H * (w / W))
        p = (h - new_h) // 2
        return feat[:, p:h - p, :]
    new_w = int(W * (h / H))
    p = (w - new_w) // 2
    return feat[:, :, p:w - p]


def pack_features(feats, image_size, mode: str, newline=None, size: int = 384):
    """Per-crop features (K, n*n, d) of one image -> its visual token sequence (N, d).
    newline (d,) or None: the `image_newline` vector (present with mm_patch_merge_type "spatial_unpad")."""
    K, N, d = feats.shape
    if K == 1:  # square / pad: the crop's tokens, plus one newline when the model has one
        return feats[0] if newline is None else torch.cat([feats[0], newline[None].to(feats.dtype)])
    if mode != "anyres_max_4" or newline is None:
        raise ValueError(f"{K} crops need mode anyres_max_4 and a model with image_newline "
                         f"(mm_patch_merge_type='spatial_unpad'); got mode {mode!r}")
    n = math.isqrt(N)
    W, H = select_best_resolution(image_size, grid_pinpoints(size))
    cols, rows = W // size, H // size
    if rows * cols != K - 1:
        raise ValueError(f"{K - 1} crops do not make the {rows}x{cols} grid chosen for an image of {image_size}")
    # crops row by row, each n x n patches row by row -> one (d, rows n, cols n) map of the padded canvas
    fmap = rearrange(feats[1:], "(r c) (y x) d -> d (r y) (c x)", r=rows, c=cols, y=n, x=n)
    fmap = unpad(fmap, image_size)
    _, h, w = fmap.shape
    times = math.sqrt(h * w / (MAX_CROPS * N))
    if times > 1.1:
        fmap = F.interpolate(fmap[None], size=[int(h // times), int(w // times)], mode="bilinear")[0]
    nl = newline.to(fmap.dtype)[:, None, None].expand(d, fmap.shape[1], 1)
    fmap = torch.cat([fmap, nl], dim=2)                                 # (d, h', w' + 1)
    return torch.cat([feats[0], fmap.flatten(1).transpose(0, 1)])      # (n^2 + h'(w'+1), d)


def num_tokens(image_size, mode: str, newline: bool, size: int = 384, patch: int = 14) -> int:
    """The number of visual tokens pack_features makes, without running anything."""
    n = size // patch
    if mode != "anyres_max_4":
        return n * n + int(newline)
    W, H = select_best_resolution(image_size, grid_pinpoints(size))
    K = 1 + (W // size) * (H // size)
    # 1-channel stand-in features: the shape arithmetic is the same
    return pack_features(torch.zeros(K, n * n, 1), image_size, mode, torch.zeros(1), size).shape[0]
