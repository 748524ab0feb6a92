"""LoRA (model.LoRALinear, model.add_lora) and its adapters in PEFT's format (checkpoint.save_adapter /
load_adapter / merged_state): the adapted model starts exactly at the base, only A and B train, the merge
gives the adapter's logits, save -> load is bit-exact, train.py --lora_rank trains adapters only and resumes
bit-exactly, and PEFT (a test-only dependency) computes the same logits with our adapter and gives us its own.

    python -m pytest -q tests/test_lora.py
"""
import json

import pytest
import torch

import checkpoint
import sample
from conftest import TINY_DATA, run_train, tiny_cfg, tiny_llada_v, tiny_llm, tiny_toy_cfg
from model import LLaDA, LLaDAV, LoRALinear, add_lora

torch.set_num_threads(1)
ALL = "q,k,v,o,gate,up,down,vision,projector"


def _inputs(seed=0):
    """ids (2, 10) with one 4-patch image each (the tiny ViT's 2 x 2 patches), pixels (2, 3, 16, 16)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 60, (2, 10), generator=g)
    ids[:, 2:6] = -200  # IMAGE_TOKEN_INDEX
    return ids, torch.randn(2, 3, 16, 16, generator=g)


def _perturb(model, seed=1):
    """Random B (and A) for every adapter: a trained-looking adapter whose update B A is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_starts_at_the_base_model_and_only_adapters_get_gradients():
    model = tiny_llada_v()
    ids, px = _inputs()
    with torch.no_grad():
        base = model(ids, px)
    wrapped = add_lora(model, r=4, alpha=8, targets=ALL)
    # 7 projections x 2 LM layers, 6 linears x 1 ViT layer (the last is not built), the projector's 2
    assert len(wrapped) == 14 + 6 + 2 and all(isinstance(model.get_submodule(n), LoRALinear) for n in wrapped)
    assert "llm.lm_head" not in wrapped and not any(n.startswith("vision.") for n in add_lora(tiny_llada_v(), 4, 8))
    with torch.no_grad():
        assert torch.equal(model(ids, px), base)  # B = 0: exactly the base model's logits
    model(ids, px).square().mean().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {n for n, _ in model.named_parameters() if ".lora_" in n} and len(got) == 2 * len(wrapped)
    assert all(model.get_submodule(n).lora_B.weight.grad.abs().sum() > 0 for n in wrapped)  # dL/dB = g (A x)^T
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trained < 0.2 * sum(p.numel() for p in model.parameters())


def test_merge_gives_the_adapters_logits(tmp_path):
    model = tiny_llada_v()
    add_lora(model, r=4, alpha=8, targets=ALL)
    _perturb(model)
    ids, px = _inputs()
    with torch.no_grad():
        adapted = model(ids, px)
        merged = tiny_llada_v(seed=5)
        merged.load_state_dict(checkpoint.merged_state(model))
        m32 = merged(ids, px)
        assert (m32 - adapted).abs().max() < 1e-5  # fp32: W x + s B (A x) and (W + s B A) x round apart
        merged.double().load_state_dict(checkpoint.merged_state(model.double()))  # in fp64 the two are one map
        assert (merged(ids, px.double()) - model(ids, px.double())).abs().max() < 1e-6
        model.float()
        assert (tiny_llada_v()(ids, px) - adapted).abs().max() > 1e-2  # the adapter does change the model
        checkpoint.save_pretrained(model, tmp_path / "merged")  # the merge as a Hugging Face folder
        back = checkpoint.from_pretrained(tmp_path / "merged")
        assert not any(".lora_" in k for k in back.state_dict())
        assert torch.equal(back(ids, px), m32)  # the folder holds exactly the merged weights


def test_adapter_save_load_is_bit_exact_in_peft_names(tmp_path):
    model = tiny_llada_v()
    add_lora(model, r=4, alpha=8, targets=ALL)
    _perturb(model)
    checkpoint.save_adapter(model, tmp_path, base_model="GSAI-ML/LLaDA-V")
    c = json.load(open(tmp_path / "adapter_config.json"))
    assert (c["peft_type"], c["r"], c["lora_alpha"], c["bias"], c["base_model_name_or_path"]) == ("LORA", 4, 8, "none", "GSAI-ML/LLaDA-V")
    assert "model.layers.1.mlp.down_proj" in c["target_modules"] and "model.mm_projector.0" in c["target_modules"]
    keys = checkpoint.load_state_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    back = checkpoint.load_adapter(tiny_llada_v(), tmp_path)
    for (n, a), (m, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    ids, px = _inputs()
    with torch.no_grad():
        assert torch.equal(back.eval()(ids, px), model.eval()(ids, px))
    with pytest.raises(ValueError, match="mis-shaped tensor.s., adapter vs model"):  # another base: one line
        checkpoint.load_adapter(LLaDAV(tiny_cfg(d_model=64)), tmp_path)


def test_train_lora_from_a_toy_checkpoint_resumes_bit_exactly_and_samples(tmp_path):
    run_train(tmp_path / "base", "--max_steps=2")
    base = checkpoint.load_checkpoint(tmp_path / "base" / "ckpt.pt")[0]
    lora = ["--init_from=" + str(tmp_path / "base" / "ckpt.pt"), "--lora_rank=4", "--lora_alpha=8", "--lr=1e-2"]
    straight, _ = run_train(tmp_path / "a", "--max_steps=4", *lora)
    sd, before = straight.state_dict(), base.state_dict()
    assert all(torch.equal(sd[k], before[k]) for k in before)  # the base is untouched: adapters only trained
    assert all(sd[k].abs().sum() > 0 for k in sd if ".lora_B" in k)
    assert (tmp_path / "a" / "adapter_config.json").exists() and (tmp_path / "a" / "adapter_model.safetensors").exists()
    run_train(tmp_path / "b", "--max_steps=2", *lora)
    resumed, _ = run_train(tmp_path / "b", "--max_steps=4", "--resume=1", "--resume_changed=1", *lora)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    # the sampler: the base + --adapter, and the run folder itself (its ckpt.pt holds base and adapters)
    ids = torch.randint(0, 400, (2, 20), generator=torch.Generator().manual_seed(0))
    ids[:, 2:18] = -200  # the toy's 64-pixel image: 4 x 4 patches
    px = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = straight.eval()(ids, px)
        assert (base.eval()(ids, px) - want).abs().max() > 1e-4  # the adapters changed the model
        for ck, ad in ((tmp_path / "base" / "ckpt.pt", tmp_path / "a"), (tmp_path / "a", "")):
            m = sample.load(sample.SampleConfig(checkpoint=str(ck), adapter=str(ad)), torch.device("cpu"))[0]
            assert torch.equal(m(ids, px), want)


def test_stage3_with_lora_from_a_hugging_face_folder(tmp_path):
    """--stage=3 --lora_rank on LLaVA-format data, from a Hugging Face folder (as an official LLaDA-V is):
    only the LM's adapters move; the export is the merged model and the adapter names its base."""
    from PIL import Image
    from safetensors.torch import load_file
    import train
    g = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (48, 80, 3), generator=g, dtype=torch.uint8).numpy()).save(tmp_path / "a.png")
    (tmp_path / "conv.json").write_text(json.dumps([{"id": str(i), "image": "a.png", "conversations": [
        {"from": "human", "value": "What is this? <image>"}, {"from": "gpt", "value": "a red square"}]} for i in range(4)]))
    torch.manual_seed(3)
    base = LLaDAV(tiny_toy_cfg(anyres=True))
    base.init_weights()
    checkpoint.save_pretrained(base, tmp_path / "hf")
    tc, mc = train.parse_args([f"--out_dir={tmp_path / 'out'}"] + TINY_DATA + [
        "--stage=3", f"--data={tmp_path / 'conv.json'}", f"--image_root={tmp_path}", "--workers=0", "--batch_size=2",
        "--max_steps=2", "--lr=1e-2", "--warmup_ratio=0", "--warmup_steps=0", f"--init_from={tmp_path / 'hf'}",
        "--lora_rank=4"], train.TrainConfig())
    model, _ = train.train(tc, mc, quiet=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters() if ".lora_" in n}
    merged, before = load_file(str(tmp_path / "out" / "model.safetensors")), base.state_dict()
    assert set(merged) == set(before)  # the merged export: the base's keys, no lora_ ones
    moved = {k for k in before if not torch.equal(merged[k], before[k])}
    assert moved and all(k.startswith("llm.layers.") and k.endswith("_proj.weight") for k in moved), moved
    assert json.load(open(tmp_path / "out" / "adapter_config.json"))["base_model_name_or_path"] == str(tmp_path / "hf")


def _llama_pair(tmp_path):
    """Our tiny text LLaDA and LlamaForCausalLM loaded from our save_pretrained of it (the LLaMA layout)."""
    transformers = pytest.importorskip("transformers", reason="PEFT parity needs `pip install transformers`")
    ours = tiny_llm(seed=3)
    checkpoint.save_pretrained(ours, tmp_path / "base")
    c = json.load(open(tmp_path / "base" / "config.json"))
    c.update(pad_token_id=None, bos_token_id=None, eos_token_id=None)  # LLaDA's ids do not fit a 64-token vocab
    json.dump(c, open(tmp_path / "base" / "config.json", "w"))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    return ours, hf


def test_peft_parity_both_ways(tmp_path):
    """PEFT's LoRA on LlamaForCausalLM with our adapter gives our logits (bidirectional mask, 1e-5); an adapter
    PEFT saved loads into ours with the same result."""
    peft = pytest.importorskip("peft", reason="PEFT parity needs `pip install peft` (.ci/run installs it)")
    ours, hf = _llama_pair(tmp_path)
    add_lora(ours, r=4, alpha=8)
    _perturb(ours)
    checkpoint.save_adapter(ours, tmp_path / "ours_adapter", base_model=str(tmp_path / "base"))
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    full = torch.ones(2, 1, 12, 12, dtype=torch.bool)  # every token sees every token: LLaDA's attention
    with torch.no_grad():
        want = ours.eval()(ours.embed_tokens(ids))
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "ours_adapter").eval()
        assert (peft_model(input_ids=ids, attention_mask=full).logits - want).abs().max() < 1e-5
    # the other way: PEFT makes and saves an adapter (only q and v), ours loads it
    _, hf2 = _llama_pair(tmp_path / "2")
    pm = peft.get_peft_model(hf2, peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        ref = pm.eval()(input_ids=ids, attention_mask=full).logits
    pm.save_pretrained(tmp_path / "peft_adapter")
    mine = checkpoint.load_adapter(tiny_llm(seed=3), tmp_path / "peft_adapter")
    assert sum(isinstance(m, LoRALinear) for m in mine.modules()) == 4  # q, v of 2 layers
    with torch.no_grad():
        assert (mine(mine.embed_tokens(ids)) - ref).abs().max() < 1e-5
        assert (tiny_llm(seed=3)(mine.embed_tokens(ids)) - ref).abs().max() > 1e-3


def test_planner_lora_rows_and_their_cpu_check():
    """tools/plan.py with LoRA: the estimate is within 25% of a measured CPU step (the toy, checkpointing off
    and on; the 8B's widths at depth 2 take two minutes: `python -m tools.plan --validate=1 --lora_rank=1`), and
    the 8B's stage 3 on one GPU: a bf16 frozen base, adapters and AdamW, far below full fine-tuning's need."""
    from tools import plan
    for preset, ckpt, est, got, err in plan.validate(plan.LORA_CASES[:2], say=lambda *a: None):
        assert abs(err) < 0.25, (preset, ckpt, est, got)
    kw = dict(world=1, seq=8192, stage=3, parallel="none", checkpointing=True, image=(640, 480))
    lora, full = plan.estimate("llada_v_8b", lora_rank=64, **kw), plan.estimate("llada_v_8b", **kw)
    _, c = plan.counts("llada_v_8b", lora_rank=64)
    assert 0.005 < c["lora"] / c["total"] < 0.05
    # a bf16 base 2 (P - T), fp32 adapters 4 T, and autocast's bf16 copies of them 2 T
    assert abs(lora["parameters"] - 2 * c["total"] - 4 * c["lora"]) < 1e6
    # 8192 tokens: just over a 24 GB GPU's 90% (4096 fit), well inside 48 GB; full fine-tuning needs > 80 GB
    assert 0.9 * 24 < lora["peak"] / plan.GB < 0.9 * 48 and full["peak"] / plan.GB > 2 * 80
    assert plan.estimate("llada_v_8b", lora_rank=64, **dict(kw, seq=4096))["peak"] / plan.GB < 0.9 * 24
