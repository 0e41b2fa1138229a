"""Rebuild the simulated (fake-quantized) graph of an ONNX model that arqc lowered, from the file itself.

The metadata gives the policy, each layer's activation quantizer, each requant node's grid and the model's
source (checkpoint and
arch, for the graph's structure); the weights, weight scales and biases are read back from the ONNX
initializers, so a fine-tuned model is rebuilt as it was deployed, with its scales exactly as stored.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.fx
from onnx import numpy_helper

from arqc.base import ArqcError
from arqc.passes.lower import read_metadata
from arqc.passes.meta import ActQuant, info, quantizable_nodes
from arqc.passes.policy import apply_policy, policy_from_json
from arqc.passes.quantize import link_grids, requant_nodes, simulate
from arqc.pipeline import prepare_model
from arqc.settings import CompileSettings


def simulation_from_onnx(path: str, source: str | None = None, trust_pickle: bool = False
                         ) -> tuple[torch.fx.GraphModule, dict]:
    """(simulated graph, arqc metadata) of an arqc ONNX model; ``source`` overrides the recorded checkpoint."""
    try:
        model = onnx.load(path)
    except Exception as err:  # DecodeError, OSError, ...
        raise ArqcError(f"cannot read {path} as an ONNX model ({type(err).__name__}); check the path") from None
    meta = read_metadata(model, path)
    if "arqc.settings" not in meta or "arqc.layers" not in meta:
        raise ArqcError(f"{path} was not lowered by arqc (no arqc metadata); give the model it came from "
                        "with --arch and --policy/--bits instead")
    settings = CompileSettings.from_json(meta["arqc.settings"])
    prep = prepare_model(source or settings.source, settings.arch, trust_pickle, tuple(settings.input_shape))
    apply_policy(prep.gm, policy_from_json(meta["arqc.policy"]))
    sim = simulate(prep.gm, [torch.zeros(1, *settings.input_shape)], scales=settings.scales)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    by_name = {n.name: n for n in model.graph.node}
    grids = meta.get("arqc.requant", {})
    for node in requant_nodes(sim):
        if node.target not in grids:
            raise ArqcError(f"{path} has no grid for {node.target} in its metadata; the ONNX model was changed "
                            "after arqc wrote it")
        sim.get_submodule(node.target).act = ActQuant(**grids[node.target])
    for node in quantizable_nodes(sim):
        layer = info(node).layer
        m = sim.get_submodule(node.target)
        if layer in meta["arqc.calibration"]:
            m.act = ActQuant(**meta["arqc.calibration"][layer])
        if f"{layer}.second" in meta["arqc.calibration"]:
            m.second.act = ActQuant(**meta["arqc.calibration"][f"{layer}.second"])
        if info(node).kind == "matmul":  # no weights
            continue
        onnx_node = by_name[meta["arqc.layers"][layer]]
        bias = onnx_node.input[2] if len(onnx_node.input) > 2 and onnx_node.input[2] else None
        if onnx_node.op_type in ("MatMul", "Add"):  # a linear layer on tokens: MatMul(x, Wᵀ) [→ Add(bias)]
            if onnx_node.op_type == "Add":
                bias, onnx_node = onnx_node.input[1], producers[onnx_node.input[0]]
            weight, scale = _operand(onnx_node.input[1], values, producers, axis=1)
            weight = weight.T
        else:
            weight, scale = _operand(onnx_node.input[1], values, producers)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)).reshape(m.weight.shape))
            if scale is not None:
                m.fixed_weight_scale = torch.from_numpy(scale).reshape((-1,) + (1,) * (m.weight.dim() - 1))
            if bias is not None:
                m.bias.copy_(torch.from_numpy(_operand(bias, values, producers)[0]))
    link_grids(sim)
    return sim, meta


def _operand(name: str, values: dict, producers: dict, axis: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """A layer input as float32 (and its per-channel scale, along ``axis``, when it comes from a
    DequantizeLinear)."""
    if name in values:
        return values[name].astype(np.float32), None
    dq = producers[name]
    if dq.op_type != "DequantizeLinear":
        raise ArqcError(f"unexpected {dq.op_type} feeding a layer; the ONNX model was changed after arqc wrote it")
    q = values[dq.input[0]].astype(np.int64)
    scale = values[dq.input[1]].astype(np.float32)
    zero = values[dq.input[2]].astype(np.int64) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
    shape = [1] * q.ndim
    shape[axis] = -1
    return ((q - zero.reshape(shape)).astype(np.float32) * scale.reshape(shape)).astype(np.float32), scale
