"""Tests for tools/bench.py's one-block benchmark (--layer_only) and its --lm.* / --vision.* model overrides.
CPU only, a few seconds. (The whole-model training and sampling benchmark is tested in test_fast.py.)

    python -m pytest -q tests/test_bench.py
"""

import re

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cli import model_config, parse_config
from tools import bench


def parse(argv):
    return parse_config(bench.BenchConfig, argv, model=True)  # what bench.main reads: (BenchConfig, overrides)


def test_layer_only_prints_time_flops_and_mfu(capsys):
    """--layer_only=1 on the toy preset: one block's shape and size, then ms, tokens/s, counted and analytic
    GFLOP, TFLOP/s and MFU against the measured CPU matmul peak; no model or sampling table."""
    bench.main(["--preset=toy", "--layer_only=1", "--seq_len=32", "--train_batch=2", "--train_steps=2"])
    out = capsys.readouterr().out
    assert "one LLaDA block of preset toy (d_model 96, 6 heads, mlp_hidden 256): 0.11M parameters, bf16" in out
    assert "forward + backward of (2, 32, 96), mean of 2" in out
    m = re.search(r"([\d.]+) ms \| ([\d,]+) tokens/s \| ([\d.,]+) GFLOP \(counted; .* = ([\d.,]+)\) \| ([\d.]+) TFLOP/s "
                  r"\| MFU ([\d.]+)% of [\d.,]+ TFLOP/s \(measured cpu fp32 matmul", out)
    assert m, out
    ms, tps = float(m[1]), float(m[2].replace(",", ""))
    assert ms > 0 and tps == pytest.approx(64 / (ms / 1e3), rel=0.02)
    assert float(m[3]) > 0 and float(m[6]) > 0
    assert "sampling" not in out and "| mode |" not in out


def test_layer_flops_are_six_n_t_plus_attention():
    """The counted FLOPs of one block's forward + backward are 6 x (matrix parameters) x tokens + 12 B L^2 d
    (q k^T and attn @ v: 4 B L^2 d forward, twice that backward). The math attention backend is forced: the
    counter sees it as matmuls (it has formulas for the CUDA flash / efficient / cuDNN kernels, but not for
    the CPU flash kernel, which it then misses: only the 6 N T part is counted)."""
    bc, ov = parse(["--layer_only=1", "--seq_len=128", "--train_batch=2", "--train_steps=1", "--lm.d_model=256",
                          "--lm.n_heads=8"])
    lm = model_config("toy", ov).lm
    n_matrix = 4 * 256 * 256 + 3 * 256 * lm.mlp_hidden
    with sdpa_kernel(SDPBackend.MATH):
        r = bench.bench_layer(lm, bc, torch.device("cpu"))
    assert r["analytic"] == 6 * n_matrix * 2 * 128 + 12 * 2 * 128 ** 2 * 256
    assert r["flops"] == pytest.approx(r["analytic"], rel=0.01)
    assert r["params"] == n_matrix + 2 * 256 and r["tokens"] == 256 and r["mem"] is None
    default = bench.bench_layer(lm, bc, torch.device("cpu"))
    assert 6 * n_matrix * 256 <= default["flops"] <= 1.01 * r["analytic"]


def test_model_overrides(tmp_path):
    """--lm.* / --vision.* change the preset's config (typed like train.py's overrides); unknown fields, bad
    values and overrides of a checkpoint's config stop with a one-line message."""
    bc, ov = parse(["--preset=llada_v_8b", "--lm.n_layers=2", "--vision.n_layers=3", "--seq_len=64"])
    cfg = model_config(bc.preset, ov)
    assert (cfg.lm.n_layers, cfg.vision.n_layers, cfg.lm.d_model, bc.seq_len) == (2, 3, 4096, 64)
    assert model_config("llada_v_8b", {}).lm.n_layers == 32  # the preset itself is untouched
    with pytest.raises(SystemExit, match="unknown option --lm.width; .*model options: --lm.vocab_size"):
        model_config("toy", {"lm.width": "3"})
    with pytest.raises(SystemExit, match="--vision.n_layers=x: not an integer"):
        model_config("toy", {"vision.n_layers": "x"})
    (tmp_path / "ckpt.pt").write_bytes(b"")  # exists: the refusal is about the combination, not the file
    with pytest.raises(SystemExit, match="drop --checkpoint"):
        bench.main([f"--checkpoint={tmp_path / 'ckpt.pt'}", "--lm.n_layers=1"])
    with pytest.raises(SystemExit, match="drop --checkpoint"):
        bench.main([f"--checkpoint={tmp_path / 'ckpt.pt'}", "--layer_only=1"])


def test_overrides_reach_the_whole_model_benchmark(capsys):
    """--lm.n_layers shrinks the model that the training and sampling benchmark builds."""
    args = ["--skip_train=1", "--modes=exact", "--repeats=1", "--gen_length=8", "--block_length=8", "--steps=2"]
    bench.main(args)
    full = float(re.search(r"([\d.]+)M parameters", capsys.readouterr().out)[1])
    bench.main(args + ["--lm.n_layers=1"])
    out = capsys.readouterr().out
    one = float(re.search(r"([\d.]+)M parameters", out)[1])
    assert full - one == pytest.approx(3 * (4 * 96 ** 2 + 3 * 96 * 256 + 2 * 96) / 1e6, abs=0.011)
    assert "| exact |" in out
