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
"""
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from checkpoint import load_state, load_state_file, save_checkpoint, write_text
from data import default_system
from diffusion import diffusion_loss, forward_process
from distributed import autocast, pick_device
from model import PRESETS, LLaDAV, count_params, device_peak, model_config, opt, parse_config, run_cli, step_flops
from sample import evaluate, format_eval
from synthetic import SyntheticVQA, parse_kind_weights, toy_tokenizer
from tokenizer import IMAGE_TOKEN_INDEX, get_tokenizer
from vision import preprocess


@dataclass
class TrainConfig:
    # Every field is an option, --key=value; opt(default, rule) declares what the option accepts (model.py,
    # "Configuration from the command line"), and the comment after a field is its --help text.
    preset: str = opt("toy", choices=tuple(PRESETS))  # model preset (see model.py)
    out_dir: str = opt("out", out="dir")              # checkpoint (ckpt.pt) and final report (report.json) go here
    tokenizer: str = opt("", path="any", also=("toy",))  # presets with the official vocabulary: a tokenizer.json
                                                         # or a model dir holding one
    resume: bool = False                              # continue from out_dir/ckpt.pt
    device: str = opt("auto", device=True)            # auto = cuda > mps > cpu
    seed: int = opt(0, min=0)                         # the data, the masks and the initial weights
    batch_size: int = opt(32, min=1)                  # sequences per step
    max_steps: int = opt(5500, min=1)                 # optimizer steps
    lr: float = opt(1.5e-3, gt=0)                     # peak learning rate of the language model; lower it (e.g.
                                                      # 1e-4) for big models
    vision_lr_scale: float = opt(0.2, min=0)     # vision tower lr = lr * this (LLaDA-V: 2e-6 / 1e-5 = 0.2; 0
                                                 # freezes it). From scratch it matters too: until the language model
                                                 # reads the image, the vision path's gradient is noise, Adam turns
                                                 # noise into full-size steps, and at the full lr its features blow
                                                 # up and stall
    projector_lr_scale: float = opt(0.2, min=0)  # projector lr = lr * this
    min_lr: float = opt(1e-4, min=0)             # cosine decays to this (at most lr)
    warmup_steps: int = opt(100, min=0)          # linear warmup from 0 to lr
    weight_decay: float = opt(0.0, min=0)        # LLaDA-V uses 0
    beta2: float = opt(0.95, min=0, lt=1)        # AdamW beta2. LLaDA-V's recipe has 0.999; with small batches the
                                                 # 1/t-weighted loss has rare huge gradients, and 0.95 recovers from
                                                 # them far faster
    stratified_t: bool = True    # spread the batch's t evenly over (0, 1) (same expected loss, less variance)
    exact_count: bool = False    # mask exactly l ~ U{1..A} answer tokens (LLaDA Eq. 6: the same bound, weights <= A)
    weighting: str = opt("elbo", choices=("elbo", "none"))    # elbo: CE / p_mask (the likelihood bound) | none:
                                                              # plain CE ("L_simple")
    grad_clip: float = opt(1.0, gt=0)                         # clip the gradient's global norm to this
    loss_mode: str = opt("sft", choices=("sft", "pretrain"))  # sft (per-sample answer-length normaliser) |
                                                              # pretrain (1 / (B L))
    single_object_steps: int = opt(500, min=0)  # curriculum: the first N steps show one object and ask
                                                # colour/shape/describe
    kind_weights_from: int = opt(2500, min=0)   # curriculum: from this step on (once past single_object_steps),
                                                # draw the kinds with kind_weights (before it: equal shares)
    kind_weights: str = "color:0.5,shape:1,count:0.5,relation:2,describe:1"  # kind:weight pairs
    gen_length: int = opt(12, min=1)    # answer canvas G, in tokens (training and sampling): the toy's longest
                                        # answer, 4 objects described, is 11 tokens + <|eot_id|>
    block_length: int = opt(12, min=1)  # sampler block length (semi-autoregressive if < gen_length)
    sample_steps: int = opt(12, min=1)  # sampler steps
    log_every: int = opt(25, min=1)     # print (and --jsonl) a log line every N steps
    eval_every: int = opt(1000, min=0)  # quick held-out check (eval_quick questions) every N steps; 0 = never
    eval_quick: int = opt(100, min=0)   # questions per quick check; 0 = no quick checks
    eval_final: int = opt(500, min=0)   # held-out questions in the final report; 0 = no report
    ckpt_every: int = opt(250, min=1)   # atomic checkpoint every N steps (and at the end)
    compile: bool = False               # torch.compile the model (CUDA)
    # --- training at scale: LLaVA-format data, stages, torchrun (see README "Training at scale") ---
    stage: int = opt(0, choices=(0, 1, 2, 3))  # 0 = the toy recipe above; 1 | 2 | 3 = LLaDA-V's stage presets
                                               # (STAGES): their values first, explicit options override them
    data: str = opt("", path="file")           # LLaVA-format .json / .jsonl; empty = the embedded synthetic data
    image_root: str = opt("", path="dir")      # folder the records' "image" paths are relative to
    data_format: str = opt("conv", choices=("plain", "conv"))  # plain (stage-1 "<image>caption") | conv
                                                               # (multi-turn conversations)
    max_len: int = opt(8192, min=1)  # tokens per sequence, image tokens included (longer samples are cut)
    unignore_special: bool = True    # LLaDA-V: prompt BOS/header/eot tokens are targets too (REFERENCE 3.3)
    pad_labels: bool = True          # padding EOS are targets (LLaDA-V's collator); 0: ignored
    key_pad_mask: str = opt("auto", choices=("auto", "on", "off"))  # hide padding from attention: on | off |
                                     # auto = off with --data (LLaDA-V's collator sends no attention mask: every
                                     # token attends to the EOS padding, REFERENCE 11.9), on for the toy's
                                     # synthetic batches (this project's recipe)
    group_by_length: bool = True     # --data: batches of similar length (stages 2-3) | 0: random (stage 1)
    truncation: str = opt("official", choices=("official", "whole_images"))  # official: the max_len cut may
                                     # split an image (REFERENCE 11.12) | whole_images: never
    image_aspect_ratio: str = opt("", choices=("", "square", "pad", "anyres_max_4"))  # the model's image mode;
                                     # "" = the preset's (the stage presets set anyres_max_4 for stages 2-3)
    mm_patch_merge_type: str = opt("", choices=("", "flat", "spatial_unpad"))  # spatial_unpad adds the
                                     # trainable image_newline; "" = the preset's
    workers: int = opt(2, min=0)     # DataLoader worker processes for --data
    max_bad_frac: float = opt(0.1, min=0, max=1)  # stop when more than this fraction of samples is broken
    epochs: float = opt(0.0, min=0)               # > 0 with --data: max_steps = epochs * (records / batch_size)
    warmup_ratio: float = opt(0.0, min=0, max=1)  # > 0: warmup_steps = warmup_ratio * max_steps (LLaDA-V: 0.03)
    llm_lr_scale: float = opt(1.0, min=0)         # language model lr = lr * this (0 freezes it, as stage 1 does)
    micro_batch_size: int = opt(0, min=0)         # sequences per process per forward; 0 = batch_size / processes.
                                                  # batch_size / (processes * micro) steps of gradient accumulation
    parallel: str = opt("auto", choices=("none", "ddp", "fsdp", "auto"))  # auto: ddp under 1B parameters, else fsdp
    checkpointing: bool = False  # recompute each LLM block in backward: much less activation memory
    ckpt_format: str = opt("auto", choices=("pt", "dcp", "auto"))  # pt (out_dir/ckpt.pt) | dcp (out_dir/dcp/,
                                 # resumes on any number of processes) | auto (dcp under torchrun or with --data)
    init_from: str = opt("", path="any")  # start from these weights (a ckpt.pt, model.safetensors or a Hugging Face
                                           # directory such as the official LLaDA-V), e.g. stage 1's
    init_parts: str = opt("all", each=("all", "llm", "vision", "projector"))  # which of them: all, or a comma list
    jsonl: str = opt("", out="file")  # append one JSON line per logged step here (and draw loss.png beside it)
    final_eval: bool = True           # held-out report at the end (synthetic data, one process or DDP)
    head_chunk: int = opt(0, min=0)   # > 0: output head + loss on this many masked rows at a time, recomputed in
                                      # backward (model.chunked_head_ce): the loss's memory no longer grows with N x V

    def check(self):
        """The rules that tie options together, checked with the others before any work (model.parse_config)."""
        if self.gen_length % self.block_length or self.sample_steps % (self.gen_length // self.block_length):
            raise ValueError(f"--gen_length={self.gen_length} must be divisible by --block_length={self.block_length}, "
                             f"and --sample_steps={self.sample_steps} by the number of blocks; fix the three options")
        if self.min_lr > self.lr:
            raise ValueError(f"--min_lr={self.min_lr} is above --lr={self.lr}: the cosine would raise the learning "
                             f"rate; lower --min_lr")
        world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun; the same test train() makes
        micro = self.micro_batch_size or self.batch_size // world
        if micro < 1 or self.batch_size % (micro * world):
            raise ValueError(f"--batch_size={self.batch_size} must be a multiple of --micro_batch_size={micro} x "
                             f"{world} processes; change --batch_size or --micro_batch_size")
        if "all" in self.init_parts.split(",") and self.init_parts != "all":
            raise ValueError(f"--init_parts={self.init_parts}: use all, or a comma list of llm, vision, projector")
        if self.ckpt_format == "pt" and self.parallel == "fsdp":
            raise ValueError("--ckpt_format=pt cannot save FSDP2's sharded weights; use --ckpt_format=dcp or auto")
        try:
            parse_kind_weights(self.kind_weights) if self.kind_weights else None
        except ValueError as e:
            raise ValueError(f"--kind_weights: {e}") from None


# LLaDA-V's recipe (REFERENCE 7): AdamW (0.9, 0.999), weight decay 0, 3% warmup, cosine to 0, clip 1.0,
# one epoch; the global batch is reached with gradient accumulation. Stage 1 trains the projector only.
_COMMON = dict(beta2=0.999, weight_decay=0.0, min_lr=0.0, warmup_ratio=0.03, grad_clip=1.0, epochs=1.0,
               stratified_t=False, exact_count=False, weighting="elbo", loss_mode="sft", max_len=8192, head_chunk=512)
# Stage 1: square 384 images (729 tokens), 16 random captions per GPU. Stages 2-3: anyres_max_4 images with
# spatial_unpad (base + crops, a trainable image_newline per row), one sample per GPU and per micro-batch
# (never padded), batches grouped by length (REFERENCE 7, 11.8, 11.10).
_LATER = dict(_COMMON, lr=1e-5, llm_lr_scale=1.0, vision_lr_scale=0.2, projector_lr_scale=1.0, batch_size=256,
              data_format="conv", checkpointing=True, micro_batch_size=1, group_by_length=True,
              image_aspect_ratio="anyres_max_4", mm_patch_merge_type="spatial_unpad")
STAGES = {
    1: dict(_COMMON, lr=1e-3, llm_lr_scale=0.0, vision_lr_scale=0.0, projector_lr_scale=1.0, batch_size=64,
            data_format="plain", group_by_length=False, image_aspect_ratio="square", mm_patch_merge_type="flat"),
    2: _LATER,
    3: _LATER,
}


def parse_args(argv, tc: TrainConfig | None = None):
    """--key=value into a TrainConfig (--stage=N first: its STAGES values, then the explicit options over
    them), --lm.* / --vision.* into the preset's model config -> (tc, mc). Every option is checked here, before
    any work: a bad one ends the program with one line naming it (model.parse_config)."""
    tc, overrides = parse_config(tc or TrainConfig(), argv, __doc__, presets=("stage", STAGES), model=True)
    mc = model_config(tc.preset, overrides)
    # the image mode belongs to the model (it is saved in its config); the stage presets set it
    mc.image_aspect_ratio = tc.image_aspect_ratio or mc.image_aspect_ratio
    mc.mm_patch_merge_type = tc.mm_patch_merge_type or mc.mm_patch_merge_type
    return tc, mc


def lr_at(step, tc: TrainConfig):
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * progress))


def component_scales(model, tc: TrainConfig):
    """(parameters, lr multiplier) per component. `image_newline` goes with the language model, as in the
    official trainer: its mm_language_model part trains every parameter outside the vision tower and the
    projector, and only names containing "mm_projector" get the projector's lr. It is an embedding the
    LLM reads (a learned "end of row" token), not part of the map from ViT features to that space."""
    newline = [model.image_newline] if hasattr(model, "image_newline") else []
    return ((list(model.llm.parameters()) + newline, tc.llm_lr_scale), (list(model.vision.parameters()), tc.vision_lr_scale),
            (list(model.projector.parameters()), tc.projector_lr_scale))


def make_groups(model, tc: TrainConfig):
    """One parameter group per component, each with its own lr multiplier (LLaDA-V trains the vision
    tower at a fifth of the LLM's lr); decay only matrices (LLaDA-V uses weight_decay 0 anyway). A zero
    multiplier freezes the component: call freeze() before wrapping (DDP and FSDP2 must see which
    parameters train) and make_groups() after (FSDP2 replaces the parameters by their shards)."""
    groups = []
    for part, scale in component_scales(model, tc):
        params = [p for p in part if p.requires_grad]
        if scale == 0:
            continue
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay, "lr_scale": scale},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    return groups


def freeze(model, tc: TrainConfig):
    for part, scale in component_scales(model, tc):
        if scale == 0:
            for p in part:
                p.requires_grad_(False)  # a zero lr freezes the component


def init_from(model, tc: TrainConfig, log):
    """Copy weights from tc.init_from into the chosen components: a ckpt.pt or .safetensors of ours, or a
    Hugging Face directory (an official LLaDA-V, read by checkpoint.from_pretrained). `image_newline` comes
    along with "all" (or by name) when both sides have it; a model that has one keeps its fresh init when
    the source has none (stage 1 -> 2, as the official stage 2 starts it from randn / sqrt(d))."""
    path = tc.init_from
    if not os.path.exists(path):
        sys.exit(f"--init_from={path} does not exist; point it at a ckpt.pt, a model.safetensors (e.g. stage 1's) "
                 f"or a Hugging Face model directory (e.g. a download of GSAI-ML/LLaDA-V)")
    try:
        if os.path.isdir(path):
            from checkpoint import from_pretrained
            state = from_pretrained(path).state_dict()
        else:
            state = load_state_file(path)
    except (OSError, ValueError) as e:
        sys.exit(str(e))
    state = state.get("model", state) if isinstance(state.get("model"), dict) else state
    names = ("llm", "vision", "projector", "image_newline")
    parts = list(names) if tc.init_parts == "all" else tc.init_parts.split(",")
    if not set(parts) <= set(names):
        sys.exit(f"--init_parts={tc.init_parts!r}: use all or a comma list of {', '.join(names)}")
    done = []
    for part in parts:
        if part == "image_newline":
            if hasattr(model, part) and part in state:
                with torch.no_grad():
                    model.image_newline.copy_(state[part])
                done.append(part)
            elif tc.init_parts != "all":
                sys.exit(f"--init_parts=image_newline: {'the model' if not hasattr(model, part) else path} has none "
                         f"(it comes with mm_patch_merge_type=spatial_unpad)")
            continue
        sub = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
        load_state(getattr(model, part), sub, f"{path} ({part})")
        done.append(part)
    log(f"initialised {', '.join(done)} from {path}")


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


def key_mask_on(tc: TrainConfig) -> bool:
    """Whether padding keys are hidden from attention: LLaDA-V's collator hides nothing (REFERENCE 11.9),
    so --data runs attend to the EOS padding by default; the toy's synthetic recipe has always hidden it."""
    return tc.key_pad_mask == "on" or (tc.key_pad_mask == "auto" and not tc.data)


def llava_inputs(b, mc, pad_id: int, device, key_pad_mask: bool, need_image: bool):
    """A collated LLaVA micro-batch (data.collate_llava) -> ids, labels, attn (B, L) (the real tokens, for
    counting), and the model's keyword inputs: pixels (every crop) with image_layout (each image's crops,
    size and token count; the model packs them, model.encode_crops), and attention_mask only with
    key_pad_mask: the official collator sends none, so every query attends to the EOS padding (11.9).
    need_image: a text-only micro-batch under DDP / FSDP2 gets one blank image appended to row 0, hidden from
    attention (mask 0) and from the loss (label -100): the vision tower, the projector and image_newline then
    run on every process in the same order, so the gradient collectives line up (and DDP sees every
    parameter used)."""
    ids, labels, attn = b["ids"].to(device), b["labels"].to(device), b["attn"].to(device)
    pixels = None if b["pixels"] is None else b["pixels"].to(device)
    layout, mask = b["layout"], attn if key_pad_mask else None
    if pixels is None and need_image:
        S = mc.vision.image_size
        T = mc.vision.n_patches + int("unpad" in mc.mm_patch_merge_type)  # one crop (+ the newline)
        extra = torch.full((ids.shape[0], T), pad_id, dtype=ids.dtype, device=device)
        extra[0] = IMAGE_TOKEN_INDEX
        hidden = torch.zeros_like(extra, dtype=torch.bool)
        mask = torch.cat([attn if key_pad_mask else torch.ones_like(attn), hidden], 1)  # (B, L + T)
        ids, labels = torch.cat([ids, extra], 1), torch.cat([labels, torch.full_like(extra, -100)], 1)
        attn = torch.cat([attn, hidden], 1)
        pixels, layout = torch.zeros(1, 3, S, S, device=device), [(1, (S, S), T)]
    return ids, labels, attn, dict(pixels=pixels, image_layout=layout, attention_mask=mask)


def train(tc: TrainConfig, mc, quiet=False):
    from distributed import (all_sum, barrier, export, latest_checkpoint, load_dcp, read_extra, resolve_parallel,
                             save_dcp, setup, wrap)
    info = setup(pick_device(tc.device))
    device = info.device
    log = (lambda *a: None) if quiet or not info.main else (lambda *a: print(*a, flush=True))
    torch.manual_seed(tc.seed)
    if tc.tokenizer:
        mc.tokenizer = tc.tokenizer  # recorded in the checkpoint's config, so sample.py finds it again
    try:
        flag = mc.lm.mask_id if mc.lm.mask_id != 126336 else None  # --lm.mask_id=5 (iLLaDA); else the tokenizer's
        tok = toy_tokenizer() if mc.tokenizer == "toy" else get_tokenizer(mc.tokenizer, flag)
    except ValueError as e:
        sys.exit(f"preset {tc.preset!r} needs the {mc.tokenizer!r} tokenizer; pass --tokenizer=<tokenizer.json or "
                 f"model dir> ({e})")
    if tok.vocab_size > mc.lm.vocab_size:
        sys.exit(f"tokenizer has {tok.vocab_size} tokens but lm.vocab_size={mc.lm.vocab_size}; raise --lm.vocab_size")
    if tc.gen_length % tc.block_length or tc.sample_steps % (tc.gen_length // tc.block_length):
        sys.exit(f"gen_length={tc.gen_length} must be divisible by block_length={tc.block_length}, and "
                 f"sample_steps={tc.sample_steps} by the number of blocks; fix the three options")
    micro = tc.micro_batch_size or tc.batch_size // info.world
    if micro < 1 or tc.batch_size % (micro * info.world):
        sys.exit(f"batch_size={tc.batch_size} must be a multiple of micro_batch_size={micro} x {info.world} "
                 f"processes; change --batch_size or --micro_batch_size")
    accum = tc.batch_size // (micro * info.world)
    try:
        data = SyntheticVQA(tok, mc.vision.image_size, mc.vision.n_patches, tc.gen_length, seed=tc.seed,
                            system=default_system(mc.tokenizer), single_object_steps=tc.single_object_steps,
                            kind_weights=tc.kind_weights, kind_weights_from=tc.kind_weights_from)
    except ValueError as e:
        sys.exit(f"--kind_weights: {e}")
    model = LLaDAV(mc)
    model.init_weights()
    if tc.init_from:
        init_from(model, tc, log)
    model.to(device)
    model.llm.checkpointing, model.llm.head_chunk = tc.checkpointing, tc.head_chunk
    freeze(model, tc)
    n = count_params(model)
    parallel = resolve_parallel(tc.parallel, n["total"], info)
    fwd = wrap(model, parallel, info, bf16=device.type == "cuda")
    opt = torch.optim.AdamW(make_groups(model, tc), lr=tc.lr, betas=(0.9, tc.beta2), eps=1e-8,
                            fused=device.type == "cuda" and parallel != "fsdp")
    fmt = tc.ckpt_format if tc.ckpt_format != "auto" else "dcp" if (info.on or tc.data) else "pt"
    if fmt not in ("pt", "dcp") or (fmt == "pt" and parallel == "fsdp"):
        sys.exit(f"--ckpt_format={tc.ckpt_format}: use pt, dcp or auto (FSDP2 needs dcp)")
    stream = None
    if tc.data:
        from data import BadSampleCounter, LlavaDataset, MicroBatches
        try:
            ds = LlavaDataset(tc.data, tc.image_root, tok, mc.vision.image_size, mc.vision.n_patches,
                              fmt=tc.data_format, max_len=min(tc.max_len, mc.lm.max_seq_len),
                              unignore_special=tc.unignore_special, image_mode=mc.image_aspect_ratio,
                              newline=hasattr(model, "image_newline"), truncation=tc.truncation)
        except (OSError, ValueError) as e:
            sys.exit(str(e))
        batches = MicroBatches(ds, tc.batch_size, micro, info.world, info.rank, tc.seed, tc.workers, tc.pad_labels,
                               tc.group_by_length)
        bad = BadSampleCounter(tc.max_bad_frac, min_seen=min(50, len(ds)))
        if tc.epochs > 0:
            tc.max_steps = max(1, math.ceil(tc.epochs * batches.steps_per_epoch))
    if tc.warmup_ratio > 0:
        tc.warmup_steps = max(1, round(tc.warmup_ratio * tc.max_steps))
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
    step, bad_prev = 0, {}
    if tc.resume:
        dcp_path = latest_checkpoint(tc.out_dir)
        if dcp_path is None and not os.path.exists(ckpt_path):
            sys.exit(f"--resume=1 but {ckpt_path} does not exist (nor {tc.out_dir}/dcp/latest); drop --resume "
                     f"or point --out_dir at a run")
        try:
            ckpt = load_state_file(ckpt_path, device) if dcp_path is None else None
        except ValueError as e:
            sys.exit(str(e))
        if ckpt is not None and "optimizer" not in ckpt:
            sys.exit(f"{ckpt_path} is a final export without optimizer state; resume from {tc.out_dir}/dcp")
        saved_cfg = ckpt["config"] if ckpt is not None else read_extra(dcp_path)["config"]
        saved_cfg = type(mc).from_dict(saved_cfg).to_dict()  # fields added since it was written get defaults
        if saved_cfg != mc.to_dict():
            diff = [k for k in ("lm", "vision", "tokenizer") if saved_cfg[k] != mc.to_dict()[k]]
            sys.exit(f"{dcp_path or ckpt_path} was trained with another model config (differs in {', '.join(diff)}); "
                     f"use the same --preset and overrides, or a new --out_dir")
        if ckpt is not None:
            load_state(model, ckpt["model"], ckpt_path)
            opt.load_state_dict(ckpt["optimizer"])
            step = ckpt["step"]
        else:
            extra = load_dcp(dcp_path, model, opt)
            step, bad_prev = extra["step"], extra.get("bad", {})
        log(f"resumed from {dcp_path or ckpt_path} at step {step}")
    if tc.compile:
        fwd = torch.compile(fwd)
    log(f"preset {tc.preset}: {n['total'] / 1e6:.2f}M parameters (language model {n['language model'] / 1e6:.2f}M, "
        f"vision {n['vision tower'] / 1e6:.2f}M, projector {n['projector'] / 1e6:.3f}M) on {device}")
    if info.on or accum > 1 or tc.stage:
        log(f"stage {tc.stage} | {info.world} process(es), {parallel} | global batch {tc.batch_size} = {micro} x "
            f"{info.world} x {accum} accumulation | checkpoints: {fmt} | activation checkpointing {tc.checkpointing}")
    heldout = data.heldout(max(tc.eval_quick, tc.eval_final)) if not tc.data else []
    gen = dict(gen_length=tc.gen_length, steps=tc.sample_steps, block_length=tc.block_length)
    trains = {k: any(p.requires_grad for p in getattr(model, k).parameters()) for k in ("llm", "vision", "projector")}
    peak, peak_src = device_peak(device)
    jlog = JsonlLog(tc.jsonl if info.main else None)
    can_eval = not tc.data and parallel != "fsdp"

    def save(step):
        if fmt == "dcp":
            save_dcp(tc.out_dir, step, model, opt, {"step": step, "config": mc.to_dict(), "bad": dict(bad.errors)
                                                    if tc.data else {}}, info)
        elif info.main:
            save_checkpoint(ckpt_path, {"config": mc.to_dict(), "train_config": asdict(tc), "model": model.state_dict(),
                                        "optimizer": opt.state_dict(), "step": step, "tokenizer": tok.to_dict()})

    key_mask = key_mask_on(tc)
    newline_trains = hasattr(model, "image_newline") and model.image_newline.requires_grad
    need_image = info.on and (trains["vision"] or trains["projector"] or newline_trains)  # see llava_inputs

    def micro_batches(step):
        """-> accum tuples (ids, labels, attn, model inputs, xt, masked, p_mask, n_samples) for this process."""
        if not tc.data:
            # The batch and the masks depend only on (seed, step): a resumed run sees exactly the same data.
            # Every process draws the whole global batch and its masks, then keeps its rows, so any number
            # of processes trains on exactly what one process would.
            ids, labels, attn, pixels = data.train_batch(step, tc.batch_size, lambda im: preprocess(im, mc.vision.image_size))
            ids, labels, attn, pixels = ids.to(device), labels.to(device), attn.to(device), pixels.to(device)
            gen_rng = torch.Generator(device=device).manual_seed(tc.seed * 1_000_003 + step)
            xt, masked, p_mask = forward_process(ids, labels, tok.mask_id, generator=gen_rng,
                                                 stratified=tc.stratified_t, exact_count=tc.exact_count)
            kw = lambda r: dict(pixels=pixels[r], attention_mask=attn[r] if key_mask else None)
            if accum == 1 and not info.on:
                return [(ids, labels, attn, kw(slice(None)), xt, masked, p_mask, tc.batch_size)]
            out = []
            for a in range(accum):
                r = slice((a * info.world + info.rank) * micro, (a * info.world + info.rank + 1) * micro)
                out.append((ids[r], labels[r], attn[r], kw(r), xt[r], masked[r], p_mask[r], micro))
            return out
        out = []
        while len(out) < accum:
            b = next(stream)
            bad.update(b["errors"], b["n_seen"])
            if b["ids"] is None:  # every sample of this micro-batch was bad: take the next one, unless
                bad.check(bad.bad, bad.seen)  # this process's data is mostly broken (then stop here)
                continue
            ids, labels, attn, kw = llava_inputs(b, mc, tok.pad_id, device, key_mask, need_image)
            g = torch.Generator(device=device).manual_seed(((tc.seed * 1_000_003 + step) * 64 + len(out)) * 4096 + info.rank)
            xt, masked, p_mask = forward_process(ids, labels, tok.mask_id, generator=g, stratified=tc.stratified_t,
                                                 exact_count=tc.exact_count)
            out.append((ids, labels, attn, kw, xt, masked, p_mask, b["n_samples"]))
        return out

    if tc.data:
        stream = iter(batches.iterate(step))
        bad.errors.update(bad_prev)
    model.train()
    t_start, tokens_seen, t_log, flops_since = time.time(), 0, time.time(), 0.0
    first_step = step
    while step < tc.max_steps:
        lr = lr_at(step, tc)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        opt.zero_grad(set_to_none=True)
        step_loss, n_tok, n_masked, n_img, seq = 0.0, 0, 0, 0, 0
        mbs = micro_batches(step)
        for a, (ids, labels, attn, kw, xt, masked, p_mask, n_samples) in enumerate(mbs):
            sync = a == accum - 1
            if parallel == "ddp" and not sync:
                ctx = fwd.no_sync()  # all-reduce the gradients once, after the last micro-batch
            else:
                ctx = contextlib.nullcontext()
            if parallel == "fsdp":
                fwd.set_requires_gradient_sync(sync)
            with ctx:
                with autocast(device):
                    if tc.head_chunk:  # per-row CE (N_masked,): the head runs in chunks inside the model
                        ce, logits = fwd(xt, output_positions=masked, targets=labels[masked], **kw), None
                    else:              # (N_masked, V): the head runs on the masked rows only
                        ce, logits = None, fwd(xt, output_positions=masked, **kw)
                loss = diffusion_loss(logits, labels, masked, p_mask, mode=tc.loss_mode, weighting=tc.weighting, ce=ce)
                if n_samples * info.world != tc.batch_size:  # scale so the sum over micro-batches and the
                    loss = loss * (n_samples * info.world / tc.batch_size)  # mean over processes = batch loss
                loss.backward()
            step_loss += loss.item() if (step + 1) % tc.log_every == 0 or step + 1 == tc.max_steps else 0.0
            n_tok += int(attn.sum())
            n_masked += int(masked.sum())
            n_img += 0 if kw["pixels"] is None else kw["pixels"].shape[0]  # crops through the tower
            seq = max(seq, ids.shape[1])
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        tokens_seen += n_tok
        flops_since += step_flops(mc, n_tok, seq, n_masked, n_img, trains["llm"], trains["vision"], trains["projector"])
        if step % tc.log_every == 0 or step == tc.max_steps:
            loss_g, tok_g, flops_g = all_sum([step_loss, tokens_seen, flops_since], info)
            loss_g /= info.world
            dt = time.time() - t_start
            tps = tok_g / dt
            eta = (tc.max_steps - step) * dt / (step - first_step)
            mfu = flops_g / (time.time() - t_log) / (peak * info.world) if flops_since else 0.0
            mem = peak_memory(device) / 2 ** 30
            line = (f"step {step:5d}/{tc.max_steps} | loss {loss_g:.4f} | lr {lr:.2e} | "
                    f"{tps:,.0f} tok/s | {(time.time() - t_log) * 1000 / tc.log_every:.0f} ms/step | ETA {eta:.0f}s")
            log(line + f" | MFU {100 * mfu:.1f}% | peak mem {mem:.2f} GiB")
            jlog.write({"step": step, "loss": loss_g, "lr": lr, "tok_per_s": tps, "mfu": mfu, "peak_mem_gib": mem,
                        "eta_s": eta, "time": time.time()})
            if tc.data:
                n_bad, n_seen = all_sum([bad.bad, bad.seen], info)
                bad.check(n_bad, n_seen)
                if n_bad:
                    log(f"  skipped {n_bad:.0f} of {n_seen:.0f} samples so far (this process: {bad.summary()})")
            t_log, flops_since = time.time(), 0.0
        if tc.eval_every and tc.eval_quick and step % tc.eval_every == 0 and step < tc.max_steps and can_eval and info.main:
            log(f"  held-out ({tc.eval_quick}): " + format_eval(evaluate(model, tok, heldout[:tc.eval_quick], **gen)))
        if step % tc.ckpt_every == 0 or step == tc.max_steps:
            save(step)
    train_time = time.time() - t_start
    log(f"trained {step - first_step} steps in {train_time:.0f}s; checkpoint "
        f"{ckpt_path if fmt == 'pt' else os.path.join(tc.out_dir, 'dcp')}")
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


def main(argv):
    tc, mc = parse_args(argv)
    t = time.time()
    train(tc, mc)
    from distributed import teardown
    teardown()
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line, not one per process
        print(f"total wall time {time.time() - t:.0f}s")


if __name__ == "__main__":
    run_cli(main)  # a bad option or file: one line, no traceback (LLADA_DEBUG=1 shows it)
