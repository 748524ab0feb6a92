"""
Pictures: an animated GIF of the answer canvas being denoised, and the training loss curve (pillow only).

Where this sits in the flow:  image -> ViT -> projector -> token sequence -> masked diffusion -> [a GIF of it].

Each frame shows the image, the question and the answer canvas of gen_length cells after one sampling
step. A masked cell is grey; a revealed cell shows its token on a colour that says *when* it was
revealed, from blue (step 1) to red (the last step):   hue(s) = 240 deg * (1 - (s - 1) / (S - 1)).
So low-confidence remasking is visible at a glance: the EOS padding turns blue, the hard answer
words red. Pillow only (no new dependency).

The loss curve: train.py --jsonl=log.jsonl appends one JSON line per logged step; plot_curve draws it
(read_curve keeps the last value of a step logged twice by a resumed run).

    python -m tools.draw --gif=out.gif                 # the toy (out/ckpt.pt) answering a fresh synthetic scene
    python -m tools.draw --gif=out.gif --seed=20 --mode=threshold --checkpoint=out/ckpt.pt
    python -m tools.draw --curve=out/log.jsonl         # out/loss.png, beside the log
"""
import colorsys
import json
import os
import sys
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from cli import atomic_write, opt, parse_config, run_cli
from data import answer_text

W, H = 600, 240        # frame size, pixels
IMG = 160              # the input image, scaled up with nearest neighbour
COLS, CELL_W, CELL_H = 6, 68, 24
MASK_FILL, BG, INK = (205, 205, 205), (255, 255, 255), (20, 20, 20)


def step_colour(s: int, n_steps: int):
    """RGB of a token revealed at step s (1-based) of n_steps: blue early, red late."""
    f = 0.0 if n_steps <= 1 else (s - 1) / (n_steps - 1)
    r, g, b = colorsys.hsv_to_rgb((1 - f) * 2 / 3, 0.45, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def token_label(tok, t: int) -> str:
    names = {tok.eos_id: "eos", tok.eot_id: "eot", tok.mask_id: ""}
    return names[t] if t in names else tok.decode([t]).strip() or repr(tok.decode([t]))


def _font(size):
    try:  # pillow >= 10.1 ships a scalable default font
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def denoising_gif(path, image, question, frames, tok, truth=None, ms_per_step=450, hold_ms=2500) -> int:
    """Write the animation to `path` (atomically). frames: the canvas (list of token ids) after every
    step, as sample.py's callback records them. Returns the file size in bytes."""
    if not frames:
        raise ValueError("no sampling steps were recorded; nothing to animate")
    G, S = len(frames[0]), len(frames)
    revealed_at = [0] * G                     # step (1-based) at which each cell stopped being a mask
    for s, canvas in enumerate(frames, 1):
        for i, t in enumerate(canvas):
            if t != tok.mask_id and not revealed_at[i]:
                revealed_at[i] = s
    small, big = _font(12), _font(15)
    pic = image.convert("RGB").resize((IMG, IMG), Image.NEAREST)
    out = []
    for s, canvas in enumerate([[tok.mask_id] * G] + frames):
        im = Image.new("RGB", (W, H), BG)
        im.paste(pic, (12, 12))
        d = ImageDraw.Draw(im)
        d.text((IMG + 28, 12), question, fill=INK, font=big)
        for i, t in enumerate(canvas):
            x0 = IMG + 28 + (i % COLS) * (CELL_W + 4)
            y0 = 44 + (i // COLS) * (CELL_H + 4)
            fill = MASK_FILL if t == tok.mask_id else step_colour(revealed_at[i], S)
            d.rectangle((x0, y0, x0 + CELL_W, y0 + CELL_H), fill=fill)
            d.text((x0 + 4, y0 + 5), token_label(tok, t)[:10], fill=INK, font=small)
        # colour bar: which colour means which step
        bx, by = IMG + 28, H - 40
        for k in range(1, S + 1):
            d.rectangle((bx + (k - 1) * 300 // S, by, bx + k * 300 // S, by + 10), fill=step_colour(k, S))
        d.text((bx, by + 13), f"revealed at step 1 ... {S}", fill=INK, font=small)
        d.text((12, IMG + 22), f"step {s}/{S}", fill=INK, font=big)
        if s == S:
            d.text((12, IMG + 44), f"answer: {answer_text(tok, canvas)}", fill=INK, font=small)
            if truth is not None:
                d.text((12, IMG + 58), f"truth:  {truth}", fill=INK, font=small)
        out.append(im.convert("P", palette=Image.ADAPTIVE, colors=64))
    durations = [ms_per_step] * (len(out) - 1) + [hold_ms]
    atomic_write(path, lambda tmp: out[0].save(tmp, format="GIF", save_all=True, append_images=out[1:],
                                               duration=durations, loop=0, optimize=True))
    return os.path.getsize(path)


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
    atomic_write(png, lambda tmp: img.save(tmp, format="PNG"))


@dataclass
class DrawConfig:
    # python -m tools.draw --key=value (cli.parse_config; the comment after each field is its --help)
    gif: str = opt("", out="file", suffix=".gif")  # write an animation of the toy answering here
    checkpoint: str = opt("out/ckpt.pt", path="any")  # the toy checkpoint (train.py's ckpt.pt or run folder)
    seed: int = opt(0, min=0)                      # the synthetic scene (as sample.py --seed)
    question: str = ""                             # the question; none: the scene's own
    mode: str = "exact"                            # decoding mode (sample.py --mode)
    curve: str = opt("", path="file")              # draw this JSONL log's loss curve into loss.png beside it


def gif_is_ours(path: str) -> bool:
    """The animation may replace an earlier GIF, never anything else (a checkpoint, an image, a report)."""
    if not os.path.exists(path):
        return True
    with open(path, "rb") if os.path.isfile(path) else open(os.devnull, "rb") as f:
        return f.read(6) in (b"GIF87a", b"GIF89a")


def main(argv):
    dc = parse_config(DrawConfig, argv, __doc__)
    if not dc.gif and not dc.curve:
        sys.exit("nothing to draw: pass --gif=<file.gif> or --curve=<log.jsonl>")
    if dc.curve:
        png = os.path.join(os.path.dirname(dc.curve) or ".", "loss.png")
        plot_curve(read_curve(dc.curve), png)
        print(f"wrote {png}")
    if dc.gif:
        if not gif_is_ours(dc.gif):
            sys.exit(f"--gif={dc.gif} exists and is not a GIF; refusing to replace it, pick another file name")
        import sample
        from synthetic import DEMO_OFFSET, make_sample
        sc = parse_config(sample.SampleConfig, [f"--checkpoint={dc.checkpoint}", f"--mode={dc.mode}"])
        model, tok, official, defaults = sample.load(sc, sample.pick_device("auto"))
        if official:
            sys.exit(f"{dc.checkpoint}: the animation is drawn for the toy's synthetic scenes")
        img, question, truth, _ = make_sample(DEMO_OFFSET + dc.seed, model.cfg.vision.image_size)
        question, truth = (dc.question, None) if dc.question else (question, truth)
        gen, frames = sample.gen_options(sc, defaults, official), []
        sample.answer(model, tok, [img], [question], callback=lambda x, s, b: frames.append(x[0, -gen["gen_length"]:].tolist()),
                      **gen)
        nbytes = denoising_gif(dc.gif, img, question, frames, tok, truth=truth)
        print(f"wrote {dc.gif} ({len(frames)} steps, {nbytes / 1024:.0f} KB)")


if __name__ == "__main__":
    run_cli(main)
