"""Tests for data.py: LLaDA-V's chat template (GSAI-ML/LLaDA-8B-Instruct tokenizer_config.json; ML-GSAI/LLaDA-V
train/llava/conversation.py (conv_llava_llada, conv_llada_plain), train/llava/train/train.py::preprocess_llada), SFT
sequences with answer masks, and batching (right padding for training, left padding for sampling). CPU only.

    python -m pytest -q tests/test_data.py
"""


import pytest
import torch

import data
import synthetic
from data import IGNORE_INDEX
from tokenizer import IMAGE_TOKEN_INDEX

TOK = synthetic.toy_tokenizer()
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
# Written out here, not imported, so that the test checks data.py against LLaDA-V's template (ML-GSAI/LLaDA-V
# train/llava/conversation.py::conv_llava_llada).
LLADA_V_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                  "that the user provides, and assist the user with a variety of tasks using natural language.")

def test_default_messages_match_llada_v_template():
    """Default messages, rendered == the string of ML-GSAI/LLaDA-V train/llava/conversation.py::conv_llava_llada with
    LLaDA-V's system prompt."""
    want = ("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\n" + LLADA_V_SYSTEM + "<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is in the picture?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert data.chat_template(data.llada_v_messages("What is in the picture?")) == want
    assert data.default_system("toy") is None and data.default_system("llada-v") == LLADA_V_SYSTEM


def prompt(question, system=data.SYSTEM_PROMPT, n_images=1):
    return data.chat_template(data.llada_v_messages(question, system, n_images))


def test_prompt_without_system():
    """No system: BOS once, user turn with trimmed content, ends with the assistant header; n_images=0
    leaves out "<image>\\n"."""
    p = prompt("  How many?\n ", system=None)
    assert p == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n<image>\nHow many?<|eot_id|>"
                 + ASSISTANT_HEADER)
    assert prompt(" Hi ", system=None, n_images=0) == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>" + ASSISTANT_HEADER)
    q = prompt("Q", system="  Be brief.  ")
    assert q.count("<|startoftext|>") == 1 and q.startswith("<|startoftext|>") and "\n\nBe brief.<|eot_id|>" in q
    assert q.endswith(ASSISTANT_HEADER)


def test_encode_with_image():
    """"<image>" becomes exactly n contiguous -200 ids where it stood; text around it is encoded as usual."""
    pre, post = "<|startoftext|>user\n\n", "\nWhat color is the circle?"
    ids = TOK.encode_with_image(pre + "<image>" + post, 7)
    start = len(TOK.encode(pre))
    assert ids == TOK.encode(pre) + [IMAGE_TOKEN_INDEX] * 7 + TOK.encode(post)
    assert ids[start:start + 7] == [IMAGE_TOKEN_INDEX] * 7 and ids.count(IMAGE_TOKEN_INDEX) == 7
    assert TOK.encode_with_image("a<image>b<image>", 3).count(IMAGE_TOKEN_INDEX) == 6
    assert IMAGE_TOKEN_INDEX not in TOK.encode_with_image("no image here", 7)


def test_sft_example_layout():
    """ids = prompt ++ answer ++ eot ++ EOS*; labels -100 exactly on the prompt (image included) and equal
    to ids on the gen_length answer canvas."""
    G, n_img = 10, 5
    ids, labels = data.sft_example(TOK, "What color is the circle?", "red", G, n_img)
    P = len(ids) - G
    assert len(labels) == len(ids)
    assert labels[:P] == [IGNORE_INDEX] * P and IGNORE_INDEX not in labels[P:]
    assert labels[P:] == ids[P:]
    ans = TOK.encode("red")
    assert ids[P:] == ans + [TOK.eot_id] + [TOK.eos_id] * (G - len(ans) - 1)
    assert ids[:P] == TOK.encode_with_image(prompt("What color is the circle?", None), n_img)
    assert ids[:P].count(IMAGE_TOKEN_INDEX) == n_img
    assert ids[P - 4:P] == TOK.encode(ASSISTANT_HEADER)
    # a system turn lands in the (ignored) prompt only
    ids_s, labels_s = data.sft_example(TOK, "Q?", "red", G, n_img, system=LLADA_V_SYSTEM)
    assert ids_s[-G:] == ids[-G:] and labels_s.count(IGNORE_INDEX) == len(ids_s) - G


def test_sft_example_answer_must_fit():
    """An answer plus eot that exactly fills the canvas is fine (no EOS); one token more is a ValueError
    naming gen_length."""
    answer = "red circle, blue square, green triangle"
    n = len(TOK.encode(answer)) + 1
    ids, _ = data.sft_example(TOK, "Describe the image.", answer, n, 2)
    assert ids[-1] == TOK.eot_id and TOK.eos_id not in ids[-n:]
    with pytest.raises(ValueError, match="gen_length"):
        data.sft_example(TOK, "Describe the image.", answer, n - 1, 2)


def test_collate_right_pads():
    """collate right-pads with pad_id; padding has attention 0 and label -100; content is untouched."""
    ex = [([5, 6, 7], [-100, 6, 7]), ([1, 2, 3, 4, 9], [-100, -100, 3, 4, 9])]
    ids, labels, attn = data.collate(ex, pad_id=TOK.pad_id)
    assert ids.shape == labels.shape == attn.shape == (2, 5) and attn.dtype == torch.bool
    assert ids[0].tolist() == [5, 6, 7, TOK.pad_id, TOK.pad_id] and ids[1].tolist() == [1, 2, 3, 4, 9]
    assert labels[0].tolist() == [-100, 6, 7, -100, -100] and labels[1].tolist() == [-100, -100, 3, 4, 9]
    assert attn.tolist() == [[True] * 3 + [False] * 2, [True] * 5]


def test_prompt_batch_left_pads():
    """prompt_batch left-pads: every row ends with the assistant header, pads sit left with attention 0,
    and each unpadded row is the prompt's own encoding."""
    qs = ["Describe the image.", "Where is the red circle relative to the blue square?"]
    ids, attn = data.prompt_batch(TOK, qs, 4)
    head = TOK.encode(ASSISTANT_HEADER)
    for i, q in enumerate(qs):
        p = TOK.encode_with_image(prompt(q, None), 4)
        n_pad = ids.shape[1] - len(p)
        assert ids[i, n_pad:].tolist() == p and ids[i, -len(head):].tolist() == head
        assert (ids[i, :n_pad] == TOK.pad_id).all()
        assert attn[i].tolist() == [False] * n_pad + [True] * len(p)
    assert not attn[0, 0] and attn[1].all()  # the shorter prompt is padded


def test_answer_text_stops_at_eot_or_eos():
    """answer_text decodes up to the first <|eot_id|> or EOS and strips spaces."""
    ids = TOK.encode(" red circle") + [TOK.eot_id] + TOK.encode("junk") + [TOK.eos_id]
    assert data.answer_text(TOK, ids) == "red circle"
    assert data.answer_text(TOK, TOK.encode("two") + [TOK.eos_id, TOK.eot_id] + TOK.encode("x")) == "two"


def test_chat_template_llada_instruct_and_llada_v():
    """LLaDA-8B-Instruct's template (GSAI-ML/LLaDA-8B-Instruct tokenizer_config.json): BOS once, trimmed contents,
    assistant header always at the end; LLaDA-V's messages: system prompt, <image> first in the first user turn, think
    suffixes."""
    assert data.chat_template([{"role": "user", "content": " What is 2+2? "}]) == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    one = data.chat_template(data.llada_v_messages("What is it?"))
    assert one.endswith("user<|end_header_id|>\n\n<image>\nWhat is it?<|eot_id|>" + ASSISTANT_HEADER)
    multi = data.chat_template(data.llada_v_messages("And now?", think="think", history=[("Hi", "Hello!")]))
    assert multi == ("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\n" + data.SYSTEM_PROMPT + "<|eot_id|>"
                     "<|start_header_id|>user<|end_header_id|>\n\n<image>\nHi /think<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                     "<|start_header_id|>user<|end_header_id|>\n\nAnd now? /think<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert data.chat_template(data.llada_v_messages("Q", None, 0, "no_think")).endswith(
        "user<|end_header_id|>\n\nQ /no_think<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert multi.count("<|startoftext|>") == 1
    with pytest.raises(ValueError, match="think"):
        data.llada_v_messages("Q", think="yes")


# The stage 2-3 batch order: a transcription of LLaVA's llava_trainer.py (split_to_even_chunks,
# get_length_grouped_indices, get_modality_length_grouped_indices), as LLaDA-V's LengthGroupedSampler calls it:
# batch_size = the per-device batch, world_size = processes x accumulation. Written here independently; the random
# permutations (torch.randperm there) come from `randperm`, drawn in the official order.

def official_split_to_even_chunks(indices, lengths, num_chunks):
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks, chunk_lengths = [[] for _ in range(num_chunks)], [0] * num_chunks
    for index in indices:
        shortest = chunk_lengths.index(min(chunk_lengths))
        chunks[shortest].append(index)
        chunk_lengths[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            chunk_lengths[shortest] = float("inf")
    return chunks


def official_length_grouped(lengths, batch_size, world_size, randperm):
    indices = randperm(len(lengths))
    mega = world_size * batch_size
    megabatches = [indices[i:i + mega] for i in range(0, len(lengths), mega)]
    megabatches = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megabatches]
    megabatches = [official_split_to_even_chunks(m, lengths, world_size) for m in megabatches]
    return [i for m in megabatches for batch in m for i in batch]


def official_modality_grouped(lengths, batch_size, world_size, randperm):
    if all(l > 0 for l in lengths) or all(l < 0 for l in lengths):
        return official_length_grouped(lengths, batch_size, world_size, randperm)
    mm_indices, mm_lengths = zip(*[(i, l) for i, l in enumerate(lengths) if l > 0])
    lang_indices, lang_lengths = zip(*[(i, -l) for i, l in enumerate(lengths) if l < 0])
    mm_shuffle = [mm_indices[i] for i in official_length_grouped(mm_lengths, batch_size, world_size, randperm)]
    lang_shuffle = [lang_indices[i] for i in official_length_grouped(lang_lengths, batch_size, world_size, randperm)]
    mega = world_size * batch_size
    mm_megabatches = [mm_shuffle[i:i + mega] for i in range(0, len(mm_shuffle), mega)]
    lang_megabatches = [lang_shuffle[i:i + mega] for i in range(0, len(lang_shuffle), mega)]
    additional_batch = mm_megabatches[-1] + lang_megabatches[-1]
    megabatches = mm_megabatches[:-1] + lang_megabatches[:-1]
    megabatches = [megabatches[i] for i in randperm(len(megabatches))]
    if additional_batch:
        megabatches.append(sorted(additional_batch))
    return [i for m in megabatches for i in m]


@pytest.mark.parametrize("n_image,n_text,micro,chunks", [(40, 25, 1, 8), (37, 0, 2, 4), (0, 30, 1, 4),
                                                          (17, 9, 2, 2), (64, 64, 4, 2), (5, 3, 1, 4)])
def test_length_grouped_batches_follow_the_official_sampler(n_image, n_text, micro, chunks):
    """data.length_grouped_batches == the official index stream cut into global batches of micro x chunks
    (chunks = processes x accumulation; HF's dataloader hands out consecutive per-device batches), whole ones
    only, for mixed, image-only and text-only data, given the same random permutations."""
    import random
    rng = random.Random(7 * 1_000_003 + 2)  # what length_grouped_batches(seed=7, epoch=2) draws from
    lengths = [1 + (i * 37) % 23 for i in range(n_image)] + [-(1 + (i * 11) % 17) for i in range(n_text)]
    random.Random(n_image).shuffle(lengths)  # the two kinds interleaved in the file

    def randperm(n):
        idx = list(range(n))
        rng.shuffle(idx)
        return idx
    stream = official_modality_grouped(lengths, micro, chunks, randperm)
    G = micro * chunks
    want = [stream[s:s + G] for s in range(0, len(stream) - G + 1, G)]
    got = data.length_grouped_batches(lengths, G, seed=7, epoch=2, micro=micro)
    assert got == want and len(got) == len(lengths) // G
    # what it means: every global batch but the epoch's last ones holds one kind of record, and with one
    # sample per micro-batch it runs longest first (micro-batch k goes to process k mod W, step k // W); data of
    # one kind keeps the sign, so an all-text epoch runs shortest first (the official quirk, kept)
    mixed = [b for b in got if len({l > 0 for l in map(lengths.__getitem__, b)}) > 1]
    assert all(b in got[-2:] for b in mixed) and (not mixed or n_image and n_text)
    size = (lambda i: abs(lengths[i])) if n_image and n_text else lengths.__getitem__
    if micro == 1:
        assert all(list(map(size, b)) == sorted(map(size, b), reverse=True) for b in got if b not in mixed)
