"""
Memory planner: how much memory one process needs to train a preset, before renting the GPUs.

Where this sits in the flow: outside it; it reads the model config and counts bytes.

    python -m tools.plan --preset=llada_v_8b --world=8 --seq=8192 --stage=2     # the 8B plan (prints a table)
    python -m tools.plan --preset=small --world=1 --seq=2048 --parallel=none
    python -m tools.plan --validate=1                                          # estimate vs measured, CPU
    python -m tools.plan --head=1                                              # masked-only head vs full head
    python -m tools.plan --lora_rank=64                  # stage 3 with LoRA on one GPU of 24, 48, 80 GB
    python -m tools.plan --validate=1 --lora_rank=1      # LoRA's estimate vs measured, CPU (the 8B at depth 2)

Per process, for P parameters of which T train, W processes, FSDP2 shards s = W (DDP / none: s = 1):
    parameters   4P/s fp32 masters; + under FSDP2 bf16 the gathered bf16 copies of the units in flight
                 (the root unit's embedding + head, kept for the whole step, and two blocks at a time)
    gradients    4T/s fp32 (+ 4T DDP's separate bucket copy)
    AdamW        8T/s (exp_avg, exp_avg_sq), + 4T/s transient in a foreach step (sqrt(v) buffer)
    activations  what autograd keeps per LLM block for b sequences of L tokens (e = bytes per element;
                 the fp32 statistics of RMSNorm add the "n" terms under bf16):
                    11 d + 4 m  elements per token per block: block input, RMSNorm in/normalised/out (x2),
                    rotated q, k and v, attention output and its contiguous copy, gate, silu(gate), up, product
                 with checkpointing only the block input (d) is kept per block, plus one block's full set
                 while it is recomputed. The ViT: 9 D + 2 M per patch per layer when it trains (0 when frozen:
                 nothing below it needs gradients), for every crop: stage 1 squashes an image to one crop
                 (729 tokens); stages 2-3 use anyres_max_4, a base crop plus a grid of crops, and the image
                 takes vision.num_tokens of the sequence (a 640x480 picture: 5 crops, 2929 tokens; --image).
    head         the output head at the N masked positions only: logits, log-softmax and two gradient buffers
                 of R x V fp32 each, R = N, or R = min(N, head_chunk) when the head runs in chunks
                 (the official code also keeps the fp32 logits of all L positions: L x V x 4 bytes more)
    peak = parameters + AdamW + max(activations + head, gradients + optimizer transient)
The peak is a max because activations are freed in backward while the gradients fill up.

The CPU check (--validate) builds the toy and small presets in fp32 in a fresh process, runs a warm-up
step (it creates AdamW's state and pages in the kernels' code), then measures a second step:
    measured peak = bytes of the parameter and AdamW tensors (summed from the tensors themselves)
                  + rise of the process's peak resident memory during the step (Linux VmHWM, reset
                    through /proc/self/clear_refs just before it, minus the resident set at that moment) MALLOC_MMAP_THRESHOLD_ makes every large
tensor its own mmap, so freed tensors leave the resident set at once and the peak is the peak of live
tensors (plus the allocator's small-object heap).
"""
import gc
import json
import os
import subprocess
import sys
from dataclasses import dataclass

from cli import opt, parse_config, proc_status, run_cli
from model import PRESETS

GB = 2 ** 30


def counts(preset: str, overrides: dict | None = None, lora_rank: int = 0, lora_targets: str = "q,k,v,o,gate,up,down"):
    """Parameter counts per part, from the meta device (no memory); "lora": the adapters' (model.add_lora)."""
    import torch

    from cli import model_config
    from model import LLaDAV, add_lora
    mc = model_config(preset, overrides)
    with torch.device("meta"):
        m = LLaDAV(mc)
        if lora_rank:
            add_lora(m, lora_rank, 2.0 * lora_rank, lora_targets)
    n = lambda mod: sum(p.numel() for p in mod.parameters())
    # root: what FSDP2's root unit holds, everything outside the per-block units (distributed.py): the
    # embedding and the head (one matrix when tied), the norms, the projector, the ViT's patch and position
    # embeddings
    blocks = sum(n(b) for b in list(m.llm.layers) + list(m.vision.layers))
    return mc, {"llm": n(m.llm), "vision": n(m.vision), "projector": n(m.projector), "total": n(m),
                "block": n(m.llm.layers[0]), "root": n(m) - blocks,
                "lora": sum(p.numel() for k, p in m.named_parameters() if ".lora_" in k)}


def image_tokens(vc, stage: int, image=(640, 480)) -> tuple[int, int]:
    """One image of `image` = (W, H) pixels at the stage's image mode -> (visual tokens in the sequence,
    crops through the ViT): square in stage 1 (n^2, 1 crop), anyres_max_4 with the newline in stages 2-3."""
    from vision import grid_pinpoints, num_tokens, select_best_resolution
    if stage == 1:
        return num_tokens(image, "square", False, vc.image_size, vc.patch_size), 1
    W, H = select_best_resolution(image, grid_pinpoints(vc.image_size))
    crops = 1 + (W // vc.image_size) * (H // vc.image_size)  # the base image + the grid
    return num_tokens(image, "anyres_max_4", True, vc.image_size, vc.patch_size), crops


def estimate(preset: str, world: int = 1, seq: int = 8192, batch: int = 1, stage: int = 2, parallel: str = "fsdp",
             checkpointing: bool = True, bf16: bool = True, masked_frac: float = 0.25, n_images: int = 1,
             foreach: bool = True, head_chunk: int = 512, overrides: dict | None = None, image=None,
             lora_rank: int = 0, lora_targets: str = "q,k,v,o,gate,up,down") -> dict:
    """Bytes per process for one training step (see the module docstring). masked_frac: share of the
    sequence's positions that are masked (the head runs there): t ~ U(0,1) over the answer part.
    image: (W, H) of each image, which sets the crops per image at the stage's mode (image_tokens);
    None: one crop per image (the CPU check's square images).
    lora_rank > 0: LoRA (train.py --lora_rank): T = the adapters' parameters, the frozen base stored in bf16
    (fp32 without bf16); a part trains when it holds adapters, the rest needs no gradient."""
    mc, c = counts(preset, overrides, lora_rank, lora_targets)
    crops = 1 if image is None else image_tokens(mc.vision, stage, image)[1]
    lm, vc = mc.lm, mc.vision
    train = {"llm": stage != 1, "vision": stage != 1, "projector": True}
    targets = lora_targets.split(",") if lora_rank else []
    if lora_rank:
        train = {"llm": any(t not in ("vision", "projector") for t in targets), "vision": "vision" in targets,
                 "projector": "projector" in targets}
    T = c["lora"] if lora_rank else sum(c[k] for k in train if train[k])
    s = world if parallel == "fsdp" else 1
    e = 2 if bf16 else 4
    out = {"parameters": (e * (c["total"] - T) + 4 * T if lora_rank else 4 * c["total"]) / s}
    if parallel == "fsdp" and bf16:
        out["parameters"] += 2 * (c["root"] + 2 * c["block"])  # gathered bf16 working copies
    elif bf16:
        out["parameters"] += 2 * T  # autocast's cache of bf16 weight copies
    out["gradients"] = 4 * T / s + (4 * T if parallel == "ddp" else 0)
    out["optimizer"] = 8 * T / s
    transient = 4 * T / s if foreach else 0
    tokens = batch * seq
    d, m = lm.d_model, lm.mlp_hidden
    norm_extra = 0 if not bf16 else 2 * 4 * d  # fp32 x and normalised x of the two RMSNorms
    lm_targets = sum(t not in ("vision", "projector") for t in targets)  # LoRA: each keeps A x, r wide, for B
    per_block = tokens * ((11 * d + 4 * m + lm_targets * lora_rank) * e + norm_extra)
    if not train["llm"] and not train["projector"] and not train["vision"]:
        per_block = 0
    if checkpointing:
        acts = lm.n_layers * tokens * d * e + per_block
    else:
        acts = lm.n_layers * per_block
    acts += 2 * tokens * d * e  # the embeddings and the final norm's output
    if train["vision"]:
        acts += n_images * crops * batch * (vc.n_layers - 1) * vc.n_patches * (9 * vc.d_model + 2 * vc.mlp_hidden) * e
    N = masked_frac * tokens
    rows = min(N, head_chunk) if head_chunk else N  # logits rows alive at once
    head = 4 * rows * lm.vocab_size * 4 + (2 * rows * lm.vocab_size if bf16 else 0)
    out["activations"], out["head"], out["optimizer step transient"] = acts, head, transient
    out["peak"] = out["parameters"] + out["optimizer"] + max(acts + head, out["gradients"] + transient)
    return out


def print_plan(preset, world, seq, batch, stage, parallel, gpu_gb=80.0, image=(640, 480)):
    print(f"preset {preset}, stage {stage}, {world} process(es), {parallel}, {batch} x {seq} tokens per process")
    mc, _ = counts(preset)
    tokens, crops = image_tokens(mc.vision, stage, image)
    print(f"  one {image[0]}x{image[1]} image: {tokens} visual tokens from {crops} crop(s) "
          f"({'square' if stage == 1 else 'anyres_max_4'}); {seq - tokens} tokens of the sequence left for text")
    if tokens > seq:
        print(f"  (the image alone is longer than --seq={seq}: training would cut through it)")
    rows = {}
    for ckpt in (False, True):
        rows[ckpt] = estimate(preset, world, seq, batch, stage, parallel, ckpt, bf16=True, image=image)
    print(f"  {'GiB per GPU':28s} {'no checkpointing':>18s} {'checkpointing':>15s}")
    for k in rows[False]:
        print(f"  {k:28s} {rows[False][k] / GB:18.1f} {rows[True][k] / GB:15.1f}")
    for ckpt in (False, True):
        gib = rows[ckpt]["peak"] / GB
        print(f"  -> checkpointing {'on ' if ckpt else 'off'}: {gib:.1f} GiB per GPU: "
              f"{'fits' if gib < 0.9 * gpu_gb else 'does NOT fit'} {world} x {gpu_gb:.0f} GB (10% kept for the allocator and NCCL)")


def print_lora_plan(preset, seq, rank, image=(640, 480), gpus=(24, 48, 80)):
    """Stage 3 with LoRA on ONE GPU: the frozen base in bf16, adapters + AdamW in fp32, activation
    checkpointing, the head in chunks of 512 (stage 3's options), one image of `image` pixels."""
    _, c = counts(preset, lora_rank=rank)
    print(f"preset {preset}, stage 3 with LoRA rank {rank} on q,k,v,o,gate,up,down: {c['lora'] / 1e6:.1f}M adapter "
          f"parameters ({100 * c['lora'] / c['total']:.2f}% of {c['total'] / 1e9:.2f}B), one GPU, checkpointing")
    plans = {L: estimate(preset, 1, L, 1, 3, "none", True, bf16=True, image=image, lora_rank=rank)
             for L in (2048, 4096, 8192, 16384, 32768)}
    for k, v in plans[seq if seq in plans else 8192].items():
        print(f"  {k:28s} {v / GB:8.2f} GiB   ({seq if seq in plans else 8192} tokens)")
    for gb in gpus:
        fits = [L for L, p in plans.items() if p["peak"] / GB < 0.9 * gb]
        print(f"  {gb:3d} GB GPU: 8192 tokens {'fit' if 8192 in fits else 'do NOT fit'}; the longest of "
              f"{'/'.join(str(L) for L in plans)} tokens that fits: {max(fits) if fits else 'none'} (10% kept free)")


# ----------------------------------------------------------------------------------------------
# Measurement on the CPU (fresh process per case)

def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set


def _measure_step(preset, batch, text_len, checkpointing, overrides, lora=0):
    """(runs in a child) one steady-state training step of `preset` in fp32 on the CPU -> bytes. lora > 0:
    rank-`lora` adapters on the LM's projections (model.add_lora), the base frozen, AdamW over the adapters."""
    import torch

    from diffusion import diffusion_loss, forward_process
    from cli import model_config
    from model import LLaDAV, add_lora
    from tokenizer import IMAGE_TOKEN_INDEX
    torch.manual_seed(0)
    mc = model_config(preset, overrides)
    model = LLaDAV(mc)
    model.llm.checkpointing = checkpointing
    if lora:
        add_lora(model, lora, 2.0 * lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    P = mc.vision.n_patches
    ids = torch.cat([torch.full((batch, P), IMAGE_TOKEN_INDEX), torch.randint(0, 500, (batch, text_len))], 1)
    labels = torch.cat([torch.full((batch, P), -100), ids[:, P:]], 1)
    pixels = torch.randn(batch, 3, mc.vision.image_size, mc.vision.image_size)
    xt, masked, p_mask = forward_process(ids, labels, 7, generator=torch.Generator().manual_seed(0))

    def step():
        loss = diffusion_loss(model(xt, pixels, output_positions=masked), labels, masked, p_mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: creates AdamW's state and pages in the code of every kernel (not training memory)
    gc.collect()
    resident = sum(p.nbytes for p in model.parameters()) + sum(
        t.nbytes for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    _reset_peak()
    rss0 = proc_status("VmRSS")
    step()  # the measured, steady-state step
    return {"peak": resident + proc_status("VmHWM") - rss0, "resident": resident, "masked": int(masked.sum()),
            "tokens": ids.numel()}


def _in_fresh_process(call: str) -> dict:
    """Run `plan.<call>` in a new one-thread Python process (its own peak-memory counter) -> its JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    r = subprocess.run([sys.executable, "-c", f"import json; from tools import plan; print(json.dumps(plan.{call}))"], env=env,
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(preset, batch, text_len, checkpointing=False, overrides=None, lora=0) -> dict:
    return _in_fresh_process(f"_measure_step({preset!r}, {batch}, {text_len}, {checkpointing}, {overrides or {}!r}, {lora})")


# LoRA's CPU check: the toy, and the 8B's widths (LLaDA-8B's d 4096, mlp 12288, the 126k vocabulary, the
# SigLIP tower's 1152) at reduced depth, 2 LM layers and 2 ViT layers (one built), in fp32 (~6 GiB)
LORA_CASES = [("toy", 8, 64, False, 4, None), ("toy", 8, 64, True, 4, None), ("llada_v_8b", 1, 64, True, 16, {"lm.n_layers": 2, "vision.n_layers": 2})]


def validate(cases=None, say=print) -> list:
    """Estimate vs measured peak for CPU fp32 steps of the toy and small presets. A case is (preset, batch,
    text tokens, checkpointing) or, with LoRA, (..., rank, model overrides) (LORA_CASES)."""
    from cli import model_config
    cases = cases or [("toy", 8, 64, False), ("toy", 8, 64, True), ("small", 1, 64, False), ("small", 1, 64, True)]
    out = []
    for preset, batch, text_len, ckpt, *more in cases:
        lora, over = (list(more) + [0, None])[:2]
        got = measure(preset, batch, text_len, ckpt, over, lora)
        P = model_config(preset, over).vision.n_patches
        e = estimate(preset, 1, P + text_len, batch, 2, "none", ckpt, bf16=False, overrides=over, lora_rank=lora,
                     masked_frac=got["masked"] / got["tokens"], foreach=True, head_chunk=0)
        est, err = e["peak"], e["peak"] / got["peak"] - 1
        # the step's own part, above the parameters and AdamW's state (which a frozen 8B base dominates)
        rise, rise_est = got["peak"] - got["resident"], est - e["parameters"] - e["optimizer"]
        say(f"{preset:6s} batch {batch} x {P + text_len} tokens, checkpointing {str(ckpt):5s}"
            f"{f', LoRA rank {lora}, {over or {}}' if lora else ''}: "
            f"estimate {est / 2**20:8.1f} MiB, measured {got['peak'] / 2**20:8.1f} MiB ({100 * err:+.1f}%); the step "
            f"above the weights and AdamW: {rise_est / 2**20:.1f} vs {rise / 2**20:.1f} MiB")
        out.append((preset, ckpt, est, got["peak"], err))
    return out


# ----------------------------------------------------------------------------------------------
# The output head: masked positions only vs the official full-sequence logits

def _head_loss_peak(tokens, vocab, d, n_masked, variant, chunk=512):
    """(runs in a child) peak bytes of the loss's forward + backward, from the final hidden states on.
    official: fp32 logits for every position (kept: the model returns them), loss at the masked rows;
    masked: the head at the masked rows only; chunked: that, `chunk` rows at a time (model.chunked_head_ce)."""
    import torch

    from model import chunked_head_ce
    torch.manual_seed(0)
    h = torch.randn(tokens, d, requires_grad=True)
    head = torch.nn.Linear(d, vocab, bias=False)
    masked = torch.zeros(tokens, dtype=torch.bool)
    masked[torch.randperm(tokens)[:n_masked]] = True
    target = torch.randint(0, vocab, (tokens,))
    def run(rows, chunk):
        if variant == "official":
            logits = head(h[rows]).float()  # (L, V), held until the step ends like the official model output
            ce = torch.nn.functional.cross_entropy(logits[masked[rows]], target[rows][masked[rows]], reduction="none")
        else:
            ce = chunked_head_ce(h[rows][masked[rows]], head, target[rows][masked[rows]], chunk if variant == "chunked" else 0)
        loss = ce.sum() / tokens
        loss.backward()
        return loss

    run(slice(0, 256), 2)  # warm-up on a few rows, chunked too: pages in the kernels' code (not loss memory)
    h.grad = head.weight.grad = None
    gc.collect()
    _reset_peak()
    base = proc_status("VmRSS")
    loss = run(slice(None), chunk)
    return {"peak": proc_status("VmHWM") - base, "loss": loss.item()}


def head_bench(tokens=8192, vocab=126464, d=256, fracs=(0.5, 0.25, 0.1), chunk=512, say=print):
    """-> rows (masked fraction, {variant: peak bytes}, {variant: loss})."""
    rows = []
    for f in fracs:
        n = int(f * tokens)
        peak, loss = {}, {}
        for v in ("official", "masked", "chunked"):
            res = _in_fresh_process(f"_head_loss_peak({tokens}, {vocab}, {d}, {n}, {v!r}, {chunk})")
            peak[v], loss[v] = res["peak"], res["loss"]
        say(f"{tokens} tokens, V={vocab}, {n} masked ({100 * f:.0f}%): official full-sequence head "
            f"{peak['official'] / GB:.2f} GiB | masked-only {peak['masked'] / GB:.2f} GiB "
            f"({peak['official'] / peak['masked']:.1f}x lower) | masked-only, chunks of {chunk} "
            f"{peak['chunked'] / GB:.2f} GiB ({peak['official'] / peak['chunked']:.1f}x lower) | loss "
            f"{loss['official']:.7f} / {loss['masked']:.7f} / {loss['chunked']:.7f}")
        rows.append((f, peak, loss))
    return rows


# ----------------------------------------------------------------------------------------------
# Command line (cli.parse_config: --key=value, the comment after each field is its --help)

@dataclass
class PlanConfig:
    preset: str = opt("llada_v_8b", choices=tuple(PRESETS))  # the model to plan for
    world: int = opt(8, min=1)                     # processes (GPUs) in all
    seq: int = opt(8192, min=1)                    # tokens per sequence, image tokens included
    batch: int = opt(1, min=1)                     # micro-batch per process
    stage: int = opt(2, choices=(1, 2, 3))         # LLaDA-V stage: 1 trains the projector only
    parallel: str = opt("fsdp", choices=("fsdp", "ddp", "none"))  # how the processes share the model
    gpu_gb: float = opt(80.0, gt=0)                # memory of one GPU, in GB
    image: str = "640x480"                         # WxH of a typical training image (sets the crops and visual tokens)
    validate: bool = False                         # compare with measured CPU peaks (toy, small) instead
    head: bool = False                             # measure the masked-only vs full output head instead
    lora_rank: int = opt(0, min=0)                 # > 0: stage 3 with LoRA of this rank on one GPU (24, 48, 80 GB);
                                                   # with --validate=1: LoRA's CPU check (LORA_CASES) instead

    def check(self):
        try:
            size = tuple(int(v) for v in self.image.lower().split("x"))
        except ValueError:
            size = ()
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"--image={self.image!r}: give the image size as WxH, e.g. 640x480")
        self.image_size = size


def main(argv):
    pc = parse_config(PlanConfig, argv, __doc__)
    if pc.validate:
        validate(LORA_CASES if pc.lora_rank else None)
    elif pc.lora_rank:
        print_lora_plan(pc.preset, pc.seq, pc.lora_rank, pc.image_size)
    elif pc.head:
        head_bench()
    else:
        print_plan(pc.preset, pc.world, pc.seq, pc.batch, pc.stage, pc.parallel, pc.gpu_gb, pc.image_size)


if __name__ == "__main__":
    run_cli(main)  # a bad option: one line, no traceback (LLADA_DEBUG=1 shows it)
