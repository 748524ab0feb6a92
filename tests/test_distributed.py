"""Data parallelism on the CPU (gloo, 2 processes): DDP and FSDP2 follow the single-process trajectory,
gradient accumulation, activation checkpointing and the chunked head too, and a DCP checkpoint written by 2 FSDP2
processes resumes on 1 process.

    python -m pytest -q tests/test_distributed.py
"""
import os
import sys
import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

import train
from tools.draw import read_curve

from conftest import TINY_CURVE

# 4 steps: enough for a checkpoint half-way. AdamW: FSDP2 shards the matrices, which Muon needs whole
TINY = TINY_CURVE + ["--max_steps=4", "--ckpt_every=2", "--optimizer=adamw"]


def run(out, *extra):
    tc, mc = train.parse_args([f"--out_dir={out}", f"--jsonl={out}/log.jsonl"] + TINY + list(extra), train.TrainConfig())
    train.train(tc, mc, quiet=True)
    return read_curve(f"{out}/log.jsonl")


def _worker(rank, world, port, jobs):
    """One torchrun-like process: the environment torchrun would set, then each job's train() in turn."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import distributed
    for out, extra in jobs:
        run(out, *extra)
    distributed.teardown()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One spawn of 2 processes runs DDP, FSDP2 and FSDP2-with-accumulation (spawning costs seconds)."""
    d = tmp_path_factory.mktemp("dist")
    from PIL import Image
    Image.new("RGB", (64, 48), "red").save(d / "red.png")
    turn = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    recs = [{"image": "red.png", "conversations": turn("<image>\nWhat color?", "red")},
            {"conversations": turn("Two plus two?", "four")}] * 4  # text-only records beside image ones
    (d / "mixed.json").write_text(json.dumps(recs))
    llava = ["--stage=2", f"--data={d / 'mixed.json'}", f"--image_root={d}", "--micro_batch_size=1", "--batch_size=4",
             "--workers=0", "--head_chunk=0"]
    jobs = [(str(d / "ddp_llava"), ["--parallel=ddp"] + llava), (str(d / "fsdp_llava"), ["--parallel=fsdp"] + llava),(str(d / "ddp"), ["--parallel=ddp"]), (str(d / "fsdp"), ["--parallel=fsdp"]),
            (str(d / "fsdp_acc"), ["--parallel=fsdp", "--micro_batch_size=2"]),
            (str(d / "fsdp_ckpt_chunk"), ["--parallel=fsdp", "--checkpointing=1", "--head_chunk=16"])]
    mp.spawn(_worker, args=(2, free_port(), jobs), nprocs=2, join=True)
    torch.set_num_threads(1)
    single = run(d / "single", "--ckpt_format=dcp")
    return d, single


@pytest.mark.parametrize("name", ["ddp", "fsdp", "fsdp_acc", "fsdp_ckpt_chunk"])
def test_two_processes_follow_one_process(runs, name):
    """Same global batch of 8: 2 processes x 4 (DDP, FSDP2; FSDP2 with activation checkpointing and the
    head in chunks) or 2 x 2 x 2 accumulation steps (FSDP2) give the single-process losses at every step
    to 1e-5, and the same final weights."""
    d, single = runs
    curve = read_curve(f"{d / name}/log.jsonl")
    assert list(curve) == list(single) == [1, 2, 3, 4]
    for s in single:
        assert abs(curve[s] - single[s]) < 1e-5, (name, s, curve[s], single[s])
    assert single[4] != single[1]  # the losses really move: the comparison is not between constants
    from safetensors.torch import load_file
    a, b = load_file(f"{d / name}/model.safetensors"), load_file(f"{d / 'single'}/model.safetensors")
    # AdamW divides by sqrt(v): where gradients are ~0, float-rounding differences in them move a weight
    # by up to ~lr per step, so the weights agree to 1e-3 (4 steps at lr 3e-3 move them by up to 1.2e-2)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    from checkpoint import from_pretrained  # out/hf, written by rank 0 from the one gathered state dict
    assert all(torch.equal(v, a[k]) for k, v in from_pretrained(f"{d / name}/hf").state_dict().items())


def test_accumulation_one_process(runs, tmp_path):
    """One process, micro-batches of 2 and 4 accumulation steps == one batch of 8."""
    d, single = runs
    acc = run(tmp_path, "--micro_batch_size=2")
    assert all(abs(acc[s] - single[s]) < 1e-5 for s in single)


def test_fsdp_checkpoint_resumes_on_one_process(runs, tmp_path):
    """The FSDP2 run saved a sharded DCP checkpoint at step 2 (and 4); one process loads step 2's and
    continues: steps 3 and 4 match the uninterrupted run."""
    import shutil
    d, single = runs
    src = d / "fsdp" / "dcp"
    names = sorted(p for p in os.listdir(src) if p.startswith("step_"))
    assert names == ["step_000002", "step_000004"] and (src / "latest").read_text() == "step_000004"
    assert len([f for f in os.listdir(src / "step_000002") if f.endswith(".distcp")]) == 2  # one file per rank
    os.makedirs(tmp_path / "dcp")
    shutil.copytree(src / "step_000002", tmp_path / "dcp" / "step_000002")
    (tmp_path / "dcp" / "latest").write_text("step_000002")
    resumed = run(tmp_path, "--resume=1")
    assert list(resumed) == [3, 4]
    assert all(abs(resumed[s] - single[s]) < 1e-5 for s in (3, 4))


def test_text_only_batches_under_ddp_and_fsdp(runs):
    """LLaVA-format data mixing text-only and image records (micro-batches of 1, so one process often
    has no image while the other has one): both wrappers run to the end and agree step by step."""
    d, _ = runs
    a, b = read_curve(f"{d / 'ddp_llava'}/log.jsonl"), read_curve(f"{d / 'fsdp_llava'}/log.jsonl")
    assert list(a) == list(b) == [1, 2] and all(abs(a[s] - b[s]) < 1e-5 for s in a)
