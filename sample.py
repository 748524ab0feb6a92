"""
Ask a trained LLaDA-V about an image: the reverse diffusion process end to end.

Where this sits in the flow: image -> ViT -> projector -> tokens -> [the sampler, backwards from masks].
    image -> preprocess (the model's image mode) -> ViT -> projector -> visual tokens    (encoded once)
    prompt = chat template with the visual tokens spliced in at <image>
    answer = generate(): start from gen_length [MASK]s and, step by step, reveal the tokens the model
             is most confident about (diffusion.py), then cut at the stop (<|eot_id|>) or EOS.

One answer path, answer(), for three kinds of model, each answered the way it was trained:
    the toy (trained on synthetic scenes): its own prompt form and sampler lengths (its training run's);
    LLaDA-V (the official weights, or a model this code trained on LLaVA data): the official prompt form,
        its image packing (anyres crops with image_newline), banned ids, stop strings, 128 / 128 / 128,
        float16 on CUDA (ML-GSAI/LLaDA-V train/generate_demo.py);
    a text LLaDA: blocks of 32 in bfloat16 on CUDA (ML-GSAI/LLaDA chat.py).

Usage:
    python sample.py                                   # out/ (the toy), a fresh synthetic image
    python sample.py --image=cat.png --question="What color is the circle?"
    python sample.py --show_steps=1                    # print the canvas after every step
    python sample.py --mode=threshold+dual             # fast decoding (diffusion.py): exact | prefix | dual |
                                                       # threshold | threshold+prefix | threshold+dual
    python sample.py --eval=1 --modes=exact,threshold+dual   # held-out accuracy, NFE and time per mode
    python sample.py --eval_choice=1                   # multiple choice by the likelihood bound
    python sample.py --checkpoint=LLaDA-V --image=cat.jpg --question="What is in the picture?"
    python sample.py --checkpoint=LLaDA-V --image=cat.jpg --chat=1      # multi-turn, questions from stdin
The GIF of the denoising: python -m tools.draw --gif=out.gif. Benchmarks: python -m tools.eval (docs/eval.md).
train.py uses answer() and evaluate() (held-out accuracy per question kind) for its reports.
"""
import contextlib
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from cli import autocast, opt, parse_config, pick_device, run_cli
from data import answer_text, default_system, prompt_batch, sft_example
from diffusion import MODES, check_schedule, choose, generate, mode_kwargs
from model import LLaDAV
from synthetic import (CHOICES, DEMO_OFFSET, GRID, KINDS, SyntheticVQA, candidates, draw, make_sample, score,
                       toy_tokenizer)
from tokenizer import config_mask_id, get_tokenizer
from vision import load_image, preprocess, process_image


# Each family's official sampler settings, used where an option is left unset (the toy: its training run's).
OFFICIAL = {
    # LLaDA-V: generate_demo.py's steps = gen_length = block_length = 128, float16 on CUDA (builder.py's
    # load_pretrained_model), stop at <|eot_id|> (ML-GSAI/LLaDA-V train/generate_demo.py)
    "llada_v": dict(gen_length=128, steps=128, block_length=128, cuda_dtype=torch.float16),
    # text LLaDA-8B-Instruct: blocks of 32 in bfloat16 (ML-GSAI/LLaDA chat.py, generate.py's main, app.py);
    # LLaDA's EVAL.md: without blocks the Instruct model fills the canvas with too many EOS tokens
    "llada": dict(gen_length=128, steps=128, block_length=32, cuda_dtype=torch.bfloat16),
}


def image_tokens(model, images):
    """PIL images (None: a question without one) -> (visual tokens (sum N_i, d) in prompt order, or None;
    [N_i] per question). Each image is packed the way the model was trained (its image_aspect_ratio: one
    square crop for the toy and stage 1, base + crops with image_newline from stage 2 on; vision.py)."""
    counts = [0] * len(images)
    if not isinstance(model, LLaDAV) or all(im is None for im in images):
        return None, counts
    device, S = next(model.parameters()).device, model.cfg.vision.image_size
    crops = {i: process_image(im, model.cfg.image_aspect_ratio, S) for i, im in enumerate(images) if im is not None}
    if all(c.shape[0] == 1 for c, _ in crops.values()) and not hasattr(model, "image_newline"):
        # one square crop each: one tower call over the batch, (n, N, d)
        feats = list(model.encode_images(torch.cat([c for c, _ in crops.values()]).to(device)))
    else:
        feats = [model.encode_image_crops(c.to(device), size) for c, size in crops.values()]  # each (N_i, d)
    for i, f in zip(crops, feats):
        counts[i] = f.shape[0]
    return torch.cat(feats), counts


@torch.no_grad()
def answer(model, tok, images, questions, official=False, history=(), think=None, stop=("<|eot_id|>",),
           lmms_eval=False, gen_length=16, steps=16, block_length=16, temperature=0.0, cfg_scale=0.0,
           remasking="low_confidence", mode="exact", threshold=0.9, refresh_every=0, callback=None, stats=None,
           return_canvas=False):
    """The one answer path: a batch of questions (each with its PIL image, or None) -> the answer strings,
    through the one sampler, diffusion.generate, in any decoding mode (diffusion.MODES; threshold and
    refresh_every as there). Prompts are left-padded (data.prompt_batch), the images packed as trained.
    official=False, the toy: the prompt in its training form, no banned ids, each answer cut at its first
    <|eot_id|> / EOS (the toy pads its answers with EOS), under autocast.
    official=True, LLaDA-V as its demo and lmms-eval answer (llava_llada.py::generate, generate_with_embeds):
    the inference prompt form (data.tokenizer_image_token), EOS / BOS / header ids banned, the `stop`
    strings (an empty one is dropped), float64 confidence, weights in the inference dtype, no autocast.
    A text-only LLaDA (no vision tower): the plain generate.py sampler, cut at the first EoT / EOS.
    history: earlier (question, answer) turns, re-rendered through the template; think: LLaDA-V's
    " /think" switch; lmms_eval: decode as lmms-eval read the benchmark answers (decode_answer).
    stats: a dict into which model calls (nfe, full_nfe) are added up. return_canvas: also the (B, G) canvases."""
    device = next(model.parameters()).device
    is_v = isinstance(model, LLaDAV)  # a text-only LLaDA has no vision tower and takes embeddings
    if images is None:
        images = [None] * len(questions)
    if any(im is not None for im in images) and not is_v:
        raise ValueError("this checkpoint is a text-only LLaDA; drop --image or use a LLaDA-V model")
    ctx = contextlib.nullcontext() if official else autocast(device)
    with ctx:
        feats, counts = image_tokens(model, images)       # encoded once, not per step
    system = default_system(model.cfg.tokenizer) if is_v else None
    ids, attn = prompt_batch(tok, questions, counts, system, think, history, keep_after_image=not official)
    P, context = ids.shape[1], (model.cfg.lm if is_v else model.cfg).max_seq_len
    if P + gen_length > context:
        raise ValueError(f"prompt ({P} tokens) + gen_length ({gen_length}) exceeds the model's context "
                         f"max_seq_len={context}; shorten the question or lower --gen_length")
    gen = dict(steps=steps, gen_length=gen_length, block_length=block_length, temperature=temperature,
               cfg_scale=cfg_scale, remasking=remasking, mask_id=tok.mask_id, eos_id=tok.eos_id, eot_id=tok.eot_id,
               refresh_every=refresh_every, callback=callback, stats=(st := {}), **mode_kwargs(mode, threshold))
    # the official batch-1 code sends no attention mask; a padded batch needs one
    mask = attn.to(device) if not official or not attn.all() else None
    fn = model if is_v else lambda x, attention_mask=None, **k: model(model.embed_tokens(x), attention_mask, **k)
    if official and is_v:  # LLaDA-V's rules: the answers come back cut before their stop (generate_with_embeds)
        gen.update(banned_ids=(tok.eos_id, tok.bos_id, tok.start_header_id, tok.end_header_id),
                   stop_sequences=[tok.encode(s) for s in stop if s])
    with ctx:
        out = generate(fn, ids.to(device), attention_mask=mask, **gen, **({"image_features": feats} if is_v else {}))
    if stats is not None:
        for k in ("nfe", "full_nfe"):
            stats[k] = stats.get(k, 0) + st[k]
    if official and is_v:  # out: the B answers, each cut before its stop (a list of ids)
        return [decode_answer(tok, row, lmms_eval) for row in out]
    rows = [row[P:] for row in out.tolist()]  # out (B, P + G): the canvases follow the prompts
    if official:  # text LLaDA: up to the first EoT / EOS
        return [decode_answer(tok, row[:next((i for i, t in enumerate(row) if t in (tok.eot_id, tok.eos_id)),
                                             len(row))], lmms_eval) for row in rows]
    texts = [answer_text(tok, row) for row in rows]
    return (texts, out[:, P:]) if return_canvas else texts


def evaluate(model, tok, samples, batch_size=100, blank=False, **gen):
    """Exact-match accuracy per question kind on `samples` (image, question, answer, kind); for
    'describe' also the per-object accuracy. blank=True replaces every image by an empty canvas.
    gen: answer()'s sampling options, decoding mode included (train.py's report and --eval use it).
    Returns {kind: accuracy, "all": accuracy over every question, "describe_objects", "n"}."""
    was_training = model.training
    model.eval()  # dropout-free and deterministic at T = 0; the training mode is put back at the end
    size = samples[0][0].size[0]
    hits, n, obj_hit, obj_n = defaultdict(int), defaultdict(int), 0, 0
    for i in range(0, len(samples), batch_size):
        # one left-padded batch of questions through the one sampler (diffusion.generate)
        chunk = samples[i:i + batch_size]
        # blank=True: the same questions about an empty canvas, a baseline for how much the image is used
        imgs = [draw([], size, blank=True) if blank else s[0] for s in chunk]
        preds = answer(model, tok, imgs, [s[1] for s in chunk], **gen)
        for (_, _, truth, kind), pred in zip(chunk, preds):  # score: exact match, plus objects for 'describe'
            exact, oh, on = score(kind, pred, truth)
            hits[kind] += exact
            n[kind] += 1
            obj_hit, obj_n = obj_hit + oh, obj_n + on
    model.train(was_training)
    res = {k: hits[k] / n[k] for k in KINDS if n[k]}
    res["all"] = sum(hits.values()) / max(1, sum(n.values()))
    res["describe_objects"] = obj_hit / max(1, obj_n)
    res["n"] = sum(n.values())
    return res


def format_eval(res) -> str:
    kinds = " ".join(f"{k} {100 * res[k]:.1f}%" for k in KINDS if k in res)
    return (f"exact match {100 * res['all']:.1f}% over {res['n']} questions | {kinds} | "
            f"describe per-object {100 * res['describe_objects']:.1f}%")


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def inference_dtype(name: str, device: torch.device, family: str = "llada_v"):
    """--dtype -> a torch dtype, or None for the checkpoint's own. 'auto' is the family's official inference
    precision on CUDA (OFFICIAL: LLaDA-V float16, images cast to it; text LLaDA bfloat16); on a CPU, where
    half-precision matmuls are slow, the checkpoint's dtype. Raises ValueError for an unknown name."""
    if name == "auto":
        return OFFICIAL[family]["cuda_dtype"] if device.type == "cuda" else None
    if name not in DTYPES:
        raise ValueError(f"--dtype={name}: use auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def decode_answer(tok, ids, lmms_eval=False) -> str:
    """Answer ids -> text. Default: decode everything and strip white space. lmms_eval=True is how
    LLaDA-V's benchmark numbers were read (ML-GSAI/LLaDA-V
    eval/lmms-eval/lmms_eval/models/llava_onevision_llada.py::generate_until): special tokens skipped (here: every token
    of the tokenizer's special / added set), then ONE trailing "." removed, then white space stripped."""
    if not lmms_eval:
        return tok.decode(ids).strip()
    special = set(tok.special.values())
    text = tok.decode([i for i in ids if i not in special])
    return (text[:-1] if text.endswith(".") else text).strip()


def eval_modes(model, tok, samples, modes, batch_size=1, **gen):
    """Held-out accuracy, model calls and wall time for each decoding mode -> list of result dicts (evaluate()'s,
    plus mode, seconds, and nfe / full_nfe: model calls / full-sequence passes per batch). Every mode answers the
    same questions with the same sampler, so the rows differ only in the decoding options."""
    rows = []
    for mode in modes:
        stats = {}  # answer() adds each batch's calls here
        t0 = time.perf_counter()
        res = evaluate(model, tok, samples, batch_size=batch_size, mode=mode, stats=stats, **gen)
        res.update(mode=mode, seconds=time.perf_counter() - t0,
                   nfe=stats["nfe"] / math.ceil(len(samples) / batch_size),
                   full_nfe=stats["full_nfe"] / math.ceil(len(samples) / batch_size))
        rows.append(res)
        print(f"  {mode:17s} {format_eval(res)} | {res['nfe']:.2f} calls per batch | {res['seconds']:.1f}s", flush=True)
    return rows


@torch.no_grad()
def evaluate_choice(model, tok, samples, gen_length=16, mc_num=16, batch_size=16, cfg_scale=0.0, seed=0):
    """Multiple choice by the likelihood bound (diffusion.choose, as lm-eval's loglikelihood tasks):
    each candidate answer is scored as the canvas the model was trained on (answer, <|eot_id|>, EOS
    padding to gen_length), and the best one is the prediction. -> accuracy per kind (closed kinds only)."""
    device = next(model.parameters()).device
    batch_size = max(d for d in range(1, min(mc_num, batch_size) + 1) if mc_num % d == 0)  # copies per pass | mc_num
    g = torch.Generator().manual_seed(seed)
    hits, n = defaultdict(int), defaultdict(int)
    for img, q, truth, kind in samples:
        if kind not in CHOICES:
            continue
        with autocast(device):
            feats = model.encode_images(preprocess(img, model.cfg.vision.image_size)[None].to(device))
        # Every candidate ("red", "green", ... or the two named objects of a relation question) is written
        # out as a full training canvas; they share the prompt, so only the answer part is scored.
        cands = candidates(kind, q)
        seqs = [sft_example(tok, q, c, gen_length, feats.shape[1], default_system(model.cfg.tokenizer))
                for c in cands]
        P = seqs[0][1].count(-100)  # prompt length: the positions whose label is IGNORE_INDEX
        prompt = torch.tensor(seqs[0][0][:P], device=device)
        # choose() masks l ~ U{1..A} answer tokens per Monte-Carlo copy and sums (A / l) CE: a lower bound
        # on log p(answer | prompt, image) per candidate; the image features are shared by every copy.
        with autocast(device):
            best, _ = choose(model, prompt, [torch.tensor(ids[P:], device=device) for ids, _ in seqs],
                             mc_num=mc_num, batch_size=batch_size, cfg_scale=cfg_scale, mask_id=tok.mask_id,
                             generator=g, image_features=feats.expand(batch_size, -1, -1))
        hits[kind] += cands[best] == truth
        n[kind] += 1
    res = {k: hits[k] / n[k] for k in n}
    res["all"], res["n"] = sum(hits.values()) / max(1, sum(n.values())), sum(n.values())
    return res


def format_modes_table(rows) -> str:
    """The decoding-mode table of docs/performance.md; speed-ups are relative to the first row (normally
    'exact'), both in wall time and in model calls (a cached call is cheaper than a full one)."""
    ref = rows[0]
    out = ["| mode | accuracy | " + " | ".join(KINDS) + " | model calls per batch (full passes) | wall time | "
           "speed-up (time / calls) |", "|---" * (len(KINDS) + 5) + "|"]
    for r in rows:
        kinds = " | ".join(f"{100 * r[k]:.1f}" for k in KINDS if k in r)
        out.append(f"| {r['mode']} | {100 * r['all']:.1f}% | {kinds} | {r['nfe']:.2f} ({r['full_nfe']:.2f}) | "
                   f"{r['seconds']:.1f} s | {ref['seconds'] / r['seconds']:.2f}x / {ref['nfe'] / r['nfe']:.2f}x |")
    return "\n".join(out)


@dataclass
class SampleConfig:
    # The options of sample.py, --key=value (cli.parse_config): the rule in opt() says what each accepts,
    # the comment after it is its --help. Sampler settings left unset come from the checkpoint's training run.
    checkpoint: str = opt("out/ckpt.pt", path="any")  # a train.py run (its folder or ckpt.pt), or a Hugging Face folder
                                                      # (the official weights, e.g. GSAI-ML/LLaDA-V)
    image: str = opt("", path="file")   # an image file; none: a fresh synthetic image (our checkpoints)
    question: str = ""                  # the question; none: the synthetic image's own question
    seed: int = opt(0, min=0)           # the synthetic image and the sampler's randomness
    device: str = opt("auto", device=True)  # auto = cuda > cpu
    gen_length: int | None = opt(None, min=1)    # answer canvas in tokens (unset: the toy's training run's; 128 for
                                                 # LLaDA-V and text LLaDA, their official value)
    steps: int | None = opt(None, min=1)         # sampler steps (unset: as trained; official: 128)
    block_length: int | None = opt(None, min=1)  # semi-autoregressive block length (unset: as trained; official:
                                                 # 128 for LLaDA-V, 32 for text LLaDA)
    temperature: float = opt(0.0, min=0)         # Gumbel noise on the logits; 0 = greedy
    cfg_scale: float = opt(0.0, min=0)           # classifier-free guidance; 0 = off
    remasking: str = opt("low_confidence", choices=("low_confidence", "random"))  # which masks a step reveals
    show_steps: bool = False                     # print the canvas after every step
    mode: str = opt("exact", choices=tuple(MODES))  # decoding mode (diffusion.py): exact, KV caches, threshold
    threshold: float = opt(0.9, min=0)           # confidence threshold of the threshold modes (above 1: one token a step)
    refresh_every: int = opt(0, min=0)           # cached modes: refresh the cache every N steps (0: at block starts)
    eval: bool = False                           # held-out accuracy, model calls and time for each of --modes
    n: int = opt(500, min=1)                     # held-out questions for --eval / --eval_choice
    batch_size: int = opt(1, min=1)              # questions decoded together in --eval
    eval_choice: bool = False                    # multiple choice by the likelihood bound (diffusion.choose)
    mc_num: int = opt(16, min=1)                 # Monte-Carlo samples per candidate in --eval_choice
    modes: str = opt(",".join(MODES), each=tuple(MODES))  # the decoding modes --eval compares
    # --- the official model (--checkpoint=<Hugging Face folder>) ---
    dtype: str = opt("auto", choices=("auto", *DTYPES))  # weights' dtype; auto: the family's official one on CUDA
                                                         # (LLaDA-V fp16, text LLaDA bf16), as stored on CPU
    chat: bool = False                           # multi-turn: questions from stdin ('exit' or an empty line ends)
    think: str = opt("", choices=("", "think", "no_think"))  # LLaDA-V's reasoning switch; empty: none
    stop: str = "<|eot_id|>"                     # stop sequences, comma-separated (typed \n, \t: newline, tab)
    tokenizer: str = opt("", path="any", also=("toy",))  # tokenizer.json or folder (default: the checkpoint's)
    adapter: str = opt("", path="dir")           # a LoRA adapter folder in PEFT's format (train.py --lora_rank's out_dir)

    def check(self):
        """Options that must agree with each other (the sampler's block schedule), before any loading."""
        if self.gen_length is not None and self.block_length is not None:  # unset: the checkpoint's, checked then
            check_schedule(self.gen_length, self.block_length, self.steps, "--")


def load(sc, device):
    """--checkpoint -> (model, tokenizer, official, defaults). Three kinds of checkpoint, one answer path:
      a Hugging Face folder (the official LLaDA-V or LLaDA): answered the official way;
      a train.py run folder, its ckpt.pt, or its export out_dir/hf (checkpoint.export_hf): a model trained on
          LLaVA data (--data, any --stage) is answered as LLaDA-V is (it was trained in its format); the toy,
          trained on synthetic scenes, its own way. All three give the same answers (tests/test_export.py).
    defaults: the sampler lengths where an option is unset: the family's official ones (OFFICIAL), or
    for the toy its training run's (sampling as trained reproduces what its report measured)."""
    from checkpoint import (check_tokenizer_fits, from_pretrained, is_llada_v, load_adapter, load_checkpoint,
                            read_config, read_export)
    from cli import MARKER
    path = sc.checkpoint
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, MARKER)):  # a train.py run folder
        path = os.path.join(path, "ckpt.pt")
    if os.path.isdir(path):
        family = "llada_v" if is_llada_v(read_config(path)) else "llada"
        trained, toy_tok = read_export(path)  # ({}, None) for the official weights
        official = not trained or bool(trained.get("data"))  # the toy: trained on synthetic scenes
        dtype = inference_dtype(sc.dtype, device, family) if official else None  # the toy: as trained (autocast)
        model = from_pretrained(path, dtype=dtype, device=device)
        tok_path, tok = sc.tokenizer or ("" if toy_tok else path), toy_tok
        if toy_tok is not None:  # trained with the toy tokenizer: its prompts carry no system turn
            model.cfg.tokenizer = "toy"
            check_tokenizer_fits(toy_tok, model, path)
    else:
        model, tok, ckpt = load_checkpoint(path, device)
        trained = ckpt.get("train_config", {})
        official, family, tok_path = bool(trained.get("data")), "llada_v", sc.tokenizer
        if official:
            model = model.to(dtype=inference_dtype(sc.dtype, device, "llada_v") or next(model.parameters()).dtype)
    if tok_path:  # --tokenizer, or the folder's own; the model config's [MASK] id wins over the file's
        lm = model.cfg.lm if isinstance(model, LLaDAV) else model.cfg
        tok = toy_tokenizer() if tok_path == "toy" else get_tokenizer(tok_path, config_mask_id(lm.mask_id))
        check_tokenizer_fits(tok, model, tok_path)
    if sc.adapter:  # LoRA on top of the checkpoint: y = W x + (alpha / r) B A x at every adapted layer
        load_adapter(model, sc.adapter)
    if official:
        defaults = {k: OFFICIAL[family][k] for k in ("gen_length", "steps", "block_length")}
    else:
        G = trained.get("gen_length", 16)
        defaults = dict(gen_length=G, steps=trained.get("sample_steps", G), block_length=trained.get("block_length", G))
    defaults["seed"] = int(trained.get("seed", 0))  # the training run's: its held-out split (--eval)
    return model.eval(), tok, official, defaults


def step_printer(tok, G: int):
    """--show_steps: the sampler's callback(x, step, block) printing row 0's canvas ("_" for a mask)."""
    def show(x, step, block):
        canvas = x[0, -G:].tolist()
        print(f"step {step + 1:3d} (block {block}): " + " ".join(
            "_" if t == tok.mask_id else repr(tok.decode([t]))[1:-1] or "''" for t in canvas))
    return show


def gen_options(sc, defaults: dict, official: bool) -> dict:
    """The sampler options of answer(): the ones given, the defaults for the rest."""
    gen = {k: getattr(sc, k) or defaults[k] for k in ("gen_length", "steps", "block_length")}
    gen.update(temperature=sc.temperature, cfg_scale=sc.cfg_scale, remasking=sc.remasking, mode=sc.mode,
               threshold=sc.threshold, refresh_every=sc.refresh_every)
    if official:  # typed \n, \t in --stop: newline, tab
        gen.update(official=True, think=sc.think or None,
                   stop=tuple(x.replace("\\n", "\n").replace("\\t", "\t") for x in sc.stop.split(",")))
    return gen


def main(argv):
    """python sample.py --key=value ...: every option is checked first (SampleConfig; --help lists them)."""
    sc = parse_config(SampleConfig, argv, __doc__)
    device = pick_device(sc.device)
    t0 = time.time()
    try:
        model, tok, official, defaults = load(sc, device)
        img = load_image(sc.image) if sc.image else None
    except (FileNotFoundError, ValueError) as e:
        sys.exit(str(e))
    gen = gen_options(sc, defaults, official)
    if official:
        print(f"loaded {sc.checkpoint} ({type(model).__name__}, {next(model.parameters()).dtype}) on {device} "
              f"in {time.time() - t0:.1f}s")
    if sc.eval or sc.eval_choice:
        if official:
            sys.exit("--eval / --eval_choice score the toy's held-out questions; for a model trained on LLaVA data "
                     "or the official weights use the benchmarks: python -m tools.eval (docs/eval.md)")
        return main_eval(sc, model, tok, gen, defaults["seed"])
    if not official and (sc.chat or sc.think):
        sys.exit(f"--{'chat' if sc.chat else 'think'}: {sc.checkpoint} is the toy, trained on one question about "
                 f"one synthetic scene (no conversations, no reasoning); ask it with --question=...")
    if sc.show_steps:
        gen["callback"] = step_printer(tok, gen["gen_length"])
    torch.manual_seed(sc.seed)  # T > 0 or random remasking: a reproducible draw
    if official:
        return chat(sc, model, tok, img, gen)
    # The toy: the user's own image, or a fresh synthetic scene from a seed range training never draws from
    # (synthetic.DEMO_OFFSET), whose true answer is then printed beside the model's.
    truth = None
    if img is not None:
        print(f"(the toy knows only its own world: {model.cfg.vision.image_size}-pixel scenes of up to four "
              f"coloured circles, squares and triangles on a {GRID}x{GRID} grid; a photo gets arbitrary answers)")
        question = sc.question or "Describe the image."
    else:
        img, question, truth, _ = make_sample(DEMO_OFFSET + sc.seed, model.cfg.vision.image_size)
        question, truth = (sc.question, None) if sc.question else (question, truth)
        print(f"(synthetic image, seed {sc.seed}; save it with --image to reuse one of your own)")
    t0, stats = time.time(), {}
    try:
        (text,) = answer(model, tok, [img], [question], stats=stats, **gen)
    except ValueError as e:
        sys.exit(str(e))
    print(f"question: {question}")
    if truth is not None:
        print(f"truth:    {truth}")
    print(f"answer:   {text}")
    print(f"({gen['mode']} decoding: {stats['nfe']} model calls, gen_length {gen['gen_length']}, block_length "
          f"{gen['block_length']}, {time.time() - t0:.2f}s)")


def chat(sc, model, tok, img, gen):
    """One question, or a --chat (questions from stdin; earlier turns re-rendered through the template, as
    the official chat loops append to the previous output: the same tokens, up to re-tokenisation)."""
    history, question = [], sc.question or (None if sc.chat else "Describe the image." if img else "")
    if question == "":
        sys.exit("no --image and no --question: pass --question=\"...\" (or --chat to type questions)")
    while True:
        if question is None:  # --chat: read the next question
            try:
                question = input("you> ").strip()
            except EOFError:
                return
            if question in ("", "exit", "quit"):
                return
        t0, stats = time.time(), {}
        try:  # the image sits in the first user turn of the re-rendered conversation
            (text,) = answer(model, tok, [img], [question], history=history, stats=stats, **gen)
        except ValueError as e:
            sys.exit(str(e))
        print(f"question: {question}\nanswer:   {text}\n({gen['mode']} decoding: {stats['nfe']} model calls "
              f"({stats['full_nfe']} full), gen_length {gen['gen_length']}, block_length {gen['block_length']}, "
              f"{time.time() - t0:.2f}s)")
        if not sc.chat:
            return
        history.append((question, text))  # the next turn's prompt carries this answer
        question = None


def main_eval(sc, model, tok, gen, seed: int):
    """--eval (each of --modes) or --eval_choice on the held-out split train.py reports on."""
    samples = SyntheticVQA(tok, model.cfg.vision.image_size, model.cfg.vision.n_patches, gen["gen_length"],
                           seed=seed).heldout(sc.n)
    if sc.eval_choice:
        # Multiple choice scores each candidate answer by the likelihood bound instead of generating:
        # no sampler is involved, so --mode and the sampler options do not apply.
        t0 = time.time()
        res = evaluate_choice(model, tok, samples, gen["gen_length"], mc_num=sc.mc_num, cfg_scale=gen["cfg_scale"])
        kinds = " ".join(f"{k} {100 * res[k]:.1f}%" for k in CHOICES if k in res)
        print(f"multiple choice by likelihood (mc_num {sc.mc_num}): {100 * res['all']:.1f}% over "
              f"{res['n']} closed questions | {kinds} | {time.time() - t0:.1f}s")
        return
    gen = {k: v for k, v in gen.items() if k != "mode"}
    print(f"held-out evaluation: {len(samples)} questions, batch {sc.batch_size}, {gen}")
    try:
        rows = eval_modes(model, tok, samples, sc.modes.split(","), sc.batch_size, **gen)
    except ValueError as e:
        sys.exit(str(e))
    print(format_modes_table(rows))


if __name__ == "__main__":
    run_cli(main)  # a bad option or file: one line, no traceback (LLADA_DEBUG=1 shows it)
