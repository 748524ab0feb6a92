"""The README's commands run as written.

Every command of the README's ```bash blocks and every `$ ` line of its transcripts runs here, in the
README's order, in one scratch folder (so `python sample.py` finds the `out/` that `python train.py` left,
as it would for a reader). A command is shortened only by flags the README itself names for that purpose
(`--max_steps`, `--eval_final`, `--n`). The commands that need a download (the official weights, a
dataset) or are this suite itself are not run; each matches one rule of NOT_RUN, which says why, and the
test fails on a command that matches none, so a new command cannot be forgotten.
The planner's figures are checked where the docs quote them: a `python -m tools.plan` block followed by
an output block must print every one of its GiB lines (README.md and docs/*.md).

    python -m pytest -q tests/test_readme.py      (about a minute on 2 cores)
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

NOT_RUN = [  # (pattern, why the command is not run here)
    (r"^pip install", "installs packages (CI installs requirements.txt itself)"),
    (r"LLaDA-V|blip_laion|llava_next|base/model", "needs the official weights or a dataset: a download"),
    (r"pytest", "is this suite"),
]
# The README's own shortening flags (its quick start names them), appended where they apply: a later
# --key=value wins, so a command's own --max_steps is shortened too.
SHORT = {"train.py": ["--max_steps=30", "--eval_final=20"]}
SHORT_N = 20  # --n=... of sample.py --eval


def blocks(text: str):
    """-> [(language, lines)] of the fenced blocks of a markdown text."""
    out, lang, cur = [], None, None
    for line in text.splitlines():
        if line.startswith("```"):
            if cur is None:
                lang, cur = line[3:].strip(), []
            else:
                out.append((lang, cur))
                cur = None
        elif cur is not None:
            cur.append(line)
    return out


def commands(lines):
    """Shell lines of a block, `\\` continuations joined and `# ...` comments dropped."""
    out, cur = [], ""
    for line in lines:
        cur += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            text = cur.split("  # ")[0].split(" # ")[0].strip()
            if text:
                out.append(text)
            cur = ""
    return out


def readme_commands() -> list:
    cmds = []
    for lang, lines in blocks((ROOT / "README.md").read_text()):
        if lang == "bash":
            cmds += commands(lines)
        else:  # a transcript: its `$ ` lines are commands too
            cmds += [line[2:].strip() for line in lines if line.startswith("$ ")]
    return cmds


def not_run(cmd: str):
    return next((why for pattern, why in NOT_RUN if re.search(pattern, cmd)), None)


def shortened(cmd: str) -> str:
    if "train.py" in cmd and "--help" not in cmd:
        cmd += " " + " ".join(SHORT["train.py"])
    return re.sub(r"--n=\d+", f"--n={SHORT_N}", cmd)


def test_every_readme_command_is_run_or_said_why_not():
    cmds = readme_commands()
    assert len(cmds) >= 15, cmds  # the parser really reads the README
    runnable = [c for c in cmds if not_run(c) is None]
    assert any(c.startswith("python train.py") for c in runnable)
    assert any("torchrun" in c and "--parallel=fsdp" in c for c in runnable)  # the CPU FSDP demo runs
    for c in cmds:  # every command either runs below or has a reason; nothing else
        assert c.startswith(("python", "torchrun", "OMP_NUM_THREADS")) or not_run(c), c


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder that looks like a checkout to the commands: the sources linked in, a photo of the user's."""
    d = tmp_path_factory.mktemp("readme")
    for p in list(ROOT.glob("*.py")) + [ROOT / "tools"]:
        (d / p.name).symlink_to(p)
    Image.new("RGB", (80, 60), (200, 40, 40)).save(d / "photo.png")
    return d


def run(cmd: str, cwd: Path, timeout=600) -> subprocess.CompletedProcess:
    bin_dir = os.path.dirname(sys.executable)  # `python` and `torchrun` of this interpreter's environment
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_readme_commands_run_as_written(scratch):
    ran = []
    for cmd in readme_commands():
        if not_run(cmd):
            continue
        r = run(shortened(cmd), scratch)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        ran.append(cmd)
        out = r.stdout
        if cmd == "python train.py":  # the report, and the note on what a short run never reached
            assert "held-out report" in out and "never trained" in out, out[-1500:]
            assert (scratch / "out" / "ckpt.pt").is_file() and (scratch / "out" / "report.json").is_file()
        if cmd.startswith("python sample.py --show_steps") or cmd.startswith("python sample.py --seed"):
            assert "step   1 (block 0)" in out and "answer:" in out, out
        if "--image=photo.png" in cmd:
            assert "the toy knows only its own world" in out and "answer:" in out, out
        if "--help" in cmd:
            assert out.startswith("options")
        if "tools.draw" in cmd:
            assert (scratch / "out" / "denoise.gif").read_bytes()[:6] == b"GIF89a"
    print("ran:\n  " + "\n  ".join(ran))
    assert len(ran) >= 12


def plan_blocks():
    """(doc, command, quoted GiB lines) for every tools.plan command followed by an output block."""
    found = []
    for doc in [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")):
        bl = blocks(doc.read_text())
        for (lang, lines), (_, nxt) in zip(bl, bl[1:] + [("", [])]):
            cmds = commands(lines) if lang == "bash" else []
            if len(cmds) == 1 and cmds[0].startswith("python -m tools.plan") and nxt:
                found.append((doc.name, cmds[0], [l.strip() for l in nxt if "GiB" in l and "|" not in l]))
    return found


def test_memory_figures_in_the_docs_are_the_planners():
    """Every memory figure the docs quote from the planner is what the planner prints now."""
    found = plan_blocks()
    assert {d for d, _, _ in found} >= {"README.md", "scale.md"}, found
    from tools import plan
    import contextlib
    import io
    for doc, cmd, quoted in found:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            plan.main(shlex.split(cmd)[3:])
        printed = {" ".join(l.split()) for l in buf.getvalue().splitlines()}
        assert quoted, (doc, cmd)
        for line in quoted:
            assert " ".join(line.split()) in printed, f"{doc}: `{cmd}` no longer prints {line!r}"
