"""The optimizer a config asks for: AdamW, or Muon for the blocks' matrices with AdamW for the
rest (what the nanoGPT speedruns train with).

Muon (Keller Jordan, 2024) follows each matrix's momentum, orthogonalised by a few Newton-Schulz
iterations, so every direction of the update moves at the same rate. It only makes sense for
hidden 2-D weights; embeddings (a lookup, not a product), norm gains and biases stay on AdamW.
Scaled as Moonshot's "Muon is Scalable" does (0.2 * sqrt(max(rows, cols))), its updates have
AdamW's size, so one `train.lr` and `train.weight_decay` serve both.

Ours, not torch.optim.Muon: that one runs the iterations in bfloat16, which on a CPU without
native bf16 made tiny.yaml's whole step 3x slower (1,120 against 372 ms, measured here); this
one runs them in float32 on the CPU and in bfloat16 on a GPU.

The pair is stepped as one optimizer (`Optimizers`) with one state dict, numbered as one
optimizer over both sets of groups would number it: checkpoints, resume and the learning-rate
schedule see no difference.
"""

from __future__ import annotations

from typing import Any

import torch

from minigpt_cli.config import TrainConfig

# The quintic's coefficients, chosen (Jordan) for the steepest slope at zero that still
# brings every singular value into about [0.7, 1.2] in five steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """About U V^T of g = U S V^T, by Newton-Schulz iterations (matrix products only)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T  # the Gram matrix of the short side is the small one
    x = x / x.norm().clamp(min=1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised, with decoupled weight decay; 2-D weights only."""

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float,
                 momentum: float = 0.95) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay,
                                  "momentum": momentum})

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = orthogonalize(p.grad.lerp(buf, mu))
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * 0.2 * max(p.shape) ** 0.5)


class Optimizers:
    """Several optimizers over disjoint parameters, used as one."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.opts for g in o.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, Any]:
        merged: dict[torch.Tensor, Any] = {}
        for o in self.opts:
            merged.update(o.state)
        return merged

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for o in self.opts:
            sd = o.state_dict()
            state.update({pid + offset: st for pid, st in sd["state"].items()})
            groups += [{**g, "params": [i + offset for i in g["params"]]}
                       for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in o.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        offset, first = 0, 0
        for o in self.opts:
            n = sum(len(g["params"]) for g in o.param_groups)
            groups = sd["param_groups"][first:first + len(o.param_groups)]
            o.load_state_dict({
                "state": {int(pid) - offset: st for pid, st in sd["state"].items()
                          if offset <= int(pid) < offset + n},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]}
                                 for g in groups]})
            offset += n
            first += len(o.param_groups)


def build(model: torch.nn.Module, t: TrainConfig, device: torch.device
          ) -> torch.optim.Optimizer | Optimizers:
    """AdamW (decay on 2-D weights only), or Muon + AdamW as `train.optimizer` says."""
    raw = getattr(model, "module", model)  # DDP wraps; the names are the model's
    fused = device.type == "cuda" or None
    if t.optimizer == "adamw":
        return torch.optim.AdamW(raw.optimizer_groups(t.weight_decay), lr=t.lr,
                                 betas=(t.beta1, t.beta2), fused=fused)
    params = [(n, p) for n, p in raw.named_parameters() if p.requires_grad]
    hidden = [p for n, p in params if p.dim() == 2 and n.startswith("h.")]
    taken = {id(p) for p in hidden}
    rest = [p for _, p in params if id(p) not in taken]
    muon = Muon(hidden, lr=t.lr, weight_decay=t.weight_decay)
    adamw = torch.optim.AdamW(
        [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": t.weight_decay},
         {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
        lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)
    return Optimizers(muon, adamw)
