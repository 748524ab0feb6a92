"""
Crash test: SIGKILL a training run at random moments (saves included), resume it each time, and check
that the interrupted run ends exactly where an uninterrupted one does.

    python tests/kill_resume.py --kills=10                 # DCP checkpoints (the default at scale)
    python tests/kill_resume.py --kills=10 --format=pt     # the single-file ckpt.pt

Each round starts `train.py --resume=1` (once a checkpoint exists), waits until the run has logged a
new step, sleeps a random 0-1.5 s (a checkpoint is written every step and takes about half of it, so
many kills land inside a save) and sends SIGKILL. After every kill the newest checkpoint must be complete and loadable. A kill
that leaves a temporary `.tmp` file or folder behind happened during a save. At the end, the loss of
every step (the last one logged for a step wins: a resumed run redoes the steps after its checkpoint)
and the final weights must equal the uninterrupted run's bit for bit, and the final resume must have
removed every temporary file the kills left (and its own lock).
"""
import argparse
import os
import random
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The tiny model and the short logged run that test_distributed.py also uses, from tests/conftest.py (this script's
# folder is on sys.path when it runs, and pytest has loaded conftest when test_kill_resume.py imports this file).
from conftest import TINY_CURVE  # noqa: E402

TINY = TINY_CURVE + ["--ckpt_every=1"]  # a checkpoint every step, so that many kills land inside a save


def command(out, steps, fmt, resume):
    return ([sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out}", f"--jsonl={out}/log.jsonl",
             f"--max_steps={steps}", f"--ckpt_format={fmt}"] + TINY + (["--resume=1"] if resume else []))


def env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def has_checkpoint(out, fmt):
    from distributed import dcp_checkpoints
    return bool(dcp_checkpoints(out)) if fmt == "dcp" else os.path.exists(os.path.join(out, "ckpt.pt"))


def leftovers(out):
    """Temporary files or folders a save leaves when it is killed half-way."""
    found = []
    for d in (out, os.path.join(out, "dcp")):
        if os.path.isdir(d):
            found += [os.path.join(d, f) for f in os.listdir(d) if ".tmp" in f]
    return found


def checkpoint_step(out, fmt):
    """-> step of the newest complete checkpoint (the next round's resume then loads it in full)."""
    import torch
    if fmt == "pt":
        return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"]
    from distributed import dcp_checkpoints, read_extra
    return read_extra(dcp_checkpoints(out)[0])["step"]


def logged_steps(path):
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def run(base, kills=10, steps=30, fmt="dcp", seed=0, say=print):
    """-> dict with the kill log; raises AssertionError on any mismatch."""
    from tools.draw import read_curve
    from safetensors.torch import load_file
    rng = random.Random(seed)
    ref, out = os.path.join(base, "ref"), os.path.join(base, "killed")
    subprocess.run(command(ref, steps, fmt, False), check=True, env=env(), stdout=subprocess.DEVNULL)
    kills_done, during_save, resumed_at = 0, 0, []
    while kills_done < kills:
        resume = has_checkpoint(out, fmt)
        if resume:
            resumed_at.append(checkpoint_step(out, fmt))
        log = os.path.join(out, "log.jsonl")
        n0 = logged_steps(log)
        err = open(os.path.join(base, "stderr.txt"), "w+")
        p = subprocess.Popen(command(out, steps, fmt, resume), env=env(), stdout=subprocess.DEVNULL, stderr=err)
        while logged_steps(log) == n0 and p.poll() is None:  # wait for a step of this process
            time.sleep(0.01)
        if p.poll() is not None:  # it finished before we could kill it (raise --steps), or it failed
            err.seek(0)
            assert p.returncode == 0, f"round {kills_done + 1} failed: {err.read()[-2000:]}"
            break
        time.sleep(rng.uniform(0, 1.5))
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills_done += 1
        left = leftovers(out)
        during_save += bool(left)
        step = checkpoint_step(out, fmt) if has_checkpoint(out, fmt) else None
        say(f"kill {kills_done}: newest checkpoint step {step}" + (f", killed during a save ({len(left)} temp left)"
                                                                  if left else ""))
    subprocess.run(command(out, steps, fmt, True), check=True, env=env(), stdout=subprocess.DEVNULL)
    # the final resume removed what the killed saves left behind (and released its lock)
    assert not leftovers(out) and not os.path.exists(os.path.join(out, "train.lock")), leftovers(out)
    a, b = read_curve(os.path.join(ref, "log.jsonl")), read_curve(os.path.join(out, "log.jsonl"))
    assert list(a) == list(b) == list(range(1, steps + 1)), (list(a), list(b))
    diff = [s for s in a if a[s] != b[s]]
    assert not diff, f"loss differs at steps {diff}"
    wa, wb = load_file(os.path.join(ref, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa), "final weights differ"
    say(f"{kills_done} kills ({during_save} during a save), resumed at steps {resumed_at}: "
        f"loss curve of {steps} steps and final weights identical to the uninterrupted run")
    return {"kills": kills_done, "during_save": during_save, "resumed_at": resumed_at}


if __name__ == "__main__":
    import tempfile
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--steps", type=int, default=0, help="training steps; 0: enough for the kills (16 per kill for "
                    "dcp, 60 for pt, whose saves are quicker, so a run gets further between kills)")
    ap.add_argument("--format", default="dcp", choices=["dcp", "pt"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        t = time.time()
        steps = args.steps or args.kills * (16 if args.format == "dcp" else 60)
        run(d, args.kills, steps, args.format, args.seed)
        print(f"{time.time() - t:.0f}s")
