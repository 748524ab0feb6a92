"""Reliability: nothing runs from a file we load, no mistake destroys work, damaged files and bad data
are caught, a NaN stops training, a resume falls back past a damaged checkpoint.

    python -m pytest -q tests/test_safety.py

Every refusal is checked to be one line (SystemExit or ValueError with no newline), and where a first
run's files are at stake, they are hashed before and after: byte-identical."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
from PIL import Image

import sample
import cli
import train
from tools import draw
from checkpoint import load_checkpoint, load_state_file, save_checkpoint
from data import LlavaDataset, collate_llava
from synthetic import toy_tokenizer
from conftest import TINY_TRAIN, Payload, run_train

torch.set_num_threads(1)


def tree_hashes(d):
    """{relative path: sha256} of every file under d: the fingerprint of a run's folder."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def pt_run(tmp_path_factory):
    """A finished pt-format run: ckpt.pt (step 3), ckpt.prev.pt (step 2), model.safetensors, config.json."""
    out = tmp_path_factory.mktemp("pt_run")
    run_train(out, "--max_steps=3", "--ckpt_every=1", "--eval_final=0")
    return out


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp_run")
    run_train(out, "--max_steps=2", "--ckpt_every=1", "--eval_final=0", "--ckpt_format=dcp")
    return out


# ------------------------------------------------------------------------------------------------
# No pickle: a checkpoint carrying a payload is refused everywhere, and the payload never runs

@pytest.mark.parametrize("entry", ["whole", "extra"])
def test_pickle_payload_never_runs(pt_run, tmp_path, entry):
    """A pure payload file, and a valid checkpoint with one extra pickled entry (which used to run its
    payload and then answer normally), through sample.py, bench, train --init_from and --resume=1."""
    marker = tmp_path / "PWNED"
    ckpt = torch.load(pt_run / "ckpt.pt", weights_only=True)
    evil = tmp_path / "evil" / "ckpt.pt"
    evil.parent.mkdir()
    torch.save(Payload(marker) if entry == "whole" else dict(ckpt, extra=Payload(marker)), evil)
    from tools import bench
    calls = [lambda: sample.main([f"--checkpoint={evil}"]),
             lambda: bench.main([f"--checkpoint={evil}"]),
             lambda: run_train(tmp_path / "a", "--max_steps=1", f"--init_from={evil}"),
             lambda: run_train(evil.parent, "--max_steps=3", "--resume=1")]
    for call in calls:
        with pytest.raises(SystemExit) as e:
            call()
        msg = one_line(e)
        assert "refused" in msg or "no intact checkpoint" in msg, msg
        assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# Lost work: each case refused with one line, the first run's files byte-identical

def test_lost_work_cases_are_refused(pt_run, dcp_run, tmp_path):
    before = {d: tree_hashes(d) for d in (pt_run, dcp_run)}
    hf = tmp_path / "hf"  # a Hugging Face model directory
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlavaLLaDAModelLM"], "model_type": "llava_llada"}))
    (hf / "model.safetensors").write_bytes(b"weights")
    hf_before = tree_hashes(hf)
    (tmp_path / "file").write_text("x")
    cases = [
        ([f"--out_dir={pt_run}"], "holds another run's checkpoint \\(ckpt.pt.*--resume=1.*--overwrite=1"),
        ([f"--out_dir={dcp_run}", "--ckpt_format=dcp"], "holds another run's checkpoint .*dcp/"),
        ([f"--out_dir={hf}"], "holds a model train.py did not write \\(a Hugging Face model's config.json"),
        ([f"--out_dir={hf}", "--overwrite=1"], "holds a model train.py did not write"),
        ([f"--out_dir={pt_run}", f"--init_from={pt_run / 'model.safetensors'}", "--overwrite=1"],
         "lies inside --out_dir.*own starting point"),
        # these four the option check already refuses (cli.parse_config), before train() is reached
        (["--out_dir="], "--out_dir=: empty"),
        (["--out_dir=  "], "--out_dir= *: empty"),
        ([f"--out_dir={tmp_path / 'file'}"], "is a file; pass a folder"),
        ([f"--out_dir={tmp_path / 'file' / 'sub'}"], "cannot write there"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            tc, mc = train.parse_args(TINY_TRAIN + ["--max_steps=1"] + args, train.TrainConfig())
            train.train(tc, mc, quiet=True)
        assert __import__("re").search(message, one_line(e)), (args, str(e.value))
    with pytest.raises(SystemExit) as e:  # --gif pointed at a checkpoint: the option check refuses it
        draw.main([f"--checkpoint={pt_run / 'ckpt.pt'}", f"--gif={pt_run / 'ckpt.pt'}"])
    assert "must end in .gif" in one_line(e)
    fake = tmp_path / "weights.gif"  # a file named .gif that is not one (a renamed checkpoint)
    fake.write_bytes((pt_run / "ckpt.pt").read_bytes())
    with pytest.raises(SystemExit) as e:
        draw.main([f"--checkpoint={pt_run / 'ckpt.pt'}", f"--gif={fake}"])
    assert "is not a GIF; refusing to replace it" in one_line(e)
    assert fake.read_bytes() == (pt_run / "ckpt.pt").read_bytes()
    assert {d: tree_hashes(d) for d in (pt_run, dcp_run)} == before and tree_hashes(hf) == hf_before


def test_lock_keeps_two_runs_apart_and_a_stale_one_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live "run"
    try:
        (out / "train.lock").write_text(json.dumps({"pid": other.pid, "host": __import__("socket").gethostname()}))
        with pytest.raises(SystemExit) as e:
            run_train(out, "--max_steps=1", "--eval_final=0")
        assert f"in use by another run (pid {other.pid}" in one_line(e)
        assert not (out / "ckpt.pt").exists()
    finally:
        other.kill()
        other.wait()
    tc, mc = train.parse_args([f"--out_dir={out}"] + TINY_TRAIN + ["--max_steps=1", "--eval_final=0"],
                              train.TrainConfig())
    train.train(tc, mc)  # the owner is dead now: said, taken over, released at the end
    assert f"stale lock of pid {other.pid}, which is no longer running: taken over" in capsys.readouterr().out
    assert (out / "ckpt.pt").exists() and not (out / "train.lock").exists()


def test_overwrite_replaces_an_earlier_run(tmp_path):
    run_train(tmp_path, "--max_steps=1", "--eval_final=0", "--ckpt_format=dcp", "--ckpt_every=1")
    run_train(tmp_path, "--max_steps=1", "--eval_final=0", "--overwrite=1", "--seed=1")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["train_config"]["seed"] == 1
    assert not (tmp_path / "dcp").exists()  # the earlier DCP steps went, none mixed with the new run's


# ------------------------------------------------------------------------------------------------
# Damaged weights: NaN refused, a flipped byte detected

def test_nan_weights_are_refused(pt_run, tmp_path):
    ckpt = torch.load(pt_run / "ckpt.pt", weights_only=True)
    k = next(k for k in ckpt["model"] if k.endswith("q_proj.weight"))
    ckpt["model"][k][0, 0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", ckpt)  # a consistent manifest: only the NaN is wrong
    with pytest.raises(ValueError) as e:
        load_checkpoint(tmp_path / "nan.pt")
    assert "non-finite weights (NaN or Inf)" in one_line(e) and k in str(e.value)
    with pytest.raises(SystemExit, match="non-finite"):
        sample.main([f"--checkpoint={tmp_path / 'nan.pt'}"])
    # an official-layout directory with an Inf, through from_pretrained
    from checkpoint import from_pretrained, save_pretrained
    from model import LLaDA, LLaDAConfig
    m = LLaDA(LLaDAConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_hidden=32))
    with torch.no_grad():
        m.norm.weight[3] = float("inf")
    save_pretrained(m, tmp_path / "hf")
    with pytest.raises(ValueError) as e:
        from_pretrained(tmp_path / "hf")
    assert "non-finite weights" in one_line(e) and "model.norm.weight" in str(e.value)


def flip_byte_of(path, tensor: torch.Tensor):
    """Flip one bit inside `tensor`'s bytes where they are stored in the file at `path`."""
    data = bytearray(open(path, "rb").read())
    raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()[:64]
    i = data.find(raw)
    assert i >= 0 and data.find(raw, i + 1) < 0, "tensor bytes not found once in the file"
    data[i + 10] ^= 0x04
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("name", ["ckpt.pt", "model.safetensors"])
def test_flipped_byte_is_detected(pt_run, tmp_path, name):
    p = tmp_path / name
    p.write_bytes((pt_run / name).read_bytes())
    state = load_state_file(p)
    w = state.get("model", state)
    k = next(k for k in w if k.endswith("gate_proj.weight"))
    flip_byte_of(p, w[k])
    with pytest.raises(ValueError) as e:
        load_state_file(p)
    assert "is corrupt" in one_line(e) and "sha256" in str(e.value) and k in str(e.value)


# ------------------------------------------------------------------------------------------------
# NaN loss and resume

def test_nan_loss_stops_training(tmp_path, monkeypatch):
    calls = []
    real = train.diffusion_loss

    def loss_nan_at_step_3(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(train, "diffusion_loss", loss_nan_at_step_3)
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "--max_steps=5", "--ckpt_every=2", "--eval_final=0")
    msg = one_line(e)
    assert msg.startswith("step 3: the loss is not finite") and f"{tmp_path / 'ckpt.pt'} (step 2)" in msg
    ckpt = load_state_file(tmp_path / "ckpt.pt")  # finite, and step 2's
    assert ckpt["step"] == 2 and not (tmp_path / "train.lock").exists()


def test_resume_falls_back_past_a_truncated_checkpoint(pt_run, tmp_path, capsys):
    """ckpt.pt (step 3) cut in half: resume says so, takes ckpt.prev.pt (step 2), redoes step 3 and ends
    with the uninterrupted run's weights bit for bit."""
    import shutil
    out = tmp_path / "run"
    shutil.copytree(pt_run, out)
    ref = load_state_file(pt_run / "model.safetensors")
    data = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(data[:len(data) // 2])
    tc, mc = train.parse_args([f"--out_dir={out}"] + TINY_TRAIN + ["--max_steps=3", "--ckpt_every=1", "--eval_final=0",
                                                                   "--resume=1"], train.TrainConfig())
    model, _ = train.train(tc, mc)
    said = capsys.readouterr().out
    assert f"skipped {out / 'ckpt.pt'}" in said and f"resumed from {out / 'ckpt.prev.pt'} at step 2" in said
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_dcp_resume_falls_back_past_a_corrupt_step(dcp_run, tmp_path, capsys):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(dcp_run, out)
    shard = next(p for p in (out / "dcp" / "step_000002").iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    tc, mc = train.parse_args([f"--out_dir={out}"] + TINY_TRAIN + ["--max_steps=2", "--ckpt_every=1",
                                                                   "--eval_final=0", "--ckpt_format=dcp", "--resume=1"],
                              train.TrainConfig())
    train.train(tc, mc)
    said = capsys.readouterr().out
    assert "skipped" in said and "fail their sha256 checksum" in said and "step_000001 at step 1" in said


@pytest.mark.parametrize("args, changed", [
    (["--seed=1"], "seed 0 -> 1"), (["--batch_size=4"], "batch_size 8 -> 4"), (["--lr=0.001"], "lr"),
    (["--max_steps=9"], "max_steps 3 -> 9"), (["--warmup_steps=5"], "warmup_steps 2 -> 5"),
    (["--data_format=plain"], "data_format 'conv' -> 'plain'"), (["--data=DATA"], "data '' -> ")])
def test_resume_refuses_a_changed_config(pt_run, tmp_path, args, changed):
    recs = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]}] * 8
    (tmp_path / "d.json").write_text(json.dumps(recs))
    args = [a.replace("DATA", str(tmp_path / "d.json")) for a in args] + (["--workers=0"] if "DATA" in args[0] else [])
    before = tree_hashes(pt_run)
    with pytest.raises(SystemExit) as e:
        run_train(pt_run, "--max_steps=3", "--ckpt_every=1", "--eval_final=0", "--resume=1", *args)
    msg = one_line(e)
    assert "was trained with other options" in msg and changed in msg and "--resume_changed=1" in msg
    assert tree_hashes(pt_run) == before


def test_stale_temporaries_are_removed(pt_run, tmp_path, capsys):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(pt_run, out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is now free: what a kill -9 in a save leaves behind
    (out / f"ckpt.pt.tmp.{dead.pid}").write_bytes(b"half a checkpoint")
    (out / "dcp" / "step_000007.tmp").mkdir(parents=True)
    tc, mc = train.parse_args([f"--out_dir={out}"] + TINY_TRAIN + ["--max_steps=3", "--ckpt_every=1", "--eval_final=0",
                                                                   "--resume=1"], train.TrainConfig())
    train.train(tc, mc)
    said = capsys.readouterr().out
    assert f"removed {out / f'ckpt.pt.tmp.{dead.pid}'}" in said and "step_000007.tmp" in said
    assert not [f for root, dirs, files in os.walk(out) for f in dirs + files if ".tmp" in f]


# ------------------------------------------------------------------------------------------------
# Bad dataset records: counted by reason and skipped

def test_bad_records_are_counted_and_skipped(tmp_path):
    Image.new("RGB", (40, 64), "red").save(tmp_path / "red.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "adir.png").mkdir()
    ok = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]
    recs = [
        {"image": "red.png", "conversations": ok},                                       # good
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},  # good, text
        5,                                                                               # record is not an object
        ["a", "list"],                                                                   # record is not an object
        {"image": "red.png"},                                                            # no conversations
        {"image": "red.png", "conversations": "not a list"},                             # malformed record
        {"image": "red.png", "conversations": []},                                       # malformed record
        {"image": "red.png", "conversations": [{"from": "robot", "value": "x"}, ok[1]]},  # unknown role
        {"image": "red.png", "conversations": [ok[0], {"from": "gpt", "value": 42}]},     # non-string value
        {"image": "red.png", "conversations": [ok[0], {"from": "gpt", "value": None}]},   # null value
        {"image": "red.png", "conversations": [ok[0], "a string turn"]},                  # turn not an object
        {"image": [5], "conversations": ok},                                              # bad image field
        {"image": [None], "conversations": ok},                                           # bad image field
        {"image": 5, "conversations": ok},                                                # bad image field
        {"image": "", "conversations": ok},                                               # bad image field
        {"image": {"path": "red.png"}, "conversations": ok},                              # bad image field
        {"image": "red.png", "conversations": [{"from": "gpt", "value": "red"}]},         # no user turn
        {"image": "red.png", "conversations": [ok[0], {"from": "gpt", "value": "  "}]},   # good (empty answer)
        {"image": "red.png", "conversations": [ok[0]]},                                   # good (no answer)
        {"image": ["red.png", "red.png"], "conversations": ok},                           # good (an untagged file)
        {"conversations": [{"from": "human", "value": "<image>\nwhat?"}, ok[1]]},         # good ("<image>" is text)
        {"image": "red.png", "conversations": [{"from": "human", "value": "<image> <image>"}, ok[1]]},  # count mismatch
        {"image": "missing.png", "conversations": ok},                                    # missing image
        {"image": "corrupt.png", "conversations": ok},                                    # unreadable image
        {"image": "empty.png", "conversations": ok},                                      # unreadable image
        {"image": "adir.png", "conversations": ok},                                       # unreadable image
    ]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    ds = LlavaDataset(str(tmp_path / "d.json"), str(tmp_path), toy_tokenizer(), 64, 16)
    batch = collate_llava([ds[i] for i in range(len(ds))], pad_id=0)
    assert batch["n_samples"] == 6 and batch["ids"].shape[0] == 6  # what the official preprocessing trains
    reasons = Counter({k.split(" (")[0]: v for k, v in batch["errors"].items()})
    assert reasons == {"record is not an object": 2, "malformed record": 3, "malformed turn": 4,
                       "bad image field": 5, "image without a user turn": 1,
                       "image count mismatch": 1, "missing image": 1, "unreadable image": 3}, reasons
    # and a training run over them finishes, reporting the same counts
    _, rep = run_train(tmp_path / "out", f"--data={tmp_path / 'd.json'}", f"--image_root={tmp_path}", "--workers=0",
                       "--batch_size=26", "--max_steps=1", "--max_bad_frac=1", "--eval_final=0")
    assert sum(rep["bad_samples"].values()) == 20


@pytest.mark.parametrize("content, message", [
    ("caf\u00e9".encode("latin-1") + b'"]', "is not UTF-8 text"),
    (b"[{oops", "is not valid JSON"),
    (b'{"a": 1}', "holds a dict; expect a list"),
])
def test_bad_dataset_files_get_one_line(tmp_path, content, message):
    (tmp_path / "d.json").write_bytes(b'["' + content if message == "is not UTF-8 text" else content)
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "out", f"--data={tmp_path / 'd.json'}", "--workers=0", "--max_steps=1")
    assert message in one_line(e)


# ------------------------------------------------------------------------------------------------
# torchrun workers exit when their launcher dies

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux-only")
def test_worker_exits_when_its_launcher_is_killed(tmp_path):
    """A launcher starts a 'worker' that calls cli.exit_with_parent() and would sleep 60 s;
    kill -9 the launcher: the worker is gone within seconds."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = "import sys, time; sys.path.insert(0, %r); import cli; cli.exit_with_parent(); " \
             "print('ready', flush=True); time.sleep(60)" % root
    launcher = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', %r]); "
                "print(p.pid, flush=True); time.sleep(60)" % worker)
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "ready"  # the worker has called exit_with_parent()

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
        except FileNotFoundError:
            return False
    assert alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    t = time.time()
    while alive(child) and time.time() - t < 10:
        time.sleep(0.05)
    gone = not alive(child)
    if not gone:
        os.kill(child, signal.SIGKILL)
    assert gone, "the worker outlived its launcher"


def test_prev_rotation_after_a_kill_between_its_renames(tmp_path):
    """A kill right after ckpt.pt was linked to ckpt.prev.pt leaves both names on one file; the next save
    must still end with the new ckpt.pt, the old one as ckpt.prev.pt, and no stray link."""
    p = tmp_path / "ckpt.pt"
    save_checkpoint(p, {"step": 1})
    os.link(p, tmp_path / "ckpt.prev.pt")  # the state such a kill leaves
    for step in (2, 3):
        save_checkpoint(p, {"step": step}, keep_prev=True)
        assert load_state_file(p)["step"] == step and load_state_file(tmp_path / "ckpt.prev.pt")["step"] == step - 1
        assert sorted(os.listdir(tmp_path)) == ["ckpt.prev.pt", "ckpt.pt"]


def test_out_dir_refuses_a_root_home_and_a_folder_of_sources(tmp_path, monkeypatch):
    """--out_dir=/ , a symlink to /, the home folder, and a folder of sources or a repository (--out_dir=.
    in a project) are refused in one line before anything is written, even a probe; a folder an earlier
    run of ours already lives in is still accepted."""
    root_link = tmp_path / "to_root"
    root_link.symlink_to("/")
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "model.py").write_text("x = 1\n")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    before = {p: sorted(os.listdir(p)) for p in ("/", project, home)}
    cases = [("/", "a filesystem root"), (str(root_link), "a filesystem root"), (str(home), "your home folder"),
             (str(project), "a folder of sources or a repository (it holds .git)")]
    monkeypatch.chdir(project)
    cases.append((".", "a folder of sources or a repository"))
    for out, why in cases:
        with pytest.raises(SystemExit) as e:
            train.parse_args(TINY_TRAIN + ["--max_steps=1", f"--out_dir={out}"], train.TrainConfig())
        assert why in one_line(e) and "\n" not in one_line(e), (out, one_line(e))
    assert {p: sorted(os.listdir(p)) for p in ("/", project, home)} == before  # nothing written anywhere
    # train() refuses too when handed such a config directly (the guard under the parser)
    tc, mc = train.parse_args(TINY_TRAIN + ["--max_steps=1", f"--out_dir={tmp_path / 'ok'}"], train.TrainConfig())
    tc.out_dir = str(project)
    with pytest.raises(SystemExit, match="a folder of sources"):
        train.train(tc, mc, quiet=True)
    assert sorted(os.listdir(project)) == before[project]
    # a run folder of ours is fine, whatever it holds
    (project / "train_run.json").write_text("{}")
    assert cli.not_a_run_folder(str(project)) is None
