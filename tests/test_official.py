"""Matching the official code where numerical fixtures cannot see (issue 17): the real tokenizer's format and
self-check (ML-GSAI/LLaDA-V train/llada_v_prepare/files/tokenizer_config.json,
train/llada_v_prepare/files/tokenizer.json), the official inference prompt (ML-GSAI/LLaDA-V
train/llava/mm_utils.py::tokenizer_image_token,
eval/lmms-eval/lmms_eval/models/llava_onevision_llada.py::generate_until), RoPE in the activation dtype (ML-GSAI/LLaDA-V
train/llava/model/language_model/modeling_llada.py::LLaDARotaryEmbedding), and the LLaDA family's grouped-query
attention, tied embeddings and mask id (iLLaDA). CPU only, no downloads.

    python -m pytest -q tests/test_official.py
"""
import json
import math

import pytest
import torch

torch.set_num_threads(1)
from PIL import Image
from safetensors.torch import save_file

import checkpoint
import data
import tokenizer
from diffusion import KVCache
from model import LLaDA, LLaDAConfig, LLaDAV, LLaDAVConfig, apply_rope, get_config, rope_cos_sin, rotate_half
from tokenizer import IMAGE_TOKEN_INDEX, LLADA_SELF_CHECK, bytes_to_unicode
from vision import VisionConfig
from conftest import V, tiny_llm

# ----------------------------------------------------------------------------------------------
# A tokenizer.json in the real format (ML-GSAI/LLaDA-V train/llada_v_prepare/files/tokenizer.json): byte-level BPE over
# GPT-2's byte alphabet, 126,080 base tokens (ids 0..255 the single bytes in bytes_to_unicode order, then merges whose
# ids follow the merge order), NFC, Ling's split regex, and the 269 added special tokens 126080..126348. The merges are
# chosen so that the strings of tokenizer.LLADA_SELF_CHECK encode to the recorded ids; every other id is a unique filler
# piece made only of bytes those strings never use, so no filler merge can touch them.

B2U = bytes_to_unicode()
# the pieces the real tokenizer gives (GSAI-ML/LLaDA-8B-Instruct's tokenizer.json): "assistant" is two of them,
# [598, 10450]
PIECES = {b"user": 3840, b"ass": 598, b"istant": 10450, b"Hello": 14455, b" how": 1099, b" are": 449,
          b" you": 362, b"'m": 3180, b" good": 1505, b" thank": 7949}
ADDED = (["<|startoftext|>", "<|endoftext|>", "[CLS]", "[gMASK]"] + [f"<|reserved_token_{i}|>" for i in range(252)]
         + ["<|mdm_mask|>"] + [f"<|reserved_token_{i}|>" for i in range(253, 256)]
         + ["<role>", "</role>", "<|arithmetic_start|>", "<|arithmetic_end|>", "<|number_start|>", "<|number_end|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])


def llada_like_tokenizer_json(pieces=PIECES) -> dict:
    chars = lambda bs: "".join(B2U[b] for b in bs)
    ids = {bytes([b]): i for i, b in enumerate(B2U)}  # "!" = 0, "0" = 15, " " = 220, "\n" = 198
    merges, taken = {}, set(ids.values()) | set(pieces.values())
    for piece, pid in sorted(pieces.items(), key=lambda kv: kv[1]):
        for n in range(2, len(piece) + 1):  # built left to right: p[:2], p[:3], ..., p
            sub, left, right = piece[:n], piece[:n - 1], piece[n - 1:n]
            if sub not in ids:
                ids[sub] = pid if n == len(piece) else next(
                    i for i in range(max(ids[left], ids[right]) + 1, pid) if i not in taken)
                taken.add(ids[sub])
                merges[sub] = (left, right)
    used = {b for s in LLADA_SELF_CHECK for b in s.encode()}
    alphabet = [bytes([b]) for b in B2U if b not in used]

    def fillers():  # a + b, then (a + b) + c, ...: unique, and each made of pieces with smaller ids
        level = alphabet
        while True:
            nxt = []
            for a in level:
                for b in alphabet:
                    nxt.append(a + b)
                    yield a, b
            level = nxt
    gen = fillers()
    for i in range(256, tokenizer.LLADA_BASE_TOKENS):
        if i not in taken:
            a, b = next(gen)
            ids[a + b], merges[a + b] = i, (a, b)
    assert sorted(ids.values()) == list(range(tokenizer.LLADA_BASE_TOKENS))
    split = {"type": "Split", "pattern": {"Regex": tokenizer.PAT_STR}, "behavior": "Isolated", "invert": False}
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": tokenizer.LLADA_BASE_TOKENS + k, "content": c, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True} for k, c in enumerate(ADDED)],
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                split, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {chars(p): i for p, i in sorted(ids.items(), key=lambda kv: kv[1])},
                      "merges": [[chars(merges[p][0]), chars(merges[p][1])] for p in sorted(merges, key=ids.get)]}}


@pytest.fixture(scope="module")
def llada_json():
    return llada_like_tokenizer_json()  # built once per module (under a second)


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory, llada_json):
    """A model directory holding the LLaDA-like tokenizer.json."""
    d = tmp_path_factory.mktemp("llada_tok")
    with open(d / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(llada_json, f)
    return d


@pytest.fixture(scope="module")
def llada_tok(llada_dir):
    return tokenizer.get_tokenizer(str(llada_dir))


def test_self_check_accepts_the_real_format(llada_dir, llada_tok):
    """get_tokenizer accepts a tokenizer.json whose encodings are tokenizer.LLADA_SELF_CHECK's, and so does the
    reference implementation (`tokenizers`): the file is in the real format and the ids are the public ones."""
    tok = llada_tok
    assert len(tok.ranks) == 126080 and tok.vocab_size == 126349 and tok.nfc
    assert (tok.bos_id, tok.eos_id, tok.mask_id, tok.start_header_id, tok.end_header_id, tok.eot_id) == (
        126080, 126081, 126336, 126346, 126347, 126348)
    for text, want in LLADA_SELF_CHECK.items():
        assert tok.encode(text) == want, text
    assert tok.encode("assistant") == [598, 10450] and tok.decode([598, 10450]) == "assistant"
    hf = pytest.importorskip("tokenizers").Tokenizer.from_file(str(llada_dir / "tokenizer.json"))
    for text, want in LLADA_SELF_CHECK.items():
        assert hf.encode(text).ids == want, text


def test_self_check_rejects_one_changed_id(tmp_path, llada_json):
    """The same file with " how" at id 1100 instead of 1099 (it swaps ids, and merge-list places, with the filler
    piece at 1100, so the file stays a valid BPE) is refused, and the message names both ids."""
    model = llada_json["model"]
    vocab, merges = dict(model["vocab"]), list(model["merges"])
    how, other = "\u0120how", next(p for p, i in vocab.items() if i == 1100)
    vocab[how], vocab[other] = 1100, 1099
    k = merges.index(["\u0120ho", "w"])
    assert "".join(merges[k + 1]) == other  # merges are in id order: 1099's, then 1100's
    merges[k], merges[k + 1] = merges[k + 1], merges[k]
    with open(tmp_path / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(dict(llada_json, model=dict(model, vocab=vocab, merges=merges)), f)
    with pytest.raises(ValueError, match=r"'Hello, how are you\?'.*token 2 is 1100, expected 1099"):
        tokenizer.get_tokenizer(str(tmp_path))


def test_mask_id_from_config_or_flag(tmp_path):
    """The [MASK] id: <|mdm_mask|>'s by default; a model directory's config.json mask_token_id (iLLaDA: 5);
    an explicit mask_id wins; one outside the vocabulary is refused in one line. (A bytes-only tokenizer.json
    with LLaDA's 6 special tokens at 256..261 keeps this fast.)"""
    d = tmp_path / "illada"
    d.mkdir()
    j = {"model": {"type": "BPE", "vocab": {c: i for i, c in enumerate(B2U.values())}, "merges": []},
         "added_tokens": [{"id": 256 + k, "content": c} for k, c in enumerate(tokenizer.SPECIAL_TOKENS)],
         "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    (d / "tokenizer.json").write_text(json.dumps(j))
    assert tokenizer.get_tokenizer(str(d)).mask_id == 258  # <|mdm_mask|>
    (d / "config.json").write_text(json.dumps({"mask_token_id": 5}))
    tok = tokenizer.get_tokenizer(str(d))
    assert tok.mask_id == 5 and tokenizer.Tokenizer.from_dict(tok.to_dict()).mask_id == 5  # it travels in ckpts
    assert tokenizer.get_tokenizer(str(d), mask_id=258).mask_id == 258
    assert tokenizer.get_tokenizer(str(d / "tokenizer.json")).mask_id == 258  # a bare file reads no config
    with pytest.raises(ValueError, match="mask id 999 is not a token"):
        tokenizer.get_tokenizer(str(d), mask_id=999)


# ----------------------------------------------------------------------------------------------
# Inference prompts: a transcription of LLaVA's mm_utils.tokenizer_image_token, written here independently

def official_tokenizer_image_token(prompt, tok, image_token_index=IMAGE_TOKEN_INDEX):
    prompt_chunks = [tok.encode(chunk) for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tok.bos_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def expand(ids, n):  # one -200 per image -> n placeholders per image (the model expands them the same way)
    return [t for i in ids for t in ([i] * n if i == IMAGE_TOKEN_INDEX else [i])]


@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_inference_prompt_is_tokenizer_image_token(llada_tok, n_images):
    """data.tokenizer_image_token == the official function on the project's tokenizer: the "\\n" after the image
    (one image) or the " " between images and the "\\n" (several) are gone; keep_after_image keeps them."""
    tok = llada_tok
    msgs = data.llada_v_messages("What is in the picture?", n_images=n_images, think="no_think")
    prompt = data.chat_template(msgs)
    assert (" ".join(["<image>"] * n_images) + "\nWhat is in the picture? /no_think<|eot_id|>") in prompt
    ids = data.tokenizer_image_token(tok, prompt, 5)
    assert ids == expand(official_tokenizer_image_token(prompt, tok), 5)
    kept = data.tokenizer_image_token(tok, prompt, 5, keep_after_image=True)
    assert kept == tok.encode_with_image(prompt, 5)
    assert len(kept) - len(ids) == n_images  # one token dropped per image
    first = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[first:first + 5 * n_images] == [IMAGE_TOKEN_INDEX] * (5 * n_images)  # the images are adjacent
    assert ids[first + 5 * n_images] != 198 and kept[first + 5 * n_images + (n_images - 1)] == 198
    # per-image counts (anyres images differ in size)
    counts = [3, 7, 4][:n_images]
    assert data.tokenizer_image_token(tok, prompt, counts).count(IMAGE_TOKEN_INDEX) == sum(counts)
    # no BOS in front (a Base model's raw text): offset 0, nothing is dropped
    raw = "<image>\nDescribe it."
    assert data.tokenizer_image_token(tok, raw, 2) == expand(official_tokenizer_image_token(raw, tok), 2) == \
        tok.encode_with_image(raw, 2)


def test_training_form_keeps_the_newline(llada_tok, tmp_path):
    """LLaDA-V's training sequences (data.py's LLaVA conv format, preprocess_llada) keep the "\\n" (198) right
    after the image; the toy's sft_example does too (it was trained that way)."""
    tok = llada_tok
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "a.png")
    rec = [{"id": 0, "image": "a.png", "conversations": [{"from": "human", "value": "What is in the picture?\n<image>"},
                                                         {"from": "gpt", "value": "A red square."}]}]
    (tmp_path / "conv.json").write_text(json.dumps(rec))
    item = data.LlavaDataset(str(tmp_path / "conv.json"), str(tmp_path), tok, 16, 4, fmt="conv")[0]
    assert "error" not in item, item
    ids = [int(t) for t in item["ids"]]
    last = max(i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX)
    assert ids[last + 1] == 198
    sft, _ = data.sft_example(tok, "What is it?", "red", 4, 3)
    assert sft[sft.index(IMAGE_TOKEN_INDEX) + 3] == 198


# Training sequences: a transcription of LLaDA-V's train/llava/train/train.py (preprocess_multimodal,
# preprocess_llada, preprocess_plain) and of llava_arch.py's splice, written here independently

def official_conv_sequence(record, tok, counts, system):
    """-> (ids, labels) the official preprocessing gives a conversation record, tag k spliced as counts[k]
    feature rows (prepare_inputs_labels_for_multimodal takes the images in order). Raises KeyError where the
    official code does (then __getitem__ retries and replaces the sample)."""
    source = [dict(m) for m in record["conversations"]]
    has_image = "image" in record
    if has_image:  # preprocess_multimodal: exactly one tag, not first -> "<image>\n" + the stripped rest
        for m in source:
            if m["value"].count("<image>") == 1 and not m["value"].startswith("<image>"):
                m["value"] = ("<image>\n" + m["value"].replace("<image>", "").strip()).strip()
    roles = {"human": "user", "gpt": "assistant"}
    if roles[source[0]["from"]] != roles["human"]:
        source = source[1:]

    def template(role, content):  # one message through the chat template; "<image>" is a token only with images
        text = f"<|startoftext|><|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"
        if not has_image:
            return tok.encode(text)
        parts = [tok.encode(p) for p in text.split("<image>")]
        return [t for k, p in enumerate(parts) for t in ([IMAGE_TOKEN_INDEX] if k else []) + p]

    ids = template("system", system)
    labels = [-100] * len(ids)
    for m in source:
        role = roles.get(m["from"], m["from"])
        enc = template(role, m["value"])[1:]  # its BOS dropped
        ids += enc
        labels += [-100] * len(enc) if role in ("user", "system") else enc
    # the unmasked specials ("\n\n" names no token of a byte-level vocabulary, so it adds nothing)
    unmask = {tok.bos_id, tok.start_header_id, tok.end_header_id, tok.eot_id}
    labels = [t if t in unmask else l for t, l in zip(ids, labels)]
    out_ids, out_labels, k = [], [], 0
    for t, l in zip(ids, labels):  # the splice: features in, -100 under them
        n = counts[k] if t == IMAGE_TOKEN_INDEX else 1
        k += t == IMAGE_TOKEN_INDEX
        out_ids += [t] * n
        out_labels += [-100 if t == IMAGE_TOKEN_INDEX else l] * n
    return out_ids, out_labels


def test_records_the_official_code_trains(llada_tok, tmp_path):
    """Empty answers, a literal "<image>" in a text-only record, a system turn after the first, fewer tags than
    image files: each gives the official sequence and labels (official_conv_sequence); a plain caption that is
    empty is the "\n" target. A conversation opening with a system turn is refused, as officially."""
    tok, T = llada_tok, 4  # 16 px images, 8 px patches: 4 tokens each, in square and in pad mode
    for c in "abc":
        Image.new("RGB", (16, 16), (40 * "abc".index(c), 90, 200)).save(tmp_path / f"{c}.png")
    conv = lambda *turns: [{"from": f, "value": v} for f, v in turns]
    recs = [{"image": "a.png", "conversations": conv(("human", "What? <image>"), ("gpt", ""))},
            {"conversations": conv(("human", "What does <image> stand for?"), ("gpt", "An image."))},
            {"image": "a.png", "conversations": conv(("human", "<image>\nHi"), ("gpt", "Hello."),
                                                      ("system", "Be brief."), ("human", "Colour?"), ("gpt", "Blue."))},
            {"image": ["a.png", "b.png", "c.png"], "conversations": conv(("human", "<image> or <image>?"), ("gpt", "Same."))},
            {"image": ["a.png", "b.png"], "conversations": conv(("human", "Which one, <image>"), ("gpt", " "))},
            {"conversations": conv(("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello."))}]
    (tmp_path / "c.json").write_text(json.dumps(recs))
    ds = data.LlavaDataset(str(tmp_path / "c.json"), str(tmp_path), tok, 16, T, fmt="conv")
    for i, rec in enumerate(recs[:-1]):
        n_tags = sum(m["value"].count("<image>") for m in rec["conversations"]) if "image" in rec else 0
        want = official_conv_sequence(rec, tok, [T] * n_tags, data.SYSTEM_PROMPT)
        got = ds[i]
        assert "error" not in got, (i, got)
        assert (got["ids"], got["labels"]) == want, i
        assert (0 if got["pixels"] is None else got["pixels"].shape[0]) == n_tags  # the untagged files are not read
    assert IMAGE_TOKEN_INDEX not in ds[1]["ids"] and "<image>" in tok.decode(ds[1]["ids"])
    with pytest.raises(KeyError):
        official_conv_sequence(recs[-1], tok, [], data.SYSTEM_PROMPT)
    assert ds[len(recs) - 1] == {"error": "system turn first"}
    # preprocess_plain: "<image>" + caption + "\n", tokenized as tokenizer_image_token does; only the image ignored
    (tmp_path / "p.json").write_text(json.dumps([{"image": "a.png", "conversations": conv(("human", "<image>\n"),
                                                                                         ("gpt", ""))}]))
    plain = data.LlavaDataset(str(tmp_path / "p.json"), str(tmp_path), tok, 16, T, fmt="plain")[0]
    want = expand(official_tokenizer_image_token("<image>" + "" + "\n", tok), T)
    assert plain["ids"] == want and plain["labels"] == [-100] * T + want[T:]


# ----------------------------------------------------------------------------------------------
# The LLaDA family: grouped-query attention, tied embeddings, RoPE precision

# conftest's tiny_llm (V = 64 tokens, 32 wide, 2 layers, 4 heads) with a 48-wide MLP: illada_config's shape below.

def test_gqa_equals_mha_with_repeated_kv_heads():
    """A GQA model (2 key/value heads for 4 query heads) computes exactly what an MHA model computes whose k/v
    heads 2i and 2i+1 are both GQA's head i (LLaMA's repeat_kv); k_proj/v_proj shrink to n_kv_heads * hd."""
    g = tiny_llm(mlp_hidden=48, n_kv_heads=2)
    assert g.layers[0].k_proj.weight.shape == g.layers[0].v_proj.weight.shape == (16, 32)
    m = tiny_llm(mlp_hidden=48)
    sd = g.state_dict()
    for k in list(sd):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            sd[k] = sd[k].view(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32)
    m.load_state_dict(sd)
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(g(g.embed_tokens(ids)), m(m.embed_tokens(ids)), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="n_kv_heads 3 must divide n_heads 4"):
        tiny_llm(mlp_hidden=48, n_kv_heads=3)


def test_kv_cache_with_gqa():
    """diffusion.KVCache holds n_kv_heads heads per layer, and a cached span equals the full pass."""
    g = tiny_llm(mlp_hidden=48, n_kv_heads=2)
    x = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        full = g(g.embed_tokens(x))
        kv = KVCache()
        g(g.embed_tokens(x), cache=kv)
        assert kv.k[0].shape == kv.v[1].shape == (2, 2, 20, 8)
        kv.span = (6, 14)
        torch.testing.assert_close(g(g.embed_tokens(x), cache=kv), full[:, 6:14], rtol=1e-5, atol=1e-5)


def test_tied_embeddings_train_and_save(tmp_path):
    """Tied: no lm_head module or key, logits = h E^T, one matrix gets both gradients (input and output), an
    optimizer step moves it, and train.py's ckpt (state dict) round-trips bit-exactly."""
    t = tiny_llm(mlp_hidden=48, tie_embeddings=True)
    assert t.lm_head is None and "lm_head.weight" not in t.state_dict()
    untied = tiny_llm(mlp_hidden=48)
    assert sum(p.numel() for p in t.parameters()) == sum(p.numel() for p in untied.parameters()) - V * 32
    ids = torch.randint(0, V, (2, 8))
    h = t.norm(t.layers[1](t.layers[0](t.embed_tokens(ids), *rope_cos_sin(8, 8, 500000.0, "cpu"), None),
                           *rope_cos_sin(8, 8, 500000.0, "cpu"), None))
    torch.testing.assert_close(t(t.embed_tokens(ids)), h @ t.embed_tokens.weight.T)
    t.train()
    E = t.embed_tokens.weight
    t(t.embed_tokens(ids), targets=ids, output_positions=torch.ones_like(ids, dtype=torch.bool)).mean().backward()
    unused = [i for i in range(V) if i not in ids]  # rows no input token used: their gradient is the head's only
    assert E.grad[unused].abs().sum() > 0
    before = E.detach().clone()
    torch.optim.AdamW(t.parameters(), lr=1e-2).step()
    assert not torch.equal(before, E)
    checkpoint.save_checkpoint(tmp_path / "ckpt.pt", {"model": t.state_dict()})
    back = LLaDA(t.cfg)
    checkpoint.load_state(back, checkpoint.load_state_file(tmp_path / "ckpt.pt")["model"])
    assert all(torch.equal(a, b) for a, b in zip(t.state_dict().values(), back.state_dict().values()))


def illada_config(layout):
    """An iLLaDA-shaped config.json (GQA, tied, mask id 5, context 8192) in either naming."""
    if layout == "original":
        return {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "mlp_hidden_size": 48, "vocab_size": V,
                "embedding_size": V, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_sequence_length": 8192,
                "weight_tying": True, "include_bias": False, "activation_type": "silu", "mask_token_id": 5,
                "model_type": "llada"}
    return {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 48, "vocab_size": V, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 8192, "tie_word_embeddings": True, "mask_token_id": 5, "model_type": "llada"}


@pytest.mark.parametrize("layout", ["original", "llama"])
def test_illada_shaped_checkpoint_loads_and_saves(tmp_path, layout):
    """An iLLaDA-shaped directory (no head key) loads with the right config and logits h E^T; save -> load is
    bit-exact; a stored head equal to E is accepted, one that differs is refused in one line."""
    ref = tiny_llm(mlp_hidden=48, tie_embeddings=True, n_kv_heads=2, mask_id=5, max_seq_len=8192)
    names = checkpoint.official_names(ref, layout)
    src = tmp_path / "src"
    src.mkdir()
    save_file({names[k]: v.contiguous() for k, v in ref.state_dict().items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(illada_config(layout)))
    m = checkpoint.from_pretrained(src)
    c = m.cfg
    assert (c.kv_heads, c.tie_embeddings, c.mask_id, c.max_seq_len) == (2, True, 5, 8192)
    assert c.rope_fp32 == (layout == "original")  # the original code: rope_full_precision; LLaMA-style: activation dtype
    ids = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(m(m.embed_tokens(ids)), ref(ref.embed_tokens(ids)), rtol=0, atol=0)
    checkpoint.save_pretrained(m, tmp_path / "out", layout=layout)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    tie_key, kv_key = ("weight_tying", "n_kv_heads") if layout == "original" else ("tie_word_embeddings", "num_key_value_heads")
    assert saved[tie_key] is True and saved[kv_key] == 2 and saved["mask_token_id"] == 5
    again = checkpoint.from_pretrained(tmp_path / "out")
    assert again.cfg == m.cfg
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))
    head = checkpoint.llada_key("lm_head.weight", layout)
    emb = checkpoint.llada_key("embed_tokens.weight", layout)
    tensors = {names[k]: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(dict(tensors, **{head: tensors[emb].clone()}), str(src / "model.safetensors"))
    checkpoint.from_pretrained(src)
    save_file(dict(tensors, **{head: tensors[emb] + 1}), str(src / "model.safetensors"))
    with pytest.raises(ValueError, match=f"ties the embeddings, but {head} differs"):
        checkpoint.from_pretrained(src)


def test_tied_gqa_llada_v_saves_and_loads(tmp_path):
    """LLaDA-V around a tied GQA language model: save_pretrained writes no lm_head and the LLaMA-style fields;
    from_pretrained gives back the same config and weights."""
    torch.manual_seed(0)
    cfg = LLaDAVConfig(lm=LLaDAConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, n_kv_heads=1, mlp_hidden=48,
                                      tie_embeddings=True, mask_id=5, rope_fp32=False),
                       vision=VisionConfig(image_size=16, patch_size=8, d_model=16, n_layers=2, n_heads=2, mlp_hidden=32))
    m = LLaDAV(cfg)
    m.init_weights()
    checkpoint.save_pretrained(m, tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    assert c["num_key_value_heads"] == 1 and c["tie_word_embeddings"] is True and c["mask_token_id"] == 5
    back = checkpoint.from_pretrained(tmp_path)
    assert back.cfg.lm == cfg.lm and back.llm.lm_head is None
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))


def test_rope_precision_switch():
    """rope_fp32 (original LLaDA: rope_full_precision) vs the activation dtype (LLaDA-V's LLaMA-style port):
    bit-identical in fp32; in bf16 at 3,000 positions they differ, by a couple of bf16 roundings at most."""
    torch.manual_seed(0)
    L, hd = 3000, 128
    cos, sin = rope_cos_sin(L, hd, 500000.0, "cpu")
    q = torch.randn(1, 2, L, hd)
    assert torch.equal(apply_rope(q, cos, sin, True), apply_rope(q, cos, sin, False))
    qb = q.bfloat16()
    a, b = apply_rope(qb, cos, sin, True).float(), apply_rope(qb, cos, sin, False).float()
    assert a.dtype == b.dtype and (a != b).any()
    scale = qb.float().abs() + rotate_half(qb.float()).abs()  # |x cos| + |rot(x) sin| <= this
    assert ((a - b).abs() <= 2 ** -6 * scale).all()
    # the model-level switch, and its defaults: the llada_v_8b preset follows LLaDA-V, the toy keeps fp32
    m = tiny_llm(mlp_hidden=48)
    ids = torch.randint(0, V, (1, 64))
    with torch.no_grad():
        x = m(m.embed_tokens(ids))
        m.cfg.rope_fp32 = False
        assert torch.equal(m(m.embed_tokens(ids)), x)
        m.bfloat16()
        y = m(m.embed_tokens(ids)).float()
        m.cfg.rope_fp32 = True
        z = m(m.embed_tokens(ids)).float()
    assert not torch.equal(y, z) and (y - z).abs().max() < 0.1 * x.abs().max()
    assert get_config("llada_v_8b").lm.rope_fp32 is False and get_config("toy").lm.rope_fp32 is True
