"""Tests for tokenizer.py: the toy byte-level BPE built as a tiktoken Encoding, LLaDA's special tokens
(ML-GSAI/LLaDA-V train/llada_v_prepare/files/tokenizer_config.json), and the BPE trainer agreeing with tiktoken's
segmentation. CPU only, no downloads.

    python -m pytest -q tests/test_tokenizer.py
"""

import json
import re

import pytest
import regex
import tiktoken

import data
import synthetic
import tokenizer
from tokenizer import IMAGE_TOKEN_INDEX, SPECIAL_TOKENS

TOK = synthetic.toy_tokenizer()
WORDS = list(synthetic.COLORS) + synthetic.SHAPES + synthetic.NUMBERS
SIZE = 64

def test_special_tokens():
    """All 6 LLaDA specials are single, distinct ids after the BPE tokens, in LLaDA's order; pad == eos."""
    ids = [TOK.encode(s) for s in SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    ids = [i[0] for i in ids]
    n_bpe = len(TOK.ranks)
    assert ids == list(range(n_bpe, n_bpe + 6))  # appended after the BPE vocabulary, in order
    assert (TOK.bos_id, TOK.eos_id, TOK.mask_id, TOK.start_header_id, TOK.end_header_id, TOK.eot_id) == tuple(ids)
    assert TOK.pad_id == TOK.eos_id
    assert TOK.vocab_size == n_bpe + 6 <= 512  # fits the toy preset's lm.vocab_size
    with pytest.raises(ValueError, match="special"):
        tokenizer.Tokenizer({bytes([i]): i for i in range(256)}, {})


@pytest.mark.parametrize("text", ["hello world", "héllo wörld 🦙 日本語 — \t tabs\r\n", "x" * 300 + " 123,456!",
                                  "What color is the circle?", ""])
def test_roundtrip(text):
    """decode(encode(text)) == text for any unicode text (byte-level BPE), and decode skips -200."""
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    assert TOK.decode([IMAGE_TOKEN_INDEX] + ids) == text


def test_dataset_words_are_single_tokens():
    """Every colour/shape/number is one token at string start (where answers sit); colours and
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
        for text in (q, a, data.chat_template(data.llada_v_messages(q, None))):
            n_pre = sum(len(regex.findall(tokenizer.PAT_STR, t)) for t in re.split(split, text))
            n_special = sum(text.count(s) for s in SPECIAL_TOKENS)
            assert len(TOK.encode_with_image(text, 0)) == n_pre + n_special, text


def test_get_tokenizer():
    """The toy tokenizer is cached; a name that is no tokenizer.json is refused with a ValueError."""
    assert synthetic.toy_tokenizer() is TOK
    with pytest.raises(ValueError, match="tokenizer.json"):
        tokenizer.get_tokenizer("gpt2")
    # the toy tokenizer travels as plain data (checkpoints store it) and comes back identical
    back = tokenizer.Tokenizer.from_dict(TOK.to_dict())
    assert back.ranks == TOK.ranks and back.special == TOK.special and back.encode("the red circle") == TOK.encode("the red circle")


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


# ----------------------------------------------------------------------------------------------
# tokenizer.json (Hugging Face byte-level BPE) -> tiktoken, checked against the `tokenizers` package

MIXED_CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2025; they'll say we've done it!",
    "def forward(self, x):\n    return self.proj(x) + 1  # residual\n\n\tif a != b:\n\t\tpass\n",
    "扩散模型通过逐步去噪生成文本。大型语言模型。日本語のテキストも少し。",
    "Emoji: 👩‍💻 🦙🦙 🎉 ❤️ — and accents: café naïve Ελληνικά русский",
    "numbers 1234567890 3.14159 2,718,281 0x1F 1e-5 and 000000",
    "spaces    between     words\r\n\r\n   trailing   \n\n\n",
    "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
] * 3
MIXED_TESTS = MIXED_CORPUS[:7] + [
    "An unseen sentence with Zürich, 東京, 🚀🚀 and 98765 digits.\n\n    indented code()",
    "<|mdm_mask|><|mdm_mask|> masks <|endoftext|>",
    "cafe\u0301 (decomposed é) and Å",       # NFC changes these: the converter must normalise too
    "", " ", "\n", "\t\t  \n x", "a" * 50 + "1" * 30,
]
EXTRA_SPECIALS = ["[CLS]", "[gMASK]", "<role>", "</role>"]


def build_tokenizer_json(path, split_regex: bool):
    """Train a small byte-level BPE with the `tokenizers` package and save it as tokenizer.json."""
    tk = pytest.importorskip("tokenizers", reason="test needs the `tokenizers` package: pip install tokenizers")
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    t = tk.Tokenizer(models.BPE())
    t.normalizer = normalizers.NFC()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not split_regex)
    t.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(tokenizer.PAT_STR), "isolated"), byte_level])
                       if split_regex else byte_level)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    t.train_from_iterator([c.replace("<|", "< |") for c in MIXED_CORPUS], trainer)  # specials are not BPE material
    t.add_special_tokens(SPECIAL_TOKENS[:2] + EXTRA_SPECIALS + SPECIAL_TOKENS[2:])
    t.save(str(path))
    return t


@pytest.mark.parametrize("split_regex", [True, False], ids=["split-regex", "gpt2-bytelevel"])
def test_tokenizer_json_matches_hf_tokenizers(tmp_path, split_regex):
    """The converted tiktoken Encoding gives exactly the ids of the `tokenizers` reference implementation
    on English, code, CJK, emoji, digit runs, whitespace runs and special tokens, and decodes back."""
    ref = build_tokenizer_json(tmp_path / "tokenizer.json", split_regex)
    tok = tokenizer.get_tokenizer(str(tmp_path))  # a directory holding tokenizer.json
    assert tok.nfc and len(tok.ranks) == ref.get_vocab_size() - 10
    assert tok.encode("<|mdm_mask|>") == [ref.token_to_id("<|mdm_mask|>")] and tok.mask_id == ref.token_to_id("<|mdm_mask|>")
    for text in MIXED_TESTS:
        want = ref.encode(text).ids
        assert tok.encode(text) == want, text
        assert tok.decode(want) == ref.decode(want, skip_special_tokens=False)
    # NFC matters: without it the decomposed text encodes differently
    raw = tokenizer.Tokenizer(tok.ranks, tok.special, tok.pat_str, nfc=False)
    assert raw.encode(MIXED_TESTS[9]) != ref.encode(MIXED_TESTS[9]).ids


def test_tokenizer_json_rank_order_violation_fails(tmp_path):
    build_tokenizer_json(tmp_path / "tokenizer.json", True)
    j = json.load(open(tmp_path / "tokenizer.json", encoding="utf-8"))
    vocab, merges = j["model"]["vocab"], j["model"]["merges"]
    first, second = ("".join(m.split(" ")) if isinstance(m, str) else "".join(m) for m in merges[:2])
    vocab[first], vocab[second] = vocab[second], vocab[first]  # ids no longer follow the merge order
    json.dump(j, open(tmp_path / "bad.json", "w", encoding="utf-8"))
    with pytest.raises(ValueError, match="merge 1 .*out of the order"):
        tokenizer.get_tokenizer(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="tokenizer.json"):
        tokenizer.get_tokenizer(str(tmp_path / "missing"))


def test_config_mask_id_rule():
    """A model config's default mask id (LLaDA's) leaves the tokenizer's own [MASK]; any other overrides it."""
    from model import LLaDAConfig
    assert LLaDAConfig().mask_id == tokenizer.LLADA_MASK_ID  # the rule's default is the config's default
    assert tokenizer.config_mask_id(LLaDAConfig().mask_id) is None
    assert tokenizer.config_mask_id(5) == 5
