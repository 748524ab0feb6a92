"""Tests for fast decoding, the options of diffusion.generate (the one sampler) that Fast-dLLM adds: the approximate
KV caches (prefix, dual, diffusion.KVCache) and confidence-threshold parallel decoding; each also against the frozen
pre-merge generate_fast (tests/reference_samplers.py); fast decoding of the official model through sample.py.
Tiny random models, CPU only.

    python -m pytest -q tests/test_fast.py
"""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny tensors: one thread is fastest on a shared 2-core machine

from diffusion import CountingModel, KVCache, MODES, generate, mode_kwargs, reveal
import reference_samplers as ref
from conftest import (EOT, GEN, MASK, V, fixed_logits_model, left_padded, lm_fn, narrow_llada_v, prompt, run_train,
                      tiny_llm, tiny_vlm_and_prompt)


# ----------------------------------------------------------------------------------------------
# The cache itself

@pytest.mark.parametrize("span", [(6, 14), (6, 20), (0, 20), (19, 20)])
def test_cached_span_equals_full_pass(span):
    """Keys/values recorded from x, then only x[:, s:e] recomputed: the span's logits equal the full pass's
    (RoPE offsets, padding mask, every layer), with left padding in the batch too."""
    llm = tiny_llm(n_layers=3)
    x, am, P = left_padded([prompt(12, seed=1)[0], prompt(20, seed=2)[0]])
    full = llm(llm.embed_tokens(x), am)
    kv = KVCache()
    rec = llm(llm.embed_tokens(x), am, cache=kv)
    torch.testing.assert_close(rec, full, rtol=0, atol=0)  # recording does not change the pass
    assert len(kv.k) == 3 and kv.k[0].shape == (2, 4, 20, 8)
    kv.span = span
    part = llm(llm.embed_tokens(x), am, cache=kv)
    assert part.shape == (2, span[1] - span[0], V)
    torch.testing.assert_close(part, full[:, span[0]:span[1]], rtol=1e-5, atol=1e-5)


def test_stale_cache_is_approximate_and_refresh_fixes_it():
    """Change a token outside the span: the cached keys are stale, so the span's logits differ from a fresh
    full pass (the cache is an approximation); re-recording makes them equal again."""
    llm = tiny_llm()
    x = prompt(16, seed=3)
    kv = KVCache()
    llm(llm.embed_tokens(x), cache=kv)
    x2 = x.clone()
    x2[0, 2] = (x2[0, 2] + 1) % 60
    kv.span = (8, 16)
    stale = llm(llm.embed_tokens(x2), cache=kv)
    fresh = llm(llm.embed_tokens(x2))[:, 8:16]
    assert (stale - fresh).abs().max() > 1e-4
    kv = KVCache()
    llm(llm.embed_tokens(x2), cache=kv)
    kv.span = (8, 16)
    torch.testing.assert_close(llm(llm.embed_tokens(x2), cache=kv), fresh, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Item 1: exactness limits

@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
def test_fast_path_with_refresh_every_step_is_token_identical_to_exact(cache):
    """One token per step (steps = gen_length) and the cache re-recorded every step: the cached modes give
    the exact sampler's tokens, step by step, over several semi-autoregressive blocks and several prompts."""
    m = lm_fn(tiny_llm(1))
    for seed in range(3):
        p = prompt(6, seed=seed)
        kw = dict(steps=12, gen_length=12, block_length=4, **GEN)
        ref, fast = [], []
        a = generate(m, p, callback=lambda x, s, b: ref.append(x.clone()), **kw)
        b = generate(m, p, cache=cache, refresh_every=1, callback=lambda x, s, b: fast.append(x.clone()), **kw)
        assert torch.equal(a, b)
        assert len(ref) == len(fast) == 12 and all(torch.equal(u, v) for u, v in zip(ref, fast))


def test_threshold_above_one_is_one_token_per_step():
    """A threshold no confidence can pass (> 1) reveals exactly one token per step: the exact sampler with
    steps = gen_length, and NFE = gen_length."""
    m = lm_fn(tiny_llm(2))
    p = prompt(5, seed=4)
    kw = dict(gen_length=8, block_length=4, **GEN)
    st = {}
    out = generate(m, p, threshold=1.01, stats=st, **kw)
    assert torch.equal(out, generate(m, p, steps=8, **kw))
    assert st["nfe"] == 8 == st["full_nfe"]


# ----------------------------------------------------------------------------------------------
# Threshold decoding

def test_threshold_reveals_every_confident_position_at_once():
    """Positions with confidence >= tau are revealed together in one step, the rest one per step, most
    confident first; tau = 0 fills a block in a single call."""
    def row(top, c):
        return [c if v == top else 0.0 for v in range(V)]
    rows = [row(10, 20.0), row(11, 1.0), row(12, 20.0), row(13, 2.0)]  # two sure, two unsure positions
    snaps, st = [], {}
    out = generate(fixed_logits_model(rows), prompt(3), gen_length=4, block_length=4, threshold=0.9,
                        callback=lambda x, s, b: snaps.append(x[0, 3:].clone()), stats=st, **GEN)
    assert out[0, 3:].tolist() == [10, 11, 12, 13]
    revealed = [(s != MASK).nonzero()[:, 0].tolist() for s in snaps]
    assert revealed == [[0, 2], [0, 2, 3], [0, 1, 2, 3]] and st["nfe"] == 3
    st = {}
    generate(fixed_logits_model(rows), prompt(3), gen_length=4, block_length=2, threshold=0.0, stats=st, **GEN)
    assert st["nfe"] == 2  # one call per block


def fast_dllm_transfer(confidence, mask_index, threshold):
    """Transcribed from NVlabs/Fast-dLLM llada/generate.py, get_transfer_index, threshold branch: take every
    masked position in descending confidence, keep the first, drop each later one whose confidence < tau."""
    transfer = torch.zeros_like(confidence, dtype=torch.bool)
    num_transfer_tokens = mask_index.sum(dim=1, keepdim=True)
    for j in range(confidence.shape[0]):
        _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j]))
        transfer[j, select_index] = True
        for k in range(1, int(num_transfer_tokens[j])):
            if confidence[j, select_index[k]] < threshold:
                transfer[j, select_index[k]] = False
    return transfer


def test_threshold_rule_is_fast_dllm_greater_or_equal():
    """Issue 25: the threshold keeps confidences >= tau (Fast-dLLM drops those < tau), at least the most
    confident one. Confidences on a grid of tenths hit tau = 0.5 exactly; against the transcription above, on
    rows with masked positions and revealed ones (-inf), and rows where nothing reaches tau."""
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        B, L, lo = 3, 12, 4
        masked = torch.rand(B, L, generator=g) < 0.6
        masked[:, :lo] = False
        masked[torch.arange(B), lo + torch.randint(0, L - lo, (B,), generator=g)] = True  # a mask in every row
        conf = torch.randint(0, 10, (B, L), generator=g).float() / 10  # 0.0 .. 0.9: ties, and 0.5 itself
        if trial % 4 == 0:  # nothing reaches tau: one position per row (distinct values: no tie for the best)
            conf = conf * 0.45 + torch.randperm(B * L, generator=g).reshape(B, L) * 1e-4
        confidence = torch.where(masked, conf, -torch.inf)
        x = torch.full((B, L), MASK)
        x0 = torch.arange(lo, L).expand(B, -1)
        reveal(x, x0, confidence, lo, None, threshold=0.5)
        want = fast_dllm_transfer(confidence, masked, 0.5)
        assert torch.equal(x != MASK, want), trial
    # the case the old rule (> tau) got wrong: a confidence exactly tau is revealed
    x, conf = torch.full((1, 3), MASK), torch.tensor([[0.9, 0.5, 0.2]])
    reveal(x, torch.tensor([[7, 8, 9]]), conf, 0, None, threshold=0.5)
    assert x.tolist() == [[7, 8, MASK]]


class Runaway(Exception):
    pass


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("llada_v", [False, True])
def test_a_model_that_predicts_mask_everywhere_ends_in_every_mode(mode, llada_v):
    """Issue 26: a model whose most likely token everywhere is [MASK] (then token 7). The official schedule
    (exact, prefix, dual) writes what the model says, as generate.py does, and ends after `steps` calls; a
    threshold step never writes [MASK] (it would reveal nothing, and the block would never fill), so it
    takes the next most likely id and ends within gen_length calls. Before the fix the threshold modes
    looped for ever (here: Runaway after 100 steps)."""
    rows = [[10.0 if v == MASK else (5.0 - 0.1 * j if v == 7 else 0.0) for v in range(V)] for j in range(8)]
    kw = dict(steps=8, gen_length=8, block_length=4, **GEN, **mode_kwargs(mode, threshold=0.9))
    if llada_v:
        kw.update(stop_sequences=[[EOT]], suffix=[5])

    def guard(x, step, block):
        if step >= 100:
            raise Runaway(mode)
    st = {}
    out = generate(fixed_logits_model(rows, P=5), prompt(), callback=guard, stats=st, **kw)
    canvas = torch.tensor(out[0][:8]) if llada_v else out[0, 5:]
    if MODES[mode]["threshold"]:
        assert st["nfe"] <= 8 and (canvas == 7).all()
    else:
        assert st["nfe"] == 8 and (canvas == MASK).all()  # generate.py's behaviour: [MASK] written back


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_fills_the_canvas_block_by_block_and_never_remasks(mode):
    """Each mode keeps the prompt, never changes a revealed token, never writes past the current block,
    and leaves no mask; cached modes make full passes only at block starts."""
    m = lm_fn(tiny_llm(3))
    p = prompt(5, seed=5)
    snaps, st = [], {}
    kw = dict(steps=8, gen_length=8, block_length=4, **GEN, **mode_kwargs(mode, threshold=0.3))
    out = generate(m, p, callback=lambda x, s, b: snaps.append((x.clone(), b)), stats=st, **kw)
    assert torch.equal(out[:, :5], p) and not (out == MASK).any()
    prev = torch.cat([p, torch.full((1, 8), MASK)], 1)
    for x, b in snaps:
        assert torch.equal(x[prev != MASK], prev[prev != MASK])
        assert (x[:, 5 + 4 * (b + 1):] == MASK).all()
        prev = x
    assert st["nfe"] == len(snaps)
    if MODES[mode]["cache"]:
        assert st["full_nfe"] == 2 and st["positions"] < st["nfe"] * 13 and st["cache_bytes"] > 0
    else:
        assert st["full_nfe"] == st["nfe"] and st["positions"] == st["nfe"] * 13


@pytest.mark.parametrize("mode", ["prefix", "dual", "threshold+dual"])
def test_fast_batched_left_padding_matches_single(mode):
    """A left-padded batch at T = 0 gives the same answers (and for threshold, the same tokens) as one
    prompt at a time, with the caches too."""
    m = lm_fn(tiny_llm(4))
    prompts = [prompt(3, seed=1)[0], prompt(7, seed=2)[0], prompt(5, seed=3)[0]]
    batch, am, P = left_padded(prompts)
    kw = dict(steps=8, gen_length=8, block_length=4, **GEN, **mode_kwargs(mode, threshold=0.2))
    out = generate(m, batch, attention_mask=am, **kw)
    for q, o in zip(prompts, out):
        assert torch.equal(o[P:], generate(m, q[None], **kw)[0, len(q):])


def test_fast_with_cfg_and_image_features():
    """LLaDA-V with an image and CFG through the dual cache: with refresh every step it equals the exact
    sampler; with block-start refresh it still fills the canvas, with fewer full passes."""
    m, p = tiny_vlm_and_prompt()
    with torch.no_grad():
        f = m.encode_images(torch.rand(1, 3, 16, 16) * 2 - 1)
    kw = dict(steps=6, gen_length=6, block_length=3, cfg_scale=1.0, image_features=f, **GEN)
    assert torch.equal(generate(m, p, **kw), generate(m, p, cache="dual", refresh_every=1, **kw))
    st = {}
    out = generate(m, p, cache="dual", stats=st, **kw)
    assert not (out == MASK).any() and st["full_nfe"] == 2 and st["nfe"] == 6


def test_counting_model_and_bad_arguments():
    """CountingModel counts the exact sampler's calls; bad cache/mode names get clear errors."""
    cm = CountingModel(lm_fn(tiny_llm()))
    generate(cm, prompt(), steps=6, gen_length=6, block_length=3, **GEN)
    assert cm.nfe == 6
    with pytest.raises(ValueError, match="prefix"):
        generate(cm, prompt(), gen_length=4, block_length=4, steps=4, cache="kv", **GEN)
    with pytest.raises(ValueError, match="threshold\\+dual"):
        mode_kwargs("turbo")


# ----------------------------------------------------------------------------------------------
# Against the frozen pre-merge generate_fast (tests/reference_samplers.py)

def fast_cases():
    """(name, model, prompt, kwargs) of the situations the fast tests above exercise."""
    batch, am, _ = left_padded([prompt(3, seed=1)[0], prompt(7, seed=2)[0], prompt(5, seed=3)[0]])
    vlm, vp = tiny_vlm_and_prompt()
    with torch.no_grad():
        f = vlm.encode_images(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    return [
        ("3 blocks", lm_fn(tiny_llm(1)), prompt(6, seed=0), dict(steps=12, gen_length=12, block_length=4)),
        ("left padding", lm_fn(tiny_llm(4)), batch, dict(steps=8, gen_length=8, block_length=4, attention_mask=am)),
        ("image, CFG", vlm, vp, dict(steps=6, gen_length=6, block_length=3, cfg_scale=1.0, image_features=f)),
        ("T = 1, flags", lm_fn(tiny_llm(2)), prompt(5, seed=4), dict(steps=8, gen_length=8, block_length=4,
                                                                    temperature=1.0, logits_eos_inf=True,
                                                                    confidence_eos_eot_inf=True)),
    ]


@pytest.mark.parametrize("mode", [m for m in MODES if m != "exact"])
@pytest.mark.parametrize("refresh_every", [0, 2])
def test_fast_modes_are_the_frozen_generate_fast(mode, refresh_every):
    """Every fast mode (threshold 0.3 and 1.01, refresh at block starts or every 2 steps) gives the frozen
    generate_fast's tokens at every step and the same statistics (nfe, full_nfe, positions, cache_bytes), on a
    multi-block prompt, a left-padded batch, LLaDA-V with an image and CFG, and T > 0 with both EOS flags.
    ('exact' is the official mode, tested against the frozen generate in test_diffusion.py: at T > 0 it draws the
    noise over the whole sequence as generate.py does, where generate_fast drew it over the block.)"""
    for name, m, p, kw in fast_cases():
        for tau in (0.3, 1.01):
            runs = []
            for sampler in (generate, ref.generate_fast):
                snaps, st = [], {}
                torch.manual_seed(3)
                out = sampler(m, p, refresh_every=refresh_every, stats=st, **GEN, **kw, **mode_kwargs(mode, tau),
                              callback=lambda x, s, b: snaps.append((x.clone(), s, b)))
                runs.append((out, snaps, st))
            (a, sa, ta), (b, sb, tb) = runs
            assert torch.equal(a, b) and ta == tb, (name, tau)
            assert len(sa) == len(sb) and all(torch.equal(u, v) and s == t and c == d
                                              for (u, s, c), (v, t, d) in zip(sa, sb)), (name, tau)
            if not MODES[mode]["threshold"]:
                break  # tau is unused


def test_fast_modes_with_llada_v_options():
    """LLaDA-V's options (banned ids, a stop, a suffix) combine with the caches and the threshold: one token per
    step and the cache refreshed every step is LLaDA-V's exact sampler, stop and early end included; with the
    cache kept for the whole block the answer is still cut at the stop and carries the suffix."""
    m, p = tiny_vlm_and_prompt(2)
    with torch.no_grad():
        f = m.encode_images(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    kw = dict(gen_length=8, block_length=4, mask_id=MASK, banned_ids=(62,), suffix=[5], image_features=f)
    (free,) = generate(m, p, steps=8, stop_sequences=[], **kw)
    stops = [[free[2]]]
    exact_st = {}
    (exact,) = generate(m, p, steps=8, stop_sequences=stops, stats=exact_st, **kw)
    assert len(exact) <= 3 and exact[-1] == 5 and exact_st["nfe"] < 8
    for mode in ("threshold", "threshold+prefix", "threshold+dual"):
        st = {}
        (out,) = generate(m, p, stop_sequences=stops, refresh_every=1, stats=st, **kw, **mode_kwargs(mode, 1.01))
        assert out == exact and st == dict(exact_st, cache_bytes=st["cache_bytes"]), mode
    for mode in ("prefix", "dual", "threshold+dual"):
        (out,) = generate(m, p, steps=8, stop_sequences=stops, **kw, **mode_kwargs(mode, 0.5))
        assert out[-1] == 5 and free[2] not in out[:-1], mode


def test_official_model_cli_fast_mode_equals_exact(tmp_path, capsys, monkeypatch):
    """sample.py --checkpoint=<Hugging Face dir> with --mode=threshold+dual: a tiny LLaDA-V saved with the real key
    names (checkpoint.save_pretrained) and the toy tokenizer. With the cache refreshed every step and one token
    revealed per step (a threshold above 1, steps = gen_length) the answer is the exact sampler's, with as many
    model calls; with the default refresh the cached mode runs with fewer full passes."""
    import sample
    from checkpoint import save_pretrained
    from PIL import Image
    save_pretrained(narrow_llada_v(vocab_size=512, image_size=28), tmp_path / "v")  # 2 x 2 patches of 14 px
    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "g.png")
    common = [f"--checkpoint={tmp_path / 'v'}", "--tokenizer=toy", f"--image={tmp_path / 'g.png'}",
              "--question=What color?", "--gen_length=8", "--block_length=4", "--dtype=fp32"]

    answers = []  # the answer ids the one sampler returns (the decoded text of a random model is mostly U+FFFD)
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **kw: answers.append(real(*a, **kw)) or answers[-1])

    def run(*extra):
        sample.main(common + list(extra))
        out = capsys.readouterr().out
        calls = out.split(" decoding: ")[1].split(" model calls (")
        return answers[-1], out.split("answer:   ")[1].split("\n")[0], int(calls[0]), int(calls[1].split(" full")[0])
    exact = run("--steps=8")
    fast = run("--mode=threshold+dual", "--threshold=1.5", "--refresh_every=1")
    assert exact == fast and exact[2] == exact[3] and len(exact[0][0]) > 0
    cached = run("--mode=dual", "--steps=8", "--stop=,")  # no stop string: every step of both blocks runs
    assert cached[2:] == (8, 2)  # one full pass per block, the rest on the cached keys/values


# ----------------------------------------------------------------------------------------------
# sample.py --eval / --gif, the animation, tools/bench.py

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    run_train(out, "--max_steps=2")
    return str(out / "ckpt.pt")


def test_sample_eval_prints_a_row_per_mode(checkpoint, capsys):
    """--eval: one table row per mode; the exact sampler makes `steps` calls per batch, a cached mode two full
    passes per batch (one per block)."""
    import sample
    sample.main([f"--checkpoint={checkpoint}", "--eval", "--n=4", "--batch_size=2", "--block_length=6",
                 "--modes=exact,dual"])
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| exact") or l.startswith("| dual")]
    assert len(rows) == 2
    assert "| 12.00 (12.00) |" in rows[0] and "(2.00) |" in rows[1]
    with pytest.raises(SystemExit, match="--modes=exact,warp: 'warp' is not allowed"):
        sample.main([f"--checkpoint={checkpoint}", "--eval", "--n=2", "--modes=exact,warp"])


def test_sample_gif(checkpoint, tmp_path, capsys):
    """python -m tools.draw --gif writes an animation with one frame per step plus the all-mask start; in the last frame every
    cell is coloured by its reveal step (no grey mask cell left), in the first every cell is grey."""
    from tools import draw as animate
    import sample
    path = tmp_path / "d.gif"
    animate.main([f"--checkpoint={checkpoint}", f"--gif={path}", "--mode=threshold"])
    assert "wrote" in capsys.readouterr().out
    from PIL import Image
    im = Image.open(path)
    assert im.format == "GIF" and 2 <= im.n_frames <= 13 and path.stat().st_size < 300_000

    def cell(frame, i):  # centre-left pixel of canvas cell i (behind the text start)
        im.seek(frame)
        x = animate.IMG + 28 + (i % animate.COLS) * (animate.CELL_W + 4) + 2
        y = 44 + (i // animate.COLS) * (animate.CELL_H + 4) + 2
        return im.convert("RGB").getpixel((x, y))
    assert all(cell(0, i) == animate.MASK_FILL for i in range(12))
    assert all(cell(im.n_frames - 1, i) != animate.MASK_FILL for i in range(12))


def test_inference_dtype_choice():
    """ML-GSAI/LLaDA-V train/llava/model/builder.py::load_pretrained_model, train/generate_demo.py: --dtype=auto loads
    the official weights in float16 on CUDA (the official inference precision) and keeps the checkpoint's dtype (None)
    on a CPU; a named dtype wins anywhere; an unknown one is one clear error."""
    import sample
    assert sample.inference_dtype("auto", torch.device("cuda")) == torch.float16
    assert sample.inference_dtype("auto", torch.device("cpu")) is None
    assert sample.inference_dtype("bf16", torch.device("cuda")) == torch.bfloat16
    assert sample.inference_dtype("fp32", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="--dtype=int3: use auto or one of bf16, fp16, fp32"):
        sample.inference_dtype("int3", torch.device("cpu"))


def test_lmms_eval_decoding_option():
    """ML-GSAI/LLaDA-V eval/lmms-eval/lmms_eval/models/llava_onevision_llada.py::generate_until: lmms_eval=True skips
    special tokens and strips ONE trailing "." (then white space); the default decodes every token and strips white
    space only."""
    import sample
    from synthetic import toy_tokenizer
    tok = toy_tokenizer()
    ids = tok.encode(" red..") + [tok.eot_id]
    assert sample.decode_answer(tok, ids) == "red..<|eot_id|>"
    assert sample.decode_answer(tok, ids, lmms_eval=True) == "red."
    assert sample.decode_answer(tok, tok.encode(" a circle. "), lmms_eval=True) == "a circle."  # the dot is not last
    assert sample.decode_answer(tok, tok.encode("<|startoftext|>blue.") + [tok.eos_id], lmms_eval=True) == "blue"


def test_step_colours_run_blue_to_red():
    from tools import draw as animate
    first, last = animate.step_colour(1, 10), animate.step_colour(10, 10)
    assert first[2] > first[0] and last[0] > last[2]
    assert len({animate.step_colour(s, 10) for s in range(1, 11)}) == 10


def test_bench_runs_and_prints_every_mode(capsys):
    """tools/bench.py on the toy preset: a training line with counted FLOPs and MFU against a measured matmul peak,
    and one sampling row per mode; the exact sampler makes `steps` full passes."""
    from tools import bench
    bench.main(["--train_batch=2", "--train_steps=1", "--repeats=1", "--gen_length=8", "--block_length=4",
                "--steps=8"])
    out = capsys.readouterr().out
    assert "GFLOP/step (model.step_flops)" in out and "MFU" in out and "measured cpu fp32 matmul" in out
    rows = [l for l in out.splitlines() if l.startswith("| ") and not l.startswith("| mode")]
    assert [r.split("|")[1].strip() for r in rows] == list(MODES)
    assert "| 8 (8) |" in rows[0] and "(2) |" in rows[1]
    with pytest.raises(SystemExit, match="unknown option --nope"):
        bench.main(["--nope=1"])


def test_bench_official_path(capsys):
    """tools/bench.py --official=1 at a tiny width: the real vocabulary, a 640x480 image in anyres_max_4 = 2,929
    visual tokens, one markdown row per mode; the exact sampler makes `steps` full passes, the dual cache one per
    block, and the first row agrees with itself."""
    from tools import bench
    bench.main(["--official=1", "--lm.d_model=32", "--lm.n_layers=1", "--lm.n_heads=2", "--lm.mlp_hidden=64",
                "--vision.n_layers=2", "--vision.d_model=16", "--vision.n_heads=2", "--vision.mlp_hidden=32",
                "--repeats=1", "--gen_length=4", "--block_length=2", "--steps=4", "--modes=exact,dual,threshold"])
    out = capsys.readouterr().out
    assert "vocabulary 126,464" in out and "5 crops -> 2,929 visual tokens" in out and "prompt 2,959 tokens" in out
    rows = [l for l in out.splitlines() if l.startswith("| ") and not l.startswith("| mode")]
    assert [r.split("|")[1].strip() for r in rows] == ["exact", "dual", "threshold"]
    assert "| 4 (4) | 1.00x | 100% |" in rows[0] and "| 4 (2) |" in rows[1] and "| 4 (4) |" in rows[2]


def test_bench_sampler_vs_official(capsys, tmp_path):
    """tools/bench.py --vs_official=1 at a tiny width: the real vocabulary, one row for the official generate.py's
    transcription, one for a --baseline diffusion.py (here a copy of this one) and one for diffusion.generate, all
    with the official tokens; a missing --baseline file is one clear error."""
    import shutil
    from tools import bench
    shutil.copy(Path(bench.__file__).parent.parent / "diffusion.py", tmp_path / "old.py")
    bench.main(["--vs_official=1", "--lm.d_model=32", "--lm.n_layers=1", "--lm.n_heads=2", "--lm.mlp_hidden=64",
                "--text_len=8", "--gen_length=4", "--block_length=2", "--steps=4", "--repeats=1",
                f"--baseline={tmp_path / 'old.py'}"])
    out = capsys.readouterr().out
    assert "vocabulary 126,464" in out and "prompt 8 tokens" in out
    rows = [l for l in out.splitlines() if l.startswith("| ") and not l.startswith("| sampler")]
    assert [r.split("|")[1].strip() for r in rows] == ["official generate.py (transcribed)",
                                                       f"generate of {tmp_path / 'old.py'}", "diffusion.generate"]
    assert all(r.rstrip().endswith("| yes |") for r in rows)
    with pytest.raises(SystemExit, match="baseline"):
        bench.main(["--vs_official=1", f"--baseline={tmp_path / 'none.py'}"])

def test_bench_flops_see_the_model():
    """The bench's FLOPs of one training step (model.step_flops, held to torch's counter in test_model.py) are
    ~ 6 x parameters x tokens (language-model layers over the
    whole sequence, vision layers over the patches) plus attention and the head on masked rows: a sanity
    band that catches a counter that sees nothing, or counts the step twice."""
    from tools import bench
    from model import LLaDAV, get_config
    m = LLaDAV(get_config("toy"))
    bc = bench.BenchConfig(train_batch=2, train_steps=1)
    tr = bench.bench_train(m, bc, torch.device("cpu"), peak=1e9)
    lm_body = sum(p.numel() for p in m.llm.layers.parameters())
    vit = sum(p.numel() for p in m.vision.parameters()) + sum(p.numel() for p in m.projector.parameters())
    approx = 6 * (lm_body * tr["tokens"] + vit * 2 * m.cfg.vision.n_patches)
    assert 0.9 * approx < tr["flops"] < 1.6 * approx, (tr["flops"], approx)


def test_eval_choice_scores_every_candidate_canvas(checkpoint, monkeypatch):
    """evaluate_choice hands diffusion.choose the chat prompt with the image placeholders and one answer
    canvas per candidate (answer, <|eot_id|>, EOS padding); the pick is scored against the truth."""
    import sample
    from data import chat_template, llada_v_messages
    from checkpoint import load_checkpoint
    from synthetic import SyntheticVQA
    model, _, _ = load_checkpoint(checkpoint)
    from synthetic import toy_tokenizer
    tok = toy_tokenizer()
    n_img = model.cfg.vision.n_patches
    samples = SyntheticVQA(tok, model.cfg.vision.image_size, n_img, 12).heldout(10)
    closed = [s for s in samples if s[3] != "describe"]  # the closed kinds
    seen = []

    def fake_choose(m, prompt, choices, **kw):
        img, q, truth, kind = closed[len(seen)]
        seen.append(q)
        assert prompt.tolist() == tok.encode_with_image(chat_template(llada_v_messages(q, None)), n_img)
        texts = [sample.answer_text(tok, c) for c in choices]
        # a fixed list per kind; for relation the two objects the question names, the truth among them
        assert texts == (sample.CHOICES[kind] or q[:-1].split(", ")[1].split(" or "))
        assert truth in texts and all(len(c) == 12 and int(c[-1]) == tok.eos_id for c in choices)
        assert kw["image_features"].shape == (kw["batch_size"], n_img, model.cfg.lm.d_model)
        return texts.index(truth), []
    monkeypatch.setattr(sample, "choose", fake_choose)
    res = sample.evaluate_choice(model, tok, samples, gen_length=12)
    assert res["n"] == 8 == len(seen) and res["all"] == 1.0 and "describe" not in res
