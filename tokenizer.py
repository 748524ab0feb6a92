"""
Tokenizer: a `tiktoken.Encoding` with LLaDA's special tokens, so the toy model and the real 8B model run
the very same template and sampling code.

Byte-level BPE: start from the 256 single bytes; repeatedly merge the most frequent adjacent pair; the
rank r of a merged token = the order in which it was learnt. tiktoken encodes a pre-token (a piece cut
out by the regex PAT_STR) by always merging the adjacent pair of lowest rank, which reproduces the
learnt segmentation. The toy vocabulary is learnt here in milliseconds from the synthetic dataset's own
sentences (synthetic.toy_tokenizer); no tables are downloaded.

Special tokens come after the BPE ranks, in LLaDA's order (ML-GSAI/LLaDA-V
train/llada_v_prepare/files/tokenizer_config.json): BOS, EOS (= PAD), mask, start/end header, end of turn. The official
tokenizer is a Hugging Face tokenizer.json (byte-level BPE over GPT-2's printable byte alphabet, NFC normaliser, 269
added tokens); encoding_from_tokenizer_json turns it into the same kind of tiktoken Encoding. IMAGE_TOKEN_INDEX (-200)
is not a token: it marks where the model splices in visual features (model.py).
"""
import json
import os
import re
import unicodedata
from collections import Counter

import regex
import tiktoken

IMAGE_TOKEN_INDEX = -200  # official LLaVA / LLaDA-V placeholder id for one visual token

# LLaDA's special tokens, in LLaDA's id order (ML-GSAI/LLaDA-V train/llada_v_prepare/files/tokenizer_config.json); the
# toy vocabulary appends them after its BPE tokens exactly like LLaDA appends them after its 126,080 base tokens.
SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# The pre-tokenizer regex of the Ling/Bailing tokenizer that LLaDA's appears to be (quoted in ggml-org/llama.cpp
# src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_BAILINGMOE): cl100k-style, but digits are split one by one.
PAT_STR = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
           r"""|\s*[\r\n]|\s+(?!\S)|\s+""")


class Tokenizer:
    """Byte-level BPE ranks + LLaDA's special tokens, over tiktoken's public API, with the ids the
    template and the sampler need. It is plain data (ranks, special tokens, split regex), so it travels
    inside a checkpoint as JSON-able dicts (to_dict / from_dict; nanoGPT's meta.pkl idea, without pickle)."""

    def __init__(self, ranks: dict, special_tokens: dict, pat_str: str = PAT_STR, nfc: bool = False,
                 name: str = "llada", mask_id: int | None = None):
        # mask_id: the [MASK] id when it is not <|mdm_mask|>'s (a model config's mask_token_id, e.g. iLLaDA's 5)
        missing = [s for s in SPECIAL_TOKENS if s not in special_tokens and not (s == "<|mdm_mask|>" and mask_id is not None)]
        if missing:
            raise ValueError(f"tokenizer lacks LLaDA special tokens {missing}; build it with all of {SPECIAL_TOKENS}")
        self.ranks, self.special, self.pat_str = ranks, dict(special_tokens), pat_str
        self.nfc = nfc  # apply Unicode NFC before encoding (the official tokenizer.json's normalizer)
        self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=self.special)
        st = self.special
        self.bos_id, self.eos_id = st["<|startoftext|>"], st["<|endoftext|>"]
        self.mask_id = st["<|mdm_mask|>"] if mask_id is None else int(mask_id)
        self.start_header_id, self.end_header_id = st["<|start_header_id|>"], st["<|end_header_id|>"]
        self.eot_id = st["<|eot_id|>"]
        self.pad_id = self.eos_id  # LLaDA pads with EOS (ML-GSAI/LLaDA-V
                                   # train/llada_v_prepare/files/tokenizer_config.json)
        self.vocab_size = self.enc.n_vocab

    def to_dict(self) -> dict:
        """JSON-able: {"ranks": {hex bytes: id}, "special_tokens", "pat_str", "nfc", "mask_id"}."""
        return {"ranks": {b.hex(): i for b, i in self.ranks.items()}, "special_tokens": self.special,
                "pat_str": self.pat_str, "nfc": self.nfc, "mask_id": self.mask_id}

    @classmethod
    def from_dict(cls, d: dict) -> "Tokenizer":
        try:
            return cls({bytes.fromhex(h): int(i) for h, i in d["ranks"].items()},
                       {str(k): int(v) for k, v in d["special_tokens"].items()}, str(d["pat_str"]), bool(d["nfc"]),
                       mask_id=d.get("mask_id"))  # absent in older checkpoints: <|mdm_mask|>'s id
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"the stored tokenizer is malformed ({type(e).__name__}: {e})") from None

    def encode(self, text: str) -> list[int]:
        # Special-token strings in the text are turned into their ids (the template relies on it).
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def encode_with_image(self, text: str, n_image_tokens) -> list[int]:
        """Encode `text`, turning each "<image>" into n_image_tokens IMAGE_TOKEN_INDEX placeholders (an int,
        or a list with one count per "<image>" when images differ, as in anyres mode).
        (Official tokenizer_image_token inserts one -200 and expands it inside the model; expanding here
        keeps batching trivial and is equivalent.)"""
        chunks = text.split("<image>")
        ids = []
        for i, chunk in enumerate(chunks):
            if i > 0:
                n = n_image_tokens if isinstance(n_image_tokens, int) else n_image_tokens[i - 1]
                ids += [IMAGE_TOKEN_INDEX] * n
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


# ----------------------------------------------------------------------------------------------
# The official tokenizer: Hugging Face tokenizer.json (byte-level BPE) -> tiktoken.Encoding

# GPT-2's ByteLevel pre-tokenizer regex (used when the tokenizer.json has no Split regex of its own)
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table: bytes that are printable keep their character, the other
    68 are shifted to 256 + k, so every token can be stored as a visible string in vocab files."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _pre_tokenizer_regex(pt) -> str:
    """The split regex of a tokenizer.json pre_tokenizer: ByteLevel(use_regex) = GPT-2's, or a Split(Regex)
    followed by ByteLevel(use_regex=false) (LLaMA-3 / Ling style)."""
    steps = pt.get("pretokenizers", [pt]) if pt else []
    pats = []
    for st in steps:
        if st["type"] == "ByteLevel":
            if st.get("add_prefix_space"):
                raise ValueError("tokenizer.json: ByteLevel add_prefix_space=true is not supported by tiktoken")
            if st.get("use_regex", True):
                pats.append(GPT2_PAT_STR)
        elif (st["type"] == "Split" and "Regex" in st["pattern"] and st.get("behavior") == "Isolated"
              and not st.get("invert")):
            pats.append(st["pattern"]["Regex"])
        else:
            raise ValueError(f"tokenizer.json: pre-tokenizer step {st['type']} ({st}) cannot be expressed in tiktoken")
    if len(pats) != 1:
        raise ValueError(f"tokenizer.json: expected exactly one split regex in the pre-tokenizer, found {len(pats)}")
    return pats[0]


def _needs_nfc(norm) -> bool:
    steps = norm.get("normalizers", [norm]) if norm else []
    if any(s["type"] != "NFC" for s in steps):
        raise ValueError(f"tokenizer.json: normalizer {norm} is not supported (only NFC or none)")
    return bool(steps)


MAX_VOCAB = 1 << 22  # ids a tokenizer.json may use: 33x LLaDA's 126,349, and the model-side bound (checkpoint.LIMITS)


def tokenizer_from_json(path, mask_id: int | None = None) -> Tokenizer:
    """Convert a Hugging Face byte-level BPE tokenizer.json into a Tokenizer (tiktoken ranks, NFC flag).
    ranks: each vocabulary piece mapped back through GPT-2's byte table to raw bytes, rank = its id;
    pat_str: the pre-tokenizer's regex; special tokens: the added tokens with their ids.
    tiktoken merges the adjacent pair of lowest rank, HF the pair earliest in the merges list: the two
    agree when merge k creates a token whose id grows with k. That is checked; violations fail clearly."""
    with open(path, encoding="utf-8") as f:
        j = json.load(f)
    model = j.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"{path}: not a byte-level BPE tokenizer.json (model type {model.get('type')!r})")
    added = {t["content"]: t["id"] for t in j.get("added_tokens", [])}
    added_ids = set(added.values())
    ids = list(model["vocab"].values()) + list(added.values())
    wrong = [i for i in ids if type(i) is not int or not 0 <= i < MAX_VOCAB]
    if wrong:  # an id is a row of the embedding: a huge one would make tiktoken and the model tables that large
        raise ValueError(f"{path}: token ids {wrong[:5]} are not integers in 0..{MAX_VOCAB - 1:,}; this is not a "
                         f"usable tokenizer.json")
    base = [i for i in model["vocab"].values() if i not in added_ids]
    if len(set(base)) != len(base):
        raise ValueError(f"{path}: two vocabulary pieces share one id; every piece needs its own")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {}
    for piece, i in model["vocab"].items():
        if i in added_ids:  # some files list the added tokens in the vocabulary too
            continue
        try:
            ranks[bytes(byte_of[c] for c in piece)] = i
        except KeyError:
            raise ValueError(f"{path}: vocabulary piece {piece!r} (id {i}) is not over GPT-2's byte alphabet; "
                             f"this is not a ByteLevel tokenizer") from None
    absent = [b for b in range(256) if bytes([b]) not in ranks]
    if absent:
        raise ValueError(f"{path}: bytes {absent[:10]} have no single-byte token; tiktoken needs all 256")
    last = -1
    for k, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ") if isinstance(m, str) else m
        ab = bytes(byte_of[c] for c in a + b)
        r = ranks.get(ab)
        if r is None or r <= last or r <= ranks[bytes(byte_of[c] for c in a)] or r <= ranks[bytes(byte_of[c] for c in b)]:
            raise ValueError(f"{path}: merge {k} ({a!r} + {b!r}) gives id {r}, out of the order of the merges "
                             f"list (previous merge's id {last}); tiktoken's rank-order BPE would encode differently")
        last = r
    if mask_id is not None and not 0 <= int(mask_id) < len(ranks) + len(added):
        raise ValueError(f"mask id {mask_id} is not a token of {path} (ids 0..{len(ranks) + len(added) - 1})")
    return Tokenizer(ranks, added, _pre_tokenizer_regex(j.get("pre_tokenizer")), _needs_nfc(j.get("normalizer")),
                     mask_id=mask_id)


# What the real LLaDA tokenizer gives (GSAI-ML/LLaDA-8B-Instruct's tokenizer.json, run with transformers'
# AutoTokenizer): text -> ids. Note "assistant" is two tokens, [598, 10450]; the official code hard-codes only the first
# (llava_arch.generate_conversation_ids).
LLADA_SELF_CHECK = {
    "<|start_header_id|>user<|end_header_id|>\n\n": [126346, 3840, 126347, 198, 198],
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n": [126348, 126346, 598, 10450, 126347, 198, 198],
    "Hello, how are you?": [14455, 11, 1099, 449, 362, 30],
    "I'm good, thank you!": [40, 3180, 1505, 11, 7949, 362, 0],
    " 12": [220, 16, 17],
    " 6": [220, 21],
}
LLADA_BASE_TOKENS = 126080  # ids 0..126079 are BPE pieces, 126080.. the added special tokens
LLADA_MASK_ID = 126336      # <|mdm_mask|>: LLaDA's [MASK], model.LLaDAConfig's default mask_id


def config_mask_id(mask_id: int) -> int | None:
    """A model config's mask_id as get_tokenizer's override: the default (LLaDA's 126336) says nothing, so
    the tokenizer's own [MASK] holds (config.json's mask_token_id, else <|mdm_mask|>: the toy's and other
    vocabularies have it elsewhere); any other id (--lm.mask_id=5 for iLLaDA) overrides it."""
    return None if mask_id == LLADA_MASK_ID else int(mask_id)


def self_check(tok: Tokenizer, source: str = "tokenizer"):
    """For a tokenizer with LLaDA's 126,080 base tokens: every string of LLADA_SELF_CHECK must encode to
    its recorded ids. Raises one ValueError naming the string, the position and the id that differ."""
    for text, want in LLADA_SELF_CHECK.items():
        got = tok.encode(text)
        if got != want:
            i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            g = got[i] if i < len(got) else "nothing"
            w = want[i] if i < len(want) else "nothing"
            raise ValueError(f"{source}: self-check failed: {text!r} encodes to {got}, but LLaDA's tokenizer gives "
                             f"{want}: token {i} is {g}, expected {w} (is this LLaDA's tokenizer.json?)")


def get_tokenizer(path: str, mask_id: int | None = None) -> Tokenizer:
    """A tokenizer.json, or a model directory holding one (e.g. GSAI-ML/LLaDA-V). LLaDA's own tokenizer
    is checked against the ids that GSAI-ML/LLaDA-8B-Instruct's tokenizer.json gives (LLADA_SELF_CHECK). (The toy
    tokenizer travels inside the toy's checkpoints; synthetic.toy_tokenizer() learns it.)
    The [MASK] id: mask_id if given (a flag, or the model config's), else, for a model directory, its
    config.json's mask_token_id (iLLaDA: 5), else the id of <|mdm_mask|> (LLaDA: 126336)."""
    p = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    cfg = os.path.join(path, "config.json")  # a model directory's own config, not one that merely sits nearby
    if mask_id is None and os.path.isdir(path) and os.path.isfile(cfg):
        try:
            with open(cfg) as f:
                mask_id = json.load(f).get("mask_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"{cfg} (read for mask_token_id) is not a valid config.json ({type(e).__name__}: {e})") from None
    if not os.path.isfile(p):
        raise ValueError(f"no tokenizer at {path!r}: pass a tokenizer.json or a model directory that holds one "
                         f"(download tokenizer.json from GSAI-ML/LLaDA-V)")
    try:
        tok = tokenizer_from_json(p, mask_id)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{p} is not a valid tokenizer.json ({type(e).__name__}: {e})") from None
    if len(tok.ranks) == LLADA_BASE_TOKENS:
        self_check(tok, p)
    return tok
