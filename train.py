"""
Train LLaDA-V as a masked diffusion model on image-question pairs.

Where this sits in the flow: every piece at once. Each step:
    pixels -> ViT -> projector -> visual tokens, spliced into the chat-template token sequence x0
    t ~ U(0,1) per sample; answer tokens -> [MASK] with p_mask = (1 - 1e-3) t + 1e-3     (diffusion.py)
    loss = 1/B sum_b 1/|A_b| sum_{masked i} CE(f(x_t)_i, x0_i) / p_mask_b                 (SFT form)
    AdamW, linear warmup then cosine decay, gradient clipping at 1.0.

The default run (`python train.py`) trains the `toy` preset from scratch on the embedded synthetic
shapes dataset on a CPU in a few minutes and ends with a held-out report: exact-match accuracy per
question kind, and the same evaluation with blank images (a model that really looks scores near chance).

    python train.py --help                      # every option with its default
    python train.py --max_steps=200             # any TrainConfig field: --key=value
    python train.py --lm.n_layers=6             # model fields: --lm.* and --vision.*
    python train.py --resume=1                  # continue from out/ckpt.pt (same config required)

At scale (README "Training at scale"): LLaDA-V's stages on LLaVA-format data (data.py), under
torchrun with DDP or FSDP2 and resharding DCP checkpoints (distributed.py), MFU logs (model.step_flops):
    python train.py --stage=1 --data=captions.json --image_root=images/ --out_dir=out/s1
    torchrun --standalone --nproc_per_node=8 train.py --stage=2 --data=conv.json --image_root=images/
        --init_from=out/s1/model.safetensors --micro_batch_size=1          (one command line)
Each step: loss = sum over micro-batches m and processes of (n_m W / B) * loss_m, averaged over the W
processes by DDP / FSDP2, which is the loss of the global batch of B sequences.

Reading order. train() is setup -> resume -> batches -> the loop; everything it calls sits above it:
    TrainConfig, STAGES          every option, and LLaDA-V's three stage recipes
    lr_at, make_groups, freeze   the schedule and the per-component learning rates
    claim_out_dir                what a run may write over (below)
    resume, save                 checkpoints: the newest intact one in, one out every ckpt_every steps
    StepBatches                  step -> micro-batches already through the forward process q(x_t | x0)
    Meter                        tokens/s, MFU, ETA, memory for the log lines
The loop itself reads as the method does: forward_process -> model -> diffusion_loss -> backward ->
clip -> AdamW step, with the bookkeeping (logging, quick evaluation, checkpoint) after it.

Safety. A checkpoint can hold days of GPU time, so a run refuses what would lose work without a word:
  - an out_dir holding another run's checkpoint (unless --resume=1 or --overwrite=1), a model train.py
    did not write (a Hugging Face download), or its own --init_from; an empty or unwritable out_dir;
  - a second run on the same out_dir (train.lock holds the owner's pid; a dead owner's lock is taken over);
  - a resume with another seed, batch, schedule or data (unless --resume_changed=1).
A resume falls back past a damaged newest checkpoint (every file carries sha256 checksums, checkpoint.py)
to the one before it, and says so; temporary files of saves killed half-way are removed at the start.
A NaN or Inf loss stops the run before the update, naming the step and the last good checkpoint.
"""
import contextlib
import json
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch

from checkpoint import load_state, load_state_file, prev_path, save_checkpoint, write_text
from data import default_system
from diffusion import diffusion_loss, forward_process
from distributed import (all_sum, autocast, barrier, dcp_checkpoints, export, load_dcp, pick_device, pid_alive,
                         process_start, read_extra, remove_stale_temporaries, resolve_parallel, save_dcp, setup,
                         verify_dcp, wrap)
from model import LLaDAV, count_params, device_peak, get_config, step_flops
from sample import evaluate, format_eval
from synthetic import SyntheticVQA, toy_tokenizer
from tokenizer import IMAGE_TOKEN_INDEX, get_tokenizer
from vision import preprocess


@dataclass
class TrainConfig:
    preset: str = "toy"          # model preset: toy | small | llada_v_8b (see model.py)
    out_dir: str = "out"         # checkpoint (ckpt.pt) and final report (report.json) go here; one run at a time
    overwrite: bool = False      # replace the checkpoint of an earlier run in out_dir (else refused)
    tokenizer: str = ""          # presets with the official vocabulary: a tokenizer.json or a model dir holding one
    resume: bool = False         # continue from out_dir's newest intact checkpoint (ckpt.pt or dcp/)
    resume_changed: bool = False  # resume although seed, batch, lr schedule or data changed (else refused)
    device: str = "auto"         # auto = cuda > mps > cpu
    seed: int = 0
    batch_size: int = 32         # sequences per step
    max_steps: int = 5500
    lr: float = 1.5e-3           # peak learning rate of the language model; lower it (e.g. 1e-4) for big models
    vision_lr_scale: float = 0.2     # vision tower lr = lr * this (LLaDA-V: 2e-6 / 1e-5 = 0.2; 0 freezes it).
                                     # From scratch it matters too: until the language model reads the image,
                                     # the vision path's gradient is noise, Adam turns noise into full-size steps,
                                     # and at the full lr its features blow up (x15 norm in 50 steps) and stall
    projector_lr_scale: float = 0.2  # projector lr = lr * this
    min_lr: float = 1e-4         # cosine decays to this
    warmup_steps: int = 100
    weight_decay: float = 0.0    # LLaDA-V uses 0
    beta2: float = 0.95          # AdamW beta2. LLaDA-V's recipe has 0.999; with small batches the 1/t-weighted
                                 # loss has rare huge gradients, and 0.95 recovers from them far faster
    stratified_t: bool = True    # spread the batch's t evenly over (0, 1) (same expected loss, less variance)
    exact_count: bool = False    # mask exactly l ~ U{1..A} answer tokens (LLaDA Eq. 6: the same bound, weights <= A)
    weighting: str = "elbo"      # elbo: CE / p_mask (the likelihood bound) | none: plain CE ("L_simple")
    grad_clip: float = 1.0
    loss_mode: str = "sft"       # sft (per-sample answer-length normaliser) | pretrain (1 / (B L))
    single_object_steps: int = 500  # curriculum: the first N steps show one object and ask colour/shape/describe
    kind_weights_from: int = 2500   # curriculum: from this step on (once past single_object_steps), draw the kinds with kind_weights
    kind_weights: str = "color:0.5,shape:1,count:0.5,relation:2,describe:1"  # (before it: equal shares)
    gen_length: int = 12         # answer canvas G, in tokens (training and sampling): the toy's longest
                                 # answer, 4 objects described, is 11 tokens + <|eot_id|>
    block_length: int = 12       # sampler block length (semi-autoregressive if < gen_length)
    sample_steps: int = 12       # sampler steps
    log_every: int = 25
    eval_every: int = 1000       # quick held-out check (eval_quick questions) every N steps; 0 = never
    eval_quick: int = 100        # questions per quick check; 0 = no quick checks
    eval_final: int = 500        # held-out questions in the final report; 0 = no report
    ckpt_every: int = 250        # atomic checkpoint every N steps (and at the end)
    compile: bool = False        # torch.compile the model (CUDA)
    # --- training at scale: LLaVA-format data, stages, torchrun (see README "Training at scale") ---
    stage: int = 0               # 0 = the toy recipe above; 1 | 2 | 3 = LLaDA-V's stage presets (STAGES)
    data: str = ""               # LLaVA-format .json / .jsonl; empty = the embedded synthetic data
    image_root: str = ""         # folder the records' "image" paths are relative to
    data_format: str = "conv"    # plain (stage-1 "<image>caption") | conv (multi-turn conversations)
    max_len: int = 8192          # tokens per sequence, image tokens included (longer samples are cut)
    unignore_special: bool = True  # LLaDA-V: prompt BOS/header/eot tokens are targets too (REFERENCE 3.3)
    pad_labels: bool = True      # padding EOS are targets (LLaDA-V's collator); 0: ignored
    workers: int = 2             # DataLoader worker processes for --data
    max_bad_frac: float = 0.1    # stop when more than this fraction of samples is broken
    epochs: float = 0.0          # > 0 with --data: max_steps = epochs * (records / batch_size)
    warmup_ratio: float = 0.0    # > 0: warmup_steps = warmup_ratio * max_steps (LLaDA-V: 0.03)
    llm_lr_scale: float = 1.0    # language model lr = lr * this (0 freezes it, as stage 1 does)
    micro_batch_size: int = 0    # sequences per process per forward; 0 = batch_size / processes.
                                 # batch_size / (processes * micro) steps of gradient accumulation
    parallel: str = "auto"       # none | ddp | fsdp | auto (ddp under 1B parameters, else fsdp)
    checkpointing: bool = False  # recompute each LLM block in backward: much less activation memory
    ckpt_format: str = "auto"    # pt (out_dir/ckpt.pt) | dcp (out_dir/dcp/, resumes on any number of
                                 # processes) | auto (dcp under torchrun or with --data)
    init_from: str = ""          # start from these weights (a ckpt.pt or model.safetensors), e.g. stage 1's
    init_parts: str = "all"      # which of them: all, or a comma list of llm, vision, projector
    jsonl: str = ""              # append one JSON line per logged step here (and draw loss.png beside it)
    final_eval: bool = True      # held-out report at the end (synthetic data, one process or DDP)
    head_chunk: int = 0          # > 0: output head + loss on this many masked rows at a time, recomputed in
                                 # backward (model.chunked_head_ce): the loss's memory no longer grows with N x V


# LLaDA-V's recipe (REFERENCE 7): AdamW (0.9, 0.999), weight decay 0, 3% warmup, cosine to 0, clip 1.0,
# one epoch; the global batch is reached with gradient accumulation. Stage 1 trains the projector only.
_COMMON = dict(beta2=0.999, weight_decay=0.0, min_lr=0.0, warmup_ratio=0.03, grad_clip=1.0, epochs=1.0,
               stratified_t=False, exact_count=False, weighting="elbo", loss_mode="sft", max_len=8192, head_chunk=512)
STAGES = {
    1: dict(_COMMON, lr=1e-3, llm_lr_scale=0.0, vision_lr_scale=0.0, projector_lr_scale=1.0, batch_size=64,
            data_format="plain"),
    2: dict(_COMMON, lr=1e-5, llm_lr_scale=1.0, vision_lr_scale=0.2, projector_lr_scale=1.0, batch_size=256,
            data_format="conv", checkpointing=True),
    3: dict(_COMMON, lr=1e-5, llm_lr_scale=1.0, vision_lr_scale=0.2, projector_lr_scale=1.0, batch_size=256,
            data_format="conv", checkpointing=True),
}


def parse_args(argv, tc: TrainConfig):
    """--key=value into TrainConfig; --lm.key / --vision.key into the model config. Unknown keys and
    unparsable values get a one-line error naming the valid keys."""
    train_keys = {f.name: f.type for f in fields(TrainConfig)}
    overrides = {}
    for a in argv:
        if a in ("-h", "--help"):
            print(__doc__)
            print("options (TrainConfig):")
            for f in fields(TrainConfig):
                print(f"  --{f.name}={getattr(tc, f.name)}")
            print("model overrides: --lm.<field>=..., --vision.<field>=... (fields of LLaDAConfig, VisionConfig)")
            sys.exit(0)
        if not a.startswith("--") or "=" not in a:
            sys.exit(f"argument {a!r} is not of the form --key=value; see python train.py --help")
        key, val = a[2:].split("=", 1)
        overrides[key] = val
    if "preset" in overrides:
        tc.preset = overrides.pop("preset")
    if "stage" in overrides:  # a stage preset first, so that explicit options override it
        try:
            tc.stage = int(overrides.pop("stage"))
            for k, v in STAGES.get(tc.stage, {}).items() if tc.stage else ():
                setattr(tc, k, v)
            assert tc.stage == 0 or tc.stage in STAGES
        except (ValueError, AssertionError):
            sys.exit(f"--stage must be 0 (toy recipe) or one of {', '.join(map(str, STAGES))}")
    try:
        mc = get_config(tc.preset)
    except ValueError as e:
        sys.exit(str(e))
    for key, val in overrides.items():
        section, _, name = key.rpartition(".")
        target = {"": tc, "lm": mc.lm, "vision": mc.vision}.get(section)
        if target is None or name not in {f.name for f in fields(target)}:
            valid = sorted(train_keys) + [f"lm.{f.name}" for f in fields(mc.lm)] + [f"vision.{f.name}" for f in fields(mc.vision)]
            sys.exit(f"unknown option --{key}; valid options: {', '.join('--' + v for v in valid)}")
        setattr(target, name, parse_value(key, getattr(target, name), val))
    return tc, mc


def parse_value(key, old, val: str):
    """The command-line string `val` for option --key, typed like its current value `old` (bools take
    1/true/yes); a one-line exit if it does not parse. Shared with bench.py."""
    try:
        return (val.lower() in ("1", "true", "yes")) if isinstance(old, bool) else type(old)(val)
    except ValueError:
        sys.exit(f"--{key}={val!r} is not a valid {type(old).__name__}")


def lr_at(step, tc: TrainConfig):
    """Linear warmup to lr, then cosine decay to min_lr at max_steps:
        lr(s) = lr (s + 1) / warmup                                       s < warmup
        lr(s) = min_lr + (lr - min_lr) (1 + cos(pi p)) / 2,  p = (s - warmup) / (max_steps - warmup)
    LLaDA-V uses warmup_ratio 0.03 and min_lr 0 (STAGES); the toy recipe keeps a floor, min_lr, so the
    late steps still move the weights."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * progress))


def component_scales(model, tc: TrainConfig):
    """(module, lr multiplier) for the three parts LLaDA-V trains at different rates."""
    return ((model.llm, tc.llm_lr_scale), (model.vision, tc.vision_lr_scale), (model.projector, tc.projector_lr_scale))


def make_groups(model, tc: TrainConfig):
    """One parameter group per component, each with its own lr multiplier (LLaDA-V trains the vision
    tower at a fifth of the LLM's lr); decay only matrices (LLaDA-V uses weight_decay 0 anyway). A zero
    multiplier freezes the component: call freeze() before wrapping (DDP and FSDP2 must see which
    parameters train) and make_groups() after (FSDP2 replaces the parameters by their shards)."""
    groups = []
    for part, scale in component_scales(model, tc):
        params = [p for p in part.parameters() if p.requires_grad]
        if scale == 0:
            continue
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay, "lr_scale": scale},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    return groups


def freeze(model, tc: TrainConfig):
    """requires_grad off for every component whose lr multiplier is 0 (stage 1 freezes LLM and ViT)."""
    for part, scale in component_scales(model, tc):
        if scale == 0:
            part.requires_grad_(False)  # a zero lr freezes the component


def init_from(model, tc: TrainConfig, log):
    """Copy weights from tc.init_from (ckpt.pt or .safetensors) into the chosen components."""
    path = tc.init_from
    if not os.path.exists(path):
        sys.exit(f"--init_from={path} does not exist; point it at a ckpt.pt or model.safetensors (e.g. stage 1's)")
    try:
        state = load_state_file(path)
    except ValueError as e:
        sys.exit(str(e))
    state = state.get("model", state) if isinstance(state.get("model"), dict) else state
    parts = ["llm", "vision", "projector"] if tc.init_parts == "all" else tc.init_parts.split(",")
    if not set(parts) <= {"llm", "vision", "projector"}:
        sys.exit(f"--init_parts={tc.init_parts!r}: use all or a comma list of llm, vision, projector")
    for part in parts:
        sub = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
        load_state(getattr(model, part), sub, f"{path} ({part})")
    log(f"initialised {', '.join(parts)} from {path}")


def peak_memory(device: torch.device) -> float:
    """Peak memory so far in bytes: CUDA's allocator peak, or the process's peak resident set on Linux."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("nan")


class JsonlLog:
    """One JSON object per line, appended and flushed at once (a killed run loses at most one line)."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def write(self, rec: dict):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()


# ----------------------------------------------------------------------------------------------
# The output folder: what a run may write over. A checkpoint can hold days of GPU time, so a typo in
# --out_dir or a forgotten --resume=1 must never replace one without a word.

# Three small files make the rules below checkable: the marker says the folder is a run of ours, the
# lock says a live process uses it, and the checkpoints themselves (run_checkpoints) say there is work
# to lose. Deleting the marker or the lock by hand is always safe; neither holds any state of the run.
MARKER = "train_run.json"  # "train.py wrote this folder": the folders we may write into again
LOCK = "train.lock"        # {"pid", "host", "start"} of the run using the folder now
OURS = ("ckpt.pt", "ckpt.prev.pt", "model.safetensors", "config.json", "report.json", "dcp")


def foreign_model(out_dir: str) -> str | None:
    """-> what in out_dir is a model train.py did not write (a Hugging Face download, say), or None.
    A config.json naming `architectures` is Hugging Face's (ours never does); weight files count as
    foreign unless our marker says this folder is a run of ours."""
    if not os.path.isdir(out_dir):
        return None
    cfg = os.path.join(out_dir, "config.json")
    if os.path.isfile(cfg):
        try:
            with open(cfg) as f:
                c = json.load(f)
        except (OSError, ValueError):
            return "a config.json train.py did not write"
        if isinstance(c, dict) and "architectures" in c:
            return "a Hugging Face model's config.json"
    if os.path.exists(os.path.join(out_dir, MARKER)):
        return None
    weights = sorted(f for f in os.listdir(out_dir) if f.endswith((".safetensors", ".bin", ".pth", ".gguf")))
    return weights[0] if weights else None


def run_checkpoints(out_dir: str) -> list:
    """The checkpoints of an earlier run in out_dir (an unfinished DCP folder is not one)."""
    found = [f for f in ("ckpt.pt", "ckpt.prev.pt", "model.safetensors") if os.path.exists(os.path.join(out_dir, f))]
    return found + (["dcp/"] if dcp_checkpoints(out_dir) else [])


def take_lock(out_dir: str, log) -> str:
    """Create out_dir/train.lock holding our pid, or stop: another live run owns the folder. A lock whose
    pid is dead (a run killed with -9 cannot remove it) is said and taken over. The lock is written
    aside and hard-linked into place: creating a link fails if the name exists, so of two runs racing
    for the folder exactly one wins, and nobody ever reads a half-written lock."""
    path = os.path.join(out_dir, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid())}
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(me, f)
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                try:
                    with open(path) as f:
                        owner = json.load(f)
                except (OSError, ValueError):
                    owner = {}
                pid, host = owner.get("pid"), owner.get("host")
                dead = isinstance(pid, int) and (pid == me["pid"] or not pid_alive(pid, owner.get("start")))
                if not (dead and host == me["host"]):
                    sys.exit(f"--out_dir={out_dir} is in use by another run (pid {pid} on {host}; lock {path}); "
                             f"wait for it to end or pick another --out_dir (if that run is gone, delete the lock)")
                log(f"{path}: stale lock of pid {pid}, which is no longer running: taken over")
                os.remove(path)
        sys.exit(f"could not take the lock {path}; another run keeps taking it")
    finally:
        os.remove(tmp)


def release_lock(path: str | None):
    """Remove our lock (only ours: a lock taken over by another run stays). Called from train()'s
    `finally`, so a run that stops with an error (a NaN, bad data) frees the folder too; only a kill
    leaves the lock, and the next run recognises it as stale by its dead pid."""
    try:
        with open(path) as f:
            if json.load(f).get("pid") == os.getpid():
                os.remove(path)
    except (TypeError, OSError, ValueError):
        pass


def claim_out_dir(tc: TrainConfig, log) -> str:
    """Every check on --out_dir, before any work starts (rank 0 only) -> the lock to release at the end.
    Refused: an empty name; a file; a folder holding a model train.py did not write; a folder holding
    --init_from (the run would overwrite its own starting point); another run's checkpoint unless
    --resume=1 or --overwrite=1; a folder another live run holds; a folder we cannot write."""
    out = tc.out_dir.strip()
    if not out:
        sys.exit("--out_dir is empty; name the folder for the run's checkpoints, e.g. --out_dir=out")
    real = os.path.realpath(out)
    if os.path.exists(real) and not os.path.isdir(real):
        sys.exit(f"--out_dir={out} is a file, not a folder; pick a folder for the run's checkpoints")
    if tc.init_from and (os.path.realpath(tc.init_from) + os.sep).startswith(real + os.sep):
        sys.exit(f"--init_from={tc.init_from} lies inside --out_dir={out}: the run would write over its own "
                 f"starting point; pick another --out_dir")
    theirs = foreign_model(real)
    if theirs:
        sys.exit(f"--out_dir={out} holds a model train.py did not write ({theirs}); refusing to write into "
                 f"it, pick another --out_dir")
    # the refusals above and below write nothing: a refused run leaves the folder byte-identical
    earlier = run_checkpoints(real)
    if earlier and not tc.resume and not tc.overwrite:
        sys.exit(f"--out_dir={out} holds another run's checkpoint ({', '.join(earlier)}); continue it with "
                 f"--resume=1, replace it with --overwrite=1, or pick another --out_dir")
    try:  # the first writes: an unwritable folder fails here, not at the first save hours later
        os.makedirs(real, exist_ok=True)
        lock = take_lock(real, log)
        if not os.path.exists(os.path.join(real, MARKER)):  # once: a resume leaves every file as it was
            write_text(os.path.join(real, MARKER), json.dumps({"written_by": "LLaDA-V train.py", "started": time.time()}))
    except OSError as e:
        sys.exit(f"cannot write to --out_dir={out} ({type(e).__name__}: {e.strerror or e}); pick a writable folder")
    if tc.overwrite and not tc.resume and earlier:  # only now, under our lock, in a folder that is ours
        for f in OURS:
            p = os.path.join(real, f)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
        log(f"--overwrite=1: removed the earlier run's {', '.join(earlier)} in {out}")
    for p in remove_stale_temporaries(real, owned=OURS + (MARKER, "latest")):
        log(f"removed {p}, left by a save that was killed half-way")
    return lock


# ----------------------------------------------------------------------------------------------
# Resume: the newest intact checkpoint, of the same run

# The options that shape the trajectory: a resumed run with any of them changed is another experiment
# (another seed, batch or lr schedule, other data), so --resume=1 refuses it unless --resume_changed=1.
RESUME_KEYS = ("seed", "batch_size", "lr", "min_lr", "warmup_steps", "max_steps", "weight_decay", "beta2",
               "grad_clip", "llm_lr_scale", "vision_lr_scale", "projector_lr_scale", "stratified_t", "exact_count",
               "weighting", "loss_mode", "single_object_steps", "kind_weights_from", "kind_weights", "gen_length",
               "stage", "data", "image_root", "data_format", "max_len", "unignore_special", "pad_labels")


def resume(tc: TrainConfig, mc, model, opt, fmt, info, log):
    """Load the newest intact checkpoint of out_dir into model and optimizer -> (step, bad-sample counts,
    its path). Candidates, newest first: the DCP folders (two are kept), else ckpt.pt then ckpt.prev.pt.
    One that is truncated or fails its checksums is skipped, and said; a changed model config stops the
    run, and so does a changed training config (RESUME_KEYS) unless --resume_changed=1."""
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
    candidates = dcp_checkpoints(tc.out_dir) or [p for p in (ckpt_path, prev_path(ckpt_path)) if os.path.exists(p)]
    if not candidates:
        sys.exit(f"--resume=1 but {ckpt_path} does not exist (nor {tc.out_dir}/dcp/step_*); drop --resume "
                 f"or point --out_dir at a run")
    # Why fall back rather than stop: a save killed before its fsync reached the disk, a full disk, or a
    # bad copy between machines damages the newest file only; the one before it is intact and costs a
    # few steps. A wrong config is another matter: it would be wrong for every candidate, so it stops.
    skipped = []
    for path in candidates:
        try:  # read (and verify) the candidate; anything wrong with it moves on to the next one
            if os.path.isdir(path):
                problem = verify_dcp(path, info)
                if problem:
                    raise ValueError(problem)
                ckpt = None
                saved = read_extra(path)
            else:
                ckpt = saved = load_state_file(path, info.device)
                if "optimizer" not in ckpt:
                    raise ValueError(f"a final export without optimizer state (resume from {tc.out_dir}/dcp)")
            saved_cfg = type(mc).from_dict(saved["config"]).to_dict()  # fields added since get defaults
        except Exception as e:  # noqa: BLE001 (truncated zip, bad DCP shard, ...): all mean "not intact"
            skipped.append(path)
            log(f"skipped {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        if saved_cfg != mc.to_dict():
            diff = [k for k in ("lm", "vision", "tokenizer") if saved_cfg[k] != mc.to_dict()[k]]
            sys.exit(f"{path} was trained with another model config (differs in {', '.join(diff)}); "
                     f"use the same --preset and overrides, or a new --out_dir")
        old = saved.get("train_config") or {}
        changed = [f"{k} {old[k]!r} -> {getattr(tc, k)!r}" for k in RESUME_KEYS if k in old and old[k] != getattr(tc, k)]
        if changed and not tc.resume_changed:
            sys.exit(f"{path} was trained with other options ({'; '.join(changed)}); resume with the same ones, "
                     f"or pass --resume_changed=1 to go on with the new ones")
        if ckpt is not None:
            load_state(model, ckpt["model"], path)
            opt.load_state_dict(ckpt["optimizer"])
            step, bad = ckpt["step"], {}
        else:
            extra = load_dcp(path, model, opt)
            step, bad = extra["step"], extra.get("bad", {})
        log(f"resumed from {path} at step {step}" + (f" (skipped {len(skipped)} damaged: {', '.join(skipped)})"
                                                     if skipped else "") + (f"; changed: {'; '.join(changed)}" if changed else ""))
        return step, bad, path
    sys.exit(f"no intact checkpoint in {tc.out_dir} to resume from (skipped {', '.join(skipped)}); "
             f"start over with --overwrite=1")


def save(tc: TrainConfig, mc, fmt, step, model, opt, tok, bad, info) -> str:
    """One checkpoint with everything a resume needs -> its path. pt: ckpt.pt (the previous one kept as
    ckpt.prev.pt), written by rank 0; DCP: a collective, every rank writes its shards."""
    # train_config travels with every checkpoint: resume() compares it with the new command line
    if fmt == "dcp":
        save_dcp(tc.out_dir, step, model, opt, {"step": step, "config": mc.to_dict(), "train_config": asdict(tc),
                                                "bad": dict(bad.errors) if bad else {}}, info)
        return os.path.join(tc.out_dir, "dcp", f"step_{step:06d}")
    path = os.path.join(tc.out_dir, "ckpt.pt")
    if info.main:
        save_checkpoint(path, {"config": mc.to_dict(), "train_config": asdict(tc), "model": model.state_dict(),
                               "optimizer": opt.state_dict(), "step": step, "tokenizer": tok.to_dict()}, keep_prev=True)
    return path


# ----------------------------------------------------------------------------------------------
# Batches

def blank_image(ids, labels, attn, mc, pad_id, device):
    """A text-only micro-batch under DDP / FSDP2 gets one blank image appended to row 0, hidden from
    attention (mask 0) and from the loss (label -100): the vision tower and projector then run on every
    process in the same order, so the gradient collectives line up (and DDP sees every parameter used)."""
    B, n = ids.shape[0], mc.vision.n_patches
    extra = torch.full((B, n), pad_id, dtype=ids.dtype, device=device)  # (B, n) pad tokens ...
    extra[0] = IMAGE_TOKEN_INDEX                                         # ... row 0's become one image
    pixels = torch.zeros(1, 3, mc.vision.image_size, mc.vision.image_size, device=device)
    return (torch.cat([ids, extra], 1), torch.cat([labels, torch.full_like(extra, -100)], 1),
            torch.cat([attn, torch.zeros_like(extra, dtype=torch.bool)], 1), pixels)


class StepBatches:
    """step -> this process's `accum` micro-batches, each already through the forward process:
    (ids, labels, attn, pixels, x_t, masked, p_mask, n_samples). Masks come from generators seeded by
    (seed, step[, micro-batch, rank]), never from the global RNG, so a resumed run redraws them exactly."""

    def __init__(self, tc, mc, tok, info, accum, micro, synthetic, stream, bad, trains):
        # synthetic: SyntheticVQA (drawn per step); stream: the LLaVA DataLoader iterator, or None;
        # bad: the BadSampleCounter of skipped records; trains: which components get gradients
        self.tc, self.mc, self.tok, self.info, self.dev = tc, mc, tok, info, info.device
        self.accum, self.micro, self.synthetic, self.stream, self.bad = accum, micro, synthetic, stream, bad
        self.needs_image = info.on and (trains["vision"] or trains["projector"])

    def noise(self, ids, labels, g):
        """x0 -> (x_t, masked, p_mask): t ~ U(0,1) per row, answer tokens masked with prob. p_mask."""
        return forward_process(ids, labels, self.tok.mask_id, generator=g, stratified=self.tc.stratified_t,
                               exact_count=self.tc.exact_count)

    def __call__(self, step):
        """-> the list of this process's micro-batches for global step `step`."""
        tc, info, dev = self.tc, self.info, self.dev
        if self.stream is None:
            # Synthetic data: the batch and masks depend only on (seed, step). Every process draws the
            # whole global batch and its masks, then keeps its rows, so any number of processes trains on
            # exactly what one process would.
            batch = self.synthetic.train_batch(step, tc.batch_size, lambda im: preprocess(im, self.mc.vision.image_size))
            ids, labels, attn, pixels = (t.to(dev) for t in batch)  # (B, L) x 3, (B, 3, S, S)
            xt, masked, p_mask = self.noise(ids, labels, torch.Generator(device=dev).manual_seed(tc.seed * 1_000_003 + step))
            if self.accum == 1 and not info.on:
                return [(ids, labels, attn, pixels, xt, masked, p_mask, tc.batch_size)]
            out = []
            for a in range(self.accum):  # micro-batch a of rank r: rows (a W + r) m ... (a W + r + 1) m
                r = slice((a * info.world + info.rank) * self.micro, (a * info.world + info.rank + 1) * self.micro)
                out.append((ids[r], labels[r], attn[r], pixels[r], xt[r], masked[r], p_mask[r], self.micro))
            return out
        out = []
        while len(out) < self.accum:  # LLaVA data: this rank's next micro-batches from the DataLoader
            b = next(self.stream)
            self.bad.update(b["errors"], b["n_seen"])
            if b["ids"] is None:  # every sample of this micro-batch was bad: take the next one, unless
                self.bad.check(self.bad.bad, self.bad.seen)  # this process's data is mostly broken
                continue
            ids, labels, attn = b["ids"].to(dev), b["labels"].to(dev), b["attn"].to(dev)
            pixels = None if b["pixels"] is None else b["pixels"].to(dev)
            if pixels is None and self.needs_image:
                ids, labels, attn, pixels = blank_image(ids, labels, attn, self.mc, self.tok.pad_id, dev)
            g = torch.Generator(device=dev).manual_seed(((tc.seed * 1_000_003 + step) * 64 + len(out)) * 4096 + info.rank)
            out.append((ids, labels, attn, pixels, *self.noise(ids, labels, g), b["n_samples"]))
        return out


# ----------------------------------------------------------------------------------------------
# Setup

def check_options(tc: TrainConfig, mc, tok, info):
    """The checks that need the tokenizer or the process count -> (micro, accum): sequences per process
    per forward, and micro-batches per step."""
    if tok.vocab_size > mc.lm.vocab_size:
        sys.exit(f"tokenizer has {tok.vocab_size} tokens but lm.vocab_size={mc.lm.vocab_size}; raise --lm.vocab_size")
    if tc.gen_length % tc.block_length or tc.sample_steps % (tc.gen_length // tc.block_length):
        sys.exit(f"gen_length={tc.gen_length} must be divisible by block_length={tc.block_length}, and "
                 f"sample_steps={tc.sample_steps} by the number of blocks; fix the three options")
    micro = tc.micro_batch_size or tc.batch_size // info.world
    if micro < 1 or tc.batch_size % (micro * info.world):
        sys.exit(f"batch_size={tc.batch_size} must be a multiple of micro_batch_size={micro} x {info.world} "
                 f"processes; change --batch_size or --micro_batch_size")
    return micro, tc.batch_size // (micro * info.world)


def load_tokenizer(tc: TrainConfig, mc):
    """The toy tokenizer (learnt deterministically from the synthetic data) or the official vocabulary
    from --tokenizer; the choice is written into the model config, so the checkpoint carries it."""
    if tc.tokenizer:
        mc.tokenizer = tc.tokenizer  # recorded in the checkpoint's config, so sample.py finds it again
    try:
        return toy_tokenizer() if mc.tokenizer == "toy" else get_tokenizer(mc.tokenizer)
    except ValueError as e:
        sys.exit(f"preset {tc.preset!r} needs the {mc.tokenizer!r} tokenizer; pass --tokenizer=<tokenizer.json or "
                 f"model dir> ({e})")


def open_llava(tc: TrainConfig, mc, tok, info, micro):
    """--data: the LLaVA dataset -> (MicroBatches, BadSampleCounter); with --epochs, max_steps follows."""
    from data import BadSampleCounter, LlavaDataset, MicroBatches
    try:
        ds = LlavaDataset(tc.data, tc.image_root, tok, mc.vision.image_size, mc.vision.n_patches,
                          fmt=tc.data_format, max_len=min(tc.max_len, mc.lm.max_seq_len),
                          unignore_special=tc.unignore_special)
    except (OSError, ValueError) as e:
        sys.exit(str(e))
    batches = MicroBatches(ds, tc.batch_size, micro, info.world, info.rank, tc.seed, tc.workers, tc.pad_labels)
    if tc.epochs > 0:
        tc.max_steps = max(1, math.ceil(tc.epochs * batches.steps_per_epoch))
    return batches, BadSampleCounter(tc.max_bad_frac, min_seen=min(50, len(ds)))


class Meter:
    """Throughput, MFU, ETA and memory for the log lines, summed over the processes at each log."""

    def __init__(self, tc, mc, info, first_step, trains):
        self.tc, self.mc, self.info, self.first, self.trains = tc, mc, info, first_step, trains
        self.peak, _ = device_peak(info.device)
        self.t_start = self.t_log = time.time()
        self.tokens, self.flops = 0, 0.0

    def add(self, n_tok, seq, n_masked, n_img):
        """Count one step: its tokens and its FLOPs (model.step_flops: 6 N per trained token, plus the
        attention and the head on the masked rows only)."""
        self.tokens += n_tok
        self.flops += step_flops(self.mc, n_tok, seq, n_masked, n_img, self.trains["llm"], self.trains["vision"],
                                 self.trains["projector"])

    def record(self, step, loss_sum, lr) -> dict:
        """-> the log record of this step (collective: every process calls it).
            tok/s = tokens since the start / seconds since the start      (all processes)
            MFU   = FLOPs since the last log / seconds / (peak x processes)
            ETA   = steps left x seconds per step so far (this run's steps, not the resumed ones)"""
        tc, info = self.tc, self.info
        loss, tokens, flops = all_sum([loss_sum, self.tokens, self.flops], info)
        now = time.time()
        dt = now - self.t_start
        mfu = flops / (now - self.t_log) / (self.peak * info.world) if self.flops else 0.0
        rec = {"step": step, "loss": loss / info.world, "lr": lr, "tok_per_s": tokens / dt, "mfu": mfu,
               "peak_mem_gib": peak_memory(info.device) / 2 ** 30,
               "eta_s": (tc.max_steps - step) * dt / (step - self.first), "time": now,
               "ms_per_step": (now - self.t_log) * 1000 / tc.log_every}
        self.t_log, self.flops = now, 0.0
        return rec


# ----------------------------------------------------------------------------------------------
# The run

def nonfinite_stop(step, norm, last_ckpt):
    """A NaN / Inf loss (seen as a non-finite gradient norm, the same number on every process) stops the
    run before opt.step(): the weights and every checkpoint stay finite; training on would spread the
    NaN into every weight and then into the next checkpoint."""
    where = f"{last_ckpt[0]} (step {last_ckpt[1]})" if last_ckpt else "none yet"
    sys.exit(f"step {step}: the loss is not finite (gradient norm {norm}); stopped before the update. Last good "
             f"checkpoint: {where}. Lower --lr or --grad_clip, check the data, then continue with --resume=1")


def train(tc: TrainConfig, mc, quiet=False):
    """One training run: setup, resume, then the loop. Returns (model, report)."""
    # --- setup: processes and device, the output folder, tokenizer, data, model, optimizer ---
    # Under torchrun each process runs this same function; rank 0 alone checks and locks out_dir, the
    # others wait at the barrier (if rank 0 refuses, torchrun ends them with it).
    info = setup(pick_device(tc.device))
    log = (lambda *a: None) if quiet or not info.main else (lambda *a: print(*a, flush=True))
    lock = claim_out_dir(tc, log) if info.main else None
    barrier()  # the other processes start once rank 0 has claimed the folder
    try:
        return _train(tc, mc, info, log)
    finally:
        release_lock(lock)


def _train(tc: TrainConfig, mc, info, log):
    """train()'s body, run while this process holds out_dir's lock."""
    device = info.device
    torch.manual_seed(tc.seed)  # the model's initial weights; every later random draw has its own seed
    tok = load_tokenizer(tc, mc)
    micro, accum = check_options(tc, mc, tok, info)
    try:
        synthetic = SyntheticVQA(tok, mc.vision.image_size, mc.vision.n_patches, tc.gen_length, seed=tc.seed,
                                 system=default_system(mc.tokenizer), single_object_steps=tc.single_object_steps,
                                 kind_weights=tc.kind_weights, kind_weights_from=tc.kind_weights_from)
    except ValueError as e:
        sys.exit(f"--kind_weights: {e}")
    # built in fp32 on the CPU, moved once: init_weights draws from the global RNG seeded above, so the same
    # seed gives the same initial weights on every machine and process count (DDP / FSDP2 start equal)
    model = LLaDAV(mc)
    model.init_weights()
    if tc.init_from:
        init_from(model, tc, log)
    model.to(device)
    model.llm.checkpointing, model.llm.head_chunk = tc.checkpointing, tc.head_chunk
    freeze(model, tc)  # before wrapping: DDP and FSDP2 must see which parameters train
    n = count_params(model)
    parallel = resolve_parallel(tc.parallel, n["total"], info)
    fwd = wrap(model, parallel, info, bf16=device.type == "cuda")  # call fwd; `model` holds the state
    opt = torch.optim.AdamW(make_groups(model, tc), lr=tc.lr, betas=(0.9, tc.beta2), eps=1e-8,
                            fused=device.type == "cuda" and parallel != "fsdp")
    # pt: one file, simple, fine for one process; dcp: sharded, written by every process in parallel and
    # loadable on any other number of processes, the only option under FSDP2
    fmt = tc.ckpt_format if tc.ckpt_format != "auto" else "dcp" if (info.on or tc.data) else "pt"
    if fmt not in ("pt", "dcp") or (fmt == "pt" and parallel == "fsdp"):
        sys.exit(f"--ckpt_format={tc.ckpt_format}: use pt, dcp or auto (FSDP2 needs dcp)")
    # --data: LLaVA records read by DataLoader workers, and the counter of records skipped as bad
    llava, bad = open_llava(tc, mc, tok, info, micro) if tc.data else (None, None)
    if tc.warmup_ratio > 0:
        tc.warmup_steps = max(1, round(tc.warmup_ratio * tc.max_steps))

    # --- resume: the newest intact checkpoint of this run ---
    # weights, AdamW moments and the step; the data order and the masks are functions of (seed, step), so
    # nothing else needs saving for the run to continue bit for bit (tests/kill_resume.py checks it)
    step, bad_prev, last_ckpt = 0, {}, None
    if tc.resume:
        step, bad_prev, path = resume(tc, mc, model, opt, fmt, info, log)
        last_ckpt = (path, step)
    if tc.compile:
        fwd = torch.compile(fwd)
    log(f"preset {tc.preset}: {n['total'] / 1e6:.2f}M parameters (language model {n['language model'] / 1e6:.2f}M, "
        f"vision {n['vision tower'] / 1e6:.2f}M, projector {n['projector'] / 1e6:.3f}M) on {device}")
    if info.on or accum > 1 or tc.stage:
        log(f"stage {tc.stage} | {info.world} process(es), {parallel} | global batch {tc.batch_size} = {micro} x "
            f"{info.world} x {accum} accumulation | checkpoints: {fmt} | activation checkpointing {tc.checkpointing}")

    # --- batches, evaluation and logging ---
    # heldout: questions never drawn for training (synthetic.py keeps the two seed ranges apart); the
    # quick checks and the final report sample them with the same settings as sample.py
    heldout = synthetic.heldout(max(tc.eval_quick, tc.eval_final)) if not tc.data else []
    gen = dict(gen_length=tc.gen_length, steps=tc.sample_steps, block_length=tc.block_length)
    trains = {k: any(p.requires_grad for p in getattr(model, k).parameters()) for k in ("llm", "vision", "projector")}
    jlog = JsonlLog(tc.jsonl if info.main else None)
    can_eval = not tc.data and parallel != "fsdp"  # evaluate() needs the whole model in one process
    stream = iter(llava.iterate(step)) if tc.data else None  # the data order continues from `step`
    if tc.data:
        bad.errors.update(bad_prev)
    batches = StepBatches(tc, mc, tok, info, accum, micro, synthetic, stream, bad, trains)
    meter = Meter(tc, mc, info, step, trains)

    # --- the loop: x0 -> forward_process -> model -> loss -> backward, then one optimizer step ---
    model.train()
    while step < tc.max_steps:
        # the schedule is a pure function of the step, so a resumed run picks it up where it was
        lr = lr_at(step, tc)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]  # per component: LLM x1, ViT and projector x their scales
        opt.zero_grad(set_to_none=True)
        logging = (step + 1) % tc.log_every == 0 or step + 1 == tc.max_steps
        step_loss, n_tok, n_masked, n_img, seq = 0.0, 0, 0, 0, 0
        # ids, labels, attn: (b, L); pixels: (n_images, 3, S, S) or None; xt: (b, L) with answer tokens
        # masked; masked: (b, L) bool; p_mask: (b,) each row's masking probability; n_samples: rows kept
        for a, (ids, labels, attn, pixels, xt, masked, p_mask, n_samples) in enumerate(batches(step)):
            # gradients are averaged over processes once per step, after the last micro-batch
            sync = a == accum - 1
            if parallel == "fsdp":
                fwd.set_requires_gradient_sync(sync)
            with fwd.no_sync() if parallel == "ddp" and not sync else contextlib.nullcontext():
                with autocast(device):
                    if tc.head_chunk:  # per-row CE (N_masked,): the head runs in chunks inside the model
                        ce, logits = fwd(xt, pixels, attn, output_positions=masked, targets=labels[masked]), None
                    else:              # logits (N_masked, V): the head runs on the masked rows only
                        ce, logits = None, fwd(xt, pixels, attn, output_positions=masked)
                loss = diffusion_loss(logits, labels, masked, p_mask, mode=tc.loss_mode, weighting=tc.weighting, ce=ce)
                if n_samples * info.world != tc.batch_size:  # scale so the sum over micro-batches and the
                    loss = loss * (n_samples * info.world / tc.batch_size)  # mean over processes = batch loss
                loss.backward()
            step_loss += loss.item() if logging else 0.0  # .item() waits for the GPU: only when logging
            n_tok += int(attn.sum())
            n_masked += int(masked.sum())
            n_img += 0 if pixels is None else pixels.shape[0]
            seq = max(seq, ids.shape[1])
        # clip ||g|| to grad_clip. The norm is of the whole gradient (all processes, all shards: the same
        # number everywhere), so the finiteness check below stops every process at the same step.
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        if not math.isfinite(float(norm)):  # NaN / Inf loss: stop before it reaches the weights
            nonfinite_stop(step + 1, float(norm), last_ckpt)
        opt.step()  # AdamW: bias-corrected moments, decoupled weight decay (0 in LLaDA-V)
        step += 1
        meter.add(n_tok, seq, n_masked, n_img)
        # --- bookkeeping, after the step: log line (and JSON line), quick held-out check, checkpoint ---
        if logging:
            rec = meter.record(step, step_loss, lr)
            log(f"step {step:5d}/{tc.max_steps} | loss {rec['loss']:.4f} | lr {lr:.2e} | {rec['tok_per_s']:,.0f} tok/s"
                f" | {rec['ms_per_step']:.0f} ms/step | ETA {rec['eta_s']:.0f}s | MFU {100 * rec['mfu']:.1f}% | "
                f"peak mem {rec['peak_mem_gib']:.2f} GiB")
            jlog.write({k: v for k, v in rec.items() if k != "ms_per_step"})
            if tc.data:
                n_bad, n_seen = all_sum([bad.bad, bad.seen], info)
                bad.check(n_bad, n_seen)
                if n_bad:
                    log(f"  skipped {n_bad:.0f} of {n_seen:.0f} samples so far (this process: {bad.summary()})")
        if tc.eval_every and tc.eval_quick and step % tc.eval_every == 0 and step < tc.max_steps and can_eval and info.main:
            log(f"  held-out ({tc.eval_quick}): " + format_eval(evaluate(model, tok, heldout[:tc.eval_quick], **gen)))
        if step % tc.ckpt_every == 0 or step == tc.max_steps:  # a resume restarts from the newest of these
            last_ckpt = (save(tc, mc, fmt, step, model, opt, tok, bad, info), step)

    # --- the end: export, loss curve, held-out report ---
    # model.safetensors + config.json (+ a weights-only ckpt.pt for a DCP run) is what sample.py, bench and
    # the next stage's --init_from read; report.json is written last, so its presence means "finished".
    train_time = time.time() - meter.t_start
    log(f"trained {step - meter.first} steps in {train_time:.0f}s; checkpoint "
        f"{os.path.join(tc.out_dir, 'ckpt.pt') if fmt == 'pt' else os.path.join(tc.out_dir, 'dcp')}")
    export(model, tc.out_dir, mc.to_dict(), info, write_pt=fmt == "dcp",
           extra={"tokenizer": tok.to_dict(), "train_config": asdict(tc)})
    if tc.jsonl and info.main:
        from tools.draw import plot_curve, read_curve
        plot_curve(read_curve(tc.jsonl), os.path.join(os.path.dirname(tc.jsonl) or ".", "loss.png"))
    report = {"train_seconds": train_time, "steps": step}
    if tc.data:
        report["bad_samples"] = dict(bad.errors)
        log(f"bad samples skipped: {bad.summary()}")
    if tc.final_eval and tc.eval_final and can_eval and info.main:
        t0 = time.time()
        final = evaluate(model, tok, heldout[:tc.eval_final], **gen)
        blank = evaluate(model, tok, heldout[:tc.eval_final], blank=True, **gen)
        log(f"held-out report ({time.time() - t0:.0f}s of sampling):")
        log(f"  images:       {format_eval(final)}")
        log(f"  blank images: {format_eval(blank)}   <- near chance: the answers come from the image")
        report = {"heldout": final, "blank_images": blank, "train_seconds": train_time, "steps": step}
    if info.main:
        write_text(os.path.join(tc.out_dir, "report.json"), json.dumps(report, indent=1))
    barrier()
    return model, report


if __name__ == "__main__":
    tc, mc = parse_args(sys.argv[1:], TrainConfig())
    t = time.time()
    train(tc, mc)
    from distributed import teardown
    teardown()
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line, not one per process
        print(f"total wall time {time.time() - t:.0f}s")
