"""Tests for data.py: the toy BPE tokenizer, LLaDA-V's chat template (REFERENCE 1.2, 3.1, 3.3), SFT
sequences, batching and the synthetic visual questions. CPU only, no downloads."""
import sys, os; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import re
from collections import Counter

import numpy as np
import pytest
import regex
import tiktoken
import torch

import data
import vision
from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX, SPECIAL_TOKENS

TOK = data.toy_tokenizer()
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
# Written out here, not imported, so that the test checks data.py against REFERENCE 3.3.
LLADA_V_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                  "that the user provides, and assist the user with a variety of tasks using natural language.")
WORDS = list(data.COLORS) + data.SHAPES + data.NUMBERS + ["left", "right", "above", "below"]
SIZE = 64


# ------------------------------------------------------------------------------------------------
# Tokenizer

def test_special_tokens():
    """All 6 LLaDA specials are single, distinct ids after the BPE tokens, in LLaDA's order; pad == eos."""
    ids = [TOK.encode(s) for s in SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    ids = [i[0] for i in ids]
    n_bpe = len(TOK.enc._mergeable_ranks)
    assert ids == list(range(n_bpe, n_bpe + 6))  # appended after the BPE vocabulary, in order
    assert (TOK.bos_id, TOK.eos_id, TOK.mask_id, TOK.start_header_id, TOK.end_header_id, TOK.eot_id) == tuple(ids)
    assert TOK.pad_id == TOK.eos_id
    assert TOK.vocab_size == n_bpe + 6 <= 512  # fits the toy preset's lm.vocab_size
    with pytest.raises(ValueError, match="special"):
        data.Tokenizer(tiktoken.Encoding("bare", pat_str=data.PAT_STR, mergeable_ranks={bytes([i]): i for i in range(256)},
                                         special_tokens={}))


@pytest.mark.parametrize("text", ["hello world", "héllo wörld 🦙 日本語 — \t tabs\r\n", "x" * 300 + " 123,456!",
                                  "What color is the circle?", ""])
def test_roundtrip(text):
    """decode(encode(text)) == text for any unicode text (byte-level BPE), and decode skips -200."""
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    assert TOK.decode([IMAGE_TOKEN_INDEX] + ids) == text


def test_dataset_words_are_single_tokens():
    """Every colour/shape/number/relation is one token at string start (where answers sit); colours and
    shapes, which the questions use after a space, are one token after a space too."""
    for w in WORDS:
        assert len(TOK.encode(w)) == 1, w
    for w in list(data.COLORS) + data.SHAPES:
        assert len(TOK.encode(" " + w)) == 1, w


def test_dataset_text_is_one_token_per_pretoken():
    """The toy vocabulary fully compresses the dataset's own text: each pre-token of every question and
    answer the dataset produces, and of the templated prompt around them, is exactly one token."""
    split = "|".join(map(re.escape, SPECIAL_TOKENS + ["<image>"]))
    for i in range(60):
        _, q, a, _ = data.make_sample(i, SIZE)
        for text in (q, a, data.chat_prompt(q, system=None)):
            n_pre = sum(len(regex.findall(data.PAT_STR, t)) for t in re.split(split, text))
            n_special = sum(text.count(s) for s in SPECIAL_TOKENS)
            assert len(TOK.encode_with_image(text, 0)) == n_pre + n_special, text


def test_get_tokenizer():
    """'toy' gives the cached toy tokenizer; anything else is refused with a ValueError."""
    assert data.get_tokenizer("toy") is TOK
    with pytest.raises(ValueError, match="toy"):
        data.get_tokenizer("gpt2")


def _trainer_segmentation(ranks, text):
    """Segment `text` as the BPE trainer does: Python pre-tokens, then the merges in the order learnt."""
    merges = sorted((r, t) for t, r in ranks.items() if r >= 256)
    out = []
    for word in regex.findall(data.PAT_STR, text):
        parts = [bytes([b]) for b in word.encode()]
        for _, tok in merges:
            i, new = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] + parts[i + 1] == tok:
                    new.append(tok)
                    i += 2
                else:
                    new.append(parts[i])
                    i += 1
            parts = new
        out += [ranks[p] for p in parts]
    return out


CORPUS = ["the cat sat on the mat", "the rat ate the cat's hat", "that hat is not a mat, it is a hat!",
          "a bat, a cat and 42 rats."] * 3


def test_train_bpe_basics():
    """Ranks start with the 256 single bytes at 0..255, merges follow contiguously, training is
    deterministic and independent of corpus order, and max_merges caps the vocabulary."""
    r = data.train_bpe(CORPUS)
    assert all(r[bytes([i])] == i for i in range(256))
    assert sorted(r.values()) == list(range(len(r))) and len(r) > 256
    assert data.train_bpe(CORPUS) == r
    assert data.train_bpe(CORPUS[::-1]) == r
    assert len(data.train_bpe(CORPUS, max_merges=5)) == 261
    # training stops once every pre-token is a single token
    assert all(w.encode() in r for t in CORPUS for w in regex.findall(data.PAT_STR, t))


def test_train_bpe_merge_order_and_ties():
    """On ["aaab"]*5 the most frequent pair "aa" merges first; then "aa"+"a" and "a"+"b" tie (5 each)
    and the smaller byte string "aaa" wins; then "aaab"."""
    r = data.train_bpe(["aaab"] * 5)
    assert {t: v for t, v in r.items() if v >= 256} == {b"aa": 256, b"aaa": 257, b"aaab": 258}


@pytest.mark.parametrize("max_merges", [10, 30, 10_000])
def test_tiktoken_reproduces_trainer_segmentation(max_merges):
    """tiktoken (always merge the lowest-rank pair) segments text exactly as the trainer's ordered merges do,
    for partially and fully trained vocabularies."""
    r = data.train_bpe(CORPUS, max_merges=max_merges)
    enc = tiktoken.Encoding(f"t{max_merges}", pat_str=data.PAT_STR, mergeable_ranks=r, special_tokens={})
    for text in CORPUS + ["a cathat that sat", "mat rat bat 7 hats"]:
        assert enc.encode(text) == _trainer_segmentation(r, text), text


def test_bpe_is_learnt_on_tiktoken_pretokens():
    """The trainer cuts special-token strings out and pre-tokenizes with PAT_STR (as tiktoken does), so no
    merge is wasted on text tiktoken never runs BPE over: no learnt token contains '<|' or 'header'."""
    r = data.train_bpe(data._toy_corpus())
    assert not [t for t in r if b"<|" in t or b"header" in t]


# ------------------------------------------------------------------------------------------------
# Chat template and SFT sequences

def test_chat_prompt_matches_llada_v_template():
    """Default prompt == REFERENCE 3.3's string with LLaDA-V's system prompt."""
    want = ("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\n" + LLADA_V_SYSTEM + "<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is in the picture?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert data.chat_prompt("What is in the picture?") == want
    assert data.default_system("toy") is None and data.default_system("llada-v") == LLADA_V_SYSTEM


def test_chat_prompt_without_system():
    """No system: BOS once, user turn with trimmed content, ends with the assistant header; image=False
    leaves out "<image>\\n"."""
    p = data.chat_prompt("  How many?\n ", system=None)
    assert p == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n<image>\nHow many?<|eot_id|>"
                 + ASSISTANT_HEADER)
    assert data.chat_prompt(" Hi ", system=None, image=False) == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>" + ASSISTANT_HEADER)
    q = data.chat_prompt("Q", system="  Be brief.  ")
    assert q.count("<|startoftext|>") == 1 and q.startswith("<|startoftext|>") and "\n\nBe brief.<|eot_id|>" in q
    assert q.endswith(ASSISTANT_HEADER)


def test_encode_with_image():
    """"<image>" becomes exactly n contiguous -200 ids where it stood; text around it is encoded as usual."""
    pre, post = "<|startoftext|>user\n\n", "\nWhat color is the circle?"
    ids = TOK.encode_with_image(pre + "<image>" + post, 7)
    start = len(TOK.encode(pre))
    assert ids == TOK.encode(pre) + [IMAGE_TOKEN_INDEX] * 7 + TOK.encode(post)
    assert ids[start:start + 7] == [IMAGE_TOKEN_INDEX] * 7 and ids.count(IMAGE_TOKEN_INDEX) == 7
    assert TOK.encode_with_image("a<image>b<image>", 3).count(IMAGE_TOKEN_INDEX) == 6
    assert IMAGE_TOKEN_INDEX not in TOK.encode_with_image("no image here", 7)


def test_sft_example_layout():
    """ids = prompt ++ answer ++ eot ++ EOS*; labels -100 exactly on the prompt (image included) and equal
    to ids on the gen_length answer canvas."""
    G, n_img = 10, 5
    ids, labels = data.sft_example(TOK, "What color is the circle?", "red", G, n_img)
    P = len(ids) - G
    assert len(labels) == len(ids)
    assert labels[:P] == [IGNORE_INDEX] * P and IGNORE_INDEX not in labels[P:]
    assert labels[P:] == ids[P:]
    ans = TOK.encode("red")
    assert ids[P:] == ans + [TOK.eot_id] + [TOK.eos_id] * (G - len(ans) - 1)
    assert ids[:P] == TOK.encode_with_image(data.chat_prompt("What color is the circle?", None), n_img)
    assert ids[:P].count(IMAGE_TOKEN_INDEX) == n_img
    assert ids[P - 4:P] == TOK.encode(ASSISTANT_HEADER)
    # a system turn lands in the (ignored) prompt only
    ids_s, labels_s = data.sft_example(TOK, "Q?", "red", G, n_img, system=LLADA_V_SYSTEM)
    assert ids_s[-G:] == ids[-G:] and labels_s.count(IGNORE_INDEX) == len(ids_s) - G


def test_sft_example_answer_must_fit():
    """An answer plus eot that exactly fills the canvas is fine (no EOS); one token more is a ValueError
    naming gen_length."""
    answer = "red circle, blue square, green triangle"
    n = len(TOK.encode(answer)) + 1
    ids, _ = data.sft_example(TOK, "Describe the image.", answer, n, 2)
    assert ids[-1] == TOK.eot_id and TOK.eos_id not in ids[-n:]
    with pytest.raises(ValueError, match="gen_length"):
        data.sft_example(TOK, "Describe the image.", answer, n - 1, 2)


def test_collate_right_pads():
    """collate right-pads with pad_id; padding has attention 0 and label -100; content is untouched."""
    ex = [([5, 6, 7], [-100, 6, 7]), ([1, 2, 3, 4, 9], [-100, -100, 3, 4, 9])]
    ids, labels, attn = data.collate(ex, pad_id=TOK.pad_id)
    assert ids.shape == labels.shape == attn.shape == (2, 5) and attn.dtype == torch.bool
    assert ids[0].tolist() == [5, 6, 7, TOK.pad_id, TOK.pad_id] and ids[1].tolist() == [1, 2, 3, 4, 9]
    assert labels[0].tolist() == [-100, 6, 7, -100, -100] and labels[1].tolist() == [-100, -100, 3, 4, 9]
    assert attn.tolist() == [[True] * 3 + [False] * 2, [True] * 5]


def test_prompt_batch_left_pads():
    """prompt_batch left-pads: every row ends with the assistant header, pads sit left with attention 0,
    and each unpadded row is the prompt's own encoding."""
    qs = ["Describe the image.", "Where is the red circle relative to the blue square?"]
    ids, attn = data.prompt_batch(TOK, qs, 4)
    head = TOK.encode(ASSISTANT_HEADER)
    for i, q in enumerate(qs):
        p = TOK.encode_with_image(data.chat_prompt(q, None), 4)
        n_pad = ids.shape[1] - len(p)
        assert ids[i, n_pad:].tolist() == p and ids[i, -len(head):].tolist() == head
        assert (ids[i, :n_pad] == TOK.pad_id).all()
        assert attn[i].tolist() == [False] * n_pad + [True] * len(p)
    assert not attn[0, 0] and attn[1].all()  # the shorter prompt is padded


def test_answer_text_stops_at_eot_or_eos():
    """answer_text decodes up to the first <|eot_id|> or EOS and strips spaces."""
    ids = TOK.encode(" red circle") + [TOK.eot_id] + TOK.encode("junk") + [TOK.eos_id]
    assert data.answer_text(TOK, ids) == "red circle"
    assert data.answer_text(TOK, TOK.encode("two") + [TOK.eos_id, TOK.eot_id] + TOK.encode("x")) == "two"


# ------------------------------------------------------------------------------------------------
# Synthetic visual questions

def parse_scene(img):
    """Objects read back from the pixels alone: connected regions of one palette colour, with their colour,
    shape (from how much of the bounding box they fill) and bounding-box centre."""
    a = np.asarray(img).astype(int)
    inv = {v: k for k, v in data.COLORS.items()}
    fg = (a != data.BACKGROUND).any(-1)
    seen = np.zeros_like(fg)
    objs = []
    for y0, x0 in zip(*np.nonzero(fg)):
        if seen[y0, x0]:
            continue
        rgb = tuple(a[y0, x0])
        stack, pix = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for v, u in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= v < a.shape[0] and 0 <= u < a.shape[1] and fg[v, u] and not seen[v, u] and tuple(a[v, u]) == rgb:
                    seen[v, u] = True
                    stack.append((v, u))
        ys, xs = np.array(pix).T
        fill = len(pix) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        shape = "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"
        objs.append(dict(color=inv[rgb], shape=shape, x=(xs.min() + xs.max()) / 2, y=(ys.min() + ys.max()) / 2))
    return sorted(objs, key=lambda o: o["x"])


def find(objs, **kw):
    hits = [o for o in objs if all(o[k] == v for k, v in kw.items())]
    assert len(hits) == 1, (kw, objs)  # the question names exactly one object
    return hits[0]


def check_answer(img, q, a, kind):
    """Assert that answer `a` to question `q` is true of the picture."""
    objs = parse_scene(img)
    if kind == "count":
        assert q == "How many objects are there?" and a == data.NUMBERS[len(objs)]
    elif kind == "describe":
        assert a == ", ".join(f"{o['color']} {o['shape']}" for o in objs)  # left to right
    elif kind == "color":
        shape = re.fullmatch(r"What color is the (\w+)\?", q).group(1)
        assert a in data.COLORS and find(objs, shape=shape)["color"] == a
    elif kind == "shape":
        color = re.fullmatch(r"What shape is the (\w+) object\?", q).group(1)
        assert a in data.SHAPES and find(objs, color=color)["shape"] == a
    elif kind == "relation":
        c1, s1, c2, s2 = re.fullmatch(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?", q).groups()
        A, B = find(objs, color=c1, shape=s1), find(objs, color=c2, shape=s2)
        dx, dy = A["x"] - B["x"], A["y"] - B["y"]
        assert a == (("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below"))
    return objs


def test_make_sample_is_deterministic():
    """The same seed gives the same image bytes, question, answer and kind; other seeds give other samples."""
    s = [data.make_sample(123, SIZE), data.make_sample(123, SIZE)]
    assert s[0][0].tobytes() == s[1][0].tobytes() and s[0][1:] == s[1][1:]
    others = {data.make_sample(i, SIZE)[0].tobytes() for i in range(10)}
    assert len(others) == 10
    img = s[0][0]
    assert img.mode == "RGB" and img.size == (SIZE, SIZE)


@pytest.mark.parametrize("kind", data.KINDS)
def test_answers_agree_with_the_picture(kind):
    """Answers read off the drawn pixels (count, colours, shapes, left-to-right order, relations) match."""
    for seed in range(40):
        img, q, a, k = data.make_sample(seed, SIZE, kind)
        assert k == kind
        check_answer(img, q, a, kind)


def test_scene_variety():
    """Over a few hundred scenes all object counts 1-4, all 3 shapes and all 6 colours occur (read from pixels)."""
    counts, shapes, colors = Counter(), Counter(), Counter()
    for seed in range(200):
        objs = parse_scene(data.make_sample(seed, SIZE, "count")[0])
        counts[len(objs)] += 1
        shapes.update(o["shape"] for o in objs)
        colors.update(o["color"] for o in objs)
    assert set(counts) == {1, 2, 3, 4}
    assert set(shapes) == set(data.SHAPES) and set(colors) == set(data.COLORS)
    assert all(colors[c] > 20 for c in data.COLORS) and all(shapes[s] > 40 for s in data.SHAPES)


def preprocess(img):
    return vision.preprocess(img, 16)


def test_training_stream_and_heldout_split():
    """All 5 kinds occur in the training stream; heldout(n) cycles the kinds in equal shares, is fixed, and
    shares no image with the training stream."""
    ds = data.SyntheticVQA(TOK, SIZE, n_image_tokens=4, gen_length=12)
    train = [ds.sample(i) for i in range(150)]
    assert set(k for *_, k in train) == set(data.KINDS)
    held = ds.heldout(10)
    assert [k for *_, k in held] == data.KINDS * 2
    assert [(im.tobytes(), q, a) for im, q, a, _ in held] == [(im.tobytes(), q, a) for im, q, a, _ in
                                                             data.SyntheticVQA(TOK, SIZE, 4, 12).heldout(10)]
    assert not {im.tobytes() for im, *_ in held} & {im.tobytes() for im, *_ in train}
    other = data.SyntheticVQA(TOK, SIZE, 4, 12, seed=1)
    assert other.sample(0)[0].tobytes() != ds.sample(0)[0].tobytes()


def test_train_batch_depends_on_step_only():
    """train_batch(step) is identical on repeat calls (exact resume), equals batching samples
    [step*B, (step+1)*B), and differs between steps."""
    ds = data.SyntheticVQA(TOK, 32, n_image_tokens=4, gen_length=12)
    b1, b1_again, b2 = ds.train_batch(1, 3, preprocess), ds.train_batch(1, 3, preprocess), ds.train_batch(2, 3, preprocess)
    assert all(torch.equal(x, y) for x, y in zip(b1, b1_again))
    assert all(torch.equal(x, y) for x, y in zip(b1, ds.batch([ds.sample(i) for i in (3, 4, 5)], preprocess)))
    assert not torch.equal(b1[3], b2[3])
    ids, labels, attn, pixels = b1
    assert pixels.shape == (3, 3, 16, 16) and ids.shape == labels.shape == attn.shape
    assert ((labels != IGNORE_INDEX).sum(1) == 12).all()  # each row: a full answer canvas of gen_length


def test_score():
    """score gives exact match, and for 'describe' the number of objects right, position by position."""
    assert data.score("describe", "red circle, green square", "red circle, blue square") == (False, 1, 2)
    assert data.score("describe", " red circle, blue square ", "red circle, blue square") == (True, 2, 2)
    assert data.score("describe", "blue square", "red circle, blue square") == (False, 0, 2)
    assert data.score("count", "two", "two") == (True, 0, 0)
    assert data.score("color", "red", "blue") == (False, 0, 0)
