"""
Data: LLaDA-V's chat template and the SFT sequences, answer masks and batches the diffusion loss needs.

Where this sits in the flow:  image -> ViT -> projector -> [token sequence] -> masked diffusion.
(The tokenizer is in tokenizer.py; the embedded synthetic image-question dataset in synthetic.py.)

1. Chat template (GSAI-ML/LLaDA-8B-Instruct tokenizer_config.json; ML-GSAI/LLaDA-V train/llava/conversation.py
   (conv_llava_llada, conv_llada_plain), train/llava/train/train.py::preprocess_llada), one user turn with an image:
     <|startoftext|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
     <|start_header_id|>user<|end_header_id|>\n\n<image>\n{question}<|eot_id|>
     <|start_header_id|>assistant<|end_header_id|>\n\n
   The string "<image>" becomes IMAGE_TOKEN_INDEX (-200) placeholders, one per visual token; the model
   swaps them for projected image features (model.py). The toy data leaves out the system turn to
   keep sequences short; the template code is the same. One renderer, chat_template(messages), and one
   message builder, llada_v_messages() (system prompt, images first, history, " /think" / " /no_think").
   Several images: "<image> <image>\n" + question (the official eval's form).

   Two token forms of the same text (ML-GSAI/LLaDA-V train/llava/mm_utils.py::tokenizer_image_token): official
   *inference* (tokenizer_image_token) drops the token right after every "<image>" (the "\n"), a side effect of LLaVA's
   BOS offset; official *training* keeps it. tokenizer_image_token() below transcribes the inference form
   (keep_after_image switches the token back); sample.answer uses it for official-form prompts. The toy was trained with
   the "\n" kept and is sampled the same way (sft_example, prompt_batch use tok.encode_with_image).

2. SFT sequence (ML-GSAI/LLaDA GUIDELINES.md; LLaDA paper (arXiv 2502.09992) §2.3): x0 = prompt ++ answer ++ <|eot_id|>
   ++ <|endoftext|>*, padded with EOS to a fixed answer length G (= the sampler's gen_length). Labels are -100 on the
   prompt and the image (never masked) and the token itself on the G answer positions (EOS padding
   included: the model learns to fill unused canvas with EOS, as LLaDA does).

3. Batches: training sequences are right-padded (collate); sampling prompts are left-padded
   (prompt_batch) so that every answer canvas sits in the same columns.

4. LLaVA-format training data (stages 1-3): JSON files of image-text conversations.

A record (LLaVA-Pretrain, LLaVA-NeXT, MAmmoTH-VL all use it):
    {"id": ..., "image": "a.jpg" | ["a.jpg", "b.jpg"] | absent (text only),
     "conversations": [{"from": "human", "value": "<image>\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}

Two formats (ML-GSAI/LLaDA-V train/llava/conversation.py (conv_llava_llada, conv_llada_plain),
train/llava/train/train.py::preprocess_llada):
  plain (stage 1, `conv_llada_plain`):  x0 = <image> caption "\n"   -- no BOS, no template;
      labels = -100 on the image only, so the caption and the "\n" are targets.
  conv  (stages 2-3, `preprocess_llada`): every message m is rendered on its own as
      <|startoftext|><|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>
      (content not trimmed), the BOS kept on the first (system) message only. Labels: -100 on system and
      user messages, targets on assistant messages; and, LLaDA-V's quirk (switch `unignore_special`), every
      <|startoftext|>, <|start_header_id|>, <|end_header_id|>, <|eot_id|> in *any* turn is a target too.
      A turn holding exactly one "<image>" gets it moved to its front: "<image>\n" + text (official
      preprocess_multimodal; details, edge cases and the per-image token counts: the LLaVA section below).
      In a record without images "<image>" is ordinary text, as officially.
Images: a one-image record uses the model's image_aspect_ratio (square in stage 1: n^2 = 729 tokens;
anyres_max_4 from stage 2 on: base + crops, n^2 + h'(w' + 1) tokens, 2929 for a 640x480 picture); each
image of a multi-image record is padded to a square (pad mode: n^2 + 1 = 730 with the newline).
Each "<image>" becomes that many IMAGE_TOKEN_INDEX placeholders, and only then is the sequence cut to
max_len, as the official code cuts after inserting the features: the cut may fall inside an image
(`truncation`; "whole_images" moves it to before the image instead).

Padding (collate, ML-GSAI/LLaDA-V train/llava/train/train.py::DataCollatorForSupervisedDataset): ids right-padded with
EOS; labels padded with EOS too (`pad_labels`, official: padding is a target, like LLaDA SFT) or with -100. The official
collator sends no attention mask, so every token attends to the padding; the trainer follows that unless told otherwise.

Bad samples (missing or corrupt image, malformed record, no target left) come back as {"error": reason};
the collate function drops them and counts them per reason, and the trainer stops a run whose bad fraction
passes a limit (BadSampleCounter). Global batches are random (random_batches, stage 1's RandomSampler) or, in
stages 2-3, random per modality and sorted by length within (length_grouped_batches, LLaVA's
group_by_modality_length): one global batch never mixes images and text, except the epoch's last ones.
"""
import json
import math
import os
import random
import sys
from collections import Counter
from functools import partial

import torch

from tokenizer import IMAGE_TOKEN_INDEX, Tokenizer
from vision import MODES, load_image, num_tokens, process_image

IGNORE_INDEX = -100       # label of positions that are never masked and never scored

SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual "
                 "content that the user provides, and assist the user with a variety of tasks using "
                 "natural language.")



# LLaDA-V's reasoning switch (think_mode in ML-GSAI/LLaDA-V eval/lmms-eval/lmms_eval/models/llava_onevision_llada.py;
# train/create_mix_data.py): appended to the user's text at eval and in the stage-3 data
THINK_SUFFIX = {None: "", "think": " /think", "no_think": " /no_think"}


def chat_template(messages) -> str:
    """The one template renderer: the tokenizer chat_template in GSAI-ML/LLaDA-8B-Instruct's tokenizer_config.json
    (LLaDA-V's is the same). messages [{"role", "content"}] -> BOS once, then
    <|start_header_id|>role<|end_header_id|>\n\n content.strip() <|eot_id|> per message, and always the assistant header
    at the end."""
    out = "<|startoftext|>"
    for m in messages:
        out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
    return out + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def llada_v_messages(question: str, system: str | None = SYSTEM_PROMPT, n_images: int = 1, think=None,
                     history=()) -> list:
    """The messages LLaDA-V's demo and eval build (and the toy, with system=None): the system prompt, the
    images first in the first user turn, earlier turns `history` [(question, answer)], and the optional
    " /think" or " /no_think" suffix on every user turn. n images are written " ".join(["<image>"] * n) + "\n"
    (ML-GSAI/LLaDA-V eval/lmms-eval/lmms_eval/models/llava_onevision_llada.py::generate_until). Render with
    chat_template()."""
    if think not in THINK_SUFFIX:
        raise ValueError(f"think={think!r}: use None, 'think' or 'no_think'")
    images = " ".join(["<image>"] * n_images) + "\n" if n_images else ""
    msgs = [{"role": "system", "content": system}] if system else []
    turns = list(history) + [(question, None)]
    for i, (q, a) in enumerate(turns):
        msgs.append({"role": "user", "content": (images if i == 0 else "") + q.strip() + THINK_SUFFIX[think]})
        if a is not None:
            msgs.append({"role": "assistant", "content": a})
    return msgs


def tokenizer_image_token(tok: Tokenizer, prompt: str, n_image_tokens, keep_after_image: bool = False) -> list[int]:
    """Official inference prompt ids (LLaVA's mm_utils.tokenizer_image_token, as LLaDA-V's demo and eval call
    it), with each image expanded to its n_image_tokens placeholders (an int, or one count per "<image>").

    The official function tokenizes the chunks between "<image>" tags separately; when the first chunk starts
    with BOS it sets offset = 1 and keeps chunk[offset:] of every chunk (and one -200 of a two-long separator).
    Written for tokenizers that put a BOS in front of every chunk, that strips those BOS; LLaDA's tokenizer adds
    none, so it drops each later chunk's first real token: the "\n" of "<image>\n" + question, the " " between
    images (ML-GSAI/LLaDA-V train/llava/mm_utils.py::tokenizer_image_token,
    eval/lmms-eval/lmms_eval/models/llava_onevision_llada.py::generate_until). keep_after_image=True keeps it: the
    training form (preprocess_llada), and what tok.encode_with_image gives."""
    chunks = [tok.encode(c) for c in prompt.split("<image>")]
    offset = 1 if chunks[0][:1] == [tok.bos_id] and not keep_after_image else 0
    ids = list(chunks[0])  # the first chunk is whole (the official code re-adds its BOS by hand)
    for i, chunk in enumerate(chunks[1:]):
        n = n_image_tokens if isinstance(n_image_tokens, int) else n_image_tokens[i]
        ids += [IMAGE_TOKEN_INDEX] * n + chunk[offset:]
    return ids


def default_system(tokenizer_name: str) -> str | None:
    """The toy data is trained without a system turn (shorter sequences); the real model uses LLaDA-V's."""
    return None if tokenizer_name == "toy" else SYSTEM_PROMPT


def sft_example(tok: Tokenizer, question: str, answer: str, gen_length: int, n_image_tokens: int,
                system: str | None = None):
    """(ids, labels) for one SFT sample: prompt, then a fixed G = gen_length answer canvas
    answer ++ <|eot_id|> ++ EOS padding. Labels are IGNORE_INDEX on the prompt (and image). The prompt keeps
    the "\n" after <image> (the training form; the toy is trained and sampled this way)."""
    prompt = tok.encode_with_image(chat_template(llada_v_messages(question, system)), n_image_tokens)
    ans = tok.encode(answer) + [tok.eot_id]
    if len(ans) > gen_length:
        raise ValueError(f"answer of {len(ans)} tokens does not fit gen_length={gen_length}; raise gen_length")
    ans += [tok.eos_id] * (gen_length - len(ans))
    return prompt + ans, [IGNORE_INDEX] * len(prompt) + ans


def collate(examples, pad_id: int, label_pad: int = IGNORE_INDEX):
    """The one collate: right-pad a list of (ids, labels) to one length with pad_id, the labels with
    label_pad (IGNORE_INDEX: padding is never scored; the LLaVA collator passes EOS: padding is a target).
    Returns ids (B, L), labels (B, L), attention_mask (B, L) bool (True on the real tokens)."""
    L = max(len(ids) for ids, _ in examples)
    B = len(examples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), label_pad, dtype=torch.long)
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



def prompt_batch(tok: Tokenizer, questions, n_image_tokens, system: str | None = None, think=None, history=(),
                 keep_after_image: bool = True):
    """Left-padded prompts for batched sampling (as the official generate.py does): ids (B, L), attention
    mask (B, L). Left padding keeps every answer canvas at the same columns. Positions still run 0..L-1,
    so a left-padded prompt is shifted; with the padding masked out that changes nothing, because RoPE
    attention scores depend only on relative positions.
    n_image_tokens: every question's visual-token count, or one count per question (0: no image).
    keep_after_image: the training form, "\n" after <image> kept (the toy is trained and sampled so);
    False: the official inference form (tokenizer_image_token drops it). think, history: llada_v_messages."""
    counts = [n_image_tokens] * len(questions) if isinstance(n_image_tokens, int) else list(n_image_tokens)
    ps = [tokenizer_image_token(tok, chat_template(llada_v_messages(q, system, int(n > 0), think, history)), n,
                                keep_after_image) for q, n in zip(questions, counts)]
    L = max(map(len, ps))
    ids = torch.full((len(ps), L), tok.pad_id, dtype=torch.long)
    attn = torch.zeros(len(ps), L, dtype=torch.bool)
    for i, p in enumerate(ps):
        ids[i, L - len(p):] = torch.tensor(p)
        attn[i, L - len(p):] = True
    return ids, attn


# ----------------------------------------------------------------------------------------------
# LLaVA-format data: records -> (ids, labels, crops), collate, batches (official train.py)
#
# One sample, as the official LazySupervisedDataset + preprocess_multimodal + preprocess_llada build it:
#   1. the conversation is cleaned: a leading "gpt" turn is dropped; a "system" turn is a bad sample (the
#      official code errors on it and retries); every turn holding exactly one "<image>" that does not
#      already start with it becomes "<image>\n" + the rest, stripped (any role, any number of images);
#   2. each "<image>", in reading order, takes the next image file. The mode of an image: the model's
#      image_aspect_ratio for a one-image record (square in stage 1, anyres_max_4 in stages 2-3), "pad"
#      for every image of a multi-image record. An image whose record has no "<image>" tag at all gives
#      no features (official: it is encoded and then spliced in as zero rows), so it is not even loaded;
#   3. each "<image>" becomes T_k IMAGE_TOKEN_INDEX placeholders, T_k = vision.num_tokens(W_k x H_k, mode):
#      n^2 (square), n^2 + 1 (pad with the newline), n^2 + h'(w' + 1) (anyres); the image's crops
#      (K_k, 3, S, S) and its size go along, and the model packs its features into exactly T_k rows;
#   4. the sequence is cut to max_len after that expansion (official: after the features are spliced in),
#      which may cut through an image: the image keeps its first rows (`truncation="official"`), or, with
#      "whole_images", the cut moves to just before the image and the images after it are dropped.
# "from" -> role. preprocess_llada maps human/gpt and passes any other name through, so a later "system" turn is
# rendered as a system message (its text ignored like a user turn's)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def image_crops(img, mode: str, image_size: int, patch_size: int, newline: bool):
    """One PIL image -> (crops (K, 3, S, S), (W, H), T visual tokens) for the model's packing (vision.py)."""
    crops, size = process_image(img, mode, image_size)
    return crops, size, num_tokens(size, mode, newline, image_size, patch_size)


def move_image_first(text: str) -> str:
    """preprocess_multimodal: a turn with exactly one "<image>", not already first, -> "<image>\n" + rest."""
    if text.count("<image>") == 1 and not text.startswith("<image>"):
        return "<image>\n" + text.replace("<image>", "").strip()
    return text


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


TRUNCATIONS = ("official", "whole_images")


def record_problem(r, fmt: str = "conv") -> str | None:
    """The one validation every LLaVA record goes through -> None, or the reason it is skipped (the bad-
    sample counter counts them by this reason). A record is an object with a non-empty "conversations"
    list of {"from": human | gpt | user | assistant | system, "value": string} turns and an optional "image":
    one path or a list of paths (strings). What the official preprocessing trains is kept (LLaDA-V train.py):
    empty answers (their header and <|eot_id|> are still targets), a system turn after the first. Refused as
    the official code refuses them: a conversation that opens with a system turn (preprocess_llada's
    first-turn lookup raises, and the sample is replaced), a plain record that is not an "<image>" turn and a
    caption (preprocess_plain's asserts)."""
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
    if fmt == "plain":
        if im is None or len(conv) != 2 or "<image>" not in conv[0]["value"]:
            return "malformed record"  # preprocess_plain: exactly [<image> turn, caption]
        return None
    if conv[0]["from"] == "system":
        return "system turn first"  # preprocess_llada looks the first role up in {human, gpt}: KeyError
    if im is not None and not any(ROLES[m["from"]] == "user" for m in conv):
        return "image without a user turn"  # nowhere to put the image tokens
    return None


class LlavaDataset(torch.utils.data.Dataset):
    """LLaVA-format records -> {"ids", "labels", "pixels": every kept crop (sum K, 3, S, S) or None,
    "layout": [(K, (W, H), rows kept)] per kept image}, or {"error": reason} for a bad sample.
    image_mode: the model's image_aspect_ratio (one-image records); newline: the model has `image_newline`."""

    def __init__(self, path: str, image_root: str, tok: Tokenizer, image_size: int, n_patches: int,
                 fmt: str = "conv", max_len: int = 8192, unignore_special: bool = True,
                 system: str | None = SYSTEM_PROMPT, image_mode: str = "square", newline: bool = False,
                 truncation: str = "official"):
        if fmt not in ("plain", "conv"):
            raise ValueError(f"unknown data format {fmt!r}; use 'plain' (stage 1 captions) or 'conv'")
        if image_mode not in MODES:
            raise ValueError(f"unknown image_mode {image_mode!r}; choose one of {', '.join(MODES)}")
        if truncation not in TRUNCATIONS:
            raise ValueError(f"unknown truncation {truncation!r}; choose one of {', '.join(TRUNCATIONS)}")
        self.records = load_records(path)
        self.image_root, self.tok, self.fmt, self.max_len = image_root, tok, fmt, max_len
        self.image_size, self.n_patches, self.system = image_size, n_patches, system
        # patch p with floor(S / p) = n: S // (S // n) gives back n for any S, n (see VisionConfig.n_patches)
        self.patch_size = image_size // math.isqrt(n_patches)
        self.unignore_special, self.image_mode, self.newline = unignore_special, image_mode, newline
        self.truncation = truncation
        self.special = {tok.bos_id, tok.start_header_id, tok.end_header_id, tok.eot_id}

    def __len__(self):
        return len(self.records)

    def length(self, i: int) -> int:
        """The grouping length, cheap (no image decoding, no tokenizing), as the official modality_lengths:
        the words of every turn, negative for a text-only record (the sampler groups the two kinds apart).
        Never 0 (an empty record counts one word; the official code asserts instead)."""
        r = self.records[i]
        conv = r.get("conversations") if isinstance(r, dict) else None
        words = sum(len(str(m.get("value", "")).split()) for m in conv if isinstance(m, dict)) if isinstance(conv, list) else 0
        return max(1, words) * (1 if _image_list(r) else -1)

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
        if self.fmt == "conv":
            if ROLES[conv[0]["from"]] == "assistant":
                conv = conv[1:]  # preprocess_llada: the conversation must start with the human
            if files:            # preprocess_multimodal runs on records that have an image only
                conv = [dict(m, value=move_image_first(m["value"])) for m in conv]
        # "<image>" is an image slot only in a record with images: preprocess_llada adds the "<image>" token to
        # the tokenizer only then (has_image), so in a text-only record it is ordinary text
        n_slots = sum(m["value"].count("<image>") for m in conv) if files else 0
        if self.fmt == "plain":
            files, n_slots = files[:1], 1
        elif n_slots > len(files):  # more slots than images: the official splice would borrow another sample's
            raise _BadSample("image count mismatch")
        # fewer slots than files: slot k takes file k; the official code encodes the rest and never splices them
        # in at one sample per GPU (stages 2-3), so they are not even loaded here
        # modes and token counts need each image's size: open the images first (at most n_slots of them)
        mode = self.image_mode if len(files) == 1 else "pad"  # _get_item: several images -> pad mode each
        images = []
        for f in files[:n_slots]:
            # a record names files under --image_root; an absolute path or a ".." would read anywhere on the disk
            if os.path.isabs(f) or os.path.normpath(f).split(os.sep)[0] == "..":
                raise _BadSample("image path outside --image_root")
            p = os.path.join(self.image_root, f)
            if not os.path.exists(p):
                raise _BadSample("missing image")
            images.append(image_crops(load_image(p), mode, self.image_size, self.patch_size, self.newline))
        counts = [t for _, _, t in images]                          # T_k, one per "<image>"
        ids, labels = self._plain(conv, counts[0]) if self.fmt == "plain" else self._conv(conv, counts, bool(files))
        had = any(l != IGNORE_INDEX for l in labels)  # the cut below may take every target (a short --max_len)
        ids, labels, keep = _truncate(ids, labels, counts, self.max_len, whole_images=self.truncation != "official")
        if all(l == IGNORE_INDEX for l in labels):  # nothing to learn (possible with unignore_special=False)
            raise _BadSample(f"no answer left within max_len={self.max_len} tokens" if had else "no target")
        kept = images[:len(keep)]
        pixels = torch.cat([c for c, _, _ in kept]) if kept else None      # (sum K, 3, S, S)
        layout = [(c.shape[0], size, n) for (c, size, _), n in zip(kept, keep)]
        return {"ids": ids, "labels": labels, "pixels": pixels, "layout": layout}

    def _plain(self, conv, n_img):
        # conv_llada_plain: "<image>" + caption + "\n"; only the image is ignored
        cap = self.tok.encode(conv[1]["value"] + "\n")
        return [IMAGE_TOKEN_INDEX] * n_img + cap, [IGNORE_INDEX] * n_img + cap

    def _conv(self, conv, counts, has_image: bool):
        """preprocess_llada: each message rendered on its own, BOS on the first one only; counts: T_k per image.
        has_image: "<image>" marks an image slot (else it is text, as in a text-only record officially)."""
        tok, ids, labels = self.tok, [], []
        msgs = ([("system", self.system)] if self.system else []) + [(ROLES[m["from"]], m["value"]) for m in conv]
        for k, (role, text) in enumerate(msgs):
            bos = "<|startoftext|>" if k == 0 else ""
            n = text.count("<image>") if has_image else 0
            msg = f"{bos}<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"
            t = tok.encode_with_image(msg, counts[:n]) if has_image else tok.encode(msg)
            counts = counts[n:]  # the next turn's images
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


def _truncate(ids, labels, n_img, max_len, whole_images: bool = False):
    """Cut to max_len after the image placeholders are in. n_img: T_k per image, in order.
    -> ids, labels, rows kept per image that is still (partly) there. whole_images: never cut inside an
    image; the cut moves to just before it and the images after it are dropped (the official cut may
    leave an image's first rows only: prepare_inputs_labels_for_multimodal cuts the spliced embeddings)."""
    if len(ids) <= max_len:
        return ids, labels, list(n_img)
    cut, keep, pos = max_len, [], 0
    for n in n_img:  # walk over the image spans
        start = ids.index(IMAGE_TOKEN_INDEX, pos)
        if start >= max_len:
            break
        end = start + n
        if end > max_len:
            if whole_images:
                cut = start
            else:
                keep.append(max_len - start)
            break
        keep.append(n)
        pos = end
    return ids[:cut], labels[:cut], keep


def collate_llava(items, pad_id: int, pad_labels: bool = True):
    """Drop bad samples, right-pad the rest. -> dict(ids, labels, attn (B, L), pixels (sum K, 3, S, S) or
    None, layout [(K, (W, H), rows)] per image in placeholder order, errors Counter, n_samples).
    Padding (official llada collator, ML-GSAI/LLaDA-V train/llava/train/train.py::DataCollatorForSupervisedDataset): ids
    = EOS, labels = EOS if pad_labels else -100. attn (B, L) marks the real tokens; the official collator sends no
    attention mask at all, so the trainer passes attn to the model only when asked to (TrainConfig.key_pad_mask)."""
    good = [it for it in items if "error" not in it]
    errors = Counter(it["error"] for it in items if "error" in it)
    out = {"errors": errors, "n_seen": len(items), "n_samples": len(good)}
    if not good:
        return out | {"ids": None}
    ids, labels, attn = collate([(it["ids"], it["labels"]) for it in good], pad_id,
                                pad_id if pad_labels else IGNORE_INDEX)  # (B, L) each
    pix = [it["pixels"] for it in good if it["pixels"] is not None]
    layout = [spec for it in good for spec in it["layout"]]  # the placeholders fill sample by sample, in order
    return out | {"ids": ids, "labels": labels, "attn": attn, "pixels": torch.cat(pix) if pix else None,
                  "layout": layout}


def random_batches(n: int, batch_size: int, seed: int, epoch: int):
    """Stage 1 (HF RandomSampler): a random permutation with (seed, epoch), cut into full batches."""
    idx = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(idx)
    return [idx[j:j + batch_size] for j in range(0, n - batch_size + 1, batch_size)]


def _permutation(rng: random.Random, n: int) -> list:
    idx = list(range(n))
    rng.shuffle(idx)
    return idx


def _even_chunks(indices, size, n: int) -> list:
    """split_to_even_chunks (LLaVA llava_trainer.py): deal indices (longest first) into n chunks of equal count,
    each to the chunk with the smallest total size so far (a full chunk takes no more); a count that does not
    divide by n is dealt round-robin instead."""
    if len(indices) % n:
        return [indices[k::n] for k in range(n)]
    chunks, totals = [[] for _ in range(n)], [0] * n
    for i in indices:
        k = totals.index(min(totals))
        chunks[k].append(i)
        totals[k] += size(i)
        if len(chunks[k]) == len(indices) // n:
            totals[k] = math.inf
    return chunks


def length_grouped_batches(lengths, batch_size: int, seed: int, epoch: int, micro: int = 1):
    """Stages 2-3: the global batches of one epoch, in order, as LLaVA's LengthGroupedSampler with
    group_by_modality_length orders them (llava_trainer.get_modality_length_grouped_indices, which LLaDA-V's
    stage scripts turn on). lengths: signed, > 0 for records with images, < 0 for text-only (LlavaDataset.length).
    Per modality (get_length_grouped_indices): a random permutation is cut into megabatches of one global batch
    (batch_size = micro x processes x accumulation), each sorted longest first and dealt into its batch_size //
    micro micro-batches of similar total length (_even_chunks); micro-batch k of a global batch goes to process
    k mod W at accumulation step k // W (MicroBatches), as Accelerate shards the per-device batches. Then every
    megabatch but the last of each modality is shuffled, and the two lasts go at the end, together and in index
    order: the only global batches that may mix images and text. Only whole global batches are kept (drop_last).
    One modality alone: its megabatches in their random order, the lengths taken with their sign (so an all-text
    epoch is sorted shortest first, as officially). A step is thus a random draw of one kind of record: lengths
    vary from step to step, the micro-batches of a step carry similar totals. The random draws come from
    (seed, epoch) only, so a resumed run sees the same data."""
    rng = random.Random(seed * 1_000_003 + epoch)

    def grouped(idx, size):  # one modality -> its indices, megabatch by megabatch, each as its chunks in order
        perm = [idx[p] for p in _permutation(rng, len(idx))]
        out = []
        for s in range(0, len(perm), batch_size):
            mega = sorted(perm[s:s + batch_size], key=size, reverse=True)
            out += [i for chunk in _even_chunks(mega, size, batch_size // micro) for i in chunk]
        return out

    image = [i for i, n in enumerate(lengths) if n >= 0]
    text = [i for i, n in enumerate(lengths) if n < 0]
    if not image or not text:
        order = grouped(list(range(len(lengths))), lambda i: lengths[i])
    else:
        megas = [[m[s:s + batch_size] for s in range(0, len(m), batch_size)]
                 for m in (grouped(image, lambda i: lengths[i]), grouped(text, lambda i: -lengths[i]))]
        rest = megas[0][:-1] + megas[1][:-1]
        order = [i for k in _permutation(rng, len(rest)) for i in rest[k]] + sorted(megas[0][-1] + megas[1][-1])
    return [order[s:s + batch_size] for s in range(0, len(order) - batch_size + 1, batch_size)]


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
    Global batches are length-grouped by modality or random (group_by_length). The micro-batches are the
    same for any process count (only their split over processes and accumulation steps changes), so with a
    fixed micro the padding, and so the loss, is too. Loads with DataLoader workers; the order depends only on
    (seed, epoch), never on the worker count."""

    def __init__(self, ds: LlavaDataset, global_batch: int, micro: int, world: int, rank: int, seed: int,
                 workers: int, pad_labels: bool = True, group_by_length: bool = True):
        self.ds, self.gb, self.micro, self.world, self.rank = ds, global_batch, micro, world, rank
        self.seed, self.workers, self.pad_labels, self.group = seed, workers, pad_labels, group_by_length
        self.lengths = [ds.length(i) for i in range(len(ds))]
        self.steps_per_epoch = len(ds) // global_batch
        if self.steps_per_epoch == 0:
            raise SystemExit(f"the dataset has {len(ds)} records, fewer than one global batch of {global_batch}; "
                             f"lower --batch_size")

    def iterate(self, start_step: int):
        step = start_step
        while True:
            epoch, first = divmod(step, self.steps_per_epoch)
            gbatches = (length_grouped_batches(self.lengths, self.gb, self.seed, epoch, self.micro) if self.group
                        else random_batches(len(self.lengths), self.gb, self.seed, epoch))
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


# ----------------------------------------------------------------------------------------------
# A collated LLaVA micro-batch -> the model's inputs (train.py)

def key_mask_on(tc) -> bool:
    """(tc: train.TrainConfig) Whether padding keys are hidden from attention: LLaDA-V's collator hides nothing
    (ML-GSAI/LLaDA-V train/llava/train/train.py::DataCollatorForSupervisedDataset), so --data runs attend to the EOS
    padding by default; the toy's synthetic recipe has always hidden it."""
    return tc.key_pad_mask == "on" or (tc.key_pad_mask == "auto" and not tc.data)


def llava_inputs(b, mc, pad_id: int, device, key_pad_mask: bool, need_image: bool):
    """A collated LLaVA micro-batch (data.collate_llava) -> ids, labels, attn (B, L) (the real tokens, for
    counting), and the model's keyword inputs: pixels (every crop) with image_layout (each image's crops,
    size and token count; the model packs them, model.encode_crops), and attention_mask only with
    key_pad_mask: the official collator sends none, so every query attends to the EOS padding (ML-GSAI/LLaDA-V
    train/llava/train/train.py::DataCollatorForSupervisedDataset). need_image: a text-only micro-batch under DDP / FSDP2
    gets one blank image appended to row 0, hidden from attention (mask 0) and from the loss (label -100): the vision
    tower, the projector and image_newline then run on every process in the same order, so the gradient collectives line
    up (and DDP sees every parameter used)."""
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


def open_llava(tc, mc, tok, world: int, rank: int, micro: int):
    """train.py --data (tc: its TrainConfig, mc: the model config): the LLaVA dataset -> (MicroBatches of this
    rank, BadSampleCounter); with --epochs, max_steps follows from the dataset's size."""
    try:
        ds = LlavaDataset(tc.data, tc.image_root, tok, mc.vision.image_size, mc.vision.n_patches,
                          fmt=tc.data_format, max_len=min(tc.max_len, mc.lm.max_seq_len),
                          unignore_special=tc.unignore_special, image_mode=mc.image_aspect_ratio,
                          newline="unpad" in mc.mm_patch_merge_type, truncation=tc.truncation)
    except (OSError, ValueError) as e:
        sys.exit(str(e))
    batches = MicroBatches(ds, tc.batch_size, micro, world, rank, tc.seed, tc.workers, tc.pad_labels,
                           tc.group_by_length)
    if tc.epochs > 0:
        tc.max_steps = max(1, math.ceil(tc.epochs * batches.steps_per_epoch))
    return batches, BadSampleCounter(tc.max_bad_frac, min_seen=min(50, len(ds)))
