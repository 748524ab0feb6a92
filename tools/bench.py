"""
Benchmark: training-step throughput and FLOP utilisation, and sampling latency, tokens/s, model calls
(NFE) and memory for every decoding mode (exact, prefix / dual KV cache, confidence threshold, and their
combinations; diffusion.py). Prints a table.

Where this sits in the flow: it times the whole pipeline, image -> ViT -> projector -> LLaDA -> loss
(one optimiser step), and the reverse process that answers from the same visual tokens.

Utilisation is the one MFU of this project, as train.py logs it:
    MFU = (FLOPs per step / seconds per step) / peak,
with the FLOPs of model.step_flops (tests/test_model.py holds them to torch's FLOP counter) and the peak of
cli.device_peak: on a CPU the best fp32 matmul rate measured in this same process (so the figure says how
close the step gets to what this machine's matmul can do), on a GPU the vendor's dense bf16 peak (unknown
GPUs fall back to a measured bf16 matmul). The single-layer bench counts its FLOPs with FlopCounterMode.

    python -m tools.bench                                   # toy preset, random weights, CPU or GPU
    python -m tools.bench --checkpoint=out/ckpt.pt          # a trained model (threshold decoding needs one:
                                                      # random weights are never confident)
    python -m tools.bench --preset=small --device=cuda      # any preset; --key=value overrides (see --help)
    python -m tools.bench --preset=llada_v_8b --lm.n_layers=2    # --lm.* / --vision.* change the preset's model
    python -m tools.bench --preset=llada_v_8b --layer_only=1 --seq_len=8192 --train_batch=1   # one LLaDA block,
        bf16: forward + backward ms, TFLOP/s and MFU (FLOPs counted as above), peak memory on a GPU
    python -m tools.bench --official=1 --lm.d_model=512 --lm.n_layers=4 --vision.n_layers=2 --repeats=1
        the official path's decoding (main_official): LLaDA-V's shape with the real 126,464-token vocabulary,
        random weights, a 640x480 image in anyres_max_4 (2,929 visual tokens) and a short random question,
        LLaDA-V's sampler options; exact against each fast mode. Without overrides: the full 8B (a GPU).
    python -m tools.bench --vs_official=1 --lm.d_model=512 --lm.n_layers=6 --lm.n_heads=8 --lm.mlp_hidden=1536 \
        --text_len=256 --gen_length=64 --block_length=32 --steps=64 --repeats=3 [--baseline=old/diffusion.py]
        the text sampler (main_vs_official): diffusion.generate against a transcription of the official
        generate.py, side by side on a bare LLaDA with the real vocabulary (docs/performance.md)
Training inputs are random token ids with one image's placeholders and random pixels; sampling uses
held-out synthetic questions where the tokenizer exists (toy) and random ids otherwise, so the `small`
preset runs without the official tokenizer.
"""
import resource
import sys
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from checkpoint import load_checkpoint
from data import default_system, prompt_batch
from diffusion import LLADA_V_BANNED, MODES, check_schedule, diffusion_loss, forward_process, generate, mode_kwargs
from cli import autocast, device_peak, model_config, opt, parse_config, pick_device, run_cli
from model import PRESETS, Block, LLaDAV, rope_cos_sin, step_flops
from synthetic import SyntheticVQA, toy_tokenizer
from tokenizer import IMAGE_TOKEN_INDEX, get_tokenizer
from vision import preprocess

@dataclass
class BenchConfig:
    # The options, --key=value (cli.parse_config; the comments are --help), plus the preset's --lm.* / --vision.*
    preset: str = opt("toy", choices=tuple(PRESETS))  # random weights of this preset ...
    checkpoint: str = opt("", path="file")     # ... or a trained checkpoint (its config wins over --preset)
    device: str = opt("auto", device=True)     # auto = cuda > mps > cpu
    seed: int = opt(0, min=0)                  # random inputs and weights
    train_batch: int = opt(32, min=1)          # sequences per training step
    train_steps: int = opt(10, min=1)          # timed steps (after 2 warm-up steps)
    text_len: int = opt(24, min=0)             # prompt text tokens besides the image's visual tokens
    gen_length: int = opt(16, min=1)           # answer canvas
    block_length: int = opt(8, min=1)          # semi-autoregressive blocks (caches refresh at each block start)
    steps: int = opt(16, min=1)                # exact sampler steps
    threshold: float = opt(0.9, min=0)         # confidence threshold of the threshold modes
    sample_batch: int = opt(1, min=1)          # prompts decoded together
    repeats: int = opt(5, min=1)               # timed sampling runs per mode (median reported)
    modes: str = opt(",".join(MODES), each=tuple(MODES))  # decoding modes to time, the first is the reference
    skip_train: bool = False                   # sampling only
    layer_only: bool = False                   # time one LLaDA block (bf16) instead: forward + backward of ...
    seq_len: int = opt(2048, min=1)            # ... train_batch x seq_len tokens
    official: bool = False                     # time the official LLaDA-V path's decoding with a long visual prompt instead
    vs_official: bool = False                  # time diffusion.generate against the official generate.py's algorithm
    baseline: str = opt("", path="file")       # with vs_official: another diffusion.py whose generate is timed too

    def check(self):
        """The sampler's block schedule must divide evenly (checked before any model is built)."""
        check_schedule(self.gen_length, self.block_length, self.steps, "--")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fake_batch(cfg, B, bc, device, gen=None):
    """Random ids: [visual placeholders, text_len text tokens, gen_length answer tokens]; labels on the answer."""
    N, V = cfg.vision.n_patches, cfg.lm.vocab_size
    text = torch.randint(0, V - 8, (B, bc.text_len), generator=gen)
    ans = torch.randint(0, V - 8, (B, bc.gen_length), generator=gen)
    ids = torch.cat([torch.full((B, N), IMAGE_TOKEN_INDEX), text, ans], 1)
    labels = torch.cat([torch.full((B, N + bc.text_len), -100), ans], 1)
    pixels = torch.rand(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen) * 2 - 1
    return ids.to(device), labels.to(device), pixels.to(device)


def bench_train(model, bc, device, peak):
    cfg = model.cfg
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(bc.seed)
    ids, labels, pixels = fake_batch(cfg, bc.train_batch, bc, device, g)
    mask_id = cfg.lm.vocab_size - 1

    def step():
        xt, masked, p_mask = forward_process(ids, labels, mask_id)
        with autocast(device):
            logits = model(xt, pixels, output_positions=masked)
        loss = diffusion_loss(logits, labels, masked, p_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    model.train()
    step()  # two warm-up steps (the optimizer's state is created in the first)
    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(bc.train_steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / bc.train_steps
    model.eval()
    tokens = ids.numel()
    mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    # forward_process masks about half the answer tokens; the head runs at those rows only
    flops = step_flops(cfg, tokens, ids.shape[1], int((labels != -100).sum()) // 2, bc.train_batch, True, True, True)
    return dict(seconds=dt, tokens=tokens, flops=flops, mfu=flops / dt / peak, mem=mem)


def bench_layer(lm, bc, device):
    """One LLaDA block, bf16 weights: forward + backward of a random bf16 (train_batch, seq_len, d_model) input
    and a random output gradient. FLOPs counted on a first step, then a warm-up and the mean of train_steps.
    CUDA memory: allocated before a step (weights, input, output gradient) and the peak during the steps."""
    torch.manual_seed(bc.seed)
    block, (B, L, d) = Block(lm).to(device, torch.bfloat16), (bc.train_batch, bc.seq_len, lm.d_model)
    x = torch.randn(B, L, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    cos, sin = rope_cos_sin(L, d // lm.n_heads, lm.rope_theta, device)
    cuda, params = device.type == "cuda", list(block.parameters())

    def step():  # the input's and every weight's gradient are dropped after each step
        block(x, cos, sin, None).backward(dy)
        for t in [x] + params:
            t.grad = None
    with FlopCounterMode(display=False) as fc:
        step()
    step()
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    static, t0 = torch.cuda.memory_allocated(device) if cuda else None, time.perf_counter()
    for _ in range(bc.train_steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / bc.train_steps
    n_matrix = sum(p.numel() for p in params if p.dim() == 2)
    return dict(seconds=dt, tokens=B * L, flops=fc.get_total_flops(), params=sum(p.numel() for p in params),
                analytic=6 * n_matrix * B * L + 12 * B * L * L * d, static=static,
                mem=torch.cuda.max_memory_allocated(device) if cuda else None)


def sampling_inputs(model, bc, device):
    """(prompt ids, attention mask, pixels, mask/eos/eot ids). The toy model gets real held-out synthetic
    questions (a trained model is confident only on its own kind of input); a preset whose tokenizer is
    not available gets random ids, with the last three vocabulary ids standing in for mask / EOS / EoT."""
    cfg = model.cfg
    try:
        tok = toy_tokenizer() if cfg.tokenizer == "toy" else get_tokenizer(cfg.tokenizer)
    except ValueError:
        V = cfg.lm.vocab_size
        ids, _, pixels = fake_batch(cfg, bc.sample_batch, bc, device, torch.Generator().manual_seed(bc.seed + 1))
        return ids[:, :-bc.gen_length], None, pixels, (V - 1, V - 2, V - 3)
    samples = SyntheticVQA(tok, cfg.vision.image_size, cfg.vision.n_patches, bc.gen_length).heldout(bc.sample_batch)
    ids, attn = prompt_batch(tok, [q for _, q, _, _ in samples], cfg.vision.n_patches, default_system(cfg.tokenizer))
    pixels = torch.stack([preprocess(img, cfg.vision.image_size) for img, *_ in samples])
    return ids.to(device), attn.to(device), pixels.to(device), (tok.mask_id, tok.eos_id, tok.eot_id)


@torch.no_grad()
def bench_sampling(model, bc, device):
    prompt, attn, pixels, (mask_id, eos_id, eot_id) = sampling_inputs(model, bc, device)
    with autocast(device):
        feats = model.encode_images(pixels)
    kw = dict(steps=bc.steps, gen_length=bc.gen_length, block_length=bc.block_length, mask_id=mask_id,
              eos_id=eos_id, eot_id=eot_id, image_features=feats, attention_mask=attn)
    rows, ref = [], None
    for mode in bc.modes.split(","):
        fk = mode_kwargs(mode, bc.threshold)

        def run():
            st = {}
            with autocast(device):
                out = generate(model, prompt, stats=st, **fk, **kw)
            sync(device)
            return out, st
        out, st = run()  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(bc.repeats):
            t0 = time.perf_counter()
            out, st = run()
            times.append(time.perf_counter() - t0)
        lat = sorted(times)[len(times) // 2]
        ans = out[:, -bc.gen_length:]
        ref = ans if ref is None else ref
        rows.append(dict(mode=mode, latency=lat, tps=bc.sample_batch * bc.gen_length / lat, nfe=st["nfe"],
                         full=st["full_nfe"], cache=st["cache_bytes"],
                         agree=float((ans == ref).float().mean()),
                         mem=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None))
    return rows


@torch.no_grad()
def main_official(bc, overrides, device):
    """The official path's decoding with a long visual prompt (issue 15, item 6). The llada_v_8b preset (the
    real 126,464-token vocabulary, so the real special ids: [MASK] 126336, <|eot_id|> 126348) with the
    --lm.* / --vision.* overrides, random weights, images in anyres_max_4 with spatial_unpad; one 640x480
    image -> 5 crops -> 2,929 visual tokens, encoded once (timed apart). The prompt is a few random text ids,
    the visual tokens and text_len random question ids; sample_batch copies decode together (each its own
    question). Every mode runs diffusion.generate with LLaDA-V's options (banned ids, <|eot_id|> stop) as
    sample.py's official path does. Random weights are never confident: the threshold modes then reveal
    one token per step, and what the table shows of them is the caches' cost per call.
    Prints a markdown table: wall time (median of `repeats`), model calls (full passes), speed-up, tokens
    equal to the exact answer's. CUDA: bf16 weights; CPU: fp32."""
    from PIL import Image
    from vision import process_image
    cfg = model_config("llada_v_8b", overrides)
    cfg.image_aspect_ratio, cfg.mm_patch_merge_type = "anyres_max_4", "spatial_unpad"
    with torch.device(device):  # built on the device: a full-size random 8B is initialised there, not on the CPU
        model = LLaDAV(cfg)
        model.init_weights()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.eval()
    g = torch.Generator().manual_seed(bc.seed)
    img = Image.fromarray((torch.rand(480, 640, 3, generator=g) * 255).byte().numpy())
    sync(device)
    t0 = time.perf_counter()
    crops, size = process_image(img, cfg.image_aspect_ratio, cfg.vision.image_size)
    feats = model.encode_image_crops(crops.to(device, next(model.parameters()).dtype), size)  # (N, d)
    sync(device)
    t_img, N, B = time.perf_counter() - t0, feats.shape[0], bc.sample_batch
    text = lambda n: torch.randint(0, 126080, (B, n), generator=g)  # ordinary (non-special) ids
    prompt = torch.cat([text(6), torch.full((B, N), IMAGE_TOKEN_INDEX), text(bc.text_len)], 1).to(device)
    kw = dict(steps=bc.steps, gen_length=bc.gen_length, block_length=bc.block_length, mask_id=126336,
              banned_ids=LLADA_V_BANNED, stop_sequences=[[126348]], image_features=feats.repeat(B, 1))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"official path, random weights: {n_params / 1e6:,.1f}M parameters ({cfg.lm.n_layers} layers, d_model "
          f"{cfg.lm.d_model}, vocabulary {cfg.lm.vocab_size:,}; vision {cfg.vision.n_layers} layers) on {device}, "
          f"{next(model.parameters()).dtype}, {torch.get_num_threads()} CPU threads\n"
          f"one 640x480 image, anyres_max_4: {crops.shape[0]} crops -> {N:,} visual tokens (encoded once in "
          f"{t_img:.2f} s); prompt {prompt.shape[1]:,} tokens x batch {B}; gen_length {bc.gen_length}, block_length "
          f"{bc.block_length}, exact steps {bc.steps}, threshold {bc.threshold}; median of {bc.repeats}\n")
    rows, ref = [], None
    for mode in bc.modes.split(","):
        times = []
        for _ in range(bc.repeats):
            st = {}
            sync(device)
            t0 = time.perf_counter()
            out = generate(model, prompt, stats=st, **mode_kwargs(mode, bc.threshold), **kw)
            sync(device)
            times.append(time.perf_counter() - t0)
        ref = out if ref is None else ref
        same = sum(a == b for o, r in zip(out, ref) for a, b in zip(o, r))
        rows.append(dict(mode=mode, t=sorted(times)[len(times) // 2], nfe=st["nfe"], full=st["full_nfe"],
                         same=same / max(1, sum(max(len(o), len(r)) for o, r in zip(out, ref)))))
    print("| mode | wall time | tokens/s | model calls (full passes) | speed-up vs first | tokens equal to first |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['t']:.2f} s | {B * bc.gen_length / r['t']:,.1f} | {r['nfe']} ({r['full']}) | "
              f"{rows[0]['t'] / r['t']:.2f}x | {100 * r['same']:.0f}% |")


# ----------------------------------------------------------------------------------------------
# diffusion.generate against the official generate.py's algorithm (issue 25)

def official_generate(model, prompt, steps, gen_length, block_length, temperature=0.0, mask_id=126336):
    """The official LLaDA generate.py (ML-GSAI/LLaDA, function `generate`), its plain path transcribed (no CFG,
    low-confidence remasking, batch 1): every step runs the model on the whole sequence and takes logits,
    Gumbel noise, softmax and confidence at every position, prompt included."""
    P = prompt.shape[1]
    x = torch.cat([prompt, torch.full((1, gen_length), mask_id, dtype=torch.long, device=prompt.device)], 1)
    num_blocks, steps = gen_length // block_length, steps // (gen_length // block_length)
    for nb in range(num_blocks):
        block_mask = x[:, P + nb * block_length:P + (nb + 1) * block_length] == mask_id
        m = int(block_mask.sum())
        num_transfer = [m // steps + (i < m % steps) for i in range(steps)]  # the even schedule
        for i in range(steps):
            mask_index = x == mask_id
            logits = model(x)                                                    # (1, L, V)
            if temperature > 0:  # Gumbel-max in float64
                noise = torch.rand_like(logits, dtype=torch.float64)
                x0 = torch.argmax(logits.double().exp() / (-torch.log(noise)) ** temperature, -1)
            else:
                x0 = torch.argmax(logits, -1)
            p = torch.softmax(logits, -1)
            x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)                # (1, L)
            x0_p[:, P + (nb + 1) * block_length:] = -torch.inf                   # not past the block
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            transfer[0, torch.topk(confidence[0], k=num_transfer[i]).indices] = True
            x[transfer] = x0[transfer]
    return x


@torch.no_grad()
def main_vs_official(bc, overrides, device):
    """diffusion.generate in its official mode against official_generate (above), side by side on a bare LLaDA
    of the llada_v_8b preset's shape (so the real 126,464-token vocabulary) narrowed by --lm.*, random weights,
    a prompt of text_len random ids, batch 1. --baseline=<a diffusion.py> times that file's generate too (an
    older version: before / after in one run). Prints wall time (median of `repeats`, the samplers taking turns)
    and whether each gives the official tokens."""
    import importlib.util
    from model import LLaDA
    cfg = model_config("llada_v_8b", overrides).lm
    with torch.device(device):
        llm = LLaDA(cfg)
        llm.init_weights()
    llm.eval()
    model = lambda x, attention_mask=None, **kw: llm(llm.embed_tokens(x), attention_mask, **kw)  # noqa: E731
    g = torch.Generator().manual_seed(bc.seed)
    prompt = torch.randint(0, 126080, (1, bc.text_len), generator=g).to(device)  # ordinary (non-special) ids
    kw = dict(steps=bc.steps, gen_length=bc.gen_length, block_length=bc.block_length)
    samplers = [("official generate.py (transcribed)", lambda: official_generate(model, prompt, **kw))]
    if bc.baseline:
        spec = importlib.util.spec_from_file_location("diffusion_baseline", bc.baseline)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        samplers.append((f"generate of {bc.baseline}", lambda: old.generate(model, prompt, **kw)))
    samplers.append(("diffusion.generate", lambda: generate(model, prompt, **kw)))
    n_params = sum(p.numel() for p in llm.parameters())
    print(f"text sampler vs the official generate.py, random weights: {n_params / 1e6:,.1f}M parameters ({cfg.n_layers} "
          f"layers, d_model {cfg.d_model}, vocabulary {cfg.vocab_size:,}) on {device}, {torch.get_num_threads()} CPU "
          f"threads; prompt {bc.text_len} tokens, gen_length {bc.gen_length}, block_length {bc.block_length}, steps "
          f"{bc.steps}, T = 0; median of {bc.repeats}\n")
    model(prompt)  # warm-up
    times, outs = {name: [] for name, _ in samplers}, {}
    for _ in range(bc.repeats):
        for name, run in samplers:
            sync(device)
            t0 = time.perf_counter()
            outs[name] = run()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    first = samplers[0][0]
    print("| sampler | wall time | speed-up vs official | same tokens as official |")
    print("|---|---|---|---|")
    for name, _ in samplers:
        t, t_ref = sorted(times[name])[bc.repeats // 2], sorted(times[first])[bc.repeats // 2]
        print(f"| {name} | {t:.2f} s | {t_ref / t:.2f}x | {'yes' if torch.equal(outs[name], outs[first]) else 'NO'} |")

def main_layer(bc, overrides, device):
    lm, (peak, peak_src) = model_config(bc.preset, overrides).lm, device_peak(device)
    r = bench_layer(lm, bc, device)
    print(f"one LLaDA block of preset {bc.preset} (d_model {lm.d_model}, {lm.n_heads} heads, mlp_hidden {lm.mlp_hidden}): "
          f"{r['params'] / 1e6:.2f}M parameters, bf16, on {device}; forward + backward of ({bc.train_batch}, "
          f"{bc.seq_len}, {lm.d_model}), mean of {bc.train_steps} after a warm-up:")
    print(f"  {r['seconds'] * 1e3:.2f} ms | {r['tokens'] / r['seconds']:,.0f} tokens/s | {r['flops'] / 1e9:,.2f} GFLOP "
          f"(counted; 6 x params x tokens + 12 B L^2 d = {r['analytic'] / 1e9:,.2f}) | {r['flops'] / r['seconds'] / 1e12:.2f}"
          f" TFLOP/s | MFU {100 * r['flops'] / r['seconds'] / peak:.1f}% of {peak / 1e12:,.2f} TFLOP/s ({peak_src})"
          + (f"\n  peak memory {r['mem'] / 2**20:,.0f} MiB = {r['static'] / 2**20:,.0f} MiB before the step (weights, input, "
             f"output gradient) + {(r['mem'] - r['static']) / 2**20:,.0f} MiB during it" if r["mem"] is not None else ""))


def main(argv):
    bc, overrides = parse_config(BenchConfig, argv, __doc__, model=True)  # every option checked, before any work
    if (overrides or bc.layer_only or bc.official or bc.vs_official) and bc.checkpoint:
        sys.exit("--lm.*, --vision.*, --layer_only=1, --official=1 and --vs_official=1 apply to a random-weight model; "
                 "drop --checkpoint")
    device = pick_device(bc.device)
    torch.manual_seed(bc.seed)
    if bc.layer_only:
        return main_layer(bc, overrides, device)
    if bc.vs_official:
        return main_vs_official(bc, overrides, device)
    if bc.official:  # (the block schedule was checked with the options, BenchConfig.check)
        return main_official(bc, overrides, device)
    if bc.checkpoint:
        try:
            model, _, _ = load_checkpoint(bc.checkpoint, device)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(str(e))
        source = bc.checkpoint
    else:
        model = LLaDAV(model_config(bc.preset, overrides)).to(device)
        model.init_weights()
        source = f"preset {bc.preset}, random weights"
    n_params = sum(p.numel() for p in model.parameters())
    L = model.cfg.vision.n_patches + bc.text_len + bc.gen_length
    print(f"{source}: {n_params / 1e6:.2f}M parameters on {device} ({torch.get_num_threads()} CPU threads), "
          f"training sequences of {L} tokens ({model.cfg.vision.n_patches} visual + {bc.text_len} text + {bc.gen_length} answer)")
    if not bc.skip_train:
        peak, peak_src = device_peak(device)
        tr = bench_train(model, bc, device, peak)
        print(f"\ntraining step (batch {bc.train_batch}, mean of {bc.train_steps}):")
        print(f"  {tr['seconds'] * 1e3:.1f} ms/step | {tr['tokens'] / tr['seconds']:,.0f} tokens/s | "
              f"{tr['flops'] / 1e9:.2f} GFLOP/step (model.step_flops) | {tr['flops'] / tr['seconds'] / 1e9:.1f} GFLOP/s | "
              f"MFU {100 * tr['mfu']:.1f}% of {peak / 1e9:,.1f} GFLOP/s ({peak_src})"
              + (f" | peak memory {tr['mem'] / 2**20:,.0f} MiB" if tr["mem"] is not None else ""))
    print(f"\nsampling (batch {bc.sample_batch}, gen_length {bc.gen_length}, block_length {bc.block_length}, "
          f"exact steps {bc.steps}, threshold {bc.threshold}; median of {bc.repeats}):")
    try:
        rows = bench_sampling(model, bc, device)
    except ValueError as e:
        sys.exit(str(e))
    ex = rows[0]
    print("| mode | latency | tokens/s | model calls (full passes) | speed-up vs first | KV cache | "
          "same tokens as first |" + (" peak memory |" if device.type == "cuda" else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if device.type == "cuda" else ""))
    for r in rows:
        print(f"| {r['mode']} | {r['latency'] * 1e3:.1f} ms | {r['tps']:,.1f} | {r['nfe']} ({r['full']}) | "
              f"{ex['latency'] / r['latency']:.2f}x | {r['cache'] / 2**20:.2f} MiB | {100 * r['agree']:.0f}% |"
              + (f" {r['mem'] / 2**20:,.0f} MiB |" if r["mem"] is not None else ""))
    print(f"\nprocess peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    run_cli(main)  # a bad option or file: one line, no traceback (LLADA_DEBUG=1 shows it)
