"""FSDP2 (`train.parallel: fsdp`): each rank holds a 1/N shard of every weight and of its AdamW
moments, and its checkpoints are torch.distributed.checkpoint (DCP) directories.

Why DCP: a sharded run should not gather the whole model onto one rank to save its resume
state. Each rank writes its own shards. DCP's Hugging Face storage writer is used, so the
files are safetensors whose headers carry each shard's offsets, never pickle. DCP's reader
reassembles them for any number of ranks, so a run saved on 2 ranks resumes on 1, 2 or 4. The
commit protocol is run_state.py's: the shards go to a temp directory; once every rank has
written, rank 0 adds `minigpt.json` (the step), renames the directory into place, and only then
writes the train_state.json that names it. The inference weights (`model.safetensors`) are a
full-state gather onto rank 0, so `generate` and `export-hf` need nothing new.

A resume's tensors have one key space whatever wrote them: `model.<name>` and
`optim.<index>.<moment>`, the index being the parameter's position in the optimizer's groups.
That space is the same for a plain, a DDP and an FSDP2 model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from minigpt_cli import files
from minigpt_cli.errors import UserError
from minigpt_cli.model import store

MARKER = "minigpt.json"


def shard(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """fully_shard each block, then the root (embeddings, final norm and the tied head stay
    together there). On CUDA with a 16-bit dtype, FSDP2 gathers weights in that dtype and
    reduces gradients in float32; elsewhere weights stay float32 and autocast does the rest."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors on CPU. Sharded, this is a collective (every rank must call
    it) and only rank 0 receives the tensors; the others get {}."""
    if not is_sharded(model):
        return store.model_tensors(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                               cpu_offload=True))
    return {k: v.contiguous() for k, v in full.items()}


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def _materialize(opt: torch.optim.Optimizer) -> None:
    """Create AdamW's moments (it makes them lazily) by a step that changes nothing: zero
    gradients at learning rate 0. A resume then overwrites every value in place."""
    if opt.state:
        return
    rates = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in _params(opt):
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for group, lr in zip(opt.param_groups, rates, strict=True):
        group["lr"] = lr


def _set_groups(opt: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    for group, saved in zip(opt.param_groups, groups, strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})


def resume_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The live tensors a resume fills in place, by checkpoint key (shards when sharded)."""
    _materialize(opt)
    raw = getattr(model, "_orig_mod", model)
    out = {f"model.{name}": p.detach() for name, p in raw.named_parameters()}
    index = {id(p): i for i, p in enumerate(_params(opt))}
    for p, state in opt.state.items():
        for name, t in state.items():
            out[f"optim.{index[id(p)]}.{name}"] = t
    return out


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                   groups: list[dict[str, Any]]) -> None:
    """AdamW's state from a single-file resume point, for plain or sharded parameters (each
    rank keeps its shard of every moment)."""
    params = _params(opt)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):  # the same order on every rank: distribute_tensor is collective
        if not key.startswith("optim."):
            continue
        _, pid, name = key.split(".", 2)
        t, p = tensors[key], params[int(pid)]
        if name == "step":
            t = t.reshape(())
        elif isinstance(p, DTensor):
            t = distribute_tensor(t.to(p.device_mesh.device_type), p.device_mesh, p.placements)
        state.setdefault(int(pid), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": groups})


def save(run_dir: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
         main: bool) -> str:
    """Every rank writes its shards (a collective); rank 0 then marks the directory complete
    and moves it into place. Returns its name, for train_state.json to point at."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    name = f"train_state-{step:07d}.dcp"
    tmp = run_dir / f".{name}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    torch.distributed.barrier()  # nobody writes into a directory rank 0 is still clearing
    dcp.save(resume_tensors(model, opt),
             storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    if main:  # dcp.save returns on rank 0 after every rank's files are written and synced
        files.atomic_write_text(tmp / MARKER, json.dumps({"step": step, "format": "dcp"}))
        final = run_dir / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        files.fsync_dir(run_dir)
    return name


def load(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
         groups: list[dict[str, Any]]) -> None:
    """Fill the model and optimizer from a DCP directory, whatever world size wrote it: DCP
    reads each rank's slice out of the saved shards (plain tensors read everything)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    target = resume_tensors(model, opt)
    try:
        with torch.no_grad():
            dcp.load(target, storage_reader=HuggingFaceStorageReader(str(path)),
                     no_dist=not torch.distributed.is_initialized())
    except Exception as e:  # DCP wraps every failure (a missing key, a shape) in its own types
        raise UserError(f"{path} does not match this model ({str(e).splitlines()[0][:200]}); "
                        "resume with the config the run was started with") from None
    _set_groups(opt, groups)
