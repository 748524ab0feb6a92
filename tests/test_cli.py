"""The one command-line parser (model.py, "Configuration from the command line") as every script uses it:
train.py, sample.py, tools/bench.py, tools/plan.py. Each bad input ends before any work with ONE line that
names the option and says what is allowed, and a non-zero exit; --help is built from the field comments.

    python -m pytest -q tests/test_cli.py        (a few seconds; three cases run a real subprocess)
"""
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

import sample
import train
from cli import field_notes, opt, parse_config, run_cli
from tools import bench, draw, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAINS = {"train": train.main, "sample": sample.main, "bench": bench.main, "plan": plan.main, "draw": draw.main}

# (script, arguments, a fragment of the one-line message). {tmp} is a fresh folder, {file} a file in it and
# {ckpt} an existing file that sample.py accepts as --checkpoint (the options are refused before it is read).
BAD = [
    # ranges: steps, lengths, intervals, batch sizes >= 1; rates > 0; probabilities in [0, 1]
    ("train", ["--max_steps=0"], "--max_steps=0: out of range; must be >= 1"),
    ("train", ["--optimizer=sgd"], "--optimizer=sgd: not allowed; use one of adamw, muon"),
    ("train", ["--optimizer=muon", "--parallel=fsdp"], "--optimizer=muon needs whole weight matrices"),
    ("train", ["--max_steps=-5"], "--max_steps=-5: out of range"),
    ("train", ["--log_every=0"], "--log_every=0: out of range; must be >= 1"),
    ("train", ["--ckpt_every=0"], "--ckpt_every=0: out of range"),
    ("train", ["--batch_size=0"], "--batch_size=0: out of range"),
    ("train", ["--eval_every=-1"], "--eval_every=-1: out of range; must be >= 0"),
    ("train", ["--workers=-1"], "--workers=-1: out of range"),
    ("train", ["--lr=-1"], "--lr=-1: out of range; must be > 0"),
    ("train", ["--lr=0"], "--lr=0: out of range; must be > 0"),
    ("train", ["--grad_clip=-1"], "--grad_clip=-1: out of range; must be > 0"),
    ("train", ["--grad_clip=0"], "--grad_clip=0: out of range"),
    ("train", ["--max_bad_frac=1.5"], "--max_bad_frac=1.5: out of range; must be >= 0, <= 1"),
    ("train", ["--warmup_ratio=-0.1"], "--warmup_ratio=-0.1: out of range"),
    ("train", ["--beta2=1"], "--beta2=1: out of range; must be >= 0, < 1"),
    ("train", ["--vision_lr_scale=-0.2"], "--vision_lr_scale=-0.2: out of range"),
    # types
    ("train", ["--batch_size=many"], "--batch_size=many: not an integer"),
    ("train", ["--batch_size=1.5"], "--batch_size=1.5: not an integer"),
    ("train", ["--lr=abc"], "--lr=abc: not a number"),
    ("train", ["--lr=nan"], "--lr=nan: not a finite number"),
    ("train", ["--grad_clip=inf"], "--grad_clip=inf: not a finite number"),
    # booleans: 1/0/true/false/yes/no and nothing else
    ("train", ["--resume=maybe"], "--resume=maybe: not a boolean; use 1/0, true/false or yes/no"),
    ("train", ["--resume=y"], "--resume=y: not a boolean"),
    ("train", ["--resume=on"], "--resume=on: not a boolean"),
    ("train", ["--resume=t"], "--resume=t: not a boolean"),
    ("train", ["--resume=2"], "--resume=2: not a boolean"),
    ("train", ["--resume="], "--resume=: not a boolean"),
    # choices
    ("train", ["--device=tpu"], "--device=tpu: not a device; use auto, cpu, cuda, cuda:N or mps"),
    ("train", ["--device=cuda:99"], "--device=cuda:99: no such CUDA device here"),
    ("train", ["--preset=huge"], "--preset=huge: not allowed; use one of toy, small, llada_v_8b"),
    ("train", ["--stage=4"], "--stage=4: not allowed; use one of 0, 1, 2, 3"),
    ("train", ["--stage=x"], "--stage=x: not an integer"),
    ("train", ["--parallel=deepspeed"], "--parallel=deepspeed: not allowed; use one of none, ddp, fsdp, auto"),
    ("train", ["--ckpt_format=zip"], "--ckpt_format=zip: not allowed"),
    ("train", ["--loss_mode=mse"], "--loss_mode=mse: not allowed; use one of sft, pretrain"),
    ("train", ["--weighting=t"], "--weighting=t: not allowed; use one of elbo, none"),
    ("train", ["--data_format=csv"], "--data_format=csv: not allowed"),
    ("train", ["--init_parts=llm,brain"], "--init_parts=llm,brain: 'brain' is not allowed"),
    # paths that must exist, outputs that must be writable
    ("train", ["--init_from=/nonexistent/ckpt.pt"], "--init_from=/nonexistent/ckpt.pt: does not exist"),
    ("train", ["--data=/nonexistent.json"], "--data=/nonexistent.json: does not exist"),
    ("train", ["--image_root=/nonexistent"], "--image_root=/nonexistent: does not exist"),
    ("train", ["--tokenizer=/nonexistent.json"], "--tokenizer=/nonexistent.json: does not exist"),
    ("train", ["--image_root={file}"], "--image_root={file}: is the wrong kind"),
    ("train", ["--out_dir="], "--out_dir=: empty"),
    ("train", ["--out_dir={file}"], "--out_dir={file}: is a file"),
    ("train", ["--out_dir={file}/run"], "--out_dir={file}/run: cannot write there"),
    ("train", ["--jsonl={tmp}"], "--jsonl={tmp}: is a folder"),
    ("train", ["--out_dir=/proc/llada_run"], "--out_dir=/proc/llada_run: cannot write there"),
    # options that must agree (cross-field checks, before any work)
    ("train", ["--gen_length=12", "--block_length=5"], "--gen_length=12 is not divisible by --block_length=5"),
    ("train", ["--block_length=6", "--sample_steps=5"], "--sample_steps=5 is not divisible by the 2 blocks"),
    ("train", ["--stage=1", "--min_lr=0.01"], "--min_lr=0.01 is above --lr=0.001"),
    ("train", ["--micro_batch_size=5"], "--batch_size=32 must be a multiple of --micro_batch_size=5"),
    ("train", ["--init_parts=all,llm"], "--init_parts=all,llm: use all, or a comma list"),
    ("train", ["--ckpt_format=pt", "--parallel=fsdp", "--optimizer=adamw"], "--ckpt_format=pt cannot save FSDP2"),
    ("train", ["--kind_weights=colour:1"], "--kind_weights: bad kind weight 'colour:1'"),
    # the form of an argument, unknown keys, the model's --lm.* / --vision.*
    ("train", ["--gen-length=5"], "unknown option --gen-length: options are spelled with underscores; use --gen_length"),
    ("train", ["--lr_max=3"], "unknown option --lr_max"),
    ("train", ["max_steps=3"], "'max_steps=3' is not of the form --key=value"),
    ("train", ["--max_steps"], "--max_steps needs a value"),
    ("train", ["--lm.width=3"], "unknown option --lm.width"),
    ("train", ["--lm.n-layers=3"], "unknown option --lm.n-layers"),
    ("train", ["--lm.n_layers=0"], "--lm.n_layers=0: out of range; must be >= 1"),
    ("train", ["--lm.n_layers=two"], "--lm.n_layers=two: not an integer"),
    ("train", ["--lm.n_layers"], "--lm.n_layers needs a value"),
    ("train", ["--lm.d_model=100"], "--lm.d_model=100 does not split into --lm.n_heads=6 heads"),
    ("train", ["--vision.patch_size=99"], "--vision.patch_size=99 is larger than --vision.image_size=64"),
    ("train", ["--vision.ln_eps=0"], "--vision.ln_eps=0: out of range; must be > 0"),
    # sample.py
    ("sample", ["--gen-length=5"], "use --gen_length"),
    ("sample", ["--show-steps"], "use --show_steps"),
    ("sample", ["--eval=0x"], "--eval=0x: not a boolean"),
    ("sample", ["--show_steps=2"], "--show_steps=2: not a boolean"),
    ("sample", ["--chat=maybe"], "--chat=maybe: not a boolean"),
    ("sample", ["--checkpoint=/nonexistent/ckpt.pt"], "--checkpoint=/nonexistent/ckpt.pt: does not exist"),
    ("sample", ["--image=/nonexistent.png"], "--image=/nonexistent.png: does not exist"),
    ("sample", ["--tokenizer=/nonexistent"], "--tokenizer=/nonexistent: does not exist"),
    ("sample", ["--mode=warp"], "--mode=warp: not allowed; use one of exact, prefix"),
    ("sample", ["--modes=exact,warp"], "--modes=exact,warp: 'warp' is not allowed"),
    ("sample", ["--remasking=best"], "--remasking=best: not allowed; use one of low_confidence, random"),
    ("sample", ["--dtype=int3"], "--dtype=int3: not allowed; use one of auto, bf16, fp16, fp32"),
    ("sample", ["--think=maybe"], "--think=maybe: not allowed"),
    ("sample", ["--threshold=-0.5"], "--threshold=-0.5: out of range"),
    ("sample", ["--temperature=-1"], "--temperature=-1: out of range"),
    ("sample", ["--steps=0"], "--steps=0: out of range; must be >= 1"),
    ("sample", ["--gen_length=-4"], "--gen_length=-4: out of range"),
    ("sample", ["--n=0"], "--n=0: out of range"),
    ("sample", ["--mc_num=0"], "--mc_num=0: out of range"),
    ("sample", ["--seed=abc"], "--seed=abc: not an integer"),
    ("sample", ["--device=tpu"], "--device=tpu: not a device"),
    ("draw", ["--gif={ckpt}"], "--gif={ckpt}: must end in .gif"),
    ("sample", ["--gen_length=12", "--block_length=5"], "--gen_length=12 is not divisible by --block_length=5"),
    ("sample", ["--gen_length=12", "--block_length=6", "--steps=5"], "--steps=5 is not divisible by the 2 blocks"),
    ("sample", ["--colour=red"], "unknown option --colour"),
    # tools/bench.py
    ("bench", ["--train_batch=0"], "--train_batch=0: out of range"),
    ("bench", ["--repeats=0"], "--repeats=0: out of range"),
    ("bench", ["--modes=exact,warp"], "--modes=exact,warp: 'warp' is not allowed"),
    ("bench", ["--threshold=-2"], "--threshold=-2: out of range"),
    ("bench", ["--checkpoint=/nonexistent.pt"], "--checkpoint=/nonexistent.pt: does not exist"),
    ("bench", ["--gen_length=16", "--block_length=5"], "--gen_length=16 is not divisible by --block_length=5"),
    ("bench", ["--layer_only=maybe"], "--layer_only=maybe: not a boolean"),
    ("bench", ["--seq-len=64"], "use --seq_len"),
    ("bench", ["--lm.n_heads=0"], "--lm.n_heads=0: out of range"),
    ("bench", ["--preset=huge"], "--preset=huge: not allowed"),
    ("bench", ["--checkpoint={ckpt}", "--lm.n_layers=1"], "drop --checkpoint"),
    # tools/plan.py
    ("plan", ["--world=0"], "--world=0: out of range"),
    ("plan", ["--stage=0"], "--stage=0: not allowed; use one of 1, 2, 3"),
    ("plan", ["--parallel=zero"], "--parallel=zero: not allowed"),
    ("plan", ["--gpu_gb=0"], "--gpu_gb=0: out of range; must be > 0"),
    ("plan", ["--gpu-gb=40"], "use --gpu_gb"),
    ("plan", ["--validate=maybe"], "--validate=maybe: not a boolean"),
    ("plan", ["--seq=8k"], "--seq=8k: not an integer"),
    ("plan", ["--preset=gpt2"], "--preset=gpt2: not allowed"),
]


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "ckpt.pt").write_bytes(b"")
    return {"tmp": str(tmp_path), "file": str(tmp_path / "a_file"), "ckpt": str(tmp_path / "ckpt.pt")}


@pytest.mark.parametrize("script, args, message", BAD, ids=[f"{s}:{' '.join(a)}" for s, a, _ in BAD])
def test_bad_input_gets_one_line(script, args, message, paths):
    args, message = [a.format(**paths) for a in args], message.format(**paths)
    if script == "sample" and not any(a.startswith("--checkpoint") for a in args):
        args = [f"--checkpoint={paths['ckpt']}"] + args  # exists: the error must be the option under test
    with pytest.raises(SystemExit) as e:
        MAINS[script](args)
    msg = e.value.code
    assert isinstance(msg, str), msg      # a message, not a bare status: Python prints it and exits with 1
    assert "\n" not in msg                # one line
    assert message in msg, msg            # names the option and the value, and says what is allowed


def test_there_are_many_distinct_bad_inputs():
    assert len({(s, tuple(a)) for s, a, _ in BAD}) >= 40
    assert {s for s, _, _ in BAD} == set(MAINS)


def test_good_values_parse_and_stage_presets_come_first():
    """Booleans in any case, a bare --flag, typed values; --stage=N's values first, explicit options over
    them whatever their order; the later of two equal options wins."""
    for text, value in [("1", True), ("YES", True), ("True", True), ("0", False), ("no", False), ("FALSE", False)]:
        assert train.parse_args([f"--resume={text}"])[0].resume is value
    assert train.parse_args(["--resume"])[0].resume is True
    for argv in (["--stage=1", "--lr=5e-4"], ["--lr=5e-4", "--stage=1"]):
        tc, mc = train.parse_args(argv)
        assert (tc.stage, tc.lr, tc.batch_size, tc.llm_lr_scale) == (1, 5e-4, 64, 0.0)
    assert train.parse_args(["--max_steps=3", "--max_steps=4"])[0].max_steps == 4
    sc = parse_config(sample.SampleConfig, ["--checkpoint=.", "--eval", "--gen_length=8", "--think=no_think"])
    assert (sc.eval, sc.gen_length, sc.steps, sc.think) == (True, 8, None, "no_think")


def test_help_lists_every_option_with_its_field_comment(capsys):
    for main, lines in [(train.main, ["--max_steps=4950", "optimizer steps [>= 1]", "--resume=0",
                                      "steps of gradient accumulation",      # a comment's continuation line
                                      "--- training at scale",               # a section heading
                                      "--lm.n_layers=4", "--vision.image_size=64"]),
                        (sample.main, ["--show_steps=0", "print the canvas after every step", "--gen_length=",
                                       "--mode=exact", "[one of exact, prefix"]),
                        (bench.main, ["--train_batch=32", "sequences per training step", "--lm.d_model=96"]),
                        (plan.main, ["--world=8", "processes (GPUs) in all", "Memory planner"])]:
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        for line in lines:
            assert line in out, (main.__module__, line)


def test_field_notes_read_the_source():
    """Comments after a field (also inside a definition that spans lines), continuation lines, headings;
    nothing from the methods."""
    @dataclass
    class C:
        a: int = opt(1,
                     min=0)     # first
        b: str = "x"            # second,
                                # continued
        # --- a heading ---
        c: bool = False

        def check(self):        # not a field
            pass
    assert field_notes(C) == [("a", "first"), ("b", "second, continued"), ("", "--- a heading ---"), ("c", "")]


def test_run_cli_turns_user_errors_into_one_line(capsys, monkeypatch):
    def bad_file(argv):
        raise FileNotFoundError("no such file: x.png")

    def bad_value(argv):
        raise ValueError("two\n  lines")
    monkeypatch.delenv("LLADA_DEBUG", raising=False)
    for main, line in [(bad_file, "no such file: x.png"), (bad_value, "two lines")]:
        with pytest.raises(SystemExit) as e:
            run_cli(main, [])
        assert e.value.code == 1 and capsys.readouterr().err == line + "\n"
    monkeypatch.setenv("LLADA_DEBUG", "1")
    with pytest.raises(SystemExit):
        run_cli(bad_value, [])
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(KeyError):  # a bug is not the user's: its traceback stays
        run_cli(lambda argv: {}["x"], [])


def _run(args, debug=False):
    env = {k: v for k, v in os.environ.items() if k != "LLADA_DEBUG"}
    env.update(OMP_NUM_THREADS="1", **({"LLADA_DEBUG": "1"} if debug else {}))
    return subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_real_processes_print_one_line_and_fail(tmp_path):
    """As a user sees it: exit status not 0, one line on stderr, no traceback; LLADA_DEBUG=1 shows one."""
    (tmp_path / "ckpt.pt").write_bytes(b"")
    for args in (["train.py", "--max_steps=0"], ["-m", "tools.plan", "--world=0"]):
        r = _run(args)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and args[-1] in r.stderr, r.stderr
    r = _run(["sample.py", f"--checkpoint={tmp_path / 'ckpt.pt'}", "--mode=warp"], debug=True)
    assert r.returncode != 0 and "Traceback" in r.stderr and "--mode=warp: not allowed" in r.stderr
