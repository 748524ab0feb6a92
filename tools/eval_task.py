"""
The toy's held-out questions as a local lmms-eval task: no download, the same questions and the same
scoring rule as `python sample.py --eval`.

    write_toy_task(folder, image_size, seed, n)   # writes the task; tools/eval.py does it for you

The folder it writes is what lmms-eval's TaskManager(include_path=folder) reads:
    images/00000.png ...      the held-out images (PNG: lossless, so the pixels are the ones sample.py sees)
    questions.json            [{"id", "image", "question", "answer", "kind"}, ...], one record per question
    llada_v_toy.yaml          the task: dataset_path json + data_files (a local file), generate_until, metrics
    utils.py                  puts this repository on sys.path and takes the functions below
The questions are synthetic.SyntheticVQA(...).heldout(n) with the checkpoint's image size and training seed,
exactly what sample.py --eval draws; the score is synthetic.score (exact match after strip, and for
'describe' the per-object accuracy).
"""
import json
import os

TASK = "llada_v_toy"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

YAML = """\
# Written by tools/eval_task.py: the toy's held-out questions ({n}, seed {seed}, {size} px images).
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: describe_objects
    aggregation: !function utils.object_accuracy
    higher_is_better: true
metadata:
  - version: 0.0
"""

UTILS = """\
# Written by tools/eval_task.py: the task's functions live there, beside the scoring rule they reuse.
import sys
sys.path.insert(0, {repo!r})
from tools.eval_task import doc_to_visual, doc_to_text, process_results, object_accuracy  # noqa: E402,F401
"""


def write_toy_task(folder, image_size: int, seed: int = 0, n: int = 500) -> str:
    """Write the task for checkpoints trained on `image_size` px scenes with training seed `seed` (the
    held-out split depends on both); -> the folder. Rewrites the files it owns, touches nothing else."""
    from synthetic import HELDOUT_OFFSET, KINDS, make_sample
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    records = []
    for i in range(n):
        # = SyntheticVQA(..., seed=seed).heldout(n)[i]; the tokenizer and canvas it also takes do not enter
        img, q, a, kind = make_sample(HELDOUT_OFFSET + seed * 10**10 + i, image_size, KINDS[i % len(KINDS)])
        path = os.path.join(folder, "images", f"{i:05d}.png")
        img.save(path)
        records.append({"id": i, "image": os.path.abspath(path), "question": q, "answer": a, "kind": kind})
    data = os.path.abspath(os.path.join(folder, "questions.json"))
    with open(data, "w") as f:
        json.dump(records, f, indent=1)
    with open(os.path.join(folder, f"{TASK}.yaml"), "w") as f:
        f.write(YAML.format(task=TASK, n=n, seed=seed, size=image_size, data=json.dumps(data)))
    with open(os.path.join(folder, "utils.py"), "w") as f:
        f.write(UTILS.format(repo=REPO))
    return folder


# ----------------------------------------------------------------------------------------------
# The task's functions (lmms-eval calls them through the written utils.py)

def doc_to_visual(doc):
    """One record -> its image, as a list (lmms-eval's convention: a document may carry several)."""
    from PIL import Image
    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The question as sample.py asks it: no pre- or post-prompt (the toy was trained on bare questions)."""
    return doc["question"]


def process_results(doc, results):
    """synthetic.score on the model's answer: exact match, and (objects right, objects) for 'describe'."""
    from synthetic import score
    exact, hit, total = score(doc["kind"], results[0], doc["answer"])
    return {"exact_match": float(exact), "describe_objects": (hit, total)}


def object_accuracy(items):
    """Per-object accuracy over every 'describe' answer: objects right / objects, as sample.evaluate."""
    return sum(h for h, _ in items) / max(1, sum(t for _, t in items))
