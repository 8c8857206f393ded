"""The model's training-time contracts: causal mask, teacher forcing, dropout, learning."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minigpt_cli.model.gpt import GPT, GPTConfig, KVCache


def test_causal_mask_future_tokens_do_not_change_past_logits(tiny_model: GPT) -> None:
    torch.manual_seed(1)
    x = torch.randint(0, 257, (2, 24))
    t = 10
    y = x.clone()
    y[:, t + 1:] = torch.randint(0, 257, (2, 24 - t - 1))
    with torch.no_grad():
        a, _ = tiny_model(x)
        b, _ = tiny_model(y)
    assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])  # later positions did change


def test_one_pass_loss_equals_mean_of_prefix_losses(tiny_model: GPT) -> None:
    """Teacher forcing: one forward over all positions = N separate next-token predictions."""
    torch.manual_seed(2)
    seq = torch.randint(0, 257, (1, 17))
    x, y = seq[:, :-1], seq[:, 1:]
    with torch.no_grad():
        _, loss = tiny_model(x, y)
        per_prefix = []
        for t in range(x.size(1)):
            logits, _ = tiny_model(x[:, : t + 1])
            per_prefix.append(F.cross_entropy(logits[:, -1], y[:, t]))
    assert torch.allclose(loss, torch.stack(per_prefix).mean(), atol=1e-5)


def test_dropout_only_in_train_mode() -> None:
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32,
                          dropout=0.2))
    x = torch.randint(0, 64, (2, 16))
    model.train()
    a, _ = model(x)
    b, _ = model(x)
    assert not torch.allclose(a, b)  # different dropout masks
    model.eval()
    with torch.no_grad():
        c, _ = model(x)
        d, _ = model(x)
    assert torch.equal(c, d)


def test_set_dropout_turns_every_dropout_on_and_off() -> None:
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)).train()
    x = torch.randint(0, 64, (2, 16))
    assert torch.equal(model(x)[0], model(x)[0])  # built with dropout 0
    model.set_dropout(0.3)
    assert not torch.allclose(model(x)[0], model(x)[0])
    assert model.h[0].attn.attn_dropout == 0.3 and model.h[1].mlp.dropout.p == 0.3
    model.set_dropout(0.0)
    assert torch.equal(model(x)[0], model(x)[0])


def test_tiny_model_overfits_short_text() -> None:
    torch.manual_seed(4)
    text = b"to be or not to be, that is the question. "
    ids = torch.tensor(list(text))[None]
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64,
                          dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_targets_minus_one_are_ignored(tiny_model: GPT) -> None:
    x = torch.randint(0, 257, (1, 8))
    y = torch.randint(0, 257, (1, 8))
    y_masked = y.clone()
    y_masked[0, 4:] = -1
    with torch.no_grad():
        _, full = tiny_model(x[:, :4], y[:, :4])
        _, masked = tiny_model(x, y_masked)
        # position i's logits don't depend on later tokens, so the losses agree
    assert torch.allclose(full, masked, atol=1e-6)


def test_cached_prefill_and_steps_match_full_forward(tiny_model: GPT) -> None:
    torch.manual_seed(5)
    x = torch.randint(0, 257, (2, 20))
    with torch.no_grad():
        full, _ = tiny_model(x)
        cache = KVCache(tiny_model.config, 2, 32, "cpu", torch.float32)
        pre, _ = tiny_model(x[:, :12], cache=cache)
        steps = [tiny_model(x[:, t:t + 1], cache=cache, start_pos=t)[0] for t in range(12, 20)]
    assert torch.allclose(pre, full[:, :12], atol=1e-5)
    assert torch.allclose(torch.cat(steps, 1), full[:, 12:], atol=1e-5)


def test_multi_token_chunk_after_cache_matches(tiny_model: GPT) -> None:
    """Prefill part, then a multi-token chunk at an offset (needs the offset causal mask)."""
    x = torch.randint(0, 257, (1, 20))
    with torch.no_grad():
        full, _ = tiny_model(x)
        cache = KVCache(tiny_model.config, 1, 32, "cpu", torch.float32)
        tiny_model(x[:, :8], cache=cache)
        rest, _ = tiny_model(x[:, 8:], cache=cache, start_pos=8)
    assert torch.allclose(rest, full[:, 8:], atol=1e-5)


def test_left_padding_with_mask_matches_unpadded(tiny_model: GPT) -> None:
    x = torch.randint(1, 257, (1, 10))
    pad = 6
    ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), x], 1)
    valid = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool)],
                      1)
    pos = (torch.arange(16) - pad).clamp(min=0)[None]
    with torch.no_grad():
        ref, _ = tiny_model(x)
        out, _ = tiny_model(ids, pos_ids=pos, key_valid=valid)
    assert torch.allclose(out[:, pad:], ref, atol=1e-5)
    assert torch.isfinite(out).all()  # padding rows never see an all-masked row (no NaN)


def test_weight_decay_groups_split_by_dimension(tiny_model: GPT) -> None:
    decay, no_decay = tiny_model.optimizer_groups(0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n = len(decay["params"]) + len(no_decay["params"])
    assert n == len(list(tiny_model.parameters()))
