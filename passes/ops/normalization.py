"""Normalizations that run in float between quantized ops (DESIGN §2): softmax over one dimension, layer norm
over the last dimensions, and L2 normalization along one dimension (:class:`NormalizeRule`, its bounds in its
docstring). Neither is quantizable, requantized or grid-keeping: a tensor on a grid that enters one
is read through its DequantizeLinear, and what comes out is float until the next layer's input quantizer.

Softmax, s_i = exp(x_i) / Σ_j exp(x_j) = 1 / (1 + Σ_{j≠i} exp(x_j − x_i)), increases in x_i and decreases in every
other x_j. So over a box the exact range is [1 / (1 + Σ_{j≠i} exp(hi_j − lo_i)), 1 / (1 + Σ_{j≠i} exp(lo_j − hi_i))]
(both ends are reached). The rule computes it stably as sigmoid(lo_i − L_i(hi)) and sigmoid(hi_i − L_i(lo)), where
L_i(t) = log Σ_{j≠i} exp(t_j) is an exclusive logsumexp (prefix and suffix logcumsumexp, no cancellation), on the
inputs shifted by the row's largest upper bound M.
Sound margin, relative to s (the values lie in [0, 1]): with R = max hi − min lo over the row (so |x_j − max x| ≤ R),
- the float32 forward computes t_j = x_j − max x (one rounding: |δt_j| ≤ u·R), exp(t_j) (a library exp: ULPS float32
  ulps), the sum of N terms (γ_N) and a division or a product with the reciprocal (2 roundings); the other common
  form, exp(x_i − max x − log Σ), has an exponent error of at most 3u·(R + log N + 1) and the log's ulps. Both lie
  within E_f = expm1(2·(ULPS + 3·(R + log N + 1))·u) + γ_(N+2): s_f ∈ s·[1 − E_f, 1 + E_f];
- the bounds' own arithmetic (in the dtype of lo, unit roundoff u_d): logcumsumexp is N log-add-exp steps, each
  off by at most a few u_d of values of magnitude ≤ 2R + log N, so the exponent is off by at most
  δ = 4·(N + 4)·(2R + log N + 2)·u_d, and s by at most the factor expm1(δ) + 4u_d;
- underflow (subnormals or flush to zero in exp and in the quotient): an absolute (N + 2)·TINY.
The results are clamped to [0, 1]: every float32 forward stays there (its sum includes exp(t_i) itself, and a
rounded sum of non-negative terms is at least each of them, so e_i/Σ ≤ 1 and e_i·fl(1/Σ) ≤ 1 + u rounds to 1).

Layer norm over the last k dimensions (N elements): y = γ·z + β, z_i = d_i / sqrt(var + eps), d_i = x_i − mean(x),
var = mean(d²) (biased), γ and β per element (1 and 0 when absent).
- d_i = x_i·(1 − 1/N) − (1/N)·Σ_{j≠i} x_j: increasing in x_i, decreasing in the others, so its exact range is
  [lo_i − mean(hi) + (hi_i − lo_i)/N, hi_i − mean(lo) − (hi_i − lo_i)/N] (computed on inputs centred on the row's
  mid-point, which changes no d and keeps large offsets out of our own rounding).
- var ∈ [mean_j min d_j², mean_j max d_j²] over the d_j intervals (the min is 0 where an interval contains 0).
- The d_i are tied to var: Σ_j d_j = 0, so by Cauchy–Schwarz d_i² ≤ (N − 1)·Σ_{j≠i} d_j² = (N − 1)·(N·var − d_i²),
  that is d_i² ≤ (N − 1)·var (equality for N = 2: x = (1, −1) has d = (1, −1), var = 1) and |z_i| < sqrt(N − 1).
  For a given d, z = d / sqrt(var + eps) is largest where var is smallest, var ≥ max(var_lo, d²/(N − 1)), and
  g(d) = d / sqrt(max(var_lo, d²/(N − 1)) + eps) increases in d; so z_hi = g(d_hi) when d_hi ≥ 0, else
  d_hi / sqrt(var_hi + eps) (and z_lo symmetrically). This is the interval quotient (case on the sign of d)
  intersected with the dependency, and lies inside [−sqrt(N − 1), sqrt(N − 1)]. N = 1 gives y = β exactly (the
  mean of one value is that value in any float arithmetic).
- y: interval affine, γ of either sign.
Sound margin. Model of the float32 forward, covering torch (Welford moments, sequential or in chunks that are
then combined, on CPU and CUDA; y = (x·r − mean·r)·γ + β) and onnxruntime (moments accumulated in double;
y = (x − mean)/σ·γ + β), in any order. u = U32 plus twice the bounds' own u_d (which covers our own arithmetic on
the same quantities); per row of the box A = max|x| and e = (N + 4·ln N + 4·log2 N + 8)·u·A (+ TINYs):
- every computed deviation (x − mean, or x·r − mean·r divided by r) is within e of the exact d: a running Welford
  mean gains at most u·A + 4u·A/k at step k and shrinks earlier errors, (N + 4·ln N + 4)·u·A in all; a sum in any
  order over N, (N + 1)·u·A; each level of combining chunk means 4u·A more; the subtraction 2u·A. This is the
  cancellation that hurts: with x ≈ 1000 and a small spread it is far larger than the spread;
- the computed variance of a point whose exact variance is σ² is off by at most DV(σ) = 2·[(γ_(N+4) + 3u)·(σ² +
  c1·σ + c2) + c1·σ + c2 + 2u·(σ² + eps)], c1 = (3 + 3·sqrt(log2 N))·e, c2 = (1 + 2·log2 N)·e². Two-pass: the
  squares of deviations off by e add at most 2e·mean|d| + e² ≤ 2e·σ + e² (Cauchy–Schwarz). Welford: the terms
  (x_k − m_(k−1))·(x_k − m_k) sum to N·σ², their factors are off by at most e, and Σ_(k≥2) (x_k − m_(k−1))² ≤ 2N·σ²
  (each term of that sum has weight (k − 1)/k ≥ 1/2 in N·σ²), so they add at most 2√2·e·σ + e² per element.
  Combining chunks (M2 = M2_a + M2_b + δ²·n_a·n_b/n) adds (4e·|δ| + 4e²)·n_a·n_b/n per combine, where Σ δ²·w ≤ N·σ²
  and Σ w ≤ Σ min(n_a, n_b) ≤ (N/2)·log2 N (an element is on the smaller side at most log2 N times): at most
  2√2·sqrt(log2 N)·e·σ + 2·log2 N·e² per element. The sum of N non-negative terms rounds by γ_N and each term by
  3u; var + eps and eps itself are rounded (2u). The factor 2 is slack;
- r = 1/sqrt(var + eps) is computed within 8u (sqrt and a division, or an rsqrt of 2 ulps), and z = d·r with 3u;
- computed variances are never negative (a sum of squares, Welford's products of same-sign factors, torch's clamp
  at 0) except through a double one-pass E[x²] − E[x]², off by at most 4·(N + 2)·U64·A²: the computed var + eps is
  at least floor = eps·(1 − 4u) − 4·(N + 2)·U64·A². A one-pass E[x²] − E[x]² in *float32* is not covered (it can
  even give a negative variance and NaN; no bound holds for it).
The rule intersects three enclosures of the forward's z_f, with DV = DV(sqrt(var_hi)) (DV grows with σ):
1. where ρ = DV/(var_lo + eps) < 1/2: r_f/r ∈ [1 − κ, 1 + κ] with κ = (1 − ρ)^(−1/2)·(1 + 8u)·(1 + 3u) − 1, so
   z_f ∈ [z_lo − κ|z_lo|, z_hi + κ|z_hi|] ± e·(1 + κ)/sqrt(var_lo + eps) (small boxes: this is the tight one);
2. the interval product [d_lo − e, d_hi + e] × [(1 − 8u)/sqrt(var_hi + eps + DV), (1 + 8u)/sqrt(V_min)], widened
   by 3u, V_min = max(var_lo + eps − DV, floor);
3. at a point of exact variance σ², |z_f| ≤ (sqrt((N − 1)·σ²) + e)·(1 + 8u)·(1 + 3u)/sqrt(max(σ² + eps − DV(σ),
   floor)) (the tie d² ≤ (N − 1)·var again), bounded over σ in [sqrt(var_lo), sqrt(var_hi)] on the cells of a
   geometric grid (each cell: the numerator at its top, the denominator at its least; σ² + eps − DV(σ) is convex
   in σ). This keeps wide boxes, where var_lo = 0, near sqrt(N − 1) instead of d/sqrt(eps).
Where every enclosure fails (the floor ≤ 0) the bounds are the whole line. Finally y = γ·z_f + β takes
3u·(|γ|·max|z_f| + |β|) + 2·TINY more.
The margin is a priori and generous: on a small box around x ≈ 1000 with a spread of 1e-3 it allows errors of
order ten in z (torch's forward makes errors of 0.25 there), and on ordinary inputs (|x| ≲ 10, var ≈ 9) it is
0.2 % of |γ|·|z| at N = 768 (0.03 % at N = 96).

``sound=False``: the same formulas without any margin, differentiable (the shifts are detached).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arqc.passes.meta import KEY, NodeInfo
from arqc.passes.ops import activations, rounding
from arqc.passes.ops.base import OpRule, aten, register
from arqc.passes.ops.rounding import unit_roundoff


def softmax(x, dim: int):
    return torch.softmax(x, dim)


def layer_norm(x, normalized_shape: tuple[int, ...], weight, bias, eps: float):
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


GRID, GRID_CELLS = 1.1, 240  # the std grid of the wide-box bound: cells 10% wide, down to 1e-10 of the top


def _gamma(n: int, u: float) -> float:
    """γ_n = n·u / (1 − n·u): the relative error bound of n roundings (Higham §3.1)."""
    return n * u / (1 - n * u)


def _rank(node) -> int:
    return len(node.args[0].meta["tensor_meta"].shape)


def _argument(node, index: int, name: str, default=None):
    """A source call's argument by position or keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


# ------------------------------------------------------------------------------------------------------
# Softmax


def _exclusive_logsumexp(t: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """log Σ_{j≠i} exp(t_j) along the last dimension (N ≥ 2), from a prefix and a suffix logcumsumexp (no
    subtraction, so no cancellation). ``pad`` (≤ min t − 2000, per row) stands for the empty sum at both ends:
    exp(pad − t) is 0 in float64 and float32, so it changes no result, and it keeps gradients finite."""
    before = torch.logcumsumexp(torch.cat([pad, t[..., :-1]], -1), -1)  # log Σ_{j<i}
    after = torch.logcumsumexp(torch.cat([pad, t.flip(-1)[..., :-1]], -1), -1).flip(-1)  # log Σ_{j>i}
    return torch.logaddexp(before, after)


def _softmax_bounds(lo: torch.Tensor, hi: torch.Tensor, sound: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of the softmax over the last dimension (see the module docstring)."""
    n = lo.shape[-1]
    if n == 1:  # exp(0)/exp(0): exactly 1
        return torch.ones_like(lo), torch.ones_like(hi)
    with torch.no_grad():
        top = hi.amax(-1, keepdim=True)
        spread = top - lo.amin(-1, keepdim=True)  # R: every |x_j − max x| over the box is at most this
        pad = -spread - 2000.0
    lo_, hi_ = lo - top, hi - top  # in [−R, 0]
    low = torch.sigmoid(lo_ - _exclusive_logsumexp(hi_, pad))
    high = torch.sigmoid(hi_ - _exclusive_logsumexp(lo_, pad))
    if not sound:
        return low, high
    u, u_d, log_n = rounding.U32, unit_roundoff(lo.dtype), math.log(n)
    forward = torch.expm1(2 * (activations.ULPS + 3 * (spread + log_n + 1)) * u) + _gamma(n + 2, u)
    own = torch.expm1(4 * (n + 4) * (2 * spread + log_n + 2) * u_d) + 4 * u_d
    rel = (1 + forward) * (1 + own) - 1
    tiny = (n + 2) * rounding.TINY
    low = torch.where(rel < 1, low * (1 - rel) - tiny, torch.zeros_like(low)).clamp(0, 1)
    high = torch.where(rel < 1, high * (1 + rel) + tiny, torch.ones_like(high)).clamp(0, 1)
    return low, high


@register
class SoftmaxRule(OpRule):
    """Softmax over one non-batch dimension (canonical: ``softmax(x, dim)``, 0 < dim < rank)."""

    kind = "softmax"
    sources = (nn.Softmax, nn.Softmax2d, F.softmax, torch.softmax, aten.softmax.int, aten._softmax.default,
               "softmax")
    fn = staticmethod(softmax)

    def canonical_args(self, node, module):
        if isinstance(module, nn.Softmax2d):
            dim = -3
        elif isinstance(module, nn.Softmax):
            dim = module.dim
        else:
            dim = _argument(node, 1, "dim")
            dtype = _argument(node, 2, "dtype") if node.target is not aten._softmax.default else None
            if node.target is aten._softmax.default and node.args[2]:
                raise NotImplementedError("softmax of half precision to float")
            if dtype is not None and dtype != torch.float32:
                raise NotImplementedError(f"softmax with dtype={dtype}")
        if dim is None:
            raise NotImplementedError("softmax without a dim (the implicit choice is deprecated)")
        dim = int(dim) % _rank(node)
        if dim == 0:
            raise NotImplementedError("softmax over the batch dimension")
        return (node.args[0], dim)

    def nonneg(self, node, inputs_nonneg):
        return True

    def interval(self, node, module, lo, hi, sound=True):
        dim = lo[1]
        low, high = _softmax_bounds(lo[0].movedim(dim, -1), hi[0].movedim(dim, -1), sound)
        return low.movedim(-1, dim), high.movedim(-1, dim)

    def lower(self, b, node, args):
        x = args[0]
        if x in b.grids:
            # On a grid, onnxruntime would fuse DequantizeLinear → Softmax → QuantizeLinear (the next layer's input)
            # into QLinearSoftmax, a lookup-table softmax that rounds differently from the float one the simulation
            # computes (measured: 12 % of a small net's logits moved). Adding a dequantized 0 in between is exact
            # and keeps the softmax float (a constant 0 would be removed as a no-op; a DequantizeLinear is not).
            zero = b.const(np.uint8(0), f"{node.name}_zero")
            dq = b.op("DequantizeLinear", [zero, b.const(np.float32(1), f"{node.name}_one"), zero], f"{node.name}_0")
            x = b.op("Add", [x, dq], f"{node.name}_float")
        return b.op("Softmax", [x], node.name, axis=int(node.args[1]))


# ------------------------------------------------------------------------------------------------------
# Layer norm


def _layer_norm_z(lo: torch.Tensor, hi: torch.Tensor, eps: float) -> tuple:
    """Exact bounds of z = (x − mean) / sqrt(var + eps) over the last dimension, and what the margin needs:
    (z_lo, z_hi, d_lo, d_hi, var_lo, var_hi)."""
    n = lo.shape[-1]
    with torch.no_grad():
        centre = ((lo + hi) / 2).mean(-1, keepdim=True)
    lo_, hi_ = lo - centre, hi - centre
    width = (hi_ - lo_) / n  # N ≥ 2 (N = 1 is y = β, see _layer_norm_bounds)
    d_lo = lo_ - hi_.mean(-1, keepdim=True) + width
    d_hi = hi_ - lo_.mean(-1, keepdim=True) - width
    zero = torch.zeros_like(d_lo)
    square_min = torch.where(d_lo > 0, d_lo * d_lo, torch.where(d_hi < 0, d_hi * d_hi, zero))
    var_lo = square_min.mean(-1, keepdim=True)
    var_hi = torch.maximum(d_lo * d_lo, d_hi * d_hi).mean(-1, keepdim=True)
    tiny = torch.finfo(lo.dtype).tiny

    def tied(d):  # d / sqrt(max(var_lo, d²/(N − 1)) + eps): the extreme z for this d (0 when d = 0)
        return d / (torch.maximum(var_lo, d * d / (n - 1)) + eps).sqrt().clamp_min(tiny)

    loose = (var_hi + eps).sqrt().clamp_min(tiny)
    z_hi = torch.where(d_hi >= 0, tied(d_hi), d_hi / loose)
    z_lo = torch.where(d_lo <= 0, tied(d_lo), d_lo / loose)
    return z_lo, z_hi, d_lo, d_hi, var_lo, var_hi


def _layer_norm_margin(lo, hi, z_lo, z_hi, d_lo, d_hi, var_lo, var_hi, eps: float) -> tuple:
    """Bounds of the float32 forward's z (module docstring): the intersection of 1. the perturbation of
    [z_lo, z_hi], 2. the interval product of the computed deviations and reciprocal deviations and 3. the largest
    |z_f| that the dependency d² ≤ (N − 1)·var allows at any variance of the box."""
    n = lo.shape[-1]
    u = rounding.U32 + 2 * unit_roundoff(lo.dtype)
    tiny = torch.finfo(lo.dtype).tiny
    a = torch.maximum(lo.abs(), hi.abs()).amax(-1, keepdim=True)
    e = (n + 4 * math.log(n) + 4 * math.log2(n) + 8) * u * a + (n + 4) * rounding.TINY
    first, second, gamma = (3 + 3 * math.sqrt(math.log2(n))) * e, (1 + 2 * math.log2(n)) * e * e, _gamma(n + 4, u)

    def error(std):  # DV: how far the computed variance is from a variance std², at most
        var = std * std
        return 2 * ((gamma + 3 * u) * (var + first * std + second) + first * std + second
                    + 2 * u * (var + eps)) + rounding.TINY

    floor = eps * (1 - 4 * u) - 4 * (n + 2) * rounding.U64 * a * a  # the computed var + eps is never below this
    std_lo, std_hi = var_lo.sqrt(), var_hi.sqrt()
    dv = error(std_hi)  # the variance's error grows with the variance
    v_lo, v_hi = var_lo + eps, var_hi + eps
    inf = torch.full_like(z_lo, math.inf)
    # 1. the exact range, perturbed (where the variance's error is under half of var_lo + eps)
    rho = dv / v_lo.clamp_min(tiny)
    valid = rho < 0.5
    kappa = torch.where(valid, (1 - rho.clamp(max=0.5)).rsqrt() * (1 + 8 * u) * (1 + 3 * u) - 1, inf[..., :1])
    shift = e * (1 + kappa) * v_lo.clamp_min(tiny).rsqrt()
    low1 = torch.where(valid, z_lo - kappa * z_lo.abs() - shift, -inf)
    high1 = torch.where(valid, z_hi + kappa * z_hi.abs() + shift, inf)
    # 2. the interval product of the computed deviation and reciprocal deviation
    v_min = torch.maximum(v_lo - dv, floor)
    positive = v_min > 0
    r_hi = torch.where(positive, (1 + 8 * u) * v_min.clamp_min(tiny).rsqrt(), inf[..., :1])
    r_lo = (1 - 8 * u) * (v_hi + dv).rsqrt()
    dl, dh = d_lo - e, d_hi + e
    low2 = torch.where(positive, torch.minimum(dl * r_lo, dl * r_hi), -inf)
    high2 = torch.where(positive, torch.maximum(dh * r_lo, dh * r_hi), inf)
    low2, high2 = low2 - 3 * u * low2.abs(), high2 + 3 * u * high2.abs()
    # 3. |z_f| ≤ (sqrt((N − 1)·var) + e)·r_f at the point's own variance, maximized over the box's variances on
    # cells of a geometric grid of std (each cell: the numerator at its top, the computed var + eps at its least)
    top = std_hi * GRID ** -torch.arange(GRID_CELLS + 1, dtype=lo.dtype, device=lo.device)
    edges = torch.cat([torch.maximum(top, std_lo), std_lo], -1)
    cell_lo, cell_hi = edges[..., 1:], edges[..., :-1]
    turn = (1 + gamma + 3 * u) * first / (1 - 2 * (gamma + 3 * u) - 4 * u)  # where the convex h(std) is least
    std = torch.minimum(torch.maximum(turn, cell_lo), cell_hi)
    least = torch.maximum(std * std + eps - error(std), floor)
    bound = (math.sqrt(n - 1) * cell_hi + e) * (1 + 8 * u) * (1 + 3 * u) / least.clamp_min(tiny).sqrt()
    bound = torch.where(least > 0, bound, math.inf).amax(-1, keepdim=True)
    return torch.maximum(torch.maximum(low1, low2), -bound), torch.minimum(torch.minimum(high1, high2), bound)


def _times(scale: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """scale·z with 0·(±inf) = 0 (a zero γ removes even an unbounded z)."""
    return torch.where(scale == 0, torch.zeros_like(z), scale * z)


def _layer_norm_bounds(x_lo, x_hi, shape, weight, bias, eps: float, sound: bool) -> tuple:
    k, n = len(shape), int(np.prod(shape))
    lo, hi = x_lo.flatten(-k), x_hi.flatten(-k)
    scale = torch.ones(n, dtype=lo.dtype, device=lo.device) if weight is None else weight.reshape(n).to(lo.dtype)
    shift = torch.zeros(n, dtype=lo.dtype, device=lo.device) if bias is None else bias.reshape(n).to(lo.dtype)
    if n == 1:  # the mean of one value is that value, exactly (in any float arithmetic): y = β
        return (shift + 0 * lo).reshape(x_lo.shape), (shift + 0 * hi).reshape(x_hi.shape)
    z_lo, z_hi, d_lo, d_hi, var_lo, var_hi = _layer_norm_z(lo, hi, eps)
    if sound:
        z_lo, z_hi = _layer_norm_margin(lo, hi, z_lo, z_hi, d_lo, d_hi, var_lo, var_hi, eps)
    a, b = _times(scale, z_lo), _times(scale, z_hi)
    low, high = torch.minimum(a, b) + shift, torch.maximum(a, b) + shift
    if sound:
        u = rounding.U32 + 2 * unit_roundoff(lo.dtype)
        err = 3 * u * (torch.maximum(a.abs(), b.abs()) + shift.abs()) + 2 * rounding.TINY
        low, high = low - err, high + err
    return low.reshape(x_lo.shape), high.reshape(x_hi.shape)


def _constant_node(gm: torch.fx.GraphModule, node: torch.fx.Node, owner: str, name: str) -> torch.fx.Node | None:
    """A get_attr node for the parameter ``name`` of the module at ``owner`` (None when it has none)."""
    if getattr(gm.get_submodule(owner), name, None) is None:
        return None
    with gm.graph.inserting_before(node):
        constant = gm.graph.get_attr(f"{owner}.{name}")
    constant.meta[KEY] = NodeInfo(kind="constant")
    return constant


@register
class LayerNormRule(OpRule):
    """Layer norm over the last ``len(normalized_shape)`` dimensions (never the batch), with an optional
    element-wise weight and bias (get_attr nodes). Canonical: ``layer_norm(x, normalized_shape, weight, bias, eps)``.
    An nn.LayerNorm module's parameters become get_attr nodes of the module's own parameters."""

    kind = "layer_norm"
    sources = (nn.LayerNorm, F.layer_norm, torch.layer_norm, aten.layer_norm.default)
    fn = staticmethod(layer_norm)

    def canonical_args(self, node, module):
        if module is not None:
            gm = node.graph.owning_module
            shape, eps = tuple(module.normalized_shape), float(module.eps)
            weight, bias = (_constant_node(gm, node, node.target, p) for p in ("weight", "bias"))
        else:
            shape = _argument(node, 1, "normalized_shape")
            weight, bias = _argument(node, 2, "weight"), _argument(node, 3, "bias")
            eps = float(_argument(node, 4, "eps", 1e-5))
        shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
        for what, p in (("weight", weight), ("bias", bias)):
            if p is not None and not (isinstance(p, torch.fx.Node) and p.op == "get_attr"):
                raise NotImplementedError(f"layer norm with a {what} that is not a parameter or buffer ({p})")
        in_shape = tuple(node.args[0].meta["tensor_meta"].shape)
        if not 0 < len(shape) < len(in_shape) or in_shape[-len(shape):] != shape:
            raise NotImplementedError(f"layer norm over {shape} of a tensor of shape {in_shape} (it must normalize "
                                      "trailing dimensions, not the batch)")
        return (node.args[0], shape, weight, bias, eps)

    def interval(self, node, module, lo, hi, sound=True):
        _, shape, weight, bias, eps = lo
        return _layer_norm_bounds(lo[0], hi[0], shape, weight, bias, eps, sound)

    def lower(self, b, node, args):  # ONNX LayerNormalization (opset 17), computed in float32 (stash_type 1)
        x, shape, weight, bias, eps = args
        scale = weight if weight is not None else b.const(np.ones(shape, np.float32), f"{node.name}_scale")
        shift = bias if bias is not None else b.const(np.zeros(shape, np.float32), f"{node.name}_bias")
        return b.op("LayerNormalization", [x, scale, shift], node.name, axis=-len(shape), epsilon=float(eps))


def normalize(x, dim: int, eps: float):
    return F.normalize(x, p=2.0, dim=dim, eps=eps)


def _exclusive_sum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ_{j≠i} t_j along ``dim`` for non-negative t, from prefix and suffix sums (no cancellation)."""
    before = torch.cumsum(t, dim) - t
    after = torch.flip(torch.cumsum(torch.flip(t, (dim,)), dim), (dim,)) - t
    return before.clamp_min(0) + after.clamp_min(0)


@register
class NormalizeRule(OpRule):
    """L2 normalization along one dimension, z = x / max(‖x‖, eps) (Swin V2's cosine attention).

    Bounds: z_i = x_i / max(sqrt(x_i² + S_i), eps), S_i = Σ_{j≠i} x_j², increases in x_i and, for x_i ≥ 0,
    decreases in S_i (increases for x_i < 0). Over a box S_i lies in [S_lo, S_hi] (sums over j≠i of the least and
    the largest square of each x_j's interval), so z_lo = f(lo_i, S_hi if lo_i ≥ 0 else S_lo) and
    z_hi = f(hi_i, S_lo if hi_i ≥ 0 else S_hi): the exact range, inside [-1, 1].
    Sound margin: the float32 forward sums N squares (γ_N relative), takes a square root and divides (a few
    roundings): z_f = z·(1 ± (N + 8)·u32); our own arithmetic (prefix sums of N non-negative terms, a square root
    and a quotient in the dtype of lo) adds (N + 8)·u_d relative; plus an absolute TINY. Clamped to ±(1 + that
    relative margin): a rounded |z_f| can exceed 1 by as much as the rounding of the norm."""

    kind = "normalize"
    sources = (F.normalize,)
    fn = staticmethod(normalize)

    def canonical_args(self, node, module):
        names = ("p", "dim", "eps")
        given = dict(zip(names, node.args[1:], strict=False)) | dict(node.kwargs)
        rank = len(node.args[0].meta["tensor_meta"].shape)
        p, dim, eps = float(given.get("p", 2.0)), int(given.get("dim", 1)) % rank, float(given.get("eps", 1e-12))
        if p != 2.0 or dim == 0:
            raise NotImplementedError(f"normalize with p={p} or along the batch dimension")
        return (node.args[0], dim, eps)

    def lower(self, b, node, args):  # x / max(sqrt(Σ x²), eps)
        _, dim, eps = node.args
        axes = b.const(np.array([dim], np.int64), f"{node.name}_axes")
        norm = b.op("ReduceL2", [args[0], axes], f"{node.name}_norm", keepdims=1)
        floor = b.op("Max", [norm, b.const(np.float32(eps), f"{node.name}_eps")], f"{node.name}_floor")
        return b.op("Div", [args[0], floor], node.name)

    def interval(self, node, module, lo, hi, sound=True):
        _, dim, eps = node.args
        lo, hi = lo[0], hi[0]
        square_lo = torch.where((lo <= 0) & (hi >= 0), torch.zeros_like(lo), torch.minimum(lo * lo, hi * hi))
        square_hi = torch.maximum(lo * lo, hi * hi)
        s_lo, s_hi = _exclusive_sum(square_lo, dim), _exclusive_sum(square_hi, dim)

        def f(x, s):
            return x / torch.clamp_min(torch.sqrt(x * x + s), eps)

        z_lo = f(lo, torch.where(lo >= 0, s_hi, s_lo))
        z_hi = f(hi, torch.where(hi >= 0, s_lo, s_hi))
        if not sound:
            return z_lo, z_hi
        relative = (lo.shape[dim] + 8) * (rounding.U32 + unit_roundoff(lo.dtype))
        z_lo = z_lo - relative * z_lo.abs() - rounding.TINY
        z_hi = z_hi + relative * z_hi.abs() + rounding.TINY
        return z_lo.clamp(-1 - relative, 1 + relative), z_hi.clamp(-1 - relative, 1 + relative)
