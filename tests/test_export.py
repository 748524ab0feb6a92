"""One export, one answer path (issue 25): every LLaDA-V run ends with out_dir/hf, a Hugging Face folder in the
official format (checkpoint.export_hf), and sample.py answers out_dir, out_dir/ckpt.pt and out_dir/hf alike: the
image packing the model trained with, the LLaDA-V decoding rules for a model trained on LLaVA data, the toy's own
defaults for the toy. Also the text-LLaDA defaults and [MASK] rule of sample.load, and two error messages.
Tiny CPU runs: the toy preset at 64 / 32 wide, one or two steps.

    python -m pytest -q tests/test_export.py
"""
import json

import pytest
import torch
from PIL import Image

import sample
import train
from checkpoint import from_pretrained, read_header, save_pretrained
from data import LlavaDataset, collate_llava
from synthetic import toy_tokenizer
from tokenizer import IMAGE_TOKEN_INDEX
from vision import num_tokens
from conftest import TINY_DATA, run_train, tiny_llm

torch.set_num_threads(1)
TOK = toy_tokenizer()
SIZES = [(64, 64), (96, 64), (64, 160)]  # three shapes: 1x1, 2x1 and 1x3 anyres grids at 64 px crops


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_data")
    for k, (w, h) in enumerate(SIZES):
        g = torch.Generator().manual_seed(k)
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(d / f"{w}x{h}.png")
    recs = [{"id": f"{w}x{h}", "image": f"{w}x{h}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "a red square"}]} for w, h in SIZES]
    (d / "conv.json").write_text(json.dumps(recs))
    return d


@pytest.fixture(scope="module")
def stage2(data_dir, tmp_path_factory):
    """A one-step --stage=2 run (anyres_max_4 + spatial_unpad, a DCP run: its ckpt.pt is export's) -> (out, model)."""
    out = tmp_path_factory.mktemp("export_run") / "s2"
    tc, mc = train.parse_args([f"--out_dir={out}"] + TINY_DATA + [
        "--stage=2", f"--data={data_dir / 'conv.json'}", f"--image_root={data_dir}", "--workers=0", "--batch_size=3",
        "--max_steps=1", "--lr=1e-3", "--warmup_ratio=0", "--warmup_steps=0"], train.TrainConfig())
    model, rep = train.train(tc, mc, quiet=True)
    assert rep["steps"] == 1 and rep["bad_samples"] == {}
    return out, model.eval()


def test_stage2_export_is_an_official_folder_with_the_same_logits(stage2, data_dir):
    out, model = stage2
    hf = out / "hf"
    c = json.loads((hf / "config.json").read_text())
    assert c["model_type"] == "llava_llada" and c["architectures"] == ["LlavaLLaDAModelLM"]
    assert (c["image_aspect_ratio"], c["mm_patch_merge_type"]) == ("anyres_max_4", "spatial_unpad")
    keys = read_header(hf / "model.safetensors")[0]
    assert {"model.image_newline", "model.layers.0.self_attn.q_proj.weight", "model.mm_projector.0.weight",
            "lm_head.weight"} <= set(keys) and not any(k.startswith(("llm.", "vision.")) for k in keys)
    assert json.loads((hf / "toy_tokenizer.json").read_text()) == TOK.to_dict()  # the tokenizer it trained with
    assert json.loads((hf / "train_config.json").read_text())["data"] == str(data_dir / "conv.json")
    loaded = from_pretrained(hf)
    ds = LlavaDataset(str(data_dir / "conv.json"), str(data_dir), TOK, 64, 16, fmt="conv", system=None,
                      image_mode="anyres_max_4", newline=True)
    one = collate_llava([ds[2]], TOK.pad_id)  # the 64 x 160 image: 4 crops, 66 visual tokens
    with torch.no_grad():
        want = model(one["ids"], pixels=one["pixels"], image_layout=one["layout"])
        got = loaded(one["ids"], pixels=one["pixels"], image_layout=one["layout"])
    assert torch.equal(want, got)


def record_generate(monkeypatch, answer_ids=None):
    """sample.generate replaced by a recorder -> the list of (prompt ids, kwargs) of each call. It answers
    `answer_ids` (LLaDA-V's official path gets a list of answers), or, given None, the prompt plus EOS."""
    calls = []

    def fake(fn, ids, **kw):
        calls.append((ids.clone(), kw))
        kw["stats"].update(nfe=1, full_nfe=1)  # what answer() adds up
        if answer_ids is not None:
            return [list(answer_ids)] * ids.shape[0]
        return torch.cat([ids, torch.full((ids.shape[0], kw["gen_length"]), kw["eos_id"])], 1)
    monkeypatch.setattr(sample, "generate", fake)
    return calls


def test_run_folder_ckpt_and_hf_are_answered_alike_and_as_trained(stage2, data_dir, monkeypatch, capsys):
    """Each of the three --checkpoint forms feeds the model the visual-token count the dataset trained it on
    for the image (66 for 64 x 160), the same prompt and the same image features, under LLaDA-V's rules."""
    out, _ = stage2
    calls = record_generate(monkeypatch, TOK.encode("red"))
    image = data_dir / "64x160.png"
    for ckpt in (out, out / "ckpt.pt", out / "hf"):
        sample.main([f"--checkpoint={ckpt}", f"--image={image}", "--question=What is this?"])
    assert capsys.readouterr().out.count("answer:   red") == 3
    ds = LlavaDataset(str(data_dir / "conv.json"), str(data_dir), TOK, 64, 16, fmt="conv", system=None,
                      image_mode="anyres_max_4", newline=True)
    trained = ds[2]["ids"].count(IMAGE_TOKEN_INDEX)
    assert trained == num_tokens((64, 160), "anyres_max_4", True, 64, 16) == 66
    (ids0, kw0), *rest = calls
    assert (ids0 == IMAGE_TOKEN_INDEX).sum() == trained == kw0["image_features"].shape[0]
    for ids, kw in rest:
        assert torch.equal(ids, ids0) and torch.equal(kw["image_features"], kw0["image_features"])
    for _, kw in calls:  # LLaDA-V's decoding rules and lengths (generate_demo.py: 128 / 128 / 128)
        assert kw["banned_ids"] == (TOK.eos_id, TOK.bos_id, TOK.start_header_id, TOK.end_header_id)
        assert kw["stop_sequences"] == [TOK.encode("<|eot_id|>")]
        assert (kw["gen_length"], kw["steps"], kw["block_length"]) == (128, 128, 128)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A plain `python train.py` run (synthetic data, a pt run), 2 steps, its report off."""
    out = tmp_path_factory.mktemp("export_toy") / "toy"
    run_train(out, "--max_steps=2", "--eval_final=0")
    return out


def test_toy_export_is_answered_with_the_toys_defaults(toy_run, monkeypatch, capsys):
    hf = toy_run / "hf"
    assert (hf / "toy_tokenizer.json").is_file() and not (hf / "tokenizer.json").exists()
    sc = sample.parse_config(sample.SampleConfig, [f"--checkpoint={hf}"])
    model, tok, official, defaults = sample.load(sc, torch.device("cpu"))
    assert not official and model.cfg.tokenizer == "toy" and tok.to_dict() == TOK.to_dict()
    assert {k: defaults[k] for k in ("gen_length", "steps", "block_length")} == dict(
        gen_length=12, steps=12, block_length=12)  # TINY_TRAIN's, not the official 128
    calls = record_generate(monkeypatch)
    for ckpt in (toy_run, hf):
        sample.main([f"--checkpoint={ckpt}", "--seed=3"])
    assert torch.equal(calls[0][0], calls[1][0]) and all("banned_ids" not in kw for _, kw in calls)
    assert torch.equal(calls[0][1]["image_features"], calls[1][1]["image_features"])
    text = capsys.readouterr().out
    assert text.count("question:") == 2 and "gen_length 12, block_length 12" in text


def test_official_vocabulary_travels_into_hf(tmp_path):
    """A run with --tokenizer=<tokenizer.json> exports that very file, and sample.load answers with it."""
    from test_tokenizer import build_tokenizer_json  # skips without the `tokenizers` package
    build_tokenizer_json(tmp_path / "tokenizer.json", split_regex=True)
    out = tmp_path / "run"
    run_train(out, "--max_steps=1", "--eval_final=0", f"--tokenizer={tmp_path / 'tokenizer.json'}",
              "--lm.vocab_size=768", "--gen_length=48", "--block_length=48", "--sample_steps=48", "--lm.max_seq_len=512")
    assert (out / "hf" / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    assert not (out / "hf" / "toy_tokenizer.json").exists()
    sc = sample.parse_config(sample.SampleConfig, [f"--checkpoint={out / 'hf'}"])
    model, tok, official, _ = sample.load(sc, torch.device("cpu"))
    assert not official and model.cfg.tokenizer != "toy" and tok.encode("def f(x):") != TOK.encode("def f(x):")


# ----------------------------------------------------------------------------------------------
# Text LLaDA (a Hugging Face folder without a vision tower): the official defaults and the [MASK] rule

# ML-GSAI/LLaDA chat.py, transcribed: gen_length = 128, steps = 128, generate(..., block_length=32), the model
# loaded with torch_dtype=torch.bfloat16 (generate.py's main uses the same 128 / 128 / 32).
LLADA_CHAT = dict(gen_length=128, steps=128, block_length=32, cuda_dtype=torch.bfloat16)


def _tokenizer_json(path):
    """A byte-level BPE tokenizer.json: the 256 bytes, no merges, LLaDA's special tokens at ids 256..."""
    from tokenizer import SPECIAL_TOKENS, bytes_to_unicode
    vocab = {c: b for b, c in bytes_to_unicode().items()}
    added = [{"id": 256 + i, "content": s, "special": True} for i, s in enumerate(SPECIAL_TOKENS)]
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": added,
                                "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}))
    return path


@pytest.fixture
def text_llada(tmp_path):
    """An iLLaDA-like text LLaDA folder: config.json's mask_token_id is 5, and a tokenizer.json beside it (whose
    <|mdm_mask|> is another id)."""
    save_pretrained(tiny_llm(vocab_size=320, max_seq_len=512), tmp_path / "m")
    c = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(c, mask_token_id=5)))
    return tmp_path / "m", _tokenizer_json(tmp_path / "tokenizer.json")


def test_text_llada_defaults_are_the_official_chat_ones(text_llada, monkeypatch):
    folder, tok_json = text_llada
    assert sample.OFFICIAL["llada"] == LLADA_CHAT
    assert sample.inference_dtype("auto", torch.device("cuda"), "llada") == torch.bfloat16
    assert sample.inference_dtype("auto", torch.device("cuda"), "llada_v") == torch.float16  # LLaDA-V's builder.py
    calls = record_generate(monkeypatch)
    sample.main([f"--checkpoint={folder}", f"--tokenizer={tok_json}", "--question=hi"])
    kw = calls[0][1]
    assert (kw["gen_length"], kw["steps"], kw["block_length"]) == (128, 128, 32)


def test_text_llada_mask_id_comes_from_its_config(text_llada, monkeypatch):
    """--tokenizer=<a tokenizer.json file> for a folder whose config.json says mask_token_id 5: the sampler's
    [MASK] is 5, the id the model was trained with, not the file's <|mdm_mask|> (258)."""
    folder, tok_json = text_llada
    calls = record_generate(monkeypatch)
    sample.main([f"--checkpoint={folder}", f"--tokenizer={tok_json}", "--question=hi", "--gen_length=8",
                 "--steps=8", "--block_length=8"])
    assert calls[0][1]["mask_id"] == 5


# ----------------------------------------------------------------------------------------------
# Two messages that named the wrong cause (issue 26, item 8)

def test_max_len_that_cuts_every_answer_names_max_len(data_dir, tmp_path):
    (tmp_path / "plain.json").write_text(json.dumps([{"id": str(i), "image": f"{w}x{h}.png", "conversations": [
        {"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "noise"}]} for i, (w, h) in enumerate(SIZES * 2)]))
    tc, mc = train.parse_args([f"--out_dir={tmp_path / 'out'}"] + TINY_DATA + [
        "--stage=1", f"--data={tmp_path / 'plain.json'}", f"--image_root={data_dir}", "--workers=0",
        "--micro_batch_size=2", "--batch_size=2", "--max_len=5", "--max_steps=1"], train.TrainConfig())
    with pytest.raises(SystemExit, match=r"no answer left within max_len=5 tokens: \d"):
        train.train(tc, mc, quiet=True)


def test_eval_choice_with_mc_num_below_the_internal_batch(toy_run, monkeypatch, capsys):
    """--mc_num=5: evaluate_choice's Monte-Carlo batch (16 copies per pass) becomes a divisor of 5, instead of
    failing with "mc_num=5 must be a multiple of batch_size=16" (a batch the user never set)."""
    real, seen = sample.choose, []
    monkeypatch.setattr(sample, "choose", lambda *a, **kw: seen.append(kw["batch_size"]) or real(*a, **kw))
    sample.main([f"--checkpoint={toy_run / 'ckpt.pt'}", "--eval_choice", "--mc_num=5", "--n=6"])
    assert seen and set(seen) == {5} and "mc_num 5" in capsys.readouterr().out
