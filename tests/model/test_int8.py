"""int8 weights (quantize.py) against an independent NumPy reference, and what they cost in
accuracy on a trained model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minigpt_cli.model.int8 import GROUP, dequantize, quantize, quantize4, quantize_model
from minigpt_cli.model.q8 import q8_product
from tests.conftest import score


def _reference_product(x: np.ndarray, w: np.ndarray, group: int) -> np.ndarray:
    """x @ W with W rounded as llama.cpp's Q8_0 reference does, written loop by loop: the
    integers rounded by the float32 scale max |w| / 127, the scale then kept as float16."""
    n_in, n_out = w.shape
    deq = np.zeros_like(w, dtype=np.float64)
    for start in range(0, n_in, group):
        block = w[start:start + group].astype(np.float64)
        for j in range(n_out):
            amax = np.abs(block[:, j]).max()
            scale = np.float32(np.float32(amax) / np.float32(127.0))
            if scale == 0:
                continue
            q = np.clip(np.round(block[:, j] * (np.float32(1.0) / scale)), -127, 127)
            deq[start:start + group, j] = q * np.float64(np.float16(scale))
    return x.astype(np.float64) @ deq


@pytest.mark.parametrize("n_in", [32, 64, 70])  # 70: a last group of 6 rows
def test_int8_product_matches_a_numpy_reference(n_in: int) -> None:
    g = torch.Generator().manual_seed(n_in)
    w = torch.randn(n_in, 48, generator=g) * torch.rand(1, 48, generator=g) * 3
    x = torch.randn(5, n_in, generator=g)
    q, scales = quantize(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scales.shape == (-(-n_in // GROUP), 48)
    assert int(q.abs().max()) == 127  # every group's largest weight maps to +-127
    got = (x @ dequantize(q, scales)).double().numpy()
    want = _reference_product(x.numpy(), w.numpy(), GROUP)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # and the rounding is a rounding: no weight moves more than half a step, plus what the
    # float16 scale moves its integer (at most 127 x 2^-11 of the step)
    step = scales.repeat_interleave(GROUP, 0)[:n_in]
    assert ((dequantize(q, scales) - w).abs() <= step * (0.5 + 127 * 2.0**-11) + 1e-7).all()
    assert torch.equal(scales, scales.half().float())


def test_a_weight_past_float16_scales_is_refused_in_one_line() -> None:
    from minigpt_cli.errors import UserError

    w = torch.zeros(32, 4)
    w[0, 0] = 1e7  # scales 1e7 / 127 and 1e7 / 8: past float16's 65504
    for rounding, most in ((quantize, "8.32e\\+06"), (quantize4, "5.24e\\+05")):
        with pytest.raises(UserError, match=f"past what this rounding keeps .*up to {most}"):
            rounding(w)
    quantize(w / 2)  # 5e6: within int8's range


def test_all_zero_groups_stay_zero() -> None:
    w = torch.zeros(64, 8)
    w[32:, 3] = torch.linspace(-1, 1, 32)
    q, scales = quantize(w)
    assert torch.isfinite(scales).all() and (scales[0] == 0).all()
    back = dequantize(q, scales)
    assert (back[:32] == 0).all() and (back[:, :3] == 0).all()
    assert torch.allclose(back[32:, 3], w[32:, 3], atol=1 / 127)


def test_quantize_model_rounds_every_product_and_the_tied_head(tiny_model) -> None:
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    report = quantize_model(tiny_model)
    after = tiny_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # 4 matrices per block and the embedding; biases and LayerNorms untouched
    assert report.matrices == 4 * len(tiny_model.h) + 1
    assert changed == {k for k in before if k.endswith("weight") and after[k].dim() == 2
                       and not k.startswith("wpe")}
    w = after["h.0.mlp.c_fc.weight"]
    q, scales = quantize(before["h.0.mlp.c_fc.weight"])
    assert torch.equal(w, dequantize(q, scales))
    assert report.int8_bytes < report.float_bytes / 3


@pytest.mark.parametrize(("kind", "bar"), [("int8", 0.01), ("int4", 0.03)])
def test_bits_per_byte_within_the_bar_of_float32(run, kind: str, bar: float) -> None:
    """The accuracy bars, on a trained tiny model (the eval command's --quantize): int8
    within 1% of float32's bits per byte, int4 within 3%."""
    full = score(run, stride=32)
    rounded = score(run, stride=32, quantize=kind)
    assert rounded["quantize"].startswith(f"{kind} weights") and full["quantize"] == "none"
    assert rounded["bits_per_byte"] != full["bits_per_byte"]  # the rounding did happen
    assert abs(rounded["bits_per_byte"] / full["bits_per_byte"] - 1) < bar


def _native():
    from minigpt_cli.inference import native

    lib = native.load_library()
    if isinstance(lib, str):
        pytest.skip(f"no C step here: {lib}")
    return native, lib


def _reference_q8(x: np.ndarray, q: np.ndarray, scales: np.ndarray, bias: np.ndarray
                  ) -> np.ndarray:
    """The int8 x int8 product from its definition, loop by loop in float64: each row's group
    of 32 rounded to int8 (scale max |x| / 127, float32 as the kernel has it), the integer dot
    product with the weights' group, times both scales."""
    rows, n_in = x.shape
    out = np.tile(bias.astype(np.float64), (rows, 1))
    for r in range(rows):
        for g, start in enumerate(range(0, n_in, GROUP)):
            xs = x[r, start:start + GROUP].astype(np.float32)
            d = np.float32(np.abs(xs).max()) / np.float32(127.0)
            xi = np.rint(xs * (np.float32(1.0) / d)) if d > 0 else np.zeros_like(xs)
            dots = xi.astype(np.int64) @ q[start:start + GROUP].astype(np.int64)
            out[r] += dots * np.float64(d) * scales[g].astype(np.float64)
    return out


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("rows", "n_in", "n_out"), [
    (1, 64, 96), (1, 70, 40), (3, 96, 37), (13, 32, 64), (64, 50, 33)])
def test_int8_kernel_matches_a_numpy_reference(rows: int, n_in: int, n_out: int,
                                               bits: int) -> None:
    """The C kernel (input rows rounded to int8, integer dot products; int8 weights, or Q4_0's
    int4 ones two to a byte) against the product written from its definition in NumPy and
    against PyTorch's q8_product, 1e-5 relative: partial last groups (70, 50), columns past
    the last whole strip (37, 33, 40), every register block (13 and 64 rows), a group of zero
    weights and a row of zeros; and each row alone gives the bits it gives in the batch."""
    native, lib = _native()
    g = torch.Generator().manual_seed(rows * n_in)
    w = torch.randn(n_in, n_out, generator=g)
    w[: min(32, n_in), :5] = 0  # an all-zero group in the first columns
    x, bias = torch.randn(rows, n_in, generator=g), torch.randn(n_out, generator=g)
    x[-1, :GROUP] = 0  # a group of inputs that is all zeros
    q, scales = (quantize4 if bits == 4 else quantize)(w)
    pack = native.pack_q4 if bits == 4 else native.pack_q8
    packed_q, packed_s = pack(q, scales, lib.minigpt_strip())

    def product(xs: torch.Tensor) -> torch.Tensor:
        y = torch.full((len(xs), n_out), float("nan"))
        assert lib.minigpt_product(len(xs), n_in, n_out, xs.data_ptr(), None,
                                   packed_q.data_ptr(), bits, packed_s.data_ptr(), None,
                                   bias.data_ptr(), y.data_ptr(), 2) == 0
        return y

    y = product(x)
    want = _reference_q8(x.numpy(), q.numpy(), scales.numpy(), bias.numpy())
    np.testing.assert_allclose(y.double().numpy(), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
    torch.testing.assert_close(q8_product(x, q, scales, bias), y, rtol=1e-5,
                               atol=1e-5 * float(y.abs().max()))
    for r in (0, rows - 1):
        assert torch.equal(product(x[r:r + 1].clone())[0], y[r])


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_int8_native_step_equals_torch_on_the_rounded_model(kind: str) -> None:
    """A whole model through the C step reading int8 (or int4) agrees with PyTorch on the same
    rounded weights, and a row decodes the same alone as in a batch."""
    _native()
    from minigpt_cli.inference.engine import ModelRunner
    from minigpt_cli.model.gpt import GPT, GPTConfig

    torch.manual_seed(5)
    model = GPT(GPTConfig(vocab_size=263, block_size=64, n_layer=2, n_head=4, n_embd=64)).eval()
    quantize_model(model, kind=kind)
    runners = {e: ModelRunner(model, 7, engine=e) for e in ("native", "torch")}
    alone = ModelRunner(model, 7, engine="native")
    for r in runners.values():
        for s in range(7):
            r.prefill(s, list(range(1 + s, 5 + 2 * s)))
    alone.prefill(3, list(range(4, 11)))
    tokens = [(11 * s) % 263 for s in range(7)]
    got = runners["native"].decode(list(range(7)), tokens).clone()
    ref = runners["torch"].decode(list(range(7)), tokens)
    assert runners["native"]._native.int8  # the step read the int8 strips
    assert (got - ref).abs().max().item() < 1e-4
    assert torch.equal(alone.decode([3], [tokens[3]])[0], got[3])


@pytest.mark.parametrize(("kind", "bar"), [("int8", 0.98), ("int4", 0.90)])
def test_next_token_agrees_with_float32(run, kind: str, bar: float) -> None:
    """The bars: the rounded model's most likely next token is float32's at >= 98% (int8) or
    90% (int4) of the positions of the run's validation text."""
    import copy

    from minigpt_cli.evaluation.eval_cli import eval_tokens
    from minigpt_cli.inference.loading import load_for_inference

    model, enc, meta, _ = load_for_inference(str(run), "cpu", "float32")
    rounded = copy.deepcopy(model)
    quantize_model(rounded, kind=kind)
    tokens, _ = eval_tokens(meta, enc, None)
    T = model.config.block_size
    windows = torch.tensor(tokens[: len(tokens) // T * T]).view(-1, T)[:32]
    with torch.no_grad():
        a = model(windows)[0].argmax(-1)
        b = rounded(windows)[0].argmax(-1)
    agreement = (a == b).float().mean().item()
    assert windows.numel() >= 500 and agreement >= bar, agreement


def test_quantize_command_saves_int8_that_loads_as_the_rounded_model(run, tmp_path) -> None:
    """`minigpt quantize RUN OUT`: safetensors with int8 matrices and float16 scales, well under
    half the float32 file (a third for tiny.yaml's run; here the header and the small float
    tensors weigh more), which loads as exactly the model --quantize int8 makes (and
    hands the C step its int8 values); a second quantize and a non-empty OUT are refused."""
    import copy

    from minigpt_cli.convert.quantize import quantize_run
    from minigpt_cli.errors import UserError
    from minigpt_cli.model import store
    from minigpt_cli.model.int8 import int8_pairs

    path = quantize_run(str(run), tmp_path / "q8")
    assert path.stat().st_size < 0.4 * (run / store.MODEL_FILE).stat().st_size
    raw, meta = store.load_safetensors(path)
    assert raw["h.0.mlp.c_fc.weight.int8"].dtype == torch.int8
    assert raw["h.0.mlp.c_fc.weight.scale"].dtype == torch.float16  # as Q8_0 keeps it
    assert meta["quantize"] == {"kind": "int8", "group": GROUP}
    # scales held as float32 in a file (off by less than half a float16 step) read back as
    # the float16 values, so every product reads the same numbers
    from minigpt_cli.model.int8 import unpack
    widened = {k: v.float() * (1 + 1e-5) if k.endswith(".scale") else v for k, v in raw.items()}
    assert all(torch.equal(unpack(widened, GROUP)[1][k][1], pair[1])
               for k, pair in unpack(raw, GROUP)[1].items())
    loaded, _ = store.load_model(path)
    original, _ = store.load_model(run / store.MODEL_FILE)
    rounded = copy.deepcopy(original)
    quantize_model(rounded)
    want, got = rounded.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    a, b = int8_pairs(rounded), int8_pairs(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and
                                        torch.equal(a[k][1], b[k][1]) for k in a)
    with pytest.raises(UserError, match=r"already holds rounded \(int8\)"):
        quantize_run(str(path), tmp_path / "again")
    with pytest.raises(UserError, match="is not empty: name a new or empty folder"):
        quantize_run(str(run), tmp_path / "q8")


def test_quantize_int4_saves_two_weights_a_byte_and_loads_as_the_rounded_model(run, tmp_path
                                                                               ) -> None:
    """`minigpt quantize --type int4`: the block matrices as NAME.int4 (half a byte a weight),
    the head as int8, loading as exactly the model --quantize int4 makes, with the C step
    told which matrices are int4."""
    import copy

    from minigpt_cli.convert.quantize import quantize_run
    from minigpt_cli.model import store
    from minigpt_cli.model.int8 import int8_pairs

    path = quantize_run(str(run), tmp_path / "q4", "int4")
    raw, meta = store.load_safetensors(path)
    packed = raw["h.0.mlp.c_fc.weight.int4"]
    assert packed.dtype == torch.uint8 and "wte.weight.int8" in raw
    assert packed.numel() * 2 == raw["h.0.mlp.c_fc.weight.scale"].shape[1] * 32
    assert meta["quantize"] == {"kind": "int4", "group": GROUP}
    loaded, _ = store.load_model(path)
    original, _ = store.load_model(run / store.MODEL_FILE)
    rounded = copy.deepcopy(original)
    quantize_model(rounded, kind="int4")
    want, got = rounded.state_dict(), loaded.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    a, b = int8_pairs(rounded), int8_pairs(loaded)
    assert all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)
    assert loaded.h[0].mlp.c_fc.int4 and rounded.h[0].mlp.c_fc.int4


@pytest.mark.needs_c_step
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_prompt_lookup_on_a_rounded_model_changes_nothing(kind: str) -> None:
    """Drafts are verified as extra rows of the same step, and a rounded product's row does
    not depend on the other rows: greedy output with prompt lookup is plain greedy output."""
    from minigpt_cli import tokenizer as tok
    from minigpt_cli.inference.generate import generate
    from minigpt_cli.inference.sampling import SamplerSettings
    from minigpt_cli.model.gpt import GPT, GPTConfig

    torch.manual_seed(11)
    model = GPT(GPTConfig(vocab_size=257, block_size=96, n_layer=2, n_head=2, n_embd=64)).eval()
    with torch.no_grad():  # peaked logits, so greedy text repeats itself (lookup has work)
        for p in model.parameters():
            p.normal_(0.0, 0.4 if p.dim() > 1 else 0.5)
    quantize_model(model, kind=kind)
    enc = tok.byte_encoding()
    prompts = [tok.encode(enc, "the cat sat on the mat. the cat sat on the mat. the cat")]
    greedy = SamplerSettings(temperature=0.0)
    plain, _ = generate(model, enc, prompts, greedy, 48, engine="native")
    spec, timings = generate(model, enc, prompts, greedy, 48, engine="native", prompt_lookup=2,
                             draft_k=4)
    assert spec[0].tokens == plain[0].tokens and timings.accepted > 0
