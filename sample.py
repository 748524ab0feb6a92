"""
Ask a trained LLaDA-V about an image: the reverse diffusion process end to end.

    image -> preprocess -> ViT -> projector -> visual tokens  (encoded once)
    prompt = chat template with the visual tokens spliced in at <image>
    answer = generate(): start from gen_length [MASK]s and, step by step, reveal the tokens the model
             is most confident about (diffusion.py), then cut at the first <|eot_id|> / EOS.

Usage:
    python sample.py                                   # out/ckpt.pt, a fresh synthetic image
    python sample.py --image=cat.png --question="What color is the circle?"
    python sample.py --show-steps                      # print the canvas after every step
    python sample.py --mode=threshold+dual             # fast decoding (diffusion.py): exact | prefix | dual |
                                                       # threshold | threshold+prefix | threshold+dual
    python sample.py --gif=out.gif                     # an animation of the denoising
    python sample.py --eval --modes=exact,threshold+dual   # held-out accuracy, NFE and time per mode
    python sample.py --eval-choice                     # multiple choice by the likelihood bound
The official model (a Hugging Face directory, e.g. GSAI-ML/LLaDA-V; see README "Run the official model"):
    python sample.py --checkpoint=LLaDA-V --image=cat.jpg --question="What is in the picture?"
    python sample.py --checkpoint=LLaDA-V --image=cat.jpg --chat        # multi-turn, questions from stdin
    extra flags: --dtype=bf16|fp16|fp32 (default: bf16 on CUDA, the checkpoint's dtype on CPU),
                 --think=think|no_think, --stop="<|eot_id|>" (comma-separated), --tokenizer=<path>
This file also holds `answer()` and `evaluate()` (held-out accuracy per question kind), which
train.py uses for its reports.
"""
import math
import os
import sys
import time
from collections import defaultdict

import torch

from checkpoint import load_checkpoint
from data import SYSTEM_PROMPT, answer_text, chat_template, default_system, llada_v_messages, prompt_batch, sft_example
from diffusion import CountingModel, choose, generate, generate_fast, generate_llada_v, mode_kwargs
from distributed import autocast
from model import LLaDAV
from synthetic import CHOICES, DEMO_OFFSET, KINDS, SyntheticVQA, candidates, draw, make_sample, score, toy_tokenizer
from vision import load_image, preprocess, process_image


@torch.no_grad()
def answer(model, tok, images, questions, gen_length=16, steps=16, block_length=16, temperature=0.0,
           cfg_scale=0.0, remasking="low_confidence", callback=None, return_canvas=False,
           mode="exact", threshold=0.9, refresh_every=0, stats=None):
    """Answer a batch of (image, question) pairs. Returns the answer strings (and the raw canvases).
    mode: a decoding mode of fast.MODES ('exact' = diffusion.generate); threshold / refresh_every: see
    fast.generate_fast. stats: a dict into which model calls (nfe, full_nfe) are added up."""
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
    kw = dict(steps=steps, gen_length=gen_length, block_length=block_length, temperature=temperature,
              cfg_scale=cfg_scale, remasking=remasking, mask_id=tok.mask_id, eos_id=tok.eos_id,
              eot_id=tok.eot_id, callback=callback, image_features=feats)
    with autocast(device):
        if mode == "exact":
            counted = CountingModel(model)
            out = generate(counted, ids.to(device), attn.to(device), **kw)
            st = {"nfe": counted.nfe, "full_nfe": counted.nfe}
        else:
            st = {}
            out = generate_fast(model, ids.to(device), attn.to(device), refresh_every=refresh_every, stats=st,
                                **mode_kwargs(mode, threshold), **kw)
    if stats is not None:
        for k in ("nfe", "full_nfe"):
            stats[k] = stats.get(k, 0) + st[k]
    texts = [answer_text(tok, row[P:]) for row in out.tolist()]
    return (texts, out[:, P:]) if return_canvas else texts


def evaluate(model, tok, samples, batch_size=100, blank=False, **gen):
    """Exact-match accuracy per question kind on `samples` (image, question, answer, kind); for
    'describe' also the per-object accuracy. blank=True replaces every image by an empty canvas."""
    was_training = model.training
    model.eval()
    size = samples[0][0].size[0]
    hits, n, obj_hit, obj_n = defaultdict(int), defaultdict(int), 0, 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        imgs = [draw([], size, blank=True) if blank else s[0] for s in chunk]
        preds = answer(model, tok, imgs, [s[1] for s in chunk], **gen)
        for (_, _, truth, kind), pred in zip(chunk, preds):
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


@torch.no_grad()
def answer_pretrained(model, tok, image, question, history=(), think=None, gen_length=128, steps=128,
                      block_length=128, temperature=0.0, cfg_scale=0.0, remasking="low_confidence",
                      stop=("<|eot_id|>",), callback=None):
    """One turn with an official model: LLaDAV (image optional) or a text-only LLaDA. LLaDA-V's template
    (system prompt for LLaDA-V, image first, think suffix), its image mode, and its sampler; a text-only
    LLaDA uses LLaDA's own sampler. Earlier turns are re-rendered through the template (the official chat
    loops append to the previous output instead: the same tokens, up to re-tokenisation of the answers)."""
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
    ids = torch.tensor([tok.encode_with_image(chat_template(msgs), n_img)], device=device)
    cfg = model.cfg.lm if is_v else model.cfg
    if ids.shape[1] + gen_length > cfg.max_seq_len:
        raise ValueError(f"prompt ({ids.shape[1]} tokens) + gen_length ({gen_length}) exceeds the context "
                         f"{cfg.max_seq_len}; shorten the conversation or lower --gen_length")
    if not is_v:  # LLaDA-8B-Instruct: its own sampler (generate.py, as in LLaDA's chat.py), cut at EoT / EOS
        out = generate(lambda x, attention_mask=None: model(model.embed_tokens(x), attention_mask), ids,
                       steps=steps, gen_length=gen_length, block_length=block_length, temperature=temperature,
                       cfg_scale=cfg_scale, remasking=remasking, mask_id=tok.mask_id, eos_id=tok.eos_id,
                       eot_id=tok.eot_id, callback=callback)
        return answer_text(tok, out[0, ids.shape[1]:].tolist())
    out = generate_llada_v(model, ids, steps=steps, gen_length=gen_length, block_length=block_length,
                           temperature=temperature, cfg_scale=cfg_scale, remasking=remasking, mask_id=tok.mask_id,
                           banned_ids=(tok.eos_id, tok.bos_id, tok.start_header_id, tok.end_header_id),
                           stop_sequences=[tok.encode(s) for s in stop], callback=callback, **kw)
    return tok.decode(out).strip()


def main_pretrained(args, device):
    """sample.py --checkpoint=<Hugging Face dir>: the official LLaDA-V (or LLaDA) weights."""
    from checkpoint import from_pretrained
    from tokenizer import get_tokenizer as load_tokenizer
    name = args["dtype"] if args["dtype"] != "auto" else "bf16" if device.type == "cuda" else None
    if name is not None and name not in DTYPES:
        sys.exit(f"--dtype={name}: use one of {', '.join(DTYPES)}")
    t0 = time.time()
    try:
        model = from_pretrained(args["checkpoint"], dtype=DTYPES.get(name), device=device)
        tok = toy_tokenizer() if args["tokenizer"] == "toy" else load_tokenizer(args["tokenizer"] or args["checkpoint"])
        img = load_image(args["image"]) if args["image"] else None
    except (FileNotFoundError, ValueError) as e:
        sys.exit(str(e))
    print(f"loaded {args['checkpoint']} ({type(model).__name__}, {next(model.parameters()).dtype}) on {device} "
          f"in {time.time() - t0:.1f}s")
    G = int(args["gen_length"] or 128)
    gen = dict(gen_length=G, steps=int(args["steps"] or G), block_length=int(args["block_length"] or G),
               temperature=float(args["temperature"]), cfg_scale=float(args["cfg_scale"]),
               remasking=args["remasking"], think=args["think"],
               stop=tuple(x.replace("\\n", "\n").replace("\\t", "\t") for x in args["stop"].split(",")))  # typed \n, \t: newline, tab
    if args["show_steps"]:
        gen["callback"] = lambda x, step, block: print(f"step {step + 1:3d} (block {block}): " + " ".join(
            "_" if t == tok.mask_id else repr(tok.decode([t]))[1:-1] for t in x[0, -G:].tolist()))
    torch.manual_seed(int(args["seed"]))
    history, question = [], args["question"] or (None if args["chat"] else "Describe the image." if img else "")
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
        t0 = time.time()
        try:
            text = answer_pretrained(model, tok, img, question, history, **gen)  # image stays in turn 1
        except ValueError as e:
            sys.exit(str(e))
        print(f"question: {question}\nanswer:   {text}\n({gen['steps']} steps, gen_length {G}, {time.time() - t0:.2f}s)")
        if not args["chat"]:
            return
        history.append((question, text))
        question = None


def eval_modes(model, tok, samples, modes, batch_size=1, **gen):
    """Held-out accuracy, model calls and wall time for each decoding mode -> list of result dicts."""
    rows = []
    for mode in modes:
        stats = {}
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
        cands = candidates(kind, q)
        seqs = [sft_example(tok, q, c, gen_length, feats.shape[1], default_system(model.cfg.tokenizer))
                for c in cands]
        P = seqs[0][1].count(-100)
        prompt = torch.tensor(seqs[0][0][:P], device=device)
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
    """The README's markdown table; speed-ups are relative to the first row (normally 'exact')."""
    ref = rows[0]
    out = ["| mode | accuracy | " + " | ".join(KINDS) + " | model calls per batch (full passes) | wall time | "
           "speed-up (time / calls) |", "|---" * (len(KINDS) + 5) + "|"]
    for r in rows:
        kinds = " | ".join(f"{100 * r[k]:.1f}" for k in KINDS if k in r)
        out.append(f"| {r['mode']} | {100 * r['all']:.1f}% | {kinds} | {r['nfe']:.2f} ({r['full_nfe']:.2f}) | "
                   f"{r['seconds']:.1f} s | {ref['seconds'] / r['seconds']:.2f}x / {ref['nfe'] / r['nfe']:.2f}x |")
    return "\n".join(out)


def main(argv):
    args = {"checkpoint": "out/ckpt.pt", "image": None, "question": None, "seed": 0, "device": "auto",
            "gen_length": None, "steps": None, "block_length": None, "temperature": 0.0, "cfg_scale": 0.0,
            "remasking": "low_confidence", "show_steps": False, "mode": "exact", "threshold": 0.9,
            "refresh_every": 0, "gif": None, "eval": False, "n": 500, "batch_size": 1, "eval_choice": False,
            "mc_num": 16, "modes": "exact,prefix,dual,threshold,threshold+prefix,threshold+dual",
            "dtype": "auto", "chat": False, "think": None, "stop": "<|eot_id|>", "tokenizer": None}
    for a in argv:
        if a in ("-h", "--help"):
            print(__doc__ + "\noptions (--key=value): " + ", ".join(f"--{k.replace('_', '-')}" for k in args))
            return
        key, _, val = a.lstrip("-").partition("=")
        key = key.replace("-", "_")
        if not a.startswith("--") or key not in args:
            sys.exit(f"unknown argument {a!r}; options are " + ", ".join(f"--{k}" for k in args))
        args[key] = True if (key in ("show_steps", "chat", "eval", "eval_choice") and val == "") else val
    device = torch.device(args["device"] if args["device"] != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    if os.path.isdir(args["checkpoint"]):  # a Hugging Face directory: the official weights
        return main_pretrained(args, device)
    try:
        model, tok, ckpt = load_checkpoint(args["checkpoint"], device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(str(e))
    model.eval()
    tc = ckpt.get("train_config", {})
    G = int(args["gen_length"] or tc.get("gen_length", 16))
    gen = dict(gen_length=G, steps=int(args["steps"] or tc.get("sample_steps", G)),
               block_length=int(args["block_length"] or tc.get("block_length", G)),
               temperature=float(args["temperature"]), cfg_scale=float(args["cfg_scale"]),
               remasking=args["remasking"], threshold=float(args["threshold"]),
               refresh_every=int(args["refresh_every"]))
    if args["eval"] or args["eval_choice"]:
        # the held-out split train.py reports on
        samples = SyntheticVQA(tok, model.cfg.vision.image_size, model.cfg.vision.n_patches, G,
                               seed=int(tc.get("seed", 0))).heldout(int(args["n"]))
    if args["eval_choice"]:
        t0 = time.time()
        res = evaluate_choice(model, tok, samples, G, mc_num=int(args["mc_num"]), cfg_scale=gen["cfg_scale"])
        kinds = " ".join(f"{k} {100 * res[k]:.1f}%" for k in CHOICES if k in res)
        print(f"multiple choice by likelihood (mc_num {args['mc_num']}): {100 * res['all']:.1f}% over "
              f"{res['n']} closed questions | {kinds} | {time.time() - t0:.1f}s")
        return
    if args["eval"]:
        # python sample.py --eval: once per decoding mode
        print(f"held-out evaluation: {len(samples)} questions, batch {args['batch_size']}, {gen}")
        try:
            rows = eval_modes(model, tok, samples, args["modes"].split(","), int(args["batch_size"]), **gen)
        except ValueError as e:
            sys.exit(str(e))
        print(format_modes_table(rows))
        return
    gen["mode"] = args["mode"]
    truth = None
    if args["image"]:
        try:
            img = load_image(args["image"])
        except (FileNotFoundError, ValueError) as e:
            sys.exit(str(e))
        question = args["question"] or "Describe the image."
    else:
        seed = int(args["seed"])
        img, q, truth, kind = make_sample(DEMO_OFFSET + seed, model.cfg.vision.image_size)
        question = args["question"] or q
        if args["question"]:
            truth = None
        print(f"(synthetic image, seed {seed}; save it with --image to reuse one of your own)")
    torch.manual_seed(int(args["seed"]))

    callback = None
    if args["show_steps"]:
        def callback(x, step, block):
            canvas = x[0, -G:].tolist()
            shown = " ".join("_" if t == tok.mask_id else repr(tok.decode([t]))[1:-1] or "''" for t in canvas)
            print(f"step {step + 1:3d} (block {block}): {shown}")
    frames = []
    if args["gif"]:
        # the animation may replace an earlier GIF, never anything else (a checkpoint, an image, a report)
        gif = args["gif"]
        if os.path.isdir(gif) or os.path.exists(gif) and open(gif, "rb").read(6) not in (b"GIF87a", b"GIF89a"):
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
    if args["gif"]:
        from tools.draw import denoising_gif
        nbytes = denoising_gif(args["gif"], img, question, frames, tok, truth=truth)
        print(f"wrote {args['gif']} ({len(frames)} steps, {nbytes / 1024:.0f} KB)")


if __name__ == "__main__":
    main(sys.argv[1:])
