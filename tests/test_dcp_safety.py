"""Nothing runs from a DCP checkpoint folder, and a failed write is one line: a pickle payload planted in
dcp/step_*/.metadata or in a non-tensor item (manifest.json recomputed, as an attacker would) never runs and
the resume is refused; a full disk or Ctrl-C during a checkpoint write names the file and leaves no temporary.

    python -m pytest -q tests/test_dcp_safety.py
"""
import errno
import hashlib
import json
import os
import pickle
import shutil

import pytest
import torch

import checkpoint
import train
from checkpoint import save_checkpoint
from conftest import TINY_TRAIN, Payload, run_train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory):
    """A finished DCP-format run: dcp/step_000001 and dcp/step_000002."""
    out = tmp_path_factory.mktemp("dcp_run")
    run_train(out, "--max_steps=2", "--ckpt_every=1", "--eval_final=0", "--ckpt_format=dcp")
    return out


def recompute_manifest(folder):
    """What an attacker who can write the folder does after planting: manifest.json matches again."""
    sums = {}
    for f in sorted(os.listdir(folder)):
        if f != "manifest.json":
            with open(os.path.join(folder, f), "rb") as fh:
                sums[f] = hashlib.sha256(fh.read()).hexdigest()
    with open(os.path.join(folder, "manifest.json"), "w") as fh:
        json.dump(sums, fh)


def plant_in_metadata(folder, marker):
    """DCP's real metadata, with one more attribute that unpickles by calling open(marker, "w"): a reader
    using pickle.load runs it and then goes on loading as if nothing happened."""
    with open(folder / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own file, just written by the fixture's run
    md.storage_meta.save_id = Payload(marker)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)


def plant_in_item(folder, marker):
    """A checkpoint whose non-tensor items (the old `extra`, and the new `json`) are pickles of the payload:
    DCP writes any non-tensor value with torch.save and reads it with torch.load(weights_only=False)."""
    import torch.distributed.checkpoint as dcp
    shutil.rmtree(folder)
    dcp.save({"extra": Payload(marker), "json": Payload(marker)}, checkpoint_id=str(folder))


@pytest.mark.parametrize("plant", [plant_in_metadata, plant_in_item], ids=["metadata", "item"])
def test_dcp_payload_never_runs(dcp_run, tmp_path, plant):
    marker = tmp_path / "PWNED"
    out = tmp_path / "run"
    shutil.copytree(dcp_run, out)
    for step in ("step_000001", "step_000002"):
        plant(out / "dcp" / step, marker)
        recompute_manifest(out / "dcp" / step)
    try:  # the same options as the run: the old reader ran the payload, then resumed as if nothing happened
        run_train(out, "--max_steps=2", "--ckpt_every=1", "--eval_final=0", "--ckpt_format=dcp", "--resume=1")
        msg = "resumed"
    except SystemExit as e:
        msg = str(e)
    assert not marker.exists()
    assert msg and "\n" not in msg and "no intact checkpoint" in msg and "step_000002" in msg, msg
    from distributed import read_extra
    with pytest.raises(ValueError, match="refused"):  # and the reason, in one line naming the folder
        read_extra(str(out / "dcp" / "step_000002"))
    assert not marker.exists()


def test_dcp_resume_falls_back_past_a_planted_step(dcp_run, tmp_path, capsys):
    """Only the newest step planted: it is skipped as refused and the run resumes from the one before,
    the payload never having run."""
    marker = tmp_path / "PWNED"
    out = tmp_path / "run"
    shutil.copytree(dcp_run, out)
    plant_in_metadata(out / "dcp" / "step_000002", marker)
    recompute_manifest(out / "dcp" / "step_000002")
    tc, mc = train.parse_args([f"--out_dir={out}"] + TINY_TRAIN + ["--max_steps=2", "--ckpt_every=1",
                              "--eval_final=0", "--ckpt_format=dcp", "--resume=1"], train.TrainConfig())
    train.train(tc, mc)
    said = capsys.readouterr().out
    assert not marker.exists()
    assert "skipped" in said and "refused" in said and "step_000001 at step 1" in said, said


def test_truncated_shard_without_manifest_falls_back(dcp_run, tmp_path, capsys):
    """No manifest to catch it (a folder from before manifests): the shard cut short fails in DCP's reader,
    which is said in one line and skipped, not a traceback."""
    out = tmp_path / "run"
    shutil.copytree(dcp_run, out)
    step = out / "dcp" / "step_000002"
    (step / "manifest.json").unlink()
    shard = step / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    tc, mc = train.parse_args([f"--out_dir={out}"] + TINY_TRAIN + ["--max_steps=2", "--ckpt_every=1",
                              "--eval_final=0", "--ckpt_format=dcp", "--resume=1"], train.TrainConfig())
    train.train(tc, mc)
    said = capsys.readouterr().out
    assert f"skipped {step}: {step} could not be read" in said and "step_000001 at step 1" in said, said


def test_old_dcp_checkpoint_is_refused_in_one_line(tmp_path):
    """A checkpoint from before tensors-only (its `extra` a pickled string) is refused unread."""
    import torch.distributed.checkpoint as dcp
    from distributed import read_extra
    dcp.save({"model": {"w": torch.zeros(2)}, "extra": json.dumps({"step": 1})}, checkpoint_id=str(tmp_path))
    with pytest.raises(ValueError) as e:
        read_extra(str(tmp_path))
    assert "\n" not in str(e.value) and "written before" in str(e.value) and str(tmp_path) in str(e.value)


# ------------------------------------------------------------------------------------------------
# A failed write: one line naming the file, no temporary left, the previous file intact

def _temporaries(d):
    return [f for f in os.listdir(d) if ".tmp" in f]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_full_disk_during_save_is_one_line(tmp_path):
    """The temporary is a link to /dev/full, where every write fails with ENOSPC: torch.save's own error."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    before = path.read_bytes()
    os.symlink("/dev/full", f"{path}.tmp.{os.getpid()}")
    with pytest.raises(SystemExit) as e:
        save_checkpoint(path, {"step": 2, "w": torch.zeros(1 << 16)}, keep_prev=True)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "disk full" in msg, msg
    assert not _temporaries(tmp_path) and path.read_bytes() == before


@pytest.mark.parametrize("cause", ["enospc", "ctrl_c"])
def test_failed_write_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch, capsys, cause):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})
    before = path.read_bytes()

    def failing_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if cause == "enospc" else KeyboardInterrupt()
    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(SystemExit) as e:
        save_checkpoint(path, {"step": 2})
    if cause == "enospc":
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and "disk full" in msg, msg
    else:  # an interruption still: exit status 130, and one line on stderr
        err = capsys.readouterr().err.strip()
        assert e.value.code == 130 and "\n" not in err and str(path) in err and "interrupted" in err, err
    assert not _temporaries(tmp_path) and path.read_bytes() == before


def test_ctrl_c_between_the_renames_of_keep_prev(tmp_path, monkeypatch):
    """Ctrl-C after ckpt.pt got its second name (the hard link that becomes ckpt.prev.pt), before the rename:
    neither temporary stays, and ckpt.pt is the previous checkpoint still."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})
    before, real = path.read_bytes(), os.replace

    def replace(src, dst):
        if str(dst).endswith("ckpt.prev.pt"):
            raise KeyboardInterrupt
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SystemExit) as e:
        save_checkpoint(path, {"step": 2}, keep_prev=True)
    assert e.value.code == 130 and not _temporaries(tmp_path) and path.read_bytes() == before


def test_ctrl_c_during_save_releases_the_lock(tmp_path, monkeypatch):
    """Ctrl-C during train.py's checkpoint write: the run ends with status 130 and out_dir is free again."""
    real = checkpoint.torch.save

    def interrupted(obj, f, *a, **kw):
        if isinstance(obj, dict) and "optimizer" in obj:
            raise KeyboardInterrupt
        return real(obj, f, *a, **kw)
    monkeypatch.setattr(checkpoint.torch, "save", interrupted)
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "--max_steps=1", "--ckpt_every=1", "--eval_final=0")
    assert e.value.code == 130 and not (tmp_path / "train.lock").exists() and not _temporaries(tmp_path)


@pytest.mark.parametrize("cause", ["enospc", "ctrl_c"])
def test_failed_dcp_save_is_one_line(tmp_path, monkeypatch, capsys, cause):
    """DCP writes each tensor with torch.save; the first one fails: the run stops with one line, the
    unfinished step folder is gone and out_dir is free again."""
    def failing_save(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if cause == "enospc" else KeyboardInterrupt()
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "--max_steps=1", "--ckpt_every=1", "--eval_final=0", "--ckpt_format=dcp")
    where = str(tmp_path / "dcp" / "step_000001.tmp")
    if cause == "enospc":
        assert "\n" not in str(e.value) and where in str(e.value) and "disk full" in str(e.value), str(e.value)
    else:
        err = capsys.readouterr().err.strip()
        assert e.value.code == 130 and where in err and "interrupted" in err, err
    assert os.listdir(tmp_path / "dcp") == [] and not (tmp_path / "train.lock").exists()
