"""Interval bound propagation (DESIGN §4) over a simulated GraphModule, with the registry's rules.

Every node's bounds come from the ``interval`` rule of its entry in passes/ops/; this module only walks
the graph, builds input boxes and turns output bounds into margin bounds. Two modes (see
:meth:`arqc.passes.ops.OpRule.interval`):
- ``sound=True`` (certification): bounds that enclose every value the float32 forward of the simulation
  can compute on the box, in any summation order: each rule widens its result by the a-priori float32
  rounding error of its op and by that of its own arithmetic (float64 by default, or float32), and
  quantizers are evaluated on arguments widened by their rounding;
- ``sound=False`` (QA-IBP training): float32, differentiable through the straight-through quantizers.
"""

from __future__ import annotations

import contextlib

import torch
import torch.fx
import torch.nn.functional as F

from arqc.base import ArqcError
from arqc.passes import ops
from arqc.passes.meta import info


def check_epsilon(epsilon: float) -> float:
    if not isinstance(epsilon, int | float) or isinstance(epsilon, bool) or not 0 <= epsilon <= 1:
        raise ArqcError(f"epsilon = {epsilon!r} is outside [0, 1]; give the L-inf radius in pixel units "
                        "of images in [0, 1], e.g. 2/255")
    return float(epsilon)


def check_supported(gm: torch.fx.GraphModule) -> None:
    """Raise ArqcError naming the first op that has no interval rule."""
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_module"):
            continue
        kind = info(node).kind
        rule = ops.RULES.get(kind)
        if rule is None or not ops.has_interval(rule):
            have = ", ".join(sorted(k for k, r in ops.RULES.items() if ops.has_interval(r)))
            raise ArqcError(f"op '{kind}' (node '{node.name}') has no interval rule, so IBP cannot bound "
                            f"this model; IBP supports {have}; add an `interval` rule to its entry in "
                            "passes/ops/")


def input_box(x: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The L∞ ball of radius ε around images in [0, 1], intersected with [0, 1]."""
    return (x - epsilon).clamp(0, 1), (x + epsilon).clamp(0, 1)


def _attr(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


@contextlib.contextmanager
def ieee_float32():
    """Turn TF32 off on GPUs: the forward and the bounds then use the IEEE float32 arithmetic that the
    rounding margins assume (the previous settings come back afterwards)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _run(gm: torch.fx.GraphModule, lo: torch.Tensor, hi: torch.Tensor, sound: bool, dtype: torch.dtype,
         stop: torch.fx.Node | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of the output (or of ``stop``'s first argument) for inputs in [lo, hi]."""
    if sound:
        lo, hi = lo.to(dtype), hi.to(dtype)
    env: dict[torch.fx.Node, tuple] = {}
    for node in gm.graph.nodes:
        if node is stop:
            return env[node.args[0]]
        if node.op == "placeholder":
            env[node] = (lo, hi)
        elif node.op == "get_attr":
            value = _attr(gm, node.target).detach().to(lo.device)
            value = value.to(dtype) if sound else value
            env[node] = (value, value)
        elif node.op == "output":
            return env[node.args[0]]
        else:
            rule = ops.RULES[info(node).kind]
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            lo_args = torch.fx.node.map_arg(node.args, lambda n: env[n][0])
            hi_args = torch.fx.node.map_arg(node.args, lambda n: env[n][1])
            try:
                env[node] = rule.interval(node, module, list(lo_args), list(hi_args), sound=sound)
            except NotImplementedError as err:
                raise ArqcError(f"op '{info(node).kind}' (node '{node.name}') cannot be bounded: {err}; "
                                "change the model or extend its interval rule in passes/ops/") from None
    raise ArqcError("the graph has no output node")


def interval_bounds(gm: torch.fx.GraphModule, lo: torch.Tensor, hi: torch.Tensor, sound: bool = True,
                    dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise bounds of the logits for every input in the box [lo, hi] (batched); sound bounds are
    computed in ``dtype`` (float64, or float32: faster, slightly wider)."""
    with ieee_float32():
        return _run(gm, lo, hi, sound, dtype)


def _last_linear(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The linear layer that produces the output, when its result is used by nothing else."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if out.op == "call_module" and info(out).kind == "linear" and len(out.users) == 1:
        return out
    return None


def margin_bounds(gm: torch.fx.GraphModule, lo: torch.Tensor, hi: torch.Tensor, labels: torch.Tensor,
                  sound: bool = True, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Lower bounds [B, K] of logit[y] − logit[j] over the box, for every class j (0 at j = y).

    When a linear layer produces the logits, the specification is folded into it (the difference of two
    rows, as in Gowal et al. 2018), which is tighter than subtracting the logits' bounds."""
    last = _last_linear(gm)
    with ieee_float32():
        if last is None:
            low, high = _run(gm, lo, hi, sound, dtype)
            margin = low.gather(1, labels[:, None]) - high
        else:
            x_lo, x_hi = _run(gm, lo, hi, sound, dtype, stop=last)
            margin = _elided_margin(gm.get_submodule(last.target), x_lo, x_hi, labels, sound)
    return margin.scatter(1, labels[:, None], 0.0)


def _elided_margin(module, x_lo, x_hi, labels, sound: bool) -> torch.Tensor:
    x_lo, x_hi, weight, bias = ops.layer_operands(module, x_lo, x_hi, sound)
    centre, radius = (x_hi + x_lo) / 2, (x_hi - x_lo) / 2
    w_diff = weight[labels][:, None, :] - weight[None]  # [B, K, D]: rows of logit[y] - logit[j]
    mid = torch.einsum("bkd,bd->bk", w_diff, centre)
    if bias is not None:
        mid = mid + bias[labels][:, None] - bias[None]
    rad = torch.einsum("bkd,bd->bk", w_diff.abs(), radius)
    if sound:  # each float32 logit is off by at most γ_n·(|W|·max|x| + |b|) from its exact value
        terms = weight.shape[1] + 1
        magnitude = F.linear(torch.maximum(x_lo.abs(), x_hi.abs()), weight.abs(),
                             None if bias is None else bias.abs())
        err = ops.rounding_margin(terms + 1, x_lo.dtype) * magnitude + terms * ops.rounding.TINY  # +1: W_y - W_j
        rad = rad + err + err.gather(1, labels[:, None])
    return mid - rad


def worst_margin(margins: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """min over j ≠ y of a margin matrix [B, K] (> 0 means certified)."""
    return margins.scatter(1, labels[:, None], float("inf")).min(1).values


def worst_case_logits(margins: torch.Tensor) -> torch.Tensor:
    """Logits whose cross-entropy is the IBP robust loss: −(lower bound of logit[y] − logit[j])."""
    return -margins
