"""Lowering pass: a simulated (passes/quantize.py) graph to a QDQ ONNX model written by arqc itself.

Every node is emitted by its registry entry (passes/ops/); quantizable layers get
- input:  QuantizeLinear → [integer Clip to the b-bit range, when b < 8] → DequantizeLinear (per tensor);
- weight: integers already rounded and clamped to the b-bit range, in an 8-bit container (or a native INT4
  container for b ≤ 4 when asked) → DequantizeLinear (per output channel);
- bias:   int32 → DequantizeLinear with scale s_x·s_w when input and weight are quantized, else float.
For 8-bit layers this is the pattern onnxruntime fuses into integer kernels (QLinearConv) at ENABLE_ALL.
The policy, calibration and compile settings go into ``metadata_props`` (keys in METADATA_KEYS).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch
import torch.fx
from onnx import TensorProto, helper, numpy_helper

from arqc.base import ArqcError, __version__
from arqc.passes import ops
from arqc.passes.capture import get_attr
from arqc.passes.meta import FP32, ActQuant, info, quantizable_nodes
from arqc.passes.quantize import INT32_BOUND, QuantLayer

OPSET = 21
INPUT_NAME, OUTPUT_NAME = "input", "logits"
METADATA_KEYS = ("arqc.version", "arqc.policy", "arqc.calibration", "arqc.settings", "arqc.layers")


class OnnxBuilder:
    """What registry entries use to emit ONNX: nodes, constants, and the Q/DQ operands of a layer."""

    def __init__(self, gm: torch.fx.GraphModule, int4_weights: bool = False):
        self.gm = gm
        self.int4_weights = int4_weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.layer_nodes: dict[str, str] = {}
        self._names: set[str] = set()

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

    def quantize_activation(self, x: str, act: ActQuant, name: str) -> str:
        dtype = np.int8 if act.signed else np.uint8
        scale = self.const(np.float32(act.scale), f"{name}_x_scale")
        zero = self.const(dtype(act.zero_point), f"{name}_x_zero_point")
        q = self.op("QuantizeLinear", [x, scale, zero], f"{name}_x_q")
        if act.bits < 8:
            # the 8-bit container saturates at 8 bits only: clamp the integers to the b-bit range. Clamping
            # after QuantizeLinear, in the integer domain, is exact (clamp∘saturate∘round) and leaves the
            # producer's Conv → QuantizeLinear adjacent, so onnxruntime still fuses it into QLinearConv
            # (a float Clip in front of QuantizeLinear blocked that fusion)
            q = self.op("Clip", [q, self.const(dtype(act.qmin), f"{name}_x_qmin"),
                                 self.const(dtype(act.qmax), f"{name}_x_qmax")], f"{name}_x_clip")
        return self.op("DequantizeLinear", [q, scale, zero], f"{name}_x_dq")

    def layer_operands(self, node: torch.fx.Node, x: str) -> tuple[str, str, str | None]:
        """Names of the (dequantized) input, weight and bias of a conv/linear layer."""
        m = self.module(node)
        name = node.name
        self.layer_nodes[info(node).layer] = name
        quant = isinstance(m, QuantLayer)
        if quant and m.a_bits < FP32:
            x = self.quantize_activation(x, m.act, name)
        if quant and m.w_bits < FP32:
            w = self._dequantized_weight(m, name)
        else:
            w = self.const(m.weight.detach().numpy().astype(np.float32), f"{name}_weight")
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

    def _dequantized_weight(self, m: QuantLayer, name: str) -> str:
        qmax = 2 ** (m.w_bits - 1) - 1
        scale = m.weight_scale()
        w_int = torch.round(m.weight.detach() / scale).clamp(-qmax, qmax).to(torch.int8).numpy()
        channels = w_int.shape[0]
        if self.int4_weights and m.w_bits <= 4:
            w = self._unique(f"{name}_weight_int4")
            self.initializers[w] = helper.make_tensor(w, TensorProto.INT4, w_int.shape, w_int.flatten().tolist())
            zero = self._unique(f"{name}_weight_zero_point")
            self.initializers[zero] = helper.make_tensor(zero, TensorProto.INT4, [channels], [0] * channels)
        else:
            w = self.const(w_int, f"{name}_weight_int{m.w_bits}")
            zero = self.const(np.zeros(channels, np.int8), f"{name}_weight_zero_point")
        s = self.const(scale.flatten().numpy().astype(np.float32), f"{name}_weight_scale")
        return self.op("DequantizeLinear", [w, s, zero], f"{name}_weight_dq", axis=0)


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
            args = torch.fx.node.map_arg(node.args, lambda n: values[n])
            try:
                values[node] = ops.RULES[info(node).kind].lower(b, node, args)
            except NotImplementedError as err:
                raise ArqcError(f"cannot lower node '{node.name}' to ONNX: {err}; rewrite that part of the "
                                "model or extend its entry in passes/ops/") from None
    graph = helper.make_graph(b.nodes, name, inputs, outputs, list(b.initializers.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="arqc")
    model.ir_version = 10
    _set_metadata(model, sim, b.layer_nodes, settings or {})
    onnx.checker.check_model(model, full_check=True)
    return model


def _set_metadata(model: onnx.ModelProto, sim: torch.fx.GraphModule, layer_nodes: dict, settings: dict) -> None:
    policy, calibration = {}, {}
    for node in quantizable_nodes(sim):
        meta = info(node)
        policy[meta.layer] = {"w_bits": meta.w_bits, "a_bits": meta.a_bits}
        if meta.act is not None:
            calibration[meta.layer] = vars(meta.act)
    props = {"arqc.version": __version__, "arqc.policy": policy, "arqc.calibration": calibration,
             "arqc.settings": settings, "arqc.layers": layer_nodes}
    onnx.helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()})


def read_metadata(model: onnx.ModelProto) -> dict:
    """The arqc metadata of an ONNX model, JSON values decoded ({} when it was not written by arqc)."""
    out = {}
    for prop in model.metadata_props:
        if prop.key.startswith("arqc."):
            try:
                out[prop.key] = json.loads(prop.value)
            except json.JSONDecodeError:
                out[prop.key] = prop.value
    return out
