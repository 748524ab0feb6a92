"""train.py and sample.py end to end, on tiny configs: overfitting, checkpoints, resume, CLI errors.

    python -m pytest -q tests/test_train.py
"""
import os
import sys
import json

import pytest
import torch
from PIL import Image

import sample
import train
from synthetic import SyntheticVQA
from synthetic import toy_tokenizer
from tokenizer import get_tokenizer
from diffusion import diffusion_loss, forward_process
from model import LLaDAV, get_config
from vision import preprocess
from conftest import run_train

torch.set_num_threads(1)

def test_overfit_then_sampler_reproduces_answers():
    """A tiny LLaDA-V trained on four image-question pairs (one per kind, with different images) learns
    them, and the low-confidence sampler then writes back every answer, including a multi-token one."""
    torch.manual_seed(0)
    mc = get_config("toy")
    mc.lm.n_layers, mc.vision.n_layers = 2, 2
    tok = toy_tokenizer()
    data = SyntheticVQA(tok, mc.vision.image_size, mc.vision.n_patches, gen_length=12)
    pairs = [data.sample(i, kind) for i, kind in enumerate(["color", "shape", "count", "describe"])]
    model = LLaDAV(mc)
    model.init_weights()
    ids, labels, attn, pixels = data.batch(pairs * 4, lambda im: preprocess(im, mc.vision.image_size))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        xt, masked, p_mask = forward_process(ids, labels, tok.mask_id, generator=g)
        loss = diffusion_loss(model(xt, pixels, attn, output_positions=masked), labels, masked, p_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    preds = sample.answer(model, tok, [p[0] for p in pairs], [p[1] for p in pairs], gen_length=12, steps=12, block_length=12)
    assert preds == [p[2] for p in pairs]
    # fast decoding (dual cache over 3 blocks + confidence threshold) writes back the same answers
    fast = sample.answer(model, tok, [p[0] for p in pairs], [p[1] for p in pairs], gen_length=12, steps=12,
                         block_length=4, mode="threshold+dual", threshold=0.9)
    assert fast == preds
    assert len(tok.encode(pairs[3][2])) >= 3  # the describe answer really is several tokens


def test_train_writes_checkpoint_and_report(tmp_path):
    """A short run saves a loadable checkpoint with optimizer state and a report with every question kind."""
    model, report = run_train(tmp_path, "--max_steps=4", "--ckpt_every=2")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and "optimizer" in ckpt and ckpt["train_config"]["max_steps"] == 4
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert set(on_disk["heldout"]) >= {"color", "shape", "count", "relation", "describe", "all"}
    assert on_disk["heldout"]["n"] == 10 and report["steps"] == 4
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]  # no temporary file left behind


def test_zero_eval_questions_means_no_evaluation(tmp_path):
    """--eval_final=0 / --eval_quick=0 skip the report and the quick checks (they used to crash on an
    empty held-out list)."""
    model, report = run_train(tmp_path, "--max_steps=2", "--eval_final=0", "--eval_every=1", "--eval_quick=0")
    assert report["steps"] == 2 and "heldout" not in report
    assert "heldout" not in json.loads((tmp_path / "report.json").read_text())


def test_train_with_a_converted_tokenizer_json(tmp_path):
    """--tokenizer=<tokenizer.json>: the run uses the converted vocabulary (as the small and 8B presets do
    with the official file), records its path in the checkpoint, and sample.py finds it again."""
    from test_tokenizer import build_tokenizer_json  # skips without the `tokenizers` package
    ref = build_tokenizer_json(tmp_path / "tokenizer.json", split_regex=True)
    path = str(tmp_path / "tokenizer.json")
    model, report = run_train(tmp_path, "--max_steps=2", f"--tokenizer={path}", "--lm.vocab_size=768",
                              "--gen_length=48", "--block_length=48", "--sample_steps=48", "--lm.max_seq_len=512")  # long
    # answers (a small BPE) and LLaDA-V's system prompt (a non-toy tokenizer trains and samples with it)
    tok = get_tokenizer(path)
    assert tok.vocab_size == ref.get_vocab_size() != toy_tokenizer().vocab_size
    assert model.cfg.tokenizer == path
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]["tokenizer"] == path
    assert report["heldout"]["n"] == 10
    sample.main([f"--checkpoint={tmp_path / 'ckpt.pt'}", "--seed=1"])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_reproduces_uninterrupted_run(tmp_path, optimizer):
    """Training 6 steps straight gives bit-identical weights to training 3, stopping, and resuming to 6:
    batches and masks depend only on (seed, step), and the optimizer state (AdamW's moments, Muon's
    momentum) is restored."""
    o = f"--optimizer={optimizer}"
    straight, _ = run_train(tmp_path / "a", "--max_steps=6", o)
    run_train(tmp_path / "b", "--max_steps=3", o)
    # a longer schedule is a changed option: allowed with --resume_changed=1 (the lr is the same up to step 3)
    resumed, _ = run_train(tmp_path / "b", "--max_steps=6", "--resume=1", "--resume_changed=1", o)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_resume_with_another_config_is_refused(tmp_path):
    run_train(tmp_path, "--max_steps=1")
    with pytest.raises(SystemExit, match="another model config.*lm"):
        run_train(tmp_path, "--max_steps=2", "--resume=1", "--lm.n_layers=3")
    with pytest.raises(SystemExit, match="does not exist"):
        run_train(tmp_path / "nothing", "--max_steps=2", "--resume=1")


@pytest.mark.parametrize("args, message", [
    (["--preset=huge"], "--preset=huge: not allowed; use one of toy, small, llada_v_8b"),
    (["--lr_max=3"], "unknown option --lr_max; .*valid options: .*--lr"),
    (["--lm.width=3"], "unknown option --lm.width"),
    (["--batch_size=many"], "--batch_size=many: not an integer"),
    (["max_steps=3"], "not of the form --key=value"),
])
def test_bad_options_get_one_line_errors(args, message):
    with pytest.raises(SystemExit, match=message):
        train.parse_args(args, train.TrainConfig())


def test_bad_kind_weights_stop_training_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--kind_weights: bad kind weight 'colour:1'"):
        run_train(tmp_path, "--kind_weights=colour:1,relation:2")


def test_overrides_reach_both_configs():
    tc, mc = train.parse_args(["--max_steps=7", "--lm.n_layers=3", "--vision.image_size=32", "--resume=true"],
                              train.TrainConfig())
    assert (tc.max_steps, mc.lm.n_layers, mc.vision.image_size, tc.resume) == (7, 3, 32, True)


def test_lr_schedule_warmup_then_cosine():
    tc = train.TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, decay_frac=1.0)
    assert train.lr_at(0, tc) == pytest.approx(0.1) and train.lr_at(9, tc) == pytest.approx(1.0)
    assert train.lr_at(60, tc) == pytest.approx(0.55) and train.lr_at(110, tc) == pytest.approx(0.1)


def test_lr_schedule_holds_the_peak_until_the_decay():
    # decay_frac 0.4 of 100 steps: warmup to step 10, the peak up to step 60, then the cosine over 40 steps
    tc = train.TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100, decay_frac=0.4)
    assert [train.lr_at(s, tc) for s in (10, 35, 60)] == [pytest.approx(1.0)] * 3
    assert train.lr_at(80, tc) == pytest.approx(0.55) and train.lr_at(100, tc) == pytest.approx(0.1)
    lrs = [train.lr_at(s, tc) for s in range(60, 101)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # strictly decreasing through the decay
    # the stage presets keep LLaDA-V's plain cosine
    assert all(train.STAGES[k]["decay_frac"] == 1.0 for k in train.STAGES)


# ------------------------------------------------------------------------------------------------
# sample.py command line

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    run_train(out, "--max_steps=2")
    return str(out / "ckpt.pt")


def run_sample(capsys, *args):
    sample.main(list(args))
    return capsys.readouterr().out


def test_sample_synthetic_with_steps(checkpoint, capsys):
    """No image: a synthetic one is drawn; question, truth and answer are printed, and --show_steps prints
    one canvas per step, the number of masks ('_') never growing."""
    out = run_sample(capsys, f"--checkpoint={checkpoint}", "--show_steps")
    assert "question:" in out and "truth:" in out and "answer:" in out
    steps = [l for l in out.splitlines() if l.startswith("step ")]
    assert len(steps) == 12
    masks = [l.split(":", 1)[1].split().count("_") for l in steps]
    assert masks == sorted(masks, reverse=True) and masks[-1] == 0


def test_sample_own_image(checkpoint, capsys, tmp_path):
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(tmp_path / "x.png")  # non-square, with alpha
    out = run_sample(capsys, f"--checkpoint={checkpoint}", f"--image={tmp_path / 'x.png'}", "--question=What color is the circle?")
    assert "question: What color is the circle?" in out and "answer:" in out


@pytest.mark.parametrize("make, args, message", [
    (None, ["--checkpoint=/nonexistent/ckpt.pt"], "--checkpoint=/nonexistent/ckpt.pt: does not exist"),
    (None, ["--image=/nonexistent.png"], "--image=/nonexistent.png: does not exist"),
    ("garbage", [], "cannot read image"),
    (None, ["--gen_length=12", "--block_length=5"], "not divisible by --block_length=5"),
    (None, ["--gen_length=12", "--block_length=6", "--steps=5"], "--steps=5 is not divisible by the 2 blocks"),
    (None, ["--gen_length=4096"], "exceeds the model's context"),
    (None, ["--colour=red"], "unknown option --colour"),
])
def test_sample_bad_input(checkpoint, tmp_path, make, args, message):
    if make == "garbage":
        (tmp_path / "bad.png").write_bytes(b"not an image at all")
        args = [f"--image={tmp_path / 'bad.png'}"]
    if not any(a.startswith("--checkpoint") for a in args):
        args = [f"--checkpoint={checkpoint}"] + args
    with pytest.raises(SystemExit, match=message):
        sample.main(args)


def test_toy_refuses_chat_and_think_and_says_what_it_sees(checkpoint, capsys, tmp_path):
    """The toy was never trained on conversations: --chat and --think are refused in one line (they used to
    be ignored, answering a synthetic question with exit 0); an image of the user's gets a word on what the
    toy can see."""
    for flag in ("--chat=1", "--think=think"):
        with pytest.raises(SystemExit, match="is the toy, trained on one question about one synthetic scene"):
            sample.main([f"--checkpoint={checkpoint}", flag])
    Image.new("RGB", (50, 40), (0, 0, 255)).save(tmp_path / "p.png")
    out = run_sample(capsys, f"--checkpoint={checkpoint}", f"--image={tmp_path / 'p.png'}")
    assert "the toy knows only its own world" in out and "4x4 grid" in out


def test_init_parts_image_newline_is_reachable(tmp_path):
    """--init_parts takes image_newline (one list, checkpoint.INIT_PARTS, for the option and the loader): a
    spatial_unpad model copies exactly that vector from the source and leaves the rest as initialised."""
    from checkpoint import INIT_PARTS, init_from, save_checkpoint
    from cli import model_config
    from model import LLaDAV
    assert "image_newline" in INIT_PARTS
    tc, _ = train.parse_args(["--init_parts=image_newline,projector"], train.TrainConfig())
    assert tc.init_parts == "image_newline,projector"
    mc = model_config("toy", {"lm.d_model": 32, "lm.n_heads": 2, "lm.mlp_hidden": 64, "lm.n_layers": 1})
    mc.mm_patch_merge_type = "spatial_unpad"
    torch.manual_seed(0)
    src, dst = LLaDAV(mc), LLaDAV(mc)
    save_checkpoint(tmp_path / "src.pt", {"model": src.state_dict(), "config": mc.to_dict()})
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    init_from(dst, str(tmp_path / "src.pt"), "image_newline", lambda *a: None)
    assert torch.equal(dst.image_newline, src.image_newline)
    assert not torch.equal(before["image_newline"], src.image_newline)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items() if k != "image_newline")


def test_sample_refuses_a_non_checkpoint(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(SystemExit, match="not a checkpoint written by train.py"):
        sample.main([f"--checkpoint={tmp_path / 'ckpt.pt'}"])


def test_muon_adamw_part_is_adamw():
    """MuonAdamW's groups without the muon flag take exactly torch.optim.AdamW's steps."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))
    a2, b2 = (torch.nn.Parameter(p.detach().clone()) for p in (a, b))
    ours = train.MuonAdamW([{"params": [a, b], "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([a2, b2], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        for p, q in ((a, a2), (b, b2)):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, a2, atol=1e-6) and torch.allclose(b, b2, atol=1e-6)


def test_muon_orthogonalises_each_matrix():
    """NS5 maps a matrix to ~U V^T of its SVD: the singular values land near 1 (the quintic leaves them in
    roughly (0.5, 1.5)) whatever the input's scale, the singular vectors are kept, and a batch of
    same-shape matrices gives what each alone gives."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(3, 12, 5, generator=g) * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]
    O = train.MuonAdamW.orthogonalise(G, 5)
    for i in range(3):
        U, S, Vh = torch.linalg.svd(G[i], full_matrices=False)
        s = torch.linalg.svdvals(O[i])
        assert s.min() > 0.4 and s.max() < 1.6, s
        D = U.T @ O[i] @ Vh.T  # O in G's singular basis: nearly diagonal
        assert (D - torch.diag(torch.diagonal(D))).norm() < 0.05 * D.norm()
        assert torch.allclose(O[i], train.MuonAdamW.orthogonalise(G[i:i + 1], 5)[0], atol=1e-5)


def test_the_toy_default_stays_within_its_compute_budget():
    """The no-flag run's compute, parameters x steps x batch, is at most the budget the toy recipe is held to
    (1,060,512 parameters x 3,500 steps x 32, docs/notebook.md): a preset that grows must train for fewer steps."""
    tc = train.TrainConfig()
    n = sum(p.numel() for p in LLaDAV(get_config(tc.preset)).parameters())
    assert n * tc.max_steps * tc.batch_size <= 1_060_512 * 3_500 * 32
