"""
Train LLaDA-V as a masked diffusion model on image-question pairs.

Where this sits in the flow: every piece at once. Each step:
    pixels -> ViT -> projector -> visual tokens, spliced into the chat-template token sequence x0
    t ~ U(0,1) per sample; answer tokens -> [MASK] with p_mask = (1 - 1e-3) t + 1e-3     (diffusion.py)
    loss = 1/B sum_b 1/|A_b| sum_{masked i} CE(f(x_t)_i, x0_i) / p_mask_b                 (SFT form)
    the toy: Muon for the hidden matrices, AdamW for the rest (MuonAdamW); LLaDA-V's stages: AdamW.
    Linear warmup, a plateau at the peak if --decay_frac < 1, then cosine decay; gradient clipping at 1.0.

The default run (`python train.py`) trains the `toy` preset from scratch on the embedded synthetic
shapes dataset on a CPU in a few minutes and ends with a held-out report: exact-match accuracy per
question kind, and the same evaluation with blank images (a model that really looks scores near chance).

    python train.py --help                      # every option with its default
    python train.py --max_steps=200             # any TrainConfig field: --key=value
    python train.py --lm.n_layers=6             # model fields: --lm.* and --vision.*
    python train.py --resume=1                  # continue from out/ckpt.pt (same config required)

At scale (docs/scale.md): LLaDA-V's stages on LLaVA-format data (data.py), under
torchrun with DDP or FSDP2 and resharding DCP checkpoints (distributed.py), MFU logs (model.step_flops):
    python train.py --stage=1 --data=captions.json --image_root=images/ --out_dir=out/s1
    torchrun --standalone --nproc_per_node=8 train.py --stage=2 --data=conv.json --image_root=images/
        --init_from=out/s1/model.safetensors --micro_batch_size=1          (one command line)
Each step: loss = sum over micro-batches m and processes of (n_m W / B) * loss_m, averaged over the W
processes by DDP / FSDP2, which is the loss of the global batch of B sequences.

Reading order. train() is setup -> resume -> batches -> the loop; everything it calls sits above it:
    TrainConfig, STAGES          every option, and LLaDA-V's three stage recipes
    lr_at, make_groups, freeze   the schedule and the per-component learning rates
    MuonAdamW                    the toy's optimizer
    StepBatches                  step -> this process's micro-batches (MicroBatch: x0, labels, the noise seed)
    Meter                        tokens/s, MFU, ETA, memory for the log lines
    build, _train, finish        setup; resume and the loop; export and the held-out report
The loop itself reads as the method does: a batch -> forward_process -> model -> diffusion_loss ->
backward -> clip -> optimizer step, with the bookkeeping (logging, quick evaluation, checkpoint) after it.

Safety (cli.py, checkpoint.py): a run refuses what would lose work without a word (another run's
checkpoint, a foreign model, a folder of sources, a second run on one folder), a resume falls back past a
damaged newest checkpoint, and a NaN or Inf loss stops the run before the update.
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from checkpoint import INIT_PARTS, export, init_from, resume, save
from cli import (JsonlLog, autocast, claim_out_dir, device_peak, model_config, opt, parse_config, peak_memory, pick_device,
                 release_lock, run_cli, write_text)
from data import default_system, key_mask_on, llava_inputs, open_llava
from diffusion import check_schedule, diffusion_loss, forward_process
from distributed import all_sum, barrier, gradient_sync, resolve_parallel, setup, teardown, wrap
from model import LORA_TARGETS, PRESETS, LLaDAV, add_lora, count_params, step_flops
from sample import evaluate, format_eval
from synthetic import SyntheticVQA, curriculum_note, parse_kind_weights, toy_tokenizer
from tokenizer import config_mask_id, get_tokenizer
from vision import preprocess


@dataclass
class TrainConfig:
    # Every field is an option, --key=value; opt(default, rule) declares what the option accepts (cli.py), and
    # the comment after a field is its --help text. The defaults are the toy's; --stage=N sets LLaDA-V's.
    preset: str = opt("toy", choices=tuple(PRESETS))  # model preset (see model.py)
    out_dir: str = opt("out", out="dir")              # checkpoint (ckpt.pt) and final report (report.json) go
                                                      # here; one run at a time
    overwrite: bool = False                           # replace the checkpoint of an earlier run in out_dir (else refused)
    tokenizer: str = opt("", path="any", also=("toy",))  # presets with the official vocabulary: a tokenizer.json
                                                         # or a model dir holding one
    resume: bool = False                              # continue from out_dir's newest intact checkpoint (ckpt.pt or dcp/)
    resume_changed: bool = False                      # resume although seed, batch, lr schedule or data changed (else refused)
    device: str = opt("auto", device=True)            # auto = cuda > mps > cpu
    seed: int = opt(0, min=0)                         # the data, the masks and the initial weights
    batch_size: int = opt(32, min=1)                  # sequences per step
    max_steps: int = opt(4950, min=1)                 # optimizer steps
    lr: float = opt(1.5e-3, gt=0)                     # peak learning rate of the language model; lower it (e.g.
                                                      # 1e-4) for big models
    vision_lr_scale: float = opt(0.5, min=0)     # vision tower lr = lr * this (0 freezes it; the stages: 0.2). From
                                                 # scratch, at the full lr the features can blow up (docs/notebook.md)
    projector_lr_scale: float = opt(0.5, min=0)  # projector lr = lr * this
    min_lr: float = opt(1e-4, min=0)             # cosine decays to this (at most lr)
    decay_frac: float = opt(0.4, gt=0, max=1)    # the cosine takes the last decay_frac of the steps; before it
                                                 # the lr holds at its peak ("warmup-stable-decay", the toy); 1 = the
                                                 # cosine right after warmup, as LLaDA-V (the stage presets)
    warmup_steps: int = opt(100, min=0)          # linear warmup to lr over this many steps
    warmup_from_zero: bool = False               # the warmup's first step at lr 0: lr s / warmup (HF's scheduler, as
                                                 # LLaDA-V; the stage presets) | 0: lr (s + 1) / warmup (the toy)
    weight_decay: float = opt(0.0, min=0)        # LLaDA-V uses 0
    optimizer: str = opt("muon", choices=("adamw", "muon"))  # muon: Muon (orthogonalised momentum) for the
                                                 # hidden weight matrices, AdamW for the rest (MuonAdamW below; the
                                                 # toy learns in fewer steps) | adamw: AdamW for all (LLaDA-V)
    beta2: float = opt(0.95, min=0, lt=1)        # AdamW beta2 (the stages: 0.999); small batches give the 1/t loss
                                                 # rare huge gradients, which 0.95 forgets faster
    stratified_t: bool = True    # spread the batch's t evenly over (0, 1) (same expected loss, less variance)
    exact_count: bool = False    # mask exactly l ~ U{1..A} answer tokens (LLaDA Eq. 6: the same bound, weights <= A)
    weighting: str = opt("elbo", choices=("elbo", "none"))    # elbo: CE / p_mask (the likelihood bound) | none:
                                                              # plain CE ("L_simple")
    grad_clip: float = opt(1.0, gt=0)                         # clip the gradient's global norm to this
    loss_mode: str = opt("sft", choices=("sft", "pretrain"))  # sft (per-sample answer-length normaliser) |
                                                              # pretrain (1 / (B L))
    single_object_steps: int = opt(500, min=0)  # curriculum: the first N steps show one object and ask
                                                # colour/shape/describe
    kind_weights_from: int = opt(1500, min=0)   # curriculum: from this step on (once past single_object_steps),
                                                # draw the kinds with kind_weights (before it: equal shares)
    kind_weights: str = "color:0.5,shape:1,count:0.5,relation:2,describe:1"  # kind:weight pairs
    one_object_share: float = opt(0.1, min=0, max=1)  # after the one-object phase, the share of colour / shape
                                                # questions asked about one object (else 2-4; the held-out split
                                                # draws 1-4 uniformly): one object needs no binding (synthetic.py)
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
    # --- training at scale: LLaVA-format data, stages, torchrun (see docs/scale.md) ---
    stage: int = opt(0, choices=(0, 1, 2, 3))  # 0 = the toy recipe above; 1 | 2 | 3 = LLaDA-V's stage presets
                                               # (STAGES): their values first, explicit options override them
    data: str = opt("", path="file")           # LLaVA-format .json / .jsonl; empty = the embedded synthetic data
    image_root: str = opt("", path="dir")      # folder the records' "image" paths are relative to
    data_format: str = opt("conv", choices=("plain", "conv"))  # plain (stage-1 "<image>caption") | conv
                                                               # (multi-turn conversations)
    max_len: int = opt(8192, min=1)  # tokens per sequence, image tokens included (longer samples are cut). A stage
                                     # preset raises lm.max_seq_len to it (LLaDA-V's OneVision stages: 16384); other
                                     # runs cut at the smaller of the two
    unignore_special: bool = True    # LLaDA-V: prompt BOS/header/eot tokens are targets too (ML-GSAI/LLaDA-V
                                     # train/llava/train/train.py::preprocess_llada)
    pad_labels: bool = True          # padding EOS are targets (LLaDA-V's collator); 0: ignored
    key_pad_mask: str = opt("auto", choices=("auto", "on", "off"))  # hide padding from attention: on | off |
                                     # auto = off with --data (LLaDA-V's collator sends no attention mask: every
                                     # token attends to the EOS padding, ML-GSAI/LLaDA-V
                                     # train/llava/train/train.py::DataCollatorForSupervisedDataset), on for the toy's
                                     # synthetic batches (this project's recipe)
    group_by_length: bool = True     # --data: each global batch one modality, sorted by length (LLaDA-V's stages
                                     # 2-3: group_by_modality_length) | 0: random (stage 1)
    truncation: str = opt("official", choices=("official", "whole_images"))  # official: the max_len cut may
                                     # split an image (ML-GSAI/LLaDA-V
                                     # train/llava/model/llava_arch.py::prepare_inputs_labels_for_multimodal) |
                                     # whole_images: never
    image_aspect_ratio: str = opt("", choices=("", "square", "pad", "anyres_max_4"))  # the model's image mode;
                                     # "" = the preset's (the stage presets set anyres_max_4 for stages 2-3)
    mm_patch_merge_type: str = opt("", choices=("", "flat", "spatial_unpad"))  # spatial_unpad adds the
                                     # trainable image_newline; "" = the preset's
    workers: int = opt(2, min=0)     # DataLoader worker processes for --data
    max_bad_frac: float = opt(0.1, min=0, max=1)  # stop when more than this fraction of samples is broken
    epochs: float = opt(0.0, min=0)               # > 0 with --data: max_steps = epochs * (records / batch_size)
    warmup_ratio: float = opt(0.0, min=0, max=1)  # > 0: warmup_steps = ceil(max_steps * warmup_ratio), as HF's
                                                  # TrainingArguments.get_warmup_steps (LLaDA-V: 0.03)
    llm_lr_scale: float = opt(1.0, min=0)         # language model lr = lr * this (0 freezes it, as stage 1 does)
    micro_batch_size: int = opt(0, min=0)         # sequences per process per forward; 0 = batch_size / processes.
                                                  # batch_size / (processes * micro) steps of gradient accumulation.
                                                  # The stage presets fix it (16 | 1, LLaDA-V's per-GPU batch), so
                                                  # the padding and the loss do not depend on the process count
    parallel: str = opt("auto", choices=("none", "ddp", "fsdp", "auto"))  # auto: ddp under 1B parameters, else fsdp
    checkpointing: bool = False  # recompute each LLM block in backward: much less activation memory
    ckpt_format: str = opt("auto", choices=("pt", "dcp", "auto"))  # pt (out_dir/ckpt.pt) | dcp (out_dir/dcp/,
                                 # resumes on any number of processes) | auto (dcp under torchrun or with --data)
    init_from: str = opt("", path="any")  # start from these weights (a ckpt.pt, model.safetensors or a Hugging Face
                                           # directory such as the official LLaDA-V), e.g. stage 1's
    init_parts: str = opt("all", each=("all",) + INIT_PARTS)  # which of them: all, or a comma list
    jsonl: str = opt("", out="file")  # append one JSON line per logged step here (python -m tools.draw
                                      # --curve=<it> draws the loss curve)
    head_chunk: int = opt(0, min=0)   # > 0: output head + loss on this many masked rows at a time, recomputed in
                                      # backward (model.chunked_head_ce): the loss's memory no longer grows with N x V
    lora_rank: int = opt(0, min=0)    # > 0: LoRA (model.add_lora): rank-r adapters on --lora_targets, all else frozen
                                      # (bf16 on a GPU); out_dir gets a PEFT adapter and the merged model.safetensors
    lora_alpha: float = opt(16.0, gt=0)  # LoRA's update is scaled by lora_alpha / lora_rank
    lora_targets: str = opt("q,k,v,o,gate,up,down", each=LORA_TARGETS)  # the LM's projections, vision, projector
    lora_dropout: float = opt(0.0, min=0, lt=1)  # dropout on the adapters' input (PEFT's lora_dropout)

    def check(self):
        """The rules that tie options together, checked with the others before any work (cli.parse_config)."""
        check_schedule(self.gen_length, self.block_length, self.sample_steps, "--", "sample_steps")
        if self.optimizer == "muon" and self.parallel == "fsdp":
            raise ValueError("--optimizer=muon needs whole weight matrices, and --parallel=fsdp shards them; use "
                             "--optimizer=adamw or --parallel=ddp")
        if self.min_lr > self.lr:
            raise ValueError(f"--min_lr={self.min_lr} is above --lr={self.lr}: the cosine would raise the learning "
                             f"rate; lower --min_lr")
        world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun; the same test train() makes
        micro = self.micro_batch_size or self.batch_size // world
        if micro < 1 or self.batch_size % (micro * world):
            raise ValueError(f"--batch_size={self.batch_size} must be a multiple of --micro_batch_size={micro} x "
                             f"{world} processes; change --batch_size or --micro_batch_size")
        if "all" in self.init_parts.split(",") and self.init_parts != "all":
            raise ValueError(f"--init_parts={self.init_parts}: use all, or a comma list of {', '.join(INIT_PARTS)}")
        if self.lora_rank and self.parallel == "fsdp":
            raise ValueError("--lora_rank: LoRA's frozen base fits one GPU, so it runs without FSDP2; use --parallel=ddp or auto")
        if self.ckpt_format == "pt" and self.parallel == "fsdp":
            raise ValueError("--ckpt_format=pt cannot save FSDP2's sharded weights; use --ckpt_format=dcp or auto")
        try:
            parse_kind_weights(self.kind_weights) if self.kind_weights else None
        except ValueError as e:
            raise ValueError(f"--kind_weights: {e}") from None


# LLaDA-V's recipe (ML-GSAI/LLaDA-V train/scripts/llada_v_pretrain.sh, train/scripts/train_llada_v/*.sh): AdamW (0.9,
# 0.999), weight decay 0, HF's cosine schedule (warmup from 0 over ceil(3%) of the steps, cosine to 0), clip 1.0, one
# epoch; the per-GPU batch is fixed and gradient accumulation makes up the global batch. Stage 1 trains the projector
# only.
_COMMON = dict(optimizer="adamw", beta2=0.999, weight_decay=0.0, min_lr=0.0, decay_frac=1.0, warmup_ratio=0.03,
               warmup_from_zero=True, grad_clip=1.0, epochs=1.0, stratified_t=False, exact_count=False,
               weighting="elbo", loss_mode="sft", max_len=8192, head_chunk=512)
# Stage 1 (llada_v_pretrain.sh): square 384 images (729 tokens), 16 random captions per process and micro-batch
# (per_device_train_batch_size 16, on 4 GPUs = 64). Stages 2-3: anyres_max_4 images with spatial_unpad (base +
# crops, a trainable image_newline per row), one sample per process and micro-batch (never padded), global
# batches grouped by modality and length (ML-GSAI/LLaDA-V train/scripts/llada_v_pretrain.sh,
# train/scripts/train_llada_v/*.sh, train/llava/train/train.py::LazySupervisedDataset._get_item). max_len 8192 is the
# single-image and reasoning runs (llada_v_si_10M.sh, llada_v_vw.sh); their OneVision and mixed runs (llada_v_ov_2M.sh,
# llada_v_mix_ov_vw.sh) use 16384: add --max_len=16384 (the model's lm.max_seq_len follows, parse_args).
_LATER = dict(_COMMON, lr=1e-5, llm_lr_scale=1.0, vision_lr_scale=0.2, projector_lr_scale=1.0, batch_size=256,
              data_format="conv", checkpointing=True, micro_batch_size=1, group_by_length=True,
              image_aspect_ratio="anyres_max_4", mm_patch_merge_type="spatial_unpad")
STAGES = {
    1: dict(_COMMON, lr=1e-3, llm_lr_scale=0.0, vision_lr_scale=0.0, projector_lr_scale=1.0, batch_size=64,
            micro_batch_size=16, data_format="plain", group_by_length=False, image_aspect_ratio="square",
            mm_patch_merge_type="flat"),
    2: _LATER,
    3: _LATER,
}


def parse_args(argv, tc: TrainConfig | None = None):
    """--key=value into a TrainConfig (--stage=N first: its STAGES values, then the explicit options over
    them), --lm.* / --vision.* into the preset's model config -> (tc, mc). Every option is checked here, before
    any work: a bad one ends the program with one line naming it (cli.parse_config)."""
    tc, overrides = parse_config(tc or TrainConfig(), argv, __doc__, presets=("stage", STAGES), model=True)
    mc = model_config(tc.preset, overrides)
    # the image mode belongs to the model (it is saved in its config); the stage presets set it
    mc.image_aspect_ratio = tc.image_aspect_ratio or mc.image_aspect_ratio
    mc.mm_patch_merge_type = tc.mm_patch_merge_type or mc.mm_patch_merge_type
    # and so does the sequence length: a stage run at --max_len=16384 needs a model that takes 16384 tokens
    if tc.stage and tc.max_len > mc.lm.max_seq_len:
        if "lm.max_seq_len" in overrides:
            raise SystemExit(f"--max_len={tc.max_len} is above --lm.max_seq_len={mc.lm.max_seq_len}; raise "
                             f"--lm.max_seq_len to {tc.max_len} (or drop it) or lower --max_len")
        mc.lm.max_seq_len = tc.max_len
    return tc, mc


def warmup_of(tc: TrainConfig) -> int:
    """The warmup steps: warmup_steps, or with warmup_ratio > 0 ceil(max_steps x warmup_ratio), as HF's
    TrainingArguments.get_warmup_steps counts them for LLaDA-V's --warmup_ratio 0.03 (train() stores it)."""
    return math.ceil(tc.max_steps * tc.warmup_ratio) if tc.warmup_ratio > 0 else tc.warmup_steps


def lr_at(step, tc: TrainConfig):
    """Linear warmup to lr, a plateau at lr, then cosine decay to min_lr at max_steps:
        lr(s) = lr (s + 1) / warmup        (warmup_from_zero: lr s / warmup)   s < warmup
        lr(s) = lr                                                        warmup <= s < start
        lr(s) = min_lr + (lr - min_lr) (1 + cos(pi p)) / 2,  p = (s - start) / (max_steps - start)
    with start = max(warmup, max_steps - decay_frac * max_steps). decay_frac = 1 (the default) is the plain
    cosine after warmup (LLaDA-V: warmup_ratio 0.03, min_lr 0; STAGES); decay_frac < 1 holds the peak first
    ("warmup-stable-decay", as speedrun recipes do; the toy's runs with it: docs/notebook.md). The toy
    recipe keeps a floor, min_lr, so the late steps still move the weights. With warmup_from_zero, min_lr 0
    and decay_frac 1 this is HF's get_cosine_schedule_with_warmup, which LLaDA-V trains with (its first
    update at lr 0)."""
    if step < tc.warmup_steps:
        return tc.lr * (step + int(not tc.warmup_from_zero)) / tc.warmup_steps
    start = max(tc.warmup_steps, tc.max_steps - round(tc.decay_frac * tc.max_steps))
    progress = min(1.0, max(0, step - start) / max(1, tc.max_steps - start))
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * progress))


def component_scales(model, tc: TrainConfig):
    """(parameters, lr multiplier) per component. `image_newline` goes with the language model, as in the
    official trainer: its mm_language_model part trains every parameter outside the vision tower and the
    projector, and only names containing "mm_projector" get the projector's lr. It is an embedding the
    LLM reads (a learned "end of row" token), not part of the map from ViT features to that space."""
    newline = [model.image_newline] if hasattr(model, "image_newline") else []
    return ((list(model.llm.parameters()) + newline, tc.llm_lr_scale), (list(model.vision.parameters()), tc.vision_lr_scale),
            (list(model.projector.parameters()), tc.projector_lr_scale))


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the hidden weight matrices (groups with "muon": True), AdamW for everything else, in one
    optimizer (one state dict: checkpoints, DCP and resume treat it like AdamW). Muon (Jordan et al. 2024;
    torch.optim.Muon computes the same update one matrix at a time) replaces the matrix's momentum by
    the nearest semi-orthogonal matrix, so every direction of the update moves by a similar amount:
        B_t = mu B_{t-1} + (1 - mu) G_t          momentum, an EMA of the gradient G (mu = 0.95)
        U_t = (1 - mu) G_t + mu B_t              Nesterov look-ahead
        O_t = NS5(U_t / ||U_t||_F)              ~ U V^T of U_t's SVD, by five Newton-Schulz steps
              X <- a X + (b A + c A^2) X,  A = X X^T,  (a, b, c) = (3.4445, -4.7750, 2.0315)
        W_t = W_{t-1} - lr * 0.2 sqrt(max(m, n)) * O_t   (the 0.2 sqrt(max) factor gives the update an
                                                          AdamW-like RMS, so the same lr serves both)
    Matrices of one shape are orthogonalised together, as one batched matmul: on a CPU the toy's many
    small matrices would otherwise spend the step in per-matrix overhead. The iteration runs in bf16 on a
    GPU (as torch.optim.Muon does) and in fp32 on a CPU, where bf16 matmuls are slow.
    A Muon update needs the whole matrix: FSDP2 shards it, so train.py refuses muon with FSDP2."""

    NS = (3.4445, -4.7750, 2.0315)

    def __init__(self, groups, lr, betas=(0.9, 0.95), eps=1e-8, momentum=0.95, ns_steps=5):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, momentum=momentum, ns_steps=ns_steps,
                                      weight_decay=0.0, muon=False))

    @staticmethod
    def orthogonalise(G, steps: int):
        """G (n, m, k) -> NS5(G / ||G||) per matrix, batched (the quintic of torch.optim.Muon)."""
        a, b, c = MuonAdamW.NS
        X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
        tall = X.shape[-2] > X.shape[-1]
        if tall:  # iterate on the wide side: A = X X^T is then the smaller Gram matrix
            X = X.mT
        X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)
        for _ in range(steps):
            A = X @ X.mT                                   # (n, m, m)
            X = a * X + (b * A + c * (A @ A)) @ X
        return (X.mT if tall else X).to(G.dtype)

    @torch.no_grad()
    def step(self, closure=None):
        # closure: torch.optim's signature (DCP's loader calls step(closure=None) to create the state)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            lr, wd = g["lr"], g["weight_decay"]
            if g["muon"]:
                mu, by_shape = g["momentum"], {}
                for p in params:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.lerp_(p.grad, 1 - mu)                              # B_t
                    by_shape.setdefault(p.shape, []).append((p, p.grad.lerp(buf, mu)))  # U_t
                for shape, items in by_shape.items():
                    O = self.orthogonalise(torch.stack([u for _, u in items]), g["ns_steps"])
                    for (p, _), o in zip(items, O):
                        p.mul_(1 - lr * wd).add_(o, alpha=-lr * 0.2 * max(shape) ** 0.5)
                continue
            b1, b2 = g["betas"]
            for p in params:  # AdamW, as torch.optim.AdamW computes it
                st = self.state[p]
                if not st:
                    st["step"], st["exp_avg"], st["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                st["exp_avg"].lerp_(p.grad, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (st["exp_avg_sq"].sqrt() / (1 - b2 ** st["step"]) ** 0.5).add_(g["eps"])
                p.mul_(1 - lr * wd).addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1 ** st["step"]))
        return loss


def make_groups(model, tc: TrainConfig):
    """One parameter group per component, each with its own lr multiplier (LLaDA-V trains the vision
    tower at a fifth of the LLM's lr); decay only matrices (LLaDA-V uses weight_decay 0 anyway). A zero
    multiplier freezes the component: call freeze() before wrapping (DDP and FSDP2 must see which
    parameters train) and make_groups() after (FSDP2 replaces the parameters by their shards)."""
    # Muon's "hidden matrices": the weights of every nn.Linear but the output head and LoRA's rank-r factors. The
    # token embedding, the head, the ViT's position embedding and patch convolution, norms and biases stay with AdamW.
    hidden = {id(m.weight) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              and not name.endswith(("lm_head", "lora_A", "lora_B"))} if tc.optimizer == "muon" else set()
    groups = []
    for part, scale in component_scales(model, tc):
        params = [p for p in part if p.requires_grad]
        if scale == 0:
            continue
        mats = [p for p in params if id(p) in hidden]
        if mats:
            groups.append({"params": mats, "weight_decay": tc.weight_decay, "lr_scale": scale, "muon": True})
        groups += [{"params": [p for p in params if p.dim() >= 2 and id(p) not in hidden],
                    "weight_decay": tc.weight_decay, "lr_scale": scale},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    return [g for g in groups if g["params"]]


def freeze(model, tc: TrainConfig):
    """requires_grad off for every component whose lr multiplier is 0 (stage 1 freezes LLM and ViT)."""
    for part, scale in component_scales(model, tc):
        if scale == 0:
            for p in part:
                p.requires_grad_(False)  # a zero lr freezes the component


# ----------------------------------------------------------------------------------------------
# Batches

@dataclass
class MicroBatch:
    """One forward and backward's worth of this process's rows, before the forward process. The noise is
    drawn over all of x0 with `rng` (seeded by seed and step, never the global RNG, so a resumed run redraws
    it exactly); the model trains on x0[rows]. With the synthetic data every process draws the noise of
    the whole global batch and keeps its rows, so any number of processes trains on exactly what one
    process would; a LLaVA micro-batch is its own rows."""
    x0: torch.Tensor      # (n, L) clean token ids: the prompt (with image placeholders) and the answer
    labels: torch.Tensor  # (n, L) the tokens that may be masked and are scored, -100 elsewhere
    rng: torch.Generator  # the forward process's randomness
    rows: slice           # the rows of x0 this micro-batch trains on (b of the n)
    attn: torch.Tensor    # (b, L) 1 at real tokens of those rows (for counting tokens)
    inputs: dict          # the model's other inputs for those rows: pixels, image_layout, attention_mask
    share: float          # b x processes / batch_size: its part of the global batch's loss


class StepBatches:
    """step -> this process's list of `accum` MicroBatches. Synthetic data: a function of (seed, step).
    LLaVA data (--data): the next micro-batches of this rank's DataLoader stream."""

    def __init__(self, tc, mc, tok, info, accum, micro, synthetic, stream, bad, needs_image):
        # synthetic: SyntheticVQA (drawn per step); stream: the LLaVA DataLoader iterator, or None;
        # bad: the BadSampleCounter of skipped records; needs_image: see llava_inputs
        self.tc, self.mc, self.tok, self.info, self.dev = tc, mc, tok, info, info.device
        self.accum, self.micro, self.synthetic, self.stream, self.bad = accum, micro, synthetic, stream, bad
        self.key_mask = key_mask_on(tc)  # hide the padding from attention (the toy) or not (LLaDA-V's collator)
        self.needs_image = needs_image

    def __call__(self, step) -> list:
        tc, info, dev = self.tc, self.info, self.dev
        if self.stream is None:
            batch = self.synthetic.train_batch(step, tc.batch_size, lambda im: preprocess(im, self.mc.vision.image_size))
            ids, labels, attn, pixels = (t.to(dev) for t in batch)  # (B, L) x 3, (B, 3, S, S)
            seed = tc.seed * 1_000_003 + step
            if self.accum == 1 and not info.on:
                rows = [slice(None)]
            else:  # micro-batch a of rank r: rows (a W + r) m ... (a W + r + 1) m of the global batch
                m, W, r = self.micro, info.world, info.rank
                rows = [slice((a * W + r) * m, (a * W + r + 1) * m) for a in range(self.accum)]
            return [MicroBatch(ids, labels, torch.Generator(device=dev).manual_seed(seed), r, attn[r],
                               dict(pixels=pixels[r], attention_mask=attn[r] if self.key_mask else None),
                               1.0 if r == slice(None) else self.micro * info.world / tc.batch_size)
                    for r in rows]
        out = []
        while len(out) < self.accum:  # LLaVA data: this rank's next micro-batches from the DataLoader
            b = next(self.stream)
            self.bad.update(b["errors"], b["n_seen"])
            if b["ids"] is None:  # every sample of this micro-batch was bad: take the next one, unless
                self.bad.check(self.bad.bad, self.bad.seen)  # this process's data is mostly broken
                continue
            ids, labels, attn, kw = llava_inputs(b, self.mc, self.tok.pad_id, dev, self.key_mask, self.needs_image)
            g = torch.Generator(device=dev).manual_seed(((tc.seed * 1_000_003 + step) * 64 + len(out)) * 4096 + info.rank)
            out.append(MicroBatch(ids, labels, g, slice(None), attn, kw, b["n_samples"] * info.world / tc.batch_size))
        return out

# ----------------------------------------------------------------------------------------------
# Setup

def check_options(tc: TrainConfig, mc, tok, info):
    """The checks that need the tokenizer or the process count -> (micro, accum): sequences per process
    per forward, and micro-batches per step."""
    if tok.vocab_size > mc.lm.vocab_size:
        sys.exit(f"tokenizer has {tok.vocab_size} tokens but lm.vocab_size={mc.lm.vocab_size}; raise --lm.vocab_size")
    # (the sampler's block schedule and the other option-only rules: TrainConfig.check, at parse time)
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
        return toy_tokenizer() if mc.tokenizer == "toy" else get_tokenizer(mc.tokenizer, config_mask_id(mc.lm.mask_id))
    except ValueError as e:
        sys.exit(f"preset {tc.preset!r} needs the {mc.tokenizer!r} tokenizer; pass --tokenizer=<tokenizer.json or "
                 f"model dir> ({e})")


class Meter:
    """Throughput, MFU, ETA and memory for the log lines, summed over the processes at each log."""

    def __init__(self, tc, mc, info, first_step, trains):
        self.tc, self.mc, self.info, self.first, self.trains = tc, mc, info, first_step, trains
        self.peak, _ = device_peak(info.device)
        self.t_start = self.t_log = time.time()
        self.tokens, self.flops = 0, 0.0
        self.step = [0, 0, 0, 0]  # this step so far: real tokens, masked positions, crops, longest row

    def count(self, mb: MicroBatch, masked):
        """Add one micro-batch to this step's counts."""
        pixels = mb.inputs["pixels"]
        for i, n in enumerate((int(mb.attn.sum()), int(masked.sum()), 0 if pixels is None else pixels.shape[0])):
            self.step[i] += n
        self.step[3] = max(self.step[3], mb.attn.shape[1])

    def step_done(self):
        """Close one step: its tokens and its FLOPs (model.step_flops: 6 N per trained token, plus the
        attention and the head on the masked rows only)."""
        n_tok, n_masked, n_img, seq = self.step
        self.tokens += n_tok
        self.flops += step_flops(self.mc, n_tok, seq, n_masked, n_img, self.trains["llm"], self.trains["vision"],
                                 self.trains["projector"])
        self.step = [0, 0, 0, 0]

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
    # Under torchrun each process runs this same function; rank 0 alone checks and locks out_dir (cli.py),
    # the others wait at the barrier (if rank 0 refuses, torchrun ends them with it).
    info = setup(pick_device(tc.device))
    log = (lambda *a: None) if quiet or not info.main else (lambda *a: print(*a, flush=True))
    lock = claim_out_dir(tc, log) if info.main else None
    barrier()  # the other processes start once rank 0 has claimed the folder
    try:
        return _train(tc, mc, info, log)
    finally:
        release_lock(lock)


@dataclass
class Run:
    """What setup() builds, for the loop and the end of the run."""
    tok: object            # tokenizer.Tokenizer
    synthetic: object      # synthetic.SyntheticVQA: the toy's training draws and its held-out questions
    model: LLaDAV          # the model; its state is what checkpoints hold
    fwd: object            # what the loop calls: the model, wrapped by DDP / FSDP2 (and torch.compile)
    opt: torch.optim.Optimizer
    parallel: str          # none | ddp | fsdp
    fmt: str               # checkpoint format: pt | dcp
    llava: object          # --data: data.MicroBatches, else None
    bad: object            # --data: data.BadSampleCounter, else None
    micro: int             # sequences per process per forward
    accum: int             # micro-batches per step


def build(tc: TrainConfig, mc, info, log) -> Run:
    """Tokenizer, data, model, optimizer and checkpoint format."""
    device = info.device
    torch.manual_seed(tc.seed)  # the model's initial weights; every later random draw has its own seed
    tok = load_tokenizer(tc, mc)
    micro, accum = check_options(tc, mc, tok, info)
    try:
        synthetic = SyntheticVQA(tok, mc.vision.image_size, mc.vision.n_patches, tc.gen_length, seed=tc.seed,
                                 system=default_system(mc.tokenizer), single_object_steps=tc.single_object_steps,
                                 kind_weights=tc.kind_weights, kind_weights_from=tc.kind_weights_from,
                                 one_object_share=tc.one_object_share)
    except ValueError as e:
        sys.exit(f"--kind_weights: {e}")
    # built in fp32 on the CPU, moved once: init_weights draws from the global RNG seeded above, so the same
    # seed gives the same initial weights on every machine and process count (DDP / FSDP2 start equal)
    model = LLaDAV(mc)
    model.init_weights()
    if tc.init_from:
        init_from(model, tc.init_from, tc.init_parts, log)
    if tc.lora_rank:  # after init_from: the adapters start at B = 0 on the weights just loaded
        add_lora(model, tc.lora_rank, tc.lora_alpha, tc.lora_targets, tc.lora_dropout,
                 torch.bfloat16 if device.type == "cuda" else None)
    model.to(device)
    model.llm.checkpointing, model.llm.head_chunk = tc.checkpointing, tc.head_chunk
    freeze(model, tc)  # before wrapping: DDP and FSDP2 must see which parameters train
    parallel = resolve_parallel(tc.parallel, 0 if tc.lora_rank else count_params(model)["total"], info)  # LoRA: DDP
    fwd = wrap(model, parallel, info, bf16=device.type == "cuda")  # call fwd; `model` holds the state
    if tc.optimizer == "muon":
        if parallel == "fsdp":
            sys.exit("--optimizer=muon needs whole weight matrices, and FSDP2 shards them; use --optimizer=adamw "
                     "or --parallel=ddp")
        opt = MuonAdamW(make_groups(model, tc), lr=tc.lr, betas=(0.9, tc.beta2), eps=1e-8)
    else:
        opt = torch.optim.AdamW(make_groups(model, tc), lr=tc.lr, betas=(0.9, tc.beta2), eps=1e-8,
                                fused=device.type == "cuda" and parallel != "fsdp")
    # pt: one file, simple, fine for one process; dcp: sharded, written by every process in parallel and
    # loadable on any other number of processes, the only option under FSDP2
    fmt = tc.ckpt_format if tc.ckpt_format != "auto" else "dcp" if (info.on or tc.data) else "pt"
    if fmt == "pt" and parallel == "fsdp":
        sys.exit(f"--ckpt_format={tc.ckpt_format}: FSDP2 needs dcp; use --ckpt_format=dcp or auto")
    # --data: LLaVA records read by DataLoader workers, and the counter of records skipped as bad
    llava, bad = open_llava(tc, mc, tok, info.world, info.rank, micro) if tc.data else (None, None)
    tc.warmup_steps = warmup_of(tc)
    return Run(tok, synthetic, model, fwd, opt, parallel, fmt, llava, bad, micro, accum)


def _train(tc: TrainConfig, mc, info, log):
    """train()'s body, run while this process holds out_dir's lock."""
    run = build(tc, mc, info, log)
    model, fwd, opt, device = run.model, run.fwd, run.opt, info.device
    # resume: weights, optimizer moments and the step; the data order and the masks are functions of
    # (seed, step), so nothing else needs saving for the run to continue bit for bit (tests/kill_resume.py)
    step, bad_prev, last_ckpt = 0, {}, None
    if tc.resume:
        step, bad_prev, path = resume(tc, mc, model, opt, info, log)
        last_ckpt = (path, step)
    if tc.compile:
        fwd = torch.compile(fwd)
    describe(tc, run, info, log)
    heldout = run.synthetic.heldout(max(tc.eval_quick, tc.eval_final)) if not tc.data else []
    trains = {k: any(p.requires_grad for p in getattr(model, k).parameters()) for k in ("llm", "vision", "projector")}
    if tc.data:
        run.bad.errors.update(bad_prev)
    newline_trains = hasattr(model, "image_newline") and model.image_newline.requires_grad
    needs_image = info.on and (trains["vision"] or trains["projector"] or newline_trains)
    stream = iter(run.llava.iterate(step)) if tc.data else None  # the data order continues from `step`
    batches = StepBatches(tc, mc, run.tok, info, run.accum, run.micro, run.synthetic, stream, run.bad, needs_image)
    meter, jlog = Meter(tc, mc, info, step, trains), JsonlLog(tc.jsonl if info.main else None)

    # --- the loop: a batch -> forward_process -> model -> loss -> backward, then one optimizer step ---
    model.train()
    while step < tc.max_steps:
        lr = lr_at(step, tc)  # a pure function of the step, so a resumed run picks it up where it was
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]  # per component: LLM x1, ViT and projector x their scales
        opt.zero_grad(set_to_none=True)
        logging = (step + 1) % tc.log_every == 0 or step + 1 == tc.max_steps
        step_loss, micro_batches = 0.0, batches(step)
        for a, mb in enumerate(micro_batches):
            # the forward process q(x_t | x0): t ~ U(0,1) per sequence, each answer token -> [MASK] with
            # probability p_mask = (1 - eps) t + eps; x_t (n, L), masked (n, L) bool, p_mask (n,)
            xt, masked, p_mask = forward_process(mb.x0, mb.labels, run.tok.mask_id, generator=mb.rng,
                                                 stratified=tc.stratified_t, exact_count=tc.exact_count)
            xt, masked, p_mask, labels = xt[mb.rows], masked[mb.rows], p_mask[mb.rows], mb.labels[mb.rows]
            with gradient_sync(fwd, run.parallel, a == len(micro_batches) - 1):  # once, after the last one
                with autocast(device):  # the model predicts every masked token at once; the output head
                    # runs at the masked rows only: logits (N_masked, V), or per-row CE with --head_chunk
                    out = fwd(xt, output_positions=masked, targets=labels[masked] if tc.head_chunk else None,
                              **mb.inputs)
                # the likelihood bound: CE on the masked tokens / p_mask, normalised per sequence (SFT form)
                loss = diffusion_loss(None if tc.head_chunk else out, labels, masked, p_mask, mode=tc.loss_mode,
                                      weighting=tc.weighting, ce=out if tc.head_chunk else None)
                loss = loss * mb.share  # summed over micro-batches, averaged over processes = the batch's loss
                loss.backward()
            step_loss += loss.item() if logging else 0.0  # .item() waits for the GPU: only when logging
            meter.count(mb, masked)
        # clip ||g|| to grad_clip. The norm is of the whole gradient (all processes, all shards: the same
        # number everywhere), so the finiteness check below stops every process at the same step.
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        if not math.isfinite(float(norm)):  # NaN / Inf loss: stop before it reaches the weights
            nonfinite_stop(step + 1, float(norm), last_ckpt)
        opt.step()  # MuonAdamW or AdamW: bias-corrected moments, decoupled weight decay (0 in LLaDA-V)
        step += 1
        meter.step_done()
        # --- bookkeeping, after the step: log line (and JSON line), quick held-out check, checkpoint ---
        if logging:
            log_step(tc, run, info, meter.record(step, step_loss, lr), lr, log, jlog)
        if tc.eval_every and tc.eval_quick and step % tc.eval_every == 0 and step < tc.max_steps \
                and can_evaluate(tc, run, info):
            log(f"  held-out ({tc.eval_quick}): " + format_eval(evaluate(model, run.tok, heldout[:tc.eval_quick],
                                                                          **gen_options(tc))))
        if step % tc.ckpt_every == 0 or step == tc.max_steps:  # a resume restarts from the newest of these
            last_ckpt = (save(tc, mc, run.fmt, step, model, opt, run.tok, run.bad, info), step)
    return finish(tc, mc, run, info, log, step, time.time() - meter.t_start, step - meter.first, heldout)


def describe(tc, run: Run, info, log):
    n = count_params(run.model)
    log(f"preset {tc.preset}: {n['total'] / 1e6:.2f}M parameters (language model {n['language model'] / 1e6:.2f}M, "
        f"vision {n['vision tower'] / 1e6:.2f}M, projector {n['projector'] / 1e6:.3f}M) on {info.device}" + (f"; LoRA trains "
        f"{sum(p.numel() for p in run.model.parameters() if p.requires_grad) / n['total']:.3%} of them" if tc.lora_rank else ""))
    if info.on or run.accum > 1 or tc.stage:
        log(f"stage {tc.stage} | {info.world} process(es), {run.parallel} | global batch {tc.batch_size} = "
            f"{run.micro} x {info.world} x {run.accum} accumulation | checkpoints: {run.fmt} | activation "
            f"checkpointing {tc.checkpointing}")


def gen_options(tc) -> dict:
    """The sampler settings of the quick checks and the final report (sample.py's, from the same options)."""
    return dict(gen_length=tc.gen_length, steps=tc.sample_steps, block_length=tc.block_length)


def can_evaluate(tc, run: Run, info) -> bool:
    """The held-out questions are the synthetic data's, and evaluate() needs the whole model in one process."""
    return not tc.data and run.parallel != "fsdp" and info.main


def log_step(tc, run: Run, info, rec: dict, lr: float, log, jlog):
    log(f"step {rec['step']:5d}/{tc.max_steps} | loss {rec['loss']:.4f} | lr {lr:.2e} | {rec['tok_per_s']:,.0f} tok/s"
        f" | {rec['ms_per_step']:.0f} ms/step | ETA {rec['eta_s']:.0f}s | MFU {100 * rec['mfu']:.1f}% | "
        f"peak mem {rec['peak_mem_gib']:.2f} GiB")
    jlog.write({k: v for k, v in rec.items() if k != "ms_per_step"})
    if tc.data:
        n_bad, n_seen = all_sum([run.bad.bad, run.bad.seen], info)
        run.bad.check(n_bad, n_seen)
        if n_bad:
            log(f"  skipped {n_bad:.0f} of {n_seen:.0f} samples so far (this process: {run.bad.summary()})")


def finish(tc, mc, run: Run, info, log, step, train_time, steps_run, heldout):
    """The end: export (model.safetensors + config.json, hf/ in the official format, a weights-only ckpt.pt for
    a DCP run: what sample.py, the bench and the next stage's --init_from read), then the held-out report. report.json is
    written last, so its presence means "finished"."""
    log(f"trained {steps_run} steps in {train_time:.0f}s; checkpoint "
        f"{os.path.join(tc.out_dir, 'ckpt.pt') if run.fmt == 'pt' else os.path.join(tc.out_dir, 'dcp')}")
    export(run.model, tc.out_dir, mc.to_dict(), info, write_pt=run.fmt == "dcp",
           extra={"tokenizer": run.tok.to_dict(), "train_config": asdict(tc)})
    report = {"train_seconds": train_time, "steps": step}
    if tc.data:
        report["bad_samples"] = dict(run.bad.errors)
        log(f"bad samples skipped: {run.bad.summary()}")
    if tc.eval_final and can_evaluate(tc, run, info):
        t0 = time.time()
        final = evaluate(run.model, run.tok, heldout[:tc.eval_final], **gen_options(tc))
        blank = evaluate(run.model, run.tok, heldout[:tc.eval_final], blank=True, **gen_options(tc))
        log(f"held-out report ({time.time() - t0:.0f}s of sampling):")
        log(f"  images:       {format_eval(final)}")
        log(f"  blank images: {format_eval(blank)}   <- near chance: the answers come from the image")
        if curriculum_note(step, tc.single_object_steps, tc.kind_weights_from):  # a run shorter than the curriculum
            log(f"  note: {curriculum_note(step, tc.single_object_steps, tc.kind_weights_from)}")
        report.update(heldout=final, blank_images=blank)
    if info.main:
        write_text(os.path.join(tc.out_dir, "report.json"), json.dumps(report, indent=1))
    barrier()
    return run.model, report


def main(argv):
    tc, mc = parse_args(argv)
    t = time.time()
    train(tc, mc)
    teardown()
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line, not one per process
        print(f"total wall time {time.time() - t:.0f}s")


if __name__ == "__main__":
    run_cli(main)  # a bad option or file: one line, no traceback (LLADA_DEBUG=1 shows it)
