"""Tests for diffusion.py: the forward masking process, the likelihood-bound loss, Gumbel-max sampling, the
transfer schedule, the one sampler in its official generate.py mode and its LLaDA-V options (ML-GSAI/LLaDA
GUIDELINES.md, generate.py::generate; LLaDA paper (arXiv 2502.09992) §2.2, §2.3; ML-GSAI/LLaDA-V
train/llava/model/language_model/modeling_llada.py (LLaDAModelLM.forward, generate_with_embeds)), each also against the
frozen pre-merge samplers (tests/reference_samplers.py). Tiny models, CPU only. Fast decoding is tested in test_fast.py.

    python -m pytest -q tests/test_diffusion.py
"""
import math
import warnings

import pytest
import torch

# Tiny tensors: one thread is fastest, and a second thread that busy-waits for a core already taken (e.g. by a
# training run) made these files 20x slower on a 2-core machine.
torch.set_num_threads(1)

from tokenizer import IMAGE_TOKEN_INDEX
from diffusion import (CountingModel, add_gumbel_noise, choose, diffusion_loss, forward_process, generate, get_log_likelihood,
                       get_num_transfer_tokens, mc_mask_counts)
from conftest import (EOS, EOT, GEN, MASK, V, fixed_logits_model, left_padded, prompt, tiny_llm, tiny_lm,
                      tiny_vlm_and_prompt)


def run(model, p, **kw):
    """generate() and the canvas after every step (cloned: the sampler updates x in place)."""
    snaps = []
    out = generate(model, p, callback=lambda x, step, block: snaps.append((x.clone(), step, block)), **GEN, **kw)
    return out, snaps


# ----------------------------------------------------------------------------------------------
# Forward process

def test_forward_process_rate_and_invariants():
    """Empirical mask rate per row matches p_mask; -100 positions never masked; xt = x0 off the mask,
    mask_id on it; p_mask = (1 - eps) t + eps with t the generator's first draw; seeded => deterministic."""
    B, L = 8, 5000
    x0 = torch.randint(0, 60, (B, L), generator=torch.Generator().manual_seed(0))
    labels = x0.clone()
    labels[:, :1000] = -100  # the "prompt": 4000 maskable positions per row
    xt, masked, p_mask = forward_process(x0, labels, MASK, generator=torch.Generator().manual_seed(1))
    t = torch.rand(B, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(p_mask, (1 - 1e-3) * t + 1e-3)
    assert not masked[:, :1000].any()
    rate = masked[:, 1000:].float().mean(1)
    assert (rate - p_mask).abs().max() < 0.03
    assert torch.equal(xt[masked], torch.full_like(xt[masked], MASK))
    assert torch.equal(xt[~masked], x0[~masked])
    xt2, masked2, p2 = forward_process(x0, labels, MASK, generator=torch.Generator().manual_seed(1))
    assert torch.equal(xt, xt2) and torch.equal(masked, masked2) and torch.equal(p_mask, p2)


def test_forward_process_p_mask_range():
    """p_mask lies in [1e-3, 1] and covers the range (t ~ U(0, 1))."""
    x0 = torch.zeros(20000, 1, dtype=torch.long)
    _, _, p = forward_process(x0, x0, MASK, generator=torch.Generator().manual_seed(2))
    assert p.min() >= 1e-3 and p.max() <= 1
    assert p.min() < 0.01 and p.max() > 0.99


def test_forward_process_stratified_t():
    """stratified=True puts exactly one t in each of the B strata [i/B, (i+1)/B), in random order, and
    each t is still U(0, 1) (the mean over many batches is 1/2)."""
    B = 16
    x0 = torch.zeros(B, 1, dtype=torch.long)
    g = torch.Generator().manual_seed(3)
    ts = []
    for _ in range(300):
        _, _, p = forward_process(x0, x0, MASK, generator=g, stratified=True)
        t = (p - 1e-3) / (1 - 1e-3)
        assert sorted((t * B).floor().long().tolist()) == list(range(B))
        ts.append(t)
    ts = torch.stack(ts)
    assert abs(ts.mean().item() - 0.5) < 0.01
    assert not torch.equal(ts[0].argsort(), ts[1].argsort())  # the order is shuffled


def test_forward_process_exact_count():
    """exact_count=True masks exactly l of the A maskable positions with l ~ U{1..A}, never a prompt
    position, and reports p_mask = l / A; over many draws every l in 1..A occurs."""
    A, P = 6, 3
    x0 = torch.arange(P + A).repeat(4000, 1)
    labels = x0.clone()
    labels[:, :P] = -100
    xt, masked, p = forward_process(x0, labels, MASK, generator=torch.Generator().manual_seed(4), exact_count=True)
    l = masked.sum(1)
    assert not masked[:, :P].any()
    torch.testing.assert_close(p, l.float() / A)
    counts = torch.bincount(l, minlength=A + 1)
    assert counts[0] == 0 and (counts[1:] > 4000 / A * 0.8).all()
    assert (xt == MASK).sum(1).equal(l)


def test_exact_count_estimates_the_same_bound():
    """Both masking schemes estimate the same quantity, E[sum_masked CE / p_mask] = sum_i CE_i: with a
    fixed per-position CE, the batch means of the two estimators agree with the exact sum."""
    A = 5
    ce = torch.tensor([0.3, 1.2, 0.1, 2.0, 0.7])
    x0 = torch.zeros(200_000, A, dtype=torch.long)
    for kwargs in ({}, {"exact_count": True}):
        _, masked, p = forward_process(x0, x0, MASK, generator=torch.Generator().manual_seed(5), **kwargs)
        est = ((masked * ce).sum(1) / p).mean()
        assert abs(est.item() - ce.sum().item()) < 0.05 * ce.sum().item(), kwargs


# ----------------------------------------------------------------------------------------------
# Loss

def test_diffusion_loss_matches_hand_computation():
    """sft: mean_b sum_masked CE/p_mask / #(labels != -100)_b; pretrain: sum CE/p_mask / (B L)."""
    labels = torch.tensor([[-100, 1, 2], [3, 0, 1]])
    masked = torch.tensor([[False, True, True], [True, False, True]])
    p_mask = torch.tensor([0.5, 0.25])
    logits = [[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 3.0, -2.0], [-1.0, 0.0, 1.0, 2.0]]
    targets = [1, 2, 3, 1]  # labels[masked] in row-major order
    ce = [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits, targets)]
    sft = ((ce[0] + ce[1]) / 0.5 / 2 + (ce[2] + ce[3]) / 0.25 / 3) / 2
    pre = (ce[0] / 0.5 + ce[1] / 0.5 + ce[2] / 0.25 + ce[3] / 0.25) / 6
    lt = torch.tensor(logits)
    assert math.isclose(diffusion_loss(lt, labels, masked, p_mask, "sft").item(), sft, rel_tol=1e-5)
    assert math.isclose(diffusion_loss(lt, labels, masked, p_mask, "pretrain").item(), pre, rel_tol=1e-5)
    with pytest.raises(ValueError, match="sft.*pretrain"):
        diffusion_loss(lt, labels, masked, p_mask, "mean")
    # weighting="none" drops the 1/p_mask factor (L_simple)
    simple = ((ce[0] + ce[1]) / 2 + (ce[2] + ce[3]) / 3) / 2
    assert math.isclose(diffusion_loss(lt, labels, masked, p_mask, "sft", weighting="none").item(), simple, rel_tol=1e-5)
    with pytest.raises(ValueError, match="elbo"):
        diffusion_loss(lt, labels, masked, p_mask, "sft", weighting="1/t")


def test_diffusion_loss_bf16_logits_computed_in_fp32():
    """bf16 logits are scored in fp32 (logits.float()), so the loss equals the fp32 loss of the same values."""
    labels = torch.tensor([[1, 2, 3]])
    masked = torch.tensor([[True, True, True]])
    lt = torch.randn(3, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    a = diffusion_loss(lt, labels, masked, torch.tensor([0.7]))
    b = diffusion_loss(lt.float(), labels, masked, torch.tensor([0.7]))
    assert a.dtype == torch.float32 and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Sampler pieces

def test_add_gumbel_noise():
    """T = 0 returns the same tensor object; T > 0 is float64 and argmax samples softmax(logits / T)."""
    logits = torch.log(torch.tensor([0.2, 0.3, 0.5])).expand(20000, 3).contiguous()
    assert add_gumbel_noise(logits, 0.0) is logits
    torch.manual_seed(0)
    for T, probs in [(1.0, [0.2, 0.3, 0.5]), (0.5, [0.04 / 0.38, 0.09 / 0.38, 0.25 / 0.38])]:
        noisy = add_gumbel_noise(logits, T)
        assert noisy.dtype == torch.float64
        freq = torch.bincount(noisy.argmax(-1), minlength=3).double() / 20000
        assert (freq - torch.tensor(probs, dtype=torch.float64)).abs().max() < 0.02


@pytest.mark.parametrize("m,steps", [(0, 4), (3, 8), (8, 8), (10, 4), (13, 5), (128, 128), (127, 32)])
def test_get_num_transfer_tokens_official_formula(m, steps):
    """k_s = m // steps, +1 for the first m % steps steps; each row sums to its number of masks."""
    mask = torch.zeros(2, max(m, 1) + 3, dtype=torch.bool)
    mask[0, :m] = True
    mask[1, : m // 2] = True
    num = get_num_transfer_tokens(mask, steps)
    assert num.shape == (2, steps)
    for row, mm in zip(num.tolist(), [m, m // 2]):
        assert row == [mm // steps + (s < mm % steps) for s in range(steps)]
        assert sum(row) == mm


# ----------------------------------------------------------------------------------------------
# generate(): structure of the reverse process

def test_generate_keeps_prompt_and_fills_canvas():
    """The output starts with the prompt and has no mask_id left in the canvas."""
    p = prompt()
    out = generate(tiny_lm(), p, steps=8, gen_length=8, block_length=8, **GEN)
    assert out.shape == (1, 13)
    assert torch.equal(out[:, :5], p)
    assert not (out == MASK).any()


def test_generate_reveals_on_schedule_and_never_remasks():
    """Per step exactly get_num_transfer_tokens' count is revealed; a revealed token never changes; blocks
    fill left to right (nothing past the current block is revealed, each block is full at its end)."""
    p = prompt()
    P, G, BL, steps = 5, 12, 4, 9  # 3 blocks of 4 tokens, 3 steps each -> [2, 1, 1] per block
    out, snaps = run(tiny_lm(), p, steps=steps, gen_length=G, block_length=BL)
    assert [(s, b) for _, s, b in snaps] == [(i, i // 3) for i in range(steps)]
    schedule = get_num_transfer_tokens(torch.ones(1, BL, dtype=torch.bool), steps // 3)[0].tolist()
    assert schedule == [2, 1, 1]
    prev = torch.cat([p, torch.full((1, G), MASK)], 1)
    for x, step, block in snaps:
        newly = (prev == MASK) & (x != MASK)
        assert int(newly.sum()) == schedule[step % 3]
        assert torch.equal(x[prev != MASK], prev[prev != MASK])  # never re-masked or changed
        start, end = P + block * BL, P + (block + 1) * BL
        assert newly[:, :start].sum() == 0 and newly[:, end:].sum() == 0
        assert (x[:, end:] == MASK).all()  # later blocks untouched
        if step % 3 == 2:
            assert not (x[:, :end] == MASK).any()  # block complete at its last step
        prev = x
    assert torch.equal(prev, out)


def test_generate_low_confidence_reveals_most_confident_first():
    """With low_confidence remasking the single token revealed per step is the most probable remaining one."""
    conf = [3.0, 1.0, 5.0, 2.0]  # logit of the winning token at each of 4 canvas positions
    rows = [[c if v == 10 + j else 0.0 for v in range(V)] for j, c in enumerate(conf)]
    out, snaps = run(fixed_logits_model(rows), prompt(3), steps=4, gen_length=4, block_length=4)
    order = [int((s[0, 3:] != MASK).nonzero()[-1]) if i == 0 else
             int(((s[0, 3:] != MASK) & (snaps[i - 1][0][0, 3:] == MASK)).nonzero()[0]) for i, (s, _, _) in enumerate(snaps)]
    assert order == [2, 0, 3, 1]
    assert out[0, 3:].tolist() == [10, 11, 12, 13]


def test_generate_temperature_zero_is_deterministic():
    """T = 0 gives identical outputs on two calls; T = 1 with different seeds gives different ones."""
    m, p = tiny_lm(), prompt()
    kw = dict(steps=8, gen_length=8, block_length=4, **GEN)
    torch.manual_seed(0)
    a = generate(m, p, **kw)
    torch.manual_seed(1)
    b = generate(m, p, **kw)
    assert torch.equal(a, b)
    outs = set()
    for seed in range(4):
        torch.manual_seed(seed)
        outs.add(tuple(generate(m, p, temperature=1.0, **kw)[0].tolist()))
    assert len(outs) > 1


def test_generate_remasking_random_fills_everything():
    """remasking='random' still fills every canvas position; an unknown strategy raises ValueError."""
    torch.manual_seed(0)
    out = generate(tiny_lm(), prompt(), steps=4, gen_length=8, block_length=4, remasking="random", **GEN)
    assert not (out == MASK).any()
    with pytest.raises(ValueError, match="low_confidence"):
        generate(tiny_lm(), prompt(), steps=4, gen_length=8, block_length=4, remasking="topk", **GEN)


def test_generate_rejects_bad_block_and_step_counts():
    """gen_length % block_length and steps % n_blocks must be 0; the errors say what to change."""
    with pytest.raises(ValueError, match="block_length that divides"):
        generate(tiny_lm(), prompt(), steps=4, gen_length=10, block_length=4, **GEN)
    with pytest.raises(ValueError, match="multiple of 3"):
        generate(tiny_lm(), prompt(), steps=4, gen_length=12, block_length=4, **GEN)


# ----------------------------------------------------------------------------------------------
# generate(): bounded work (issues 25, 26)

def test_more_steps_than_positions_warn_and_make_no_model_call():
    """Issue 26: steps=48 for a 12-token canvas (3 blocks of 4) is a warning; the steps past the 4th of each
    block reveal nothing, so they make no model call (12 calls, not 48) yet stay steps (the callback sees 48),
    and the tokens are the frozen generate's, which made all 48 calls. steps = gen_length does not warn."""
    m, p = CountingModel(tiny_lm(2)), prompt(seed=2)
    with pytest.warns(UserWarning, match="steps=48 is more than the gen_length=12 positions"):
        out, snaps = run(m, p, steps=48, gen_length=12, block_length=4)
    official = CountingModel(tiny_lm(2))
    assert torch.equal(out, ref.generate(official, p, steps=48, gen_length=12, block_length=4, **GEN))
    assert m.nfe == 12 and official.nfe == 48 and len(snaps) == 48
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(m, p, steps=12, gen_length=12, block_length=4)


def test_official_mode_computes_logits_only_for_the_block():
    """Issue 25: generate.py's mode asks the model for the logits of the current block only (output_positions;
    the LM head on the 20 prompt rows would be wasted), from its first masked position on, both CFG halves when
    guided, and the tokens stay the frozen generate's."""
    llm = tiny_llm(3)
    asked = []

    def spy(x, attention_mask=None, output_positions=None, **kw):
        asked.append(output_positions)
        return llm(llm.embed_tokens(x), attention_mask, output_positions, **kw)
    p = prompt(20, seed=3)
    for cfg in (0.0, 1.0):
        asked.clear()
        kw = dict(steps=6, gen_length=6, block_length=3, cfg_scale=cfg, **GEN)
        assert torch.equal(generate(spy, p, **kw), ref.generate(tiny_lm(3), p, **kw))
        # each call asks for a window (slice(None): every row, both CFG halves; then a slice of positions)
        assert len(asked) == 6 and all(a[0] == slice(None) for a in asked)
        rows = [list(range(26))[a[1]] for a in asked]  # from the first masked position to the block end
        assert rows[0] == [20, 21, 22] and rows[3] == [23, 24, 25]
        assert all(r == list(range(r[0], 23 if n < 3 else 26)) and r[0] >= (20 if n < 3 else 23)
                   for n, r in enumerate(rows))


def test_official_mode_window_reaches_back_to_earlier_masks():
    """generate.py lets x0_hat be [MASK]: that position stays masked and may be revealed in a later block, and a
    [MASK] in the prompt is revealed too; the logits then start at the first such position. The random LLaDA of
    issue 26 (seed 0, d_model 64, 2 layers, vocabulary 1000) with [MASK] = 323 predicts [MASK] at some
    positions: token-identical to the frozen generate at every step, with a [MASK] in the prompt as well."""
    m = tiny_lm(0, vocab_size=1000, d_model=64)
    p = torch.randint(0, 990, (1, 8), generator=torch.Generator().manual_seed(0))
    p_masked = p.clone()
    p_masked[0, 2] = 323
    for q in (p, p_masked):
        runs = []
        for sampler in (generate, ref.generate):
            snaps = []
            out = sampler(m, q, steps=12, gen_length=12, block_length=4, mask_id=323,
                          callback=lambda x, s, b: snaps.append(x.clone()))
            runs.append((out, snaps))
        (a, sa), (b, sb) = runs
        assert torch.equal(a, b) and all(torch.equal(u, v) for u, v in zip(sa, sb))
        if q is p:  # a [MASK] left in the first two blocks: block 3's logits start before it
            assert (a[0, 8:16] == 323).any()
    assert a[0, 2] != 323  # the prompt's [MASK] was revealed

# ----------------------------------------------------------------------------------------------
# generate(): classifier-free guidance and the EOS flags

def test_generate_cfg_zero_is_plain_and_cfg_batch_is_doubled():
    """cfg_scale=0 is a plain call; cfg_scale>0 calls the model once per step on [x; x with prompt -> mask_id]
    (attention mask doubled too) and changes the answer for some seed."""
    m, p = tiny_lm(), prompt(B=2)
    am = torch.ones(2, 5, dtype=torch.long)
    calls = []

    def spy(x, attention_mask=None):
        calls.append((x.clone(), attention_mask))
        return m(x, attention_mask)

    kw = dict(steps=4, gen_length=4, block_length=4, **GEN)
    assert torch.equal(generate(m, p, **kw), generate(m, p, cfg_scale=0.0, **kw))
    guided = generate(spy, p, attention_mask=am, cfg_scale=1.5, **kw)
    assert not (guided == MASK).any() and len(calls) == 4
    for x, a in calls:
        assert x.shape == (4, 9) and a.shape == (4, 9)
        cond, uncond = x[:2], x[2:]
        assert (uncond[:, :5] == MASK).all()
        assert torch.equal(uncond[:, 5:], cond[:, 5:])
        assert torch.equal(cond[:, :5], p)
    assert any(not torch.equal(generate(tiny_lm(s), prompt(seed=s), **kw),
                               generate(tiny_lm(s), prompt(seed=s), cfg_scale=2.0, **kw)) for s in range(5))


def test_generate_cfg_formula():
    """logits = u + (w + 1)(c - u): a token the prompt favours only mildly wins under guidance."""
    def model(x, attention_mask=None):
        out = torch.zeros(x.shape[0], x.shape[1], V)
        out[..., 1] = 1.0
        has_prompt = (x[:, :3] != MASK).all(1)                  # (B,) conditional rows
        out[..., 2] = torch.where(has_prompt, 0.9, 0.0)[:, None]
        return out
    kw = dict(steps=2, gen_length=2, block_length=2, **GEN)
    assert (generate(model, prompt(3), **kw)[0, 3:] == 1).all()                 # c alone: 1.0 > 0.9
    assert (generate(model, prompt(3), cfg_scale=1.0, **kw)[0, 3:] == 2).all()  # 2 * 0.9 > 1.0
    assert (generate(model, prompt(3), cfg_scale=0.05, **kw)[0, 3:] == 1).all()  # 1.05 * 0.9 < 1.0


def test_generate_logits_eos_inf_never_emits_eos():
    """logits_eos_inf=True: even a model that always prefers EOS never produces it."""
    rows = [[5.0 if v == EOS else (1.0 if v == 7 else 0.0) for v in range(V)]] * 6
    m = fixed_logits_model(rows)
    kw = dict(steps=6, gen_length=6, block_length=6, **GEN)
    assert (generate(m, prompt(), **kw)[0, 5:] == EOS).all()
    out = generate(m, prompt(), logits_eos_inf=True, **kw)
    assert not (out[0, 5:] == EOS).any() and (out[0, 5:] == 7).all()


def _reveal_order(snaps, P):
    order, prev = [], None
    for x, _, _ in snaps:
        filled = x[0, P:] != MASK
        new = filled if prev is None else filled & ~prev
        order += new.nonzero()[:, 0].tolist()
        prev = filled
    return order


def test_generate_confidence_eos_eot_inf():
    """confidence_eos_eot_inf: at T = 0 EOS and EoT get confidence 0, so those positions are revealed LAST
    (still with EOS/EoT). At T > 0 (official quirk) only EoT's confidence is zeroed."""
    def row(top, c):
        return [c if v == top else 0.0 for v in range(V)]
    # positions 0, 1 are confidently EOS / EoT; positions 2, 3 are mildly token 5 / 6
    rows = [row(EOS, 20.0), row(EOT, 19.0), row(5, 3.0), row(6, 2.0)]
    m = fixed_logits_model(rows)
    kw = dict(steps=4, gen_length=4, block_length=4)
    out, snaps = run(m, prompt(3), **kw)
    assert _reveal_order(snaps, 3) == [0, 1, 2, 3]
    out, snaps = run(m, prompt(3), confidence_eos_eot_inf=True, **kw)
    order = _reveal_order(snaps, 3)
    assert order[:2] == [2, 3] and sorted(order[2:]) == [0, 1]  # both confidence 0: tie, any order
    assert out[0, 3:].tolist() == [EOS, EOT, 5, 6]
    torch.manual_seed(0)
    out, snaps = run(m, prompt(3), confidence_eos_eot_inf=True, temperature=0.05, **kw)
    assert out[0, 3:].tolist() == [EOS, EOT, 5, 6]  # gaps >= 2 at T = 0.05: the samples are certain
    assert _reveal_order(snaps, 3) == [0, 2, 3, 1]


# ----------------------------------------------------------------------------------------------
# generate(): padding and images

def test_generate_batched_left_padding_matches_single():
    """A left-padded batch (with attention_mask) at T = 0 yields the same answers as one prompt at a time."""
    m = tiny_lm(1)
    prompts = [prompt(3, seed=1)[0], prompt(7, seed=2)[0], prompt(5, seed=3)[0]]
    batch, am, P = left_padded(prompts, torch.long)
    kw = dict(steps=8, gen_length=8, block_length=4, **GEN)
    out = generate(m, batch, attention_mask=am, **kw)
    for q, o in zip(prompts, out):
        single = generate(m, q[None], **kw)
        assert torch.equal(o[P:], single[0, len(q):])
    # sanity: without the attention mask the padding does change some answer
    assert not torch.equal(generate(m, batch, **kw), out)


def test_generate_with_image_features():
    """An image-conditioned prompt (IMAGE_TOKEN_INDEX placeholders + image_features) generates a full answer,
    keeps its placeholders, and the image changes the logits and, for some seed, the answer."""
    m, p = tiny_vlm_and_prompt()
    kw = dict(steps=6, gen_length=6, block_length=6, **GEN)
    answers = []
    with torch.no_grad():
        for seed in range(6):
            px = torch.rand(2, 1, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
            f1, f2 = m.encode_images(px[0]), m.encode_images(px[1])
            out = generate(m, p, image_features=f1, **kw)
            assert torch.equal(out[:, :p.shape[1]], p) and not (out == MASK).any()
            x = torch.cat([p, torch.full((1, 6), MASK)], 1)
            assert (m(x, image_features=f1) - m(x, image_features=f2))[:, -6:].abs().max() > 1e-3
            answers.append(torch.equal(out, generate(m, p, image_features=f2, **kw)))
        assert not all(answers)
        # CFG with an image: the unconditional half has no placeholders, so it runs without the image
        assert not (generate(m, p, image_features=f1, cfg_scale=1.0, **kw) == MASK).any()


# ----------------------------------------------------------------------------------------------
# The official mode against the frozen pre-merge generate (tests/reference_samplers.py)

import reference_samplers as ref


def _conf_rows():
    def row(top, c):
        return [c if v == top else 0.0 for v in range(V)]
    return [row(EOS, 20.0), row(EOT, 19.0), row(5, 3.0), row(6, 2.0)]


def official_cases():
    """(name, model, prompt, kwargs): every situation the sampler tests above exercise."""
    batch, am, _ = left_padded([prompt(3, seed=1)[0], prompt(7, seed=2)[0], prompt(5, seed=3)[0]], torch.long)
    eos_rows = [[5.0 if v == EOS else (1.0 if v == 7 else 0.0) for v in range(V)]] * 6
    vlm, vp = tiny_vlm_and_prompt()
    with torch.no_grad():
        feats = vlm.encode_images(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    return [
        ("one block", tiny_lm(), prompt(), dict(steps=8, gen_length=8, block_length=8)),
        ("3 blocks, uneven schedule", tiny_lm(), prompt(), dict(steps=9, gen_length=12, block_length=4)),
        ("more steps than masks", tiny_lm(2), prompt(seed=2), dict(steps=8, gen_length=6, block_length=3)),
        ("left padding", tiny_lm(1), batch, dict(steps=8, gen_length=8, block_length=4, attention_mask=am)),
        ("left padding, CFG", tiny_lm(1), batch, dict(steps=8, gen_length=8, block_length=4, attention_mask=am,
                                                      cfg_scale=1.5)),
        ("CFG, no mask", tiny_lm(3), prompt(seed=3), dict(steps=4, gen_length=4, block_length=4, cfg_scale=2.0)),
        ("logits_eos_inf", fixed_logits_model(eos_rows), prompt(), dict(steps=6, gen_length=6, block_length=6,
                                                                        logits_eos_inf=True)),
        ("confidence_eos_eot_inf", fixed_logits_model(_conf_rows()), prompt(3),
         dict(steps=4, gen_length=4, block_length=4, confidence_eos_eot_inf=True)),
        ("confidence_eos_eot_inf, T > 0", fixed_logits_model(_conf_rows()), prompt(3),
         dict(steps=4, gen_length=4, block_length=4, confidence_eos_eot_inf=True, temperature=0.05)),
        ("both flags, random model", tiny_lm(4), prompt(seed=4), dict(steps=8, gen_length=8, block_length=4,
                                                                      logits_eos_inf=True, confidence_eos_eot_inf=True)),
        ("random remasking", tiny_lm(), prompt(), dict(steps=4, gen_length=8, block_length=4, remasking="random")),
        ("T = 1", tiny_lm(), prompt(), dict(steps=8, gen_length=8, block_length=4, temperature=1.0)),
        ("T = 1, left padding, CFG", tiny_lm(1), batch, dict(steps=8, gen_length=8, block_length=4,
                                                             attention_mask=am, temperature=1.0, cfg_scale=1.0)),
        ("image features, CFG", vlm, vp, dict(steps=6, gen_length=6, block_length=3, cfg_scale=1.0,
                                              image_features=feats)),
    ]


@pytest.mark.parametrize("case", range(len(official_cases())))
def test_official_mode_is_the_frozen_generate(case):
    """The one sampler with generate.py's arguments is token-identical to the frozen pre-merge generate, at every
    step (same canvases, same callback arguments), with the same random draws under one seed."""
    name, m, p, kw = official_cases()[case]
    runs = []
    for sampler in (generate, ref.generate):
        snaps = []
        torch.manual_seed(7)
        out = sampler(m, p, callback=lambda x, s, b: snaps.append((x.clone(), s, b)), **GEN, **kw)
        runs.append((out, snaps))
    (a, sa), (b, sb) = runs
    assert torch.equal(a, b), name
    assert len(sa) == len(sb) == kw["steps"] and all(torch.equal(u, v) and (s, bl) == (t, cl)
                                                     for (u, s, bl), (v, t, cl) in zip(sa, sb)), name


# ----------------------------------------------------------------------------------------------
# LLaDA-V's options (ML-GSAI/LLaDA-V train/llava/model/language_model/modeling_llada.py::generate_with_embeds)

from diffusion import find_stop


def test_llada_v_options_without_extras_are_generate():
    """No banned ids, no stop: the same answer as the official LLaDA sampler at temperature 0 (semi-AR too)."""
    m, p = tiny_lm(), prompt()
    for bl in (8, 4):
        want = generate(m, p, steps=8, gen_length=8, block_length=bl, **GEN)[0, 5:].tolist()
        (out,) = generate(m, p, steps=8, gen_length=8, block_length=bl, mask_id=MASK, banned_ids=(),
                          stop_sequences=[])
        assert out == want


def test_llada_v_bans_eos_cuts_at_the_stop_and_appends_the_suffix():
    """EOS is the model's favourite everywhere but banned; the canvas is filled left to right
    ("a b c EOT ..."): after the EOT is revealed generation ends (4 model calls, not 8), the answer is cut
    before it, later blocks are skipped, and the suffix is visible to the model, never overwritten. ML-GSAI/LLaDA-V
    train/llava/model/language_model/modeling_llada.py::generate_with_embeds: the suffix ids are appended to the
    returned answer (the frozen pre-merge sampler dropped them)."""
    G, target = 8, [3, 4, 5, EOT, 6, 7, 8, 9]
    rows = torch.zeros(G, V)
    for j, t in enumerate(target):
        rows[j, t] = 10.0 - j   # earlier positions more confident -> left-to-right reveal
        rows[j, EOS] = 50.0     # banned
    seen, st = [], {}
    kw = dict(steps=8, gen_length=G, block_length=4, mask_id=MASK, banned_ids=(EOS,), stop_sequences=[[EOT]],
              suffix=[11, 12])
    (out,) = generate(fixed_logits_model(rows.tolist(), P=5, seen=seen), prompt(), stats=st, **kw)
    assert out == [3, 4, 5, 11, 12]                           # x[P:stop] + suffix
    assert len(seen) == 4 == st["nfe"] and all(s[0, -2:].tolist() == [11, 12] for s in seen)
    assert (seen[-1][0, 5 + 4:5 + G] == MASK).all()  # the block after the stop was never run
    assert ref.generate_llada_v(fixed_logits_model(rows.tolist(), P=5), prompt(), **kw) == [3, 4, 5]


def test_find_stop_official_rule():
    """ML-GSAI/LLaDA-V train/llava/model/language_model/modeling_llada.py::generate_with_embeds, the official scan: a
    row without a stop takes the FIRST LISTED sequence found (at its first occurrence), not the earliest position; a row
    with a stop re-scans only the first sequence; a masked position matches nothing; multi-token sequences match
    whole."""
    NL = 9
    canvas = torch.tensor([[3, NL, 4, EOT, 5], [3, 4, 5, 6, NL], [1, 2, 3, 2, 3], [1, MASK, 3, 1, 3]])
    none = torch.full((4,), 5)
    assert find_stop(canvas, [[EOT], [NL]], none).tolist() == [3, 4, 5, 5]    # EOT listed first: 3, not NL's 1
    assert find_stop(canvas, [[NL], [EOT]], none).tolist() == [1, 4, 5, 5]
    assert find_stop(canvas, [[2, 3], [1, 3]], none).tolist() == [5, 5, 1, 3]  # [1, MASK, 3] is no [1, 3]
    # rows that already stopped at 4: only stop_sequences[0] moves them, and only earlier
    four = torch.full((4,), 4)
    assert find_stop(canvas, [[EOT], [NL]], four).tolist() == [3, 4, 4, 4]    # row 0's NL at 1 is not looked at
    assert find_stop(canvas, [[NL], [EOT]], four).tolist() == [1, 4, 4, 4]


def test_llada_v_stop_rule_over_a_run():
    """ML-GSAI/LLaDA-V train/llava/model/language_model/modeling_llada.py::generate_with_embeds over a whole run, with
    stops [EOT, NL] (EOT first). Reveal order (by confidence): NL at 4, NL at 1, then 0, 3, EOT at 2. The official loop
    stops at 4 (only NL found), does NOT move to the NL revealed at 1 (after a stop only EOT is re-scanned), moves to 2
    when EOT appears, and ends: answer [3, NL], 5 calls. The frozen pre-merge sampler took the earliest position of any
    stop: [3] after 3 calls. With the order [NL, EOT] the official rule re-scans NL and agrees with the
    earliest-position rule."""
    NL, G = 9, 8
    target = [3, NL, EOT, 5, NL, 6, 7, 8]
    order = [4, 1, 0, 3, 2, 5, 6, 7]  # reveal order
    rows = torch.zeros(G, V)
    for rank, j in enumerate(order):
        rows[j, target[j]] = 20.0 - rank
    kw = dict(steps=G, gen_length=G, block_length=G, mask_id=MASK)
    st = {}
    (out,) = generate(fixed_logits_model(rows.tolist(), P=5), prompt(), stop_sequences=[[EOT], [NL]], stats=st, **kw)
    assert out == [3, NL] and st["nfe"] == 5
    assert ref.generate_llada_v(fixed_logits_model(rows.tolist(), P=5), prompt(), banned_ids=(),
                                stop_sequences=[[EOT], [NL]], **kw) == [3]
    (out,) = generate(fixed_logits_model(rows.tolist(), P=5), prompt(), stop_sequences=[[NL], [EOT]], stats=st, **kw)
    assert out == [3] and st["nfe"] == 3


def _vlm_case(seed=0, G=8):
    """A tiny random LLaDA-V, a prompt with an image, its features, and stop sequences taken from what it writes
    without stops (so that they do occur): one token, two tokens, and one absent sequence listed second."""
    m, p = tiny_vlm_and_prompt(seed)
    with torch.no_grad():
        f = m.encode_images(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1)
    (free,) = generate(m, p, steps=G, gen_length=G, block_length=G, mask_id=MASK, banned_ids=(EOS,),
                       stop_sequences=[], image_features=f)
    return m, p, f, [[[free[3]]], [free[2:4]], [[free[4]], [1, 2, 3]]]


@pytest.mark.parametrize("kw", [dict(steps=8, block_length=8), dict(steps=8, block_length=4),
                                dict(steps=4, block_length=4, cfg_scale=1.0),
                                dict(steps=8, block_length=8, temperature=1.0),
                                dict(steps=8, block_length=4, remasking="random")])
def test_llada_v_mode_is_the_frozen_generate_llada_v(kw):
    """Batch 1, banned ids and stop sequences (one token, two tokens, an absent second one), suffix: the one
    sampler's answer is the frozen generate_llada_v's followed by the suffix (ML-GSAI/LLaDA-V
    train/llava/model/language_model/modeling_llada.py::generate_with_embeds), at every step, with the same random draws
    (T > 0, random remasking) under one seed."""
    for seed in range(3):
        m, p, f, stops_list = _vlm_case(seed)
        for stops in stops_list:
            outs, snaps = [], ([], [])
            for n, sampler in enumerate((generate, ref.generate_llada_v)):
                torch.manual_seed(seed)
                out = sampler(m, p, gen_length=8, mask_id=MASK, banned_ids=(EOS, 0, 1),
                              stop_sequences=stops, suffix=[5, 6], image_features=f,
                              callback=lambda x, s, b: snaps[n].append(x.clone()), **kw)
                outs.append(out)
            assert outs[0] == [outs[1] + [5, 6]]  # a list of B = 1 answers; the suffix appended
            assert len(snaps[0]) == len(snaps[1]) and all(torch.equal(u, v) for u, v in zip(*snaps))


def test_llada_v_batch_of_left_padded_prompts():
    """The LLaDA-V options on a left-padded batch (three prompts of different lengths, each with its own image, a
    stop that cuts some answers): each answer equals that prompt run alone (batch 1), and every row stops at
    its own place."""
    m, _ = tiny_vlm_and_prompt(1)
    n = m.cfg.vision.n_patches
    prompts = [torch.tensor([1, 2] + [IMAGE_TOKEN_INDEX] * n + t) for t in ([3, 4], [5, 6, 7, 8, 9], [10])]
    with torch.no_grad():
        feats = m.encode_images(torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    batch, am, _ = left_padded(prompts, torch.long)
    kw = dict(steps=8, gen_length=8, block_length=4, mask_id=MASK, banned_ids=(EOS,))
    free = generate(m, batch, am, stop_sequences=[], image_features=feats, **kw)
    stop = [[free[0][2]]]  # a token of the first answer
    outs = generate(m, batch, am, stop_sequences=stop, image_features=feats, **kw)
    singles = [generate(m, q[None], stop_sequences=stop, image_features=feats[i:i + 1], **kw)[0]
               for i, q in enumerate(prompts)]
    assert outs == singles and len(outs[0]) <= 2
    assert not all(len(o) == 8 for o in outs)


def test_llada_v_rejects_an_empty_stop_sequence():
    with pytest.raises(ValueError, match="stop sequence is empty"):
        generate(tiny_lm(), prompt(), steps=4, gen_length=4, block_length=4, mask_id=MASK, stop_sequences=[[]])


# Monte-Carlo log-likelihood bound (get_log_likelihood.py) and multiple choice

def exact_bound(model, prompt_ids, answer, cfg_scale=0.0):
    """The bound get_log_likelihood estimates, by enumerating every non-empty mask set S of the answer:
        -sum_{l=1..A} (1/A) mean_{|S|=l} (A/l) sum_{i in S} CE_i(S)."""
    from itertools import combinations
    from diffusion import cfg_logits
    P, A = len(prompt_ids), len(answer)
    seq = torch.cat([prompt_ids, answer])
    rows, sets = [], []
    for l in range(1, A + 1):
        for S in combinations(range(A), l):
            x = seq.clone()
            x[[P + i for i in S]] = MASK
            rows.append(x)
            sets.append(S)
    x = torch.stack(rows)
    pidx = (torch.arange(P + A) < P)[None]
    with torch.no_grad():
        logp = torch.log_softmax(cfg_logits(model, x, pidx, cfg_scale, MASK).double(), -1)
    total = 0.0
    for r, S in enumerate(sets):
        l = len(S)
        n_sets = math.comb(A, l)
        ce = -sum(float(logp[r, P + i, seq[P + i]]) for i in S)
        total += (1 / A) * (A / l) * ce / n_sets
    return -total


def test_mc_mask_counts_are_stratified():
    """Counts lie in 1..A; b = A gives a permutation of 1..A; with an odd b no count falls on a .5 tie and
    each count is equally likely (the estimator is unbiased). Official quirk, kept: torch.round sends .5
    to the even neighbour, so with an even b ties skew the counts (A = 6, b = 4: odd counts are rarer)."""
    g = torch.Generator().manual_seed(0)
    for A in (1, 3, 6):
        assert sorted(mc_mask_counts(A, A, g).tolist()) == list(range(1, A + 1))
    for A, b in ((6, 9), (5, 7)):
        c = torch.cat([mc_mask_counts(b, A, g) for _ in range(3000)])
        assert c.min() >= 1 and c.max() <= A
        freq = torch.bincount(c, minlength=A + 1)[1:].float() / len(c)
        assert ((freq - 1 / A).abs() < 0.015).all(), freq
    c = torch.cat([mc_mask_counts(4, 6, g) for _ in range(3000)])
    freq = torch.bincount(c, minlength=7)[1:].float() / len(c)
    assert freq[1::2].min() > freq[0::2].max()  # even counts 2, 4, 6 are favoured


@pytest.mark.parametrize("A,cfg", [(1, 0.0), (3, 0.0), (6, 0.0), (4, 1.0)])
def test_log_likelihood_mc_matches_exact_enumeration(A, cfg):
    """Item 3: the Monte-Carlo estimate lies within 3 standard errors of the exact bound from enumerating
    every mask set (answers up to 6 tokens; with CFG too). The standard error comes from 100 independent
    mini-batches of 9 copies (odd, so no rounding ties skew the counts; see the test above)."""
    lm = tiny_lm(5)
    p, ans = prompt(4, seed=6)[0], prompt(A, seed=7)[0]
    exact = exact_bound(lm, p, ans, cfg)
    g = torch.Generator().manual_seed(1)
    est = torch.tensor([get_log_likelihood(lm, p, ans, mc_num=9, batch_size=9, cfg_scale=cfg, mask_id=MASK,
                                           generator=g) for _ in range(100)], dtype=torch.float64)
    se = est.std() / math.sqrt(len(est))
    assert abs(est.mean() - exact) < 3 * se + 1e-6, (float(est.mean()), exact, float(se))
    if A == 1:
        assert se < 1e-6  # one answer token: a single mask set, no randomness at all
    else:
        assert se > 0 and abs(exact) > 20 * se  # the check has teeth: SE small against the bound
    # averaging over mini-batches inside one call gives the same kind of estimate
    one_call = get_log_likelihood(lm, p, ans, mc_num=90, batch_size=9, cfg_scale=cfg, mask_id=MASK, generator=g)
    assert abs(one_call - exact) < 3 * float(se) * math.sqrt(100 / 10) + 1e-6


def test_log_likelihood_rejects_bad_arguments():
    lm = tiny_lm()
    with pytest.raises(ValueError, match="multiple of batch_size"):
        get_log_likelihood(lm, prompt()[0], prompt(3)[0], mc_num=10, batch_size=4, mask_id=MASK)
    with pytest.raises(ValueError, match="empty"):
        get_log_likelihood(lm, prompt()[0], prompt(3)[0][:0], mask_id=MASK)


def test_choose_picks_the_likeliest_choice():
    """Multiple choice by the bound: a model that predicts token 7 at every answer position prefers the
    choice made of 7s, and its scores order the choices by how many 7s they hold."""
    def model(x, attention_mask=None):
        out = torch.zeros(x.shape[0], x.shape[1], V)
        out[..., 7] = 4.0
        return out
    choices = [torch.tensor([7, 3, 3]), torch.tensor([7, 7, 7]), torch.tensor([3, 3, 3])]
    best, scores = choose(model, prompt(4)[0], choices, mc_num=16, batch_size=8, mask_id=MASK,
                          generator=torch.Generator().manual_seed(0))
    assert best == 1 and scores[1] > scores[0] > scores[2]
