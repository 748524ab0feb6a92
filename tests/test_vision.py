"""Tests for vision.py: SigLIP preprocessing, image-mode handling and the ViT tower (ML-GSAI/LLaDA-V
train/llava/model/multimodal_encoder/siglip_encoder.py; google/siglip2-so400m-patch14-384 config.json). Tiny configs on
the CPU, no downloads.

    python -m pytest -q tests/test_vision.py
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vision
from vision import VisionConfig, VisionTower, load_image, preprocess, to_rgb

CFG = VisionConfig(image_size=16, patch_size=4, d_model=32, n_layers=3, n_heads=4, mlp_hidden=64)


def rand_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def rgb_at(img):
    return to_rgb(img).getpixel((0, 0))


@pytest.fixture
def tower():
    """A tiny float64 tower with every parameter random (LayerNorm affines included)."""
    torch.manual_seed(0)
    t = VisionTower(CFG).double()
    t.init_weights()
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "layer_norm" in name or "position" in name:
                p.add_(0.3 * torch.randn_like(p))
    return t.eval()


# ------------------------------------------------------------------------------------------------
# Preprocessing

def test_preprocess_matches_siglip_recipe():
    """preprocess = RGB -> PIL bicubic resize to SxS -> /255 -> (x-0.5)/0.5, as a (3,S,S) tensor in [-1,1]."""
    img = rand_image(37, 23)
    x = preprocess(img, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    ref = np.asarray(img.resize((16, 16), Image.BICUBIC), dtype=np.float32) / 255.0
    ref = torch.from_numpy((ref - 0.5) / 0.5).permute(2, 0, 1)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    # bicubic, not some other filter
    bil = np.asarray(img.resize((16, 16), Image.BILINEAR), dtype=np.float32) / 127.5 - 1
    assert not torch.allclose(x, torch.from_numpy(bil).permute(2, 0, 1), atol=1e-3)


def test_preprocess_white_and_black_hit_the_ends():
    """A white image maps to exactly +1 everywhere and a black one to exactly -1."""
    assert torch.equal(preprocess(Image.new("RGB", (40, 30), (255, 255, 255)), 8), torch.ones(3, 8, 8))
    assert torch.equal(preprocess(Image.new("RGB", (40, 30), (0, 0, 0)), 8), -torch.ones(3, 8, 8))


def test_preprocess_squashes_non_square_without_crop():
    """A wide image is resized whole to SxS (aspect not kept), not centre-cropped: a red stripe on the
    left third of the image covers the left third of the output."""
    a = np.zeros((30, 60, 3), dtype=np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    x = preprocess(Image.fromarray(a), 12)
    red = (x[0] > 0) & (x[2] < 0)
    assert red[:, :3].all() and not red[:, 5:].any()
    crop = Image.fromarray(a).crop((15, 0, 45, 30))  # what a centre crop would have fed in
    assert not torch.allclose(x, preprocess(crop, 12))


# ------------------------------------------------------------------------------------------------
# Image modes

def test_to_rgb_8bit_modes():
    """L, LA, P, RGBA, CMYK all become the right 8-bit RGB (alpha dropped, not composited)."""
    assert rgb_at(Image.new("L", (2, 2), 100)) == (100, 100, 100)
    assert rgb_at(Image.new("LA", (2, 2), (77, 0))) == (77, 77, 77)
    assert rgb_at(Image.new("RGBA", (2, 2), (10, 20, 30, 0))) == (10, 20, 30)
    assert rgb_at(Image.new("CMYK", (2, 2), (255, 0, 0, 0))) == (0, 255, 255)  # pure cyan
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    assert rgb_at(p) == (12, 34, 56)
    for m in ["L", "LA", "P", "RGBA", "CMYK"]:
        out = to_rgb(Image.new(m, (3, 2)))
        assert out.mode == "RGB" and out.size == (3, 2)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_to_rgb_16bit_is_scaled_not_clipped(mode):
    """16-bit grey is scaled by 255/65535 (65535 -> 255, 32896 -> 128, 1000 -> 4), not clipped at 255 as
    pillow's own convert does, nor wrapped around."""
    a = np.array([[0, 257, 1000, 32896, 40000, 65535]], dtype=np.uint16)
    img = Image.fromarray(a) if mode == "I;16" else Image.frombytes(mode, (6, 1), a.astype(">u2").tobytes())
    assert img.mode == mode
    out = np.asarray(to_rgb(img))
    assert out.shape == (1, 6, 3) and (out == out[..., :1]).all()  # grey
    assert out[0, :, 0].tolist() == [0, 1, 4, 128, 156, 255]
    x = preprocess(img, 6)  # 6 -> 6 columns: no horizontal resampling
    assert (x[:, :, 0] == -1).all() and (x[:, :, -1] == 1).all()


def test_to_rgb_32bit_int_mode():
    """Mode "I" holding 8-bit values stays as is; holding 16-bit values is scaled by 255/65535."""
    assert rgb_at(Image.new("I", (1, 1), 200)) == (200, 200, 200)
    assert rgb_at(Image.fromarray(np.array([[32896, 0]], dtype=np.int32), mode="I")) == (128, 128, 128)


def test_to_rgb_unsupported_mode_says_what_to_do():
    """A float ("F") image raises ValueError that names the mode and the fix."""
    with pytest.raises(ValueError) as e:
        to_rgb(Image.new("F", (2, 2), 0.5))
    msg = str(e.value)
    assert "'F'" in msg and "RGB" in msg and "convert" in msg


@pytest.mark.parametrize("mode", sorted(vision._RGB_CONVERTIBLE | vision._16BIT_MODES | {"La"}))
def test_every_listed_mode_converts(mode):
    """Every mode to_rgb claims to support gives a same-size RGB image (no pillow error escapes)."""
    img = Image.new(mode, (3, 2))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (3, 2)


# ------------------------------------------------------------------------------------------------
# load_image

def test_load_image_errors(tmp_path):
    """A missing file -> FileNotFoundError naming the path; garbage bytes -> one-line ValueError."""
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(missing)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image\n" * 10)
    with pytest.raises(ValueError) as e:
        load_image(bad)
    assert "bad.png" in str(e.value) and "\n" not in str(e.value)


def test_load_image_reads_palette_and_16bit_png(tmp_path):
    """Real files round-trip: a P-mode PNG loads as its palette RGB, a 16-bit PNG is scaled to 8 bits."""
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    p.save(tmp_path / "p.png")
    img = load_image(tmp_path / "p.png")
    assert img.mode == "RGB" and img.getpixel((1, 1)) == (200, 100, 50)
    Image.fromarray(np.full((2, 2), 32896, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert load_image(tmp_path / "g16.png").getpixel((0, 0)) == (128, 128, 128)


# ------------------------------------------------------------------------------------------------
# Vision tower

def manual_layer(layer, x):
    """One SigLIP encoder layer from its formula: pre-LN, MHA with bias and no mask, gelu-tanh MLP."""
    B, N, D = x.shape
    H = layer.self_attn.n_heads
    a = layer.self_attn
    h = F.layer_norm(x, (D,), layer.layer_norm1.weight, layer.layer_norm1.bias, eps=1e-6)
    q, k, v = (F.linear(h, p.weight, p.bias).view(B, N, H, D // H).transpose(1, 2)
               for p in (a.q_proj, a.k_proj, a.v_proj))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1)
    x = x + F.linear((att @ v).transpose(1, 2).reshape(B, N, D), a.out_proj.weight, a.out_proj.bias)
    h = F.layer_norm(x, (D,), layer.layer_norm2.weight, layer.layer_norm2.bias, eps=1e-6)
    u = F.linear(h, layer.mlp.fc1.weight, layer.mlp.fc1.bias)
    u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))  # gelu, tanh approx
    return x + F.linear(u, layer.mlp.fc2.weight, layer.mlp.fc2.bias)


def manual_embed(tower, pixels):
    """Patch embedding by hand: cut row-major p x p patches, flatten (C, p, p), dot with the conv weight."""
    p, D = CFG.patch_size, CFG.d_model
    patches = pixels.unfold(2, p, p).unfold(3, p, p)                    # (B, 3, G, G, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # (B, N, 3*p*p), row-major
    w = tower.patch_embedding.weight.reshape(D, -1)
    return patches @ w.T + tower.patch_embedding.bias + tower.position_embedding.weight


def embed_stage(tower, pixels):
    """What the tower feeds its first layer, caught with a hook."""
    got = {}
    h = tower.layers[0].register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0]))
    tower(pixels)
    h.remove()
    return got["x"]


def test_tower_shape_and_layer_count(tower):
    """(B,3,S,S) -> (B,N,D) with N=(S/p)^2; n_layers-1 layers are built; n_layers<2 or bad heads refused."""
    assert tower(torch.zeros(2, 3, 16, 16)).shape == (2, 16, 32)
    assert len(tower.layers) == CFG.n_layers - 1
    keys = tower.state_dict().keys()
    assert f"layers.{CFG.n_layers - 2}.mlp.fc1.weight" in keys and f"layers.{CFG.n_layers - 1}.mlp.fc1.weight" not in keys
    assert tower.position_embedding.weight.shape == (16, 32)
    with pytest.raises(ValueError):
        VisionTower(VisionConfig(image_size=16, patch_size=4, d_model=32, n_layers=1, n_heads=4, mlp_hidden=64))
    with pytest.raises(ValueError):
        VisionTower(VisionConfig(image_size=16, patch_size=4, d_model=30, n_layers=2, n_heads=4, mlp_hidden=64))


def test_encoder_layer_formula_with_gelu_tanh(tower):
    """EncoderLayer == pre-LN attention + gelu-tanh MLP from the formula; exact gelu would differ."""
    torch.manual_seed(1)
    x = 3 * torch.randn(2, 16, 32, dtype=torch.float64)
    layer = tower.layers[0]
    torch.testing.assert_close(layer(x), manual_layer(layer, x), rtol=0, atol=1e-10)
    exact = layer.mlp.fc2(F.gelu(layer.mlp.fc1(layer.layer_norm2(x))))
    assert not torch.allclose(layer.mlp(layer.layer_norm2(x)), exact, rtol=0, atol=1e-6)


def test_patch_embedding_is_row_major(tower):
    """The embedding stage equals a hand unfold (row-major patches) + position embedding, and touching
    only the pixels of patch (row 0, col 1) changes only token 1; patch (row 1, col 0) only token G."""
    torch.manual_seed(2)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    e = embed_stage(tower, x)
    torch.testing.assert_close(e, manual_embed(tower, x), rtol=0, atol=1e-10)
    G, p = 4, 4
    for (r, c) in [(0, 1), (1, 0)]:
        y = x.clone()
        y[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] += 0.5
        changed = (embed_stage(tower, y) - e).abs().amax(dim=(0, 2)) > 0
        assert changed.nonzero().flatten().tolist() == [r * G + c]


def test_tower_output_is_penultimate_layer_without_post_ln(tower):
    """features = layers applied to the embeddings, with no post-LayerNorm: output equals the manual
    recomputation, ignores post_layernorm's parameters, and differs from post_layernorm(output)."""
    torch.manual_seed(3)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    out = tower(x)
    h = manual_embed(tower, x)
    for layer in tower.layers:
        h = manual_layer(layer, h)
    torch.testing.assert_close(out, h, rtol=0, atol=1e-9)
    assert not torch.allclose(out, tower.post_layernorm(out), atol=1e-3)
    with torch.no_grad():
        tower.post_layernorm.weight.mul_(5.0)
        tower.post_layernorm.bias.add_(1.0)
    assert torch.equal(tower(x), out)


def test_post_layernorm_frozen_rest_trainable(tower):
    """post_layernorm has requires_grad False; every other parameter trains and gets a gradient."""
    assert all(not p.requires_grad for p in tower.post_layernorm.parameters())
    tower(torch.rand(1, 3, 16, 16, dtype=torch.float64)).square().sum().backward()
    for name, p in tower.named_parameters():
        if not name.startswith("post_layernorm"):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None


def test_tower_is_bidirectional(tower):
    """Changing only the last patch's pixels changes the first token's features (no causal mask)."""
    x = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    y = x.clone()
    y[:, :, -4:, -4:] = 1.0
    assert not torch.allclose(tower(x)[0, 0], tower(y)[0, 0], atol=1e-6)


def test_tower_rejects_wrong_size(tower):
    """Images of the wrong size raise ValueError pointing at preprocess."""
    with pytest.raises(ValueError, match="preprocess"):
        tower(torch.zeros(1, 3, 20, 20))


def test_valid_conv_drops_the_remainder():
    """With S not divisible by p ("valid" conv, like 384/14), N = floor(S/p)^2 and the last S mod p
    rows/columns of pixels are ignored."""
    torch.manual_seed(4)
    t = VisionTower(VisionConfig(image_size=18, patch_size=4, d_model=32, n_layers=2, n_heads=4, mlp_hidden=64))
    x = torch.rand(1, 3, 18, 18)
    out = t(x)
    assert out.shape == (1, 16, 32)
    y = x.clone()
    y[:, :, 16:, :] = 5.0
    y[:, :, :, 16:] = -5.0
    assert torch.equal(t(y), out)


def test_sincos_position_init():
    """The from-scratch position embedding is 2D sin-cos: patches in the same column share the x part,
    in the same row the y part, every patch has its own code, and init_weights installs it."""
    from vision import sincos_2d
    g, d = 4, 32
    pe = sincos_2d(g, d).view(g, g, d)  # (row, col, d)
    q = d // 4
    assert torch.allclose(pe[0, :, :2 * q], pe[3, :, :2 * q]) and not torch.allclose(pe[:, 0, :2 * q], pe[:, 1, :2 * q])
    assert torch.allclose(pe[:, 0, 2 * q:], pe[:, 3, 2 * q:]) and not torch.allclose(pe[0, :, 2 * q:], pe[1, :, 2 * q:])
    assert torch.cdist(pe.view(g * g, d), pe.view(g * g, d)).add(torch.eye(g * g)).min() > 0.1
    t = VisionTower(CFG)
    t.init_weights()
    n = CFG.image_size // CFG.patch_size
    assert torch.allclose(t.position_embedding.weight, sincos_2d(n, CFG.d_model))


def test_sincos_base_separates_neighbours_on_a_small_board():
    """On the toy's 4 x 4 board, base 10 keeps neighbouring patches far apart (a third of the code's norm);
    MAE's base 10000 spends most frequencies on near-constant dims and leaves them at half that."""
    from vision import sincos_2d

    def nearest(pe):
        return (torch.cdist(pe, pe) + 1e9 * torch.eye(len(pe))).min() / pe.norm(dim=1).mean()

    assert nearest(sincos_2d(4, 128)) > 0.3 > 0.2 > nearest(sincos_2d(4, 128, base=10000))
