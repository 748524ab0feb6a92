"""Tests for model.py: the bidirectional LLaDA transformer, RoPE, RMSNorm, the projector, the LLaDA-V glue,
the 8B preset's shapes, and checkpoints. Tiny configs, CPU only, no downloads.

    python -m pytest -q tests/test_model.py
"""
import math

import pytest
import torch

# Tiny tensors: one thread is fastest, and a second thread that busy-waits for a core already taken (e.g. by a
# training run) made these files 20x slower on a 2-core machine.
torch.set_num_threads(1)
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import model
from tokenizer import IMAGE_TOKEN_INDEX
from model import LLaDA, LLaDAConfig, LLaDAV, RMSNorm, apply_rope, rope_cos_sin, rotate_half
from conftest import V, tiny_cfg, tiny_llada_v, tiny_llm


def logits_of(llm, ids, attention_mask=None):
    return llm(llm.embed_tokens(ids), attention_mask)


# ----------------------------------------------------------------------------------------------
# Attention: bidirectional, padding

def test_attention_is_bidirectional():
    """Changing the LAST token changes the logits at position 0 (a causal model could not)."""
    llm = tiny_llm()
    ids = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(1))
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % V
    with torch.no_grad():
        a, b = logits_of(llm, ids), logits_of(llm, ids2)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4


def test_padding_mask_hides_padded_tokens():
    """Token ids at attention_mask == 0 positions do not influence the logits at the real positions."""
    llm = tiny_llm()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (2, 12), generator=g)
    am = torch.ones(2, 12, dtype=torch.long)
    am[0, 8:] = 0   # right padding
    am[1, :3] = 0   # left padding
    ids2 = torch.where(am.bool(), ids, torch.randint(0, V, ids.shape, generator=g))
    assert not torch.equal(ids, ids2)
    with torch.no_grad():
        a, b = logits_of(llm, ids, am), logits_of(llm, ids2, am)
    keep = am.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=0)
    # sanity: without the mask the same change does leak
    with torch.no_grad():
        assert (logits_of(llm, ids)[keep] - logits_of(llm, ids2)[keep]).abs().max() > 1e-4


def test_right_and_left_padding_match_unpadded():
    """A right-padded and a left-padded sequence (with mask) give the unpadded logits on the real tokens:
    right padding keeps positions; left padding shifts them, which RoPE's relative property absorbs."""
    llm = tiny_llm()
    ids = torch.randint(0, V, (1, 7), generator=torch.Generator().manual_seed(3))
    pad = torch.full((1, 5), 7)
    with torch.no_grad():
        ref = logits_of(llm, ids)[0]
        right = logits_of(llm, torch.cat([ids, pad], 1), torch.tensor([[1] * 7 + [0] * 5]))[0, :7]
        left = logits_of(llm, torch.cat([pad, ids], 1), torch.tensor([[0] * 5 + [1] * 7]))[0, 5:]
    torch.testing.assert_close(right, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# RoPE

def test_rope_scores_depend_only_on_relative_position():
    """q.k after RoPE at positions (m, n) equals q.k at (m + s, n + s), but not at (m, n + s)."""
    hd = 8
    cos, sin = rope_cos_sin(64, hd, 500000.0, "cpu")
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    score = lambda m, n: (apply_rope(q, cos[m], sin[m]) * apply_rope(k, cos[n], sin[n])).sum()
    for m, n, s in [(0, 3, 5), (7, 2, 40), (10, 10, 13)]:
        torch.testing.assert_close(score(m, n), score(m + s, n + s), atol=1e-5, rtol=1e-5)
    assert (score(0, 3) - score(0, 40)).abs() > 1e-3
    torch.testing.assert_close(apply_rope(q, cos[0], sin[0]), q)  # position 0 is the identity


def test_rope_cos_sin_layout_and_theta():
    """Angles are pos * inv_freq with inv_freq_i = 500000^(-2i/hd), laid out as cat(freqs, freqs)."""
    hd = 8
    cos, sin = rope_cos_sin(3, hd, 500000.0, "cpu")
    assert cos.shape == sin.shape == (3, hd) and cos.dtype == torch.float32
    angle = torch.atan2(sin[1], cos[1])  # position 1: the angles are inv_freq itself
    inv_freq = torch.tensor([500000.0 ** (-2 * i / hd) for i in range(hd // 2)])
    torch.testing.assert_close(angle, torch.cat([inv_freq, inv_freq]), atol=1e-6, rtol=1e-5)
    assert math.isclose(angle[1].item(), 500000 ** (-2 / hd), rel_tol=1e-5)
    torch.testing.assert_close(torch.atan2(sin[2], cos[2]), 2 * angle)


def test_rotate_half():
    """rotate_half([x1, x2]) = [-x2, x1] (the NeoX / HF-LLaMA layout, not interleaved pairs)."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert torch.equal(rotate_half(x), torch.tensor([-4.0, -5.0, -6.0, 1.0, 2.0, 3.0]))


# ----------------------------------------------------------------------------------------------
# RMSNorm

def test_rmsnorm_fp32_formula():
    """RMSNorm(x) = w * x / sqrt(mean(x^2) + 1e-5)."""
    torch.manual_seed(5)
    n = RMSNorm(16, 1e-5)
    nn.init.normal_(n.weight)
    x = torch.randn(3, 16) * 1e-2  # small x so that eps matters
    ref = n.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(n(x), ref, atol=1e-6, rtol=1e-5)
    # eps is really 1e-5: a different eps gives a visibly different result at this scale
    assert (n(x) - n.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).abs().max() > 1e-3


def test_rmsnorm_bf16_casts_before_weight():
    """Under bf16 the normalised x is computed in fp32, cast to bf16, and only then multiplied by w."""
    torch.manual_seed(6)
    n = RMSNorm(256, 1e-5)
    nn.init.normal_(n.weight)
    n = n.to(torch.bfloat16)
    x = torch.randn(4, 256).to(torch.bfloat16)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
    out = n(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, n.weight * normed.to(torch.bfloat16))
    assert not torch.equal(out, (n.weight.float() * normed).to(torch.bfloat16))  # the other order differs


# ----------------------------------------------------------------------------------------------
# The 8B preset's shapes (meta device: no memory, no time)

def test_8b_preset_parameter_counts():
    """llada_v_8b: 8,015,581,184 LM parameters, a 1152->4096->4096 projector, a 26-layer 1152-wide ViT,
    RoPE theta 500000 and RMSNorm eps 1e-5 (GSAI-ML/LLaDA-8B-Instruct config.json; ML-GSAI/LLaDA-V
    train/llada_v_prepare/files/config.json)."""
    with torch.device("meta"):
        m = LLaDAV(model.get_config("llada_v_8b"))
    c = model.count_params(m)
    assert c["language model"] == 8_015_581_184
    assert c["projector"] == 1152 * 4096 + 4096 + 4096 * 4096 + 4096
    assert len(m.vision.layers) == 26 and m.vision.cfg.d_model == 1152
    assert c["vision tower"] == sum(p.numel() for p in m.vision.parameters())
    assert c["total"] == c["language model"] + c["vision tower"] + c["projector"]
    assert m.cfg.lm.rope_theta == 500000.0 and m.cfg.lm.norm_eps == 1e-5 and m.llm.norm.eps == 1e-5


def test_lm_has_no_biases_and_untied_head():
    """No Linear in the language model has a bias; lm_head is a separate parameter from embed_tokens."""
    m = tiny_llada_v()
    lins = [x for x in m.llm.modules() if isinstance(x, nn.Linear)]
    assert len(lins) == 1 + 7 * m.cfg.lm.n_layers and all(x.bias is None for x in lins)
    assert m.llm.lm_head.weight is not m.llm.embed_tokens.weight
    assert m.llm.lm_head.weight.data_ptr() != m.llm.embed_tokens.weight.data_ptr()


# ----------------------------------------------------------------------------------------------
# LLaDA-V glue

def test_embed_splices_image_features_in_order():
    """IMAGE_TOKEN_INDEX slots take the image_features rows in row-major order; other slots keep E[x]."""
    m = tiny_llada_v()
    I = IMAGE_TOKEN_INDEX
    ids = torch.tensor([[5, I, I, 6, I], [I, 7, 8, 9, 10]])
    feats = torch.randn(2, 2, 32)  # 2 "images" of 2 tokens = 4 rows
    with torch.no_grad():
        x = m.embed(ids, feats)
    rows = feats.reshape(-1, 32)
    for (b, l), r in zip([(0, 1), (0, 2), (0, 4), (1, 0)], rows):
        assert torch.equal(x[b, l], r)
    text = ids != I
    assert torch.equal(x[text], m.llm.embed_tokens(ids[text]))


def test_embed_count_mismatch_raises():
    """A placeholder / visual-token count mismatch raises ValueError naming both counts."""
    m = tiny_llada_v()
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 6]])
    with pytest.raises(ValueError, match=r"2 image placeholders.*3 visual tokens"):
        m.embed(ids, torch.randn(3, 32))
    with pytest.raises(ValueError, match=r"2 image placeholders.*0 visual tokens"):
        m.embed(ids, None)


def test_forward_output_positions_matches_full_logits():
    """forward(output_positions=mask) == forward()[mask]."""
    m = tiny_llada_v()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(7))
    pos = torch.rand(2, 9, generator=torch.Generator().manual_seed(8)) < 0.4
    with torch.no_grad():
        full, part = m(ids), m(ids, output_positions=pos)
    assert part.shape == (int(pos.sum()), V)
    torch.testing.assert_close(part, full[pos], atol=1e-6, rtol=1e-5)


def test_forward_with_pixels_equals_image_features():
    """forward(pixels=...) == forward(image_features=encode_images(pixels)), and the image matters."""
    m = tiny_llada_v()
    n = m.cfg.vision.n_patches
    ids = torch.tensor([[3] + [IMAGE_TOKEN_INDEX] * n + [4, 5]])
    px = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        a = m(ids, pixels=px)
        b = m(ids, image_features=m.encode_images(px))
        c = m(ids, pixels=-px)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3


def test_too_long_sequence_raises():
    """A sequence longer than max_seq_len raises ValueError mentioning max_seq_len."""
    m = tiny_llada_v()
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 129, dtype=torch.long))
    m(torch.zeros(1, 128, dtype=torch.long))  # exactly max_seq_len is fine


def test_projector_uses_exact_gelu():
    """Projector = linear_2(gelu_erf(linear_1(f))), measurably different from the tanh approximation."""
    torch.manual_seed(9)
    p = model.Projector(8, 16)
    f = torch.randn(5, 8) * 3
    with torch.no_grad():
        out = p(f)
        exact = p.linear_2(F.gelu(p.linear_1(f), approximate="none"))
        tanh = p.linear_2(F.gelu(p.linear_1(f), approximate="tanh"))
    torch.testing.assert_close(out, exact, atol=1e-7, rtol=0)
    assert (out - tanh).abs().max() > 1e-5


# ----------------------------------------------------------------------------------------------
# Config presets

def test_get_config_unknown_preset_lists_choices():
    """get_config('nope') raises ValueError naming the available presets."""
    with pytest.raises(ValueError, match="toy.*small.*llada_v_8b"):
        model.get_config("nope")


def test_get_config_returns_independent_copies():
    """Mutating a returned config changes neither PRESETS nor the next get_config result."""
    c = model.get_config("toy")
    c.lm.d_model = 12345
    c.vision.n_layers = 99
    assert model.PRESETS["toy"].lm.d_model == 96 and model.PRESETS["toy"].vision.n_layers == 2
    assert model.get_config("toy").lm.d_model == 96


# ----------------------------------------------------------------------------------------------
# Checkpoints

def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    """A crash inside torch.save leaves the previous checkpoint at `path` intact and loadable."""
    m = tiny_llada_v()
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, {"model": m.state_dict(), "config": m.cfg.to_dict(), "step": 1})
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save_checkpoint(path, {"model": {}, "config": {}, "step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    ckpt = checkpoint.load_state_file(path)  # intact: its checksums verify, and it loads into the model
    assert ckpt["step"] == 1
    m2 = type(m)(m.cfg)
    checkpoint.load_state(m2, ckpt["model"])
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v)


def test_load_checkpoint_errors(tmp_path):
    """Missing file -> FileNotFoundError with a hint; garbage -> ValueError; wrong config -> ValueError."""
    with pytest.raises(FileNotFoundError, match="train"):
        checkpoint.load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint"):
        checkpoint.load_checkpoint(bad)


def test_load_state_lists_misshaped_keys():
    """load_state with a state dict from another config raises ValueError naming the mis-shaped keys."""
    m = tiny_llada_v()
    other = LLaDAV(tiny_cfg(vocab_size=V + 8)).state_dict()
    with pytest.raises(ValueError, match=r"mis-shaped.*llm\.embed_tokens\.weight.*llm\.lm_head\.weight"):
        checkpoint.load_state(m, other)
    sd = m.state_dict()
    del sd["llm.norm.weight"]
    with pytest.raises(ValueError, match=r"missing \['llm\.norm\.weight'\]"):
        checkpoint.load_state(m, sd)


# ----------------------------------------------------------------------------------------------
# Init

def test_init_weights_scaled_residual_and_truncated():
    """init_weights: o_proj/down_proj std shrinks with depth (1/sqrt(2(i+1))), all cut at 3 std."""
    torch.manual_seed(10)
    llm = LLaDA(LLaDAConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, mlp_hidden=128, max_seq_len=128))
    llm.init_weights()
    d = 64
    s0, s1 = (b.o_proj.weight.std().item() for b in llm.layers)
    assert s1 < s0
    assert math.isclose(s0, 1 / math.sqrt(d) / math.sqrt(2), rel_tol=0.1)
    assert math.isclose(s1, 1 / math.sqrt(d) / math.sqrt(4), rel_tol=0.1)
    for i, b in enumerate(llm.layers):
        for lin, std in [(b.q_proj, 1 / math.sqrt(d)), (b.o_proj, 1 / math.sqrt(d) / math.sqrt(2 * (i + 1))),
                         (b.down_proj, 1 / math.sqrt(128) / math.sqrt(2 * (i + 1)))]:
            assert lin.weight.abs().max() <= 3 * std + 1e-7
            assert lin.weight.abs().max() > 2 * std  # truncated, not shrunk to a narrower range
    assert llm.embed_tokens.weight.abs().max() <= 3 / math.sqrt(d) + 1e-7


# ----------------------------------------------------------------------------------------------
# FLOPs: the one MFU numerator (model.step_flops) against torch's own count

@pytest.mark.parametrize("preset, overrides, batch", [
    ("toy", {}, 2),
    # LLaDA-V's shape (384-pixel SigLIP patches: 729 visual tokens, spatially large attention), narrow widths
    ("llada_v_8b", {"lm.d_model": 256, "lm.n_layers": 2, "lm.n_heads": 4, "lm.mlp_hidden": 688, "lm.vocab_size": 4096,
                    "vision.d_model": 96, "vision.n_layers": 3, "vision.n_heads": 2, "vision.mlp_hidden": 384}, 1),
])
def test_step_flops_match_the_flop_counter(preset, overrides, batch):
    """model.step_flops (what train.py's and the bench's MFU divide) is within 10% of what
    torch.utils.flop_counter counts for one forward + backward with every part training. Attention runs
    on SDPA's math kernel here, so the counter sees its matmuls (it has no formula for the CPU's fused kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from cli import model_config
    from diffusion import diffusion_loss, forward_process
    mc = model_config(preset, overrides)
    torch.manual_seed(0)
    m = LLaDAV(mc)
    m.init_weights()
    N, V = mc.vision.n_patches, mc.lm.vocab_size
    ids = torch.cat([torch.full((batch, N), -200), torch.randint(0, V - 2, (batch, 32))], 1)
    labels = torch.cat([torch.full((batch, N + 20), -100), ids[:, N + 20:]], 1)
    pixels = torch.randn(batch, 3, mc.vision.image_size, mc.vision.image_size)
    xt, masked, p_mask = forward_process(ids, labels, V - 1, generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        diffusion_loss(m(xt, pixels, output_positions=masked), labels, masked, p_mask).backward()
    counted = fc.get_total_flops()
    analytic = model.step_flops(mc, ids.numel(), ids.shape[1], int(masked.sum()), batch, True, True, True)
    assert abs(analytic / counted - 1) < 0.10, (analytic, counted)
    if preset != "toy":  # 729 visual tokens: the attention terms matter, and the count must include them
        lm, vc = mc.lm, mc.vision
        no_attn = analytic - 6 * ids.numel() * 2 * lm.n_layers * ids.shape[1] * lm.d_model \
            - 6 * batch * N * 2 * (vc.n_layers - 1) * N * vc.d_model
        assert no_attn / counted < 0.8
