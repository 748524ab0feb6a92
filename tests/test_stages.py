"""LLaDA-V's stages 2-3 as the official code trains them (ML-GSAI/LLaDA-V train/llava/mm_utils.py::process_anyres_image,
train/llava/model/llava_arch.py::prepare_inputs_labels_for_multimodal, train/llava/conversation.py (conv_llava_llada,
conv_llada_plain), train/llava/train/train.py (preprocess_llada, LazySupervisedDataset._get_item,
DataCollatorForSupervisedDataset, preprocess_multimodal), train/scripts/train_llada_v/*.sh,
train/scripts/llada_v_pretrain.sh): anyres_max_4 images with spatial_unpad and a trainable image_newline, pad mode for
multi-image records, no attention mask over the EOS padding, one sample per micro-batch in stages 2-3, random batches in
stage 1, the conversation edge cases and the planner's anyres counts. Tiny CPU configs: 64 px images cut into 16 px
patches (n = 4, n^2 = 16), an anyres grid of 64 px crops.

    python -m pytest -q tests/test_stages.py
"""
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train
from data import (IGNORE_INDEX, LlavaDataset, MicroBatches, collate_llava, length_grouped_batches, open_llava,
                  random_batches)
from diffusion import diffusion_loss, forward_process
from model import LLaDAV, get_config
from synthetic import toy_tokenizer
from tokenizer import IMAGE_TOKEN_INDEX
from conftest import TINY_DATA, TINY_MODEL, tiny_toy_cfg

torch.set_num_threads(1)
TOK = toy_tokenizer()
S, n = 64, 4  # toy preset: 64 px crops, 16 px patches

# Anyres counts worked out by hand at S = 64 (the 384 px rule scaled down), n^2 + h'(w' + 1) after unpad:
#   64x64:  grid 1x1 (64x64 canvas, no padding)             -> 4 x 4 map            -> 16 + 4 * 5  = 36, 2 crops
#   96x64:  grid 2 wide x 1 high (128x64: scale 1, no loss)  -> 4 x 8 map; the image fills int(96 * 4/64) = 6 of
#           the 8 columns, unpad keeps columns 1..6          -> 4 x 6               -> 16 + 4 * 7  = 44, 3 crops
#   64x160: grid 1 wide x 3 high (64x192)                    -> 12 x 4 map; the image fills int(160 * 4/64) = 10
#           of the 12 rows, unpad keeps rows 1..10           -> 10 x 4              -> 16 + 10 * 5 = 66, 4 crops
# A two-image record: each image padded to a square (pad mode), n^2 + 1 newline = 17 each (730 at 384 px).
SIZES = {(64, 64): (36, 2), (96, 64): (44, 3), (64, 160): (66, 4)}


def noise(w, h, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("stages")
    for k, (w, h) in enumerate(SIZES):
        noise(w, h, k).save(d / f"{w}x{h}.png")
    recs = [{"id": f"{w}x{h}", "image": f"{w}x{h}.png", "conversations": [
        {"from": "human", "value": "What is this? <image>"}, {"from": "gpt", "value": "a red square"}]} for w, h in SIZES]
    recs.append({"id": "two", "image": ["96x64.png", "64x160.png"], "conversations": [
        {"from": "human", "value": "<image> and <image>: which is taller?"}, {"from": "gpt", "value": "the second"}]})
    (d / "conv.json").write_text(json.dumps(recs))
    return d


def dataset(d, mc, **kw):
    return LlavaDataset(str(d / "conv.json"), str(d), TOK, S, n * n, fmt="conv", system=None,
                        image_mode=mc.image_aspect_ratio, newline="unpad" in mc.mm_patch_merge_type, **kw)


def test_anyres_token_counts_per_image_and_pad_mode_for_two_images(data_dir):
    mc = tiny_toy_cfg(anyres=True)
    ds = dataset(data_dir, mc)
    ids = {r["id"]: i for i, r in enumerate(ds.records)}
    torch.manual_seed(0)
    model = LLaDAV(mc)
    model.init_weights()
    for (w, h), (tokens, crops) in SIZES.items():
        it = ds[ids[f"{w}x{h}"]]
        assert it["ids"].count(IMAGE_TOKEN_INDEX) == tokens, (w, h)
        assert it["pixels"].shape == (crops, 3, S, S) and it["layout"] == [(crops, (w, h), tokens)]
        with torch.no_grad():  # the model packs exactly as many rows as the dataset left placeholders
            assert model.encode_crops(it["pixels"], it["layout"]).shape == (tokens, 64)
    two = ds[ids["two"]]
    assert two["ids"].count(IMAGE_TOKEN_INDEX) == 2 * (n * n + 1)
    assert two["pixels"].shape == (2, 3, S, S) and [k for k, _, _ in two["layout"]] == [1, 1]
    # stage 1's square model: 16 tokens, one crop, no newline
    sq = dataset(data_dir, tiny_toy_cfg())[ids["96x64"]]
    assert sq["ids"].count(IMAGE_TOKEN_INDEX) == n * n and sq["pixels"].shape[0] == 1


def test_batched_tower_call_packs_each_image_and_image_newline_gets_a_gradient(data_dir):
    """One micro-batch holding all four records: one tower call over the 2 + 3 + 4 + 2 crops, then per image
    packing; the loss reaches image_newline, and each image's rows land in its own placeholders (the batch
    gives the same per-sample logits as each sample alone)."""
    mc = tiny_toy_cfg(anyres=True)
    ds = dataset(data_dir, mc)
    torch.manual_seed(0)
    model = LLaDAV(mc)
    model.init_weights()
    b = collate_llava([ds[i] for i in range(len(ds))], TOK.pad_id)
    assert b["pixels"].shape[0] == 2 + 3 + 4 + 2 and len(b["layout"]) == 5
    ids, labels, attn, kw = train.llava_inputs(b, mc, TOK.pad_id, "cpu", key_pad_mask=True, need_image=False)
    xt, masked, p_mask = forward_process(ids, labels, TOK.mask_id, generator=torch.Generator().manual_seed(0))
    loss = diffusion_loss(model(xt, output_positions=masked, **kw), labels, masked, p_mask)
    loss.backward()
    assert model.image_newline.grad is not None and model.image_newline.grad.abs().sum() > 0
    with torch.no_grad():  # batch vs one sample at a time (key mask on, so padding cannot change anything)
        full = model(ids, **kw)
        for i in range(len(ds)):
            one = collate_llava([ds[i]], TOK.pad_id)
            L = one["ids"].shape[1]
            alone = model(one["ids"], pixels=one["pixels"], image_layout=one["layout"])
            assert torch.allclose(full[i, :L], alone[0], atol=1e-4), i


def test_stage2_run_keeps_and_trains_image_newline(data_dir, tmp_path):
    """--stage=2 builds the anyres model, runs one sample per micro-batch, starts image_newline from the
    --init_from weights (our safetensors, or a Hugging Face directory as an official LLaDA-V is) and trains it."""
    from safetensors.torch import load_file, save_file

    from checkpoint import save_pretrained
    torch.manual_seed(3)
    base = LLaDAV(tiny_toy_cfg(anyres=True))
    base.init_weights()
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    save_pretrained(base, tmp_path / "hf")
    for src in (tmp_path / "base.safetensors", tmp_path / "hf"):
        out = tmp_path / f"run_{src.name}"
        tc, mc = train.parse_args([f"--out_dir={out}"] + TINY_DATA + [
            "--stage=2", f"--data={data_dir / 'conv.json'}", f"--image_root={data_dir}", "--workers=0",
            "--batch_size=4", "--lr=1e-3", "--warmup_ratio=0", "--warmup_steps=0", f"--init_from={src}"],
            train.TrainConfig())
        assert tc.micro_batch_size == 1 and mc.image_aspect_ratio == "anyres_max_4"
        _, rep = train.train(tc, mc, quiet=True)
        assert rep["steps"] == 1 and rep["bad_samples"] == {}
        w = load_file(str(out / "model.safetensors"))
        step = (w["image_newline"] - base.image_newline.detach()).abs().max().item()
        # kept (a fresh randn / sqrt(64) would be ~0.1 away) and trained (Adam's first step: ~lr)
        assert 0 < step < 1e-2, (src, step)


def official_loss(model, rows, mask_id, pad_id, draw, p_mask):
    """The official LLaDA-V collator + loss, transcribed: ids AND labels right-padded with EOS (126081; here the
    toy's pad id), no attention mask (prepare_inputs_labels_for_multimodal returns None); masked = the noise draw
    AND label != -100, masked positions read [MASK]; loss = sum over masked CE / p_mask / n_valid(sample), over
    the batch size, where n_valid counts every label != -100, the EOS pads included. -> (loss, ids, labels)."""
    L = max(len(r) for r, _ in rows)
    ids = torch.tensor([r + [pad_id] * (L - len(r)) for r, _ in rows])
    labels = torch.tensor([l + [pad_id] * (L - len(l)) for _, l in rows])
    masked = draw & (labels != -100)
    logits = model(torch.where(masked, mask_id, ids))  # attention over every position, pads included
    total = 0.0
    for b in range(len(rows)):
        ce = F.cross_entropy(logits[b][masked[b]].float(), labels[b][masked[b]], reduction="none")
        total = total + (ce / p_mask[b]).sum() / (labels[b] != -100).sum()
    return total / len(rows), ids, labels


def test_padding_follows_the_official_collator_by_default(tmp_path):
    recs = [{"id": "short", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "red"}]},
            {"id": "long", "conversations": [{"from": "human", "value": "Describe it in words please"},
                                             {"from": "gpt", "value": "a big red square and a blue circle"}]}]
    (tmp_path / "t.json").write_text(json.dumps(recs))
    tc, mc = train.parse_args([f"--data={tmp_path / 't.json'}", "--stage=1"] + TINY_MODEL, train.TrainConfig())
    assert train.key_mask_on(tc) is False and tc.pad_labels  # the defaults of a --data run
    ds = LlavaDataset(str(tmp_path / "t.json"), "", TOK, S, n * n, fmt="conv", system=None)
    items = [ds[0], ds[1]]
    b = collate_llava(items, TOK.pad_id, pad_labels=tc.pad_labels)
    torch.manual_seed(0)
    model = LLaDAV(mc)
    model.init_weights()
    ids, labels, attn, kw = train.llava_inputs(b, mc, TOK.pad_id, "cpu", train.key_mask_on(tc), need_image=False)
    assert kw["attention_mask"] is None and not attn.all()  # there is padding, and nothing hides it
    xt, masked, p_mask = forward_process(ids, labels, TOK.mask_id, generator=torch.Generator().manual_seed(1))
    assert masked[~attn].any()  # some EOS pads are noised targets
    with torch.no_grad():
        ours = diffusion_loss(model(xt, output_positions=masked, **kw), labels, masked, p_mask)
        want, ids_off, labels_off = official_loss(model, [(it["ids"], it["labels"]) for it in items], TOK.mask_id,
                                                  TOK.pad_id, masked, p_mask)
        assert torch.equal(ids, ids_off) and torch.equal(labels, labels_off)
        assert abs(ours.item() - want.item()) < 1e-5
        # the switch (this project's toy recipe): padding hidden from attention -> a different loss
        _, _, _, kw_on = train.llava_inputs(b, mc, TOK.pad_id, "cpu", True, need_image=False)
        hidden = diffusion_loss(model(xt, output_positions=masked, **kw_on), labels, masked, p_mask)
        assert abs(hidden.item() - ours.item()) > 1e-4
    toy, _ = train.parse_args([], train.TrainConfig())
    off, _ = train.parse_args([f"--data={tmp_path / 't.json'}", "--key_pad_mask=on"], train.TrainConfig())
    assert train.key_mask_on(toy) and train.key_mask_on(off)


def test_stage_presets_and_switches():
    tc, mc = train.parse_args(["--stage=1"], train.TrainConfig())
    assert not tc.group_by_length and mc.image_aspect_ratio == "square" and mc.mm_patch_merge_type == "flat"
    assert (tc.batch_size, tc.micro_batch_size) == (64, 16)  # 16 random captions per process, accumulation derived
    for stage in (2, 3):
        tc, mc = train.parse_args([f"--stage={stage}"], train.TrainConfig())
        assert tc.micro_batch_size == 1 and tc.group_by_length
        assert (mc.image_aspect_ratio, mc.mm_patch_merge_type) == ("anyres_max_4", "spatial_unpad")
        assert hasattr(LLaDAV(tiny_toy_cfg(anyres=True)), "image_newline")
    tc, mc = train.parse_args(["--stage=2", "--micro_batch_size=2", "--image_aspect_ratio=square",
                               "--truncation=whole_images"], train.TrainConfig())
    assert tc.micro_batch_size == 2 and mc.image_aspect_ratio == "square" and tc.truncation == "whole_images"
    tc, _ = train.parse_args(["--stage=1", "--group_by_length=1"], train.TrainConfig())
    assert tc.group_by_length
    tc, mc = train.parse_args([], train.TrainConfig())  # the toy keeps its square model
    assert mc.image_aspect_ratio == "square" and not hasattr(LLaDAV(tiny_toy_cfg()), "image_newline")
    for bad in ("--key_pad_mask=maybe", "--image_aspect_ratio=anyres", "--truncation=never"):
        with pytest.raises(SystemExit, match="use one of"):
            train.parse_args([bad], train.TrainConfig())


class _Numbers(torch.utils.data.Dataset):
    """Record i is one token i, of length len(i) = lengths[i]: enough for MicroBatches to batch and collate."""

    def __init__(self, lengths):
        self.lengths, self.tok = lengths, TOK

    def __len__(self):
        return len(self.lengths)

    def length(self, i):
        return self.lengths[i]

    def __getitem__(self, i):
        return {"ids": [i], "labels": [i], "pixels": None, "layout": []}


def official_step_micro_batches(index_stream, per_device, world, accum, step, rank):
    """HF Trainer + Accelerate, transcribed: the dataloader cuts the sampler's index stream into per-device
    batches; BatchSamplerShard gives batch k to process k mod world; a process's step is its next `accum`
    batches. -> the micro-batches of process `rank` at optimizer step `step`."""
    batches = [index_stream[j:j + per_device] for j in range(0, len(index_stream), per_device)]
    mine = batches[rank::world]
    return mine[step * accum:(step + 1) * accum]


@pytest.mark.parametrize("group", [False, True])
def test_stage1_micro_batch_is_fixed_and_accumulation_derived(monkeypatch, group):
    """Stage 1 at 1, 2 and 4 processes: 16 sequences per micro-batch (LLaDA-V's per_device_train_batch_size),
    accumulation 4, 2, 1, and each process's micro-batches are the official ones; so the micro-batches, hence
    their padding and the loss, are the same for every process count."""
    lengths = [1 + (i * 37) % 100 for i in range(200)]
    seen = {}
    for world in (1, 2, 4):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        tc, mc = train.parse_args(["--stage=1", f"--group_by_length={int(group)}"] + TINY_MODEL, train.TrainConfig())
        micro, accum = train.check_options(tc, mc, TOK, SimpleNamespace(world=world, rank=0))
        assert (micro, accum) == (16, 4 // world)
        order = length_grouped_batches(lengths, 64, 0, 0, micro) if group else random_batches(200, 64, 0, 0)
        stream = [i for b in order for i in b]  # the sampler's indices, whole global batches
        for rank in range(world):
            it = MicroBatches(_Numbers(lengths), 64, micro, world, rank, seed=0, workers=0,
                              group_by_length=group).iterate(0)
            for step in range(2):
                got = [next(it)["ids"][:, 0].tolist() for _ in range(accum)]
                assert got == official_step_micro_batches(stream, micro, world, accum, step, rank)
                seen.setdefault(world, set()).update((step, tuple(b)) for b in got)
    assert seen[1] == seen[2] == seen[4]
    monkeypatch.setenv("WORLD_SIZE", "8")  # 64 = 16 x 8 x 0.5: refused in one line, naming the two options
    with pytest.raises(SystemExit, match="--batch_size=64 must be a multiple of --micro_batch_size=16 x 8"):
        train.parse_args(["--stage=1"], train.TrainConfig())


def hf_cosine_lr(step, lr, total, warmup_ratio):
    """transformers' TrainingArguments.get_warmup_steps + get_cosine_schedule_with_warmup, transcribed (the
    scheduler LLaDA-V's stage scripts pick with --lr_scheduler_type cosine --warmup_ratio 0.03)."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_schedule_is_hf_cosine_with_warmup(stage):
    """The stage presets' lr at every step == HF's schedule: warmup from 0 over ceil(3%) of the steps (the old
    round gave 70 warmup steps at 2,345 steps, ceil 71, and began at lr / warmup), then the cosine to 0. The toy
    keeps its own warmup (its first step at lr / warmup)."""
    tc, _ = train.parse_args([f"--stage={stage}"], train.TrainConfig())
    for total in (1, 7, 34, 1000, 2345):
        tc.max_steps = total
        tc.warmup_steps = train.warmup_of(tc)
        got = [train.lr_at(s, tc) for s in range(total)]
        want = [hf_cosine_lr(s, tc.lr, total, 0.03) for s in range(total)]
        assert got == pytest.approx(want, abs=1e-12 * tc.lr), total
        assert got[0] == 0.0
    toy, _ = train.parse_args([], train.TrainConfig())
    assert train.warmup_of(toy) == toy.warmup_steps == 100 and train.lr_at(0, toy) == toy.lr / 100


def test_stage_max_len_raises_max_seq_len(tmp_path):
    """--stage=N --max_len above the model's lm.max_seq_len raises it, so LLaDA-V's 16384-token runs are reached
    (it was capped to 8192 without a word); an explicit lower --lm.max_seq_len is refused in one line; the toy
    keeps its 256. The official cut: at model_max_length, after the image features are in."""
    _, mc = train.parse_args(["--stage=3", "--preset=llada_v_8b", "--max_len=16384"], train.TrainConfig())
    assert mc.lm.max_seq_len == 16384
    _, mc = train.parse_args(["--stage=2", "--preset=llada_v_8b"], train.TrainConfig())
    assert mc.lm.max_seq_len == 8192
    with pytest.raises(SystemExit, match="--max_len=16384 is above --lm.max_seq_len=8192"):
        train.parse_args(["--stage=3", "--preset=llada_v_8b", "--max_len=16384", "--lm.max_seq_len=8192"],
                         train.TrainConfig())
    assert train.parse_args([], train.TrainConfig())[1].lm.max_seq_len == 256
    words = " ".join(["red"] * 400)  # about 400 tokens of the toy's vocabulary, more than the toy's 256
    (tmp_path / "long.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "Say red."},
                                                                       {"from": "gpt", "value": words}]}] * 2))
    tc, mc = train.parse_args([f"--data={tmp_path / 'long.json'}", "--stage=2", "--max_len=300", "--batch_size=2"]
                              + TINY_MODEL, train.TrainConfig())
    ds = open_llava(tc, mc, TOK, 1, 0, 1)[0].ds
    full = LlavaDataset(str(tmp_path / "long.json"), "", TOK, S, n * n, max_len=10 ** 6)[0]["ids"]
    assert len(full) > 300 and ds[0]["ids"] == full[:300]  # official: x[:model_max_length]


def test_conversation_edge_cases(tmp_path):
    """ML-GSAI/LLaDA-V train/llava/train/train.py (preprocess_multimodal, preprocess_llada): one "<image>" in a turn
    moves to its front as "<image>\\n" + the stripped rest (unless the turn already starts with it); other text is kept
    as is; a leading gpt turn is dropped; an image whose record has no tag gives no features; a later system turn is a
    system message; a first one is a bad sample."""
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    conv = lambda *turns: [{"from": f, "value": v} for f, v in turns]
    recs = [{"id": "move", "image": "a.png", "conversations": conv(("gpt", "Hello."), ("human", "What is this?  <image> "),
                                                                   ("gpt", "red "), ("human", "Sure? "), ("gpt", "yes"))},
            {"id": "first", "image": "a.png", "conversations": conv(("human", "<image>What?"), ("gpt", "red"))},
            {"id": "untagged", "image": "a.png", "conversations": conv(("human", "What?"), ("gpt", "red"))},
            {"id": "system", "conversations": conv(("system", "Be brief."), ("human", "Hi"), ("gpt", "hi"))},
            {"id": "later", "conversations": conv(("human", "Hi"), ("system", "Be brief."), ("gpt", "hi"))}]
    (tmp_path / "e.json").write_text(json.dumps(recs))
    ds = LlavaDataset(str(tmp_path / "e.json"), str(tmp_path), TOK, S, n * n, fmt="conv", system=None,
                      unignore_special=False)

    def text(it):  # the sequence with each image's placeholders shown as one "<image>"
        ids = [t for k, t in enumerate(it["ids"]) if t != IMAGE_TOKEN_INDEX or it["ids"][k - 1] != IMAGE_TOKEN_INDEX]
        return "".join("<image>" if t == IMAGE_TOKEN_INDEX else TOK.decode([t]) for t in ids)

    H = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"
    move = ds[0]
    assert text(move) == ("<|startoftext|>" + H("user") + "<image>\nWhat is this?<|eot_id|>" + H("assistant")
                          + "red <|eot_id|>" + H("user") + "Sure? <|eot_id|>" + H("assistant") + "yes<|eot_id|>")
    assert move["ids"].count(IMAGE_TOKEN_INDEX) == n * n
    targets = TOK.decode([t for t, l in zip(move["ids"], move["labels"]) if l != IGNORE_INDEX])
    assert "Hello" not in targets and targets.startswith(H("assistant") + "red ")
    assert text(ds[1]) == "<|startoftext|>" + H("user") + "<image>What?<|eot_id|>" + H("assistant") + "red<|eot_id|>"
    untagged = ds[2]
    assert IMAGE_TOKEN_INDEX not in untagged["ids"] and untagged["pixels"] is None and untagged["layout"] == []
    assert ds[3] == {"error": "system turn first"}
    assert text(ds[4]) == ("<|startoftext|>" + H("user") + "Hi<|eot_id|>" + H("system") + "Be brief.<|eot_id|>"
                           + H("assistant") + "hi<|eot_id|>")


def test_official_truncation_cuts_through_an_anyres_image(tmp_path):
    """max_len falls inside the 64x160 image (66 tokens) of the second turn: the sample keeps the image's first
    40 rows (the model packs all 66 and keeps those, ML-GSAI/LLaDA-V
    train/llava/model/llava_arch.py::prepare_inputs_labels_for_multimodal); with whole_images the cut moves to just
    before the image and the image is dropped."""
    noise(64, 160, 0).save(tmp_path / "tall.png")
    turns = [("human", "Hi"), ("gpt", "hello"), ("human", "<image>"), ("gpt", "a tall one")]
    (tmp_path / "cut.json").write_text(json.dumps([{"id": "cut", "image": "tall.png", "conversations": [
        {"from": f, "value": v} for f, v in turns]}]))
    mc = tiny_toy_cfg(anyres=True)
    make = lambda **kw: LlavaDataset(str(tmp_path / "cut.json"), str(tmp_path), TOK, S, n * n, fmt="conv",
                                     system=None, image_mode="anyres_max_4", newline=True, **kw)[0]
    full = make()
    start = full["ids"].index(IMAGE_TOKEN_INDEX)
    assert full["ids"].count(IMAGE_TOKEN_INDEX) == 66
    cut = make(max_len=start + 40)
    assert cut["ids"] == full["ids"][:start + 40] and cut["layout"] == [(4, (64, 160), 40)]
    torch.manual_seed(0)
    model = LLaDAV(mc)
    model.init_weights()
    with torch.no_grad():
        part = model.encode_crops(cut["pixels"], cut["layout"])
        whole = model.encode_crops(full["pixels"], full["layout"])
    assert part.shape == (40, 64) and torch.equal(part, whole[:40])
    safe = make(max_len=start + 40, truncation="whole_images")
    assert safe["ids"] == full["ids"][:start] and safe["pixels"] is None and safe["layout"] == []


def test_planner_counts_anyres_tokens():
    from tools import plan
    vc = get_config("llada_v_8b").vision
    assert plan.image_tokens(vc, 2, (640, 480)) == (2929, 5) and plan.image_tokens(vc, 3, (384, 384)) == (1485, 2)
    assert plan.image_tokens(vc, 1, (640, 480)) == (729, 1)
    a = plan.estimate("llada_v_8b", world=8, stage=2, image=(640, 480))
    b = plan.estimate("llada_v_8b", world=8, stage=2, image=(384, 384))
    one = plan.estimate("llada_v_8b", world=8, stage=2)  # one crop per image
    # the ViT's activations grow with the crops: (5 - 2) crops = 3 x (2 - 1) crop
    assert a["activations"] > b["activations"] > one["activations"]
    assert abs((a["activations"] - b["activations"]) - 3 * (b["activations"] - one["activations"])) < 1e-6 * a["activations"]
