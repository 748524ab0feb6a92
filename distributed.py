"""
Distributed training plumbing, all of it PyTorch's own: torchrun's process group, DDP, FSDP2 and
torch.distributed.checkpoint (DCP).

Where this sits in the flow: around the whole model; it changes where tensors live, never the maths.

Data parallelism with W processes, a global batch of B sequences, micro-batches of b, accumulation
A = B / (W b). Each process computes the loss of its micro-batch, scaled so that the gradients summed
over A micro-batches and *averaged* over W processes (what DDP and FSDP2 do) equal the gradient of the
global-batch loss:
    L = 1/B sum_{samples}  l_s          grad L = 1/W sum_ranks sum_micro (W / B) sum_{s in micro} grad l_s
so the micro-batch loss is multiplied by (samples in it) * W / B, and one process with the same global
batch follows the same trajectory (test_distributed.py checks it to 1e-5).

  DDP:   every process holds the whole model; gradients are all-reduced (averaged) in backward.
  FSDP2: `fully_shard` each transformer block (LLM and ViT) and then the root: every parameter is split
         in W shards (DTensor). A block's full parameters exist only while it runs (all-gather before
         forward and backward, reduce-scatter of gradients after), so per-GPU memory for parameters,
         gradients and AdamW state falls as 1/W (tools/plan.py prints the budget). With MixedPrecisionPolicy the
         gathered copies are bf16 and gradients are reduced in fp32; the sharded masters stay fp32.

Checkpoints (DCP): every rank writes its shards into <out_dir>/dcp/step_NNNNNN.tmp, hashes its own files
into the folder's manifest.json (sha256 per file); then rank 0 fsyncs, renames the folder to step_NNNNNN
(an atomic rename) and atomically rewrites <out_dir>/dcp/latest. A SIGKILL at any moment leaves `latest`
pointing at a complete checkpoint; the two newest are kept, so a resume whose newest fails its checksums
falls back to the one before. DCP stores tensors by their full names and shapes, so a checkpoint written
by W processes loads on any other number (resharding).

Workers and their launcher: under torchrun each worker asks Linux to be sent SIGTERM when its parent
dies (prctl PR_SET_PDEATHSIG, in setup), so a kill -9 of torchrun does not leave orphans training.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from cli import exit_with_parent, write_text


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def setup(device: torch.device) -> DistInfo:
    """Join torchrun's process group if RANK / WORLD_SIZE are set (torchrun sets them), else one process.
    NCCL on CUDA, gloo on the CPU; each process takes GPU LOCAL_RANK."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo(device=device)
    exit_with_parent()  # a worker must not outlive torchrun (a kill -9 of it would leave us training)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, local_rank, world, device)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: list, info: DistInfo) -> list:
    if not info.on:
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cpu" if info.device.type == "cpu" else info.device)
    dist.all_reduce(t)
    return t.tolist()


@contextlib.contextmanager
def gradient_sync(fwd, parallel: str, sync: bool):
    """Gradient accumulation: the gradients are averaged over the processes once per step, in the backward of
    the last micro-batch (sync=True); the earlier ones only add to the local gradients. DDP skips its
    all-reduce inside no_sync(); FSDP2 is told with set_requires_gradient_sync."""
    if parallel == "fsdp":
        fwd.set_requires_gradient_sync(sync)
    with fwd.no_sync() if parallel == "ddp" and not sync else contextlib.nullcontext():
        yield


def resolve_parallel(mode: str, n_params: int, info: DistInfo) -> str:
    """auto: one process -> none; several -> DDP below 1B parameters (a full replica fits and DDP is
    simplest and fastest), FSDP2 above (an 8B replica with AdamW needs ~128 GB: it must be sharded)."""
    if mode not in ("auto", "none", "ddp", "fsdp"):
        raise SystemExit(f"--parallel={mode!r}: use auto, none, ddp or fsdp")
    if mode == "auto":
        return "none" if not info.on else ("fsdp" if n_params > 1e9 else "ddp")
    return mode


def wrap(model: nn.Module, mode: str, info: DistInfo, bf16: bool):
    """-> the module to call for forward/backward. `model` itself stays the handle for state dicts and
    optimizer groups (with FSDP2 its parameters become DTensor shards in place)."""
    if mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.4 / 2.5 kept FSDP2 under its pre-release path
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    # The blocks keep their inputs' dtypes: the root already casts what enters the model, and an LLaDA
    # block's RoPE cos/sin must stay fp32. (Casting them too would also break activation checkpointing:
    # FSDP2 does not re-cast in the recomputation, so the recomputed RoPE saves fp32 where the forward
    # saved bf16, and backward stops with a CheckpointError. Seen on an H100.)
    block_mp = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype, cast_forward_inputs=False)
    for block in list(model.llm.layers) + list(model.vision.layers):
        fully_shard(block, mp_policy=block_mp)  # one all-gather / reduce-scatter unit per block
    fully_shard(model, mp_policy=mp)            # the rest: embeddings, head, norms, projector, patch embedding
    return model


# ----------------------------------------------------------------------------------------------
# Checkpoints (torch.distributed.checkpoint)

def dcp_checkpoints(out_dir: str) -> list:
    """-> every complete DCP checkpoint folder (renamed into place, with DCP's .metadata), newest first:
    the candidates a resume tries in turn when the newest turns out damaged."""
    root = os.path.join(out_dir, "dcp")
    if not os.path.isdir(root):
        return []
    names = sorted((d for d in os.listdir(root) if re.fullmatch(r"step_\d+", d)), reverse=True)
    return [os.path.join(root, d) for d in names if os.path.exists(os.path.join(root, d, ".metadata"))]


def _sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _gather(obj, info: DistInfo) -> list:
    """One Python object from every rank -> the list of them, on every rank."""
    if not info.on:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def write_dcp_manifest(folder: str, info: DistInfo):
    """manifest.json = {file: sha256} for every file of a DCP checkpoint. Each rank hashes its own shard
    files (DCP names them __<rank>_<n>.distcp), so an 8B save's ~100 GB are hashed W ways in parallel;
    rank 0 hashes the rest and writes the manifest into the folder before it is renamed into place."""
    files = sorted(os.listdir(folder))
    mine = [f for f in files if f.startswith(f"__{info.rank}_")]
    if info.main:
        mine += [f for f in files if not re.match(r"__\d+_", f)]
    sums = {}
    for part in _gather({f: _sha256(os.path.join(folder, f)) for f in mine}, info):
        sums.update(part)
    if info.main:
        with open(os.path.join(folder, "manifest.json"), "w") as fh:
            json.dump(sums, fh, indent=0)


def verify_dcp(folder: str, info: DistInfo) -> str | None:
    """-> None if every file of the DCP checkpoint matches its manifest.json (or it has none: written
    before manifests), else what is wrong. The ranks share the hashing; every rank gets the same answer."""
    path = os.path.join(folder, "manifest.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            sums = json.load(fh)
        assert isinstance(sums, dict)
    except (OSError, ValueError, AssertionError):
        return "its manifest.json is unreadable"
    names = sorted(sums)[info.rank::info.world]
    bad = [f for f in names if not os.path.exists(os.path.join(folder, f))
           or _sha256(os.path.join(folder, f)) != sums[f]]
    bad = sorted(f for part in _gather(bad, info) for f in part)
    return f"{len(bad)} file(s) fail their sha256 checksum ({', '.join(bad[:3])})" if bad else None


def _fsync_tree(path: str):
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)  # the directory entry itself
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _one_process_ok():
    """DCP warns when it runs without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_dcp(out_dir: str, step: int, model, opt, extra: dict, info: DistInfo, keep: int = 2):
    """Every rank writes its shards; rank 0 publishes the checkpoint atomically and prunes old ones."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    root = os.path.join(out_dir, "dcp")
    name = f"step_{step:06d}"
    tmp = os.path.join(root, name + ".tmp")
    if info.main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed while saving
        os.makedirs(tmp)
    barrier()
    msd, osd = get_state_dict(model, opt)
    # `extra` (step, config, counters) travels as one JSON string: DCP flattens nested dicts into keys
    with _one_process_ok():
        dcp.save({"model": msd, "optim": osd, "extra": json.dumps(extra)}, checkpoint_id=tmp)  # collective
    write_dcp_manifest(tmp, info)        # checksums of every file, inside the folder
    if info.main:
        _fsync_tree(tmp)
        final = os.path.join(root, name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)           # atomic: the folder appears complete or not at all
        write_text(os.path.join(root, "latest"), name)
        old = sorted(d for d in os.listdir(root) if d.startswith("step_") and d != name)
        for d in old[:max(0, len(old) - keep + 1)]:  # keep the `keep` newest, this one included
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    barrier()


def read_extra(path: str) -> dict:
    """The `extra` dict (step, config, counters) of a DCP checkpoint, without touching any tensor."""
    import torch.distributed.checkpoint as dcp
    state = {"extra": ""}
    with _one_process_ok():
        dcp.load(state, checkpoint_id=path)
    return json.loads(state["extra"])


def load_dcp(path: str, model, opt) -> dict:
    """Load a DCP checkpoint written by any number of processes into this run's (sharded) model and
    optimizer. -> the `extra` dict saved with it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "extra": ""}
    with _one_process_ok():
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads(state["extra"])


def full_state_dict(model) -> dict:
    """The whole model's weights on the CPU of rank 0 (a collective under FSDP2; every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
