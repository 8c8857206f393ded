"""GPT-2 parity with Hugging Face transformers: import, export, round trip, bad folders."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from minigpt_cli import tokenizer as tok
from minigpt_cli.bench.measure import timed_greedy
from minigpt_cli.convert.hf import export_hf, import_hf
from minigpt_cli.errors import UserError
from minigpt_cli.inference.generate import Decoder
from minigpt_cli.model import store
from minigpt_cli.model.gpt import GPT, GPTConfig

# Only what reads the gpt2 tokenizer's files needs them; exports of byte- and BPE-tokenized
# runs, and refusals of bad folders, run everywhere.
needs_gpt2_files = pytest.mark.skipif(
    not Path(os.environ.get("TIKTOKEN_CACHE_DIR", "/nonexistent")).is_dir(),
    reason="imported runs use tiktoken's gpt2 files (TIKTOKEN_CACHE_DIR)")

VOCAB = 50257  # the gpt2 tokenizer's size: imported runs use it


def _hf_model(n_embd: int = 32, random_biases: bool = False, eps: float = 1e-5
              ) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=n_embd, n_layer=2, n_head=2,
                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=eps)
    model = GPT2LMHeadModel(cfg).eval()
    if random_biases:  # HF initialises biases and LayerNorm to 0/1: make every tensor count
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or ".ln_" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    return model


# A LayerNorm epsilon of 1e-3 against activations of variance ~4e-4 (GPT-2's 0.02 init)
# changes every logit: a model that ignored the folder's epsilon would fail all three tests.
@pytest.fixture(params=[(False, 1e-5), (True, 1e-5), (True, 1e-3)],
                ids=["hf-init", "random-biases", "eps-1e-3"])
def imported(request, tmp_path: Path) -> tuple[GPT2LMHeadModel, GPT]:
    hf = _hf_model(random_biases=request.param[0], eps=request.param[1])
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    ours, meta = store.load_model(tmp_path / "run" / store.MODEL_FILE)
    assert meta["tokenizer"]["kind"] == "gpt2" and not ours.training
    return hf, ours


@needs_gpt2_files
def test_imported_logits_match(imported) -> None:
    hf, ours = imported
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got, _ = ours(ids)
    assert (ref - got).abs().max().item() < 1e-4


@needs_gpt2_files
def test_imported_cached_steps_match(imported) -> None:
    hf, ours = imported
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    decoder = Decoder(ours, [ids[0, :10].tolist()], use_cache=True)
    worst = (decoder.logits()[0] - ref[9]).abs().max().item()
    for t in range(10, 30):
        decoder.append([int(ids[0, t])])
        worst = max(worst, (decoder.logits()[0] - ref[t]).abs().max().item())
        assert decoder.last_positions == 1
    assert worst < 1e-4


@needs_gpt2_files
def test_imported_greedy_50_tokens_match_hf_generate(imported) -> None:
    hf, ours = imported
    prompt = torch.tensor([[15496, 995, 11]])
    ref = hf.generate(prompt, max_new_tokens=50, min_new_tokens=50, do_sample=False,
                      pad_token_id=0)[0, 3:].tolist()
    tokens, _, _ = timed_greedy(ours, prompt, 50, True, torch.device("cpu"))
    assert tokens[0] == ref


def _minigpt_run(tmp_path: Path, vocab: int = 300) -> Path:
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=48, n_layer=2, n_head=4, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    run = tmp_path / "ours"
    enc = tok.build("gpt2") if vocab == VOCAB else tok.byte_encoding()
    kind = "gpt2" if vocab == VOCAB else "byte"
    store.save_model(run / store.MODEL_FILE, model, {"model_config": vars(model.config),
                                                   "tokenizer": tok.describe(enc, kind),
                                                   "step": 5})
    return run


def test_export_loads_in_hf_without_warnings_and_matches(tmp_path: Path) -> None:
    run = _minigpt_run(tmp_path)
    export_hf(run, tmp_path / "hf")
    hf, info = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    ours, _ = store.load_model(run / store.MODEL_FILE)
    ids = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        assert (hf.eval()(ids).logits - ours(ids)[0]).abs().max().item() < 1e-4


@needs_gpt2_files
def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    run = _minigpt_run(tmp_path, vocab=VOCAB)
    export_hf(run, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    a, _ = store.load_safetensors(run / store.MODEL_FILE)
    b, _ = store.load_safetensors(tmp_path / "back" / store.MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_refuses_a_model_without_biases(tmp_path: Path) -> None:
    model = GPT(GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=16,
                          bias=False))
    run = tmp_path / "nobias"
    store.save_model(run / store.MODEL_FILE, model, {"model_config": vars(model.config),
                                                   "tokenizer": {"kind": "byte"}})
    with pytest.raises(UserError, match="bias"):
        export_hf(run, tmp_path / "hf")


def _saved(tmp_path: Path) -> Path:
    d = tmp_path / "hf"
    _hf_model().save_pretrained(d)
    return d


@pytest.mark.parametrize(("breakage", "fragment"), [
    (lambda d: (d / "config.json").unlink(), "no config.json"),
    (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    (lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(b"x")),
     "pickle"),
    (lambda d: _edit_config(d, model_type="mistral"), "holds a .mistral. model"),
    (lambda d: _edit_config(d, activation_function="relu"), "activation_function"),
    (lambda d: _edit_config(d, layer_norm_epsilon=0), "layer_norm_epsilon 0"),
    (lambda d: _edit_config(d, n_embd=64), "shape"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:500]),
     "corrupt or truncated"),
])
def test_bad_hf_folders(tmp_path: Path, breakage, fragment: str) -> None:
    d = _saved(tmp_path)
    breakage(d)
    with pytest.raises(UserError, match=fragment):
        import_hf(d, tmp_path / "run")


def _edit_config(d: Path, **changes: object) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_exported_greedy_generation_matches_hf(tmp_path: Path) -> None:
    run = _minigpt_run(tmp_path)
    export_hf(run, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours, _ = store.load_model(run / store.MODEL_FILE)
    prompt = torch.tensor([[5, 17, 42]])
    ref = hf.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False,
                      pad_token_id=0)[0, 3:].tolist()
    tokens, _, _ = timed_greedy(ours, prompt, 40, True, torch.device("cpu"))
    assert tokens[0] == ref


@needs_gpt2_files
def test_imported_run_generates_benches_and_fine_tunes(tmp_path: Path, corpus_file: Path,
                                                       data_dir: Path) -> None:
    """An imported folder is a normal run: generate, bench and train --resume accept it."""
    from rich.console import Console

    from minigpt_cli.bench.run import run_bench
    from minigpt_cli.config import config_from_dict
    from minigpt_cli.inference.generate import generate
    from minigpt_cli.inference.loading import load_for_inference
    from minigpt_cli.inference.sampling import SamplerSettings
    from minigpt_cli.training.loop import train

    _hf_model().save_pretrained(tmp_path / "hf")
    run = tmp_path / "imported"
    import_hf(tmp_path / "hf", run)
    model, enc, _, _ = load_for_inference(str(run), "cpu", "float32")
    out, _ = generate(model, enc, [tok.encode(enc, "Hello")], SamplerSettings(temperature=0), 5)
    assert out[0].finish_reason in ("length", "eos")
    code = run_bench(checkpoint=str(run), config=None, lengths=[8], prompt_len=4, batch_size=1,
                     repeats=1, device="cpu", dtype="float32", json_path=None, plot_path=None,
                     train=False, console=Console(file=io.StringIO()))
    assert code == 0
    cfg = config_from_dict({
        "out_dir": str(run), "device": "cpu", "tokenizer": {"kind": "gpt2"},
        "data": {"source": str(corpus_file)},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "dropout": 0.0},
        "train": {"batch_size": 4, "max_steps": 6, "eval_interval": 3, "eval_steps": 1,
                  "save_interval": 3, "warmup_steps": 2, "lr": 1e-3, "min_lr": 1e-4}})
    before, _ = store.load_safetensors(run / store.MODEL_FILE)
    summary = train(cfg, resume=True)
    after, meta = store.load_safetensors(run / store.MODEL_FILE)
    assert summary.step == 6 and meta["step"] == 6
    assert not torch.equal(before["wte.weight"], after["wte.weight"])  # it really trained


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_exported_tokenizer_loads_in_auto_tokenizer(tmp_path: Path, kind: str) -> None:
    """An exported folder is a complete Hugging Face model: AutoTokenizer reads its tokenizer
    and encodes and decodes exactly as minigpt does."""
    from transformers import AutoTokenizer

    from minigpt_cli.convert.hf import write_hf_tokenizer
    from tests.conftest import make_text

    enc = (tok.byte_encoding() if kind == "byte" else
           tok.train_bpe([make_text()], 320))
    assert write_hf_tokenizer(enc, tmp_path, enc.eot_token)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in ("ROMEO:\nGood night, sweet prince.", "naïve café — ünïcödé ✓", "  two  spaces",
                 "end<|endoftext|>next"):
        ids = tok.encode(enc, text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf.decode(ids) == text
    assert hf.eos_token_id == enc.eot_token


@needs_gpt2_files
def test_eval_scores_an_imported_run(tmp_path: Path) -> None:
    """`minigpt eval` on an imported GPT-2 (gpt2 tokenizer): one window, no overlap, equals the
    loss Hugging Face computes for the same tokens."""
    from rich.console import Console

    from minigpt_cli.evaluation.eval_cli import run_eval

    hf = _hf_model()
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    text = "ROMEO:\nGood night, good night! Parting is such sweet sorrow."
    (tmp_path / "t.txt").write_text(text)
    r = run_eval(checkpoint=str(tmp_path / "run"), data=str(tmp_path / "t.txt"), stride=64,
                 batch_size=4, json_path=None, plot_path=None, device="cpu", dtype="float32",
                 console=Console(file=io.StringIO()))
    ids = torch.tensor([[tok.build("gpt2").eot_token, *tok.encode(tok.build("gpt2"), text)]])
    assert r["tokens"] == ids.size(1) - 1 and r["tokenizer"] == "gpt2"
    with torch.no_grad():
        ref = hf(ids, labels=ids).loss.item()
    assert r["loss"] == pytest.approx(ref, rel=1e-4)
    assert r["bits_per_byte"] > 0 and r["bytes"] == len(text.encode())
