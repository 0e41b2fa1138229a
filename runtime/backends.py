"""Executors: a backend maps a float32 NCHW batch of [0, 1] pixels to float32 logits [B, K].

The model's normalization lives inside the model. Backends run inputs in chunks of at most
``batch_size`` rows. Adding a backend is one subclass of ``Backend`` that implements ``_run``
(one chunk) and ``fingerprint``. ONNX models run in onnxruntime or OpenVINO (``RUNTIMES``): the same file,
certified in the runtime it is deployed to.
"""

from __future__ import annotations

import abc
import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from arqc.base import ArqcError
from arqc.passes.quantize import quant_state
from arqc.runtime.devices import resolve_device

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class Backend(abc.ABC):
    """A classifier that can be queried on numpy batches; ``name`` says which executor runs it."""

    name: str
    runtime: str  # the executor in words (version, settings): what a certificate computed here holds for
    batch_size: int
    fixed_batch: int | None = None  # a model with a fixed batch dimension: every chunk is padded to it

    def __init__(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ArqcError(f"backend batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def _fix_batch(self, fixed) -> None:
        """Record a fixed batch dimension (a positive int; anything else means dynamic): chunks take its size."""
        self.fixed_batch = fixed if isinstance(fixed, int) and fixed > 0 else None
        if self.fixed_batch is not None:
            self.batch_size = self.fixed_batch

    @abc.abstractmethod
    def _run(self, x: np.ndarray) -> np.ndarray:
        """Logits of one chunk of at most ``batch_size`` rows."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """sha256 hex digest that identifies the model (its weights and structure)."""

    def logits(self, x: np.ndarray) -> np.ndarray:
        """float32 logits [B, K] of a float32 batch [B, C, H, W]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4:
            raise ArqcError(f"backend input must be a batch [B, C, H, W], got shape {tuple(x.shape)}")
        chunks = [self._padded_run(x[i : i + self.batch_size]) for i in range(0, max(len(x), 1), self.batch_size)]
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def _padded_run(self, x: np.ndarray) -> np.ndarray:
        """``_run`` of a chunk, padded with zero rows to a fixed batch dimension and cut back."""
        rows = len(x)
        if self.fixed_batch is not None and rows < self.fixed_batch:
            x = np.concatenate([x, np.zeros((self.fixed_batch - rows, *x.shape[1:]), np.float32)])
        return self._run(x)[:rows]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """int64 top class of every row of a batch [B, C, H, W]."""
        return self.logits(x).argmax(axis=1).astype(np.int64)

    def recipe(self) -> BackendRecipe:
        """What rebuilds this backend in another process (a Ray worker): :meth:`BackendRecipe.build`."""
        raise ArqcError(f"the {self.name} backend cannot be shipped to Ray workers; certify it without --ray")


@dataclass(frozen=True)
class BackendRecipe:
    """A picklable description of a backend: ``kind`` (a ``RUNTIMES`` name, "torch" or "compare"), the model
    (ONNX bytes, an nn.Module, or for "compare" the (primary, reference) recipes), the batch size and the
    options of the backend's class. ``threads`` None means: as many as the process building it is given."""

    kind: str
    model: Any
    batch_size: int
    options: dict
    key: str  # identifies the model and the settings: a worker builds each recipe once

    def build(self, threads: int | None = None) -> Backend:
        o = self.options
        if self.kind == "compare":
            primary, reference = self.model
            return ComparingBackend(primary.build(threads), reference.build(threads), o["label"])
        if self.kind == "torch":
            if o["threads"] or threads:
                torch.set_num_threads(o["threads"] or threads)
            return TorchBackend(self.model, batch_size=self.batch_size, device=o["device"])
        return runtime_backend(self.kind, self.model, batch_size=self.batch_size, threads=o["threads"] or threads,
                               ort_opt=o.get("ort_opt", "all"))


class TorchBackend(Backend):
    """A torch.nn.Module in eval mode under inference_mode, on cuda when available unless ``device`` says.

    The caller's module stays on its device: a module elsewhere is copied to ``device``, so that building a
    GPU backend of a model does not move the model under code that still runs it on the CPU."""

    name = "torch"

    def __init__(self, module: torch.nn.Module, batch_size: int = 400, device: str | None = None) -> None:
        super().__init__(batch_size)
        self.device = resolve_device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # where .to("cuda") puts tensors
        if any(t.device != self.device for t in [*module.parameters(), *module.buffers()]):
            module = copy.deepcopy(module).to(self.device)
        self.module = module.eval()
        self.runtime = f"torch {torch.__version__} ({self.device})"

    def recipe(self) -> BackendRecipe:
        return BackendRecipe("torch", self.module, self.batch_size, {"device": str(self.device), "threads": None},
                             key=f"torch:{self.fingerprint()}:{self.batch_size}:{self.device}")

    def _run(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.module(torch.from_numpy(x).to(self.device))
        return out.float().cpu().numpy()

    def fingerprint(self) -> str:
        """sha256 of the module's class name, every state_dict entry (name, dtype, shape, bytes) and, for a
        simulation, its quantizers (bits, grids, activation parameters) and quantization semantics."""
        h = hashlib.sha256(type(self.module).__qualname__.encode())
        h.update(quant_state(self.module).encode())  # "" for a float model: its fingerprint is unchanged
        for key, value in self.module.state_dict().items():
            h.update(key.encode())
            if isinstance(value, torch.Tensor) and not value.is_quantized:
                t = value.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(value).encode())
        return h.hexdigest()


class OrtBackend(Backend):
    """An ONNX model run by onnxruntime on the CPUExecutionProvider.

    ``model`` is a path, serialized bytes or an onnx.ModelProto. ``opt_level`` is one of
    disable|basic|extended|all. A fixed batch dimension is handled by padding the last chunk.
    """

    name = "onnxruntime"

    def __init__(
        self,
        model: str | Path | bytes | onnx.ModelProto,
        batch_size: int = 400,
        opt_level: str = "all",
        intra_op_threads: int | None = None,
        optimized_model_path: str | None = None,
    ) -> None:
        super().__init__(batch_size)
        if opt_level not in OPT_LEVELS:
            raise ArqcError(f"unknown opt_level {opt_level!r}; use one of {', '.join(OPT_LEVELS)}")
        self.model_bytes = _model_bytes(model)
        self.opt_level, self.threads = opt_level, intra_op_threads
        options = ort.SessionOptions()
        options.graph_optimization_level = OPT_LEVELS[opt_level]
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        if optimized_model_path is not None:
            options.optimized_model_filepath = optimized_model_path
        try:
            self.session = ort.InferenceSession(
                self.model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise ArqcError(f"onnxruntime cannot load the model ({str(e).splitlines()[0]}); "
                            "check that it is a valid ONNX file") from e
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_name = self.session.get_outputs()[0].name
        self._fix_batch(model_input.shape[0] if model_input.shape else None)
        self._digest = hashlib.sha256(self.model_bytes).hexdigest()
        self.runtime = f"onnxruntime {ort.__version__} (CPUExecutionProvider, {opt_level})"

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def recipe(self) -> BackendRecipe:
        return BackendRecipe("onnxruntime", self.model_bytes, self.batch_size,
                             {"ort_opt": self.opt_level, "threads": self.threads},
                             key=f"onnxruntime:{self._digest}:{self.batch_size}:{self.opt_level}:{self.threads}")

    def fingerprint(self) -> str:
        """sha256 of the serialized model file."""
        return self._digest

    def io_shapes(self) -> tuple[list, list]:
        """The shapes of the model's inputs and outputs (None for a dynamic dim)."""
        def dims(arg):
            return [d if isinstance(d, int) and d > 0 else None for d in (arg.shape or [])]
        return [dims(a) for a in self.session.get_inputs()], [dims(a) for a in self.session.get_outputs()]


class OpenVinoBackend(Backend):
    """An ONNX model run by OpenVINO on its CPU plugin (optional extra ``arqc[openvino]``).

    The model is read from memory and compiled once, with float32 inference precision (no bf16 downcast of
    the float parts on CPUs that have it) and ``threads`` inference threads; chunks are streamed through one
    infer request (a fixed batch dimension is handled by padding the last chunk). The fingerprint covers the
    model bytes, the OpenVINO version, the CPU and those settings: the function a certificate holds for is the
    file as this runtime computes it.
    """

    name = "openvino"

    def __init__(self, model: str | Path | bytes | onnx.ModelProto, batch_size: int = 400,
                 threads: int | None = None) -> None:
        super().__init__(batch_size)
        ov = openvino_module()
        self.model_bytes, self.threads = _model_bytes(model), threads
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(core.read_model(self.model_bytes, b""), "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError: "Exception from FILE:LINE:" lines, then the reason
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            reason = next((line for line in lines if not line.startswith("Exception from")), type(e).__name__)
            raise ArqcError(f"OpenVINO cannot load the model ({reason[:200]}); check that it is a valid ONNX "
                            "file") from None
        self.request = self.compiled.create_infer_request()
        first = self.compiled.inputs[0].get_partial_shape()
        self._fix_batch(first[0].get_length() if first.rank.is_static and first[0].is_static else None)
        self.cpu = core.get_property("CPU", "FULL_DEVICE_NAME")
        self.version = ov.get_version()
        self.runtime = f"openvino {self.version} (CPU plugin: {self.cpu})"
        h = hashlib.sha256(self.model_bytes)
        h.update(json.dumps({"runtime": "openvino", "version": self.version, "cpu": self.cpu,
                             "precision": "f32"}).encode())
        self._digest = h.hexdigest()

    def _run(self, x: np.ndarray) -> np.ndarray:
        result = self.request.infer({0: x})
        return np.array(result[self.compiled.outputs[0]], dtype=np.float32, copy=True)

    def recipe(self) -> BackendRecipe:
        return BackendRecipe("openvino", self.model_bytes, self.batch_size, {"threads": self.threads},
                             key=f"openvino:{self._digest}:{self.batch_size}:{self.threads}")

    def fingerprint(self) -> str:
        """sha256 of the model bytes, the OpenVINO version, the CPU and the inference settings."""
        return self._digest

    def io_shapes(self) -> tuple[list, list]:
        """The shapes of the model's inputs and outputs (None for a dynamic dim)."""
        def dims(port):
            return [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        return [dims(p) for p in self.compiled.inputs], [dims(p) for p in self.compiled.outputs]


def openvino_module():
    """The openvino package, or a one-line ArqcError saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise ArqcError("OpenVINO is not installed; install the extra with pip install 'arqc[openvino]'") from None
    return openvino


# The runtimes an ONNX model can be certified in: their --runtime / --backend names and classes.
RUNTIMES = {"onnxruntime": OrtBackend, "openvino": OpenVinoBackend}


def runtime_backend(runtime: str, model: str | Path | bytes | onnx.ModelProto, batch_size: int = 400,
                    threads: int | None = None, ort_opt: str = "all") -> OrtBackend | OpenVinoBackend:
    """The backend of an ONNX model in ``runtime`` (onnxruntime at ``ort_opt``, or openvino)."""
    if runtime == "onnxruntime":
        return OrtBackend(model, batch_size=batch_size, opt_level=ort_opt, intra_op_threads=threads)
    if runtime == "openvino":
        return OpenVinoBackend(model, batch_size=batch_size, threads=threads)
    raise ArqcError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")


def _model_bytes(model: str | Path | bytes | onnx.ModelProto) -> bytes:
    """Serialized ONNX bytes of a path, bytes or ModelProto."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, bytes):
        return model
    path = Path(model)
    if not path.is_file():
        raise ArqcError(f"ONNX model file {str(path)!r} not found; pass an existing .onnx path")
    return path.read_bytes()


def make_backend(model: torch.nn.Module | str | Path | bytes | onnx.ModelProto, **options) -> Backend:
    """TorchBackend for an nn.Module, OrtBackend for ONNX (path, bytes, ModelProto); options: the class's."""
    if isinstance(model, torch.nn.Module):
        return TorchBackend(model, **options)
    if isinstance(model, bytes | onnx.ModelProto) or str(model).endswith(".onnx"):
        return OrtBackend(model, **options)
    raise ArqcError(f"cannot make a backend from {type(model).__name__} {str(model)[:60]!r}; "
                    "pass a torch.nn.Module or an .onnx model")


class ComparingBackend(Backend):
    """Runs ``primary`` (whose logits it returns) and ``reference`` on the same batches, counting the rows
    whose top classes differ: the per-sample agreement of two models on identical noise. ``label`` names the
    reference in reports; a ComparingBackend can be the primary of another (two references)."""

    def __init__(self, primary: Backend, reference: Backend, label: str = "torch simulation") -> None:
        super().__init__(primary.batch_size)
        self.primary, self.reference, self.label = primary, reference, label
        self.name = primary.name
        self.samples = self.disagreements = 0

    @property
    def runtime(self) -> str:
        return self.primary.runtime

    def _run(self, x: np.ndarray) -> np.ndarray:
        logits = self.primary.logits(x)
        self.disagreements += int(np.sum(logits.argmax(axis=1) != self.reference.predict(x)))
        self.samples += len(x)
        return logits

    def fingerprint(self) -> str:
        return self.primary.fingerprint()

    def recipe(self) -> BackendRecipe:
        primary, reference = self.primary.recipe(), self.reference.recipe()
        return BackendRecipe("compare", (primary, reference), self.batch_size, {"label": self.label},
                             key=f"compare:{primary.key}:{reference.key}")


def comparisons(backend: Backend) -> list[ComparingBackend]:
    """The ComparingBackends of a chain (``backend`` and its primaries), outermost first."""
    chain = []
    while isinstance(backend, ComparingBackend):
        chain.append(backend)
        backend = backend.primary
    return chain
