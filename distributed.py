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
by W processes loads on any other number (resharding). Nothing is unpickled freely on load: only tensors
are stored (the non-tensor state travels as a JSON byte tensor) and DCP's pickled .metadata is read by a
restricted unpickler that builds DCP's metadata classes only (docs/errors.md, "What a DCP resume trusts").

Workers and their launcher: under torchrun each worker asks Linux to be sent SIGTERM when its parent
dies (prctl PR_SET_PDEATHSIG, in setup), so a kill -9 of torchrun does not leave orphans training.
"""
import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from cli import exit_with_parent, write_stopped, write_text


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


# No pickle is loaded from a DCP folder. DCP itself reads .metadata with pickle.load, tensors with
# torch.load(weights_only=True) (torch's restricted unpickler) and any non-tensor value (a "BYTE_IO" item: a
# string, an optimizer's betas) with torch.load(weights_only=False), which runs whatever it is told. So:
#   - only tensors are saved: the non-tensor state (param_groups, AdamW's step counts) and `extra` travel as
#     one JSON document in a uint8 tensor "json", tensor data that manifest.json's sha256 covers;
#   - .metadata is read by _MetadataUnpickler, which builds only the classes DCP puts there, then checked to
#     hold tensors only, each in one of the folder's own __<rank>_<n>.distcp files;
#   - loads use that reader and a planner whose load_bytes refuses: nothing reaches weights_only=False.
# Older checkpoints, which stored `extra` and the optimizer's scalars as pickles, are refused (docs/errors.md).

_METADATA_GLOBALS = {  # (module, name) that torch 2.13's DCP puts in .metadata, and nothing more
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # file, offset and length of one item
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),                      # "torch.strided" -> torch.strided, a lookup
    *((m, n) for m in ("pathlib", "pathlib._local") for n in ("Path", "PosixPath", "WindowsPath"))}  # checkpoint_id


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only _METADATA_GLOBALS and torch dtypes: every class or function a pickle names goes through
    find_class, so a payload (os.system, a class with a __reduce__) is refused before anything is called."""

    def find_class(self, module, name):
        # vars(torch), not getattr: torch's module __getattr__ imports submodules on demand
        if (module, name) in _METADATA_GLOBALS or module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not DCP metadata")


def read_metadata(folder: str):
    """A DCP checkpoint's .metadata, read by _MetadataUnpickler and checked to describe tensors only, each in
    one of the folder's own shard files -> torch's Metadata. ValueError (one line, naming the folder) else."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
    path = os.path.join(folder, ".metadata")
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
        items = md.state_dict_metadata if type(md) is Metadata else None
        assert isinstance(items, dict) and isinstance(md.storage_data, dict), f"it holds a {type(md).__name__}"
    except Exception as e:  # noqa: BLE001 (UnpicklingError, EOFError, a bad REDUCE argument, ...)
        raise ValueError(f"{path} is not DCP metadata written by this project, refused (loading it could run "
                         f"code); {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    pickled = [k for k, v in items.items() if isinstance(v, BytesStorageMetadata)]
    if pickled:
        raise ValueError(f"{folder} stores {len(pickled)} non-tensor item(s) as pickles ({', '.join(pickled[:2])} ...): "
                         f"written before DCP checkpoints held tensors only, and refused (loading them could run "
                         f"code); start over with --overwrite=1 (docs/errors.md)")
    bad = [i for i in md.storage_data.values() if not isinstance(i, _StorageInfo) or i.transform_descriptors
           or not re.fullmatch(r"__\d+_\d+\.distcp", str(i.relative_path))]
    if "json" not in items or bad or not all(isinstance(v, TensorStorageMetadata) for v in items.values()):
        raise ValueError(f"{path} is not DCP metadata written by this project (no 'json' tensor, or items outside "
                         f"the folder's __<rank>_<n>.distcp files); refused")
    return md


def _load_tensors(folder: str, state: dict):
    """dcp.load of `state` (tensors only) through read_metadata() above and a planner that refuses
    non-tensor items. A reader failure (a truncated shard) -> ValueError naming the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # DCP's own calls pickle.load
            md = read_metadata(str(self.path))
            md.storage_meta = md.storage_meta or StorageMeta()
            md.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
            return md

    class TensorsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):  # DCP's: torch.load(weights_only=False); unreachable after
            raise ValueError(f"{folder}: item {read_item.dest_index.fqn} is a pickle; refused")  # read_metadata
    try:
        with _one_process_ok():
            dcp.load(state, storage_reader=SafeReader(folder), planner=TensorsOnly())
    except CheckpointException as e:  # a BaseException holding what each rank raised
        causes = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()] or [e]
        if any(isinstance(c, KeyboardInterrupt) for c in causes):
            raise KeyboardInterrupt from None  # Ctrl-C stays Ctrl-C, not "a damaged checkpoint"
        raise ValueError(f"{folder} could not be read ({type(causes[0]).__name__}: "
                         f"{str(causes[0]).splitlines()[0] if str(causes[0]) else ''})") from None


def _split(tree):
    """A nested dict -> (the same nesting with only its tensors, the same with only the rest), None for an
    empty side. Lists, numbers and strings are 'the rest' whole (an optimizer's param_groups); JSON gives
    tuples (AdamW's betas) back as lists, which the optimizers unpack alike."""
    if isinstance(tree, torch.Tensor):
        return tree, None
    if not isinstance(tree, dict) or not tree:
        return None, tree
    parts = {k: _split(v) for k, v in tree.items()}
    tensors = {k: t for k, (t, _) in parts.items() if t is not None}
    rest = {k: r for k, (_, r) in parts.items() if r is not None}
    return tensors or None, rest or None


def _merge(tensors, rest):
    """_split's inverse."""
    if tensors is None or rest is None:
        return rest if tensors is None else tensors
    return {**rest, **{k: _merge(v, rest.get(k)) for k, v in tensors.items()}}


def save_dcp(out_dir: str, step: int, model, opt, extra: dict, info: DistInfo, keep: int = 2):
    """Every rank writes its shards; rank 0 publishes the checkpoint atomically and prunes old ones.
    Tensors only (see above): {"model": ..., "optim": ..., their tensors, "json": the uint8 bytes of
    {"extra": extra, "state": every non-tensor entry of the model's and optimizer's state dicts}}."""
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
    tensors, rest = _split({"model": msd, "optim": osd})  # rest: param_groups, AdamW's step counts
    doc = json.dumps({"extra": extra, "state": rest}).encode()
    state = {**tensors, "json": torch.frombuffer(bytearray(doc), dtype=torch.uint8)}
    try:
        with _one_process_ok():
            dcp.save(state, checkpoint_id=tmp)  # collective
        write_dcp_manifest(tmp, info)        # checksums of every file, inside the folder
    except BaseException as e:  # DCP's CheckpointException is a BaseException: {rank: (cause, traceback)}
        if info.main:
            shutil.rmtree(tmp, ignore_errors=True)
        causes = [e] + [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
        stop = write_stopped(tmp, causes, "the folder is removed, the checkpoints before it unchanged")
        if stop is None:
            raise
        raise stop from None
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


def _read_json(path: str, md) -> dict:
    """The checkpoint's "json" tensor (read as tensor data) -> {"extra": ..., "state": ...}."""
    spec = md.state_dict_metadata["json"]
    if spec.properties.dtype != torch.uint8 or len(spec.size) != 1:
        raise ValueError(f"{path}: its 'json' item is not a byte tensor ({spec.properties.dtype}, {tuple(spec.size)})")
    state = {"json": torch.empty(spec.size, dtype=torch.uint8)}
    _load_tensors(path, state)
    try:
        doc = json.loads(state["json"].numpy().tobytes().decode())
        assert isinstance(doc, dict) and isinstance(doc.get("extra"), dict)
    except (ValueError, AssertionError):
        raise ValueError(f"{path}: its 'json' item is not the JSON this project writes") from None
    return doc


def read_extra(path: str) -> dict:
    """The `extra` dict (step, config, counters) of a DCP checkpoint, without touching any other tensor.
    ValueError (one line) for a folder whose metadata or items are not what this project writes."""
    return _read_json(path, read_metadata(path))["extra"]


def load_dcp(path: str, model, opt) -> dict:
    """Load a DCP checkpoint written by any number of processes into this run's (sharded) model and
    optimizer. -> the `extra` dict saved with it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    doc = _read_json(path, read_metadata(path))
    msd, osd = get_state_dict(model, opt)
    state = _split({"model": msd, "optim": osd})[0]  # the tensors to fill: their shapes and shards
    _load_tensors(path, state)
    state = _merge(state, doc["state"])              # with the saved non-tensor entries
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return doc["extra"]


def full_state_dict(model) -> dict:
    """The whole model's weights on the CPU of rank 0 (a collective under FSDP2; every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
