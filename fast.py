"""
Fast diffusion decoding: approximate KV caches and confidence-threshold parallel decoding (Fast-dLLM,
Wu et al. 2025), on top of the official low-confidence sampler of diffusion.py.

Where this sits in the flow:  image -> ViT -> projector -> token sequence -> [masked diffusion: sampling].

The exact sampler (diffusion.generate) runs the whole sequence x = prompt ++ canvas (length L) through
the model at every step: NFE = steps full passes. Two independent tricks cut that cost:

1. Approximate KV cache. Attention is bidirectional, so no key/value is ever exactly reusable: every
   revealed token changes every other token's hidden states. But within one semi-autoregressive block
   only the block's tokens change, and the keys/values elsewhere drift little. So, per block:
       step 0 of the block:  a full pass over x (B, L); record K_l, V_l (B, H, L, hd) of every layer l
       later steps:          recompute only a span of queries, attend to   K = [cached | fresh span | cached]
           prefix cache:  span = [block start, L)          (the prompt and finished blocks are cached)
           dual cache:    span = [block start, block end)  (the masked blocks after it are cached too)
   The cost of a cached step is ~ span / L of a full pass. `refresh_every=k` re-records the cache every
   k steps inside a block as well; with k = 1 every step is a full pass and the sampler is exact.

2. Confidence-threshold parallel decoding. Instead of the fixed schedule (m / s tokens per step),
   reveal every masked position i of the current block whose confidence c_i = p(x0_hat_i) > tau, and
   at least the single most confident one, until the block is full. Easy positions (EOS padding)
   fall in one step; hard ones get their own. NFE per block <= block_length, usually far fewer.
   Why it is safe (Fast-dLLM, Theorem 1, roughly): when each revealed marginal is close to 1, the
   product of the marginals and the true joint have the same argmax, so revealing them together
   agrees with revealing them one at a time.

Everything else (Gumbel noise in float64, confidence from the un-noised softmax, CFG, the two *_inf
flags, left-padded batches) is the official sampler's. At T > 0 the noise is drawn over the block only,
so random samples differ from diffusion.generate's for the same seed (same distribution).
"""
import torch
import torch.nn.functional as F

from diffusion import add_gumbel_noise, cfg_logits, get_num_transfer_tokens
from model import KVCache

CACHES = (None, "prefix", "dual")


@torch.no_grad()
def generate_fast(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128,
                  temperature=0.0, cfg_scale=0.0, remasking="low_confidence", mask_id=126336,
                  logits_eos_inf=False, confidence_eos_eot_inf=False, eos_id=126081, eot_id=126348,
                  cache=None, threshold=None, refresh_every=0, callback=None, stats=None, **model_kwargs):
    """diffusion.generate's arguments and output, plus:
    cache: None (a full pass every step), "prefix" or "dual" (see the module docstring). The model must
        accept cache=KVCache() (model.LLaDA / model.LLaDAV do).
    threshold: None = the official schedule (steps / n_blocks steps per block); a float tau = reveal every
        masked block position with confidence > tau, at least one per step, until the block is full
        (`steps` is then unused).
    refresh_every: with a cache, also re-record it every this many steps inside a block (0 = only at
        block starts; 1 = every step, i.e. exact).
    stats: a dict to fill with nfe (model calls), full_nfe (full-sequence calls), positions (query
        positions computed per sequence, summed over calls) and cache_bytes (largest cache held)."""
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} is not divisible by block_length={block_length}; "
                         f"pick a block_length that divides it")
    num_blocks = gen_length // block_length
    if threshold is None and steps % num_blocks:
        raise ValueError(f"steps={steps} is not divisible by the {num_blocks} blocks "
                         f"(gen_length / block_length); use a multiple of {num_blocks}")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking={remasking!r}: use 'low_confidence' or 'random'")
    if cache not in CACHES:
        raise ValueError(f"cache={cache!r}: use None, 'prefix' or 'dual'")
    if threshold is not None and remasking != "low_confidence":
        raise ValueError("threshold decoding compares model confidences; use remasking='low_confidence'")
    steps_per_block = steps // num_blocks
    B, P = prompt.shape
    L = P + gen_length
    x = torch.full((B, L), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(B, gen_length, dtype=attention_mask.dtype,
                                                               device=prompt.device)], dim=1)
    prompt_index = x != mask_id  # (B, L): the prompt (image included); used by CFG
    st = {"nfe": 0, "full_nfe": 0, "positions": 0, "cache_bytes": 0}
    step = 0
    for nb in range(num_blocks):
        start, end = P + nb * block_length, P + (nb + 1) * block_length
        if threshold is None:
            num_transfer_tokens = get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        kv, i = None, 0
        # schedule: exactly steps_per_block steps (as the official sampler); threshold: until the block is full
        while (i < steps_per_block) if threshold is None else bool((x[:, start:end] == mask_id).any()):
            full = cache is None or i == 0 or (refresh_every > 0 and i % refresh_every == 0)
            if cache is None:
                kw = {}
            elif full:
                kv = KVCache()           # record: a full pass, fresh keys/values for the whole sequence
                kw = {"cache": kv}
            else:
                kv.span = (start, L) if cache == "prefix" else (start, end)
                kw = {"cache": kv}
            logits = cfg_logits(model, x, prompt_index, cfg_scale, mask_id, attention_mask, **kw, **model_kwargs)
            offset = 0 if full else start  # logits cover positions offset.. of x
            logits = logits[:, start - offset:end - offset]                   # (B, block_length, V)
            st["nfe"] += 1
            st["full_nfe"] += full
            st["positions"] += L if full else kv.span[1] - kv.span[0]
            if kv is not None:
                st["cache_bytes"] = max(st["cache_bytes"], kv.nbytes())

            # ---- the official step, restricted to the current block (diffusion.generate) ----
            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            logits_with_noise = add_gumbel_noise(logits, temperature)
            x0 = torch.argmax(logits_with_noise, dim=-1)                      # (B, block_length)
            if confidence_eos_eot_inf:  # the official chained-assignment quirk, see diffusion.generate
                logits_with_noise[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf
            if remasking == "low_confidence":
                x0_p = torch.gather(F.softmax(logits, dim=-1), -1, x0[..., None]).squeeze(-1)
            else:
                x0_p = torch.rand(x0.shape, device=x0.device)
            mask_index = x[:, start:end] == mask_id
            x0 = torch.where(mask_index, x0, x[:, start:end])
            # full-length confidence (-inf outside the block) so that top-k breaks ties as the official does
            confidence = torch.full((B, L), -torch.inf, device=x.device, dtype=x0_p.dtype)
            confidence[:, start:end] = torch.where(mask_index, x0_p, -torch.inf)
            transfer_index = torch.zeros_like(confidence, dtype=torch.bool)
            for j in range(B):
                if threshold is None:
                    k = int(num_transfer_tokens[j, i])
                else:  # every position above tau, and at least the best one while masks remain
                    k = min(int(mask_index[j].sum()), max(1, int((confidence[j] > threshold).sum())))
                _, select = torch.topk(confidence[j], k=k)
                transfer_index[j, select] = True
            x[:, start:end] = torch.where(transfer_index[:, start:end], x0, x[:, start:end])
            if callback is not None:
                callback(x, step, nb)
            i += 1
            step += 1
    if stats is not None:
        stats.update(st)
    return x


class CountingModel:
    """Wraps a model to count its calls (NFE) for the exact sampler, which keeps no statistics."""

    def __init__(self, model):
        self.model, self.nfe = model, 0

    def __call__(self, *args, **kwargs):
        self.nfe += 1
        return self.model(*args, **kwargs)


# Decoding modes by name, for sample.py --eval, bench.py and the README table.
MODES = {
    "exact":            dict(cache=None, threshold=False),
    "prefix":           dict(cache="prefix", threshold=False),
    "dual":             dict(cache="dual", threshold=False),
    "threshold":        dict(cache=None, threshold=True),
    "threshold+prefix": dict(cache="prefix", threshold=True),
    "threshold+dual":   dict(cache="dual", threshold=True),
}


def mode_kwargs(mode: str, threshold: float = 0.9) -> dict:
    """generate_fast keyword arguments for a named mode ('exact' is diffusion.generate's behaviour)."""
    if mode not in MODES:
        raise ValueError(f"unknown decoding mode {mode!r}; choose from {', '.join(MODES)}")
    m = MODES[mode]
    return dict(cache=m["cache"], threshold=threshold if m["threshold"] else None)
