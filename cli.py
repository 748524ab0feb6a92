"""
The harness: what protects a run and talks to the user, and nothing a learner needs to read.

A learner reading the method can skip this file: model.py, vision.py, diffusion.py, data.py, tokenizer.py and
synthetic.py never import it. train.py, sample.py, checkpoint.py, distributed.py and tools/ use it for:
    the command line   --key=value into a dataclass config, every option typed and checked against the rule
                       declared beside its field before any work starts (nanoGPT's configurator idea), --help
                       built from the fields' comments, and run_cli: a user's mistake ends as ONE line
    the output folder  what a training run may write over (a checkpoint can hold days of GPU time), and the
                       lock that keeps two runs out of one folder
    the one atomic write, the device (pick_device, autocast, the peak FLOP/s that MFU divides by) and the
                       process helpers (is a pid alive, peak memory, a worker that must die with torchrun)
"""
import copy
import difflib
import errno
import inspect
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
import time
import tokenize
import typing
from dataclasses import field, fields

import torch

from model import PRESETS, LLaDAConfig, LLaDAVConfig, get_config
from vision import VisionConfig

# ----------------------------------------------------------------------------------------------
# Configuration from the command line
#
# nanoGPT's configurator idea, with types and rules. Every script's options are the fields of one dataclass
# (train.TrainConfig, sample.SampleConfig, tools.bench.BenchConfig, tools.plan.PlanConfig), written on the
# command line as --key=value with the field's own name: one spelling, underscores. A field may carry its
# rule beside it, and the comment after it is its --help:
#     steps: int = opt(16, min=1)      # sampler steps
# parse_config() reads argv in three passes, all before a script does any work, so that a typo costs one
# line and never a run (nor a checkpoint overwritten by a run that was meant to resume):
#     1. form:  every argument is --key=value (a bare --flag is a boolean's 1) and the key is a field
#     2. type:  the text becomes the field's type (int, float, bool, str, or one of them | None)
#     3. rules: each field against its own rule (RULES below), then the config's cross-field check()
# Errors are SystemExit("one line"): Python prints the line and exits with status 1, tests catch it, and
# run_cli() (every script's __main__) also turns a ValueError or FileNotFoundError raised deeper down into
# such a line. LLADA_DEBUG=1 brings the traceback back for whoever debugs the code itself.
#
# The rules a field may carry (its dataclasses.field metadata, written with opt()):
#   choices=(...)   the value is one of these             each=(...)   a comma list, every item one of these
#   min= / max=     inclusive bounds                      gt= / lt=    exclusive bounds
#   path="file" | "dir" | "any"   must exist when given (non-empty), unless it is one of also=(...)
#   out="dir" | "file"            an output: its folder exists or can be created, writably ("dir": a folder that
#                                 is always written, so not empty; "file": empty means none)
#   suffix=".gif"                 an output file must end so (nothing else gets overwritten by mistake)
#   device=True                   auto, cpu, mps, cuda or cuda:N, and present on this machine
RULES = ("choices", "each", "min", "max", "gt", "lt", "path", "also", "out", "suffix", "device")
# The only booleans, in any case. Anything else is refused: "--resume=on" once read as false, and the run
# then started over and overwrote the checkpoint it was meant to continue.
TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")


def opt(default, **rule):
    """A dataclass field whose command-line rule sits beside it: `x: int = opt(1, min=1)  # help`."""
    if set(rule) - set(RULES):  # a misspelt rule would silently check nothing: refuse it when the class is made
        raise TypeError(f"unknown option rule(s) {sorted(set(rule) - set(RULES))}; rules are {', '.join(RULES)}")
    return field(default=default, metadata=rule)


def field_notes(cls) -> list[tuple[str, str]]:
    """The `# ...` comments of a dataclass's fields, read from its source with tokenize ->
    [(field name, comment), ...] in source order. A comment on a field's line(s) is its note; a comment line
    indented deeper than the fields continues the note above; one at the fields' own column is a section
    heading (name ""). --help prints these, so the help cannot drift from the comments beside the code."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))  # dedent: a class defined inside a block or function
    except (OSError, TypeError):  # no source file (a class made in a REPL): names without notes
        return [(f.name, "") for f in fields(cls)]
    # tokenize, not a regex on lines: it knows where a statement ends (a field's opt(...) may span lines),
    # and what is a comment rather than a '#' inside a string default
    notes, in_field, body_col, line_start = [], False, None, True
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        kind, col = tok.type, tok.start[1]
        if kind == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if in_field or (notes and notes[-1][0] and body_col is not None and col > body_col):
                notes[-1] = (notes[-1][0], (notes[-1][1] + " " + text).strip())  # the field's note (goes on)
            elif col == body_col:
                notes.append(("", text))                                          # a section heading
        elif kind == tokenize.NEWLINE:
            in_field, line_start = False, True  # a statement ends: a field's definition is complete
        elif kind in (tokenize.INDENT, tokenize.DEDENT, tokenize.NL):
            continue  # layout only (NL: a blank line, a comment line, or a line break inside brackets)
        elif line_start and col > 0:  # the first token of a statement in the class body
            line_start = False
            if tok.string in ("def", "@", "class"):
                break  # methods (check()) follow the fields: their comments are not help
            body_col = col if body_col is None else body_col
            if kind == tokenize.NAME:  # `name: type = ...`; a docstring (a STRING) is skipped
                notes.append((tok.string, ""))
                in_field = True
        else:
            line_start = False
    names = {f.name for f in fields(cls)}
    return [(n, t) for n, t in notes if n == "" or n in names]


def _rule_text(rule) -> str:
    """What a rule allows, in words: the bracket after an option in --help, the tail of its error line."""
    parts = []
    if "choices" in rule:
        parts.append("one of " + ", ".join(str(c) if c != "" else '""' for c in rule["choices"]))
    if "each" in rule:
        parts.append("a comma list of " + ", ".join(rule["each"]))
    for k, op in (("min", ">="), ("gt", ">"), ("max", "<="), ("lt", "<")):
        if k in rule:
            parts.append(f"{op} {rule[k]}")
    if "path" in rule:
        kind = {"file": "an existing file", "dir": "an existing folder",
                "any": "an existing file or folder"}[rule["path"]]
        parts.append(kind + ("" if "also" not in rule else " or " + ", ".join(rule["also"])))
    if "out" in rule:
        parts.append("a writable " + ("folder" if rule["out"] == "dir" else "file path")
                     + (f" ending in {rule['suffix']}" if "suffix" in rule else ""))
    if rule.get("device"):
        parts.append("auto, cpu, cuda, cuda:N or mps")
    return ", ".join(parts)


def _fail(key, text, why, default=False) -> SystemExit:
    """The one error line: the option as typed (or its default, said so), what is wrong, what is allowed."""
    return SystemExit(f"--{key}={text}{' (the default)' if default else ''}: {why}")


def convert(key: str, text: str, typ):
    """The command-line string `text` of option --key as a value of type `typ` (str, int, float, bool, or
    one of them | None). Booleans take 1/0/true/false/yes/no in any case and nothing else."""
    base = next((t for t in typing.get_args(typ) if t is not type(None)), typ)  # `int | None` -> int
    if base is bool:
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise _fail(key, text, "not a boolean; use 1/0, true/false or yes/no")
    if base is int:  # int("1.5") and int("1e3") fail: a count is written as a whole number
        try:
            return int(text)
        except ValueError:
            raise _fail(key, text, "not an integer") from None
    if base is float:
        try:
            value = float(text)
        except ValueError:
            raise _fail(key, text, "not a number") from None
        if not math.isfinite(value):  # float() reads "nan" and "inf"; no option means either
            raise _fail(key, text, "not a finite number")
        return value
    return text


def _writable(path: str) -> str | None:
    """Why an output at `path` could not be written, or None: the nearest existing folder above it must be
    a writable folder (what is missing below it is created at the first save). Checked up front: an
    unwritable out_dir used to fail only at the first checkpoint, after the work it was meant to keep."""
    p = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        return f"{p} is a file, so no folder can be made under it"
    try:  # a real probe, not os.access: root passes every access test, yet cannot write into /proc
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        return f"{p} is not writable: {e.strerror}"
    return None


def check_option(key: str, value, rule: dict, text: str | None = None, default: bool = False):
    """Check one typed option against its field's rule (see RULES); raise the one-line SystemExit.
    text: the option as the user typed it (shown in the message); default: the value was not typed."""
    text = str(value) if text is None else text
    if value is None or not rule:  # None: "not given" (e.g. gen_length then comes from the checkpoint)
        return
    allowed = _rule_text(rule)
    if "choices" in rule and value not in rule["choices"]:
        raise _fail(key, text, f"not allowed; use {allowed}", default)
    if "each" in rule:  # a comma list: name the first item that is wrong
        bad = [v for v in value.split(",") if v not in rule["each"]]
        if bad or not value:
            raise _fail(key, text, f"{bad[0] if bad else 'empty'!r} is not allowed; use {allowed}", default)
    for k, ok in (("min", lambda v, b: v >= b), ("gt", lambda v, b: v > b), ("max", lambda v, b: v <= b),
                  ("lt", lambda v, b: v < b)):
        if k in rule and not ok(value, rule[k]):
            raise _fail(key, text, f"out of range; must be {allowed}", default)
    if rule.get("path") and value and value not in rule.get("also", ()):  # also: names that are not paths ("toy")
        exists = {"file": os.path.isfile, "dir": os.path.isdir, "any": os.path.exists}[rule["path"]]
        if not exists(value):
            what = "does not exist" if not os.path.exists(value) else "is the wrong kind"
            raise _fail(key, text, f"{what}; pass {allowed}", default)
    if "out" in rule and (value or rule["out"] == "dir"):
        if not value.strip():  # --out_dir= would write into the current folder
            raise _fail(key, text, f"empty; pass {allowed} (e.g. --{key}=out)", default)
        if rule["out"] == "dir" and os.path.exists(value) and not os.path.isdir(value):
            raise _fail(key, text, "is a file; pass a folder", default)
        if rule["out"] == "dir" and (why := not_a_run_folder(os.path.realpath(value))):  # before any probe writes
            raise _fail(key, text, f"is {why}; pick a folder of its own, e.g. --{key}=out", default)
        if rule["out"] == "file" and os.path.isdir(value):
            raise _fail(key, text, "is a folder; pass a file path", default)
        if "suffix" in rule and not value.endswith(rule["suffix"]):
            raise _fail(key, text, f"must end in {rule['suffix']}", default)
        why = _writable(os.path.join(value, "x") if rule["out"] == "dir" else value)
        if why:
            raise _fail(key, text, f"cannot write there ({why})", default)
    if rule.get("device"):  # the name, and that this machine has it (torch's own error would be a traceback)
        m = re.fullmatch(r"auto|cpu|mps|cuda(?::(\d+))?", value)
        if m is None:
            raise _fail(key, text, f"not a device; use {allowed}", default)
        n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if value.startswith("cuda") and int(m.group(1) or 0) >= n_cuda:
            raise _fail(key, text, f"no such CUDA device here ({n_cuda} visible); use auto or cpu", default)
        if value == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise _fail(key, text, "MPS is not available here; use auto or cpu", default)


# --lm.<field> and --vision.<field> change the preset's model config: one implementation for every script
MODEL_SECTIONS = {"lm": LLaDAConfig, "vision": VisionConfig}


def model_option(key: str, value):
    """Type and check one --lm.<field> / --vision.<field> override ("2" or 2) -> (section, field name,
    value). A field is a size (int >= 1; n_kv_heads and mask_id may be 0), a positive float (rope_theta,
    norm_eps, ln_eps) or a switch (bool: tie_embeddings, rope_fp32)."""
    section, _, name = key.partition(".")
    part = MODEL_SECTIONS.get(section)
    names = [f.name for f in fields(part)] if part else []
    if name not in names:
        if name.replace("-", "_") in names:
            raise SystemExit(f"unknown option --{key}: options are spelled with underscores; "
                             f"use --{section}.{name.replace('-', '_')}")
        valid = [f"--{s}.{f.name}" for s, c in MODEL_SECTIONS.items() for f in fields(c)]
        near = difflib.get_close_matches(f"--{key}", valid, 1)
        raise SystemExit(f"unknown option --{key}; " + (f"did you mean {near[0]}? " if near else "")
                         + f"model options: {', '.join(valid)}")
    typ, text = typing.get_type_hints(part)[name], value if isinstance(value, str) else None
    if text is not None:
        value = convert(key, text, typ)
    if typ is not bool:
        check_option(key, value, {"min": 0 if name in ("n_kv_heads", "mask_id") else 1} if typ is int else {"gt": 0}, text)
    return section, name, value


def model_config(preset: str, overrides: dict | None = None) -> LLaDAVConfig:
    """The preset's LLaDAVConfig with --lm.* / --vision.* overrides ({"lm.n_layers": 2} or "2") applied and
    the shapes checked (heads split the widths; RoPE needs an even head size; a patch fits the image), so
    that a bad shape is one line here instead of a traceback from a layer's constructor."""
    if preset not in PRESETS:
        raise SystemExit(f"--preset={preset}: not allowed; use one of {', '.join(PRESETS)}")
    mc = get_config(preset)  # a fresh copy: the preset table itself never changes
    for key, value in (overrides or {}).items():
        section, name, value = model_option(key, value)
        setattr(getattr(mc, section), name, value)
    for s, c in (("lm", mc.lm), ("vision", mc.vision)):
        if c.d_model % c.n_heads or (s == "lm" and (c.d_model // c.n_heads) % 2):
            raise SystemExit(f"--{s}.d_model={c.d_model} does not split into --{s}.n_heads={c.n_heads} heads"
                             + (" of even size (RoPE rotates pairs)" if s == "lm" else "") + "; change one of them")
    if mc.lm.n_heads % mc.lm.kv_heads:
        raise SystemExit(f"--lm.n_kv_heads={mc.lm.n_kv_heads} does not divide --lm.n_heads={mc.lm.n_heads}: each "
                         f"key/value head serves a whole group of query heads; use a divisor (0 = n_heads)")
    if mc.vision.patch_size > mc.vision.image_size:
        raise SystemExit(f"--vision.patch_size={mc.vision.patch_size} is larger than --vision.image_size="
                         f"{mc.vision.image_size}; an image must hold at least one patch")
    return mc


def help_text(cfg, doc: str, model: bool) -> str:
    """--help: every option with its default, its field comment and its rule
    in brackets; with model=True also the preset's --lm.* / --vision.* fields and their values."""
    def row(option, value, note):  # one option per entry, its note wrapped under a hanging indent
        shown = int(value) if isinstance(value, bool) else "" if value is None else value  # None: not set
        return textwrap.fill(f"--{option}={shown}".ljust(32) + " " + note, 118, initial_indent="  ",
                             subsequent_indent=" " * 35)
    lines = ["options (--key=value, spelled with underscores; booleans take 1/0, true/false or yes/no, and a bare "
             "--flag means 1):"]
    rules = {f.name: f.metadata for f in fields(cfg)}
    for name, note in field_notes(type(cfg)):
        rule = _rule_text(rules[name]) if name else ""
        lines.append(row(name, getattr(cfg, name), note + (f" [{rule}]" if rule else "")) if name else f"  {note}")
    if model:
        mc = get_config(cfg.preset)
        lines.append(f"  model overrides (the values of preset {cfg.preset}; --preset=... changes them):")
        for s, c in MODEL_SECTIONS.items():
            notes = dict(field_notes(c))
            lines += [row(f"{s}.{f.name}", getattr(getattr(mc, s), f.name), notes.get(f.name, "")) for f in fields(c)]
    return "\n".join(lines + ["", doc.strip()])  # the options first, then what the script is


def parse_config(cfg, argv: list[str], doc: str = "", presets: tuple | None = None, model: bool = False):
    """argv ['--key=value', ...] -> a copy of the dataclass instance (or class) `cfg` with those fields set,
    each typed, checked against its rule, and then the whole config against its own check() method.
    presets=(key, table): that option is read first and table[value] sets defaults that the explicit
    options then override (train.py's --stage). model=True also takes --lm.<field> / --vision.<field> and
    returns (cfg, overrides) for model_config(). Any bad option raises SystemExit with one line; --help
    prints help_text() and exits with 0."""
    cfg = cfg() if isinstance(cfg, type) else copy.deepcopy(cfg)  # never change the caller's instance
    spec = {f.name: f for f in fields(cfg)}
    hints = typing.get_type_hints(type(cfg))  # real types even under `from __future__ import annotations`
    raw = {}  # key -> the text as typed
    # 1. form: --key=value with a known key
    for a in argv:
        if a in ("-h", "--help"):
            print(help_text(cfg, doc, model))
            raise SystemExit(0)
        key, eq, text = a[2:].partition("=")
        if not a.startswith("--") or not key:
            raise SystemExit(f"argument {a!r} is not of the form --key=value; see --help")
        if "." in key and model:
            if not eq:
                raise SystemExit(f"--{key} needs a value: --{key}=<value> (see --help)")
            model_option(key, text)  # unknown model fields and bad values fail here, before anything runs
        elif key not in spec:  # a hyphen for an underscore is the usual slip: say so; otherwise the nearest key
            fixed = key.replace("-", "_")
            if fixed in spec:
                raise SystemExit(f"unknown option --{key}: options are spelled with underscores; use --{fixed}")
            near = difflib.get_close_matches(key, spec, 1)
            raise SystemExit(f"unknown option --{key}; " + (f"did you mean --{near[0]}? " if near else "")
                             + "valid options: " + ", ".join("--" + k for k in spec) + " (see --help)")
        elif not eq:  # a bare --flag: only booleans, and it means true
            if hints[key] is not bool:
                raise SystemExit(f"--{key} needs a value: --{key}=<value> (see --help)")
            text = "1"
        raw.pop(key, None)
        raw[key] = text  # given twice: the later one wins (a script can append overrides to a base command)
    # 2. type, the preset table first: explicit options override its values, whatever their order
    if presets and presets[0] in raw:
        key = presets[0]
        value = convert(key, raw[key], hints[key])
        check_option(key, value, spec[key].metadata, raw[key])
        setattr(cfg, key, value)
        for k, v in presets[1].get(value, {}).items():
            setattr(cfg, k, v)
    overrides = {}
    for key, text in raw.items():
        if "." in key:
            overrides[key] = model_option(key, text)[2]
        else:
            setattr(cfg, key, convert(key, text, hints[key]))
    # 3. rules: every field, defaults too (a default path may not exist on this machine), the typed ones
    # first, so that a mistake the user made is named before a default that does not fit this machine
    for name in sorted(spec, key=lambda n: n not in raw):
        check_option(name, getattr(cfg, name), spec[name].metadata, raw.get(name), default=name not in raw)
    if hasattr(cfg, "check"):  # the options that must agree with each other (e.g. gen_length and block_length)
        try:
            cfg.check()
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if model:
        model_config(cfg.preset, overrides)  # the shapes too, before any work
        return cfg, overrides
    return cfg


def run_cli(main, argv: list[str] | None = None):
    """Every script's `if __name__ == "__main__":` calls run_cli(main). What a user can cause (a bad option,
    a missing or malformed file: SystemExit with a message, ValueError, FileNotFoundError) ends as ONE line on
    stderr and exit status 1, no traceback. LLADA_DEBUG=1 shows the full traceback too. Anything else (a
    KeyError, a RuntimeError) is a bug, not the user's doing, and keeps its traceback."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:  # `python train.py --help | head`: the reader left; nothing to report
        sys.stderr.close()
        sys.exit(0)
    except (SystemExit, ValueError, FileNotFoundError) as e:
        msg = e.code if isinstance(e, SystemExit) else str(e)
        if msg is None or isinstance(msg, int):  # sys.exit(0) after --help, or a plain status: pass it on
            raise
        if os.environ.get("LLADA_DEBUG", "") not in ("", "0"):
            import traceback
            traceback.print_exc()
        print(" ".join(str(msg).split()), file=sys.stderr)  # one line, whatever the message's layout
        sys.exit(1)


# ----------------------------------------------------------------------------------------------
# The one atomic write

def atomic_write(path, write):
    """write(tmp_path), fsync, then rename over path: a crash leaves the old file or the new one.
    The temporary file is removed if anything fails (an 8B checkpoint's is ~100 GB). Two failures a user
    causes end in one line naming the file instead of a traceback from inside torch.save: a full disk
    (SystemExit) and Ctrl-C (the line on stderr, then SystemExit(130), the status of an interrupted
    program; like KeyboardInterrupt it runs every `finally`, so train.py's lock is released)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would (safetensors creates files 0600)
        os.replace(tmp, path)          # atomic on POSIX and Windows
    except BaseException as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        stop = write_stopped(path, [e], "its temporary is removed, " + (
            "the previous file unchanged" if os.path.exists(path) else "nothing left behind"))
        if stop is None:
            raise  # anything else (a bug, a permission error) keeps its type: callers handle OSError
        raise stop from None


def write_stopped(path, causes, kept: str):
    """A write of `path` that failed with one of `causes` -> the SystemExit that says so in one line, or None
    where none of them is the user's doing. Ctrl-C: the line goes to stderr and the status is 130 (an
    interrupted program's). distributed.save_dcp words its failures with it too."""
    if any(isinstance(c, KeyboardInterrupt) for c in causes):
        print(f"{path}: interrupted (Ctrl-C) while writing it; not written, {kept}", file=sys.stderr, flush=True)
        return SystemExit(130)
    if any(isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT) for c in causes):
        return SystemExit(f"{path} was not written: disk full; {kept}; free some space (or pick another folder) "
                          f"and run again")
    return None


def write_text(path, text: str):
    def w(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
    atomic_write(path, w)



# ----------------------------------------------------------------------------------------------
# The output folder: what a run may write over. A checkpoint can hold days of GPU time, so a typo in
# --out_dir or a forgotten --resume=1 must never replace one without a word.

# Three small files make the rules below checkable: the marker says the folder is a run of ours, the
# lock says a live process uses it, and the checkpoints themselves (run_checkpoints) say there is work
# to lose. Deleting the marker or the lock by hand is always safe; neither holds any state of the run.
MARKER = "train_run.json"  # "train.py wrote this folder": the folders we may write into again
LOCK = "train.lock"        # {"pid", "host", "start"} of the run using the folder now
OURS = ("ckpt.pt", "ckpt.prev.pt", "model.safetensors", "config.json", "report.json", "dcp", "hf")  # hf: the export


def foreign_model(out_dir: str) -> str | None:
    """-> what in out_dir is a model train.py did not write (a Hugging Face download, say), or None.
    A config.json naming `architectures` is Hugging Face's (ours never does); weight files count as
    foreign unless our marker says this folder is a run of ours."""
    if not os.path.isdir(out_dir):
        return None
    cfg = os.path.join(out_dir, "config.json")
    if os.path.isfile(cfg):
        try:
            with open(cfg) as f:
                c = json.load(f)
        except (OSError, ValueError):
            return "a config.json train.py did not write"
        if isinstance(c, dict) and "architectures" in c:
            return "a Hugging Face model's config.json"
    if os.path.exists(os.path.join(out_dir, MARKER)):
        return None
    weights = sorted(f for f in os.listdir(out_dir) if f.endswith((".safetensors", ".bin", ".pth", ".gguf")))
    return weights[0] if weights else None


def run_checkpoints(out_dir: str) -> list:
    """The checkpoints of an earlier run in out_dir (an unfinished DCP folder, without .metadata, is not one)."""
    found = [f for f in ("ckpt.pt", "ckpt.prev.pt", "model.safetensors") if os.path.exists(os.path.join(out_dir, f))]
    root = os.path.join(out_dir, "dcp")
    dcp = os.path.isdir(root) and any(re.fullmatch(r"step_\d+", d) and os.path.exists(os.path.join(root, d, ".metadata"))
                                      for d in os.listdir(root))
    return found + (["dcp/"] if dcp else [])


# What marks a folder as someone's work rather than a place for a run: sources, a repository, a package.
SOURCE_MARKS = (".git", ".hg", ".svn", "pyproject.toml", "setup.py", "requirements.txt", "package.json", "Makefile")


def not_a_run_folder(real: str) -> str | None:
    """-> why the resolved folder `real` must never receive a run's files, or None. A filesystem root or the
    home folder (a typo such as --out_dir=/ or --out_dir=~), and a folder holding source files or a repository
    (--out_dir=. inside a project), unless our marker says an earlier run of ours already lives there."""
    if os.path.exists(os.path.join(real, MARKER)):
        return None
    if os.path.dirname(real) == real:
        return "a filesystem root"
    if real == os.path.realpath(os.path.expanduser("~")):
        return "your home folder"
    if os.path.isdir(real):
        names = os.listdir(real)
        marks = [n for n in names if n in SOURCE_MARKS] + [n for n in sorted(names) if n.endswith((".py", ".ipynb"))]
        if marks:
            return f"a folder of sources or a repository (it holds {marks[0]})"
    return None


def take_lock(out_dir: str, log) -> str:
    """Create out_dir/train.lock holding our pid, or stop: another live run owns the folder. A lock whose
    pid is dead (a run killed with -9 cannot remove it) is said and taken over. The lock is written
    aside and hard-linked into place: creating a link fails if the name exists, so of two runs racing
    for the folder exactly one wins, and nobody ever reads a half-written lock."""
    path = os.path.join(out_dir, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid())}
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(me, f)
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                try:
                    with open(path) as f:
                        owner = json.load(f)
                except (OSError, ValueError):
                    owner = {}
                pid, host = owner.get("pid"), owner.get("host")
                dead = isinstance(pid, int) and (pid == me["pid"] or not pid_alive(pid, owner.get("start")))
                if not (dead and host == me["host"]):
                    sys.exit(f"--out_dir={out_dir} is in use by another run (pid {pid} on {host}; lock {path}); "
                             f"wait for it to end or pick another --out_dir (if that run is gone, delete the lock)")
                log(f"{path}: stale lock of pid {pid}, which is no longer running: taken over")
                os.remove(path)
        sys.exit(f"could not take the lock {path}; another run keeps taking it")
    finally:
        os.remove(tmp)


def release_lock(path: str | None):
    """Remove our lock (only ours: a lock taken over by another run stays). Called from train()'s
    `finally`, so a run that stops with an error (a NaN, bad data) frees the folder too; only a kill
    leaves the lock, and the next run recognises it as stale by its dead pid."""
    try:
        with open(path) as f:
            if json.load(f).get("pid") == os.getpid():
                os.remove(path)
    except (TypeError, OSError, ValueError):
        pass


def claim_out_dir(tc, log) -> str:
    """Every check on --out_dir (tc: train.TrainConfig), before any work starts (rank 0 only) -> the lock to
    release at the end. Refused: an empty name; a file; a root, the home folder or a folder of sources (the
    run's files would land among the user's own); a folder holding a model train.py did not write; a folder holding
    --init_from (the run would overwrite its own starting point); another run's checkpoint unless
    --resume=1 or --overwrite=1; a folder another live run holds; a folder we cannot write."""
    out = tc.out_dir.strip()
    if not out:
        sys.exit("--out_dir is empty; name the folder for the run's checkpoints, e.g. --out_dir=out")
    real = os.path.realpath(out)
    if os.path.exists(real) and not os.path.isdir(real):
        sys.exit(f"--out_dir={out} is a file, not a folder; pick a folder for the run's checkpoints")
    why = not_a_run_folder(real)
    if why:
        sys.exit(f"--out_dir={out} is {why} ({real}); a run writes checkpoints, weights and a report there: pick "
                 f"a folder of its own, e.g. --out_dir=out")
    if tc.init_from and (os.path.realpath(tc.init_from) + os.sep).startswith(real + os.sep):
        sys.exit(f"--init_from={tc.init_from} lies inside --out_dir={out}: the run would write over its own "
                 f"starting point; pick another --out_dir")
    theirs = foreign_model(real)
    if theirs:
        sys.exit(f"--out_dir={out} holds a model train.py did not write ({theirs}); refusing to write into "
                 f"it, pick another --out_dir")
    # the refusals above and below write nothing: a refused run leaves the folder byte-identical
    earlier = run_checkpoints(real)
    if earlier and not tc.resume and not tc.overwrite:
        sys.exit(f"--out_dir={out} holds another run's checkpoint ({', '.join(earlier)}); continue it with "
                 f"--resume=1, replace it with --overwrite=1, or pick another --out_dir")
    try:  # the first writes: an unwritable folder fails here, not at the first save hours later
        os.makedirs(real, exist_ok=True)
        lock = take_lock(real, log)
        if not os.path.exists(os.path.join(real, MARKER)):  # once: a resume leaves every file as it was
            write_text(os.path.join(real, MARKER), json.dumps({"written_by": "LLaDA-V train.py", "started": time.time()}))
    except OSError as e:
        sys.exit(f"cannot write to --out_dir={out} ({type(e).__name__}: {e.strerror or e}); pick a writable folder")
    if tc.overwrite and not tc.resume and earlier:  # only now, under our lock, in a folder that is ours
        for f in OURS:
            p = os.path.join(real, f)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
        log(f"--overwrite=1: removed the earlier run's {', '.join(earlier)} in {out}")
    for p in remove_stale_temporaries(real, owned=OURS + (MARKER, "latest")):
        log(f"removed {p}, left by a save that was killed half-way")
    return lock


# ----------------------------------------------------------------------------------------------
# Processes

def process_start(pid: int):
    """A process's start time (clock ticks since boot, /proc/<pid>/stat field 22) or None off Linux.
    With the pid it names one process for good: a dead run's pid, reused by another process, no
    longer matches."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, start=None) -> bool:
    """Is process `pid` running (and, given its start time, still the same process)?"""
    if start is not None and process_start(pid) not in (None, start):
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True      # it exists, under another user
    return True


def remove_stale_temporaries(out_dir: str, owned=()) -> list:
    """Delete what saves killed half-way leave behind (an 8B ckpt.pt.tmp is ~135 GB): unfinished DCP
    folders `dcp/step_*.tmp`, and `<file>.tmp.<pid>` files. Called under the run's lock, so no live run
    writes the `owned` files (the run's checkpoints): their temporaries go whatever their pid (a dead
    run's pid may already belong to an unrelated process); any other file's only if its pid is dead.
    -> the paths removed."""
    gone = []
    for d in (out_dir, os.path.join(out_dir, "dcp"), os.path.join(out_dir, "hf")):
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            m = re.fullmatch(r"(.+)\.tmp\.(\d+)", name)
            if m and not os.path.isdir(p) and (m[1] in owned or int(m[2]) != os.getpid() and not pid_alive(int(m[2]))):
                os.remove(p)
                gone.append(p)
            elif d.endswith("dcp") and re.fullmatch(r"step_\d+\.tmp", name) and os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone



def exit_with_parent(sig=signal.SIGTERM):
    """Ask Linux to send us `sig` when the process that started us (torchrun's agent) dies, however it
    dies: a kill -9 of torchrun cannot run its own clean-up, and its workers would otherwise go on
    training and writing checkpoints, unseen. prctl(PR_SET_PDEATHSIG) only covers deaths from now on,
    so a parent that died before this call is caught by the second check: we were re-parented (to init
    or a sub-reaper) and our parent pid is no longer torchrun's. Elsewhere than Linux: nothing to do."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent == 1 or os.getppid() != parent:  # orphaned already (adopted by init), or since the first look
        raise SystemExit(f"the launcher (pid {parent}) is gone; this worker exits instead of training alone")



def proc_status(field: str) -> float:
    """A /proc/self/status memory figure in bytes (VmRSS: resident now, VmHWM: its peak), NaN off Linux."""
    try:
        with open("/proc/self/status") as fh:  # values in kB
            return next(float(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))
    except (OSError, StopIteration, ValueError):
        return float("nan")


def peak_memory(device: torch.device) -> float:
    """Peak memory so far in bytes: CUDA's allocator peak, or the process's peak resident set on Linux."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return proc_status("VmHWM")


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


# ----------------------------------------------------------------------------------------------
# The device, and its peak FLOP/s (MFU = model.step_flops per second / this peak)

def pick_device(name: str = "auto") -> torch.device:
    """auto = cuda > mps > cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device, dtype=torch.bfloat16):
    """Mixed precision on CUDA (bf16 by default), nothing elsewhere (CPU bf16 is slower than fp32 at these sizes)."""
    dev = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return torch.autocast("cuda", dtype=dtype) if dev == "cuda" else torch.autocast(dev, enabled=False)


# Dense bf16 peak FLOP/s from the vendors' data sheets (no sparsity), matched on the device name.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
                 "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}

_peaks = {}  # (device, dtype) -> the measured rate: measured once per process


def matmul_peak(device: torch.device, dtype=torch.float32, n: int = 1024) -> float:
    """The best FLOP/s of an n x n x n matmul on `device` in `dtype` (five timed runs after a warm-up), with
    its own generator: measuring must not move the global RNG that a run's initial weights come from."""
    key = (str(device), dtype, n)
    if key not in _peaks:
        g = torch.Generator(device=device).manual_seed(0)
        a, b = (torch.randn(n, n, generator=g, device=device).to(dtype) for _ in range(2))
        best = float("inf")
        for _ in range(6):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t)
        _peaks[key] = 2 * n ** 3 / best
    return _peaks[key]


def device_peak(device: torch.device) -> tuple[float, str]:
    """-> (peak FLOP/s, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name} bf16 spec"
        return matmul_peak(device, torch.bfloat16, 8192), f"{name}: measured bf16 matmul (add it to GPU_PEAK_BF16)"
    return matmul_peak(device), f"measured {device.type} fp32 matmul, {torch.get_num_threads()} thread(s)"
