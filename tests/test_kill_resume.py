"""SIGKILL a training run (checkpoints every step, so the kill usually lands in a save) and resume it:
the resumed run reproduces the uninterrupted loss curve and weights bit for bit. The 10-kill version is
`python tests/kill_resume.py --kills=10` (about 2-3 minutes; figures in the README).

    python -m pytest -q tests/test_kill_resume.py
"""

import pytest

import kill_resume


@pytest.mark.parametrize("fmt", ["dcp"])
def test_kill_and_resume_reproduces_the_run(tmp_path, fmt):
    res = kill_resume.run(str(tmp_path), kills=1, steps=6, fmt=fmt, say=lambda *a: None)
    assert res["kills"] == 1
