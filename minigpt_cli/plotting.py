"""matplotlib, imported only when a --plot is asked for, and figures written atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from minigpt_cli.errors import UserError
from minigpt_cli.files import atomic_write_bytes


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def save(fig: Any, path: Path) -> None:
    """PNG bytes rendered in memory, then one atomic write: no half-written image."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
    pyplot().close(fig)
