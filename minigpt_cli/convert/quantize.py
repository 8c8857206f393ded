"""`minigpt quantize`: write a run's weights as int8 (or int4) into a new run directory."""

from __future__ import annotations

import sys
from pathlib import Path

from minigpt_cli.files import check_new_folder
from minigpt_cli.model.int8 import GROUP, int8_pairs, pack, quantize_model


def quantize_run(run: str, out_dir: Path, kind: str = "int8") -> Path:
    """`minigpt quantize RUN OUT [--type int8|int4]`: write OUT/model.safetensors with rounded
    weights (int8, or int4 two a byte with the head int8) and the tokenizer beside it, which
    every command loads as it loads any run."""
    from minigpt_cli import tokenizer as tok
    from minigpt_cli.errors import UserError
    from minigpt_cli.inference.loading import find_checkpoint
    from minigpt_cli.model import store

    if kind not in ("int8", "int4"):
        raise UserError(f"--type must be int8 or int4, not '{kind}'")
    path = find_checkpoint(run)
    out_dir = Path(out_dir)
    check_new_folder(out_dir)
    model, meta = store.load_model(path)
    if meta.get("quantize"):
        raise UserError(f"{path} already holds rounded ({meta['quantize'].get('kind', 'int8')}) "
                        "weights")
    report = quantize_model(model, kind=kind)
    pairs = int8_pairs(model)
    int4 = frozenset(n for n in pairs if n != "wte.weight") if kind == "int4" else frozenset()
    odd = [n for n in int4 if pairs[n][0].shape[0] % 2]
    if odd:
        raise UserError(f"int4 files pack two input rows a byte; {odd[0]} has an odd number")
    tensors = pack(store.model_tensors(model), pairs, int4)
    meta = {**meta, "quantize": {"kind": kind, "group": GROUP}, "quantized_from": str(path)}
    store.save_model(out_dir / store.MODEL_FILE, tensors, meta)
    tok.copy_tokenizer_file(meta["tokenizer"], path.parent, out_dir)
    print(report.describe(), file=sys.stderr)
    return out_dir / store.MODEL_FILE
