"""
Ask a trained LLaDA-V about an image: the reverse diffusion process end to end.

    image -> preprocess -> ViT -> projector -> visual tokens  (encoded once)
    prompt = chat template with the visual tokens spliced in at <image>
    answer = generate(): start from gen_length [MASK]s and, step by step, reveal the tokens the model
             is most confident about (diffusion.py), then cut at the first <|eot_id|> / EOS.

Usage:
    python sample.py                                   # out/ckpt.pt, a fresh synthetic image
    python sample.py --image=cat.png --question="What color is the circle?"
    python sample.py --show_steps                      # print the canvas after every step
    python sample.py --mode=threshold+dual             # fast decoding (diffusion.py): exact | prefix | dual |
                                                       # threshold | threshold+prefix | threshold+dual
    python sample.py --gif=out.gif                     # an animation of the denoising
    python sample.py --eval --modes=exact,threshold+dual   # held-out accuracy, NFE and time per mode
    python sample.py --eval_choice                     # multiple choice by the likelihood bound
The official model (a Hugging Face directory, e.g. GSAI-ML/LLaDA-V; see docs/official.md):
    python sample.py --checkpoint=LLaDA-V --image=cat.jpg --question="What is in the picture?"
    python sample.py --checkpoint=LLaDA-V --image=cat.jpg --chat        # multi-turn, questions from stdin
    python sample.py --checkpoint=LLaDA-V --image=cat.jpg --mode=threshold+dual    # fast decoding, as above
    extra flags: --dtype=bf16|fp16|fp32 (default: fp16 on CUDA as the official inference, the checkpoint's
                 dtype on CPU),
                 --think=think|no_think, --stop="<|eot_id|>" (comma-separated), --tokenizer=<path>
This file also holds `answer()` and `evaluate()` (held-out accuracy per question kind), which
train.py uses for its reports.
"""
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from checkpoint import load_checkpoint
from data import (SYSTEM_PROMPT, answer_text, chat_template, default_system, llada_v_messages, prompt_batch,
                  sft_example, tokenizer_image_token)
from diffusion import MODES, choose, generate, mode_kwargs
from distributed import autocast, pick_device
from model import LLaDAV, opt, parse_config, run_cli
from synthetic import CHOICES, DEMO_OFFSET, KINDS, SyntheticVQA, candidates, draw, make_sample, score, toy_tokenizer
from vision import load_image, preprocess, process_image


@torch.no_grad()
def answer(model, tok, images, questions, gen_length=16, steps=16, block_length=16, temperature=0.0,
           cfg_scale=0.0, remasking="low_confidence", callback=None, return_canvas=False,
           mode="exact", threshold=0.9, refresh_every=0, stats=None):
    """Answer a batch of (image, question) pairs with our toy model. Returns the answer strings (and the
    raw canvases). The sampler is diffusion.generate with its official defaults (left-padded batch,
    EOS/EoT not banned: the toy model pads its answers with EOS, and each one is cut at its first
    <|eot_id|> / EOS). mode: a decoding mode of diffusion.MODES ('exact' = the official schedule);
    threshold / refresh_every: see diffusion.generate. stats: a dict into which model calls (nfe,
    full_nfe) are added up."""
    device = next(model.parameters()).device
    size = model.cfg.vision.image_size
    pixels = torch.stack([preprocess(im, size) for im in images]).to(device)
    with autocast(device):
        feats = model.encode_images(pixels)                       # (B, N, d): once, not per step
    ids, attn = prompt_batch(tok, questions, feats.shape[1], default_system(model.cfg.tokenizer))
    P = ids.shape[1]
    if P + gen_length > model.cfg.lm.max_seq_len:
        raise ValueError(f"prompt ({P} tokens) + gen_length ({gen_length}) exceeds the model's context "
                         f"max_seq_len={model.cfg.lm.max_seq_len}; shorten the question or lower --gen_length")
    st = {}
    with autocast(device):
        out = generate(model, ids.to(device), attn.to(device), steps=steps, gen_length=gen_length,
                       block_length=block_length, temperature=temperature, cfg_scale=cfg_scale, remasking=remasking,
                       mask_id=tok.mask_id, eos_id=tok.eos_id, eot_id=tok.eot_id, refresh_every=refresh_every,
                       callback=callback, stats=st, image_features=feats, **mode_kwargs(mode, threshold))
    if stats is not None:
        for k in ("nfe", "full_nfe"):
            stats[k] = stats.get(k, 0) + st[k]
    texts = [answer_text(tok, row[P:]) for row in out.tolist()]
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


def inference_dtype(name: str, device: torch.device):
    """--dtype for the official weights -> a torch dtype, or None for the checkpoint's own. 'auto' is
    float16 on CUDA, the official inference precision (REFERENCE 11.3: weights loaded in float16, images
    cast to it, generation under autocast); on a CPU, where float16 matmuls are slow, the checkpoint's
    dtype (bf16 for the released weights). Raises ValueError for an unknown name."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else None
    if name not in DTYPES:
        raise ValueError(f"--dtype={name}: use auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def decode_answer(tok, ids, lmms_eval=False) -> str:
    """Answer ids -> text. Default: decode everything and strip white space. lmms_eval=True is how
    LLaDA-V's benchmark numbers were read (REFERENCE 11.7): special tokens skipped (here: every token of
    the tokenizer's special / added set), then ONE trailing "." removed, then white space stripped."""
    if not lmms_eval:
        return tok.decode(ids).strip()
    special = set(tok.special.values())
    text = tok.decode([i for i in ids if i not in special])
    return (text[:-1] if text.endswith(".") else text).strip()


@torch.no_grad()
def answer_pretrained(model, tok, image, question, history=(), think=None, gen_length=128, steps=128,
                      block_length=128, temperature=0.0, cfg_scale=0.0, remasking="low_confidence",
                      stop=("<|eot_id|>",), callback=None, mode="exact", threshold=0.9, refresh_every=0,
                      stats=None, lmms_eval=False):
    """One turn with an official model: LLaDAV (image optional) or a text-only LLaDA, through the one
    sampler (diffusion.generate) in any decoding mode (mode / threshold / refresh_every as in answer()).
    LLaDA-V: its template (system prompt, image first, think suffix), its image mode, and its sampler's
    options: EOS / BOS / header ids banned, the `stop` strings in the official order (REFERENCE 11.5; an
    empty string is dropped), float64 confidence. A text-only LLaDA: the plain generate.py sampler (as
    LLaDA's chat.py), cut at the first EoT / EOS. lmms_eval: decode as lmms-eval does (decode_answer).
    Earlier turns are re-rendered through the template (the official chat loops append to the previous
    output instead: the same tokens, up to re-tokenisation of the answers). stats: filled as generate's."""
    device = next(model.parameters()).device
    is_v = isinstance(model, LLaDAV)
    kw, n_img = {}, []
    if image is not None:
        if not is_v:
            raise ValueError("this checkpoint is a text-only LLaDA; drop --image or use GSAI-ML/LLaDA-V")
        crops, size = process_image(image, model.cfg.image_aspect_ratio, model.cfg.vision.image_size)
        kw["image_features"] = model.encode_image_crops(crops.to(device), size)  # (N, d), once
        n_img = [kw["image_features"].shape[0]]
    msgs = llada_v_messages(question, SYSTEM_PROMPT if is_v else None, len(n_img), think, history)
    ids = torch.tensor([tokenizer_image_token(tok, chat_template(msgs), n_img)], device=device)  # official form: drops "\n" after <image>
    cfg = model.cfg.lm if is_v else model.cfg
    if ids.shape[1] + gen_length > cfg.max_seq_len:
        raise ValueError(f"prompt ({ids.shape[1]} tokens) + gen_length ({gen_length}) exceeds the context "
                         f"{cfg.max_seq_len}; shorten the conversation or lower --gen_length")
    gen = dict(steps=steps, gen_length=gen_length, block_length=block_length, temperature=temperature,
               cfg_scale=cfg_scale, remasking=remasking, mask_id=tok.mask_id, eos_id=tok.eos_id, eot_id=tok.eot_id,
               refresh_every=refresh_every, callback=callback, stats=stats, **mode_kwargs(mode, threshold))
    if not is_v:  # LLaDA-8B-Instruct: a bare LLaDA takes embeddings; the sampler hands it token ids
        out = generate(lambda x, attention_mask=None, **k: model(model.embed_tokens(x), attention_mask, **k), ids, **gen)
        ids_out = out[0, ids.shape[1]:].tolist()
        cut = next((i for i, t in enumerate(ids_out) if t in (tok.eot_id, tok.eos_id)), len(ids_out))
        return decode_answer(tok, ids_out[:cut], lmms_eval)
    (out,) = generate(model, ids, banned_ids=(tok.eos_id, tok.bos_id, tok.start_header_id, tok.end_header_id),
                      stop_sequences=[tok.encode(s) for s in stop if s], **gen, **kw)
    return decode_answer(tok, out, lmms_eval)


def main_pretrained(sc, device):
    """sample.py --checkpoint=<Hugging Face dir>: the official LLaDA-V (or LLaDA) weights, one question or
    a --chat, through answer_pretrained and so the one sampler, in any --mode (fast decoding included).
    Defaults are the official demo's: steps = gen_length = block_length = 128, T = 0, <|eot_id|> stop,
    float16 on CUDA (inference_dtype). Prints each answer with its decoding mode, model calls and time."""
    from checkpoint import check_tokenizer_fits, from_pretrained
    from tokenizer import get_tokenizer as load_tokenizer
    try:
        dtype = inference_dtype(sc.dtype, device)
    except ValueError as e:
        sys.exit(str(e))
    t0 = time.time()
    try:
        model = from_pretrained(sc.checkpoint, dtype=dtype, device=device)
        tok = toy_tokenizer() if sc.tokenizer == "toy" else load_tokenizer(sc.tokenizer or sc.checkpoint)
        check_tokenizer_fits(tok, model, sc.tokenizer or sc.checkpoint)
        img = load_image(sc.image) if sc.image else None
    except (FileNotFoundError, ValueError) as e:
        sys.exit(str(e))
    print(f"loaded {sc.checkpoint} ({type(model).__name__}, {next(model.parameters()).dtype}) on {device} "
          f"in {time.time() - t0:.1f}s")
    # sampling options: unset lengths default to the official demo's (128 / 128 / 128, one block)
    G = int(sc.gen_length or 128)
    gen = dict(gen_length=G, steps=int(sc.steps or G), block_length=int(sc.block_length or G),
               temperature=float(sc.temperature), cfg_scale=float(sc.cfg_scale),
               remasking=sc.remasking, think=sc.think or None, mode=sc.mode,
               threshold=float(sc.threshold), refresh_every=int(sc.refresh_every),
               stop=tuple(x.replace("\\n", "\n").replace("\\t", "\t") for x in sc.stop.split(",")))  # typed \n, \t: newline, tab
    if sc.show_steps:  # the first row's canvas after every step: "_" for a mask, else the token
        gen["callback"] = lambda x, step, block: print(f"step {step + 1:3d} (block {block}): " + " ".join(
            "_" if t == tok.mask_id else repr(tok.decode([t]))[1:-1] for t in x[0, -G:].tolist()))
    torch.manual_seed(int(sc.seed))  # T > 0 or random remasking: a reproducible draw
    # history: the earlier (question, answer) turns of a --chat, re-rendered through the template each turn
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
        try:
            text = answer_pretrained(model, tok, img, question, history, stats=stats, **gen)  # image: turn 1 only
        except ValueError as e:
            sys.exit(str(e))
        print(f"question: {question}\nanswer:   {text}\n({gen['mode']} decoding: {stats['nfe']} model calls "
              f"({stats['full_nfe']} full), gen_length {G}, block_length {gen['block_length']}, {time.time() - t0:.2f}s)")
        if not sc.chat:
            return
        history.append((question, text))  # the next turn's prompt carries this answer
        question = None


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
    # The options of sample.py, --key=value (model.parse_config): the rule in opt() says what each accepts,
    # the comment after it is its --help. Sampler settings left unset come from the checkpoint's training run.
    checkpoint: str = opt("out/ckpt.pt", path="any")  # our ckpt.pt (train.py), or a Hugging Face model folder
                                                      # (the official weights, e.g. GSAI-ML/LLaDA-V)
    image: str = opt("", path="file")   # an image file; none: a fresh synthetic image (our checkpoints)
    question: str = ""                  # the question; none: the synthetic image's own question
    seed: int = opt(0, min=0)           # the synthetic image and the sampler's randomness
    device: str = opt("auto", device=True)  # auto = cuda > cpu
    gen_length: int | None = opt(None, min=1)    # answer canvas in tokens (default: the training run's, 128 for HF)
    steps: int | None = opt(None, min=1)         # sampler steps (default: the training run's, gen_length for HF)
    block_length: int | None = opt(None, min=1)  # semi-autoregressive block length (default: as trained / gen_length)
    temperature: float = opt(0.0, min=0)         # Gumbel noise on the logits; 0 = greedy
    cfg_scale: float = opt(0.0, min=0)           # classifier-free guidance; 0 = off
    remasking: str = opt("low_confidence", choices=("low_confidence", "random"))  # which masks a step reveals
    show_steps: bool = False                     # print the canvas after every step
    mode: str = opt("exact", choices=tuple(MODES))  # decoding mode (diffusion.py): exact, KV caches, threshold
    threshold: float = opt(0.9, min=0)           # confidence threshold of the threshold modes (above 1: one token a step)
    refresh_every: int = opt(0, min=0)           # cached modes: refresh the cache every N steps (0: at block starts)
    gif: str = opt("", out="file", suffix=".gif")  # write an animation of the denoising here
    eval: bool = False                           # held-out accuracy, model calls and time for each of --modes
    n: int = opt(500, min=1)                     # held-out questions for --eval / --eval_choice
    batch_size: int = opt(1, min=1)              # questions decoded together in --eval
    eval_choice: bool = False                    # multiple choice by the likelihood bound (diffusion.choose)
    mc_num: int = opt(16, min=1)                 # Monte-Carlo samples per candidate in --eval_choice
    modes: str = opt(",".join(MODES), each=tuple(MODES))  # the decoding modes --eval compares
    # --- the official model (--checkpoint=<Hugging Face folder>) ---
    dtype: str = opt("auto", choices=("auto", *DTYPES))  # weights' dtype; auto: fp16 on CUDA (official), as stored on CPU
    chat: bool = False                           # multi-turn: questions from stdin ('exit' or an empty line ends)
    think: str = opt("", choices=("", "think", "no_think"))  # LLaDA-V's reasoning switch; empty: none
    stop: str = "<|eot_id|>"                     # stop sequences, comma-separated (typed \n, \t: newline, tab)
    tokenizer: str = opt("", path="any", also=("toy",))  # tokenizer.json or folder (default: the checkpoint's)

    def check(self):
        """Options that must agree with each other (the sampler's block schedule), before any loading."""
        G, blk, steps = self.gen_length, self.block_length, self.steps
        if G is not None and blk is not None and G % blk:
            raise ValueError(f"--gen_length={G} is not divisible by --block_length={blk}; pick a divisor of it")
        if G is not None and blk is not None and steps is not None and steps % (G // blk):
            raise ValueError(f"--steps={steps} is not divisible by the {G // blk} blocks (--gen_length / "
                             f"--block_length); every block gets the same number of steps")


def main(argv):
    """python sample.py --key=value ...: every option is checked first (SampleConfig; --help lists them)."""
    sc = parse_config(SampleConfig, argv, __doc__)
    device = pick_device(sc.device)
    # Two kinds of checkpoint share this one entry point: a folder is a Hugging Face model (the official
    # LLaDA-V or LLaDA, its own template, sampler options and image mode); a file is our ckpt.pt, which
    # carries its config, its tokenizer and the training options the sampler defaults come from.
    if os.path.isdir(sc.checkpoint):  # a Hugging Face directory: the official weights
        return main_pretrained(sc, device)
    try:
        model, tok, ckpt = load_checkpoint(sc.checkpoint, device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(str(e))
    model.eval()
    # The toy was trained on a fixed answer canvas of gen_length tokens (answer, <|eot_id|>, EOS padding):
    # sampling with the same canvas, steps and blocks reproduces what the training run's report measured.
    tc = ckpt.get("train_config", {})
    G = sc.gen_length or tc.get("gen_length", 16)  # unset sampler options: the training run's
    gen = dict(gen_length=G, steps=sc.steps or tc.get("sample_steps", G),
               block_length=sc.block_length or tc.get("block_length", G), temperature=sc.temperature,
               cfg_scale=sc.cfg_scale, remasking=sc.remasking, threshold=sc.threshold, refresh_every=sc.refresh_every)
    if sc.eval or sc.eval_choice:
        # the held-out split train.py reports on
        samples = SyntheticVQA(tok, model.cfg.vision.image_size, model.cfg.vision.n_patches, G,
                               seed=int(tc.get("seed", 0))).heldout(sc.n)
    if sc.eval_choice:
        # Multiple choice scores each candidate answer by the likelihood bound instead of generating:
        # no sampler is involved, so --mode and the sampler options do not apply.
        t0 = time.time()
        res = evaluate_choice(model, tok, samples, G, mc_num=sc.mc_num, cfg_scale=gen["cfg_scale"])
        kinds = " ".join(f"{k} {100 * res[k]:.1f}%" for k in CHOICES if k in res)
        print(f"multiple choice by likelihood (mc_num {sc.mc_num}): {100 * res['all']:.1f}% over "
              f"{res['n']} closed questions | {kinds} | {time.time() - t0:.1f}s")
        return
    if sc.eval:
        # python sample.py --eval: once per decoding mode
        print(f"held-out evaluation: {len(samples)} questions, batch {sc.batch_size}, {gen}")
        try:
            rows = eval_modes(model, tok, samples, sc.modes.split(","), sc.batch_size, **gen)
        except ValueError as e:
            sys.exit(str(e))
        print(format_modes_table(rows))
        return
    gen["mode"] = sc.mode
    # One question about one image: the user's own file, or a fresh synthetic scene from a seed range that
    # training never draws from (synthetic.DEMO_OFFSET), whose true answer is then printed beside the model's.
    truth = None
    if sc.image:
        try:
            img = load_image(sc.image)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(str(e))
        question = sc.question or "Describe the image."
    else:
        seed = sc.seed
        img, q, truth, kind = make_sample(DEMO_OFFSET + seed, model.cfg.vision.image_size)
        question = sc.question or q
        if sc.question:
            truth = None
        print(f"(synthetic image, seed {seed}; save it with --image to reuse one of your own)")
    torch.manual_seed(sc.seed)

    # The sampler calls callback(x, step, block) after every step with the whole canvas x (B, P + G);
    # --show_steps prints the answer part of row 0, --gif keeps a copy of it for the animation.
    callback = None
    if sc.show_steps:
        def callback(x, step, block):
            canvas = x[0, -G:].tolist()
            shown = " ".join("_" if t == tok.mask_id else repr(tok.decode([t]))[1:-1] or "''" for t in canvas)
            print(f"step {step + 1:3d} (block {block}): {shown}")
    frames = []
    if sc.gif:
        # the animation may replace an earlier GIF, never anything else (a checkpoint, an image, a report)
        gif = sc.gif
        if os.path.exists(gif):
            magic = b""
            if os.path.isfile(gif):
                with open(gif, "rb") as f:
                    magic = f.read(6)
            if magic not in (b"GIF87a", b"GIF89a"):
                sys.exit(f"--gif={gif} exists and is not a GIF; refusing to replace it, pick another file name")
        show = callback

        def callback(x, step, block):  # keep every canvas for the animation
            frames.append(x[0, -G:].tolist())
            if show is not None:
                show(x, step, block)
    t0 = time.time()
    stats = {}
    try:
        (text,) = answer(model, tok, [img], [question], callback=callback, stats=stats, **gen)
    except ValueError as e:
        sys.exit(str(e))
    dt = time.time() - t0
    print(f"question: {question}")
    if truth is not None:
        print(f"truth:    {truth}")
    print(f"answer:   {text}")
    print(f"({gen['mode']} decoding: {stats['nfe']} model calls, gen_length {G}, block_length "
          f"{gen['block_length']}, {dt:.2f}s)")
    if sc.gif:
        from tools.draw import denoising_gif
        nbytes = denoising_gif(sc.gif, img, question, frames, tok, truth=truth)
        print(f"wrote {sc.gif} ({len(frames)} steps, {nbytes / 1024:.0f} KB)")


if __name__ == "__main__":
    run_cli(main)  # a bad option or file: one line, no traceback (LLADA_DEBUG=1 shows it)
