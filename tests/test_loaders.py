"""Tests for the loaders' guards (issue 26): a Hugging Face folder that is damaged, inconsistent or hostile is
refused with ONE line naming the file and what is wrong, before any module is built; save_pretrained's files
carry sha256 checksums that loading verifies; a tokenizer larger than the model's vocabulary and LLaVA image
paths that leave --image_root are refused. Each folder is written by save_pretrained and then damaged.

    python -m pytest -q tests/test_loaders.py
"""
import json
import os
import time

import pytest
import torch

torch.set_num_threads(1)
from PIL import Image
from safetensors.torch import load_file, save_file

import checkpoint
from checkpoint import from_pretrained, save_pretrained
from conftest import narrow_llada_v, tiny_cfg, tiny_llm


def refused(path, exc=ValueError) -> str:
    """from_pretrained(path) must raise exc with a one-line message; -> the message."""
    with pytest.raises(exc) as e:
        from_pretrained(path)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 1000, msg
    return msg


@pytest.fixture
def lm_dir(tmp_path):
    """save_pretrained of a tiny LLaDA (vocab 64, 32 wide, 2 layers, LLaMA-style names): one model.safetensors."""
    save_pretrained(tiny_llm(), tmp_path / "lm")
    return tmp_path / "lm"


def header(path):
    """-> (header dict, data bytes) of a safetensors file."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path, h, data):
    text = json.dumps(h).encode()
    open(path, "wb").write(len(text).to_bytes(8, "little") + text + data)


def edit_config(d, **changes):
    c = json.load(open(d / "config.json"))
    c.update(changes)
    json.dump(c, open(d / "config.json", "w"))


# ------------------------------------------------------------------------------------------------
# 1. One line naming the file: damaged safetensors, bad config.json, non-float weights, a hostile index

def _truncate(p):
    p.write_bytes(p.read_bytes()[:-100])


def _half(p):
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


def _garbage(p):
    p.write_bytes(os.urandom(p.stat().st_size))


def _overlap(p):
    h, data = header(p)
    k = sorted((v["data_offsets"][0], k) for k, v in h.items() if k != "__metadata__")[1][1]
    h[k]["data_offsets"] = [x - 4 for x in h[k]["data_offsets"]]  # the second tensor starts 4 bytes early
    write_raw(p, h, data)


@pytest.mark.parametrize("damage", [_truncate, _half, _garbage, _overlap])
def test_damaged_safetensors_is_one_line_naming_the_file(lm_dir, damage):
    damage(lm_dir / "model.safetensors")
    msg = refused(lm_dir)
    assert str(lm_dir / "model.safetensors") in msg and "safetensors" in msg


@pytest.mark.parametrize("content, words", [
    ("[1, 2]", "JSON list"),                                 # a list, not an object
    ("{\"hidden_size\": 32,", "not valid JSON"),             # cut short
    ("drop:num_attention_heads", "lacks num_attention_heads"),
    ("set:num_hidden_layers=-2", "num_hidden_layers=-2, outside"),    # a negative size
    ("set:hidden_size=-32", "hidden_size=-32, outside"),
    ("set:num_hidden_layers=\"2\"", "num_hidden_layers='2', not an integer"),  # a string where a number belongs
    ("set:vocab_size=64.0", "vocab_size=64.0, not an integer"),
])
def test_bad_config_json_is_one_line_naming_the_file(lm_dir, content, words):
    f = lm_dir / "config.json"
    if content.startswith("drop:"):
        c = json.load(open(f))
        del c[content[5:]]
        f.write_text(json.dumps(c))
    elif content.startswith("set:"):
        key, value = content[4:].split("=")
        edit_config(lm_dir, **{key: json.loads(value)})
    else:
        f.write_text(content)
    msg = refused(lm_dir)
    assert str(f) in msg and words in msg, msg


def test_non_float_weight_is_refused(lm_dir):
    p = lm_dir / "model.safetensors"
    t = load_file(p)
    t["model.norm.weight"] = t["model.norm.weight"].long()  # int64, the right shape
    save_file(t, p, metadata={"format": "pt"})
    msg = refused(lm_dir)
    assert "model.norm.weight (I64)" in msg and "floating point" in msg and str(lm_dir) in msg


@pytest.mark.parametrize("where", ["absolute", "dotdot", "nested dotdot"])
def test_shard_index_pointing_outside_the_folder_is_refused(tmp_path, where):
    save_pretrained(tiny_llm(), tmp_path / "m", max_shard_size=10_000)
    save_pretrained(tiny_llm(seed=1), tmp_path / "other", max_shard_size=10_000)  # a real file to be lured to
    idx = tmp_path / "m" / "model.safetensors.index.json"
    j = json.load(open(idx))
    k, shard = next(iter(j["weight_map"].items()))
    target = {"absolute": str(tmp_path / "other" / shard), "dotdot": f"../other/{shard}",
              "nested dotdot": f"sub/../../other/{shard}"}[where]
    j["weight_map"] = {key: (target if f == shard else f) for key, f in j["weight_map"].items()}
    idx.write_text(json.dumps(j))
    msg = refused(tmp_path / "m")
    assert "outside the model folder" in msg and target in msg and str(idx) in msg


def test_index_that_is_not_an_index_is_one_line(tmp_path):
    save_pretrained(tiny_llm(), tmp_path / "m", max_shard_size=10_000)
    idx = tmp_path / "m" / "model.safetensors.index.json"
    for bad in ("not json", "[]", '{"weight_map": [1, 2]}', '{"weight_map": {"a": 5}}'):
        idx.write_text(bad)
        assert str(idx) in refused(tmp_path / "m")


def test_cli_prints_one_line_and_exit_1(lm_dir, capsys):
    """sample.py --checkpoint=<damaged folder>: one line on stderr naming the file, exit status 1."""
    import sample
    from cli import run_cli
    _half(lm_dir / "model.safetensors")
    with pytest.raises(SystemExit) as e:
        run_cli(sample.main, [f"--checkpoint={lm_dir}", "--tokenizer=toy", "--question=hi"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and str(lm_dir / "model.safetensors") in err


# ------------------------------------------------------------------------------------------------
# 2. Sizes: sane bounds, and config.json against the safetensors headers, before anything is built

def test_absurd_layer_count_is_refused_within_a_second(lm_dir):
    edit_config(lm_dir, num_hidden_layers=100_000)
    t0 = time.time()
    msg = refused(lm_dir)
    assert time.time() - t0 < 1.0
    assert "num_hidden_layers=100,000" in msg and "outside 1..1,024" in msg


@pytest.mark.parametrize("key, value", [("vocab_size", 10**9), ("hidden_size", 10**7), ("intermediate_size", 10**8),
                                        ("num_attention_heads", 10**5), ("max_position_embeddings", 10**12)])
def test_absurd_sizes_are_refused(lm_dir, key, value):
    edit_config(lm_dir, **{key: value})
    assert f"{key}={value:,}, outside" in refused(lm_dir)


def test_the_8b_configs_are_within_bounds():
    """The released shapes pass: LLaDA-V 8B (LLaMA-style, with SigLIP so400m) and LLaDA 8B in the original naming."""
    from model import get_config
    cfg = get_config("llada_v_8b")
    assert checkpoint.llada_v_config_from_hf(checkpoint.llada_v_config_to_hf(cfg)).lm == cfg.lm
    orig = checkpoint.llada_config_from_hf(checkpoint.llada_config_to_hf(cfg.lm, "original"))
    assert (orig.n_layers, orig.d_model, orig.vocab_size, orig.mlp_hidden) == (32, 4096, 126464, 12288)


@pytest.mark.parametrize("changes, words", [
    (dict(num_hidden_layers=900), "900 layers, the weights hold 2"),  # within the bounds, not these weights
    (dict(hidden_size=64, num_attention_heads=4), "config.json implies (64, 64)"),
    (dict(vocab_size=128), "model.embed_tokens.weight is (64, 32) in the weights, config.json implies (128, 32)"),
    (dict(intermediate_size=96), "model.layers.0.mlp.gate_proj.weight"),
])
def test_config_is_checked_against_the_headers_before_building(lm_dir, monkeypatch, changes, words):
    edit_config(lm_dir, **changes)

    def not_built(*a, **kw):
        raise AssertionError("the model was built before config.json was checked against the weights")
    monkeypatch.setattr(checkpoint, "LLaDA", not_built)
    msg = refused(lm_dir)
    assert "config.json does not match the safetensors weights" in msg and words in msg, msg


def test_llada_v_layer_counts_are_checked_for_both_towers(tmp_path, monkeypatch):
    m = narrow_llada_v(vocab_size=32)
    save_pretrained(m, tmp_path / "v")
    edit_config(tmp_path / "v", vision_config=dict(json.load(open(tmp_path / "v" / "config.json"))["vision_config"],
                                                   num_hidden_layers=7))
    monkeypatch.setattr(checkpoint, "LLaDAV", lambda *a: pytest.fail("built before the check"))
    assert "vision tower 7 layers" in refused(tmp_path / "v")


# ------------------------------------------------------------------------------------------------
# 3. Checksums in save_pretrained's files

def test_save_pretrained_writes_the_manifest(lm_dir):
    from safetensors import safe_open
    with safe_open(str(lm_dir / "model.safetensors"), "pt") as f:
        manifest = json.loads(f.metadata()["sha256"])
        assert manifest == checkpoint.tensor_manifest({k: f.get_tensor(k) for k in f.keys()})
        assert f.metadata()["format"] == "pt"  # transformers' loader needs it


def test_flipped_4kib_is_caught_and_a_folder_without_checksums_loads(tmp_path):
    m = tiny_llm()
    save_pretrained(m, tmp_path / "m")
    p = tmp_path / "m" / "model.safetensors"
    raw = bytearray(p.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little") + 1024  # inside the data section
    assert len(raw) - start > 4096
    raw[start:start + 4096] = bytes(b ^ 0xFF for b in raw[start:start + 4096])
    p.write_bytes(bytes(raw))
    msg = refused(tmp_path / "m")
    assert str(p) in msg and "sha256" in msg and "corrupt" in msg
    # the same weights written without the metadata (as official files are) load as they are
    save_file(load_file(tmp_path / "m" / "model.safetensors"), p, metadata={"format": "pt"})
    from_pretrained(tmp_path / "m")
    save_file({k: v for k, v in zip(checkpoint.official_names(m).values(), m.state_dict().values())}, p,
              metadata={"format": "pt"})
    again = from_pretrained(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))


def test_saving_twice_gives_the_same_bytes(tmp_path):
    """The metadata's two keys are written in one order (the library's own order changes from call to call)."""
    m = tiny_llm()
    for d in ("a", "b", "c"):
        save_pretrained(m, tmp_path / d)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes() == (tmp_path / "c" / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------------------
# 4. Accepted without a word before: a tokenizer larger than the model, image paths outside --image_root

def _big_tokenizer_json(path, first_special=2_000_000):
    """A byte-level BPE tokenizer.json (the 256 bytes, no merges) whose special tokens sit at ids 2,000,000+."""
    from tokenizer import SPECIAL_TOKENS, bytes_to_unicode
    vocab = {c: b for b, c in bytes_to_unicode().items()}
    added = [{"id": first_special + i, "content": s, "special": True} for i, s in enumerate(SPECIAL_TOKENS)]
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": added,
                                "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}))
    return path


def test_tokenizer_larger_than_the_model_is_refused(tmp_path, capsys):
    import sample
    save_pretrained(narrow_llada_v(vocab_size=512), tmp_path / "v")
    tok_json = _big_tokenizer_json(tmp_path / "tokenizer.json")
    with pytest.raises(SystemExit) as e:
        sample.main([f"--checkpoint={tmp_path / 'v'}", f"--tokenizer={tok_json}", "--question=hi", "--gen_length=4",
                     "--steps=4", "--block_length=4"])
    msg = str(e.value.code)
    assert "2,000,0" in msg and "512 ids" in msg and str(tok_json) in msg and "\n" not in msg


def test_checkpoint_whose_tokenizer_exceeds_its_vocabulary_is_refused(tmp_path):
    from synthetic import toy_tokenizer
    m = narrow_llada_v(vocab_size=32)  # the toy tokenizer has about 500 ids
    checkpoint.save_checkpoint(tmp_path / "ckpt.pt", {"config": m.cfg.to_dict(), "model": m.state_dict(),
                                                      "tokenizer": toy_tokenizer().to_dict()})
    with pytest.raises(ValueError, match=r"ckpt.pt \(its tokenizer\): the tokenizer has ids up to .* 32 ids"):
        checkpoint.load_checkpoint(tmp_path / "ckpt.pt")


@pytest.mark.parametrize("change, words", [("huge", "not integers in 0..4,194,303"), ("shared", "share one id")])
def test_tokenizer_json_ids_are_checked(tmp_path, change, words):
    from tokenizer import get_tokenizer
    p = _big_tokenizer_json(tmp_path / "tokenizer.json", first_special=256)
    j = json.load(open(p))
    if change == "huge":
        j["added_tokens"][0]["id"] = 10**12
    else:
        j["model"]["vocab"]["A"] = j["model"]["vocab"]["B"]
    p.write_text(json.dumps(j))
    with pytest.raises(ValueError, match=words):
        get_tokenizer(str(p))


def test_image_paths_outside_image_root_are_bad_samples(tmp_path):
    from data import LlavaDataset
    from synthetic import toy_tokenizer
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (32, 32), "red").save(root / "red.png")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "secret.png")  # exists, but outside the root
    ok = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]
    recs = [{"image": "red.png", "conversations": ok}, {"image": "./red.png", "conversations": ok},
            {"image": "../secret.png", "conversations": ok}, {"image": str(tmp_path / "secret.png"), "conversations": ok},
            {"image": "sub/../../secret.png", "conversations": ok}]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    ds = LlavaDataset(str(tmp_path / "d.json"), str(root), toy_tokenizer(), 64, 16)
    items = [ds[i] for i in range(len(ds))]
    assert "error" not in items[0] and "error" not in items[1]
    assert [it.get("error") for it in items[2:]] == ["image path outside --image_root"] * 3


# ------------------------------------------------------------------------------------------------
# 5. The message for a run folder of this project's own format

def test_own_run_folder_gets_a_message_naming_the_cause(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    m = narrow_llada_v()
    checkpoint.save_safetensors(d / "model.safetensors", m.state_dict())
    (d / "config.json").write_text(json.dumps(m.cfg.to_dict()))  # what train.py's export writes
    msg = refused(d)
    assert "train.py run folder" in msg and str(d / "model.safetensors") in msg
    (d / "ckpt.pt").write_bytes(b"")
    assert f"pass {d / 'ckpt.pt'}" in refused(d)
    assert "config.json is not a LLaDA config" not in msg
