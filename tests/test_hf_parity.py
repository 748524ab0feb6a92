"""Parity with the reference implementations in Hugging Face `transformers` (a test-only dependency; the
tests skip with a message without it): a SiglipVisionModel and a LlamaForCausalLM with random weights are
saved by transformers, loaded by pretrained.from_pretrained, and must compute the same thing:
the ViT's penultimate hidden state (LLaDA-V's features) and, with a full 4-D mask instead of the causal
one, LLaDA's bidirectional logits. Then our save_pretrained is read back by transformers.

    python -m pytest -q tests/test_hf_parity.py
"""
import json

import pytest
import torch

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers", reason="parity tests need `pip install transformers`")

import checkpoint as pretrained


def test_siglip_vision_model_parity(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                          num_attention_heads=4, image_size=56, patch_size=14,
                                          hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    hf = transformers.SiglipVisionModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path)
    ours = pretrained.from_pretrained(tmp_path)
    px = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = hf(pixel_values=px, output_hidden_states=True).hidden_states[-2]  # before the last layer, no post-LN
        torch.testing.assert_close(ours(px), ref, atol=1e-5, rtol=1e-5)


def test_llama_style_llada_parity_and_save_back(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, rope_theta=500000.0,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=128,
                                   attn_implementation="eager", pad_token_id=None)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    ours = pretrained.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 100, (1, 12))
    full = torch.ones(1, 1, 12, 12, dtype=torch.bool)  # every token sees every token: LLaDA's attention
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=full).logits
        out = ours(ours.embed_tokens(ids))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert (hf(input_ids=ids).logits - out).abs().max() > 1e-2  # the causal model differs
    pretrained.save_pretrained(ours, tmp_path / "ours")
    c = json.load(open(tmp_path / "ours" / "config.json"))
    c.update(pad_token_id=None, bos_token_id=None, eos_token_id=None)  # LLaDA's ids do not fit a 100-token vocab
    json.dump(c, open(tmp_path / "ours" / "config.json", "w"))
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, attention_mask=full).logits, ref)


def test_gqa_tied_llama_parity_and_save_back(tmp_path):
    """The iLLaDA shape: grouped-query attention (2 key/value heads for 4 query heads) and tied input/output
    embeddings. transformers saves no lm_head for a tied model; ours loads it with the head = E, matches
    LlamaForCausalLM's full-attention logits, and our save -> load is bit-exact and readable by transformers."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                   rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=128,
                                   attn_implementation="eager", pad_token_id=None)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # transformers ties them
    hf.save_pretrained(tmp_path / "hf")
    ours = pretrained.from_pretrained(tmp_path / "hf")
    assert ours.cfg.kv_heads == 2 and ours.cfg.tie_embeddings and ours.lm_head is None
    assert ours.layers[0].k_proj.weight.shape == (32, 64)  # 2 heads of 16
    ids = torch.randint(0, 100, (2, 12))
    full = torch.ones(2, 1, 12, 12, dtype=torch.bool)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=full).logits
        out = ours(ours.embed_tokens(ids))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    pretrained.save_pretrained(ours, tmp_path / "ours")
    c = json.load(open(tmp_path / "ours" / "config.json"))
    assert c["num_key_value_heads"] == 2 and c["tie_word_embeddings"] is True
    again = pretrained.from_pretrained(tmp_path / "ours")
    assert again.cfg == ours.cfg
    for (n, a), (m, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    with torch.no_grad():
        assert torch.equal(again(again.embed_tokens(ids)), out)
    c.update(pad_token_id=None, bos_token_id=None, eos_token_id=None)  # LLaDA's ids do not fit a 100-token vocab
    json.dump(c, open(tmp_path / "ours" / "config.json", "w"))
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, attention_mask=full).logits, ref)
