"""Recover quality after pruning, without training: re-calibrate the router, re-fit the kept experts
(and, first, merge the removed experts into the kept ones: `merge.py`).

Once a layer's kept set C is chosen, its kept weights are still tuned for the full layer. Both
methods here change them so that the pruned layer's output F'(x', C) comes closer to the target y
(the original layer's output; with the paper's progressive target, on the original model's inputs,
so the layer also compensates the error of the pruned layers before it), minimising the same
exact loss sum_t ||F'(x'_t, C) - y_t||^2 the search scores:

- router re-calibration: gradient steps on the kept router rows (and the router's bias where it has
  one) through the model's own routing rule. The loss of a token is a^T G a - 2 a.b + ||y||^2 over
  its kept experts' outputs o (G = o o^T, b = o y), held as scalars: no backward pass through any
  expert. A selection bias used only to choose experts (DeepSeek-V3's correction bias) has no
  gradient and is left as it is.
- expert re-fitting: least squares for each kept expert's down projection D_e, block by block
  (Gauss-Seidel over the experts, since a token mixes several): with h the expert's activations and
  w its routing weight on the tokens routed to it and r the current residual,
  dD_e = (sum_t w r h^T) (sum_t w^2 h h^T + lambda I)^-1, dampened as SparseGPT/GPTQ do
  (lambda = damp x the mean diagonal). Each block step cannot raise the loss of the tokens it is fitted on.

All are guarded: fitted on the calibration tokens minus a held-back tail of whole batches, and kept
only where the held-back loss falls and the fitted tokens' loss does not rise; in `prune`, also only
where the next-token divergence of the whole model on the held-back batches falls (`guard.py`: a
lower layer loss need not mean a better model). Otherwise the layer keeps its weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from .adapters import MoEAdapter
from .choices import RECOVERY_METHODS
from .layer_fit import LayerData, Recovery, RecoveryReport, block_output, guarded_report, layer_loss
from .merge import merge_removed_experts

ROUTER_MAX_KEPT = 16  # router re-calibration holds every kept expert's outputs per token (tokens x r x r scalars)


def recover_layer(
    adapter: MoEAdapter,
    block: nn.Module,
    keep: torch.Tensor,
    data: LayerData,
    recovery: Recovery,
    judge: Callable[[], float] | None = None,
) -> list[RecoveryReport]:
    """Apply each method of `recovery` to the block in place, in RECOVERY_METHODS order, each guarded.

    judge: the end-to-end divergence with the block as it stands (`guard.EndToEndGuard.for_layer`); a
    method's change that the layer losses accept is also undone, bit for bit, unless the judge falls."""
    steps = {"merge": merge_removed_experts, "router": recalibrate_router, "refit": refit_experts}
    reports = []
    divergence = judge() if judge is not None else None
    for method in (m for m in RECOVERY_METHODS if m in recovery.methods):
        changed = _changed_by(method, adapter, block)
        saved = [p.detach().clone() for p in changed] if judge is not None else []
        report = steps[method](adapter, block, keep, data, recovery)
        if judge is not None:
            after = judge() if report.accepted else divergence
            kept = report.accepted and after < divergence
            if report.accepted and not kept:
                with torch.no_grad():
                    for p, value in zip(changed, saved, strict=True):
                        p.data = value
            report = replace(report, accepted=kept, end_to_end_before=divergence, end_to_end_after=after)
            divergence = after if kept else divergence
        reports.append(report)
    return reports


# --- router re-calibration -----------------------------------------------------------------------------


def _router_parameters(adapter: MoEAdapter, block: nn.Module) -> list[nn.Parameter]:
    """The router weight and, where the router has one, its bias: what re-calibration changes."""
    weight = adapter.router_weight(block)
    bias = getattr(adapter.router(block), "bias", None)
    return [weight] + ([bias] if isinstance(bias, nn.Parameter) else [])


def _expert_parameters(adapter: MoEAdapter, block: nn.Module, whole_experts: bool) -> list[nn.Parameter]:
    """The stacked down projections (with whole_experts, as merging changes them, every expert tensor)."""
    experts = adapter.expert_tensors(block)
    return list(experts.values()) if whole_experts else [experts[n] for n in ("down_proj",) if n in experts]


def recoverable_parameters(adapter: MoEAdapter, block: nn.Module, whole_experts: bool = False) -> list[nn.Parameter]:
    """Every parameter of the block that recovery may change: the router's, and the down projections
    (with whole_experts, as merging changes them, every stacked expert tensor)."""
    return [*_router_parameters(adapter, block), *_expert_parameters(adapter, block, whole_experts)]


def _changed_by(method: str, adapter: MoEAdapter, block: nn.Module) -> list[nn.Parameter]:
    """What one method may change, to put back if the end-to-end judge refuses it: only those tensors
    are copied (the router's rows alone for `router`, not every down projection)."""
    if method == "router":
        return _router_parameters(adapter, block)
    return _expert_parameters(adapter, block, whole_experts=method == "merge")


@dataclass
class _KeptOutputs:
    """Per token of one chunk: the block's inputs, and the Gram scalars of every kept expert's output
    against each other (G) and against the routed target y - shared (b, ||.||^2)."""

    x: torch.Tensor
    gram: torch.Tensor  # tokens x r x r
    cross: torch.Tensor  # tokens x r
    target_sq: torch.Tensor  # tokens


def _kept_outputs(adapter, block, kept: list[int], chunks) -> list[_KeptOutputs]:
    result = []
    for x, y in chunks:
        routed_target = y.float()
        shared = adapter.shared_output(block, x)
        if shared is not None:
            routed_target = routed_target - shared.float()
        outputs = torch.stack([adapter.expert_forward(block, x, e).float() for e in kept], dim=1)  # t x r x h
        result.append(
            _KeptOutputs(
                x,
                torch.bmm(outputs, outputs.transpose(1, 2)),
                torch.bmm(outputs, routed_target.unsqueeze(-1)).squeeze(-1),
                (routed_target * routed_target).sum(-1),
            )
        )
    return result


def _routed_loss(adapter, block, keep: torch.Tensor, position: torch.Tensor, chunks: list[_KeptOutputs]):
    """Mean per-token loss a^T G a - 2 a.b + ||y||^2 with (a, selection) as the block routes now."""
    total, count = 0.0, 0
    for c in chunks:
        weights, indices = adapter.route(block, c.x, keep.to(c.x.device))
        slots = position.to(indices.device)[indices]  # tokens x k, into the kept experts
        gram = c.gram.gather(1, slots.unsqueeze(-1).expand(-1, -1, c.gram.shape[-1]))
        gram = gram.gather(2, slots.unsqueeze(1).expand(-1, slots.shape[1], -1))
        a = weights.float()
        per_token = torch.einsum("tk,tkl,tl->t", a, gram, a) - 2 * (a * c.cross.gather(1, slots)).sum(-1) + c.target_sq
        total = total + per_token.sum()
        count += len(c.x)
    return total / max(count, 1)


@torch.no_grad()
def recalibrate_router(
    adapter: MoEAdapter, block: nn.Module, keep: torch.Tensor, data: LayerData, recovery: Recovery
) -> RecoveryReport:
    kept = torch.nonzero(keep).flatten().tolist()
    if len(kept) > ROUTER_MAX_KEPT:
        raise ValueError(f"router re-calibration holds every kept expert per token; at most {ROUTER_MAX_KEPT} kept")
    position = torch.zeros(len(keep), dtype=torch.long)
    position[kept] = torch.arange(len(kept))
    fit, held = _kept_outputs(adapter, block, kept, data.fit), _kept_outputs(adapter, block, kept, data.held)
    params = _router_parameters(adapter, block)
    originals = [p.detach().clone() for p in params]
    rows = keep.to(params[0].device)

    def losses() -> tuple[float, float]:
        return (
            _routed_loss(adapter, block, keep, position, fit).item(),
            _routed_loss(adapter, block, keep, position, held).item(),
        )

    fit_before, held_before = losses()
    scale = originals[0][rows].float().pow(2).mean().sqrt().item() or 1.0
    best_held, best, since, steps = held_before, None, 0, 0
    saved = [(p.data, p.requires_grad) for p in params]
    try:
        # Optimise the parameters themselves in float32 (the model may hold bf16), restored below.
        for p in params:
            p.data = p.data.float().clone()
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=recovery.router_lr * scale)
        fit32, held32 = _as_float(fit), _as_float(held)
        while steps < recovery.router_steps:
            steps += 1
            optimizer.zero_grad()
            with torch.enable_grad():
                _routed_loss(adapter, block, keep, position, fit32).backward()
            for p in params:
                p.grad[~rows] = 0  # removed experts' rows are not exported; Adam leaves zero-gradient rows alone
            optimizer.step()
            held_now = _routed_loss(adapter, block, keep, position, held32).item()
            if held_now < best_held:
                best_held, best, since = held_now, [p.detach().clone() for p in params], 0
            else:
                since += 1
                if since >= recovery.router_patience:
                    break
    finally:
        for p, (data, requires_grad) in zip(params, saved):
            p.data, p.grad = data, None
            p.requires_grad_(requires_grad)
    if best is not None:
        for p, value in zip(params, best):
            p.data = value.to(p.dtype)

    def undo() -> None:
        for p, original in zip(params, originals):
            p.data = original

    return guarded_report("router", best is not None, (fit_before, held_before), losses(), steps, undo)


def _as_float(chunks: list[_KeptOutputs]) -> list[_KeptOutputs]:
    """The chunks with float32 inputs, to route through the router while it is optimised in float32."""
    return [_KeptOutputs(c.x.float(), c.gram, c.cross, c.target_sq) for c in chunks]


# --- expert re-fitting ---------------------------------------------------------------------------------


def _routed_rows(indices: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.nonzero(indices == expert, as_tuple=True)


def _chunks_with_routes(adapter, block, keep, chunks) -> Iterator:
    for x, y in chunks:
        weights, indices = adapter.route(block, x, keep.to(x.device))
        yield x, y, weights, indices


@torch.no_grad()
def refit_experts(
    adapter: MoEAdapter, block: nn.Module, keep: torch.Tensor, data: LayerData, recovery: Recovery
) -> RecoveryReport:
    if not adapter.refittable:
        raise ValueError(f"{type(adapter).__name__} computes its experts its own way; re-fitting is not supported")
    kept = torch.nonzero(keep).flatten().tolist()
    # Routing does not change while down projections are re-fitted: route once, keep the residuals.
    fit = [list(c) for c in _chunks_with_routes(adapter, block, keep, data.fit)]
    held = [list(c) for c in _chunks_with_routes(adapter, block, keep, data.held)]
    for chunk in fit + held:
        x, y = chunk[0], chunk[1]
        chunk[1] = y.float() - block_output(adapter, block, x, keep).float()  # residual r = y - F'(x')

    def mean_sq(chunks) -> float:
        return sum((c[1] ** 2).sum().double().item() for c in chunks) / sum(len(c[0]) for c in chunks)

    originals = {e: adapter.down_projection(block, e).detach().clone() for e in kept}
    fit_before, held_before = mean_sq(fit), mean_sq(held)
    best_held, best, sweeps = held_before, None, 0
    while sweeps < recovery.refit_sweeps:
        sweeps += 1
        for expert in kept:
            _refit_one(adapter, block, expert, fit, held, recovery.refit_damp)
        held_now = mean_sq(held)
        if held_now < best_held:
            best_held, best = held_now, {e: adapter.down_projection(block, e).detach().clone() for e in kept}
        else:
            break
    chosen = best if best is not None else originals
    for e, value in chosen.items():
        adapter.down_projection(block, e).copy_(value)
    after = layer_loss(adapter, block, keep, data.fit), layer_loss(adapter, block, keep, data.held)

    def undo() -> None:
        for e, value in originals.items():
            adapter.down_projection(block, e).copy_(value)

    return guarded_report("refit", best is not None, (fit_before, held_before), after, sweeps, undo)


def _refit_one(adapter, block, expert: int, fit, held, damp: float) -> None:
    """One Gauss-Seidel step: the least-squares change of one expert's down projection against the
    current residuals of the fitted tokens; then every residual it touches is updated."""
    down = adapter.down_projection(block, expert)
    hessian = torch.zeros(down.shape[1], down.shape[1], dtype=torch.float64, device=down.device)
    cross = torch.zeros(down.shape, dtype=torch.float64, device=down.device)
    for x, residual, weights, indices in fit:
        token, slot = _routed_rows(indices, expert)
        if not len(token):
            continue
        h = adapter.expert_hidden(block, x[token], expert).double()
        w = weights[token, slot].double().unsqueeze(-1)
        hessian += (h * w * w).T @ h
        cross += (residual[token].double() * w).T @ h
    if not hessian.any():
        return  # no fitted token routed to this expert
    diagonal = hessian.diagonal()
    hessian += torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device) * damp * diagonal.mean()
    dead = diagonal == 0  # activations that never fire: leave those columns alone
    hessian[dead, dead] = 1.0
    change = torch.linalg.solve(hessian, cross.T).T  # cross H^-1 (H symmetric)
    before = down.detach().float().clone()
    down.copy_((down.double() + change).to(down.dtype))
    applied = (down.float() - before).double()  # what the weights really changed by, after rounding
    for x, residual, weights, indices in fit + held:
        token, slot = _routed_rows(indices, expert)
        if len(token):
            h = adapter.expert_hidden(block, x[token], expert).double()
            w = weights[token, slot].double().unsqueeze(-1)
            residual[token] -= (w * (h @ applied.T)).float()
