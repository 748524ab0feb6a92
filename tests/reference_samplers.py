"""The frozen pre-merge reference: this project's own three samplers exactly as they were at commit af0c4d3
(`git show af0c4d3:diffusion.py`), before they became the one `diffusion.generate`:

    generate          the official LLaDA generate.py sampler
    generate_llada_v  LLaDA-V's generate_with_embeds (batch 1; earliest-position stop scan, no suffix in the output)
    generate_fast     Fast-dLLM: prefix / dual KV cache and confidence-threshold decoding

Copied verbatim (with the helpers they call) so that the tests can show the one sampler reproduces them token for
token. Do not edit: a change here would move the yardstick. Test code only; nothing in the library imports it."""
import torch
import torch.nn.functional as F

def add_gumbel_noise(logits, temperature: float):
    """argmax(exp(l) / (-log U)^T) = argmax(l / T + Gumbel): a sample from softmax(l / T). In float64,
    because low-precision Gumbel-max hurts generation (arXiv:2409.02908). At T = 0 the same tensor
    object comes back (the official code relies on this aliasing, see confidence_eos_eot_inf)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    return logits.exp() / (-torch.log(noise)) ** temperature


def get_num_transfer_tokens(block_mask_index, steps: int):
    """block_mask_index (B, block_length) bool -> (B, steps) tokens to reveal per step: the m masks are
    spread evenly, base = m // steps, and the first m % steps steps reveal one more."""
    m = block_mask_index.sum(dim=1, keepdim=True)  # (B, 1)
    base, rem = m // steps, m % steps
    num = base.expand(-1, steps).clone()
    num += (torch.arange(steps, device=m.device)[None, :] < rem).long()
    return num


@torch.no_grad()
def generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128,
             temperature=0.0, cfg_scale=0.0, remasking="low_confidence", mask_id=126336,
             logits_eos_inf=False, confidence_eos_eot_inf=False, eos_id=126081, eot_id=126348,
             callback=None, **model_kwargs):
    """The official LLaDA sampler (generate.py), with its argument names and defaults.

    model: called as model(x, attention_mask=..., **model_kwargs) -> logits (B, L, V); for LLaDA-V pass
        image_features=... (see model.LLaDAV.forward), computed once outside the loop.
    prompt: (B, P) token ids (IMAGE_TOKEN_INDEX placeholders allowed), left-padded when B > 1;
    attention_mask: (B, P) or None.  eos_id / eot_id: the ids the two *_inf flags refer to.
    callback(x, step, block): called after each step with the canvas (B, P + gen_length).
    Returns x (B, P + gen_length): the prompt followed by the generated tokens."""
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} is not divisible by block_length={block_length}; "
                         f"pick a block_length that divides it")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps={steps} is not divisible by the {num_blocks} blocks "
                         f"(gen_length / block_length); use a multiple of {num_blocks}")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking={remasking!r}: use 'low_confidence' or 'random'")
    steps_per_block = steps // num_blocks
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(B, gen_length, dtype=attention_mask.dtype,
                                                               device=prompt.device)], dim=1)
    prompt_index = x != mask_id  # (B, P + G): the prompt (image included); used by CFG

    for nb in range(num_blocks):
        start, end = P + nb * block_length, P + (nb + 1) * block_length
        num_transfer_tokens = get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id  # the unconditional branch sees no prompt and no image
                am = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
                logits = model(torch.cat([x, un_x]), attention_mask=am, **model_kwargs)
                cond, uncond = logits.chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(x, attention_mask=attention_mask, **model_kwargs)  # (B, L, V)
            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            logits_with_noise = add_gumbel_noise(logits, temperature)
            x0 = torch.argmax(logits_with_noise, dim=-1)  # (B, L)
            if confidence_eos_eot_inf:
                # Official quirk, kept: the chained assignment hits EOS in the noised logits and EoT in the
                # clean ones, *after* the argmax. At T = 0 both are one tensor, so both get confidence 0.
                logits_with_noise[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf
            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)  # (B, L) confidence of the choice
            else:
                x0_p = torch.rand(x0.shape, device=x0.device)
            x0_p[:, end:] = -torch.inf  # never reveal past the current block (semi-autoregressive)
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.full_like(x0_p, -torch.inf))
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(B):
                _, select = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select] = True
            x[transfer_index] = x0[transfer_index]
            if callback is not None:
                callback(x, nb * steps_per_block + i, nb)
    return x


# ----------------------------------------------------------------------------------------------
# LLaDA-V's sampler (ML-GSAI/LLaDA-V train/llava/model/language_model/modeling_llada.py::generate_with_embeds)

# Never generated by LLaDA-V: EOS, BOS and the two header ids get -inf logits at masked positions, so an
# answer ends with <|eot_id|> (a stop string) rather than EOS padding.
LLADA_V_BANNED = (126081, 126080, 126346, 126347)


def find_stop(tokens, stop_sequences):
    """First position in `tokens` (a list) where one of the stop sequences (lists of ids) starts, or None."""
    for i in range(len(tokens)):
        if any(s and tokens[i:i + len(s)] == list(s) for s in stop_sequences):
            return i
    return None


@torch.no_grad()
def generate_llada_v(model, prompt, steps=128, gen_length=128, block_length=128, temperature=0.0,
                     cfg_scale=0.0, remasking="low_confidence", mask_id=126336, banned_ids=LLADA_V_BANNED,
                     stop_sequences=((126348,),), suffix=None, callback=None, **model_kwargs):
    """generate() with LLaDA-V's differences, batch size 1 as in the official code:
      - banned_ids get -inf logits (the canvas is never filled with EOS);
      - the low-confidence softmax is taken in float64;
      - suffix: fixed ids after the canvas that are never overwritten (generation_suffix);
      - after every step the canvas is scanned for the first stop sequence (default <|eot_id|>); from there
        on confidence is -inf, generation ends once every mask before it is filled (blocks past it are
        skipped), and the answer is cut just before it.
    model(x, **model_kwargs) -> logits (1, L, V). Returns the answer's token ids (a list)."""
    if prompt.shape[0] != 1:
        raise ValueError(f"generate_llada_v takes one prompt (batch 1, like the official code), got {prompt.shape[0]}")
    if gen_length % block_length or steps % (gen_length // block_length):
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}, and steps={steps} "
                         f"a multiple of the number of blocks")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking={remasking!r}: use 'low_confidence' or 'random'")
    P, steps_per_block = prompt.shape[1], steps // (gen_length // block_length)
    tail = torch.tensor([list(suffix or [])], dtype=torch.long, device=prompt.device)
    x = torch.cat([prompt, torch.full((1, gen_length), mask_id, dtype=torch.long, device=prompt.device), tail], 1)
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :P] = True
    stop = None  # position of the first stop sequence in the canvas
    for nb in range(gen_length // block_length):
        start, end = P + nb * block_length, P + (nb + 1) * block_length
        if stop is not None and P + stop <= start:
            break
        num_transfer_tokens = get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            allowed = mask_index.clone()
            allowed[:, end:] = False
            if stop is not None:
                allowed[:, P + stop:] = False
            if not allowed.any():  # the block (or everything before the stop) is filled: stop early
                break
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id  # the prompt, image included, becomes [MASK]
                cond, uncond = model(torch.cat([x, un_x]), **model_kwargs).chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(x, **model_kwargs)  # (1, L, V)
            # only canvas positions are ever revealed: keep their logits (a float64 softmax over a
            # 3,000-token anyres prompt x 126,464 ids would take 3 GB)
            logits = logits[:, P:P + gen_length]  # (1, G, V)
            logits[:, :, list(banned_ids)] = -torch.inf
            x0 = torch.argmax(add_gumbel_noise(logits, temperature), dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            else:
                x0_p = torch.rand(x0.shape, device=x0.device, dtype=torch.float64)
            confidence = torch.where(allowed[:, P:P + gen_length], x0_p, -torch.inf)  # (1, G)
            k = min(int(num_transfer_tokens[0, i]), int(allowed.sum()))
            select = torch.topk(confidence[0], k).indices
            x[0, P + select] = x0[0, select]
            s = find_stop(x[0, P:P + gen_length].tolist(), stop_sequences)
            if s is not None:
                stop = s if stop is None else min(stop, s)
            if callback is not None:
                callback(x, nb * steps_per_block + i, nb)
    answer = x[0, P:P + gen_length].tolist()
    return answer[:stop] if stop is not None else answer


# Classifier-free guidance, log-likelihood bound, multiple choice

def cfg_logits(model, x, prompt_index, cfg_scale, mask_id, attention_mask=None, **model_kwargs):
    """model logits for x (B, L), with unsupervised CFG when cfg_scale > 0: one call on [x; x with every
    prompt_index position -> mask_id], then u + (w + 1)(c - u). The same formula as generate()'s."""
    if cfg_scale <= 0:
        return model(x, attention_mask=attention_mask, **model_kwargs)
    un_x = x.clone()
    un_x[prompt_index.expand_as(x)] = mask_id  # no prompt, no image placeholders in the second half
    am = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    cond, uncond = model(torch.cat([x, un_x]), attention_mask=am, **model_kwargs).chunk(2)
    return uncond + (cfg_scale + 1) * (cond - uncond)


class KVCache:
    """Every layer's keys and values (B, H, L, hd) of one full forward pass, for the approximate caches
    of fast diffusion decoding (Fast-dLLM; generate_fast below). A diffusion LM attends both ways, so cached
    keys go stale as soon as any token changes; the sampler decides when to refresh (record) them.

        cache = KVCache(); model(x, cache=cache)      # record: a full pass, keys/values stored
        cache.span = (s, e); model(x, cache=cache)    # reuse: only x[:, s:e] is recomputed, its fresh
                                                      # keys/values overwrite the cache's s..e-1
    prefix cache: span = (block start, L);  dual cache: span = (block start, block end)."""

    def __init__(self):
        self.k, self.v, self.span = [], [], None

    def update(self, layer, k, v):
        if self.span is None:                 # recording pass: k, v cover the whole sequence
            if layer == len(self.k):
                self.k.append(k)
                self.v.append(v)
            else:
                self.k[layer], self.v[layer] = k, v
            return k, v
        s, e = self.span
        self.k[layer][:, :, s:e] = k          # in place: the span is recomputed at every step anyway
        self.v[layer][:, :, s:e] = v
        return self.k[layer], self.v[layer]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

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
