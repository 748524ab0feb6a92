"""Tests for tokenizer.py: the toy byte-level BPE built as a tiktoken Encoding, LLaDA's special tokens
(REFERENCE 1.2), and the BPE trainer agreeing with tiktoken's segmentation. CPU only, no downloads."""
import sys, os; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import re

import pytest
import regex
import tiktoken

import data
import synthetic
import tokenizer
from tokenizer import IMAGE_TOKEN_INDEX, SPECIAL_TOKENS

TOK = synthetic.toy_tokenizer()
WORDS = list(synthetic.COLORS) + synthetic.SHAPES + synthetic.NUMBERS + ["left", "right", "above", "below"]
SIZE = 64

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
        tokenizer.Tokenizer(tiktoken.Encoding("bare", pat_str=tokenizer.PAT_STR, mergeable_ranks={bytes([i]): i for i in range(256)},
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
    for w in list(synthetic.COLORS) + synthetic.SHAPES:
        assert len(TOK.encode(" " + w)) == 1, w


def test_dataset_text_is_one_token_per_pretoken():
    """The toy vocabulary fully compresses the dataset's own text: each pre-token of every question and
    answer the dataset produces, and of the templated prompt around them, is exactly one token."""
    split = "|".join(map(re.escape, SPECIAL_TOKENS + ["<image>"]))
    for i in range(60):
        _, q, a, _ = synthetic.make_sample(i, SIZE)
        for text in (q, a, data.chat_prompt(q, system=None)):
            n_pre = sum(len(regex.findall(tokenizer.PAT_STR, t)) for t in re.split(split, text))
            n_special = sum(text.count(s) for s in SPECIAL_TOKENS)
            assert len(TOK.encode_with_image(text, 0)) == n_pre + n_special, text


def test_get_tokenizer():
    """'toy' gives the cached toy tokenizer; anything else is refused with a ValueError."""
    assert tokenizer.get_tokenizer("toy") is TOK
    with pytest.raises(ValueError, match="toy"):
        tokenizer.get_tokenizer("gpt2")


def _trainer_segmentation(ranks, text):
    """Segment `text` as the BPE trainer does: Python pre-tokens, then the merges in the order learnt."""
    merges = sorted((r, t) for t, r in ranks.items() if r >= 256)
    out = []
    for word in regex.findall(tokenizer.PAT_STR, text):
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
    r = tokenizer.train_bpe(CORPUS)
    assert all(r[bytes([i])] == i for i in range(256))
    assert sorted(r.values()) == list(range(len(r))) and len(r) > 256
    assert tokenizer.train_bpe(CORPUS) == r
    assert tokenizer.train_bpe(CORPUS[::-1]) == r
    assert len(tokenizer.train_bpe(CORPUS, max_merges=5)) == 261
    # training stops once every pre-token is a single token
    assert all(w.encode() in r for t in CORPUS for w in regex.findall(tokenizer.PAT_STR, t))


def test_train_bpe_merge_order_and_ties():
    """On ["aaab"]*5 the most frequent pair "aa" merges first; then "aa"+"a" and "a"+"b" tie (5 each)
    and the smaller byte string "aaa" wins; then "aaab"."""
    r = tokenizer.train_bpe(["aaab"] * 5)
    assert {t: v for t, v in r.items() if v >= 256} == {b"aa": 256, b"aaa": 257, b"aaab": 258}


@pytest.mark.parametrize("max_merges", [10, 30, 10_000])
def test_tiktoken_reproduces_trainer_segmentation(max_merges):
    """tiktoken (always merge the lowest-rank pair) segments text exactly as the trainer's ordered merges do,
    for partially and fully trained vocabularies."""
    r = tokenizer.train_bpe(CORPUS, max_merges=max_merges)
    enc = tiktoken.Encoding(f"t{max_merges}", pat_str=tokenizer.PAT_STR, mergeable_ranks=r, special_tokens={})
    for text in CORPUS + ["a cathat that sat", "mat rat bat 7 hats"]:
        assert enc.encode(text) == _trainer_segmentation(r, text), text


def test_bpe_is_learnt_on_tiktoken_pretokens():
    """The trainer cuts special-token strings out and pre-tokenizes with PAT_STR (as tiktoken does), so no
    merge is wasted on text tiktoken never runs BPE over: no learnt token contains '<|' or 'header'."""
    r = tokenizer.train_bpe(synthetic._toy_corpus())
    assert not [t for t in r if b"<|" in t or b"header" in t]
