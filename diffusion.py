"""
Masked diffusion: the forward (masking) process, the likelihood-bound loss, the one reverse-process
sampler (low-confidence remasking, with LLaDA-V's and fast decoding's options), and the likelihood.

Where this sits in the flow:  image -> ViT -> projector -> token sequence -> [masked diffusion].

Forward process (ML-GSAI/LLaDA GUIDELINES.md; LLaDA paper (arXiv 2502.09992) §2.2, §2.3; ML-GSAI/LLaDA-V
train/llava/model/language_model/modeling_llada.py::LLaDAModelLM.forward). For each sequence draw t ~ U(0, 1), set
    p_mask = (1 - eps) t + eps,   eps = 1e-3,
and replace every maskable token (label != -100: the answer; never the prompt or the image) by
[MASK] independently with probability p_mask:   x_t^i = [MASK] w.p. p_mask, else x_0^i.

Loss: cross-entropy on the masked tokens weighted by 1/p_mask, an upper bound on -log p(x_0):
    pretraining:  L = 1/(B L)  sum_b sum_{i masked} CE(f(x_t)_i, x_0^i) / p_mask_b
    SFT / LLaDA-V: L = 1/B  sum_b  1/|A_b|  sum_{i masked} CE(f(x_t)_i, x_0^i) / p_mask_b
where |A_b| is sample b's number of maskable (answer) positions, EOS padding included.

Reverse process: ONE sampler, `generate`, for every model and entry point (ML-GSAI/LLaDA generate.py::generate;
ML-GSAI/LLaDA-V train/llava/model/language_model/modeling_llada.py::generate_with_embeds). Its defaults are the official
LLaDA generate.py, bit for bit. Start from the prompt followed by gen_length [MASK]s (and an optional fixed suffix),
split the canvas into blocks of block_length, and at every step, on the logits of a window of positions:
    x0_hat  = argmax(logits + Gumbel noise at temperature T)            (float64 noise)
    conf_i  = softmax(logits)_i[x0_hat_i]   ('low_confidence')  or U(0,1) ('random')
    conf_i  = -inf  unless i is masked, in the window, before the current block's end (and the stop)
    reveal the k most confident positions,
        k = k_s from the even schedule  m // s (+1 for the first m % s steps), m = masks in the block at
            its start, s = steps / n_blocks                                        (official), or
        k = #{i : conf_i >= tau}, at least 1; x0_hat never [MASK]  (confidence threshold, Fast-dLLM)
Revealed tokens are never masked again. Unsupervised classifier-free guidance (cfg_scale w > 0), written
once (cfg_logits) and shared with the likelihood:
    logits = u + (w + 1)(c - u),   c = f(x),  u = f(x with every prompt position -> [MASK]).
Options of the same loop:
  - LLaDA-V (modeling_llada.py::generate_with_embeds), switched on by stop_sequences (a list): banned ids
    (EOS, BOS, header ids) get -inf logits, the confidence is a float64 softmax, the canvas is scanned for
    stop sequences after every step (the first LISTED one found wins, then only the first is re-scanned),
    confidence is -inf from the stop on, the loop ends once every mask before the stop is filled (or a
    block is full), and the answer is x[P:stop] followed by the suffix ids.
  - Fast decoding (Fast-dLLM, Wu et al. 2025): an approximate KV cache and/or the threshold rule above.
Logits are computed only where they are used: from the first revealable position (the block start, or
an earlier mask) to the block's end (the LM head is the biggest matmul; a float64 softmax over a 3,000-token
anyres prompt x 126,464 ids would take 3 GB). Random draws still cover the whole sequence in generate.py's
mode (so that a seed gives its tokens), the canvas with LLaDA-V's options, the block in fast decoding.
Every mode ends: the schedule makes steps / n_blocks steps per block (no model call for a step with
nothing to reveal), and a threshold step reveals at least one token that is not [MASK] (Fast-dLLM would
write [MASK] back and loop for ever; generate.py lets x0_hat be [MASK], kept in that mode).

Approximate KV cache. The exact sampler runs the whole sequence x = prompt ++ canvas (length L) through
the model at every step: NFE = steps full passes. Attention is bidirectional, so no key/value is ever
exactly reusable: every revealed token changes every other token's hidden states. But within one
semi-autoregressive block only the block's tokens change, and the keys/values elsewhere drift little.
So, per block:
    step 0 of the block:  a full pass over x (B, L); record K_l, V_l (B, H, L, hd) of every layer l
    later steps:          recompute only a span of queries, attend to   K = [cached | fresh span | cached]
        prefix cache:  span = [block start, L)          (the prompt and finished blocks are cached)
        dual cache:    span = [block start, block end)  (the masked blocks after it are cached too)
The cost of a cached step is ~ span / L of a full pass. `refresh_every=k` re-records the cache every k
steps inside a block as well; with k = 1 every step is a full pass and the sampler is exact.
Why the threshold rule is safe (Fast-dLLM, Theorem 1, roughly): when each revealed marginal is close to
1, the product of the marginals and the true joint have the same argmax, so revealing them together
agrees with revealing them one at a time. Easy positions (EOS padding) fall in one step.

Log-likelihood (ML-GSAI/LLaDA get_log_likelihood.py::get_log_likelihood). For a prompt p and an answer a of
length A, the bound of LLaDA Eq. 6 with the number of masks l drawn uniformly:
    log p(a | p) >= -E_{l ~ U{1..A}} E_{S subset of a, |S| = l} [ (A / l) sum_{i in S} -log p_theta(a_i | p, a with S masked) ]
Monte Carlo with stratified counts: per mini-batch of b copies, k ~ U{1..A} and
    l_j = ((round(k + j A / b) - 1) mod A) + 1,   j = 0..b-1      (evenly spread over 1..A, random offset)
each copy masks l_j random answer positions; the estimate is minus the mean over mini-batches of
    1/b sum_j (A / l_j) sum_{i masked in copy j} CE_i.
Multiple choice: score every choice this way and pick the highest (lm-eval's loglikelihood).
"""
import inspect
import itertools
import warnings

import torch
import torch.nn.functional as F

EPS = 1e-3


# ----------------------------------------------------------------------------------------------
# Forward process and loss

def forward_process(x0, labels, mask_id: int, eps: float = EPS, generator=None, stratified=False,
                    exact_count=False):
    """Mask the maskable part of x0 (B, L). labels (B, L) is -100 where a position must stay clean.
    Returns xt (B, L), masked (B, L) bool, p_mask (B,).

    Default (LLaDA GUIDELINES): t ~ U(0,1), every maskable token masked independently w.p. p_mask.
    stratified=True draws the B times as (u + i) / B, i = 0..B-1, in random order: each t is still
    U(0, 1), so the loss keeps its expectation, but the batch covers the noise levels evenly.
    exact_count=True is the paper's equivalent, lower-variance form of the same bound (LLaDA Eq. 6, the
    estimator of get_log_likelihood.py): with A maskable positions, draw l ~ U{1..A} (stratified over the
    batch if asked), mask exactly l of them at random, and p_mask = l / A. The 1/p_mask weight is then at
    most A instead of 1/eps = 1000, which matters a lot for short answers and small batches."""
    B, L = x0.shape
    dev = x0.device
    maskable = labels != -100
    if stratified:
        u = torch.rand(1, device=dev, generator=generator)
        t = (u + torch.randperm(B, device=dev, generator=generator)) / B
    else:
        t = torch.rand(B, device=dev, generator=generator)
    if exact_count:
        A = maskable.sum(1)                                                                 # (B,)
        l = (t * A).floor().long().clamp(max=A - 1) + 1                                     # U{1..A}
        # rank the maskable positions in random order; mask the first l of them
        score = torch.rand(B, L, device=dev, generator=generator).masked_fill(~maskable, 2.0)
        rank = score.argsort(1).argsort(1)                                                  # (B, L)
        masked = (rank < l[:, None]) & maskable
        p_mask = l.float() / A.clamp(min=1)
    else:
        p_mask = (1 - eps) * t + eps                                                        # (B,)
        masked = (torch.rand(B, L, device=dev, generator=generator) < p_mask[:, None]) & maskable
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return xt, masked, p_mask


def diffusion_loss(logits_masked, labels, masked, p_mask, mode: str = "sft", weighting: str = "elbo", ce=None):
    """The likelihood-bound loss. weighting="none" drops the 1/p_mask factor: the masked-diffusion
    analogue of DDPM's L_simple (a re-weighting of the bound's noise levels; no longer a bound).
    logits_masked (N, V): logits at the N masked positions (row-major order of `masked`);
    labels (B, L): the clean tokens (-100 where not maskable); masked (B, L) bool; p_mask (B,).
    ce (N,): the per-position cross-entropy when the model computed it (model(..., targets=...)); then
    logits_masked is not used."""
    B, L = labels.shape
    if ce is None:
        ce = F.cross_entropy(logits_masked.float(), labels[masked], reduction="none")  # (N,)
    w = p_mask[:, None].expand(B, L)[masked]                                       # p_mask of each row
    if weighting == "none":
        w = torch.ones_like(w)
    elif weighting != "elbo":
        raise ValueError(f"unknown weighting {weighting!r}; use 'elbo' (1/p_mask) or 'none'")
    if mode == "pretrain":
        return (ce / w).sum() / (B * L)
    if mode == "sft":
        n_answer = (labels != -100).sum(1).clamp(min=1)                              # (B,)
        per_token = ce / w / n_answer[:, None].expand(B, L)[masked]
        return per_token.sum() / B
    raise ValueError(f"unknown loss mode {mode!r}; use 'sft' or 'pretrain'")


# ----------------------------------------------------------------------------------------------
# Sampler: the pieces (noise, schedule, CFG, stop scan, KV cache), then the one loop

def add_gumbel_noise(logits, temperature: float, draw=None):
    """argmax(exp(l) / (-log U)^T) = argmax(l / T + Gumbel): a sample from softmax(l / T). In float64,
    because low-precision Gumbel-max hurts generation (arXiv:2409.02908). At T = 0 the same tensor
    object comes back (the official code relies on this aliasing, see confidence_eos_eot_inf).
    logits (B, W, V); draw = (n, a): U is drawn for n positions (B, n, V) and its a..a+W-1 used: the
    random numbers of noising n positions' logits, when only W of them are needed."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    if draw is None:
        noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device)
    else:
        (B, W, V), (n, a) = logits.shape, draw
        noise = torch.rand((B, n, V), dtype=torch.float64, device=logits.device)[:, a:a + W]
    return logits.exp() / (-torch.log(noise)) ** temperature


def get_num_transfer_tokens(block_mask_index, steps: int):
    """block_mask_index (B, block_length) bool -> (B, steps) tokens to reveal per step: the m masks are
    spread evenly, base = m // steps, and the first m % steps steps reveal one more."""
    m = block_mask_index.sum(dim=1, keepdim=True)  # (B, 1)
    base, rem = m // steps, m % steps
    num = base.expand(-1, steps).clone()
    num += (torch.arange(steps, device=m.device)[None, :] < rem).long()
    return num


def cfg_logits(model, x, prompt_index, cfg_scale, mask_id, attention_mask=None, **model_kwargs):
    """Model logits for x (B, L), with unsupervised classifier-free guidance when cfg_scale w > 0: one call on
    the batch [x; x with every prompt_index position -> mask_id] (the unconditional half sees no prompt and
    no image), then u + (w + 1)(c - u). The only place CFG is written (the sampler and the likelihood use it).
    model_kwargs go to the call as they are (an output_positions mask must then cover the 2B rows)."""
    if cfg_scale <= 0:
        return model(x, attention_mask=attention_mask, **model_kwargs)
    un_x = x.clone()
    un_x[prompt_index.expand_as(x)] = mask_id  # no prompt, no image placeholders in the second half
    am = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    cond, uncond = model(torch.cat([x, un_x]), attention_mask=am, **model_kwargs).chunk(2)
    return uncond + (cfg_scale + 1) * (cond - uncond)


# Never generated by LLaDA-V: EOS, BOS and the two header ids get -inf logits, so an answer ends with
# <|eot_id|> (a stop sequence) rather than EOS padding (ML-GSAI/LLaDA-V
# train/llava/model/language_model/modeling_llada.py::generate_with_embeds).
LLADA_V_BANNED = (126081, 126080, 126346, 126347)


def first_occurrence(canvas, seq):
    """canvas (B, G) ids, seq a list of n ids -> (B,) start of seq's first occurrence in each row, G where
    it does not occur. A masked position matches nothing, so a stop is found only once fully revealed."""
    B, G = canvas.shape
    if len(seq) > G:
        return torch.full((B,), G, dtype=torch.long, device=canvas.device)
    windows = canvas.unfold(1, len(seq), 1)                                     # (B, G - n + 1, n)
    hit = (windows == torch.tensor(seq, device=canvas.device)).all(-1)         # (B, G - n + 1)
    start = torch.arange(hit.shape[1], device=canvas.device).expand_as(hit)
    return torch.where(hit, start, G).min(1).values


def find_stop(canvas, stop_sequences, stop):
    """LLaDA-V's stop scan after one step (ML-GSAI/LLaDA-V
    train/llava/model/language_model/modeling_llada.py::generate_with_embeds), for a batch. canvas (B, G) ids; stop (B,)
    the stop position so far (G = none yet) -> the new stop (B,). As the official loop does:
      - a row with no stop yet takes the FIRST LISTED sequence that occurs in its canvas (at that
        sequence's first occurrence), not the earliest position of any sequence;
      - a row that has a stop re-scans only stop_sequences[0] and keeps the smaller position.
    Official quirk, kept: with stops ["\\n", "<|eot_id|>"] (lmms-eval's ChartQA order) a later "\\n" before
    a found <|eot_id|> moves the stop to it; with the order reversed, a found "\\n" is never moved by
    another "\\n" revealed before it. With one stop sequence both rules are "cut at its first occurrence"."""
    G = canvas.shape[1]
    new, pending = stop.clone(), stop >= G                                      # pending: no stop yet
    for n, seq in enumerate(stop_sequences):
        pos = first_occurrence(canvas, seq)                                     # (B,)
        if n == 0:  # rows with a stop: only the first sequence is looked at again
            new = torch.where(pending, new, torch.minimum(stop, pos))
        hit = pending & (pos < G)
        new = torch.where(hit, pos, new)
        pending = pending & ~hit
    return new


class KVCache:
    """Every layer's keys and values (B, H_kv, L, hd) of one full forward pass (H_kv = n_kv_heads under
    grouped-query attention), for the approximate caches
    of fast diffusion decoding (Fast-dLLM; see the module docstring). A diffusion LM attends both ways, so
    cached keys go stale as soon as any token changes; the sampler decides when to refresh (record) them.

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


def check_schedule(gen_length: int, block_length: int, steps: int | None = None, flag: str = "",
                   steps_name: str = "steps"):
    """The block schedule, checked in this one place (generate, and train.py / sample.py / the bench at parse
    time): gen_length a multiple of block_length, and steps (None: threshold decoding, which has no fixed
    count) a multiple of the number of blocks, so every block gets as many. flag="--" names the options
    as typed. Raises a one-line ValueError; -> the number of blocks."""
    if gen_length % block_length:
        raise ValueError(f"{flag}gen_length={gen_length} is not divisible by {flag}block_length={block_length}; "
                         f"pick a block_length that divides it")
    num_blocks = gen_length // block_length
    if steps is not None and steps % num_blocks:
        raise ValueError(f"{flag}{steps_name}={steps} is not divisible by the {num_blocks} blocks "
                         f"({flag}gen_length / {flag}block_length); use a multiple of {num_blocks}")
    return num_blocks


def check_options(steps, gen_length, block_length, remasking, cache, threshold, stop_sequences):
    """generate()'s argument checks, each a one-line ValueError; returns the steps per block.
    More steps per block than the block has positions (steps > gen_length) cannot reveal more: the extra
    steps reveal nothing, so generate() makes no model call for them; a warning says so (issue 26)."""
    num_blocks = check_schedule(gen_length, block_length, steps if threshold is None else None)
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking={remasking!r}: use 'low_confidence' or 'random'")
    if cache not in CACHES:
        raise ValueError(f"cache={cache!r}: use None, 'prefix' or 'dual'")
    if threshold is not None and remasking != "low_confidence":
        raise ValueError("threshold decoding compares model confidences; use remasking='low_confidence'")
    if any(len(s) == 0 for s in stop_sequences or ()):
        raise ValueError("a stop sequence is empty (an empty stop string?); drop it, or pass [] for no stop")
    if threshold is None and steps > gen_length:
        warnings.warn(f"steps={steps} is more than the gen_length={gen_length} positions to reveal; the "
                      f"last {steps // num_blocks - block_length} steps of each block reveal nothing and make no "
                      f"model call (as if steps={gen_length})", stacklevel=4)
    return steps // num_blocks


class ModelCalls:
    """The model calls of one generate(): at step i of the block [start, end), the logits of the positions
    lo..hi-1 only (the head is the biggest matmul: output_positions), from a full pass over x (B, L) or,
    with an approximate KV cache (Fast-dLLM, see the module docstring), from a pass over the cached span:
        step 0 of a block (and every refresh_every-th step):  full pass, keys/values recorded (KVCache)
        other steps:  prefix: queries [start, L);  dual: queries [start, end)
    with classifier-free guidance (cfg_logits). Counts nfe, full_nfe, positions, cache_bytes in .stats."""

    def __init__(self, model, cache, refresh_every, cfg_scale, prompt_index, mask_id, attention_mask, model_kwargs):
        self.model, self.cache, self.refresh_every, self.cfg_scale = model, cache, refresh_every, cfg_scale
        self.prompt_index, self.mask_id, self.attention_mask, self.kwargs = prompt_index, mask_id, attention_mask, model_kwargs
        try:  # a model taking output_positions (or **kwargs: an nn.Module) gets the rows asked for; else slice
            params = inspect.signature(model).parameters.values()
            self.positions_ok = any(p.name == "output_positions" or p.kind is p.VAR_KEYWORD for p in params)
        except (TypeError, ValueError):  # no signature to read (a builtin): assume it takes them, as model.LLaDA
            self.positions_ok = True
        self.stats = {"nfe": 0, "full_nfe": 0, "positions": 0, "cache_bytes": 0}
        self.kv, self.block = None, None

    def new_block(self, start, end):
        self.kv, self.block = None, (start, end)  # the cache is recorded again at the block's first call

    def __call__(self, x, i, lo, hi):
        """logits (B, hi - lo, V) at positions lo..hi-1 of x (B, L), at step i of the current block."""
        (B, L), (start, end) = x.shape, self.block
        full = self.cache is None or i == 0 or (self.refresh_every > 0 and i % self.refresh_every == 0)
        kw = {}
        if self.cache is not None:
            if full:
                self.kv = KVCache()  # record: a full pass, fresh keys/values for the whole sequence
            else:
                self.kv.span = (start, L) if self.cache == "prefix" else (start, end)
            kw["cache"] = self.kv
        s, e = (0, L) if full else self.kv.span  # the call computes queries s..e-1
        if (lo, hi) != (s, e) and self.positions_ok:  # the head on the window's rows only, every CFG half: a
            kw["output_positions"] = (slice(None), slice(lo - s, hi - s))  # view of the rows, nothing gathered
        logits = cfg_logits(self.model, x, self.prompt_index, self.cfg_scale, self.mask_id, self.attention_mask,
                            **kw, **self.kwargs)
        if "output_positions" not in kw:
            logits = logits[:, lo - s:hi - s]
        st = self.stats
        st["nfe"], st["full_nfe"], st["positions"] = st["nfe"] + 1, st["full_nfe"] + full, st["positions"] + e - s
        if self.kv is not None:
            st["cache_bytes"] = max(st["cache_bytes"], self.kv.nbytes())
        return logits.reshape(B, hi - lo, -1)                                   # (B, W, V)


def predict(logits, draw, temperature=0.0, remasking="low_confidence", float64=False, logits_eos_inf=False,
            confidence_eos_eot_inf=False, eos_id=126081, eot_id=126348, banned_ids=(), not_id=None):
    """The prediction of one step at the W positions whose logits (B, W, V) are given (edited in place):
        x0_hat = argmax(logits + Gumbel noise at temperature T),  conf = softmax(logits)[x0_hat]
    (or U(0, 1) for remasking='random'; float64 softmax / draws for LLaDA-V) -> x0_hat (B, W), conf (B, W).
    draw = (n, a): the random numbers are drawn for n positions and those a..a+W-1 used, so that a window
    smaller than what the reference noises sees the reference's draws. not_id: an id x0_hat never takes
    (threshold decoding: [MASK], which would reveal nothing; the next most likely id instead)."""
    if logits_eos_inf:
        logits[:, :, eos_id] = -torch.inf
    if banned_ids:  # LLaDA-V bans them at masked positions; elsewhere a ban changes nothing (never revealed)
        logits[:, :, list(banned_ids)] = -torch.inf
    logits_with_noise = add_gumbel_noise(logits, temperature, draw)
    x0 = torch.argmax(logits_with_noise, dim=-1)                                # (B, W)
    if not_id is not None and bool((x0 == not_id).any()):  # out of place: the softmax below is unchanged
        second = logits_with_noise.index_fill(-1, torch.tensor([not_id], device=x0.device), -torch.inf)
        x0 = torch.where(x0 == not_id, second.argmax(-1), x0)
    if confidence_eos_eot_inf:
        # Official quirk, kept: the chained assignment hits EOS in the noised logits and EoT in the clean
        # ones, *after* the argmax. At T = 0 both are one tensor, so both get confidence 0.
        logits_with_noise[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf
    if remasking == "low_confidence":  # p(x0_hat): un-noised softmax, in float64 for LLaDA-V
        p = F.softmax(logits.to(torch.float64) if float64 else logits, dim=-1)
        return x0, torch.gather(p, -1, x0[..., None]).squeeze(-1)              # (B, W) each
    (n, a), W = draw, x0.shape[1]
    u = torch.rand((x0.shape[0], n), device=x0.device, dtype=torch.float64 if float64 else None)
    return x0, u[:, a:a + W]


def reveal(x, x0, confidence, lo, k, threshold=None):
    """Write the most confident predictions into x (B, L), in place. x0 (B, W): the predictions at positions
    lo..lo+W-1; confidence (B, L): -inf wherever nothing may be revealed (over the whole sequence, so that
    top-k sees the same vector, and breaks ties the same way, as the official code); k (B,): how many per
    row (the schedule), or None with a threshold tau: every position with confidence >= tau, at least the
    most confident one (Fast-dLLM's get_transfer_index). Never more than the allowed (finite) count."""
    W = x0.shape[1]
    n_allowed = (confidence > -torch.inf).sum(1).tolist()
    n_above = None if threshold is None else (confidence >= threshold).sum(1).tolist()
    transfer = torch.zeros_like(confidence, dtype=torch.bool)
    for j in range(x.shape[0]):
        kj = int(k[j]) if threshold is None else max(1, n_above[j])
        transfer[j, torch.topk(confidence[j], k=min(kj, n_allowed[j])).indices] = True
    x[:, lo:lo + W] = torch.where(transfer[:, lo:lo + W], x0, x[:, lo:lo + W])
    return x


def revealable(x, mask_id, window, pos, stop_at=None):
    """(B, L) bool: where a step may reveal: masked, inside `window` (L,) (made once per block: the positions
    first..end-1) and, with LLaDA-V's stop rule, before the row's stop position stop_at (B,); pos = 0..L-1."""
    allowed = (x == mask_id) & window
    return allowed if stop_at is None else allowed & (pos < stop_at[:, None])


@torch.no_grad()
def generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128,
             temperature=0.0, cfg_scale=0.0, remasking="low_confidence", mask_id=126336,
             logits_eos_inf=False, confidence_eos_eot_inf=False, eos_id=126081, eot_id=126348,
             banned_ids=(), stop_sequences=None, suffix=(), cache=None, threshold=None, refresh_every=0,
             callback=None, stats=None, **model_kwargs):
    """The one sampler. With its defaults: the official LLaDA generate.py (same names, defaults, outputs).

    model: called as model(x, attention_mask=..., **model_kwargs) -> logits (B, L, V); for LLaDA-V pass
        image_features=... (model.LLaDAV.forward), computed once outside the loop. If it takes
        output_positions= (model.LLaDA / LLaDAV do) it gets the window of rows whose logits are used (the
        current block, and earlier masks), else its logits are sliced; a cache needs cache= too.
    prompt: (B, P) token ids (IMAGE_TOKEN_INDEX placeholders allowed), left-padded when B > 1;
    attention_mask: (B, P) or None.  eos_id / eot_id: the ids the two *_inf flags refer to.
    steps: model calls at most (more than gen_length reveal nothing: a warning, and no call for them).
    LLaDA-V (generate_with_embeds; any batch size here, the official one is batch 1):
      stop_sequences: None = off. A list of id lists switches LLaDA-V's behaviour on: the stop scan of
          find_stop after every step, confidence -inf from the stop on, an early end once no allowed mask
          is left (all filled before the stop, or the block full), a float64 confidence, random draws over
          the canvas only, and the output below. [] = all of that without a stop.
      banned_ids: ids given -inf logits (LLaDA-V: LLADA_V_BANNED).  suffix: ids fixed after the canvas,
          seen by the model, never overwritten (generation_suffix).
    Fast decoding (Fast-dLLM): cache None | "prefix" | "dual"; refresh_every = k re-records the cache every
        k steps inside a block too (0: only at block starts; 1: every step, exact). threshold: None = the
        official schedule; tau = reveal every allowed position of the block with confidence >= tau (at
        least one, never [MASK] itself) until the block is full: at most block_length calls per block;
        `steps` is then unused.
    callback(x, step, block): called after each step with x (B, P + gen_length + len(suffix)).
    stats: a dict filled with nfe (model calls), full_nfe (full-sequence calls), positions (query
        positions computed per sequence, summed over calls) and cache_bytes (largest cache held).
    Returns x (B, P + gen_length [+ suffix]): the prompt followed by the canvas, as generate.py; with
    stop_sequences, as generate_with_embeds, the B answers: lists of ids x[P:stop] + suffix.

    Where this departs from the official LLaDA-V code (the official one being unreproducible or wasteful):
    after a stop the official code still asks top-k for the schedule's k positions; the surplus falls on
    -inf ties, i.e. wherever the top-k kernel puts them (prompt, revealed or masked positions after the
    stop: implementation-defined), so here k is capped at the allowed count. Gumbel noise and random
    confidences are drawn over the canvas, not the whole sequence: same distribution, other draws."""
    steps_per_block = check_options(steps, gen_length, block_length, remasking, cache, threshold, stop_sequences)
    llada_v, fast = stop_sequences is not None, cache is not None or threshold is not None
    stop_sequences = [[int(t) for t in s] for s in stop_sequences or ()]
    B, P = prompt.shape
    G, dev, suffix = gen_length, prompt.device, [int(t) for t in suffix or ()]
    x = torch.full((B, P + G + len(suffix)), mask_id, dtype=torch.long, device=dev)   # prompt, [MASK] * G, suffix
    x[:, :P] = prompt
    x[:, P + G:] = torch.tensor(suffix, dtype=torch.long, device=dev)
    L = x.shape[1]
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(B, L - P, dtype=attention_mask.dtype, device=dev)], 1)
    pos = torch.arange(L, device=dev)
    prompt_index = (pos < P)[None]  # (1, L): the prompt (image included); CFG masks it
    calls = ModelCalls(model, cache, refresh_every, cfg_scale, prompt_index, mask_id, attention_mask, model_kwargs)
    stop = torch.full((B,), G, dtype=torch.long, device=dev)  # stop position in the canvas, G = none yet
    pick = dict(temperature=temperature, remasking=remasking, float64=llada_v, logits_eos_inf=logits_eos_inf,
                confidence_eos_eot_inf=confidence_eos_eot_inf, eos_id=eos_id, eot_id=eot_id, banned_ids=banned_ids,
                not_id=mask_id if threshold is not None else None)
    # the loop of ML-GSAI/LLaDA generate.py::generate: for each block, for each step: logits (guided) ->
    # x0_hat = Gumbel argmax -> confidence -> the k most confident masked positions of the block -> write them
    step = 0
    for nb in range(gen_length // block_length):
        start, end = P + nb * block_length, P + (nb + 1) * block_length
        # the span the random draws cover: everything (generate.py), the canvas (LLaDA-V) or the block (fast)
        d0, d1 = (start, end) if fast else (P, P + G) if llada_v else (0, L)
        if threshold is None:
            num_transfer_tokens = get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)  # (B, s)
            any_k = num_transfer_tokens.any(0).tolist()  # per step: does any row reveal? (read once a block)
        calls.new_block(start, end)
        window = (pos >= d0) & (pos < end)                                                   # (L,)
        for i in itertools.count() if threshold is not None else range(steps_per_block):
            allowed = revealable(x, mask_id, window, pos, P + stop if stop_sequences else None)  # (B, L)
            k = None if threshold is not None else num_transfer_tokens[:, i]                    # (B,)
            if (threshold is not None or llada_v) and not allowed.any():
                break  # block full (threshold), or LLaDA-V's early end; the official schedule runs all steps
            if (k is None or any_k[i]) and allowed.any():  # else more steps than masks: nothing to reveal
                lo = int(allowed.any(0).nonzero()[0])  # logits from the first revealable position to the block end
                logits = calls(x, i, lo, end)                                    # (B, W, V), guided if cfg_scale
                x0, x0_p = predict(logits, (d1 - d0, lo - d0), **pick)           # Gumbel argmax, its confidence
                confidence = torch.full(x.shape, -torch.inf, dtype=x0_p.dtype, device=dev)  # (B, L)
                confidence[:, lo:end] = torch.where(allowed[:, lo:end], x0_p, -torch.inf)
                reveal(x, x0, confidence, lo, k, threshold)                     # the k most confident
            if stop_sequences:
                stop = find_stop(x[:, P:P + G], stop_sequences, stop)
            if callback is not None:
                callback(x, step, nb)
            step += 1
    if stats is not None:
        stats.update(calls.stats)
    if not llada_v:
        return x
    return [x[b, P:P + int(stop[b])].tolist() + suffix for b in range(B)]


class CountingModel:
    """Wraps a model to count its calls (NFE); generate(stats=...) counts them too."""

    def __init__(self, model):
        self.model, self.nfe = model, 0

    def __call__(self, *args, **kwargs):
        self.nfe += 1
        return self.model(*args, **kwargs)


# Decoding modes by name, for sample.py (--mode, --eval), tools/bench.py and the README table.
MODES = {
    "exact":            dict(cache=None, threshold=False),
    "prefix":           dict(cache="prefix", threshold=False),
    "dual":             dict(cache="dual", threshold=False),
    "threshold":        dict(cache=None, threshold=True),
    "threshold+prefix": dict(cache="prefix", threshold=True),
    "threshold+dual":   dict(cache="dual", threshold=True),
}


def mode_kwargs(mode: str, threshold: float = 0.9) -> dict:
    """generate() keyword arguments for a named mode ('exact' = the official schedule, no cache)."""
    if mode not in MODES:
        raise ValueError(f"unknown decoding mode {mode!r}; choose from {', '.join(MODES)}")
    m = MODES[mode]
    return dict(cache=m["cache"], threshold=threshold if m["threshold"] else None)


# ----------------------------------------------------------------------------------------------
# Log-likelihood bound, multiple choice

def mc_mask_counts(b: int, A: int, generator=None):
    """The official stratified mask counts for b copies of an answer of A tokens: k ~ U{1..A}, then
    round(linspace(k, k + (b-1) A/b, b)) wrapped into 1..A. Each count is marginally U{1..A}."""
    k = torch.randint(1, A + 1, (), generator=generator)
    x = torch.round(torch.linspace(float(k), float(k) + (b - 1) * (A / b), steps=b)).long()
    return ((x - 1) % A) + 1  # (b,)


@torch.no_grad()
def get_log_likelihood(model, prompt, answer, mc_num=128, batch_size=16, cfg_scale=0.0, mask_id=126336,
                       generator=None, **model_kwargs):
    """Monte-Carlo lower bound on log p(answer | prompt), as the official get_log_likelihood.py.
    prompt (P,), answer (A,): 1-D token ids. mc_num // batch_size forward passes of batch_size copies.
    model_kwargs go to every call as they are, so they must fit batch_size rows (for LLaDA-V pass
    image_features=feats.expand(batch_size, -1, -1)). generator: torch.Generator for the masks."""
    if mc_num % batch_size:
        raise ValueError(f"mc_num={mc_num} must be a multiple of batch_size={batch_size}")
    P, A = len(prompt), len(answer)
    if A == 0:
        raise ValueError("the answer is empty; give at least one answer token")
    dev = prompt.device
    seq = torch.cat([prompt, answer])[None].repeat(batch_size, 1)                # (b, P + A)
    prompt_index = (torch.arange(P + A, device=dev) < P)[None]                   # (1, P + A)
    losses = []
    for _ in range(mc_num // batch_size):
        l = mc_mask_counts(batch_size, A, generator)                             # (b,)
        # copy j masks the answer positions whose rank in a random permutation is < l_j
        rank = torch.stack([torch.randperm(A, generator=generator) for _ in range(batch_size)])
        is_mask = (rank < l[:, None]).to(dev)                                    # (b, A)
        noisy = seq.clone()
        noisy[:, P:] = torch.where(is_mask, torch.full_like(noisy[:, P:], mask_id), noisy[:, P:])
        logits = cfg_logits(model, noisy, prompt_index, cfg_scale, mask_id, **model_kwargs)[:, P:]
        ce = F.cross_entropy(logits[is_mask].float(), seq[:, P:][is_mask], reduction="none")
        p_mask = (l.to(dev).float() / A)[:, None].expand(batch_size, A)[is_mask]
        losses.append((ce / p_mask).sum().item() / batch_size)
    return -sum(losses) / len(losses)


def choose(model, prompt, choices, **kw):
    """Multiple choice by likelihood: (index of the best choice, [log-likelihood bound per choice]).
    prompt (P,) and every choice (A_c,) are 1-D token ids; kw go to get_log_likelihood."""
    scores = [get_log_likelihood(model, prompt, c, **kw) for c in choices]
    return max(range(len(scores)), key=scores.__getitem__), scores
