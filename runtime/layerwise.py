"""Layer-by-layer comparison of a simulation with its lowered ONNX model in onnxruntime (teacher forcing).

Comparing logits end to end says little about a lowering when the network is chaotic: with float scales, each
runtime sums in its own order, a value within float32 precision of a rounding tie rounds either way, and one
flipped code can grow, layer after layer, into a different output (bench/zoo.py's random-weight networks
disagree with themselves on inputs moved by an ulp). So this check compares one rounding at a time.

Every quantizer of the lowered model (requant grids, layer inputs, second matmul operands) has its uint8 codes
named in the metadata (``arqc.codes``). onnxruntime runs the model with those tensors as extra outputs. The
simulation then runs with each of its quantizers fed what onnxruntime computed before it: it computes its own
codes from its own arithmetic on the runtime's input, records them, and passes the runtime's codes on. Between
two quantizers there is no other rounding, so for a lowering of the same function the codes differ only where
the value being rounded lay within float32 precision of a tie: by one step, rarely. A wrong scale, zero point,
clip or op shows up as many codes off, or off by more than one step, at the quantizer right after it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.fx
from onnx import helper, numpy_helper

from arqc.base import ArqcError
from arqc.passes.lower import OUTPUT_NAME, read_metadata
from arqc.passes.meta import FP32, info, quantizable_nodes
from arqc.passes.quantize import requant_nodes


@dataclass
class Rounding:
    """How one quantizer's codes compare: elements, codes that differ, the largest difference in steps."""

    elements: int = 0
    differing: int = 0
    max_steps: int = 0
    file_scale: float = 0.0  # the step of the file's grid, in which the difference is counted
    sim_scale: float = 0.0  # the simulation's (a lowering writes it as is: the same float32)


@dataclass
class LayerwiseReport:
    roundings: dict[str, Rounding] = field(default_factory=dict)
    logits_cosine: float = 1.0  # the simulation's logits from the runtime's last codes vs the runtime's logits
    logits_max_abs: float = 0.0  # the largest absolute logit difference, same comparison

    @property
    def elements(self) -> int:
        return sum(r.elements for r in self.roundings.values())

    @property
    def differing(self) -> int:
        return sum(r.differing for r in self.roundings.values())

    @property
    def max_steps(self) -> int:
        return max((r.max_steps for r in self.roundings.values()), default=0)

    @property
    def other_grids(self) -> list[str]:
        """Quantizers whose grid in the file has another step than the simulation's."""
        return [k for k, r in self.roundings.items() if np.float32(r.file_scale) != np.float32(r.sim_scale)]

    def worst(self, k: int = 3) -> list[tuple[str, Rounding]]:
        return sorted(self.roundings.items(), key=lambda kv: (-kv[1].max_steps, -kv[1].differing))[:k]


def _dequantizers(model: onnx.ModelProto) -> dict[str, tuple[np.float32, np.ndarray]]:
    """codes tensor → (scale, container zero point) of the DequantizeLinear that reads it."""
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[1] in init and len(n.input) > 2 and n.input[2] in init:
            scale, zero = init[n.input[1]], init[n.input[2]]
            if scale.size == 1:
                out.setdefault(n.input[0], (np.float32(scale), zero.astype(np.int64)))
    return out


def _quantizer_modules(sim: torch.fx.GraphModule) -> dict[str, tuple[torch.nn.Module, str]]:
    """Metadata key → (module, attribute to patch) for each quantizer that rounds in the simulation."""
    out: dict[str, tuple[torch.nn.Module, str]] = {}
    for node in requant_nodes(sim):
        out[node.target] = (sim.get_submodule(node.target), "forward")
    for node in quantizable_nodes(sim):
        m = sim.get_submodule(node.target)
        layer = info(node).layer
        if getattr(m, "a_bits", FP32) < FP32 and not m.grid_input:
            out[layer] = (m, "quantize_input")
        second = getattr(m, "second", None)
        if second is not None and second.bits < FP32 and not second.grid_input:
            out[f"{layer}.second"] = (second, "forward")
    return out


def _session(model: onnx.ModelProto, outputs: list[str], threads: int) -> ort.InferenceSession:
    """onnxruntime at ENABLE_ALL (as deployed) on ``model`` with ``outputs`` as extra graph outputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in outputs:
        if name not in present:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None))
            present.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])


def compare_layerwise(sim: torch.fx.GraphModule, model: onnx.ModelProto, x: torch.Tensor, threads: int = 1,
                      batch: int = 8) -> LayerwiseReport:
    """Compare every rounding of ``sim`` with ``model`` (its lowering) in onnxruntime on the images ``x`` (in
    chunks of ``batch``), each quantizer of the simulation fed the runtime's values before it."""
    codes = read_metadata(model).get("arqc.codes")
    if codes is None:
        raise ArqcError("the ONNX model has no arqc.codes metadata: lower it again with this version of arqc")
    modules = _quantizer_modules(sim)
    missing = sorted(set(modules) - set(codes))
    if missing:
        raise ArqcError(f"the ONNX model names no codes for quantizers {missing[:3]}: it is not this simulation's")
    dequant = _dequantizers(model)
    names = [codes[k] for k in modules]
    session = _session(model, names, threads)
    device = next((p.device for p in sim.parameters()), torch.device("cpu"))
    report = LayerwiseReport()
    runtime_codes: dict[str, torch.Tensor] = {}  # the current chunk's codes, by tensor name

    def forced(key: str, module: torch.nn.Module, original):
        scale, zero = dequant[codes[key]]
        r = report.roundings[key] = Rounding(file_scale=float(scale), sim_scale=float(module.act.scale))

        def run(value: torch.Tensor, *rest) -> torch.Tensor:
            own = original(value, *rest)
            theirs = runtime_codes[codes[key]]
            mine = torch.round(own.double() / float(scale)).long() + int(zero)  # own = (q - z)·s: exact
            steps = (mine - theirs).abs()
            r.elements += steps.numel()
            r.differing += int((steps > 0).sum())
            r.max_steps = max(r.max_steps, int(steps.max()) if steps.numel() else 0)
            # the runtime's value as its DequantizeLinear computes it (for a lowering of this quantizer, the same
            # float32 product the simulation's fake quantizer forms for that code)
            return ((theirs - int(zero)).to(own.dtype) * torch.tensor(scale, dtype=own.dtype))
        return run

    ours, logits = [], []
    with contextlib.ExitStack() as undo, torch.no_grad():
        for key, (module, attr) in modules.items():
            setattr(module, attr, forced(key, module, getattr(module, attr)))  # an instance attribute, removed after
            undo.callback(delattr, module, attr)
        for i in range(0, len(x), batch):
            chunk = x[i:i + batch]
            outputs = session.run([OUTPUT_NAME, *names], {session.get_inputs()[0].name: chunk.numpy()})
            logits.append(outputs[0])
            runtime_codes.update({n: torch.from_numpy(v.astype(np.int64)).to(device)
                                  for n, v in zip(names, outputs[1:], strict=True)})
            ours.append(sim(chunk.to(device)).cpu().numpy())
    a, b = np.concatenate(ours).reshape(-1).astype(np.float64), np.concatenate(logits).reshape(-1).astype(np.float64)
    report.logits_cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))
    report.logits_max_abs = float(np.abs(a - b).max())
    return report


LAYERWISE_IMAGES = 8  # test images ``arqc compile --verify`` checks layer by layer (clean: a cheap check)


def format_layerwise(summary: dict) -> str:
    steps = summary["max_steps"]
    return (f"layer by layer in onnxruntime ({summary['images']} images, each of {summary['quantizers']} "
            f"quantizers fed onnxruntime's values before it): {summary['differing']} of {summary['codes']} codes "
            f"differ, by at most {steps} step{'' if steps == 1 else 's'}")


def check_layers(sim: torch.fx.GraphModule, model: onnx.ModelProto, x: torch.Tensor, log=None) -> dict:
    """The lowering check of ``arqc compile --verify``: :func:`compare_layerwise` on the images ``x`` (logged
    in one line; the summary goes into the report). ArqcError when a code is more than one step from
    onnxruntime's (no float32 near-tie does that), or when a quantizer's grid in the file has another step than
    the simulation's: either way the file does not compute the simulation's function."""
    report = compare_layerwise(sim, model, x)
    summary = {"images": len(x), "codes": report.elements, "differing": report.differing,
               "max_steps": report.max_steps, "quantizers": len(report.roundings),
               "worst": [{"quantizer": k, "elements": r.elements, "differing": r.differing,
                          "max_steps": r.max_steps} for k, r in report.worst(3) if r.differing]}
    if log is not None:
        log(format_layerwise(summary))
    if report.other_grids:
        r = report.roundings[report.other_grids[0]]
        raise ArqcError(f"the ONNX model's quantizer {report.other_grids[0]} has step {r.file_scale!r} where the "
                        f"simulation has {r.sim_scale!r}: the file was changed after lowering or the lowering is "
                        "wrong; nothing written. Please report it with the model")
    if report.max_steps > 1:
        key, worst = report.worst(1)[0]
        raise ArqcError(f"the ONNX model's quantizer {key} differs from the simulation's by {worst.max_steps} steps "
                        f"on {worst.differing} of {worst.elements} codes, fed the same input: the lowering is wrong "
                        "there; nothing written. Please report it with the model")
    return summary
