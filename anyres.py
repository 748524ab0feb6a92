"""
Images at any resolution, as LLaDA-V sees them from stage 2 on ("anyres_max_4", REFERENCE 2.6).

Where this sits in the flow:  image -> [crops] -> ViT -> projector -> [packed visual tokens] -> token sequence.

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

import torch
import torch.nn.functional as F
from PIL import Image

from vision import preprocess, to_rgb

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
    grid = feats[1:].view(rows, cols, n, n, d)
    fmap = grid.permute(4, 0, 2, 1, 3).reshape(d, rows * n, cols * n)  # (d, rows n, cols n)
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
