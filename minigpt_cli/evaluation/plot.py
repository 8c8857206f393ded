"""What `minigpt eval` writes: its JSON record, and its figures (loss against context, and
exposure bias's error curves)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from minigpt_cli.files import atomic_write_text, to_json
from minigpt_cli.plotting import pyplot, save


def plot_context(record: dict[str, Any], path: Path) -> None:
    """Mean loss of a token against how many tokens of context it was predicted from; only
    context lengths with 10+ tokens behind them (with stride < window, short contexts occur in
    the first window alone: --stride WINDOW shows them all)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    points = [(k + 1, y) for k, (y, n) in
              enumerate(zip(record["loss_by_context"], record["context_counts"], strict=True))
              if n >= 10 and y is not None]
    ax.plot([x for x, _ in points], [y for _, y in points], color="#4c72b0",
            label=f"by context (stride {record['stride']})")
    ax.axhline(record["loss"], color="#999999", linestyle="--",
               label=f"whole text: {record['loss']:.3f} nats, {record['bits_per_byte']:.3f} bpb")
    ax.set(xscale="log", xlabel="tokens of context", ylabel="mean loss (nats/token)",
           title=f"{Path(record['checkpoint']).parent.name} on {record['data']}"[:80])
    ax.legend()
    fig.tight_layout()
    save(fig, path)


def plot_exposure(record: dict[str, Any], path: Path) -> None:
    """With an oracle: R_D and R_M against l, log-log. Without: entropy by position."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"data": "#4c72b0", "greedy": "#c44e52", "sampled": "#dd8452"}
    labels = {"data": "data prefixes (R_D)", "greedy": "greedy model prefixes (R_M)",
              "sampled": "sampled model prefixes (R_M, T=1)"}
    if "R" in record:
        positive = all(v > 0 for values in record["R"].values() for v in values)
        for kind, values in record["R"].items():
            ax.plot(range(1, len(values) + 1), values, color=colors[kind], label=labels[kind])
        scale = "log" if positive else "linear"  # all zero: the model is its own oracle
        ax.set(xscale=scale, yscale=scale, xlabel="l (continuation tokens)",
               ylabel="accumulated KL(oracle || model), nats")
    else:
        for kind, values in record["entropy_by_position"].items():
            ax.plot(range(1, len(values) + 1), values, color=colors[kind],
                    label=labels[kind].split(" (")[0])
        ax.set(xlabel="continuation position", ylabel="next-token entropy (nats)")
    ax.set_title(f"exposure bias · {Path(record['checkpoint']).parent.name}"[:80])
    ax.legend()
    fig.tight_layout()
    save(fig, path)


def write_outputs(record: dict[str, Any], json_path: Path | None, plot_path: Path | None,
                  plot: Callable[[dict[str, Any], Path], None]) -> None:
    """The record as JSON (atomically) and its figure, where asked for."""
    if json_path:
        atomic_write_text(json_path, to_json(record, indent=1))
    if plot_path:
        plot(record, plot_path)
