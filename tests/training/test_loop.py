"""Training: LR schedule, checkpoints, exact resume (also after kill -9), bad inputs."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from minigpt_cli import files
from minigpt_cli.config import TrainConfig, config_from_dict
from minigpt_cli.errors import SaveError, UserError
from minigpt_cli.model import store
from minigpt_cli.model.gpt import GPT, GPTConfig
from minigpt_cli.training import arithmetic, run_state
from minigpt_cli.training import loop as train_module
from minigpt_cli.training.arithmetic import lr_at
from minigpt_cli.training.loop import Interrupted, train
from tests.conftest import tiny_raw


def test_lr_schedule_warmup_then_cosine() -> None:
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(110, t) == pytest.approx(0.1)
    values = [lr_at(s, t) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_train_writes_a_complete_run(tiny_config) -> None:
    summary = train(tiny_config)
    run = Path(tiny_config.out_dir)
    for name in (store.MODEL_FILE, store.BEST_FILE, run_state.STATE_JSON, store.CONFIG_FILE,
                 run_state.METRICS_FILE):
        assert (run / name).is_file(), name
    assert summary.step == 20 and math.isfinite(summary.val_bpb)
    assert len(list(run.glob("train_state-*.safetensors"))) == 1  # old resume files removed
    model, meta = store.load_model(run / store.MODEL_FILE)
    assert meta["step"] == 20 and meta["tokenizer"]["kind"] == "byte"
    records = [json.loads(x) for x in (run / run_state.METRICS_FILE).read_text().splitlines()]
    evals = [r for r in records if "val_bpb" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] or evals[-1]["val_loss"] < 5.0
    assert not any(k.startswith("_orig_mod") for k in store.model_tensors(model))


def test_checkpoint_round_trip(tiny_model, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    store.save_model(path, tiny_model, {"model_config": vars(tiny_model.config),
                                       "tokenizer": {"kind": "byte"}, "step": 3})
    back, meta = store.load_model(path)
    assert meta["step"] == 3
    for (k, a), (_, b) in zip(tiny_model.state_dict().items(), back.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), k
    assert "lm_head.weight" not in store.load_safetensors(path)[0]  # tied: stored once


def test_tied_head_follows_every_weight_change(tiny_model) -> None:
    """The head is the embedding: logits are x @ wte.T, computed here independently, with and
    without grad, before and after in-place changes (including through `.data`, which the
    autograd version counter does not see), and a new inference session sees them too."""
    from minigpt_cli.inference.engine import ModelRunner

    x = torch.randint(0, 257, (1, 8))

    def reference() -> torch.Tensor:
        with torch.no_grad():
            h = tiny_model.ln_f(_hidden(tiny_model, x))
            return h @ tiny_model.wte.weight.t()

    for change in (lambda w: w.mul_(2.0), lambda w: w.data.mul_(-1.5), lambda w: None):
        with torch.no_grad():
            change(tiny_model.wte.weight)
            no_grad, _ = tiny_model(x)
        with_grad, _ = tiny_model(x)
        torch.testing.assert_close(no_grad, reference(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(with_grad.detach(), reference(), rtol=1e-4, atol=1e-4)
        session = ModelRunner(tiny_model, 1, engine="torch").prefill(0, x[0].tolist())
        torch.testing.assert_close(session, reference()[0, -1], rtol=1e-4, atol=1e-4)


def _hidden(model: GPT, x: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(x.size(1))[None]
    h = model.wte(x) + model.wpe(pos)
    for block in model.h:
        h = block(h, None, 0, None)
    return h


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = store.load_safetensors(run / store.MODEL_FILE)
    return tensors


def _sgd_step(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]], clip: float
              ) -> tuple[float, float | None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cpu = torch.device("cpu")
    loss = arithmetic.accumulate_gradients(model, iter(batches), len(batches), scaler, cpu,
                                             torch.float32)
    norm = arithmetic.clip_gradients(model, opt, scaler, clip)
    return loss.item(), None if norm is None else norm.item()


def _grads(model: GPT) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_accumulation_equals_one_batch_k_times_larger() -> None:
    """k micro-batches of b through train's own accumulation == one batch of k*b (fp64, SGD)."""
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16,
                         dropout=0.0)).double()
    x = torch.randint(0, 50, (12, 16))
    y = torch.randint(0, 50, (12, 16))
    one, accumulated = copy.deepcopy(base), copy.deepcopy(base)
    loss_one, _ = _sgd_step(one, [(x, y)], 0)
    loss_acc, _ = _sgd_step(accumulated, [(x[i:i + 4], y[i:i + 4]) for i in (0, 4, 8)], 0)
    assert loss_acc == pytest.approx(loss_one, rel=1e-12)
    for a, b in zip(_grads(one), _grads(accumulated), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    for m in (one, accumulated):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    for a, b in zip(one.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_clipping_bounds_the_global_norm() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16,
                          dropout=0.0)).double()
    batch = [(torch.randint(0, 50, (4, 16)), torch.randint(0, 50, (4, 16)))]
    _sgd_step(model, batch, 0)
    raw = _grads(model)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in raw])).item()
    model.zero_grad()
    _, reported = _sgd_step(model, batch, norm / 4)  # clipping bites: a quarter of the norm
    assert reported == pytest.approx(norm, rel=1e-9)
    clipped = _grads(model)
    after = torch.linalg.vector_norm(torch.stack([g.norm() for g in clipped])).item()
    assert after <= norm / 4 and after == pytest.approx(norm / 4, rel=1e-5)  # torch's eps
    for g, c in zip(raw, clipped, strict=True):  # one factor for all: the direction is kept
        torch.testing.assert_close(c, g * (after / norm), rtol=1e-9, atol=1e-15)
    model.zero_grad()
    _sgd_step(model, batch, norm * 2)  # under the bound: untouched
    for g, c in zip(raw, _grads(model), strict=True):
        assert torch.equal(g, c)


LLAMA = {"norm": "rmsnorm", "position": "rotary", "mlp": "swiglu", "bias": False}


@pytest.mark.parametrize("accum_clip", [
    {}, {"grad_accum_steps": 3, "grad_clip": 0.05},
    {"grad_accum_steps": 2, "scheduled_sampling": {"max_prob": 0.5, "ramp_steps": 8}},
    {"optimizer": "muon"}],
    ids=["plain", "accumulation-and-clipping", "scheduled-sampling", "llama-muon"])
def test_ctrl_c_then_resume_equals_uninterrupted(tmp_path: Path, corpus_file: Path,
                                                 data_dir: Path, monkeypatch,
                                                 accum_clip: dict) -> None:
    def raw(out: Path) -> dict:  # Muon runs on the Llama architecture, the recipe's pair
        r = tiny_raw(corpus_file, out, **accum_clip)
        if accum_clip.get("optimizer") == "muon":
            r["model"].update(LLAMA)
        return r

    straight = config_from_dict(raw(tmp_path / "a"))
    train(straight)
    if "grad_clip" in accum_clip:  # the clip was active: every logged norm is above it
        norms = [json.loads(x).get("grad_norm") for x in
                 (tmp_path / "a" / run_state.METRICS_FILE).read_text().splitlines()]
        norms = [n for n in norms if n is not None]
        assert norms and min(norms) > 0.05
    if "scheduled_sampling" in accum_clip:  # it ran: the logged share ramps up to 0.5
        shares = [json.loads(x).get("scheduled_sampling_prob", 0) for x in
                  (tmp_path / "a" / run_state.METRICS_FILE).read_text().splitlines()]
        assert max(shares) == 0.5
    # The same 20-step run gets a real SIGINT while fetching step 10's batch: it finishes that
    # step, saves (save_interval is 5, so step 11 is an off-interval save), and stops.
    real_batch = train_module.D.train_batch

    def batch_then_interrupt(tokens, b, t, seed, step, micro=0):
        if step == 10 and micro == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(tokens, b, t, seed, step, micro)

    monkeypatch.setattr(train_module.D, "train_batch", batch_then_interrupt)
    with pytest.raises(Interrupted, match="step 11"):
        train(config_from_dict(raw(tmp_path / "b")))
    monkeypatch.setattr(train_module.D, "train_batch", real_batch)
    assert run_state.read_state_json(tmp_path / "b")["step"] == 11
    train(config_from_dict(raw(tmp_path / "b")), resume=True)
    a, b = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _cli(*args: str, cwd: Path, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minigpt_cli", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, **kw)


def _write_cfg(tmp_path: Path, raw: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        state = run_state.read_state_json(run) if (run / run_state.STATE_JSON).exists() else None
        if state and state["step"] >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"run never reached step {step} (exit {proc.poll()})")


def _spawn_train(cfg_path: Path, cwd: Path, data_dir: Path, **popen: object
                 ) -> tuple[subprocess.Popen, dict[str, str]]:
    """`minigpt train CFG` in a child process we can signal; also returns its environment."""
    env = {**os.environ, "MINIGPT_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "minigpt_cli", "train", str(cfg_path)],
                            cwd=cwd, env=env, **popen)
    return proc, env


def test_kill_9_mid_training_then_resume_matches(tmp_path: Path, corpus_file: Path,
                                                 data_dir: Path) -> None:
    raw = tiny_raw(corpus_file, tmp_path / "killed", max_steps=60, save_interval=3)
    cfg_path = _write_cfg(tmp_path, raw)
    proc, env = _spawn_train(cfg_path, tmp_path, data_dir, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        _wait_for_step(tmp_path / "killed", 6, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = run_state.read_state_json(tmp_path / "killed")
    assert state is not None and 6 <= state["step"] < 60, "kill did not land mid-run"
    done = _cli("train", str(cfg_path), "--resume", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    straight = config_from_dict({**raw, "out_dir": str(tmp_path / "straight")})
    train(straight)
    a, b = _final_weights(tmp_path / "killed"), _final_weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_and_exits_cleanly(tmp_path: Path, corpus_file: Path,
                                        data_dir: Path) -> None:
    raw = tiny_raw(corpus_file, tmp_path / "run", max_steps=100000, save_interval=1000)
    cfg_path = _write_cfg(tmp_path, raw)
    proc, _ = _spawn_train(cfg_path, tmp_path, data_dir, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / run_state.METRICS_FILE
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    state = run_state.read_state_json(tmp_path / "run")
    assert state is not None and state["step"] >= 5  # saved although save_interval is 1000


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_config, monkeypatch) -> None:
    train(tiny_config)
    run = Path(tiny_config.out_dir)
    before = (run / store.MODEL_FILE).read_bytes()
    from minigpt_cli.model.gpt import GPT

    real_forward = GPT.forward

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        return logits, (loss * float("nan") if loss is not None else None)

    monkeypatch.setattr(GPT, "forward", poisoned)
    again = config_from_dict(tiny_raw(Path(tiny_config.data.source), run, max_steps=40))
    with pytest.raises(UserError, match="loss became nan"):
        train(again, resume=True)
    assert (run / store.MODEL_FILE).read_bytes() == before
    assert run_state.read_state_json(run)["step"] == 20


def test_existing_run_is_not_overwritten(tiny_config) -> None:
    train(tiny_config)
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny_config)


def test_resume_with_another_model_shape_is_refused(tiny_config, corpus_file: Path) -> None:
    train(tiny_config)
    raw = tiny_raw(corpus_file, Path(tiny_config.out_dir))
    raw["model"]["n_layer"] = 3
    with pytest.raises(UserError, match=r"model\.n_layer=2"):
        train(config_from_dict(raw), resume=True)


def test_resume_keeps_its_precision_and_warns_when_told_another(
        tmp_path: Path, corpus_file: Path, data_dir: Path) -> None:
    """A run started in float32 resumes in float32 under `dtype: auto`; naming bf16 on resume
    is allowed, says so in a warning, and is recorded for the next resume."""
    import io

    from rich.console import Console

    run = tmp_path / "run"
    train(config_from_dict(tiny_raw(corpus_file, run, max_steps=5)))
    for dtype, steps, warned in (("auto", 10, False), ("bfloat16", 15, True)):
        out = io.StringIO()
        raw = {**tiny_raw(corpus_file, run, max_steps=steps), "dtype": dtype}
        train(config_from_dict(raw), resume=True, console=Console(file=out, width=300))
        text = out.getvalue()
        assert ("warning: this run trained in float32 until now" in text) == warned, text
        assert run_state.read_state_json(run)["dtype"] == ("bfloat16" if warned else "float32")


def test_resume_without_a_run(tiny_config) -> None:
    with pytest.raises(UserError, match="nothing to resume"):
        train(tiny_config, resume=True)


def test_truncated_checkpoint_on_resume(tiny_config) -> None:
    train(tiny_config)
    state = run_state.read_state_json(Path(tiny_config.out_dir))
    weights = Path(tiny_config.out_dir) / state["weights_file"]
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupt or truncated"):
        train(tiny_config, resume=True)


def test_block_size_larger_than_data(tmp_path: Path, data_dir: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("just a few words here\n" * 3)
    raw = tiny_raw(small, tmp_path / "run")
    with pytest.raises(UserError, match="block_size"):
        train(config_from_dict(raw))


def test_unwritable_out_dir(tmp_path: Path, corpus_file: Path, data_dir: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = config_from_dict(tiny_raw(corpus_file, blocker / "run"))
    with pytest.raises(UserError, match="not writable"):
        train(cfg)


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    """An error with half the new bytes in the temp file (a full disk, say): the old file
    stays whole and the temp file goes. (A kill at that point: tests/training/test_crash.py.)"""
    target = tmp_path / "x.bin"
    files.atomic_write_bytes(target, b"good")
    seen = []

    def disk_full(point: str) -> None:
        if point.endswith(":partial"):
            seen.extend(p.read_bytes() for p in tmp_path.glob(".x.bin.*.tmp"))
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "crash_point", disk_full)
    with pytest.raises(SaveError, match=f"could not write {target}: No space"):
        files.atomic_write_bytes(target, b"new contents!")
    assert seen == [b"new co"]  # it failed mid-write, with the temp file half written
    assert target.read_bytes() == b"good"
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_of_a_finished_run_reports_it(tiny_config) -> None:
    first = train(tiny_config)
    again = train(tiny_config, resume=True)
    assert again.step == first.step == 20
    assert again.val_loss == pytest.approx(first.val_loss)  # from metrics, not NaN


def test_resume_survives_a_metrics_line_cut_by_a_crash(tiny_config, corpus_file: Path) -> None:
    train(config_from_dict(tiny_raw(corpus_file, Path(tiny_config.out_dir), max_steps=10)))
    metrics = Path(tiny_config.out_dir) / run_state.METRICS_FILE
    metrics.write_text(metrics.read_text() + '{"step": 11, "loss": 4.')  # kill -9 mid-append
    done = train(config_from_dict(tiny_raw(corpus_file, Path(tiny_config.out_dir),
                                           max_steps=20)), resume=True)
    assert done.step == 20
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20]


class _Uniform(torch.nn.Module):
    """Equal logits for every token of the byte tokenizer (256 bytes + end-of-text)."""

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        return torch.zeros(*x.shape, 257), None


def test_uniform_logits_give_log2_257_bits_per_byte() -> None:
    from minigpt_cli import tokenizer as tok

    token_bytes = torch.tensor(tok.token_byte_lengths(tok.byte_encoding()), dtype=torch.float32)
    assert token_bytes[:256].eq(1).all() and token_bytes[256] == 0
    y = torch.randint(0, 256, (4, 16))
    y[0, :3] = 256  # end-of-text targets stand for no bytes: left out of bits per byte
    batches = [(torch.zeros_like(y), y)]
    result = arithmetic.evaluate(_Uniform(), batches, token_bytes, torch.device("cpu"),
                                   torch.float32)
    assert result.bpb == pytest.approx(math.log2(257), rel=1e-6)
    assert result.loss == pytest.approx(math.log(257), rel=1e-6)  # every target counts here


def _strict(text: str) -> object:
    """Parse as JSON parsers other than Python's do: NaN and Infinity are not JSON."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


class _Stop(Exception):
    pass


def test_run_directory_json_is_strict_before_the_first_evaluation(
        tmp_path: Path, corpus_file: Path, data_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A save before any evaluation has no val loss and no best yet: null, not NaN/Infinity;
    and a resume reads the nulls back as 'none yet'."""
    run = tmp_path / "run"
    commit = run_state.commit_train_state

    def commit_then_stop(*args: object, **kw: object) -> None:
        commit(*args, **kw)  # type: ignore[arg-type]
        raise _Stop  # the run ends at its first save (step 5), before any evaluation

    monkeypatch.setattr(run_state, "commit_train_state", commit_then_stop)
    with pytest.raises(_Stop):
        train(config_from_dict(tiny_raw(corpus_file, run, max_steps=10, eval_interval=10)))
    monkeypatch.setattr(run_state, "commit_train_state", commit)
    state = _strict((run / run_state.STATE_JSON).read_text())
    assert state["best_val_loss"] is None and state["val_loss"] is None  # type: ignore[index]
    for line in (run / run_state.METRICS_FILE).read_text().splitlines():
        _strict(line)
    from safetensors import safe_open
    with safe_open(str(run / state["weights_file"]), framework="pt") as f:  # type: ignore[index]
        for value in (f.metadata() or {}).values():
            _strict(value)
    summary = train(config_from_dict(tiny_raw(corpus_file, run, max_steps=10, eval_interval=10)),
                    resume=True)
    assert math.isfinite(summary.best_val_loss) and summary.best_val_loss == summary.val_loss


def test_progress_shows_no_val_loss_before_the_first_evaluation() -> None:
    assert train_module._val_field(math.nan) == ""
    assert train_module._val_field(1.23456) == "val 1.2346"
