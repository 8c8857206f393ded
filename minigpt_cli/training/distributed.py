"""Training past one process, on PyTorch's own machinery: torchrun's environment,
torch.distributed (gloo on CPU, nccl on CUDA), DistributedDataParallel and FSDP2 (sharding.py).

`minigpt train` stays one process unless torchrun (or anything that sets WORLD_SIZE, RANK and
LOCAL_RANK, and MASTER_ADDR/MASTER_PORT or an init method) starts several. A config then means
the same run at any scale: `train.grad_accum_steps` is the *global* number of micro-batches per
optimizer step, split evenly over the ranks, and every micro-batch (data and dropout masks) is a
function of (seed, step, global micro-batch index) alone, so N ranks end where one process
does.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from minigpt_cli.errors import UserError


def _timeout_s() -> float:
    """Seconds to wait for the group (MINIGPT_DIST_TIMEOUT, default 120)."""
    text = os.environ.get("MINIGPT_DIST_TIMEOUT", "120")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UserError(f"MINIGPT_DIST_TIMEOUT must be a positive number of seconds, got "
                        f"'{text}'")
    return value


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 logs, prints and writes the run directory."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def micro_batches(self, n_global: int) -> range:
        """This rank's global micro-batch indices: a contiguous share of n_global."""
        if n_global % self.world:
            raise UserError(f"train.grad_accum_steps ({n_global}) must be divisible by the "
                            f"number of ranks ({self.world}): it counts micro-batches per "
                            "optimizer step over all ranks")
        share = n_global // self.world
        return range(self.rank * share, (self.rank + 1) * share)


def from_env(init_method: str | None = None) -> Ranks:
    """Join the process group torchrun describes, with a timeout so a missing or dead peer is
    an error, not a hang. One process (no WORLD_SIZE, or 1) needs no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    timeout = _timeout_s()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        try:
            store = _attempt_store(world, timeout) if init_method is None else None
            dist.init_process_group(backend, init_method=init_method, store=store, rank=rank,
                                    world_size=world, timeout=timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as e:  # DistStoreError is a RuntimeError
            raise UserError(f"rank {rank} of {world} could not join the process group within "
                            f"{timeout:.0f} s: {str(e).splitlines()[0]}") from None
    return Ranks(rank, world, local)


def _attempt_store(world: int, timeout: float) -> dist.Store | None:
    """torchrun's c10d rendezvous shares its agent's TCPStore with the workers, and the store
    outlives a restart. A restarted group then finds the dead group's addresses under the same
    keys, and a rank that reads one before its peer rewrites it cannot connect (gloo:
    "connectFullMesh failed ... Connection refused"; 5 of 6 restarts failed here; the nccl form
    is pytorch/pytorch#135712). So each attempt gets its own key prefix. None: the plain
    env:// rendezvous, when torchrun's agent hosts no store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=timedelta(seconds=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"minigpt/attempt-{attempt}", store)


class PeerLost(Exception):
    """A collective failed because another rank died mid-run; the CLI prints one line and
    exits 1 (torchrun then restarts the group, or reports the job failed)."""


def peer_lost(error: BaseException, ranks: Ranks) -> PeerLost | None:
    """The one-line form of a collective's failure, or None if `error` is not one."""
    text = str(error)
    if not ranks.enabled or not (isinstance(error, dist.DistError)
                                 or any(k in text for k in ("gloo", "Gloo", "NCCL"))):
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    why = re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else type(error).__name__)
    return PeerLost(f"rank {ranks.rank} of {ranks.world} lost a peer "
                    f"({why.split('. ')[0][:160]})")


def restarted() -> bool:
    """Whether torchrun's elastic agent restarted this group after a worker failed."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def all_sum(values: list[float], ranks: Ranks) -> list[float]:
    """Element-wise sum over ranks (a float64 all-reduce); unchanged for one process."""
    if not ranks.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def any_rank(flag: bool, ranks: Ranks) -> bool:
    """True on every rank if it is true on any (a stop request, say)."""
    return bool(all_sum([float(flag)], ranks)[0])


def barrier(ranks: Ranks) -> None:
    if ranks.enabled:
        dist.barrier()


@contextlib.contextmanager
def no_sync(model: torch.nn.Module, skip: bool) -> Iterator[None]:
    """Micro-batches before the last keep their gradients local (DDP's no_sync, FSDP2's
    set_requires_gradient_sync); the last one's backward all-reduces (or reduce-scatters)
    the sum once."""
    if skip and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(not skip)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def wrap(model: torch.nn.Module, ranks: Ranks, parallel: str = "ddp",
         dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """DistributedDataParallel over the group, or FSDP2, which shards `model` in place (the
    model itself for one process)."""
    if not ranks.enabled:
        return model
    if parallel == "fsdp":
        from minigpt_cli.training.sharding import shard

        return shard(model, next(model.parameters()).device, dtype)
    from torch.nn.parallel import DistributedDataParallel

    cuda = next(model.parameters()).is_cuda
    return DistributedDataParallel(model, device_ids=[ranks.local_rank] if cuda else None)


def shutdown(ranks: Ranks) -> None:
    if ranks.enabled and dist.is_initialized():
        dist.destroy_process_group()
