"""Tests for checkpoint.py: synthetic checkpoints written with the official key names (ML-GSAI/LLaDA-V
train/llada_v_prepare/rename_checkpoint.py, train/llava/model/multimodal_encoder/siglip_encoder.py,
train/llava/model/multimodal_projector/builder.py::build_vision_projector,
train/llava/model/llava_arch.py::LlavaMetaModel; google/siglip2-so400m-patch14-384 config.json) in each layout load,
give the same logits (also against a reference forward written from the official names), survive save -> load
bit-exactly, and a damaged one gets one error naming every bad key.

    python -m pytest -q tests/test_checkpoint.py
"""
import os
import sys
import json
import math

import pytest
import torch

torch.set_num_threads(1)
import torch.nn.functional as F
from safetensors.torch import save_file

import checkpoint as pretrained
from model import LLaDA, LLaDAV
from vision import VisionTower
from conftest import narrow_llada_v

V, D, M, NL, H = 64, 32, 48, 2, 4            # language model: vocab, width, MLP, layers, heads
VD, VM, VL, VS, VP = 16, 24, 3, 16, 8        # vision: width, MLP, layers in the checkpoint, image, patch

# The official key templates, written out literally (ML-GSAI/LLaDA-V train/llada_v_prepare/rename_checkpoint.py), in the
# same order for both layouts.
ORIGINAL = ["model.transformer.wte.weight"] + [f"model.transformer.blocks.{{i}}.{k}.weight" for k in
            ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out")] + \
           ["model.transformer.ln_f.weight", "model.transformer.ff_out.weight"]
LLAMA = ["model.embed_tokens.weight"] + [f"model.layers.{{i}}.{k}.weight" for k in
         ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + \
        ["model.norm.weight", "lm_head.weight"]
SHAPES = [(V, D), (D,), (D, D), (D, D), (D, D), (D, D), (D,), (M, D), (M, D), (D, M), (D,), (V, D)]
LM_ORIG = {"d_model": D, "n_layers": NL, "n_heads": H, "n_kv_heads": H, "mlp_hidden_size": M, "vocab_size": V,
           "embedding_size": V, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_sequence_length": 128,
           "weight_tying": False, "include_bias": False, "activation_type": "silu", "model_type": "llada"}
LM_LLAMA = {"hidden_size": D, "num_hidden_layers": NL, "num_attention_heads": H, "num_key_value_heads": H,
            "intermediate_size": M, "vocab_size": V, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 128, "tie_word_embeddings": False, "rope_scaling": None, "model_type": "llada"}
VCFG = {"hidden_size": VD, "intermediate_size": VM, "num_hidden_layers": VL, "num_attention_heads": 2,
        "image_size": VS, "patch_size": VP, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}


def expand(templates, shapes, n_layers=NL):
    out = []
    for t, s in zip(templates, shapes):
        out += [(t.format(i=i), s) for i in range(n_layers)] if "{i}" in t else [(t, s)]
    return out


def rand_tensors(names_shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (1 + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else torch.randn(s, generator=g) / math.sqrt(s[-1])
            for k, s in names_shapes}


def siglip_tensors(prefix="vision_model.", n_layers=VL, seed=1):
    ks = [("embeddings.patch_embedding.weight", (VD, 3, VP, VP)), ("embeddings.patch_embedding.bias", (VD,)),
          ("embeddings.position_embedding.weight", ((VS // VP) ** 2, VD)),
          ("post_layernorm.weight", (VD,)), ("post_layernorm.bias", (VD,))]
    for i in range(n_layers):
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            ks += [(f"encoder.layers.{i}.{p}.weight", (VD, VD)), (f"encoder.layers.{i}.{p}.bias", (VD,))]
        for p in ("layer_norm1", "layer_norm2"):
            ks += [(f"encoder.layers.{i}.{p}.weight", (VD,)), (f"encoder.layers.{i}.{p}.bias", (VD,))]
        ks += [(f"encoder.layers.{i}.mlp.fc1.weight", (VM, VD)), (f"encoder.layers.{i}.mlp.fc1.bias", (VM,)),
               (f"encoder.layers.{i}.mlp.fc2.weight", (VD, VM)), (f"encoder.layers.{i}.mlp.fc2.bias", (VD,))]
    return rand_tensors([(prefix + k, s) for k, s in ks], seed)


def write_dir(path, config, tensors, n_shards=1):
    """A Hugging Face directory written by hand (not by save_pretrained)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    keys = list(tensors)
    if n_shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    for j in range(n_shards):
        name = f"model-{j + 1:05d}-of-{n_shards:05d}.safetensors"
        part = keys[j::n_shards]
        save_file({k: tensors[k] for k in part}, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return path


def reference_logits(sd, ids):
    """LLaDA's forward written straight from the original key names (gate = ff_proj, down = ff_out)."""
    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    L, hd = ids.shape[1], D // H
    ang = torch.arange(L)[:, None].float() * 500000.0 ** (-torch.arange(0, hd, 2).float() / hd)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = lambda t: t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin
    x = sd["model.transformer.wte.weight"][ids]
    for i in range(NL):
        p = lambda k: sd[f"model.transformer.blocks.{i}.{k}.weight"]
        h = rms(x, p("attn_norm"))
        q, k, v = ((h @ p(n).T).view(1, L, H, hd).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
        a = torch.softmax(rot(q) @ rot(k).transpose(-1, -2) / math.sqrt(hd), -1) @ v  # no causal mask
        x = x + a.transpose(1, 2).reshape(1, L, D) @ p("attn_out").T
        h = rms(x, p("ff_norm"))
        x = x + (F.silu(h @ p("ff_proj").T) * (h @ p("up_proj").T)) @ p("ff_out").T
    return rms(x, sd["model.transformer.ln_f.weight"]) @ sd["model.transformer.ff_out.weight"].T


IDS = torch.tensor([[1, 5, 9, 2, 33, 63, 0, 7]])


def test_llada_layouts_load_with_identical_logits(tmp_path):
    """The same weights under the original names (one file) and the LLaMA-style names (3 shards + index)
    load to bit-identical logits, which match a forward written from the official names."""
    orig = rand_tensors(expand(ORIGINAL, SHAPES))
    rename = dict(zip((k for k, _ in expand(ORIGINAL, SHAPES)), (k for k, _ in expand(LLAMA, SHAPES))))
    llama = {rename[k]: v for k, v in orig.items()}
    a = pretrained.from_pretrained(write_dir(tmp_path / "orig", LM_ORIG, orig))
    b = pretrained.from_pretrained(write_dir(tmp_path / "llama", LM_LLAMA, llama, n_shards=3))
    assert isinstance(a, LLaDA) and isinstance(b, LLaDA) and len(a.layers) == NL
    assert os.path.exists(tmp_path / "llama" / "model-00003-of-00003.safetensors")
    with torch.no_grad():
        la, lb = a(a.embed_tokens(IDS)), b(b.embed_tokens(IDS))
        torch.testing.assert_close(la, reference_logits(orig, IDS), atol=1e-5, rtol=1e-5)
    assert torch.equal(la, lb)


def llada_v_tensors():
    t = rand_tensors(expand(LLAMA, SHAPES), seed=2)
    t.update(siglip_tensors("model.vision_tower.vision_tower.vision_model.", n_layers=VL - 1))  # last one deleted
    t.update(rand_tensors([("model.mm_projector.0.weight", (D, VD)), ("model.mm_projector.0.bias", (D,)),
                           ("model.mm_projector.2.weight", (D, D)), ("model.mm_projector.2.bias", (D,)),
                           ("model.image_newline", (D,))], seed=3))
    return t


LLADA_V_CFG = dict(LM_LLAMA, architectures=["LlavaLLaDAModelLM"], model_type="llava_llada", mm_hidden_size=VD,
                   mm_projector_type="mlp2x_gelu", image_aspect_ratio="anyres_max_4",
                   mm_patch_merge_type="spatial_unpad", vision_config=VCFG)


def test_llada_v_loads_and_round_trips_bit_exactly(tmp_path):
    """A LLaDA-V checkpoint with the real key names loads (each tensor in its place), save_pretrained writes
    it back sharded with an index, and that loads to the very same tensors; saving again gives the same bytes."""
    t = llada_v_tensors()
    m = pretrained.from_pretrained(write_dir(tmp_path / "v", LLADA_V_CFG, t))
    assert isinstance(m, LLaDAV) and m.cfg.image_aspect_ratio == "anyres_max_4"
    assert torch.equal(m.image_newline, t["model.image_newline"])
    assert torch.equal(m.projector.linear_2.weight, t["model.mm_projector.2.weight"])
    assert torch.equal(m.llm.layers[1].gate_proj.weight, t["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(m.vision.layers[1].mlp.fc1.bias, t["model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias"])
    pretrained.save_pretrained(m, tmp_path / "s1", max_shard_size=20_000)
    files = sorted(os.listdir(tmp_path / "s1"))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    weight_map = json.load(open(tmp_path / "s1" / "model.safetensors.index.json"))["weight_map"]
    assert set(weight_map) == set(t)  # exactly the official key set
    m2 = pretrained.from_pretrained(tmp_path / "s1")
    s1, s2 = m.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) and s1[k].dtype == s2[k].dtype for k in s1)
    pretrained.save_pretrained(m2, tmp_path / "s2", max_shard_size=20_000)
    for f in files:
        assert open(tmp_path / "s1" / f, "rb").read() == open(tmp_path / "s2" / f, "rb").read(), f
    # requested dtype: converted on the way in
    mb = pretrained.from_pretrained(tmp_path / "s1", dtype=torch.bfloat16)
    assert {p.dtype for p in mb.parameters()} == {torch.bfloat16}
    assert torch.equal(mb.image_newline, t["model.image_newline"].bfloat16())


def test_siglip_checkpoint_skips_text_tower_head_and_last_layer(tmp_path):
    """A full SigLIP checkpoint: text tower, logit scale/bias and pooling head are skipped, the last of the
    VL encoder layers is dropped (LLaDA-V reads the penultimate layer), the rest lands in place."""
    t = siglip_tensors()
    extra = {"text_model.embeddings.token_embedding.weight": torch.randn(10, VD), "logit_scale": torch.ones(1),
             "logit_bias": torch.zeros(1), "vision_model.head.probe": torch.randn(1, 1, VD)}
    cfg = {"model_type": "siglip", "vision_config": VCFG, "text_config": {"hidden_size": VD}}
    tower = pretrained.from_pretrained(write_dir(tmp_path / "sig", cfg, dict(t, **extra)))
    assert isinstance(tower, VisionTower) and len(tower.layers) == VL - 1
    for ours, off in pretrained.official_names(tower).items():
        assert torch.equal(tower.state_dict()[ours], t[off])
    # written back in SigLIP naming (without the deleted layer), it loads again identically
    pretrained.save_pretrained(tower, tmp_path / "sig2")
    again = pretrained.from_pretrained(tmp_path / "sig2")
    assert all(torch.equal(a, b) for a, b in zip(tower.state_dict().values(), again.state_dict().values()))


def test_original_layout_save_round_trip(tmp_path):
    orig = rand_tensors(expand(ORIGINAL, SHAPES))
    a = pretrained.from_pretrained(write_dir(tmp_path / "o", LM_ORIG, orig))
    pretrained.save_pretrained(a, tmp_path / "o2", layout="original")
    b = pretrained.from_pretrained(tmp_path / "o2")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "o2" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(orig)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_damaged_checkpoint_names_every_bad_key(tmp_path):
    t = llada_v_tensors()
    del t["model.layers.1.self_attn.k_proj.weight"]
    del t["model.mm_projector.0.bias"]
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(M + 1, D)
    with pytest.raises(ValueError) as e:
        pretrained.from_pretrained(write_dir(tmp_path / "bad", LLADA_V_CFG, t, n_shards=2))
    msg = str(e.value)
    for k in ("model.layers.1.self_attn.k_proj.weight", "model.mm_projector.0.bias",
              "model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.0.mlp.up_proj.weight"):
        assert k in msg
    assert "2 missing" in msg and "1 unexpected" in msg and "1 mis-shaped" in msg and "\n" not in msg


def test_bad_directories_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        pretrained.from_pretrained(tmp_path)
    d = write_dir(tmp_path / "x", LM_LLAMA, rand_tensors(expand(LLAMA, SHAPES)), n_shards=2)
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="00002"):
        pretrained.from_pretrained(d)
    with open(d / "config.json", "w") as f:
        json.dump(dict(LM_LLAMA, num_key_value_heads=3), f)  # 3 does not divide H = 4 (GQA needs a divisor)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        pretrained.from_pretrained(d)
    # LLaDA-V image settings: the saved list form of the (1x1)..(6x6) grid is read; anything else is refused
    grid = [[i * VS, j * VS] for i in range(1, 7) for j in range(1, 7)]  # in units of the tower's image size
    assert pretrained.llada_v_config_from_hf(dict(LLADA_V_CFG, image_grid_pinpoints=grid)).image_aspect_ratio == "anyres_max_4"
    for bad in ({"image_grid_pinpoints": grid[:-1]}, {"image_grid_pinpoints": "(1x1),...,(3x3)"},
                {"image_aspect_ratio": "anyres_max_9"}):
        with pytest.raises(ValueError, match="image_"):
            pretrained.llada_v_config_from_hf(dict(LLADA_V_CFG, **bad))


def test_sample_cli_runs_a_hugging_face_directory(tmp_path, capsys, monkeypatch):
    """sample.py --checkpoint=<HF dir>: a tiny LLaDA-V (real 384-pixel anyres geometry, toy tokenizer)
    answers one question, then a two-turn --chat whose second prompt carries the first answer."""
    import sample
    from PIL import Image
    m = narrow_llada_v(vocab_size=512, image_aspect_ratio="anyres_max_4", mm_patch_merge_type="spatial_unpad")
    pretrained.save_pretrained(m, tmp_path / "v")
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "red.png")
    common = [f"--checkpoint={tmp_path / 'v'}", "--tokenizer=toy", f"--image={tmp_path / 'red.png'}",
              "--gen_length=8", "--steps=4", "--block_length=4", "--dtype=fp32"]
    sample.main(common + ["--question=What color is it?", "--think=no_think", "--show_steps"])
    out = capsys.readouterr().out
    assert "LLaDAV" in out and "question: What color is it?" in out and "answer:" in out
    assert "step   1 (block 0): " in out
    prompts = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda fn, ids, **kw: prompts.append(ids) or real(fn, ids, **kw))
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("first?\nsecond?\n"))
    sample.main(common + ["--chat"])
    out = capsys.readouterr().out
    assert out.count("answer:") == 2 and len(prompts) == 2
    # a 64x48 image on a 1x1 grid: int(48 * 27/64) = 20 image rows, unpad keeps 27 - 2 * 3 = 21 of the 27
    n_img = 729 + 21 * 28  # visual tokens, in the first user turn only
    assert all(int((p == -200).sum()) == n_img for p in prompts)
    assert prompts[1].shape[1] > prompts[0].shape[1] and torch.equal(prompts[1][0, :n_img], prompts[0][0, :n_img])
    with pytest.raises(SystemExit, match="dtype"):
        sample.main(common + ["--dtype=int3"])


def test_llada_plus_siglip_make_a_llada_v(tmp_path):
    """LLaDA-8B-Instruct + SigLIP2 directories -> a LLaDAV (stage-1 start: fresh projector, square images)."""
    lm_t, vis_t = rand_tensors(expand(ORIGINAL, SHAPES)), siglip_tensors()
    write_dir(tmp_path / "lm", LM_ORIG, lm_t)
    write_dir(tmp_path / "sig", {"model_type": "siglip", "vision_config": VCFG}, vis_t)
    m = pretrained.from_pretrained(tmp_path / "lm", vision_path=tmp_path / "sig", dtype=torch.bfloat16)
    assert isinstance(m, LLaDAV) and m.cfg.image_aspect_ratio == "square" and not hasattr(m, "image_newline")
    assert m.cfg.lm.rope_fp32 is False  # LLaDA-V's LLaMA-style port rotates in the activation dtype (ML-GSAI/LLaDA-V
                                        # train/llava/model/language_model/modeling_llada.py::LLaDARotaryEmbedding)
    assert torch.equal(m.llm.lm_head.weight, lm_t["model.transformer.ff_out.weight"].bfloat16())
    assert torch.equal(m.vision.patch_embedding.bias, vis_t["vision_model.embeddings.patch_embedding.bias"].bfloat16())
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16} and not any(p.is_meta for p in m.parameters())
    with torch.no_grad():
        logits = m(torch.tensor([[1, 2] + [-200] * 4 + [3]]), pixels=torch.zeros(1, 3, VS, VS))
    assert logits.shape == (1, 7, V) and torch.isfinite(logits.float()).all()


def test_loading_holds_one_copy(tmp_path):
    """The --selftest_memory property at tiny width (full 126,464 vocabulary, d 64: a 65 MB checkpoint in
    3 shards): in a fresh process, loading and touching every weight raise the peak RSS by less than 1.3x
    the checkpoint (a loader that kept a second copy would need 2x). The forward's own working set, and
    the ~0.1 GB of library code the first ops page in, are left out: at this size they would dominate."""
    import subprocess
    from model import LLaDAConfig, LLaDAVConfig
    from vision import VisionConfig
    with torch.device("meta"):
        m = LLaDAV(LLaDAVConfig(lm=LLaDAConfig(d_model=64, n_layers=1, n_heads=2, mlp_hidden=128),
                                vision=VisionConfig(image_size=16, patch_size=8, d_model=16, n_layers=2,
                                                    n_heads=2, mlp_hidden=32)))
    m.to_empty(device="cpu")
    for p in m.parameters():
        torch.nn.init.normal_(p.data)
    pretrained.save_pretrained(m, tmp_path, max_shard_size=30 * 2**20)
    r = subprocess.run([sys.executable, pretrained.__file__, f"--memory_report={tmp_path}"],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert "3 safetensors shards" in r.stdout
    added = float(r.stdout.split("added by loading (all weights resident): ")[1].split(" x")[0])
    assert 0.9 < added < 1.3, r.stdout  # >= ~1: every weight really was read


def test_sample_cli_text_only_llada(tmp_path, capsys):
    """A text-only LLaDA directory (original layout) answers with LLaDA's own sampler; --image is refused."""
    import sample
    from PIL import Image
    cfg = dict(LM_ORIG, vocab_size=512, embedding_size=512)
    shapes = [(512, D)] + SHAPES[1:-1] + [(512, D)]
    write_dir(tmp_path / "lm", cfg, rand_tensors(expand(ORIGINAL, shapes)))
    args = [f"--checkpoint={tmp_path / 'lm'}", "--tokenizer=toy", "--gen_length=8", "--steps=8", "--block_length=8"]
    sample.main(args + ["--question=hello?"])
    out = capsys.readouterr().out
    assert "(LLaDA, torch.float32)" in out and "answer:" in out
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(SystemExit, match="text-only"):
        sample.main(args + ["--question=q", f"--image={tmp_path / 'x.png'}"])
    with pytest.raises(SystemExit, match="--question"):
        sample.main(args)


def test_config_forms_of_rope_theta():
    """transformers >= 5 writes rope_theta inside rope_parameters; older configs at the top level."""
    assert pretrained.llada_config_from_hf(LM_LLAMA).rope_theta == 500000.0
    new = {k: v for k, v in LM_LLAMA.items() if k not in ("rope_theta", "rope_scaling")}
    assert pretrained.llada_config_from_hf(dict(new, rope_parameters={"rope_theta": 5e5, "rope_type": "default"})).rope_theta == 5e5
    with pytest.raises(ValueError, match="rope_type"):
        pretrained.llada_config_from_hf(dict(new, rope_parameters={"rope_theta": 5e5, "rope_type": "linear"}))
