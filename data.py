"""
Data: LLaDA-V's chat template and the SFT sequences, answer masks and batches the diffusion loss needs.

Where this sits in the flow:  image -> ViT -> projector -> [token sequence] -> masked diffusion.
(The tokenizer is in tokenizer.py; the embedded synthetic image-question dataset in synthetic.py.)

1. Chat template (REFERENCE 3.1, 3.3), one user turn with an image:
     <|startoftext|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
     <|start_header_id|>user<|end_header_id|>\n\n<image>\n{question}<|eot_id|>
     <|start_header_id|>assistant<|end_header_id|>\n\n
   The string "<image>" becomes IMAGE_TOKEN_INDEX (-200) placeholders, one per visual token; the model
   swaps them for projected image features (model.py). The toy data leaves out the system turn to
   keep sequences short; the template code is the same. chat_template() is the general form (any
   messages, multi-turn) and llada_v_messages() adds LLaDA-V's " /think" / " /no_think" suffixes.

2. SFT sequence (REFERENCE 3.2, LLaDA GUIDELINES): x0 = prompt ++ answer ++ <|eot_id|> ++ <|endoftext|>*,
   padded with EOS to a fixed answer length G (= the sampler's gen_length). Labels are -100 on the
   prompt and the image (never masked) and the token itself on the G answer positions (EOS padding
   included: the model learns to fill unused canvas with EOS, as LLaDA does).

3. Batches: training sequences are right-padded (collate); sampling prompts are left-padded
   (prompt_batch) so that every answer canvas sits in the same columns.
"""
import torch

from tokenizer import Tokenizer

IGNORE_INDEX = -100       # label of positions that are never masked and never scored

SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual "
                 "content that the user provides, and assist the user with a variety of tasks using "
                 "natural language.")



def chat_prompt(question: str, system: str | None = SYSTEM_PROMPT, image: bool = True) -> str:
    """LLaDA-V's inference prompt for one user turn (REFERENCE 3.3). Content is trimmed, BOS only once,
    and the prompt always ends with the assistant header."""
    def turn(role, content):
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"
    user = ("<image>\n" if image else "") + question.strip()
    return ("<|startoftext|>" + (turn("system", system) if system else "") + turn("user", user)
            + "<|start_header_id|>assistant<|end_header_id|>\n\n")


# LLaDA-V's reasoning switch (REFERENCE 3.3): appended to the user's text at eval and in the stage-3 data
THINK_SUFFIX = {None: "", "think": " /think", "no_think": " /no_think"}


def chat_template(messages) -> str:
    """The tokenizer chat_template of LLaDA-8B-Instruct (and LLaDA-V), REFERENCE 3.1: messages
    [{"role", "content"}] -> BOS once, then <|start_header_id|>role<|end_header_id|>\n\n content.strip()
    <|eot_id|> per message, and always the assistant header at the end."""
    out = "<|startoftext|>"
    for m in messages:
        out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
    return out + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def llada_v_messages(question: str, system: str | None = SYSTEM_PROMPT, n_images: int = 1, think=None,
                     history=()) -> list:
    """The messages LLaDA-V's demo and eval build: the system prompt, the images first in the first user
    turn ("<image>\n" each), earlier turns `history` [(question, answer)], and the optional " /think" or
    " /no_think" suffix on every user turn. Render with chat_template()."""
    if think not in THINK_SUFFIX:
        raise ValueError(f"think={think!r}: use None, 'think' or 'no_think'")
    msgs = [{"role": "system", "content": system}] if system else []
    turns = list(history) + [(question, None)]
    for i, (q, a) in enumerate(turns):
        msgs.append({"role": "user", "content": ("<image>\n" * n_images if i == 0 else "") + q.strip() + THINK_SUFFIX[think]})
        if a is not None:
            msgs.append({"role": "assistant", "content": a})
    return msgs


def default_system(tokenizer_name: str) -> str | None:
    """The toy data is trained without a system turn (shorter sequences); the real model uses LLaDA-V's."""
    return None if tokenizer_name == "toy" else SYSTEM_PROMPT


def sft_example(tok: Tokenizer, question: str, answer: str, gen_length: int, n_image_tokens: int,
                system: str | None = None):
    """(ids, labels) for one SFT sample: prompt, then a fixed G = gen_length answer canvas
    answer ++ <|eot_id|> ++ EOS padding. Labels are IGNORE_INDEX on the prompt (and image)."""
    prompt = tok.encode_with_image(chat_prompt(question, system), n_image_tokens)
    ans = tok.encode(answer) + [tok.eot_id]
    if len(ans) > gen_length:
        raise ValueError(f"answer of {len(ans)} tokens does not fit gen_length={gen_length}; raise gen_length")
    ans += [tok.eos_id] * (gen_length - len(ans))
    return prompt + ans, [IGNORE_INDEX] * len(prompt) + ans


def collate(examples, pad_id: int):
    """Right-pad a list of (ids, labels) to one length. Padding has attention_mask 0 and IGNORE labels.
    Returns ids (B, L), labels (B, L), attention_mask (B, L) bool."""
    L = max(len(ids) for ids, _ in examples)
    B = len(examples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros(B, L, dtype=torch.bool)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        attn[i, :len(x)] = True
    return ids, labels, attn


def answer_text(tok: Tokenizer, ids) -> str:
    """Decode a generated canvas up to its first <|eot_id|> or EOS."""
    out = []
    for i in ids:
        if int(i) in (tok.eot_id, tok.eos_id):
            break
        out.append(int(i))
    return tok.decode(out).strip()



def prompt_batch(tok: Tokenizer, questions, n_image_tokens: int, system: str | None = None):
    """Left-padded prompts for batched sampling (as the official generate.py does): ids (B, L), attention
    mask (B, L). Left padding keeps every answer canvas at the same columns. Positions still run 0..L-1,
    so a left-padded prompt is shifted; with the padding masked out that changes nothing, because RoPE
    attention scores depend only on relative positions."""
    ps = [tok.encode_with_image(chat_prompt(q, system), n_image_tokens) for q in questions]
    L = max(map(len, ps))
    ids = torch.full((len(ps), L), tok.pad_id, dtype=torch.long)
    attn = torch.zeros(len(ps), L, dtype=torch.bool)
    for i, p in enumerate(ps):
        ids[i, L - len(p):] = torch.tensor(p)
        attn[i, L - len(p):] = True
    return ids, attn


