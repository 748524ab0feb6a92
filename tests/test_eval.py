"""tools/eval.py through the real lmms-eval evaluator: the toy task scores as sample.py --eval, answer for answer;
the official way answers as sample.answer(official=True, lmms_eval=True), in batches too.

    python -m pytest -q tests/test_eval.py

Needs lmms-eval (requirements-eval.txt; CI installs it); skipped with that reason where it is not installed.
"""
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (requirements-eval.txt, installed as "
                                        "docs/eval.md says); CI installs it and runs these tests")

import sample  # noqa: E402
from conftest import narrow_llada_v, run_train, tiny_llm  # noqa: E402
from diffusion import get_log_likelihood  # noqa: E402
from synthetic import SyntheticVQA, toy_tokenizer  # noqa: E402
from tools.eval import TOY_TASK, LLaDAVEval, evaluate, sample_answers  # noqa: E402

torch.set_num_threads(1)
N = 24  # held-out questions: every kind four times


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy checkpoint trained just long enough to answer with words (a few of them right): (out_dir, model, tok,
    sampler defaults), loaded as sample.py loads it (sample.load)."""
    out = tmp_path_factory.mktemp("toy")
    run_train(out, "--max_steps=200", "--lr=3e-3")
    model, tok, official, defaults = sample.load(sample.SampleConfig(checkpoint=str(out)), torch.device("cpu"))
    assert not official  # the toy is answered its own way
    return out, model, tok, defaults


def sample_py_answers(model, tok, tc, batch_size, **decoding):
    """What `sample.py --eval` answers and scores on the same questions: its held-out split and its sampler
    settings (the training run's: sample.load's defaults), through sample.answer in chunks of batch_size as
    sample.evaluate runs it."""
    G = tc["gen_length"]
    gen = dict(gen_length=G, steps=tc["steps"], block_length=tc["block_length"], **decoding)
    samples = SyntheticVQA(tok, model.cfg.vision.image_size, model.cfg.vision.n_patches, G,
                           seed=tc["seed"]).heldout(N)
    answers = []
    for i in range(0, N, batch_size):
        chunk = samples[i:i + batch_size]
        answers += sample.answer(model, tok, [s[0] for s in chunk], [s[1] for s in chunk], **gen)
    return answers, sample.evaluate(model, tok, samples, batch_size=batch_size, **gen)


@pytest.mark.parametrize("mode,batch_size", [("exact", 5), ("threshold+dual", 8)])
def test_toy_task_scores_as_sample_eval(toy, mode, batch_size):
    """lmms-eval's simple_evaluate on the written toy task, in left-padded batches larger than one: every answer
    equals sample.py's on the same question, and the exact-match score equals sample.evaluate's."""
    out, model, tok, tc = toy
    lm = LLaDAVEval(str(out), device="cpu", batch_size=batch_size, mode=mode)
    res = evaluate(lm, [TOY_TASK], toy_n=N)
    got = sample_answers(res, TOY_TASK)
    want, ref = sample_py_answers(model, tok, tc, batch_size, mode=mode)
    assert [got[i] for i in range(N)] == want
    # real, varied answers, some right: the comparison is not of N empty strings, nor of two zero scores
    assert len({a for a in want if a}) >= 3 and ref["all"] > 0
    assert res["results"][TOY_TASK]["exact_match,none"] == pytest.approx(ref["all"])
    assert res["results"][TOY_TASK]["describe_objects,none"] == pytest.approx(ref["describe_objects"])


def test_cli_writes_scores(toy, tmp_path):
    """python -m tools.eval --checkpoint=<out_dir>: the command line runs the toy task and writes its answers."""
    import json
    from tools.eval import main
    out, *_ = toy
    main([f"--checkpoint={out}", "--n=4", "--batch_size=4", f"--output={tmp_path / 'r.json'}",
          f"--task_dir={tmp_path / 'task'}"])
    r = json.loads((tmp_path / "r.json").read_text())
    assert len(r["answers"][TOY_TASK]) == 4 and "exact_match,none" in r["results"][TOY_TASK]
    assert (tmp_path / "task" / "questions.json").exists()  # --task_dir keeps the task


def request(task, *args):
    return SimpleNamespace(args=(args[0], args[1], args[2], 0, task, "test"))


def test_loglikelihood_is_the_monte_carlo_bound(toy):
    """loglikelihood = diffusion.get_log_likelihood on the training canvas with the same masks; its greedy flag
    is True for the sampler's own answer and False for another."""
    out, model, tok, tc = toy
    lm = LLaDAVEval(str(out), device="cpu", mc_num=8, mc_batch=4)
    img, q, truth, kind = SyntheticVQA(tok, model.cfg.vision.image_size, 0, tc["gen_length"]).heldout(1)[0]
    lm.task_dict = {"t": {"test": [{"img": img}]}}
    own = sample_py_answers(model, tok, tc, 1)[0][0]
    other = "purple hexagon" if own != "purple hexagon" else "red"
    (ll_own, greedy_own), (ll_other, greedy_other) = lm.loglikelihood(
        [request("t", q, own, lambda d: [d["img"]]), request("t", q, other, lambda d: [d["img"]])])
    assert greedy_own and not greedy_other
    from data import default_system, sft_example
    from vision import preprocess
    feats = model.encode_images(preprocess(img, model.cfg.vision.image_size)[None])
    ids, labels = sft_example(tok, q, own, tc["gen_length"], feats.shape[1], default_system(model.cfg.tokenizer))
    P = labels.count(-100)
    ref = get_log_likelihood(model, torch.tensor(ids[:P]), torch.tensor(ids[P:]), mc_num=8, batch_size=4,
                             mask_id=tok.mask_id, generator=torch.Generator().manual_seed(0),
                             image_features=feats.expand(4, -1, -1))
    assert ll_own == pytest.approx(ref)
    assert ll_other != pytest.approx(ll_own)


def test_official_settings_reach_answer(tmp_path):
    """A Hugging Face LLaDA-V folder (a tiny one with the real key names): each task gets LLaDA-V's row (here
    chartqa: 16 tokens, a "\\n" stop before <|eot_id|>, /no_think), gen_kwargs under the official names override
    it, and the answer is sample.answer's the official way with lmms-eval's decoding; a text-only LLaDA gets the
    row without the think switch."""
    from checkpoint import save_pretrained
    tok = toy_tokenizer()
    save_pretrained(narrow_llada_v(vocab_size=512, image_size=32, patch_size=8), tmp_path / "v")
    lm = LLaDAVEval(str(tmp_path / "v"), device="cpu", tokenizer="toy")
    vlm = lm.model
    assert lm.official and type(vlm).__name__ == "LLaDAV"
    s = lm.settings("chartqa", {"until": ["\n\n"], "max_new_tokens": 5})
    assert (s["gen_length"], s["steps"], s["block_length"], s["stop"], s["think"]) == (16, 16, 16, ("\n",), "no_think")
    assert lm.settings("chartqa", {"gen_length": 8, "gen_steps": 4})["steps"] == 4
    img, q, _, _ = SyntheticVQA(tok, 32, 16, 16).heldout(1)[0]
    lm.task_dict = {"chartqa": {"test": [{"img": img}]}}
    (got,) = lm.generate_until([request("chartqa", q, {}, lambda d: [d["img"]])])
    torch.manual_seed(0)
    want = sample.answer(vlm, tok, [img], [q], official=True, lmms_eval=True, gen_length=16, steps=16,
                         block_length=16, think="no_think", stop=("\n", "<|eot_id|>"))
    assert [got] == want
    # the think switch and the "\n" stop reach the sampler: without them the answer is another one here
    other = sample.answer(vlm, tok, [img], [q], official=True, lmms_eval=True, gen_length=16, steps=16,
                          block_length=16)
    assert other != want
    save_pretrained(tiny_llm(vocab_size=512, max_seq_len=256), tmp_path / "t")  # a text LLaDA folder
    lm = LLaDAVEval(str(tmp_path / "t"), device="cpu", tokenizer="toy")
    llm = lm.model
    lm.task_dict = {"mmstar": {"test": [{}]}}
    (got,) = lm.generate_until([request("mmstar", q, {}, None)])
    assert [got] == sample.answer(llm, tok, None, [q], official=True, lmms_eval=True, gen_length=2, steps=2,
                                  block_length=2)


@pytest.mark.parametrize("mode", ["exact", "threshold+dual"])
def test_official_batches_answer_as_batch_one(tmp_path, monkeypatch, mode):
    """The official way in left-padded batches (--batch_size > 1): at temperature 0 every answer equals the one
    batch 1 gives, with questions of different lengths (so rows are padded), with and without an image, across
    two tasks whose settings differ (consecutive requests with the same settings share a batch, the others not)."""
    from checkpoint import save_pretrained
    tok = toy_tokenizer()
    save_pretrained(narrow_llada_v(vocab_size=512, image_size=32, patch_size=8), tmp_path / "v")
    samples = SyntheticVQA(tok, 32, 16, 16).heldout(6)
    docs = [{"img": img} for img, *_ in samples]
    docs[2] = {}  # a question without an image, between two with one
    tasks = ["docvqa_val"] * 4 + ["chartqa"] * 2  # 32 / 16 / 32 tokens, then 16 / 16 / 16 with a "\n" stop
    visual = lambda d: [d["img"]] if d else None  # noqa: E731
    reqs = [SimpleNamespace(args=(q + " Answer briefly." * (i % 3), {}, visual, i, t, "test"))  # 3 prompt lengths
            for i, ((_, q, _, _), t) in enumerate(zip(samples, tasks))]
    sizes, answer = [], sample.answer

    def counting_answer(model, tok, images, questions, **kw):  # records each call's batch size
        sizes.append(len(questions))
        return answer(model, tok, images, questions, **kw)
    monkeypatch.setattr(sample, "answer", counting_answer)
    got = {}
    for bs in (1, 3):
        lm = LLaDAVEval(str(tmp_path / "v"), device="cpu", tokenizer="toy", batch_size=bs, mode=mode)
        lm.task_dict = {t: {"test": docs} for t in set(tasks)}
        sizes.clear()
        got[bs] = lm.generate_until(reqs)
        assert sizes == ([1] * 6 if bs == 1 else [3, 1, 2])  # docvqa_val's 4 as 3 + 1, then chartqa's 2
    assert got[3] == got[1]
    assert len(set(got[1])) >= 3  # varied answers: not six empty strings
