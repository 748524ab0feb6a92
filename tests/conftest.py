"""The tiny models, prompts and command lines the test files share, in one place (issue 15).

    python -m pytest -q tests                  (the whole suite; each test file's docstring gives its own command)

pytest loads this file first and its folder is on sys.path, so a test file imports what it needs with
`from conftest import tiny_llm, prompt, ...`; tests/kill_resume.py, a script run from the tests folder, does the
same. Everything here is a plain function or constant: each call builds a fresh model from a fixed seed, so a test
may change what it gets. Nothing here downloads anything; every model is small enough for a laptop CPU.

Three families:
  - sampler-sized: a 64-token vocabulary whose top ids are the specials ([MASK] 63, EOS 62, EOT 61), a 32-wide
    2-layer LLaDA, and a LLaDA-V whose 16 px images are 2 x 2 = 4 patches of 8 px (tiny_cfg, tiny_llm, tiny_lm,
    tiny_llada_v, tiny_vlm_and_prompt, prompt, left_padded, fixed_logits_model);
  - narrow LLaDA-V (narrow_llada_v): 16 / 8 wide but with SigLIP's real 384 px geometry, so visual token counts
    are the real ones;
  - training runs: the toy preset at 64 / 32 wide, as a config (tiny_toy_cfg) and as train.py flags (TINY_*).
"""
# Each builder imports torch and the project's modules itself: pytest loads this file before every test file, and
# test_docs.py must still run without torch (and in well under a second).

# ----------------------------------------------------------------------------------------------
# Sampler-sized models: a 64-token vocabulary, 32 wide, 2 layers

V, MASK, EOS, EOT, PAD = 64, 63, 62, 61, 62  # pad with EOS, as LLaDA does
GEN = dict(mask_id=MASK, eos_id=EOS, eot_id=EOT)  # generate()'s special ids for these models


def tiny_cfg(**lm):
    """LLaDAVConfig: a 32-wide 2-layer LLaDA over V = 64 tokens, a 32-wide ViT over 16 px = 2 x 2 patches of 8 px;
    lm: LLaDAConfig fields to override (n_layers, vocab_size, n_kv_heads, ...)."""
    from model import LLaDAConfig, LLaDAVConfig
    from vision import VisionConfig
    lm = dict(dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, mlp_hidden=64, max_seq_len=128), **lm)
    return LLaDAVConfig(lm=LLaDAConfig(**lm),
                        vision=VisionConfig(image_size=16, patch_size=8, d_model=32, n_layers=2, n_heads=4,
                                            mlp_hidden=64), tokenizer="toy")


def tiny_llm(seed=0, **lm):
    """A random bare LLaDA of tiny_cfg(**lm).lm in eval mode: torch.manual_seed(seed), then init_weights()."""
    import torch
    from model import LLaDA
    torch.manual_seed(seed)
    m = LLaDA(tiny_cfg(**lm).lm)
    m.init_weights()
    return m.eval()


def lm_fn(llm):
    """The sampler's model interface for a bare LLaDA: model(x, attention_mask=..., cache=..., output_positions=...)."""
    return lambda x, attention_mask=None, **kw: llm(llm.embed_tokens(x), attention_mask, **kw)


def tiny_lm(seed=0, **lm):
    """tiny_llm(seed) behind the sampler's interface (lm_fn): what generate() takes as its model."""
    return lm_fn(tiny_llm(seed, **lm))


def tiny_llada_v(seed=0):
    """A random LLaDA-V of tiny_cfg() in eval mode (image features: 4 patches x 32 wide)."""
    import torch
    from model import LLaDAV
    torch.manual_seed(seed)
    m = LLaDAV(tiny_cfg())
    m.init_weights()
    return m.eval()


def tiny_vlm_and_prompt(seed=0):
    """tiny_llada_v(seed) and a prompt (1, 8) with one image's 4 placeholders: [1, 2, <image> x 4, 3, 4]."""
    import torch
    from tokenizer import IMAGE_TOKEN_INDEX
    m = tiny_llada_v(seed)
    return m, torch.tensor([[1, 2] + [IMAGE_TOKEN_INDEX] * m.cfg.vision.n_patches + [3, 4]])


def prompt(n=5, seed=0, B=1):
    """(B, n) random ordinary token ids in [0, 60), below the specials; the same for the same seed."""
    import torch
    return torch.randint(0, 60, (B, n), generator=torch.Generator().manual_seed(seed))


def left_padded(prompts, dtype=None):
    """1-D prompts of different lengths -> (batch (B, P) left-padded with PAD, attention_mask (B, P) with 0 on the
    padding, of dtype (default bool), P = the longest length)."""
    import torch
    P = max(len(q) for q in prompts)
    batch = torch.stack([torch.cat([torch.full((P - len(q),), PAD), q]) for q in prompts])
    am = torch.stack([torch.cat([torch.zeros(P - len(q)), torch.ones(len(q))]) for q in prompts])
    return batch, am.to(dtype or torch.bool), P


def fixed_logits_model(rows, P=None, seen=None):
    """A fake model whose logits at canvas position j are rows[j] (the canvas starts at P, default: it ends
    the sequence); a fresh tensor every call (the sampler edits logits in place). It answers the sampler's
    output_positions (the rows it asks for) and ignores a cache; seen: a list that collects every input."""
    import torch
    rows = torch.tensor(rows, dtype=torch.float32)  # (G, V)

    def f(x, attention_mask=None, output_positions=None, cache=None):
        if seen is not None:
            seen.append(x.clone())
        out = torch.zeros(x.shape[0], x.shape[1], rows.shape[1])  # (B, L, V): zero logits off the canvas
        start = x.shape[1] - rows.shape[0] if P is None else P
        out[:, start:start + rows.shape[0]] = rows
        if cache is not None and cache.span is not None:  # a cached pass returns only the span it recomputes
            out = out[:, cache.span[0]:cache.span[1]]
        return out if output_positions is None else out[output_positions]
    return f


# ----------------------------------------------------------------------------------------------
# A narrow LLaDA-V at a real image geometry

def narrow_llada_v(vocab_size=32, image_size=384, patch_size=14, **cfg):
    """A random LLaDA-V only 16 wide (1 LLaDA layer) with an 8-wide 2-layer ViT, at SigLIP's real geometry by default
    (384 px, patch 14 -> 27 x 27 patches) so visual token counts are the real ones; seed 0, eval mode.
    vocab_size: 512 for the toy tokenizer; cfg: LLaDAVConfig fields (image_aspect_ratio, mm_patch_merge_type)."""
    import torch
    from model import LLaDAConfig, LLaDAV, LLaDAVConfig
    from vision import VisionConfig
    torch.manual_seed(0)
    cfg = LLaDAVConfig(lm=LLaDAConfig(vocab_size=vocab_size, d_model=16, n_layers=1, n_heads=2, mlp_hidden=32),
                       vision=VisionConfig(image_size=image_size, patch_size=patch_size, d_model=8, n_layers=2,
                                           n_heads=2, mlp_hidden=16),
                       tokenizer="toy", **cfg)
    m = LLaDAV(cfg)
    m.init_weights()
    return m.eval()


# ----------------------------------------------------------------------------------------------
# Training runs: the toy preset (64 px images, 16 px patches, the toy tokenizer) at 64 / 32 wide

# The widths, as train.py flags; the ViT keeps the toy preset's depth (3 layers), which TINY_MODEL sets to 2.
TINY_WIDTHS = ["--lm.d_model=64", "--lm.n_heads=8", "--lm.n_layers=2", "--lm.mlp_hidden=128", "--vision.d_model=32",
               "--vision.n_heads=2", "--vision.mlp_hidden=64"]
TINY_MODEL = TINY_WIDTHS + ["--vision.n_layers=2"]  # = tiny_toy_cfg()

# test_train.py and test_safety.py (run_train): a 3-layer ViT, batch 8, a 10-question held-out report at the end.
TINY_TRAIN = TINY_WIDTHS + ["--batch_size=8", "--log_every=1000", "--eval_every=0", "--eval_final=10",
                            "--gen_length=12", "--block_length=12", "--sample_steps=12", "--warmup_steps=2"]

# test_distributed.py and kill_resume.py: a loss curve to compare step by step (every step logged, no held-out
# report, a learning rate high enough that the curve moves); each adds its --max_steps / --ckpt_every.
TINY_CURVE = TINY_MODEL + ["--batch_size=8", "--log_every=1", "--eval_every=0", "--eval_final=0", "--gen_length=12",
                           "--block_length=12", "--sample_steps=12", "--warmup_steps=2", "--lr=3e-3"]

# test_stages.py and test_llava.py (which adds --batch_size=4): LLaVA-format data, every step logged.
TINY_DATA = TINY_MODEL + ["--log_every=1", "--eval_every=0"]


def tiny_toy_cfg(anyres=False):
    """The LLaDAVConfig that --preset=toy with TINY_MODEL's flags builds; anyres: stage 2's image mode
    (anyres_max_4 crops with spatial_unpad, which adds the image_newline vector)."""
    from model import get_config
    mc = get_config("toy")
    mc.lm.d_model, mc.lm.n_heads, mc.lm.n_layers, mc.lm.mlp_hidden = 64, 8, 2, 128
    mc.vision.d_model, mc.vision.n_heads, mc.vision.mlp_hidden, mc.vision.n_layers = 32, 2, 64, 2
    if anyres:
        mc.image_aspect_ratio, mc.mm_patch_merge_type = "anyres_max_4", "spatial_unpad"
    return mc


def run_train(out, *extra):
    """train.train() on the synthetic data with TINY_TRAIN and extra flags (later flags win), writing to out;
    -> (model, report)."""
    import train
    tc, mc = train.parse_args([f"--out_dir={out}"] + TINY_TRAIN + list(extra), train.TrainConfig())
    return train.train(tc, mc, quiet=True)


class Payload:
    """A pickle payload for the no-pickle tests: unpickling it calls open(marker, "w"), so the file appearing
    means code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
