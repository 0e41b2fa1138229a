"""The op registry: everything arqc knows about one op sits in one entry.

An entry (an :class:`OpRule` subclass, registered with :func:`register`) says
- which source calls it replaces (``sources``: nn.Module types, functions, aten overloads, method names) and
  how their arguments map to the canonical form (``canonical_args``), so that fx-traced modules and
  torch.export programs end in one IR (see passes/capture.py);
- how many MACs and parameters it has (``macs``, ``params``);
- whether its output is non-negative (``nonneg``: decides unsigned activation ranges);
- how it lowers to ONNX (``lower``);
- how interval bounds pass through it (``interval``, DESIGN §4; :meth:`OpRule.interval` has two modes).

In the canonical IR a quantizable layer (conv2d, linear) is a ``call_module`` node and every other op is a
``call_function`` node whose target is the entry's ``fn`` with normalized positional arguments.

The package (passes/ops/) has one module per part:
- ``base``: the registry (:data:`RULES`, :func:`register`, lookup by kind and by source), :class:`OpRule`
  and the shared base class of pass-through entries;
- ``rounding``: the float-rounding machinery of sound bounds (unit roundoff, :func:`rounding_margin`, the
  widening helpers);
- ``layers``: the quantizable layers conv2d, linear and matmul (of two activations), their interval helpers
  (:func:`layer_operands`), and
  ``BATCHNORM_SOURCES`` (batch norm is no entry: capture folds it into the layer before it, or makes it an
  ``affine`` when no layer precedes it);
- ``elementwise``: relu, clamp, add, sub, mul, div, and the per-channel affine a BatchNorm that no conv precedes
  becomes;
- ``activations``: sigmoid, tanh, hardsigmoid, hardswish, silu, gelu (float between quantized ops; sound
  rules for the non-monotone ones);
- ``normalization``: softmax, layer norm and L2 normalization (float between quantized ops; sound rules with the
  float32 error of their reductions);
- ``pooling``: max pool, avg pool, adaptive avg pool, mean over dimensions;
- ``shape``: flatten, reshape (views that keep the batch; :meth:`OpRule.refine` picks it), permute,
  pad, slice, select, roll, cat, a constant expanded over the batch, and ``IDENTITY_SOURCES`` (the sources capture
  removes);
- ``quant``: the requant node that integer-only simulations insert between quantized ops (DESIGN §2).

Ops outside arqc: a package registers its own entries (with :func:`register`) in a module that it declares as
an entry point of group ``arqc.ops`` (or that ``$ARQC_OPS`` names); capture imports those first
(:func:`load_plugins`). README, "Ops arqc does not know", has a worked example.

Supporting a new op is one new entry: a function and a registered :class:`OpRule` subclass in the module of
its kind (or a new module imported below). Every name is re-exported here, so code uses ``ops.<name>``. The
rules read the rounding constants as ``rounding.U32`` etc., so a test can zero them in one place
(``monkeypatch.setattr(ops.rounding, "U32", 0.0)``).
"""

# isort: off
# Importing the modules registers their entries, in this order; rule_for_source tries entries in the order they
# were registered, so keep it: layers, elementwise, activations, normalization, pooling, shape.
from arqc.passes.ops.base import (
    RULES as RULES,
    OpRule as OpRule,
    _PassThrough as _PassThrough,
    aten as aten,
    has_interval as has_interval,
    load_plugins as load_plugins,
    PLUGIN_ENV as PLUGIN_ENV,
    PLUGIN_GROUP as PLUGIN_GROUP,
    matches as matches,
    register as register,
    rule_for_kind as rule_for_kind,
    rule_for_source as rule_for_source,
)
from arqc.passes.ops.rounding import (
    _abs_max as _abs_max,
    _f32 as _f32,
    _u as _u,
    _widen as _widen,
    rounding_margin as rounding_margin,
    unit_roundoff as unit_roundoff,
)
from arqc.passes.ops.layers import (
    BATCHNORM_SOURCES as BATCHNORM_SOURCES,
    Conv2dRule as Conv2dRule,
    LinearRule as LinearRule,
    MatMul as MatMul,
    MatMulRule as MatMulRule,
    _affine_interval as _affine_interval,
    _quantizer_interval as _quantizer_interval,
    layer_operands as layer_operands,
)
from arqc.passes.ops.elementwise import (
    AddRule as AddRule,
    AffineRule as AffineRule,
    ClampRule as ClampRule,
    DivRule as DivRule,
    MulRule as MulRule,
    ReluRule as ReluRule,
    SubRule as SubRule,
    _Binary as _Binary,
    _product_error as _product_error,
    _sum_error as _sum_error,
    add as add,
    affine as affine,
    clamp as clamp,
    div as div,
    mul as mul,
    relu as relu,
    sub as sub,
)
from arqc.passes.ops.activations import (
    GeluRule as GeluRule,
    HardsigmoidRule as HardsigmoidRule,
    HardswishRule as HardswishRule,
    SigmoidRule as SigmoidRule,
    SiluRule as SiluRule,
    TanhRule as TanhRule,
    _Activation as _Activation,
    gelu as gelu,
    hardsigmoid as hardsigmoid,
    hardswish as hardswish,
    sigmoid as sigmoid,
    silu as silu,
    tanh as tanh,
)
from arqc.passes.ops.normalization import (
    LayerNormRule as LayerNormRule,
    NormalizeRule as NormalizeRule,
    SoftmaxRule as SoftmaxRule,
    layer_norm as layer_norm,
    normalize as normalize,
    softmax as softmax,
)
from arqc.passes.ops.pooling import (
    AdaptiveAvgPoolRule as AdaptiveAvgPoolRule,
    AvgPoolRule as AvgPoolRule,
    MaxPoolRule as MaxPoolRule,
    MeanRule as MeanRule,
    _as_tuple as _as_tuple,
    _mean_error as _mean_error,
    _pair as _pair,
    adaptive_avg_pool2d as adaptive_avg_pool2d,
    avg_pool2d as avg_pool2d,
    max_pool2d as max_pool2d,
    mean as mean,
)
from arqc.passes.ops.shape import (
    IDENTITY_SOURCES as IDENTITY_SOURCES,
    CatRule as CatRule,
    FlattenRule as FlattenRule,
    PadRule as PadRule,
    PermuteRule as PermuteRule,
    ReshapeRule as ReshapeRule,
    SliceRule as SliceRule,
    SelectRule as SelectRule,
    RollRule as RollRule,
    ExpandRule as ExpandRule,
    cat as cat,
    flatten as flatten,
    pad as pad,
    permute as permute,
    reshape as reshape,
    slice_ as slice_,
    select as select,
    roll as roll,
    expand as expand,
)
from arqc.passes.ops.quant import RequantRule as RequantRule
from arqc.passes.ops import activations, base, elementwise, layers, normalization, pooling, quant, rounding, shape  # noqa: E402, F401
# isort: on
