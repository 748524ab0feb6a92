"""
Data: tokenizer, chat template, and an embedded synthetic image-question dataset.

Where this sits in the flow:  image -> ViT -> projector -> [token sequence] -> masked diffusion.
This file builds the token sequence and the answer mask that the diffusion loss needs.

1. Tokenizer. A `tiktoken.Encoding` with LLaDA's special tokens. The toy vocabulary is a byte-level
   BPE learnt here, in a few milliseconds, from the synthetic dataset's own sentences (no download),
   so the toy model and the real 8B model run the very same template and sampling code.
   Byte-level BPE: start from the 256 single bytes; repeatedly merge the most frequent adjacent pair;
   rank r of a merged token = the order in which it was learnt. tiktoken encodes by always merging the
   adjacent pair of lowest rank, which reproduces the learnt segmentation.

2. Chat template (REFERENCE 3.1, 3.3), one user turn with an image:
     <|startoftext|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
     <|start_header_id|>user<|end_header_id|>\n\n<image>\n{question}<|eot_id|>
     <|start_header_id|>assistant<|end_header_id|>\n\n
   The string "<image>" becomes IMAGE_TOKEN_INDEX (-200) placeholders, one per visual token; the model
   swaps them for projected image features (model.py). The toy data leaves out the system turn to
   keep sequences short; the template code is the same.

3. SFT sequence (REFERENCE 3.2, LLaDA GUIDELINES): x0 = prompt ++ answer ++ <|eot_id|> ++ <|endoftext|>*,
   padded with EOS to a fixed answer length G (= the sampler's gen_length). Labels are -100 on the
   prompt and the image (never masked) and the token itself on the G answer positions (EOS padding
   included: the model learns to fill unused canvas with EOS, as LLaDA does).

4. Synthetic visual questions: pillow draws 1-4 objects (3 shapes x 6 colours, random positions and
   sizes: each centred in a random cell of a 4 x 4 board) on a small canvas. Five question kinds: colour of a named shape, shape of a named colour,
   count, spatial relation between two objects, and "describe the image" (objects left to right).
   Sample i of a split is drawn from its own seeded RNG, so the stream is endless, indexable (exact
   resume) and the held-out split is fixed.
"""
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import regex
import tiktoken
import torch
from PIL import Image, ImageDraw

IMAGE_TOKEN_INDEX = -200  # official LLaVA / LLaDA-V placeholder id for one visual token
IGNORE_INDEX = -100       # label of positions that are never masked and never scored

# LLaDA's special tokens, in LLaDA's id order (REFERENCE 1.2); the toy vocabulary appends them after
# its BPE tokens exactly like LLaDA appends them after its 126,080 base tokens.
SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# The pre-tokenizer regex of the Ling/Bailing tokenizer that LLaDA's appears to be (REFERENCE 8):
# cl100k-style, but digits are split one by one.
PAT_STR = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
           r"""|\s*[\r\n]|\s+(?!\S)|\s+""")

SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual "
                 "content that the user provides, and assist the user with a variety of tasks using "
                 "natural language.")


# ----------------------------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """A tiktoken Encoding plus the ids the template and the sampler need."""

    def __init__(self, enc: tiktoken.Encoding):
        self.enc = enc
        st = enc._special_tokens
        missing = [s for s in SPECIAL_TOKENS if s not in st]
        if missing:
            raise ValueError(f"tokenizer lacks LLaDA special tokens {missing}; build it with all of {SPECIAL_TOKENS}")
        self.bos_id, self.eos_id, self.mask_id = st["<|startoftext|>"], st["<|endoftext|>"], st["<|mdm_mask|>"]
        self.start_header_id, self.end_header_id = st["<|start_header_id|>"], st["<|end_header_id|>"]
        self.eot_id = st["<|eot_id|>"]
        self.pad_id = self.eos_id  # LLaDA pads with EOS (REFERENCE 1.2)
        self.vocab_size = enc.n_vocab

    def encode(self, text: str) -> list[int]:
        # Special-token strings in the text are turned into their ids (the template relies on it).
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def encode_with_image(self, text: str, n_image_tokens: int) -> list[int]:
        """Encode `text`, turning each "<image>" into n_image_tokens IMAGE_TOKEN_INDEX placeholders.
        (Official tokenizer_image_token inserts one -200 and expands it inside the model; expanding here
        keeps batching trivial and is equivalent.)"""
        chunks = text.split("<image>")
        ids = []
        for i, chunk in enumerate(chunks):
            if i > 0:
                ids += [IMAGE_TOKEN_INDEX] * n_image_tokens
            ids += self.encode(chunk)
        return ids


def train_bpe(texts, max_merges=10_000):
    """Learn byte-level BPE ranks from `texts`: {bytes: rank}. Merges until every pre-token is one token
    (or max_merges); ties between equally frequent pairs go to the smaller byte string (deterministic)."""
    # Pre-tokenize exactly as tiktoken will (same regex; special-token strings are cut out first, since
    # tiktoken never runs BPE over them). `regex` supports \p{L} and possessive quantifiers like
    # tiktoken's engine; it is installed with tiktoken.
    specials = "|".join(map(re.escape, SPECIAL_TOKENS))
    words = Counter(m for t in texts for piece in re.split(specials, t) for m in regex.findall(PAT_STR, piece))
    splits = {w: [bytes([b]) for b in w.encode("utf-8")] for w in words}
    ranks = {bytes([i]): i for i in range(256)}
    for _ in range(max_merges):
        pairs = Counter()
        for w, parts in splits.items():
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], [-x for x in p[0] + p[1]]))
        merged = best[0] + best[1]
        ranks[merged] = len(ranks)
        for w, parts in splits.items():  # apply the merge everywhere
            i, out = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = out
    return ranks


@lru_cache(maxsize=None)
def toy_tokenizer() -> Tokenizer:
    """The toy vocabulary: BPE learnt from every sentence the synthetic dataset can produce."""
    ranks = train_bpe(_toy_corpus())
    specials = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
    return Tokenizer(tiktoken.Encoding("llada_v_toy", pat_str=PAT_STR, mergeable_ranks=ranks,
                                       special_tokens=specials))


def get_tokenizer(name: str) -> Tokenizer:
    if name == "toy":
        return toy_tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}: only 'toy' is built in (the official one is converted "
                     f"from a tokenizer.json)")


# ----------------------------------------------------------------------------------------------
# Chat template

def chat_prompt(question: str, system: str | None = SYSTEM_PROMPT, image: bool = True) -> str:
    """LLaDA-V's inference prompt for one user turn (REFERENCE 3.3). Content is trimmed, BOS only once,
    and the prompt always ends with the assistant header."""
    def turn(role, content):
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"
    user = ("<image>\n" if image else "") + question.strip()
    return ("<|startoftext|>" + (turn("system", system) if system else "") + turn("user", user)
            + "<|start_header_id|>assistant<|end_header_id|>\n\n")


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


# ----------------------------------------------------------------------------------------------
# Synthetic visual questions

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 230),
          "yellow": (235, 205, 30), "purple": (150, 60, 200), "orange": (245, 135, 25)}
SHAPES = ["circle", "square", "triangle"]
NUMBERS = ["zero", "one", "two", "three", "four"]
KINDS = ["color", "shape", "count", "relation", "describe"]


BACKGROUND = (128, 128, 128)
GRID = 4  # the canvas is a GRID x GRID board of cells; each object sits inside one cell


@dataclass
class Obj:
    color: str
    shape: str
    col: int  # cell, 0..GRID-1 left to right
    row: int  # cell, 0..GRID-1 top to bottom
    x: int    # centre, pixels
    y: int
    r: int    # half size, pixels


def _scene(rng: random.Random, size: int) -> list[Obj]:
    """1-4 objects with distinct (colour, shape), each centred in its own random cell of a GRID x GRID
    board, with a random size (50-90% of the cell). Keeping every object inside one cell is what lets
    the toy ViT (one patch per cell) learn in minutes on a CPU; the listing order is column by column,
    top to bottom within a column ("left to right")."""
    cell = size // GRID
    n = rng.randint(1, 4)
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    objs = []
    for (c, s), k in zip(kinds, rng.sample(range(GRID * GRID), n)):
        col, row = k % GRID, k // GRID
        r = rng.randint(max(2, cell // 4), max(2, (cell * 9) // 20))
        x, y = col * cell + cell // 2, row * cell + cell // 2
        objs.append(Obj(c, s, col, row, x, y, r))
    return sorted(objs, key=lambda o: (o.col, o.row))


def draw(objs: list[Obj], size: int, blank: bool = False) -> Image.Image:
    # Mid-grey background: it normalises to ~0 (vision.preprocess), so a blank patch carries almost no
    # signal and the visual tokens differ mostly where objects are (a white one drowns them in a
    # large constant shared by every token, which slows learning a lot).
    img = Image.new("RGB", (size, size), BACKGROUND)
    if blank:
        return img
    d = ImageDraw.Draw(img)
    for o in objs:
        box = (o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r)
        fill = COLORS[o.color]
        if o.shape == "circle":
            d.ellipse(box, fill=fill)
        elif o.shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(o.x, o.y - o.r), (o.x - o.r, o.y + o.r), (o.x + o.r, o.y + o.r)], fill=fill)
    return img


def _question(rng: random.Random, objs: list[Obj], kind: str):
    """(question, answer) of `kind` about the scene, or None when the scene cannot support it."""
    if kind == "color":
        uniq = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if not uniq:
            return None
        o = rng.choice(uniq)
        return f"What color is the {o.shape}?", o.color
    if kind == "shape":
        uniq = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
        if not uniq:
            return None
        o = rng.choice(uniq)
        return f"What shape is the {o.color} object?", o.shape
    if kind == "count":
        return "How many objects are there?", NUMBERS[len(objs)]
    if kind == "relation":
        # only pairs in the same row or column, so that the answer is unambiguous in pixels too
        pairs = [(a, b, ("left" if a.col < b.col else "right") if a.row == b.row else ("above" if a.row < b.row else "below"))
                 for a in objs for b in objs if a is not b and (a.row == b.row or a.col == b.col)]
        if not pairs:
            return None
        a, b, rel = rng.choice(pairs)
        return f"Where is the {a.color} {a.shape} relative to the {b.color} {b.shape}?", rel
    if kind == "describe":
        return "Describe the image.", ", ".join(f"{o.color} {o.shape}" for o in objs)
    raise ValueError(kind)


def make_sample(seed: int, size: int, kind: str | None = None):
    """One (image, question, answer, kind), drawn deterministically from `seed`. If `kind` is None it is
    drawn uniformly; scenes that cannot support the kind are redrawn."""
    rng = random.Random(seed)
    kind = kind or rng.choice(KINDS)
    while True:
        objs = _scene(rng, size)
        qa = _question(rng, objs, kind)
        if qa is not None:
            return draw(objs, size), qa[0], qa[1], kind


def _toy_corpus():
    """Every string the toy data can tokenize (prompts as the template renders them, and answers),
    for learning the toy BPE."""
    questions = ["How many objects are there?", "Describe the image."]
    answers = NUMBERS + ["left", "right", "above", "below"]
    for c in COLORS:
        for s in SHAPES:
            questions += [f"What color is the {s}?", f"What shape is the {c} object?",
                          f"Where is the {c} {s} relative to the {c} {s}?"]
            answers += [c, s, f"{c} {s}, {c} {s}"]
    texts = [chat_prompt(q, system=None) for q in questions] + answers
    return texts + [chat_prompt("", system=SYSTEM_PROMPT), " /think /no_think"]


# Held-out and demo samples come from seed ranges that the training stream never reaches.
HELDOUT_OFFSET = 10**9
DEMO_OFFSET = 2 * 10**9


class SyntheticVQA:
    """The endless training stream (`train_batch(step)`) and a fixed held-out split (`heldout(n)`)."""

    def __init__(self, tok: Tokenizer, image_size: int, n_image_tokens: int, gen_length: int, seed: int = 0):
        self.tok, self.size, self.n_img, self.G, self.seed = tok, image_size, n_image_tokens, gen_length, seed

    def sample(self, index: int, kind: str | None = None):
        return make_sample(self.seed * 10**10 + index, self.size, kind)

    def heldout(self, n: int):
        """n held-out samples, the kinds in equal shares (cycled)."""
        return [make_sample(HELDOUT_OFFSET + self.seed * 10**10 + i, self.size, KINDS[i % len(KINDS)])
                for i in range(n)]

    def batch(self, samples, preprocess):
        """Tensors for a list of (image, question, answer, kind): ids, labels, attention mask, pixels."""
        ex = [sft_example(self.tok, q, a, self.G, self.n_img) for _, q, a, _ in samples]
        ids, labels, attn = collate(ex, self.tok.pad_id)
        pixels = torch.stack([preprocess(img) for img, *_ in samples])
        return ids, labels, attn, pixels

    def train_batch(self, step: int, batch_size: int, preprocess):
        """Batch number `step` of the stream: samples [step*B, (step+1)*B). Depends on step only."""
        return self.batch([self.sample(step * batch_size + i) for i in range(batch_size)], preprocess)


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


def score(kind: str, pred: str, truth: str):
    """(exact match, objects right, objects total). For 'describe' objects are compared position by
    position in the left-to-right list; for other kinds the object counts are 0."""
    exact = pred.strip() == truth.strip()
    if kind != "describe":
        return exact, 0, 0
    t = [s.strip() for s in truth.split(",")]
    p = [s.strip() for s in pred.split(",")]
    return exact, sum(a == b for a, b in zip(t, p)), len(t)
