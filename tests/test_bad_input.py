"""Every option of every command, given a bad value, through the real CLI: exit code 2, one
line on stderr that names the option, nothing on stdout, nothing written.

The cases come from one table, CASES. `test_every_option_has_a_case` reads the commands' own
option lists, so an option added without a bad-input case (or an explicit reason it has none)
fails the suite.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from minigpt_cli.config import config_from_dict
from minigpt_cli.training.loop import train
from tests.conftest import make_text, tiny_raw
from tests.forks import Forks


@dataclass(frozen=True)
class Case:
    command: str
    args: tuple[str, ...]
    says: str  # what the one error line must contain: the option, or the thing it names

    @property
    def id(self) -> str:
        return " ".join((self.command, *self.args))


def c(command: str, *args: str, says: str) -> Case:
    return Case(command, args, says)


# {port} is a port something else holds for the duration of the test.
CASES = [
    # train CONFIG [--resume] [--set K=V]
    c("train", "missing.yaml", says="config file not found"),
    c("train", "typo.yaml", says="did you mean 'model'"),
    c("train", "broken.yaml", says="not valid YAML"),
    c("train", "nodata.yaml", says="/no/such/file.txt"),
    c("train", "cfg.yaml", "--set", "model.n_head=3", says="model.n_head"),
    c("train", "cfg.yaml", "--set", "train.max_steps=abc", says="train.max_steps"),
    c("train", "cfg.yaml", "--set", "max_steps", says="--set"),
    c("train", "cfg.yaml", "--resume", says="nothing to resume"),
    c("train", "--resume=yes", "cfg.yaml", says="--resume"),
    c("train", says="Missing argument 'config'"),
    # prepare SOURCE
    c("prepare", "foo", says="nothing to prepare for 'foo'"),
    # generate
    c("generate", "--checkpoint", "nowhere", says="checkpoint not found"),
    c("generate", "--checkpoint", "cut.safetensors", says="corrupt or truncated"),
    c("generate", "--checkpoint", "weights.bin", says="pickle"),
    c("generate", "--checkpoint", "empty", says="holds no model.safetensors"),
    c("generate", "--max-new-tokens", "0", says="--max-new-tokens"),
    c("generate", "--max-new-tokens", "abc", says="--max-new-tokens"),
    c("generate", "--temperature", "-1", says="--temperature"),
    c("generate", "--top-k", "-2", says="--top-k"),
    c("generate", "--top-p", "1.5", says="--top-p"),
    c("generate", "--min-p", "1", says="--min-p"),
    c("generate", "--repetition-penalty", "0", says="--repetition-penalty"),
    c("generate", "--repeat-last-n", "-1", says="--repeat-last-n"),
    c("generate", "--seed", "abc", says="--seed"),
    c("generate", "--num-beams", "0", says="--num-beams"),
    c("generate", "--num-beams", "2", "--num-samples", "2", says="--num-beams"),
    c("generate", "--num-beams", "2", "--trace", says="--num-beams"),
    c("generate", "--stop", "", says="--stop"),
    c("generate", "--num-samples", "0", says="--num-samples"),
    c("generate", "--prompts-file", "missing.txt", says="--prompts-file"),
    c("generate", "--prompts-file", "empty.txt", says="--prompts-file"),
    c("generate", "--prompts-file", "bad.jsonl", says="--prompts-file"),
    c("generate", "--json=yes", says="--json"),
    c("generate", "--device", "quantum", says="unknown device"),
    c("generate", "--dtype", "float8", says="unknown dtype"),
    c("generate", "--quantize", "int2", says="--quantize must be one of none, int8, int4"),
    c("generate", "--prompt-lookup", "-1", says="--prompt-lookup"),
    c("generate", "--draft-k", "0", says="--draft-k"),
    c("generate", "--draft", "", says="--draft must name"),
    c("generate", "--draft", "nowhere", says="--draft: checkpoint not found"),
    c("generate", "--draft", "other", says="--draft other uses other tokens"),
    c("generate", "--draft", "runs/tiny", "--prompt-lookup", "2", says="choose one"),
    c("generate", "--draft", "runs/tiny", "--num-beams", "2", says="does not speculate"),
    c("generate", "--engine", "turbo", says="unknown engine"),
    c("generate", "--engine", "native", "--dtype", "bfloat16", says="--engine native"),
    c("generate", "--no-such-flag", says="No such option: --no-such-flag"),
    c("generate", "--json-schema", "missing.json", says="--json-schema: cannot read"),
    c("generate", "--json-schema", "bad.jsonl", says="--json-schema: bad.jsonl is not JSON"),
    c("generate", "--json-schema", "badschema.json", says="--json-schema: invalid json schema"),
    c("generate", "--regex", "[0-9", says="--regex: invalid regex"),
    c("generate", "--regex", "a", "--json-schema", "badschema.json", says="give one"),
    c("generate", "--regex", "a", "--num-beams", "2", says="--num-beams does not follow"),
    # chat: every option is refused before stdin is read (the cases' stdin is empty)
    c("chat", "--checkpoint", "nowhere", says="checkpoint not found"),
    c("chat", "--max-new-tokens", "0", says="--max-new-tokens"),
    c("chat", "--temperature", "-1", says="--temperature"),
    c("chat", "--temperature", "nan", says="--temperature must be a finite number"),
    c("chat", "--top-k", "-2", says="--top-k"),
    c("chat", "--top-p", "1.5", says="--top-p"),
    c("chat", "--seed", "abc", says="--seed"),
    c("chat", "--device", "quantum", says="unknown device"),
    c("chat", "--dtype", "float8", says="unknown dtype"),
    c("chat", "--engine", "turbo", says="unknown engine"),
    # import-hf HF_DIR OUT_DIR, export-hf RUN OUT_DIR
    c("import-hf", "empty", "out", says="no config.json"),
    c("import-hf", "nowhere", "out", says="nowhere is not a directory"),
    c("import-hf", "hf", "out", says="has no valid vocab_size, n_positions, n_embd"),
    c("import-hf", "hf", "runs/tiny", says="runs/tiny is not empty: name a new or empty folder"),
    c("import-hf", "hf", "cfg.yaml", says="cfg.yaml is a file, not a folder"),
    c("export-hf", "nowhere", "out", says="checkpoint not found"),
    c("export-hf", "runs/tiny", "cfg.yaml", says="cfg.yaml is a file, not a folder"),
    c("export-hf", "runs/tiny", "runs", says="runs is not empty"),
    # serve
    c("serve", "--checkpoint", "nowhere", says="checkpoint not found"),
    c("serve", "--host", "", says="--host"),
    c("serve", "--host", "no.such.host.invalid", says="cannot listen on no.such.host.invalid"),
    c("serve", "--port", "70000", says="--port"),
    c("serve", "--port", "{port}", says="cannot listen"),
    c("serve", "--max-batch", "0", says="--max-batch"),
    c("serve", "--max-queue", "-1", says="--max-queue"),
    c("serve", "--api-key", "", says="--api-key"),
    c("serve", "--max-tokens", "0", says="--max-tokens"),
    c("serve", "--max-body-bytes", "0", says="--max-body-bytes"),
    c("serve", "--model-name", "", says="--model-name"),
    c("serve", "--max-prefill-tokens", "-1", says="--max-prefill-tokens"),
    c("serve", "--quantize", "int2", says="--quantize must be one of none, int8, int4"),
    c("serve", "--prompt-lookup", "-1", says="--prompt-lookup"),
    c("serve", "--draft-k", "0", says="--draft-k"),
    c("serve", "--draft", "nowhere", says="--draft: checkpoint not found"),
    c("serve", "--draft", "other", says="--draft other uses other tokens"),
    c("serve", "--engine", "warp", says="unknown engine"),
    c("serve", "--engine", "native", "--dtype", "bfloat16", says="--engine native"),
    c("serve", "--device", "quantum", says="unknown device"),
    c("serve", "--dtype", "float8", says="unknown dtype"),
    # bench
    # export-gguf RUN OUT [--type]
    c("export-gguf", "nowhere", "m.gguf", says="checkpoint not found"),
    c("export-gguf", "runs/tiny", "runs", says="runs is a folder, not a file"),
    c("export-gguf", "runs/tiny", "nowhere/m.gguf", says="nowhere is not a directory"),
    c("export-gguf", "runs/tiny", "m.gguf", "--type", "q5_k", says="--type must be one of"),
    c("quantize", "nowhere", "out", says="checkpoint not found"),
    c("quantize", "runs/tiny", "out", "--type", "int2", says="--type must be int8 or int4"),
    c("quantize", "runs/tiny", "cfg.yaml", says="cfg.yaml is a file, not a folder"),
    c("bench", "--quantize", "int2", says="--quantize must be one of none, int8, int4"),
    c("bench", "--checkpoint", "nowhere", says="checkpoint not found"),
    c("bench", "--config", "missing.yaml", says="config file not found"),
    c("bench", "--lengths", "abc", says="--lengths"),
    c("bench", "--lengths", "0", says="--lengths"),
    c("bench", "--prompt-len", "0", says="--prompt-len"),
    c("bench", "--batch-size", "0", says="--batch-size"),
    c("bench", "--repeats", "0", says="--repeats"),
    c("bench", "--device", "quantum", says="unknown device"),
    c("bench", "--dtype", "float8", says="unknown dtype"),
    c("bench", "--json", "no/such/dir/b.json", says="--json"),
    c("bench", "--plot", "no/such/dir/b.png", says="--plot"),
    c("bench", "--train=yes", says="--train"),
    c("bench", "--engine", "turbo", says="unknown engine"),
    c("bench", "--prompt-lookup", "2", says="pass --checkpoint"),
    c("bench", "--prompt-lookup", "-1", says="--prompt-lookup"),
    c("bench", "--draft-k", "0", says="--draft-k"),
    c("bench", "--checkpoint", "runs/tiny", "--lengths", "8", "--draft", "nowhere",
      says="--draft: checkpoint"),
    c("bench", "--checkpoint", "runs/tiny", "--lengths", "8", "--draft", "other",
      says="other uses other tokens"),
    # eval
    c("eval", "--checkpoint", "nowhere", says="checkpoint not found"),
    c("eval", "--data", "missing.txt", says="--data 'missing.txt' not found"),
    c("eval", "--data", "empty.txt", says="--data 'empty.txt' holds no text"),
    c("eval", "--stride", "0", says="--stride"),
    c("eval", "--batch-size", "0", says="--batch-size"),
    c("eval", "--oracle", "runs/tiny", says="--oracle is for --exposure"),
    c("eval", "--exposure=yes", says="--exposure"),
    c("eval", "--exposure", "--oracle", "other", says="another tokenizer"),
    c("eval", "--exposure", "--context", "0", "--length", "8", says="--context"),
    c("eval", "--exposure", "--context", "8", "--length", "1", says="--length"),
    c("eval", "--exposure", "--context", "24", "--length", "24", says="--context 24 + --length"),
    c("eval", "--exposure", "--context", "8", "--length", "8", "--samples", "0",
      says="--samples"),
    c("eval", "--exposure", "--context", "8", "--length", "8", "--windows", "1",
      says="--windows"),
    c("eval", "--exposure", "--context", "8", "--length", "8", "--data", "short.txt",
      says="too short"),
    c("eval", "--seed", "abc", says="--seed"),
    c("eval", "--task", "nowhere", "--prompts", "p.txt", says="neither a built-in task"),
    c("eval", "--task", "reverse", says="--task needs --prompts"),
    c("eval", "--prompts", "p.txt", says="--prompts is for --task"),
    c("eval", "--task", "reverse", "--prompts", "missing.txt", says="prompts file"),
    c("eval", "--task", "reverse", "--prompts", "bad.jsonl", says="bad.jsonl:2 is not valid JSON"),
    c("eval", "--task", "reverse", "--prompts", "p.txt", "--max-new-tokens", "0",
      says="--max-new-tokens"),
    c("eval", "--task", "reverse", "--prompts", "p.txt", "--temperature", "0",
      says="--temperature"),
    c("eval", "--task", "reverse", "--prompts", "p.txt", "--temperature", "nan",
      says="--temperature must be a finite number"),
    c("eval", "--task", "reverse", "--prompts", "p.txt", "--samples", "0", says="--samples"),
    c("eval", "--json", "no/such/dir/e.json", says="--json"),
    c("eval", "--plot", "no/such/dir/e.png", says="--plot"),
    c("eval", "--device", "quantum", says="unknown device"),
    c("eval", "--dtype", "float8", says="unknown dtype"),
    c("eval", "--quantize", "int2", says="--quantize must be one of none, int8, int4"),
    c("eval", "--tasks", " , ", says="--tasks needs one or more task names"),
    c("eval", "--tasks", "x", "--include-path", "nowhere", says="--include-path nowhere is not"),
    c("eval", "--tasks", "x", "--limit", "0", says="--limit must be at least 1"),
    c("eval", "--tasks", "x", "--num-fewshot", "-1", says="--num-fewshot must be >= 0"),
    c("eval", "--limit", "5", says="are for --tasks"),
    c("eval", "--tasks", "t_missing", "--include-path", "lmtasks",
      says="lm-eval could not run it (FileNotFoundError"),
]

HUGE = str(10**30)
# Extreme but well-typed values that are out of range: refused in one line like any other.
CASES += [
    c("generate", "--temperature", "nan", says="--temperature must be a finite number"),
    c("generate", "--temperature", "inf", says="--temperature must be a finite number"),
    c("generate", "--top-p", "nan", says="--top-p must be a finite number"),
    c("generate", "--min-p", "-inf", says="--min-p must be a finite number"),
    c("generate", "--repetition-penalty", "1e999", says="--repetition-penalty must be a finite"),
    c("generate", "--num-samples", HUGE, says="--num-samples must be in [1, 4096]"),
    c("generate", "--num-beams", HUGE, says="--num-beams must be in [1, 4096]"),
    c("generate", "--max-new-tokens", "1e308", says="--max-new-tokens"),
    c("generate", "--seed", "5e-324", says="--seed"),
    c("serve", "--port", HUGE, says="--port"),
    c("serve", "--max-batch", HUGE, says="--max-batch"),
    c("serve", "--max-tokens", "-0", says="--max-tokens"),
    c("bench", "--batch-size", HUGE, says="--batch-size must be in [1, 4096]"),
    c("bench", "--repeats", HUGE, says="--repeats must be in [1, 1000]"),
    c("eval", "--stride", HUGE, says="--stride"),
    c("eval", "--exposure", "--context", HUGE, "--length", "8", says="--context"),
]
# Extreme values inside the range: they must simply work (exit 0, a finished generation, no
# traceback). Seeded, so each case samples the same tokens every run (a later --seed wins).
_GEN = ("--checkpoint", "runs/tiny", "--max-new-tokens", "4", "--no-stream", "--seed", "0")
VALID = [c("generate", *_GEN, flag, value, says="")
         for flag, values in (("--temperature", ("5e-324", "1e308", "-0.0")),
                              ("--top-p", ("5e-324",)), ("--min-p", ("5e-324", "0.9999999")),
                              ("--repetition-penalty", ("5e-324", "1e308")),
                              ("--seed", (HUGE, "-" + HUGE, "-0")),
                              ("--top-k", (HUGE,)), ("--repeat-last-n", (HUGE,)))
         for value in values] + [
    c("generate", *_GEN, "--prompt-lookup", "2", "--temperature", "1e-300", "--seed", "1",
      says=""),  # speculative acceptance at a temperature that small
    c("generate", *_GEN, "--num-beams", "3", "--repetition-penalty", "5e-324", says=""),
]

# Options that take any value of their type; the reason stands in for a case.
ANY_VALUE = {
    ("generate", "--prompt"): "any text is a prompt",
    ("generate", "--cache"): "a flag",
    ("generate", "--stream"): "a flag",
    ("generate", "--trace"): "a flag",
    ("chat", "--system"): "any text is a system message",
    ("serve", "--prefill-first"): "a flag",
    ("serve", "--prefix-cache"): "a flag",
    ("serve", "--join-mid-step"): "a flag",
}


def _fixtures(root: Path, run: Path) -> None:
    """The files the cases point at, in a case's own directory."""
    (root / "runs").mkdir()
    (root / "runs" / "tiny").symlink_to(run, target_is_directory=True)
    raw = tiny_raw(run.parent / "corpus.txt", Path("runs/new"))
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    (root / "typo.yaml").write_text("modle: {n_layer: 2}\n")
    (root / "broken.yaml").write_text("model: [unclosed\n")
    (root / "nodata.yaml").write_text("out_dir: runs/new\ndata: {source: /no/such/file.txt}\n")
    good = (run / "model.safetensors").read_bytes()
    (root / "cut.safetensors").write_bytes(good[: len(good) // 2])
    (root / "weights.bin").write_bytes(b"\x80\x02pickle")
    (root / "empty").mkdir()
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text('{"model_type": "gpt2"}')
    (root / "empty.txt").write_text("\n\n")
    (root / "bad.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    (root / "short.txt").write_text("too few words\n")
    (root / "p.txt").write_text("reverse abc\n")
    (root / "badschema.json").write_text('{"type": "nonsense"}')
    (root / "lmtasks").mkdir()  # an lm-eval task whose data file is missing
    (root / "lmtasks" / "t.yaml").write_text(
        "task: t_missing\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        "    test: /nowhere/t.jsonl\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n')
    (root / "other").symlink_to(run.parent / "other", target_is_directory=True)


def _other_tokenizer_run(out: Path) -> None:
    """A minimal run whose tokenizer (a small BPE) is not the trained run's (bytes)."""
    from minigpt_cli import tokenizer as tok
    from minigpt_cli.model import store
    from minigpt_cli.model.gpt import GPT, GPTConfig

    enc = tok.train_bpe([make_text(50)], 300)
    tok.save_ranks(enc, out / tok.TOKENIZER_FILE)
    model = GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16))
    store.save_model(out / store.MODEL_FILE, model, {"model_config": vars(model.config),
                                                   "tokenizer": tok.describe(enc, "bpe")})


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root (links not followed) with its size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@dataclass
class Outcome:
    code: int | None
    stdout: str
    stderr: str
    changed: list[str]


# Each case is its own process, forked from a server that imported torch and minigpt once
# (tests/forks.py): most cases are refused in milliseconds, and importing torch afresh for each
# of ~100 of them took most of this file's time.


def _run(case: Case, root: Path, port: int, forks: Forks) -> Outcome:
    before = _tree(root)
    args = [a.replace("{port}", str(port)) for a in case.args]
    env = {**os.environ, "MINIGPT_DATA_DIR": str(root / "data"), "COLUMNS": "200"}
    env.pop("MINIGPT_API_KEY", None)
    code, stdout, stderr = forks.run([case.command, *args], root, env)
    if code is None:
        stderr = f"accepted: still running after 60 s\n{stderr}"
    after = _tree(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return Outcome(code, stdout, stderr, changed)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    """Every case run once, in its own directory, two processes at a time (each spends most
    of its time importing torch); the shared trained run is checked untouched at the end."""
    base = tmp_path_factory.mktemp("bad")
    (base / "corpus.txt").write_text(make_text())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIGPT_DATA_DIR", str(base / "data"))
        train(config_from_dict(tiny_raw(base / "corpus.txt", base / "run", max_steps=5)))
    _other_tokenizer_run(base / "other")
    shared = _tree(base / "run")
    everything = CASES + VALID
    roots = []
    for i, _ in enumerate(everything):
        roots.append(base / f"case{i}")
        roots[-1].mkdir()
        _fixtures(roots[-1], base / "run")
    env = {k: v for k, v in os.environ.items() if k != "MINIGPT_API_KEY"}
    servers = [Forks(base / f"io{k}", env) for k in range(2)]
    try:
        with socket.create_server(("127.0.0.1", 0)) as taken, ThreadPoolExecutor(2) as pool:
            port = taken.getsockname()[1]
            halves = [pool.submit(lambda k: [_run(everything[i], roots[i], port, servers[k])
                                             for i in range(k, len(everything), 2)], k)
                      for k in range(2)]
            done = [h.result() for h in halves]
    finally:
        for server in servers:
            server.close()
    results = [done[i % 2][i // 2] for i in range(len(everything))]
    yield {case.id: r for case, r in zip(everything, results, strict=True)}
    assert _tree(base / "run") == shared, "a case wrote into the trained run"
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_and_exit_2(case: Case, outcomes: dict[str, Outcome]) -> None:
    out = outcomes[case.id]
    assert out.code == 2, (out.code, out.stderr[-2000:])
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    assert case.says in lines[0], lines[0]
    assert out.stdout == ""
    assert out.changed == [], f"written: {out.changed}"


@pytest.mark.parametrize("case", VALID, ids=[case.id for case in VALID])
def test_extreme_values_in_range_just_work(case: Case, outcomes: dict[str, Outcome]) -> None:
    out = outcomes[case.id]
    assert out.code == 0, (out.code, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and "error:" not in out.stderr
    assert "finish: " in out.stderr  # the summary line (an end-of-text first is a finish too)


def test_every_option_has_a_case() -> None:
    import typer.main

    from minigpt_cli.cli import app

    group = typer.main.get_command(app)
    missing = []
    for name, command in group.commands.items():
        covered = {a.split("=")[0] for case in CASES if case.command == name for a in case.args}
        for param in command.params:
            flags = [o for o in param.opts if o.startswith("--")]
            if not flags:  # a positional argument: its cases name what it names
                if not any(case.command == name for case in CASES):
                    missing.append(f"{name} {param.name}")
                continue
            if (name, flags[0]) in ANY_VALUE or param.name == "help":
                continue
            if not covered & {*flags, *param.secondary_opts}:
                missing.append(f"{name} {flags[0]}")
    assert not missing, f"options with no bad-input case: {missing}"
