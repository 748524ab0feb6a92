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
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch

from diffusion import diffusion_loss, forward_process
from model import LLaDAV, count_params, get_config, load_state, save_checkpoint
from sample import autocast, evaluate, format_eval
from synthetic import SyntheticVQA
from tokenizer import get_tokenizer
from vision import preprocess


@dataclass
class TrainConfig:
    preset: str = "toy"          # model preset: toy | small | llada_v_8b (see model.py)
    out_dir: str = "out"         # checkpoint (ckpt.pt) and final report (report.json) go here
    resume: bool = False         # continue from out_dir/ckpt.pt
    device: str = "auto"         # auto = cuda > mps > cpu
    seed: int = 0
    batch_size: int = 32         # sequences per step
    max_steps: int = 3500
    lr: float = 1.5e-3           # peak learning rate of the language model; lower it (e.g. 1e-4) for big models
    vision_lr_scale: float = 1.0     # vision tower lr = lr * this (LLaDA-V: 2e-6 / 1e-5 = 0.2; 0 freezes it)
    projector_lr_scale: float = 1.0  # projector lr = lr * this
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
    gen_length: int = 16         # answer canvas G, in tokens (training and sampling)
    block_length: int = 16       # sampler block length (semi-autoregressive if < gen_length)
    sample_steps: int = 16       # sampler steps
    log_every: int = 25
    eval_every: int = 1000       # quick held-out check (eval_quick questions) every N steps; 0 = never
    eval_quick: int = 100
    eval_final: int = 500        # held-out questions in the final report
    ckpt_every: int = 250        # atomic checkpoint every N steps (and at the end)
    compile: bool = False        # torch.compile the model (CUDA)


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
        old = getattr(target, name)
        try:
            new = (val.lower() in ("1", "true", "yes")) if isinstance(old, bool) else type(old)(val)
        except ValueError:
            sys.exit(f"--{key}={val!r} is not a valid {type(old).__name__}")
        setattr(target, name, new)
    return tc, mc


def lr_at(step, tc: TrainConfig):
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * progress))


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def train(tc: TrainConfig, mc, quiet=False):
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    device = pick_device(tc.device)
    torch.manual_seed(tc.seed)
    try:
        tok = get_tokenizer(mc.tokenizer)
    except ValueError as e:
        sys.exit(f"preset {tc.preset!r} needs the {mc.tokenizer!r} tokenizer: {e}")
    if tok.vocab_size > mc.lm.vocab_size:
        sys.exit(f"tokenizer has {tok.vocab_size} tokens but lm.vocab_size={mc.lm.vocab_size}; raise --lm.vocab_size")
    if tc.gen_length % tc.block_length or tc.sample_steps % (tc.gen_length // tc.block_length):
        sys.exit(f"gen_length={tc.gen_length} must be divisible by block_length={tc.block_length}, and "
                 f"sample_steps={tc.sample_steps} by the number of blocks; fix the three options")
    data = SyntheticVQA(tok, mc.vision.image_size, mc.vision.n_patches, tc.gen_length, seed=tc.seed)
    model = LLaDAV(mc)
    model.init_weights()
    model.to(device)
    # One parameter group per component, each with its own lr multiplier (LLaDA-V trains the vision
    # tower at a fifth of the LLM's lr); decay only matrices (LLaDA-V uses weight_decay 0 anyway).
    groups = []
    for part, scale in ((model.llm, 1.0), (model.vision, tc.vision_lr_scale), (model.projector, tc.projector_lr_scale)):
        params = [p for p in part.parameters() if p.requires_grad]
        if scale == 0:
            for p in params:
                p.requires_grad_(False)  # a zero lr freezes the component
            continue
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay, "lr_scale": scale},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    opt = torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, tc.beta2), eps=1e-8,
                            fused=device.type == "cuda")
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
    step = 0
    if tc.resume:
        if not os.path.exists(ckpt_path):
            sys.exit(f"--resume=1 but {ckpt_path} does not exist; drop --resume or point --out_dir at a run")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        ckpt["config"] = type(mc).from_dict(ckpt["config"]).to_dict()  # fields added since it was written get defaults
        if ckpt["config"] != mc.to_dict():
            diff = [k for k in ("lm", "vision", "tokenizer") if ckpt["config"][k] != mc.to_dict()[k]]
            sys.exit(f"{ckpt_path} was trained with another model config (differs in {', '.join(diff)}); "
                     f"use the same --preset and overrides, or a new --out_dir")
        load_state(model, ckpt["model"], ckpt_path)
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        log(f"resumed from {ckpt_path} at step {step}")
    fwd = torch.compile(model) if tc.compile else model
    n = count_params(model)
    log(f"preset {tc.preset}: {n['total'] / 1e6:.2f}M parameters (language model {n['language model'] / 1e6:.2f}M, "
        f"vision {n['vision tower'] / 1e6:.2f}M, projector {n['projector'] / 1e6:.3f}M) on {device}")
    heldout = data.heldout(max(tc.eval_quick, tc.eval_final))
    gen = dict(gen_length=tc.gen_length, steps=tc.sample_steps, block_length=tc.block_length)

    def save(step):
        save_checkpoint(ckpt_path, {"config": mc.to_dict(), "train_config": asdict(tc), "model": model.state_dict(),
                                    "optimizer": opt.state_dict(), "step": step})

    model.train()
    t_start, tokens_seen, t_log = time.time(), 0, time.time()
    first_step = step
    while step < tc.max_steps:
        lr = lr_at(step, tc)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        # The batch and the masks depend only on (seed, step): a resumed run sees exactly the same data.
        ids, labels, attn, pixels = data.train_batch(step, tc.batch_size, lambda im: preprocess(im, mc.vision.image_size))
        n_tokens = int(attn.sum())  # counted on the CPU copy: no device sync in the step
        ids, labels, attn, pixels = ids.to(device), labels.to(device), attn.to(device), pixels.to(device)
        gen_rng = torch.Generator(device=device).manual_seed(tc.seed * 1_000_003 + step)
        xt, masked, p_mask = forward_process(ids, labels, tok.mask_id, generator=gen_rng, stratified=tc.stratified_t,
                                             exact_count=tc.exact_count)
        with autocast(device):
            logits = fwd(xt, pixels, attn, output_positions=masked)  # (N_masked, V): head on masked rows only
        loss = diffusion_loss(logits, labels, masked, p_mask, mode=tc.loss_mode, weighting=tc.weighting)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        tokens_seen += n_tokens
        if step % tc.log_every == 0 or step == tc.max_steps:
            dt = time.time() - t_start
            tps = tokens_seen / dt
            eta = (tc.max_steps - step) * dt / (step - first_step)
            log(f"step {step:5d}/{tc.max_steps} | loss {loss.item():.4f} | lr {lr:.2e} | "
                f"{tps:,.0f} tok/s | {(time.time() - t_log) * 1000 / tc.log_every:.0f} ms/step | ETA {eta:.0f}s")
            t_log = time.time()
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
            log(f"  held-out ({tc.eval_quick}): " + format_eval(evaluate(model, tok, heldout[:tc.eval_quick], **gen)))
        if step % tc.ckpt_every == 0 or step == tc.max_steps:
            save(step)
    train_time = time.time() - t_start
    log(f"trained {step - first_step} steps in {train_time:.0f}s; checkpoint {ckpt_path}")

    t0 = time.time()
    final = evaluate(model, tok, heldout[:tc.eval_final], **gen)
    blank = evaluate(model, tok, heldout[:tc.eval_final], blank=True, **gen)
    log(f"held-out report ({time.time() - t0:.0f}s of sampling):")
    log(f"  images:       {format_eval(final)}")
    log(f"  blank images: {format_eval(blank)}   <- near chance: the answers come from the image")
    report = {"heldout": final, "blank_images": blank, "train_seconds": train_time, "steps": step}
    with open(os.path.join(tc.out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return model, report


if __name__ == "__main__":
    tc, mc = parse_args(sys.argv[1:], TrainConfig())
    t = time.time()
    train(tc, mc)
    print(f"total wall time {time.time() - t:.0f}s")
