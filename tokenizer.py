"""
Tokenizer: a `tiktoken.Encoding` with LLaDA's special tokens, so the toy model and the real 8B model run
the very same template and sampling code.

Byte-level BPE: start from the 256 single bytes; repeatedly merge the most frequent adjacent pair; the
rank r of a merged token = the order in which it was learnt. tiktoken encodes a pre-token (a piece cut
out by the regex PAT_STR) by always merging the adjacent pair of lowest rank, which reproduces the
learnt segmentation. The toy vocabulary is learnt here in milliseconds from the synthetic dataset's own
sentences (synthetic.toy_tokenizer); no tables are downloaded.

Special tokens come after the BPE ranks, in LLaDA's order (REFERENCE 1.2): BOS, EOS (= PAD), mask,
start/end header, end of turn. IMAGE_TOKEN_INDEX (-200) is not a token: it marks where the model
splices in visual features (model.py).
"""
import re
from collections import Counter

import regex
import tiktoken

IMAGE_TOKEN_INDEX = -200  # official LLaVA / LLaDA-V placeholder id for one visual token

# LLaDA's special tokens, in LLaDA's id order (REFERENCE 1.2); the toy vocabulary appends them after
# its BPE tokens exactly like LLaDA appends them after its 126,080 base tokens.
SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# The pre-tokenizer regex of the Ling/Bailing tokenizer that LLaDA's appears to be (REFERENCE 8):
# cl100k-style, but digits are split one by one.
PAT_STR = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
           r"""|\s*[\r\n]|\s+(?!\S)|\s+""")


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



def get_tokenizer(name: str) -> Tokenizer:
    if name == "toy":
        from synthetic import toy_tokenizer  # learnt from the synthetic data's sentences
        return toy_tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}: only 'toy' is built in (the official one is converted "
                     f"from a tokenizer.json)")

