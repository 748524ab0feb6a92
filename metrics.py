"""
Training metrics: FLOPs per step, MFU, memory, a JSONL log and a loss-curve PNG drawn with pillow.

Where this sits in the flow: beside train.py; it only reads the model config and the clock.

FLOPs of one training step (matmuls only, the usual convention; a multiply-add is 2 FLOPs). A matmul with
P weights applied to one token costs 2P forward, 2P for the input gradient, 2P for the weight gradient:
    per LLM token:    c_llm (P_blocks + 2 L d)        c = 6 if the LLM trains, 4 if frozen but the
                                                    projector below it trains (input gradients only), 2 else
                      (2 L d per layer = q k^T and attn @ v over the L positions, d = model width)
    per masked token: c_llm d V                       the output head runs at masked positions only
    per image:        c_vis N (P_vis + 2 N D)         N patches of width D (+ the projector's params, c_proj)
    MFU = FLOPs per step / step time / peak FLOP/s of the device.
The peak is the dense bf16 tensor-core figure from the table below for known GPUs; on a CPU it is the
fp32 matmul rate measured here (a 1024^2 GEMM on the threads torch uses), so CPU MFU says how close the
step gets to the best this CPU does on a plain matmul.
"""
import json
import os
import time

import torch

# Dense bf16 peak FLOP/s from the vendors' data sheets (no sparsity), matched on the device name.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
                 "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}

_cpu_peak = None


def cpu_matmul_peak() -> float:
    """Best fp32 FLOP/s of a 1024 x 1024 x 1024 matmul on this CPU (measured once, ~0.3 s)."""
    global _cpu_peak
    if _cpu_peak is None:
        g = torch.Generator().manual_seed(0)  # not the global RNG: training must not depend on this
        a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        _cpu_peak = 2 * 1024 ** 3 / best
    return _cpu_peak


def device_peak(device: torch.device) -> tuple[float, str]:
    """-> (peak FLOP/s, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name} bf16 spec"
        return float("nan"), f"{name}: not in metrics.GPU_PEAK_BF16, add it"
    if device.type == "cpu":
        return cpu_matmul_peak(), "measured CPU fp32 matmul"
    return float("nan"), f"no peak for {device.type}"


def step_flops(mc, n_tokens: int, seq_len: int, n_masked: int, n_images: int, train_llm: bool,
               train_vision: bool, train_projector: bool) -> float:
    """Matmul FLOPs of one optimizer step (see the module docstring). n_tokens: non-pad tokens in the
    step (image tokens included), seq_len: padded length, n_masked: positions the head runs at."""
    lm, vc = mc.lm, mc.vision
    p_block = lm.n_layers * (4 * lm.d_model ** 2 + 3 * lm.d_model * lm.mlp_hidden)
    c_llm = 6 if train_llm else 4 if (train_projector or train_vision) else 2
    flops = c_llm * n_tokens * (p_block + 2 * lm.n_layers * seq_len * lm.d_model)
    flops += c_llm * n_masked * lm.d_model * lm.vocab_size
    n, D = vc.n_patches, vc.d_model
    p_vis = (vc.n_layers - 1) * (4 * D * D + 2 * D * vc.mlp_hidden) + 3 * vc.patch_size ** 2 * D
    c_vis = 6 if train_vision else 2
    c_proj = 6 if train_projector else 4 if train_vision else 2
    flops += n_images * n * (c_vis * (p_vis + 2 * (vc.n_layers - 1) * n * D)
                             + c_proj * (D * lm.d_model + lm.d_model ** 2))
    return float(flops)


def peak_memory(device: torch.device) -> float:
    """Peak memory so far in bytes: CUDA's allocator peak, or the process's peak resident set on Linux."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("nan")


class JsonlLog:
    """One JSON object per line, appended and flushed at once (a killed run loses at most one line)."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def write(self, rec: dict):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()


def read_curve(path: str, key: str = "loss") -> dict:
    """step -> value from a JSONL log; a step logged twice (a resumed run redoes steps) keeps the last."""
    curve = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if key in rec and "step" in rec:
                curve[rec["step"]] = rec[key]
    return dict(sorted(curve.items()))


def plot_curve(curve: dict, png: str, title: str = "training loss", size=(640, 400)):
    """A line plot of step -> value, drawn with pillow (no plotting library), written atomically."""
    from PIL import Image, ImageDraw
    W, H = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, W - 20, 30, H - 40
    d.rectangle([left, top, right, bottom], outline="black")
    d.text((left, 8), title, fill="black")
    if len(curve) >= 2:
        xs, ys = list(curve), list(curve.values())
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        y1 = y1 if y1 > y0 else y0 + 1
        sx = lambda x: left + (x - x0) / max(1, x1 - x0) * (right - left)
        sy = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)
        d.line([(sx(x), sy(y)) for x, y in zip(xs, ys)], fill=(30, 90, 200), width=2)
        for v in (y0, (y0 + y1) / 2, y1):
            d.text((4, sy(v) - 6), f"{v:.3g}", fill="black")
        d.text((left, bottom + 8), f"step {x0}", fill="black")
        d.text((right - 70, bottom + 8), f"step {x1}", fill="black")
    tmp = f"{png}.tmp.{os.getpid()}.png"
    img.save(tmp)
    os.replace(tmp, png)
