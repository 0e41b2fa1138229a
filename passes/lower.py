"""Lowering pass: a simulated (passes/quantize.py) graph to a QDQ ONNX model written by arqc itself.

Every node is emitted by its registry entry (passes/ops/); quantizable layers get
- input:  [float Clip to the b-bit grid's range, when b < 8] → QuantizeLinear → DequantizeLinear (per tensor,
  uint8 container); an input that already lies on the layer's 8-bit grid (a_bits = 8 after a requant node)
  is that grid's DequantizeLinear, and one on an 8-bit grid below 8 bits goes Add(x, 0) → QuantizeLinear
  [→ integer Clip] → DequantizeLinear, which onnxruntime runs as one QLinearAdd;
- weight: integers already rounded and clamped to the b-bit range, in an 8-bit container (or a native INT4
  container for b ≤ 4 when asked) → DequantizeLinear (per output channel);
- bias:   int32 → DequantizeLinear with scale s_x·s_w when input and weight are quantized, else float.
A requant node (integer-only inference, DESIGN §2) is QuantizeLinear → DequantizeLinear on its 8-bit grid.
Every consumer that onnxruntime can run as an integer kernel (conv, linear, add, concat, pools) reads a value
on a grid through a DequantizeLinear of its own, re-quantizing with the same parameters (exact) where an op
that keeps the grid (max pool, flatten, reshape, permute, slice, pad) came in between. That is the pattern
onnxruntime fuses at ENABLE_ALL: DQ → Conv [→ Relu] → Q becomes QLinearConv, DQ → Add → Q QLinearAdd, and so
on. An add reads each grid operand through one more exact Q → DQ pair, which keeps OpenVINO from dropping a
rounding (:meth:`OnnxBuilder.add_operand`): both runtimes compute the one function of DESIGN §2.
The policy, calibration, grids, semantics version and compile settings go into ``metadata_props`` (keys in
METADATA_KEYS), with the name of each quantizer's uint8 codes tensor (``arqc.codes``: keyed like
``arqc.calibration`` and ``arqc.requant``), which runtime/layerwise.py reads to compare a runtime with the
simulation one rounding at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.fx
from onnx import TensorProto, helper, numpy_helper

from arqc.base import ArqcError, __version__
from arqc.passes import ops
from arqc.passes.capture import get_attr
from arqc.passes.meta import FP32, SEMANTICS, ActQuant, check_semantics, info, quantizable_nodes
from arqc.passes.quantize import INT32_BOUND, REQUANTIZED_OPS, QuantLayer, requant_nodes

OPSET = 21
INPUT_NAME, OUTPUT_NAME = "input", "logits"
METADATA_KEYS = ("arqc.version", "arqc.semantics", "arqc.policy", "arqc.calibration", "arqc.requant",
                 "arqc.settings", "arqc.layers", "arqc.codes")
# The kinds whose operands on a grid go through their own DequantizeLinear (see the module docstring).
INTEGER_CONSUMERS = ("conv2d", "linear", "matmul", "max_pool2d", *REQUANTIZED_OPS)


@dataclass
class _Grid:
    """The 8-bit grid an ONNX value lies on: its parameters' initializers, and the integers when the value is a
    DequantizeLinear output (None when an op that keeps the grid produced it)."""

    scale: str
    zero: str
    q: str | None
    spare: bool = False  # the DequantizeLinear output is not yet read by an integer consumer


class OnnxBuilder:
    """What registry entries use to emit ONNX: nodes, constants, and the Q/DQ operands of a layer."""

    def __init__(self, gm: torch.fx.GraphModule, int4_weights: bool = False):
        self.gm = gm
        self.int4_weights = int4_weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.layer_nodes: dict[str, str] = {}
        self._names: set[str] = set()
        self.grids: dict[str, _Grid] = {}  # ONNX value → the 8-bit grid it lies on
        self.grid_params: dict[str, tuple[str, str]] = {}  # requant target → (scale, zero point) initializers
        self.codes: dict[str, str] = {}  # quantizer (as in the metadata) → the uint8 codes DequantizeLinear reads

    def _unique(self, hint: str) -> str:
        name, k = hint, 1
        while name in self._names:
            name, k = f"{hint}_{k}", k + 1
        self._names.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        out = self._unique(name)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def const(self, array, name: str) -> str:
        name = self._unique(name)
        self.initializers[name] = numpy_helper.from_array(np.asarray(array), name)
        return name

    def shape(self, node: torch.fx.Node) -> tuple[int, ...]:
        return tuple(node.meta["tensor_meta"].shape)

    def module(self, node: torch.fx.Node) -> torch.nn.Module:
        return self.gm.get_submodule(node.target)

    def _act_params(self, act: ActQuant, name: str) -> tuple[str, str]:
        """Initializers of a quantizer's scale and zero point. Every activation goes in a uint8 container; a
        signed grid's zero point is shifted by 128 (the same real values): onnxruntime's x86 integer kernels
        take uint8 activations, and its own int8 → uint8 conversion skips tensors that several ops read or
        that are clamped below 8 bits, which left such convs and adds float."""
        zero = act.zero_point + (128 if act.signed else 0)
        return self.const(np.float32(act.scale), f"{name}_scale"), self.const(np.uint8(zero), f"{name}_zero_point")

    def requantize(self, x: str, grid: str, act: ActQuant, name: str) -> str:
        """``x`` on the 8-bit grid ``act`` of the requant module ``grid``: QuantizeLinear → DequantizeLinear."""
        scale, zero = self.grid_params[grid] = self._act_params(act, name)
        q = self.codes[grid] = self.op("QuantizeLinear", [x, scale, zero], f"{name}_q")
        dq = self.op("DequantizeLinear", [q, scale, zero], f"{name}_dq")
        self.grids[dq] = _Grid(scale, zero, q, spare=True)
        return dq

    def keep_grid(self, value: str, grid: str) -> None:
        """Record that ``value`` lies on the grid of the requant module ``grid`` (an op that keeps it made it)."""
        scale, zero = self.grid_params[grid]
        self.grids[value] = _Grid(scale, zero, None)

    def integer_operand(self, x: str) -> str:
        """``x`` as the output of a DequantizeLinear of its own when it lies on a grid, else ``x`` itself."""
        g = self.grids.get(x)
        if g is None:
            return x
        if g.spare:
            g.spare = False
            return x
        q = g.q
        if q is None:  # an op that keeps the grid came in between: the same parameters give the integers back
            q = self.op("QuantizeLinear", [x, g.scale, g.zero], f"{x}_q")
        dq = self.op("DequantizeLinear", [q, g.scale, g.zero], f"{x}_dq")
        self.grids[dq] = _Grid(g.scale, g.zero, q)
        return dq

    def add_operand(self, x: str) -> str:
        """An add's operand: on a grid, its own DequantizeLinear then QuantizeLinear → DequantizeLinear with the
        same parameters again (exact: the integers come back unchanged). OpenVINO's CPU plugin fuses an add
        into the conv that produces one operand (a oneDNN sum post-op) and skips the rounding of the
        requantization right before the sum, so without the repeat it computed the add of the unrounded
        conv output (measured: 99.2 % top-1 agreement with W8A8 po2 ResNet-20, 79.7 % at the 1.5625 %
        policy; bit-identical with it). onnxruntime drops a repeated pair with equal parameters
        (DoubleQDQPairsRemover, exact) and still fuses DQ → Add → Q into QLinearAdd."""
        dq = self.integer_operand(x)
        g = self.grids.get(dq)
        if g is None:
            return dq
        q = self.op("QuantizeLinear", [dq, g.scale, g.zero], f"{dq}_again_q")
        return self.op("DequantizeLinear", [q, g.scale, g.zero], f"{dq}_again_dq")

    def quantize_activation(self, x: str, act: ActQuant, name: str, key: str) -> str:
        """A layer's input quantizer: [Clip] → QuantizeLinear → DequantizeLinear. Below 8 bits the container
        saturates at 8 bits only, so a float Clip to the b-bit grid's real range [(qmin - z)·s, (qmax - z)·s]
        comes first: exact, since x/s at a clamp bound is within float32 rounding of qmin - z or qmax - z and
        rounds to it. In front of QuantizeLinear it stays layout-agnostic (an integer Clip after it made
        onnxruntime wrap every layer in Transposes, and for signed grids kept the conv float). An input on an
        8-bit grid is requantized by an integer kernel instead (:meth:`_requantize_grid`).
        With a nonzero container zero point the value is rounded first, Div(x, s) → Round → Mul(·, s): OpenVINO's
        QuantizeLinear rounds x/s + z in float32 where ONNX specifies round(x/s) + z, so a value within float32
        precision of z plus a tie took the even neighbour there (2 of 1,000 noisy images at W4A4 po2 came out one
        step apart). Round is half to even like QuantizeLinear, and QuantizeLinear then divides a multiple of s
        by s, which is within an ulp of an integer in any order: the same function, in every runtime."""
        g = self.grids.get(x)
        if act.bits < 8 and g is not None and g.q is not None:
            return self._requantize_grid(x, g, act, name, key)
        scale, zero = self._act_params(act, f"{name}_x")
        if act.bits < 8:
            low, high = (np.float32(act.scale) * np.float32(v - act.zero_point) for v in (act.qmin, act.qmax))
            x = self.op("Clip", [x, self.const(low, f"{name}_x_min"), self.const(high, f"{name}_x_max")],
                        f"{name}_x_clip")
        if numpy_helper.to_array(self.initializers[zero]) != 0:
            x = self.op("Mul", [self.op("Round", [self.op("Div", [x, scale], f"{name}_x_steps")], f"{name}_x_round"),
                                scale], f"{name}_x_rounded")
        q = self.codes[key] = self.op("QuantizeLinear", [x, scale, zero], f"{name}_x_q")
        return self.op("DequantizeLinear", [q, scale, zero], f"{name}_x_dq")

    def _requantize_grid(self, x: str, g: _Grid, act: ActQuant, name: str, key: str) -> str:
        """``x``, the DequantizeLinear output of an 8-bit grid, on the b-bit grid ``act`` (b < 8) of a layer's
        input: Add(x, 0) → QuantizeLinear [→ integer Clip] → DequantizeLinear. In the QDQ graph as written the
        add of a dequantized zero is exact and the Clip after QuantizeLinear equals the float Clip before it,
        so this is the function of the float path; onnxruntime fuses DQ → Add → Q into one QLinearAdd on the
        integers, where DQ → Clip → Q ran three float passes over the tensor (the 1.5625 % ResNet-20 policy
        went from 0.84x to 0.99-1.07x of W8A8 in bench/lowering.py).
        - Ties: QLinearAdd rounds x/s + z half to even, QuantizeLinear x/s. They agree when z is even, so an odd
          container zero point is moved by one, with the same real values: DequantizeLinear subtracts it again,
          and the b-bit range (at most 128 codes) stays inside the container, away from its saturation.
        - The Clip to the b-bit range is left out when no code of the 8-bit grid, dequantized in float32 and
          divided by the b-bit scale, comes within 1e-3 of rounding outside the range (unsigned grids with zero
          point 0 on both sides, as after every ReLU, never do): then it could never change a value."""
        s8 = np.float32(numpy_helper.to_array(self.initializers[g.scale]))
        z8 = numpy_helper.to_array(self.initializers[g.zero]).astype(np.float32)
        index = (s8 * (np.arange(256, dtype=np.float32) - z8)).astype(np.float64) / np.float32(act.scale)
        low, high = act.qmin - act.zero_point, act.qmax - act.zero_point
        clip = index.min() < low - 0.5 + 1e-3 or index.max() > high + 0.5 - 1e-3
        zero = act.zero_point + (128 if act.signed else 0)
        zero -= zero % 2  # signed: at least 128 - 64 - 1 after the move, so the b-bit codes stay in 0..255
        scale = self.const(np.float32(act.scale), f"{name}_x_scale")
        zero_point = self.const(np.uint8(zero), f"{name}_x_zero_point")
        nothing = self.const(np.uint8(0), f"{name}_x_zero")
        added = self.op("Add", [x, self.op("DequantizeLinear", [nothing, g.scale, nothing], f"{name}_x_zero_dq")],
                        f"{name}_x_requant")
        q = self.op("QuantizeLinear", [added, scale, zero_point], f"{name}_x_q")
        if clip:
            codes = [self.const(np.uint8(zero + v), f"{name}_x_{end}") for v, end in ((low, "min"), (high, "max"))]
            q = self.op("Clip", [q, *codes], f"{name}_x_clip")
        self.codes[key] = q
        return self.op("DequantizeLinear", [q, scale, zero_point], f"{name}_x_dq")

    def layer_operands(self, node: torch.fx.Node, x: str, transposed: bool = False) -> tuple[str, str, str | None]:
        """Names of the (dequantized) input, weight and bias of a conv/linear layer; ``transposed``: a linear
        layer's weight as the (in, out) matrix of a MatMul, its per-channel scales along axis 1."""
        m = self.module(node)
        name = node.name
        x = self._layer_input(node, m, x)
        quant = isinstance(m, QuantLayer)
        if quant and m.w_bits < FP32:
            w = self._dequantized_weight(m, name, transposed)
        else:
            weight = m.weight.detach().numpy().astype(np.float32)
            w = self.const(weight.T.copy() if transposed else weight, f"{name}_weight")
        if m.bias is None:
            return x, w, None
        bias_scale = m.bias_scale() if quant else None
        if bias_scale is None:
            return x, w, self.const(m.bias.detach().numpy().astype(np.float32), f"{name}_bias")
        scale = bias_scale.detach().numpy().astype(np.float32)
        # the simulation rounds in float32: use its integers so both compute the same function
        b_int = torch.round(m.bias.detach() / bias_scale).clamp(-INT32_BOUND, INT32_BOUND).numpy()
        b = self.const(b_int.astype(np.int32), f"{name}_bias_int32")
        s = self.const(scale, f"{name}_bias_scale")
        z = self.const(np.zeros_like(b_int, dtype=np.int32), f"{name}_bias_zero_point")
        return x, w, self.op("DequantizeLinear", [b, s, z], f"{name}_bias_dq", axis=0)

    def _layer_input(self, node: torch.fx.Node, m: torch.nn.Module, x: str) -> str:
        """A layer's (first) input through its quantizer; records the layer's node name."""
        self.layer_nodes[info(node).layer] = node.name
        if isinstance(m, QuantLayer) and m.a_bits < FP32 and not m.grid_input:  # a grid input: its grid's DQ
            x = self.quantize_activation(x, m.act, node.name, info(node).layer)
        return x

    def matmul_operands(self, node: torch.fx.Node, a: str, b: str) -> tuple[str, str]:
        """Names of the (dequantized) operands of a matmul layer: the first through the layer's input quantizer,
        the second through its own (w_bits, per tensor)."""
        m = self.module(node)
        a = self._layer_input(node, m, a)
        second = getattr(m, "second", None)
        if second is not None and second.bits < FP32 and not second.grid_input:
            b = self.quantize_activation(b, second.act, f"{node.name}_second", f"{info(node).layer}.second")
        return a, b

    def _dequantized_weight(self, m: QuantLayer, name: str, transposed: bool = False) -> str:
        qmax = 2 ** (m.w_bits - 1) - 1
        scale = m.weight_scale()
        w_int = torch.round(m.weight.detach() / scale).clamp(-qmax, qmax).to(torch.int8).numpy()
        channels = w_int.shape[0]
        if transposed:
            w_int = w_int.T.copy()
        if self.int4_weights and m.w_bits <= 4:
            w = self._unique(f"{name}_weight_int4")
            self.initializers[w] = helper.make_tensor(w, TensorProto.INT4, w_int.shape, w_int.flatten().tolist())
            zero = self._unique(f"{name}_weight_zero_point")
            self.initializers[zero] = helper.make_tensor(zero, TensorProto.INT4, [channels], [0] * channels)
        else:
            w = self.const(w_int, f"{name}_weight_int{m.w_bits}")
            zero = self.const(np.zeros(channels, np.int8), f"{name}_weight_zero_point")
        s = self.const(scale.flatten().numpy().astype(np.float32), f"{name}_weight_scale")
        return self.op("DequantizeLinear", [w, s, zero], f"{name}_weight_dq", axis=1 if transposed else 0)


def lower(sim: torch.fx.GraphModule, settings: dict | None = None, int4_weights: bool = False,
          name: str = "arqc") -> onnx.ModelProto:
    """The ONNX model of a simulated graph; ``settings`` (JSON-able) go into the metadata."""
    b = OnnxBuilder(sim, int4_weights)
    values: dict[torch.fx.Node, str] = {}
    inputs, outputs = [], []
    for node in sim.graph.nodes:
        if node.op == "placeholder":
            shape = ["batch", *b.shape(node)[1:]]
            inputs.append(helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, shape))
            b._names.add(INPUT_NAME)
            values[node] = INPUT_NAME
        elif node.op == "get_attr":
            values[node] = b.const(get_attr(sim, node.target).detach().numpy().astype(np.float32), node.target)
        elif node.op == "output":
            src = values[node.args[0]]
            b.nodes.append(helper.make_node("Identity", [src], [OUTPUT_NAME], name="output"))
            shape = ["batch", *b.shape(node.args[0])[1:]]
            outputs.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, shape))
        else:
            meta = info(node)
            operand = (b.add_operand if meta.kind == "add" else b.integer_operand if meta.kind in INTEGER_CONSUMERS
                       else (lambda name: name))
            args = torch.fx.node.map_arg(node.args, lambda n, operand=operand: operand(values[n]))
            try:
                values[node] = ops.RULES[meta.kind].lower(b, node, args)
            except NotImplementedError as err:
                raise ArqcError(f"cannot lower node '{node.name}' to ONNX: {err}; rewrite that part of the "
                                "model or extend its entry in passes/ops/") from None
            if meta.grid is not None and meta.kind != "requant":
                b.keep_grid(values[node], meta.grid)
    graph = helper.make_graph(b.nodes, name, inputs, outputs, list(b.initializers.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="arqc")
    model.ir_version = 10
    _set_metadata(model, sim, b.layer_nodes, b.codes, settings or {})
    onnx.checker.check_model(model, full_check=True)
    return model


def _set_metadata(model: onnx.ModelProto, sim: torch.fx.GraphModule, layer_nodes: dict, codes: dict,
                  settings: dict) -> None:
    policy, calibration = {}, {}
    for node in quantizable_nodes(sim):
        meta = info(node)
        policy[meta.layer] = {"w_bits": meta.w_bits, "a_bits": meta.a_bits}
        if meta.act is not None:
            calibration[meta.layer] = vars(meta.act)
        if meta.second is not None:
            calibration[f"{meta.layer}.second"] = vars(meta.second)
    requant = {node.target: vars(info(node).act) for node in requant_nodes(sim)}
    props = {"arqc.version": __version__, "arqc.semantics": SEMANTICS, "arqc.policy": policy,
             "arqc.calibration": calibration, "arqc.requant": requant, "arqc.settings": settings,
             "arqc.layers": layer_nodes, "arqc.codes": codes}
    onnx.helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()})


def read_metadata(model: onnx.ModelProto, what: str = "the ONNX model") -> dict:
    """The arqc metadata of an ONNX model, JSON values decoded ({} when it was not written by arqc). A model
    arqc wrote under other quantization semantics is refused (ArqcError naming ``what``): its metadata
    describes another function."""
    out = {}
    for prop in model.metadata_props:
        if prop.key.startswith("arqc."):
            try:
                out[prop.key] = json.loads(prop.value)
            except json.JSONDecodeError:
                out[prop.key] = prop.value
    if out:
        check_semantics(out.get("arqc.semantics"), what)
    return out



# Metadata added after lowering, once the lowered bytes are certified: the certificates and the compile report.
CERTIFICATE_KEYS = ("arqc.certificate_l2", "arqc.certificate_linf", "arqc.report")


def attach(model: onnx.ModelProto, props: dict) -> None:
    """Add (or replace) ``CERTIFICATE_KEYS`` entries (JSON-able values) after the lowering's metadata, so that
    :func:`certified_bytes` gives back the bytes they were computed on."""
    unknown = set(props) - set(CERTIFICATE_KEYS)
    if unknown:
        raise ValueError(f"not certificate metadata: {sorted(unknown)}")
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    for key, value in kept + [(k, json.dumps(v)) for k, v in props.items()]:
        model.metadata_props.add(key=key, value=value)


def certified_bytes(model: onnx.ModelProto) -> bytes:
    """The serialized model without ``CERTIFICATE_KEYS`` metadata: the bytes arqc certified (their sha256 is
    the certificate's backend fingerprint)."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    kept = [(p.key, p.value) for p in bare.metadata_props if p.key not in CERTIFICATE_KEYS]
    del bare.metadata_props[:]
    for key, value in kept:
        bare.metadata_props.add(key=key, value=value)
    return bare.SerializeToString()
