"""
Data: LLaDA-V's chat template and the SFT sequences, answer masks and batches the diffusion loss needs.

Where this sits in the flow:  image -> ViT -> projector -> [token sequence] -> masked diffusion.
(The tokenizer is in tokenizer.py; the embedded synthetic image-question dataset in synthetic.py.)

1. Chat template (REFERENCE 3.1, 3.3), one user turn with an image:
     <|startoftext|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
     <|start_header_id|>user<|end_header_id|>\n\n<image>\n{question}<|eot_id|>
     <|start_header_id|>assistant<|end_header_id|>\n\n
   The string "<image>" becomes IMAGE_TOKEN_INDEX (-200) placeholders, one per visual token; the model
   swaps them for projected image features (model.py). The toy data leaves out the system turn to
   keep sequences short; the template code is the same. chat_template() is the general form (any
   messages, multi-turn) and llada_v_messages() adds LLaDA-V's " /think" / " /no_think" suffixes.

2. SFT sequence (REFERENCE 3.2, LLaDA GUIDELINES): x0 = prompt ++ answer ++ <|eot_id|> ++ <|endoftext|>*,
   padded with EOS to a fixed answer length G (= the sampler's gen_length). Labels are -100 on the
   prompt and the image (never masked) and the token itself on the G answer positions (EOS padding
   included: the model learns to fill unused canvas with EOS, as LLaDA does).

3. Batches: training sequences are right-padded (collate); sampling prompts are left-padded
   (prompt_batch) so that every answer canvas sits in the same columns.

4. LLaVA-format training data (stages 1-3): JSON files of image-text conversations.

A record (LLaVA-Pretrain, LLaVA-NeXT, MAmmoTH-VL all use it):
    {"id": ..., "image": "a.jpg" | ["a.jpg", "b.jpg"] | absent (text only),
     "conversations": [{"from": "human", "value": "<image>\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}

Two formats (REFERENCE 3.3):
  plain (stage 1, `conv_llada_plain`):  x0 = <image> caption "\n"   -- no BOS, no template;
      labels = -100 on the image only, so the caption and the "\n" are targets.
  conv  (stages 2-3, `preprocess_llada`): every message m is rendered on its own as
      <|startoftext|><|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>
      (content not trimmed), the BOS kept on the first (system) message only. Labels: -100 on system and
      user messages, targets on assistant messages; and, LLaDA-V's quirk (switch `unignore_special`), every
      <|startoftext|>, <|start_header_id|>, <|end_header_id|>, <|eot_id|> in *any* turn is a target too.
      With one image, "<image>" is moved to the front of its turn: "<image>\n" + text; with several, each
      "<image>" stays where it is and takes the next image.
(LLaDA-V pads each image of a multi-image record to a square and adds a newline token, 730 tokens; here
every image goes through the one image_mode, square by default: IMAGE_MODES is where that plugs in.)
Each "<image>" becomes n_image_tokens IMAGE_TOKEN_INDEX placeholders (729 for SigLIP2 at 384 px), and only
then is the sequence cut to max_len (official: after the features are inserted). A cut never splits an
image: the cut moves to just before it and the images after it are dropped.

Padding (collate): ids right-padded with EOS; labels padded with EOS too (`pad_labels`, official: stage-1
padding is a target, like LLaDA SFT) or with -100.

Bad samples (missing or corrupt image, malformed record, no target left) come back as {"error": reason};
the collate function drops them and counts them per reason, and the trainer stops a run whose bad fraction
passes a limit (BadSampleCounter). Batches group samples of similar length (length_grouped_batches), as
LLaVA's group_by_modality_length does, so little compute goes to padding.
"""
import json
import os
import random
from collections import Counter
from functools import partial

import torch

from tokenizer import IMAGE_TOKEN_INDEX, Tokenizer
from vision import load_image, preprocess

IGNORE_INDEX = -100       # label of positions that are never masked and never scored

SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual "
                 "content that the user provides, and assist the user with a variety of tasks using "
                 "natural language.")



def chat_prompt(question: str, system: str | None = SYSTEM_PROMPT, image: bool = True) -> str:
    """LLaDA-V's inference prompt for one user turn (REFERENCE 3.3). Content is trimmed, BOS only once,
    and the prompt always ends with the assistant header."""
    def turn(role, content):
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"
    user = ("<image>\n" if image else "") + question.strip()
    return ("<|startoftext|>" + (turn("system", system) if system else "") + turn("user", user)
            + "<|start_header_id|>assistant<|end_header_id|>\n\n")


# LLaDA-V's reasoning switch (REFERENCE 3.3): appended to the user's text at eval and in the stage-3 data
THINK_SUFFIX = {None: "", "think": " /think", "no_think": " /no_think"}


def chat_template(messages) -> str:
    """The tokenizer chat_template of LLaDA-8B-Instruct (and LLaDA-V), REFERENCE 3.1: messages
    [{"role", "content"}] -> BOS once, then <|start_header_id|>role<|end_header_id|>\n\n content.strip()
    <|eot_id|> per message, and always the assistant header at the end."""
    out = "<|startoftext|>"
    for m in messages:
        out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
    return out + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def llada_v_messages(question: str, system: str | None = SYSTEM_PROMPT, n_images: int = 1, think=None,
                     history=()) -> list:
    """The messages LLaDA-V's demo and eval build: the system prompt, the images first in the first user
    turn ("<image>\n" each), earlier turns `history` [(question, answer)], and the optional " /think" or
    " /no_think" suffix on every user turn. Render with chat_template()."""
    if think not in THINK_SUFFIX:
        raise ValueError(f"think={think!r}: use None, 'think' or 'no_think'")
    msgs = [{"role": "system", "content": system}] if system else []
    turns = list(history) + [(question, None)]
    for i, (q, a) in enumerate(turns):
        msgs.append({"role": "user", "content": ("<image>\n" * n_images if i == 0 else "") + q.strip() + THINK_SUFFIX[think]})
        if a is not None:
            msgs.append({"role": "assistant", "content": a})
    return msgs


def default_system(tokenizer_name: str) -> str | None:
    """The toy data is trained without a system turn (shorter sequences); the real model uses LLaDA-V's."""
    return None if tokenizer_name == "toy" else SYSTEM_PROMPT


def sft_example(tok: Tokenizer, question: str, answer: str, gen_length: int, n_image_tokens: int,
                system: str | None = None):
    """(ids, labels) for one SFT sample: prompt, then a fixed G = gen_length answer canvas
    answer ++ <|eot_id|> ++ EOS padding. Labels are IGNORE_INDEX on the prompt (and image)."""
    prompt = tok.encode_with_image(chat_prompt(question, system), n_image_tokens)
    ans = tok.encode(answer) + [tok.eot_id]
    if len(ans) > gen_length:
        raise ValueError(f"answer of {len(ans)} tokens does not fit gen_length={gen_length}; raise gen_length")
    ans += [tok.eos_id] * (gen_length - len(ans))
    return prompt + ans, [IGNORE_INDEX] * len(prompt) + ans


def collate(examples, pad_id: int):
    """Right-pad a list of (ids, labels) to one length. Padding has attention_mask 0 and IGNORE labels.
    Returns ids (B, L), labels (B, L), attention_mask (B, L) bool."""
    L = max(len(ids) for ids, _ in examples)
    B = len(examples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros(B, L, dtype=torch.bool)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        attn[i, :len(x)] = True
    return ids, labels, attn


def answer_text(tok: Tokenizer, ids) -> str:
    """Decode a generated canvas up to its first <|eot_id|> or EOS."""
    out = []
    for i in ids:
        if int(i) in (tok.eot_id, tok.eos_id):
            break
        out.append(int(i))
    return tok.decode(out).strip()



def prompt_batch(tok: Tokenizer, questions, n_image_tokens: int, system: str | None = None):
    """Left-padded prompts for batched sampling (as the official generate.py does): ids (B, L), attention
    mask (B, L). Left padding keeps every answer canvas at the same columns. Positions still run 0..L-1,
    so a left-padded prompt is shifted; with the padding masked out that changes nothing, because RoPE
    attention scores depend only on relative positions."""
    ps = [tok.encode_with_image(chat_prompt(q, system), n_image_tokens) for q in questions]
    L = max(map(len, ps))
    ids = torch.full((len(ps), L), tok.pad_id, dtype=torch.long)
    attn = torch.zeros(len(ps), L, dtype=torch.bool)
    for i, p in enumerate(ps):
        ids[i, L - len(p):] = torch.tensor(p)
        attn[i, L - len(p):] = True
    return ids, attn


# ----------------------------------------------------------------------------------------------
# LLaVA-format data: records -> (ids, labels, pixels), collate, batches (official train.py)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def square_images(images, image_size: int, n_patches: int):
    """LLaDA-V stage 1: every image squashed to S x S, one crop each -> pixels (n, 3, S, S), tokens per image."""
    return torch.stack([preprocess(im, image_size) for im in images]), [n_patches] * len(images)


# The single hook for image preprocessing: name -> fn(list of PIL images, image_size, n_patches)
# returning (pixels, tokens per image). Stage 2's "anyres_max_4" (multi-crop) plugs in here.
IMAGE_MODES = {"square": square_images}


def load_records(path: str) -> list:
    """A .json list or a .jsonl file of records (UTF-8, as JSON must be)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist; pass --data=<path to a LLaVA-format .json>")
    with open(path, encoding="utf-8") as f:
        try:
            recs = [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); expect a list of LLaVA records") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    if not isinstance(recs, list):
        raise ValueError(f"{path} holds a {type(recs).__name__}; expect a list of LLaVA records")
    return recs


def record_problem(r, fmt: str = "conv") -> str | None:
    """The one validation every LLaVA record goes through -> None, or the reason it is skipped (the bad-
    sample counter counts them by this reason). A record is an object with a non-empty "conversations"
    list of {"from": human | gpt | user | assistant | system, "value": string} turns, at least one
    non-empty answer, and an optional "image": one path or a list of paths (strings)."""
    if not isinstance(r, dict):
        return "record is not an object"
    conv = r.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "malformed record"  # no conversations, or not a list of turns
    if not all(isinstance(m, dict) and isinstance(m.get("value"), str) and m.get("from") in ROLES for m in conv):
        return "malformed turn"    # a turn that is not {"from": <known role>, "value": <string>}
    im = r.get("image")
    if im is not None and not (isinstance(im, str) and im or isinstance(im, list) and im
                               and all(isinstance(f, str) and f for f in im)):
        return "bad image field"   # "image": 5, [5], [null], "", [] ...: not paths
    answers = [m["value"] for m in conv if ROLES[m["from"]] == "assistant"]
    if not answers or not all(a.strip() for a in answers):
        return "empty answer"
    if im is not None and fmt == "conv" and not any(ROLES[m["from"]] == "user" for m in conv):
        return "image without a user turn"  # nowhere to put the image tokens
    return None


class LlavaDataset(torch.utils.data.Dataset):
    def __init__(self, path: str, image_root: str, tok: Tokenizer, image_size: int, n_patches: int,
                 fmt: str = "conv", max_len: int = 8192, unignore_special: bool = True,
                 system: str | None = SYSTEM_PROMPT, image_mode: str = "square"):
        if fmt not in ("plain", "conv"):
            raise ValueError(f"unknown data format {fmt!r}; use 'plain' (stage 1 captions) or 'conv'")
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"unknown image_mode {image_mode!r}; choose one of {', '.join(IMAGE_MODES)}")
        self.records = load_records(path)
        self.image_root, self.tok, self.fmt, self.max_len = image_root, tok, fmt, max_len
        self.image_size, self.n_patches, self.system = image_size, n_patches, system
        self.unignore_special, self.image_fn = unignore_special, IMAGE_MODES[image_mode]
        self.special = {tok.bos_id, tok.start_header_id, tok.end_header_id, tok.eot_id}

    def __len__(self):
        return len(self.records)

    def length(self, i: int) -> int:
        """Cheap length estimate for grouping (no image decoding, no tokenizing): words + image tokens."""
        r = self.records[i]
        conv = r.get("conversations") if isinstance(r, dict) else None
        words = sum(len(str(m.get("value", "")).split()) for m in conv if isinstance(m, dict)) if isinstance(conv, list) else 0
        return words + self.n_patches * len(_image_list(r))

    def __getitem__(self, i: int) -> dict:
        try:
            return self._item(i)
        except _BadSample as e:
            return {"error": str(e)}
        except (OSError, ValueError) as e:  # PIL raises these for truncated or non-image files
            return {"error": f"unreadable image ({type(e).__name__})"}

    def _item(self, i):
        r = self.records[i]
        problem = record_problem(r, self.fmt)
        if problem:
            raise _BadSample(problem)
        conv = r["conversations"]
        files = _image_list(r)
        n_slots = sum(m["value"].count("<image>") for m in conv)
        if self.fmt == "plain":
            if not files or len(conv) < 2:
                raise _BadSample("malformed record")
            ids, labels = self._plain(conv)
            files = files[:1]
        else:
            if (files and n_slots != len(files) and not (len(files) == 1 and n_slots == 0)) or (n_slots and not files):
                raise _BadSample("image count mismatch")
            ids, labels = self._conv(conv, bool(files))
        n_img = [self.n_patches] * len(files)
        ids, labels, n_keep = _truncate(ids, labels, n_img, self.max_len)
        if not any(l != IGNORE_INDEX for l in labels) or not any(
                l != IGNORE_INDEX and l not in self.special for l in labels):
            raise _BadSample("empty answer")
        pixels = None
        if n_keep:
            images = []
            for f in files[:n_keep]:
                p = os.path.join(self.image_root, f)
                if not os.path.exists(p):
                    raise _BadSample("missing image")
                images.append(load_image(p))
            pixels, counts = self.image_fn(images, self.image_size, self.n_patches)
            if counts != n_img[:n_keep]:
                raise ValueError(f"image_mode returned {counts} tokens per image; the sequence was built for "
                                 f"{n_img[:n_keep]}: a new image mode must also set them in _item")
        return {"ids": ids, "labels": labels, "pixels": pixels}

    def _plain(self, conv):
        # conv_llada_plain: "<image>" + caption + "\n"; only the image is ignored
        cap = self.tok.encode(conv[1]["value"] + "\n")
        return [IMAGE_TOKEN_INDEX] * self.n_patches + cap, [IGNORE_INDEX] * self.n_patches + cap

    def _conv(self, conv, has_image):
        tok, ids, labels = self.tok, [], []
        msgs = ([("system", self.system)] if self.system else []) + [(ROLES[m["from"]], m["value"]) for m in conv]
        n_tags = sum(v.count("<image>") for _, v in msgs)
        first_user = next((k for k, (role, _) in enumerate(msgs) if role == "user"), None)
        for k, (role, text) in enumerate(msgs):
            if has_image and n_tags <= 1 and role == "user" and ("<image>" in text or (n_tags == 0 and k == first_user)):
                # preprocess_multimodal: a single image goes to the front of its turn (a record with an
                # image but no tag gets it in the first user turn)
                text = "<image>\n" + text.replace("<image>", "").strip()
            bos = "<|startoftext|>" if k == 0 else ""
            t = tok.encode_with_image(f"{bos}<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>",
                                      self.n_patches)
            ids += t
            if role == "assistant":
                labels += [x if x != IMAGE_TOKEN_INDEX else IGNORE_INDEX for x in t]
            elif self.unignore_special:
                labels += [x if x in self.special else IGNORE_INDEX for x in t]
            else:
                labels += [IGNORE_INDEX] * len(t)
        return ids, labels


class _BadSample(Exception):
    pass


def _image_list(r) -> list:
    im = r.get("image") if isinstance(r, dict) else None
    if im is None:
        return []
    return [im] if isinstance(im, str) else list(im) if isinstance(im, list) else []


def _truncate(ids, labels, n_img, max_len):
    """Cut to max_len after the image tokens are in; never inside an image. -> ids, labels, images kept."""
    if len(ids) <= max_len:
        return ids, labels, len(n_img)
    cut, kept, pos = max_len, 0, 0
    while pos < len(ids) and kept < len(n_img):  # walk over the image spans
        start = ids.index(IMAGE_TOKEN_INDEX, pos)
        end = start + n_img[kept]
        if end > max_len:
            cut = min(cut, start)
            break
        kept, pos = kept + 1, end
    return ids[:cut], labels[:cut], kept


def collate_llava(items, pad_id: int, pad_labels: bool = True):
    """Drop bad samples, right-pad the rest. -> dict(ids, labels, attn (B, L), pixels (n, 3, S, S) or None,
    errors Counter, n_samples). Padding: ids = EOS, attn = 0, labels = EOS if pad_labels else -100."""
    good = [it for it in items if "error" not in it]
    errors = Counter(it["error"] for it in items if "error" in it)
    out = {"errors": errors, "n_seen": len(items), "n_samples": len(good)}
    if not good:
        return out | {"ids": None}
    L = max(len(it["ids"]) for it in good)
    B = len(good)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), pad_id if pad_labels else IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros(B, L, dtype=torch.bool)
    for i, it in enumerate(good):
        n = len(it["ids"])
        ids[i, :n], labels[i, :n], attn[i, :n] = torch.tensor(it["ids"]), torch.tensor(it["labels"]), True
    pix = [it["pixels"] for it in good if it["pixels"] is not None]
    return out | {"ids": ids, "labels": labels, "attn": attn, "pixels": torch.cat(pix) if pix else None}


def length_grouped_batches(lengths, batch_size: int, seed: int, epoch: int, mega: int = 8):
    """A shuffled list of batches (lists of indices), each of similar lengths: shuffle with (seed, epoch),
    cut into megabatches of mega * batch_size, sort each by length (longest first), split into batches,
    and shuffle the batches. The order depends only on (seed, epoch), so a resumed run sees the same data."""
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    m = mega * batch_size
    batches = []
    for s in range(0, len(idx), m):
        group = sorted(idx[s:s + m], key=lambda i: -lengths[i])
        batches += [group[j:j + batch_size] for j in range(0, len(group), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]  # drop_last, as LLaDA-V's stage 2 does
    rng.shuffle(batches)
    return batches


class BadSampleCounter:
    """Counts skipped samples by reason. check() stops the run (SystemExit) once more than max_frac of at
    least min_seen samples were bad: a run whose data is mostly broken should not burn GPU hours."""

    def __init__(self, max_frac: float = 0.1, min_seen: int = 50):
        self.max_frac, self.min_seen = max_frac, min_seen
        self.errors, self.seen = Counter(), 0

    def update(self, errors: Counter, n_seen: int):
        self.errors.update(errors)
        self.seen += n_seen

    @property
    def bad(self) -> int:
        return sum(self.errors.values())

    def check(self, n_bad: int, n_seen: int):
        """n_bad, n_seen: totals over all processes."""
        if n_seen >= self.min_seen and n_bad > self.max_frac * n_seen:
            raise SystemExit(f"{n_bad} of {n_seen} samples were bad (this process: {self.summary()}), more "
                             f"than --max_bad_frac={self.max_frac}; check --data and --image_root (or raise the limit)")

    def summary(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "none"


class MicroBatches:
    """Iterates micro-batches for one rank, forever, from global step `start_step`: global batch b of
    the epoch is split into world * accum micro-batches; rank r takes micro-batches a * world + r.
    Loads with DataLoader workers; the order depends only on (seed, epoch), never on the worker count."""

    def __init__(self, ds: LlavaDataset, global_batch: int, micro: int, world: int, rank: int, seed: int,
                 workers: int, pad_labels: bool = True):
        self.ds, self.gb, self.micro, self.world, self.rank = ds, global_batch, micro, world, rank
        self.seed, self.workers, self.pad_labels = seed, workers, pad_labels
        self.lengths = [ds.length(i) for i in range(len(ds))]
        self.steps_per_epoch = len(ds) // global_batch
        if self.steps_per_epoch == 0:
            raise SystemExit(f"the dataset has {len(ds)} records, fewer than one global batch of {global_batch}; "
                             f"lower --batch_size")

    def iterate(self, start_step: int):
        step = start_step
        while True:
            epoch, first = divmod(step, self.steps_per_epoch)
            gbatches = length_grouped_batches(self.lengths, self.gb, self.seed, epoch)
            mine = []  # this rank's micro-batches for the remaining steps of the epoch, in order
            for b in gbatches[first:]:
                micro = [b[j:j + self.micro] for j in range(0, self.gb, self.micro)]
                mine += micro[self.rank::self.world]
            loader = torch.utils.data.DataLoader(
                self.ds, batch_sampler=mine, num_workers=self.workers,
                collate_fn=partial(collate_llava, pad_id=self.ds.tok.pad_id, pad_labels=self.pad_labels),
                persistent_workers=False)
            yield from loader
            step = (epoch + 1) * self.steps_per_epoch
