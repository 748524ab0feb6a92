"""Tests for synthetic.py: the synthetic scenes are deterministic, varied, and every answer agrees with
the picture as read back from its pixels; the stream and held-out split are fixed. CPU only.

    python -m pytest -q tests/test_synthetic.py
"""

import re
from collections import Counter

import numpy as np
import pytest
import torch

import synthetic
import vision
from data import IGNORE_INDEX

TOK = synthetic.toy_tokenizer()
SIZE = 64

def parse_scene(img):
    """Objects read back from the pixels alone: connected regions of one palette colour inside their black
    outlines, with their colour, shape (from how much of the bounding box they fill) and bounding-box
    centre, listed in reading order (by board row, then left to right)."""
    a = np.asarray(img).astype(int)
    inv = {v: k for k, v in synthetic.COLORS.items()}
    fg = (a != synthetic.BACKGROUND).any(-1) & (a != synthetic.OUTLINE).any(-1)
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
    cell = a.shape[0] / synthetic.GRID
    return sorted(objs, key=lambda o: (o["y"] // cell, o["x"]))


def find(objs, **kw):
    hits = [o for o in objs if all(o[k] == v for k, v in kw.items())]
    assert len(hits) == 1, (kw, objs)  # the question names exactly one object
    return hits[0]


def check_answer(img, q, a, kind):
    """Assert that answer `a` to question `q` is true of the picture."""
    objs = parse_scene(img)
    if kind == "count":
        assert q == "How many objects are there?" and a == synthetic.NUMBERS[len(objs)]
    elif kind == "describe":
        assert a == ", ".join(f"{o['color']} {o['shape']}" for o in objs)  # reading order
    elif kind == "color":
        shape = re.fullmatch(r"What color is the (\w+)\?", q).group(1)
        assert a in synthetic.COLORS and find(objs, shape=shape)["color"] == a
    elif kind == "shape":
        color = re.fullmatch(r"What shape is the (\w+) object\?", q).group(1)
        assert a in synthetic.SHAPES and find(objs, color=color)["shape"] == a
    elif kind == "relation":
        word, c1, s1, c2, s2 = re.fullmatch(r"Which is (further left|further right|higher|lower), the (\w+) "
                                            r"(\w+) or the (\w+) (\w+)\?", q).groups()
        A, B = find(objs, color=c1, shape=s1), find(objs, color=c2, shape=s2)
        dx, dy = A["x"] - B["x"], A["y"] - B["y"]
        # the two share a row (asked left/right) or a column (asked higher/lower): one offset is ~0
        assert (abs(dy) < 4 and word.startswith("further")) or (abs(dx) < 4 and word in ("higher", "lower"))
        d = dx if word.startswith("further") else dy
        A_wins = d < 0 if word in ("further left", "higher") else d > 0
        assert a == (f"the {c1} {s1}" if A_wins else f"the {c2} {s2}")
    return objs


def test_make_sample_is_deterministic():
    """The same seed gives the same image bytes, question, answer and kind; other seeds give other samples."""
    s = [synthetic.make_sample(123, SIZE), synthetic.make_sample(123, SIZE)]
    assert s[0][0].tobytes() == s[1][0].tobytes() and s[0][1:] == s[1][1:]
    others = {synthetic.make_sample(i, SIZE)[0].tobytes() for i in range(10)}
    assert len(others) == 10
    img = s[0][0]
    assert img.mode == "RGB" and img.size == (SIZE, SIZE)


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_answers_agree_with_the_picture(kind):
    """Answers read off the drawn pixels (count, colours, shapes, reading order, relations) match."""
    for seed in range(40):
        img, q, a, k = synthetic.make_sample(seed, SIZE, kind)
        assert k == kind
        check_answer(img, q, a, kind)


def test_scene_variety():
    """Over a few hundred scenes all object counts 1-4, all 3 shapes and all 6 colours occur (read from pixels)."""
    counts, shapes, colors = Counter(), Counter(), Counter()
    for seed in range(200):
        objs = parse_scene(synthetic.make_sample(seed, SIZE, "count")[0])
        counts[len(objs)] += 1
        shapes.update(o["shape"] for o in objs)
        colors.update(o["color"] for o in objs)
    assert set(counts) == {1, 2, 3, 4}
    assert set(shapes) == set(synthetic.SHAPES) and set(colors) == set(synthetic.COLORS)
    assert all(colors[c] > 20 for c in synthetic.COLORS) and all(shapes[s] > 40 for s in synthetic.SHAPES)


def preprocess(img):
    return vision.preprocess(img, 16)


def test_training_stream_and_heldout_split():
    """All 5 kinds occur in the training stream; heldout(n) cycles the kinds in equal shares, is fixed, and
    shares no image with the training stream."""
    ds = synthetic.SyntheticVQA(TOK, SIZE, n_image_tokens=4, gen_length=12)
    train = [ds.sample(i) for i in range(150)]
    assert set(k for *_, k in train) == set(synthetic.KINDS)
    held = ds.heldout(10)
    assert [k for *_, k in held] == synthetic.KINDS * 2
    assert [(im.tobytes(), q, a) for im, q, a, _ in held] == [(im.tobytes(), q, a) for im, q, a, _ in
                                                             synthetic.SyntheticVQA(TOK, SIZE, 4, 12).heldout(10)]
    assert not {im.tobytes() for im, *_ in held} & {im.tobytes() for im, *_ in train}
    other = synthetic.SyntheticVQA(TOK, SIZE, 4, 12, seed=1)
    assert other.sample(0)[0].tobytes() != ds.sample(0)[0].tobytes()


def test_train_batch_depends_on_step_only():
    """train_batch(step) is identical on repeat calls (exact resume), equals batching samples
    [step*B, (step+1)*B), and differs between steps."""
    ds = synthetic.SyntheticVQA(TOK, 32, n_image_tokens=4, gen_length=12)
    b1, b1_again, b2 = ds.train_batch(1, 3, preprocess), ds.train_batch(1, 3, preprocess), ds.train_batch(2, 3, preprocess)
    assert all(torch.equal(x, y) for x, y in zip(b1, b1_again))
    assert all(torch.equal(x, y) for x, y in zip(b1, ds.batch([ds.sample(i) for i in (3, 4, 5)], preprocess)))
    assert not torch.equal(b1[3], b2[3])
    ids, labels, attn, pixels = b1
    assert pixels.shape == (3, 3, 16, 16) and ids.shape == labels.shape == attn.shape
    assert ((labels != IGNORE_INDEX).sum(1) == 12).all()  # each row: a full answer canvas of gen_length


def test_score():
    """score gives exact match, and for 'describe' the number of objects right, position by position."""
    assert synthetic.score("describe", "red circle, green square", "red circle, blue square") == (False, 1, 2)
    assert synthetic.score("describe", " red circle, blue square ", "red circle, blue square") == (True, 2, 2)
    assert synthetic.score("describe", "blue square", "red circle, blue square") == (False, 0, 2)
    assert synthetic.score("count", "two", "two") == (True, 0, 0)
    assert synthetic.score("color", "red", "blue") == (False, 0, 0)


def test_objects_are_outlined_in_black():
    """Every object is ringed by OUTLINE pixels: the fill colour never touches the background directly."""
    for seed in range(20):
        a = np.asarray(synthetic.make_sample(seed, SIZE, "describe")[0]).astype(int)
        fill = (a != synthetic.BACKGROUND).any(-1) & (a != synthetic.OUTLINE).any(-1)
        bg = (a == synthetic.BACKGROUND).all(-1)
        vertical = (fill[1:] & bg[:-1]) | (fill[:-1] & bg[1:])          # (63, 64): neighbours one row apart
        horizontal = (fill[:, 1:] & bg[:, :-1]) | (fill[:, :-1] & bg[:, 1:])  # (64, 63): one column apart
        assert (a == synthetic.OUTLINE).all(-1).any() and not vertical.any() and not horizontal.any()


def test_single_object_curriculum():
    """Steps before single_object_steps draw one object and only colour / shape / describe questions; from
    then on the full mix (all kinds, up to 4 objects); the held-out split is never affected."""
    ds = synthetic.SyntheticVQA(TOK, SIZE, n_image_tokens=4, gen_length=12, single_object_steps=3)
    early = [ds.sample(i, single=True) for i in range(60)]
    assert {k for *_, k in early} == set(synthetic.SINGLE_KINDS)
    assert all(len(parse_scene(img)) == 1 for img, *_ in early)
    for img, q, a, k in early:
        check_answer(img, q, a, k)
    late = [ds.sample(i) for i in range(60)]
    assert {k for *_, k in late} == set(synthetic.KINDS) and max(len(parse_scene(img)) for img, *_ in late) == 4
    pre = lambda im: vision.preprocess(im, 16)
    assert all(torch.equal(x, y) for x, y in zip(ds.train_batch(2, 4, pre), ds.batch(early[8:12], pre)))
    assert all(torch.equal(x, y) for x, y in zip(ds.train_batch(3, 4, pre), ds.batch(late[12:16], pre)))
    plain = synthetic.SyntheticVQA(TOK, SIZE, n_image_tokens=4, gen_length=12)
    assert [q for _, q, _, _ in ds.heldout(10)] == [q for _, q, _, _ in plain.heldout(10)]


def test_kind_weights_from_a_step_on():
    """From kind_weights_from on, train_batch draws the kinds with kind_weights (unnamed kinds never, the
    named ones in proportion); before it, every kind in equal shares; the held-out split never changes."""
    ds = synthetic.SyntheticVQA(TOK, SIZE, n_image_tokens=4, gen_length=12, kind_weights="count:1,relation:3",
                                kind_weights_from=5)
    w = synthetic.parse_kind_weights("count:1,relation:3")
    assert w == [0.0, 0.0, 1.0, 3.0, 0.0]
    late = Counter(k for *_, k in (ds.sample(i, weights=w) for i in range(400)))
    assert set(late) == {"count", "relation"} and 0.65 < late["relation"] / 400 < 0.85
    for img, q, a, k in (ds.sample(i, weights=w) for i in range(20)):
        check_answer(img, q, a, k)
    early = Counter(k for *_, k in (ds.sample(i) for i in range(400)))
    assert set(early) == set(synthetic.KINDS) and max(early.values()) < 2 * min(early.values())
    pre = lambda im: vision.preprocess(im, 16)
    assert all(torch.equal(x, y) for x, y in zip(ds.train_batch(4, 4, pre), ds.batch([ds.sample(16 + i) for i in range(4)], pre)))
    assert all(torch.equal(x, y) for x, y in zip(ds.train_batch(5, 4, pre),
                                                 ds.batch([ds.sample(20 + i, weights=w) for i in range(4)], pre)))
    plain = synthetic.SyntheticVQA(TOK, SIZE, n_image_tokens=4, gen_length=12)
    assert [q for _, q, _, _ in ds.heldout(10)] == [q for _, q, _, _ in plain.heldout(10)]


def test_one_object_share_of_binding_questions():
    """With one_object_share set, the training stream asks its colour and shape questions about one object
    at about that rate and otherwise about 2-4 (read back from the pixels); the other kinds keep 1-4
    uniformly, the one-object phase keeps one object, and the held-out split draws 1-4 as before."""
    share = 0.05
    ds = synthetic.SyntheticVQA(TOK, SIZE, n_image_tokens=4, gen_length=12, one_object_share=share)
    plain = synthetic.SyntheticVQA(TOK, SIZE, n_image_tokens=4, gen_length=12)
    n_objects = lambda samples, kinds: Counter(len(parse_scene(img)) for img, _, _, k in samples if k in kinds)
    binding = n_objects([ds.sample(i) for i in range(1500)], synthetic.BINDING_KINDS)
    total = sum(binding.values())
    assert set(binding) == {1, 2, 3, 4} and abs(binding[1] / total - share) < 0.03, binding
    assert min(binding[n] for n in (2, 3, 4)) > 0.2 * total  # 2-4 objects, roughly evenly
    before = n_objects([plain.sample(i) for i in range(1500)], synthetic.BINDING_KINDS)
    assert before[1] / sum(before.values()) > share + 0.15  # the uniform draw: many more lone objects
    others = n_objects([ds.sample(i) for i in range(600)], ("count", "describe"))
    assert all(others[n] > 0.15 * sum(others.values()) for n in (1, 2, 3, 4)), others
    assert all(len(parse_scene(img)) == 1 for img, *_ in (ds.sample(i, single=True) for i in range(40)))
    for img, q, a, k in (ds.sample(i) for i in range(40)):
        check_answer(img, q, a, k)
    held, held_plain = ds.heldout(200), plain.heldout(200)
    assert [(im.tobytes(), q, a) for im, q, a, _ in held] == [(im.tobytes(), q, a) for im, q, a, _ in held_plain]
    assert n_objects(held, synthetic.BINDING_KINDS)[1] > 0.2 * 80  # one-object colour / shape questions stay


@pytest.mark.parametrize("spec, message", [
    ("colour:1", "bad kind weight 'colour:1'.*kinds from color, shape"),
    ("relation=2", "bad kind weight 'relation=2'"),
    ("relation:lots", "bad kind weight 'relation:lots'"),
    ("relation:-1", "is negative"),
    ("color:0,shape:0", "all zero"),
])
def test_bad_kind_weights_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        synthetic.parse_kind_weights(spec)
