"""PNG plot for `minigpt bench --plot` (matplotlib is an optional extra: minigpt[plot])."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from minigpt_cli.plotting import pyplot, save

if TYPE_CHECKING:
    from minigpt_cli.bench.measure import LengthResult


def plot(results: list[LengthResult], header: dict, path: Path) -> None:
    """Left: ms per token against position (longest n). Right: total time against n."""
    plt = pyplot()
    last = results[-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    steps = range(1, last.n + 1)
    left.plot(steps, last.uncached.ms_per_token, label="without KV cache", color="#c44e52")
    left.plot(steps, last.cached.ms_per_token, label="with KV cache", color="#4c72b0")
    left.set(xlabel="generated token #", ylabel="ms per token",
             title=f"Per-token latency, {last.n} new tokens")
    left.legend()
    ns = [r.n for r in results]
    right.plot(ns, [r.uncached.total_s for r in results], "o-", label="without KV cache",
               color="#c44e52")
    right.plot(ns, [r.cached.total_s for r in results], "o-", label="with KV cache",
               color="#4c72b0")
    right.set(xlabel="new tokens n", ylabel="total seconds", title="Total time against n",
              xscale="log", yscale="log")
    right.legend()
    fig.suptitle(f"minigpt bench · {header['params'] / 1e6:.2f}M params · {header['device']} "
                 f"{header['dtype']} · {header['threads']} threads · "
                 f"batch {header['batch_size']} · cached steps: {header.get('engine', 'torch')}")
    fig.tight_layout()
    save(fig, path)
