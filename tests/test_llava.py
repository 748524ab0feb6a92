"""LLaVA-format data (data.py) and the staged recipe: labels of both formats, truncation, grouping, bad samples, and a
stage-1 -> stage-2 run on a small LLaVA-format dataset written here (PNG images + JSON).

    python -m pytest -q tests/test_llava.py
"""
import json

import pytest
import torch
from PIL import Image

import train
from data import IGNORE_INDEX
from data import LlavaDataset, collate_llava, length_grouped_batches, _truncate
from synthetic import toy_tokenizer
from tokenizer import IMAGE_TOKEN_INDEX
from conftest import TINY_DATA, tiny_toy_cfg

torch.set_num_threads(1)
TOK = toy_tokenizer()
N = 16  # toy preset: 64 px images, 16 px patches


def write_dataset(d):
    """Images, a stage-1 caption file and a stage-2 conversation file, each with some broken records."""
    colours = ["red", "green", "blue", "yellow"]
    for i, c in enumerate(colours):
        Image.new("RGB", (40 + 10 * i, 64), c).save(d / f"{c}.png")
    (d / "corrupt.png").write_bytes(b"not a png at all")
    plain = [{"id": str(i), "image": f"{c}.png", "conversations": [
        {"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": f"a {c} square"}]}
        for i, c in enumerate(colours * 3)]
    plain += [{"id": "m", "image": "missing.png", "conversations": plain[0]["conversations"]}]
    conv = [{"id": str(i), "image": f"{c}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": c},
        {"from": "human", "value": "Is it a circle?"}, {"from": "gpt", "value": "no"}]}
        for i, c in enumerate(colours * 2)]
    conv += [{"id": "text", "conversations": [{"from": "human", "value": "What is two plus two?"},
                                              {"from": "gpt", "value": "four"}]},
             {"id": "two", "image": ["red.png", "blue.png"], "conversations": [
                 {"from": "human", "value": "<image> and <image>: which is red?"}, {"from": "gpt", "value": "the first"}]},
             {"id": "bad1", "image": "corrupt.png", "conversations": conv[0]["conversations"]},
             {"id": "bad2", "conversations": "not a list"},
             {"id": "bad3", "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                                   {"from": "gpt", "value": ""}]}]
    conv[-1]["conversations"][1]["value"] = ""
    (d / "plain.json").write_text(json.dumps(plain))
    (d / "conv.json").write_text(json.dumps(conv))
    return d


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("llava"))


def test_plain_format_labels(data_dir):
    ds = LlavaDataset(str(data_dir / "plain.json"), str(data_dir), TOK, 64, N, fmt="plain")
    it = ds[0]
    cap = TOK.encode("a red square\n")
    assert it["ids"] == [IMAGE_TOKEN_INDEX] * N + cap  # no BOS, no template
    assert it["labels"] == [IGNORE_INDEX] * N + cap    # only the image is ignored
    assert it["pixels"].shape == (1, 3, 64, 64)
    assert ds[len(ds) - 1] == {"error": "missing image"}


def test_conv_format_labels_and_structural_switch(data_dir):
    on = LlavaDataset(str(data_dir / "conv.json"), str(data_dir), TOK, 64, N, fmt="conv", system=None)[0]
    off = LlavaDataset(str(data_dir / "conv.json"), str(data_dir), TOK, 64, N, fmt="conv", system=None,
                       unignore_special=False)[0]
    ids = on["ids"]
    assert ids[0] == TOK.bos_id and ids.count(TOK.bos_id) == 1  # BOS on the first message only
    # the image sits at the front of the user turn: header, "\n\n", then the N placeholders
    first = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[first:first + N] == [IMAGE_TOKEN_INDEX] * N and IMAGE_TOKEN_INDEX not in ids[first + N:]
    targets_off = [t for t, l in zip(ids, off["labels"]) if l != IGNORE_INDEX]
    assert TOK.decode(targets_off) == ("<|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|>"
                                       "<|start_header_id|>assistant<|end_header_id|>\n\nno<|eot_id|>")
    # the switch: every BOS / header / eot of the user turns becomes a target too, nothing else
    extra = [(t, a, b) for t, a, b in zip(ids, on["labels"], off["labels"]) if a != b]
    assert extra and all(t in (TOK.bos_id, TOK.start_header_id, TOK.end_header_id, TOK.eot_id) and a == t
                         for t, a, b in extra)
    assert len(extra) == 1 + 3 * 2  # BOS + (header start, header end, eot) x 2 user turns


def test_text_only_multi_image_and_bad_records(data_dir):
    ds = LlavaDataset(str(data_dir / "conv.json"), str(data_dir), TOK, 64, N, fmt="conv")
    recs = {r["id"]: i for i, r in enumerate(ds.records)}
    text = ds[recs["text"]]
    assert text["pixels"] is None and IMAGE_TOKEN_INDEX not in text["ids"]
    two = ds[recs["two"]]
    assert two["pixels"].shape[0] == 2 and two["ids"].count(IMAGE_TOKEN_INDEX) == 2 * N
    assert ds[recs["bad1"]]["error"].startswith("unreadable image")
    assert ds[recs["bad2"]] == {"error": "malformed record"}
    empty = ds[recs["bad3"]]  # an empty answer is trained, as officially: its header and <|eot_id|> are targets
    assert TOK.decode([t for t, l in zip(empty["ids"], empty["labels"]) if l != IGNORE_INDEX]).endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>")
    batch = collate_llava([ds[recs["text"]], ds[recs["bad2"]], ds[0]], TOK.pad_id)
    assert batch["n_samples"] == 2 and batch["errors"] == {"malformed record": 1}
    assert batch["pixels"].shape[0] == 1
    short = batch["attn"][0]
    assert (batch["labels"][0][~short] == TOK.eos_id).all()  # EOS padding is a target (official collator)


def test_truncation_official_cuts_through_an_image_and_switch_keeps_whole_images():
    ids = [1, 2] + [IMAGE_TOKEN_INDEX] * 4 + [3] + [IMAGE_TOKEN_INDEX] * 4 + [5, 6]
    # official (ML-GSAI/LLaDA-V train/llava/model/llava_arch.py::prepare_inputs_labels_for_multimodal): cut at max_len
    # after the features are in, even inside the second image
    out, lab, keep = _truncate(ids, ids, [4, 4], 9)
    assert out == ids[:9] and keep == [4, 2]
    out, _, keep = _truncate(ids, ids, [4, 4], 7)  # the cut falls just before the second image
    assert out == ids[:7] and keep == [4]
    # the switch: the cut never splits an image, it moves to just before it
    out, lab, keep = _truncate(ids, ids, [4, 4], 9, whole_images=True)
    assert out == ids[:7] and keep == [4]
    out, _, keep = _truncate(ids, ids, [4, 4], 12, whole_images=True)
    assert out == ids[:12] and keep == [4, 4]


def test_length_grouped_batches_are_deterministic():
    lengths = [1 + (i * 37) % 100 for i in range(64)]  # (against the official sampler: tests/test_data.py)
    a = length_grouped_batches(lengths, 4, seed=0, epoch=0)
    assert a == length_grouped_batches(lengths, 4, seed=0, epoch=0) != length_grouped_batches(lengths, 4, 0, 1)
    assert sorted(i for b in a for i in b) == list(range(64))


TINY = TINY_DATA + ["--batch_size=4"]


def run(out, *args):
    tc, mc = train.parse_args([f"--out_dir={out}"] + TINY + list(args), train.TrainConfig())
    return train.train(tc, mc, quiet=True)


def test_stage1_then_stage2(data_dir, tmp_path):
    """Stage 1 trains the projector only (LLM and ViT stay bit-identical to the starting weights); stage 2
    starts from stage 1's export, trains everything, skips and reports the broken records."""
    from safetensors.torch import load_file, save_file
    from model import LLaDAV
    mc = tiny_toy_cfg()  # the model TINY's flags build
    torch.manual_seed(1)
    base = LLaDAV(mc)
    base.init_weights()
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    common = [f"--image_root={data_dir}", "--workers=2"]
    _, rep1 = run(tmp_path / "s1", "--stage=1", f"--data={data_dir / 'plain.json'}", *common, "--micro_batch_size=2",
                  f"--init_from={tmp_path / 'base.safetensors'}")
    assert rep1["steps"] == 3 and rep1["bad_samples"] == {"missing image": 1}  # 13 records // 4 = 3 steps, 1 epoch
    w0, w1 = base.state_dict(), load_file(str(tmp_path / "s1" / "model.safetensors"))
    for k in w0:
        same = torch.equal(w0[k], w1[k])
        assert same != k.startswith("projector."), k  # projector trained, everything else frozen
    _, rep2 = run(tmp_path / "s2", "--stage=2", f"--data={data_dir / 'conv.json'}", *common, "--max_bad_frac=0.5",
                  f"--init_from={tmp_path / 's1' / 'model.safetensors'}", "--checkpointing=1")
    w2 = load_file(str(tmp_path / "s2" / "model.safetensors"))
    proj = [k for k in w0 if k.startswith("projector.") and k.endswith("weight")]
    # stage 2 began at stage 1's projector: lr 1e-5 moves it by ~1e-5 a step, stage 1 moved it by ~1e-3
    assert max((w2[k] - w1[k]).abs().max().item() for k in proj) < 1e-4
    assert max((w1[k] - w0[k]).abs().max().item() for k in proj) > 5e-4
    assert all(not torch.equal(w2[k], w1[k]) for k in w0 if k.endswith("q_proj.weight"))  # LLM and ViT train
    assert sum(rep2["bad_samples"].values()) >= 1
    assert all(r.startswith("unreadable image") or r == "malformed record" for r in rep2["bad_samples"])
    # the exported ckpt.pt is what sample.py loads
    assert torch.load(tmp_path / "s2" / "ckpt.pt", weights_only=True)["config"]["lm"]["d_model"] == 64


def test_mostly_broken_data_stops_with_a_clear_message(tmp_path):
    recs = [{"id": str(i), "image": "nope.png", "conversations": [{"from": "human", "value": "<image>\n"},
                                                                  {"from": "gpt", "value": "x"}]} for i in range(8)]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    with pytest.raises(SystemExit, match="8 of 8 samples were bad.*missing image: 8.*--max_bad_frac"):
        run(tmp_path / "out", "--stage=1", f"--data={tmp_path / 'd.json'}", f"--image_root={tmp_path}", "--workers=0",
            "--micro_batch_size=4")
