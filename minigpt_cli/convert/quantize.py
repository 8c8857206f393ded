"""`minigpt quantize`: write a run's weights as int8 into a new run directory."""

from __future__ import annotations

import sys
from pathlib import Path

from minigpt_cli.files import check_new_folder
from minigpt_cli.model.int8 import GROUP, int8_pairs, pack, quantize_model


def quantize_run(run: str, out_dir: Path) -> Path:
    """`minigpt quantize RUN OUT`: write OUT/model.safetensors with int8 weights (and the
    tokenizer beside it), which every command loads as it loads any run."""
    from minigpt_cli import tokenizer as tok
    from minigpt_cli.errors import UserError
    from minigpt_cli.inference.loading import find_checkpoint
    from minigpt_cli.model import store

    path = find_checkpoint(run)
    out_dir = Path(out_dir)
    check_new_folder(out_dir)
    model, meta = store.load_model(path)
    if meta.get("quantize"):
        raise UserError(f"{path} already holds int8 weights")
    report = quantize_model(model)
    tensors = pack(store.model_tensors(model), int8_pairs(model))
    meta = {**meta, "quantize": {"kind": "int8", "group": GROUP}, "quantized_from": str(path)}
    store.save_model(out_dir / store.MODEL_FILE, tensors, meta)
    tok.copy_tokenizer_file(meta["tokenizer"], path.parent, out_dir)
    print(report.describe(), file=sys.stderr)
    return out_dir / store.MODEL_FILE
