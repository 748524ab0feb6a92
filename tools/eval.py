"""
lmms-eval scores it: an lmms-eval model for every checkpoint the project loads, and a command line.

    python -m tools.eval --checkpoint=out --tasks=llada_v_toy          # the toy: its held-out questions, offline
    python -m tools.eval --checkpoint=LLaDA-V --tasks=mmstar,mmmu_val  # the official weights on real benchmarks
    python -m tools.eval --checkpoint=out --mode=threshold+dual --batch_size=50   # any decoding mode, batched

Checkpoints: whatever sample.py loads (sample.load, the one loader): a train.py run folder or its ckpt.pt, a
Hugging Face LLaDA-V folder, or a text LLaDA folder. lmms-eval itself is not in requirements.txt: install it
with requirements-eval.txt as docs/eval.md says.

The model, LLaDAVEval (registered with lmms-eval as "llada_v"), answers through sample.answer, the one answer
path, in left-padded batches of --batch_size consecutive requests with the same settings, for every kind:
  - generate_until: the toy with its training run's canvas / steps / blocks, answers cut at <|eot_id|> / EOS
    (what `sample.py --eval` scores); a model answered the LLaDA-V way (official weights, a text LLaDA, a
    train.py run on LLaVA data: sample.load's `official`) with LLaDA-V's per-task settings (GEN_SETTINGS
    below) and lmms-eval's decoding (sample.answer(official=True, lmms_eval=True): special tokens skipped,
    one trailing "." dropped, white space stripped).
  - loglikelihood: the Monte-Carlo bound of LLaDA Eq. 6 (diffusion.get_log_likelihood, mc_num samples),
    and whether the continuation is also sample.answer's greedy answer (the official model's is_check_greedy).
Every decoding mode of diffusion.MODES applies to generate_until (--mode, --threshold, --refresh_every).
"""
import contextlib
import json
import tempfile
from dataclasses import dataclass

import torch

import sample
from cli import opt, parse_config, run_cli
from diffusion import MODES
from model import LLaDAV
from sample import DTYPES, SampleConfig

try:
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ImportError as e:
    raise SystemExit(f"tools/eval.py needs lmms-eval, which is not installed ({e}); install it over your torch "
                     f"as docs/eval.md says (pip install -c <your torch pin> -r requirements-eval.txt)") from None

# ----------------------------------------------------------------------------------------------
# LLaDA-V's generation settings per benchmark, as its evaluation ran them: the GEN_KWARGS of
# ML-GSAI/LLaDA-V eval/scripts/evaluate.sh (one `case` per task), read by the model file
# eval/lmms-eval/lmms_eval/models/llava_onevision_llada.py (Llava_OneVision_LLaDA.generate_until).
# Every row: temperature 0, cfg 0, low_confidence remasking. gen_length = block_length (one block);
# steps < gen_length reveals gen_length / steps tokens a step. think: the " /think" or " /no_think" suffix
# on the question. stop: stop strings before <|eot_id|>, which the model file always appends.
_CHOICE = dict(gen_length=2, block_length=2, steps=2, think="no_think")  # a letter (and maybe a ".")
GEN_SETTINGS = {
    **{t: _CHOICE for t in ("mmmu_val", "mmmu_pro_standard", "mmstar", "ai2d", "seedbench", "mmbench_en_dev",
                            "mmmu_pro_vision", "muirbench", "videomme", "mlvu_dev", "mme", "realworldqa")},
    "chartqa": dict(gen_length=16, block_length=16, steps=16, think="no_think", stop=("\n",)),
    "docvqa_val": dict(gen_length=32, block_length=32, steps=16, think="no_think"),
    "infovqa_val": dict(gen_length=32, block_length=32, steps=16, think="no_think"),
    "mathvista_testmini": dict(gen_length=96, block_length=96, steps=48, think="think"),
    "mathverse_testmini_vision": dict(gen_length=64, block_length=64, steps=32, think="think"),
}
OFFICIAL_DEFAULT = _CHOICE  # evaluate.sh's `*)` case, for any other task

# gen_kwargs keys (a task YAML's generation_kwargs, or lmms-eval's --gen_kwargs) that override a row, under
# the official model file's names; the rest (until, max_new_tokens, do_sample, ...) it ignores, and so do we.
OVERRIDES = {"gen_length": "gen_length", "block_length": "block_length", "steps": "steps", "gen_steps": "steps",
             "temperature": "temperature", "cfg": "cfg_scale", "remasking": "remasking", "think_mode": "think",
             "stopping_criteria": "stop"}


@register_model("llada_v")
class LLaDAVEval(lmms):
    """lmms-eval's model interface over sample.load and sample.answer (see the module docstring).
    checkpoint, device, dtype, tokenizer: sample.py's options of those names (a SampleConfig for sample.load).
    mode / threshold / refresh_every: the decoding mode (diffusion.MODES). batch_size: consecutive requests with
    the same settings decoded together (1, the default, is how the official evaluation runs LLaDA-V).
    mc_num / mc_batch: Monte-Carlo samples per likelihood and copies per forward pass (the official model
    file's mc_num=128, batch_size_ppl=32). greedy_check: loglikelihood's second value (costs one generation).
    Anything else lmms-eval passes (max_batch_size, ...) is accepted and ignored."""

    def __init__(self, checkpoint="out", device="auto", batch_size=1, mode="exact", threshold=0.9, refresh_every=0,
                 dtype="auto", mc_num=128, mc_batch=32, greedy_check=True, seed=0, tokenizer="", **_):
        super().__init__()
        from cli import pick_device
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
        if int(mc_num) % int(mc_batch):
            raise ValueError(f"mc_num={mc_num} must be a multiple of mc_batch={mc_batch}")
        # sample.py's own options and checks (a missing checkpoint, a bad dtype: one line), then its loader
        sc = parse_config(SampleConfig, [f"--checkpoint={checkpoint}", f"--device={device or 'auto'}",
                                         f"--dtype={dtype}", f"--tokenizer={tokenizer}"])
        self.device_ = pick_device(sc.device)
        self.model, self.tok, self.official, self.defaults = sample.load(sc, self.device_)
        self.batch_size_ = int(batch_size)
        self.decoding = dict(mode=mode, threshold=float(threshold), refresh_every=int(refresh_every))
        self.mc_num, self.mc_batch = int(mc_num), int(mc_batch)
        self.greedy_check = str(greedy_check).lower() not in ("0", "false", "no")
        self.seed = int(seed)

    # -- settings ---------------------------------------------------------------------------------
    def settings(self, task: str, gen_kwargs: dict) -> dict:
        """The sampler settings for one request: the toy's training run (as sample.py --eval), or LLaDA-V's
        row for the task (GEN_SETTINGS), then any official-named key in gen_kwargs on top."""
        if self.official:
            s = dict(GEN_SETTINGS.get(task, OFFICIAL_DEFAULT))
        else:
            s = {k: self.defaults[k] for k in ("gen_length", "steps", "block_length")}
        s.update(temperature=0.0, cfg_scale=0.0, remasking="low_confidence", **{
            OVERRIDES[k]: v for k, v in (gen_kwargs or {}).items() if k in OVERRIDES})
        if isinstance(s.get("stop"), str):
            s["stop"] = (s["stop"],)
        return s

    def answer_options(self, s: dict) -> dict:
        """settings() -> sample.answer's keywords. The toy was trained without a think switch or stop strings
        (its own <|eot_id|> / EOS cut); the official way appends <|eot_id|> to the stops as the model file
        does, reads the answer as lmms-eval did, and sends the think switch to LLaDA-V only (a text LLaDA
        was not trained on it)."""
        s = dict(s)
        think, stop = s.pop("think", None), tuple(s.pop("stop", ()))
        if not self.official:
            return s
        return dict(s, official=True, lmms_eval=True, think=think if isinstance(self.model, LLaDAV) else None,
                    stop=stop + ("<|eot_id|>",))

    def _visual(self, doc_to_visual, task, split, doc_id):
        """The request's image (a PIL image) or None; one line for what sample.answer cannot take."""
        visual = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        visual = [v for v in (visual or []) if v is not None]
        if not visual:
            return None
        if len(visual) > 1 or isinstance(visual[0], str):
            raise ValueError(f"task {task}: a document with {len(visual)} images or a video; tools/eval.py answers "
                             f"one image per question (sample.answer)")
        return visual[0].convert("RGB")

    # -- generation -------------------------------------------------------------------------------
    def generate_until(self, requests) -> list:
        """Answer every request (context, gen_kwargs, doc_to_visual, doc_id, task, split) -> answer strings,
        in the order of the requests: runs of up to batch_size consecutive requests with the same settings
        go through sample.answer as one left-padded batch (for the toy, the same call as sample.evaluate,
        so the answers equal `sample.py --eval`'s)."""
        out, i = [], 0
        torch.manual_seed(self.seed)  # T > 0 or random remasking: reproducible
        while i < len(requests):
            s = self.settings(requests[i].args[4], requests[i].args[1])
            j = i + 1
            while j < len(requests) and j - i < self.batch_size_ and \
                    self.settings(requests[j].args[4], requests[j].args[1]) == s:
                j += 1
            batch = [r.args for r in requests[i:j]]  # (context, gen_kwargs, doc_to_visual, doc_id, task, split)
            images = [self._visual(dtv, task, split, doc_id) for _, _, dtv, doc_id, task, split in batch]
            out += sample.answer(self.model, self.tok, images, [a[0] for a in batch], **self.answer_options(s),
                                 **self.decoding)
            i = j
        return out

    def generate_until_multi_round(self, requests) -> list:
        raise NotImplementedError("multi-round tasks are not supported by tools/eval.py; use a single-turn task")

    # -- likelihood -------------------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood(self, requests) -> list:
        """(log-likelihood bound, is greedy) per request (context, continuation or doc_to_target, doc_to_visual,
        doc_id, task, split). The prompt is sample.answer's (data.prompt_batch, the image first); the
        continuation is what the model was trained to write there: for the toy the training canvas (answer,
        <|eot_id|>, EOS padding to gen_length, as sample.evaluate_choice), for the official way the answer
        and <|eot_id|> (the model file's conversation with the answer filled in)."""
        from cli import autocast
        from data import default_system, prompt_batch, sft_example
        from diffusion import get_log_likelihood
        g = torch.Generator().manual_seed(self.seed)
        dev, model, tok, res = self.device_, self.model, self.tok, []
        is_v = isinstance(model, LLaDAV)  # a text-only LLaDA takes embeddings, and no image
        fn = model if is_v else lambda x, attention_mask=None, **k: model(model.embed_tokens(x), attention_mask, **k)
        system = default_system(model.cfg.tokenizer) if is_v else None
        # as sample.answer: the toy under autocast, a model answered the official way in its own dtype
        amp = contextlib.nullcontext if self.official else lambda: autocast(dev)
        for r in requests:
            ctx, target, dtv, doc_id, task, split = r.args
            cont = (target if isinstance(target, str) else str(target(self.task_dict[task][split][doc_id]))).strip()
            img = self._visual(dtv, task, split, doc_id)
            if img is not None and not is_v:
                raise ValueError(f"task {task}: an image question for a text-only LLaDA")
            with amp():
                feats, counts = sample.image_tokens(model, [img])  # (N, d) or None, [N]
            if self.official:
                prompt = prompt_batch(tok, [ctx], counts, system, keep_after_image=False)[0][0].tolist()
                ans = tok.encode(cont) + [tok.eot_id]
            else:
                ids, labels = sft_example(tok, ctx, cont, self.defaults["gen_length"], counts[0], system)
                P = labels.count(-100)  # the prompt: every position whose label is IGNORE_INDEX
                prompt, ans = ids[:P], ids[P:]
            kw = {} if feats is None else {"image_features": feats.repeat(self.mc_batch, 1)}  # (b N, d), in order
            with amp():
                ll = get_log_likelihood(fn, torch.tensor(prompt, device=dev), torch.tensor(ans, device=dev),
                                        mc_num=self.mc_num, batch_size=self.mc_batch, mask_id=tok.mask_id,
                                        generator=g, **kw)
            res.append((float(ll), bool(self.greedy_check and self.is_greedy(task, img, ctx, cont, len(ans)))))
        return res

    def is_greedy(self, task, img, ctx, cont, A: int) -> bool:
        """Does sample.answer at temperature 0, exact decoding, write exactly `cont`? The toy: with its own
        settings; the official way: a canvas of the continuation's A tokens in one block (is_check_greedy)."""
        s = self.settings(task, {})
        if self.official:
            s = dict(gen_length=A, steps=A, block_length=A, temperature=0.0, cfg_scale=0.0, remasking="low_confidence")
        return sample.answer(self.model, self.tok, [img], [ctx], **self.answer_options(s))[0] == cont


# ----------------------------------------------------------------------------------------------
# Running it: lmms-eval's own evaluator over the named tasks

TOY_TASK = "llada_v_toy"


def evaluate(lm: LLaDAVEval, tasks: list, toy_n: int = 500, limit=None, task_dir: str = "",
             include_path: str = "", log_samples: bool = True) -> dict:
    """lmms_eval.evaluator.simple_evaluate over `tasks` with this model -> its results dict ("results" per
    task, and with log_samples "samples": each document's answers). The toy task (TOY_TASK) is written first
    for this checkpoint's image size and training seed into task_dir (default: a temporary folder)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    paths = [p for p in include_path.split(",") if p]
    tmp = None
    if TOY_TASK in tasks:
        if lm.official:
            raise ValueError(f"--tasks={TOY_TASK} is the toy's held-out questions; it needs a toy checkpoint of "
                             f"train.py (trained on synthetic scenes, not on LLaVA data)")
        from tools.eval_task import write_toy_task
        task_dir = task_dir or (tmp := tempfile.TemporaryDirectory(prefix="llada_v_toy_")).name
        paths.append(write_toy_task(task_dir, lm.model.cfg.vision.image_size, lm.defaults["seed"], toy_n))
    # the built-in task index (hundreds of YAML files) only when a built-in task is asked for
    builtin = any(t != TOY_TASK for t in tasks)
    try:
        tm = TaskManager("WARNING", include_path=paths or None, include_defaults=builtin)
        unknown = [t for t in tasks if t not in tm.all_tasks]
        if unknown:
            raise ValueError(f"unknown lmms-eval task(s) {', '.join(unknown)}; use {TOY_TASK} or an lmms-eval task "
                             f"name (mmstar, mmmu_val, ... see docs/eval.md)")
        return simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, log_samples=log_samples,
                               bootstrap_iters=0, batch_size=lm.batch_size_, verbosity="WARNING")
    finally:
        if tmp is not None:
            tmp.cleanup()


def sample_answers(results: dict, task: str) -> dict:
    """{doc_id: the model's answer} from simple_evaluate's logged samples."""
    out = {}
    for s in results["samples"][task]:
        resp = s["resps"][0]
        out[s["doc_id"]] = resp[0] if isinstance(resp, (list, tuple)) else resp
    return out


@dataclass
class EvalConfig:
    # The options of tools/eval.py, --key=value (the project's one parser; --help lists them with these notes).
    checkpoint: str = opt("out", path="any")   # as sample.py's: a train.py run folder or its ckpt.pt, or a Hugging
                                               # Face LLaDA-V / LLaDA folder
    tasks: str = TOY_TASK                      # comma-separated lmms-eval tasks (llada_v_toy: the toy's held-out questions)
    mode: str = opt("exact", choices=tuple(MODES))  # decoding mode (diffusion.py): exact, KV caches, threshold
    threshold: float = opt(0.9, min=0)         # confidence threshold of the threshold modes
    refresh_every: int = opt(0, min=0)         # cached modes: refresh the cache every N steps (0: at block starts)
    batch_size: int = opt(1, min=1)            # questions decoded together, left-padded (1: as the official evaluation)
    device: str = opt("auto", device=True)     # auto = cuda > cpu
    dtype: str = opt("auto", choices=("auto", *DTYPES))  # as sample.py's: the weights' dtype when answered the
                                                         # official way; auto: fp16 on CUDA, as stored on CPU
    tokenizer: str = opt("", path="any", also=("toy",))  # as sample.py's: tokenizer.json or folder (default: the
                                                         # checkpoint's)
    n: int = opt(500, min=1)                   # questions in the toy task (sample.py --eval's --n)
    limit: int | None = opt(None, min=1)       # score only the first N documents of each task (a quick look)
    mc_num: int = opt(128, min=1)              # Monte-Carlo samples per likelihood (loglikelihood tasks)
    mc_batch: int = opt(32, min=1)             # copies per forward pass of the likelihood; lower it if memory runs out
    task_dir: str = ""                         # keep the toy task here (default: a temporary folder)
    include_path: str = ""                     # more lmms-eval task folders, comma-separated
    output: str = opt("", out="file", suffix=".json")  # write the scores and every answer here
    seed: int = opt(0, min=0)                  # the sampler's randomness (T > 0) and the likelihood's masks

    def check(self):
        if not [t for t in self.tasks.split(",") if t]:
            raise ValueError("--tasks is empty; name at least one task, e.g. --tasks=llada_v_toy")


def main(argv):
    """python -m tools.eval --key=value ...: load, evaluate with lmms-eval, print one line per task's metrics."""
    ec = parse_config(EvalConfig, argv, __doc__)
    lm = LLaDAVEval(ec.checkpoint, ec.device, ec.batch_size, ec.mode, ec.threshold, ec.refresh_every, ec.dtype,
                    ec.mc_num, ec.mc_batch, seed=ec.seed, tokenizer=ec.tokenizer)
    tasks = [t for t in ec.tasks.split(",") if t]
    res = evaluate(lm, tasks, ec.n, ec.limit, ec.task_dir, ec.include_path)
    for task, metrics in res["results"].items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown} ({ec.mode} decoding, checkpoint {ec.checkpoint})")
    if ec.output:
        keep = {"results": res["results"], "config": vars(ec),
                "answers": {t: sample_answers(res, t) for t in res.get("samples", {})}}
        with open(ec.output, "w") as f:
            json.dump(keep, f, indent=1, default=str)
        print(f"wrote {ec.output}")


if __name__ == "__main__":
    run_cli(main)  # a bad option or file: one line, no traceback (LLADA_DEBUG=1 shows it)
