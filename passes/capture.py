"""Capture: an nn.Module (torch.fx symbolic trace) or a torch.export program, in one canonical IR.

The canonical IR (what every later pass sees):
- one placeholder (the image batch, NCHW, pixels in [0, 1]) and one tensor output;
- quantizable layers (Conv2d, Linear) are ``call_module`` nodes with BatchNorm already folded in;
- every other op is a ``call_function`` on the ``fn`` of its entry in passes/ops/, with normalized
  positional arguments; constants are ``get_attr`` nodes;
- every node carries ``meta["arqc"]`` (passes/meta.py) with its ``kind`` (and ``layer`` for layers), and
  ``meta["tensor_meta"]`` from ShapeProp.
"""

from __future__ import annotations

import copy
import operator
import traceback
from pathlib import Path

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from arqc.base import ArqcError
from arqc.passes import ops
from arqc.passes.meta import KEY, NodeInfo

_TORCH_DIR = str(Path(torch.__file__).parent)


def capture(model: nn.Module | torch.export.ExportedProgram, example: torch.Tensor) -> torch.fx.GraphModule:
    """Trace ``model`` (or unlift an exported program) and canonicalize it; ``example`` is one input batch.
    The model itself is left untouched (capture works on a copy of its parameters)."""
    if isinstance(model, torch.export.ExportedProgram):
        gm = model.module()  # unlifted: parameters become get_attr nodes; already in inference form
        gm.graph.set_codegen(torch.fx.graph.CodeGen())  # plain tensors in and out, no pytree specs
        _propagate(gm, _export_example(gm, example))
    else:
        gm = _trace(copy.deepcopy(model).eval())
        _propagate(gm, example)
    _canonicalize(gm)
    gm.graph.eliminate_dead_code()
    leftover = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")
                and KEY not in n.meta]
    if leftover:
        n = leftover[0]
        raise ArqcError(f"unsupported op {_describe(gm, n)} in node '{n.name}'; arqc supports "
                        f"{', '.join(sorted(ops.RULES))}; add an entry to passes/ops/ for it")
    gm.delete_all_unused_submodules()
    gm = torch.fx.GraphModule(gm, gm.graph, type(gm).__name__)  # a plain GraphModule, also for exports
    gm.eval()
    gm.graph.lint()
    _propagate(gm, example)
    return gm


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as err:  # tracing runs user code: any exception is the user's model's
        where = _user_frame(err)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ArqcError(
            f"cannot trace {type(model).__name__}: {reason}{where}; move that code into a submodule that "
            "torch.fx treats as a leaf (and add an op rule for it in passes/ops/), or export the model "
            "with torch.export.export and pass the .pt2 file") from None


def _export_example(gm: torch.fx.GraphModule, example: torch.Tensor) -> torch.Tensor:
    """``example`` repeated to the batch size a program was exported with, when that size is static: its
    guards and reshapes only accept that size until canonicalization makes the graph batch-agnostic."""
    val = next(n for n in gm.graph.nodes if n.op == "placeholder").meta.get("val")
    batch = val.shape[0] if val is not None and val.dim() == example.dim() else None
    if isinstance(batch, int) and batch != example.shape[0] and example.shape[0] == 1:
        return example.expand(batch, *example.shape[1:]).contiguous()
    return example


def _user_frame(err: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(_TORCH_DIR)
              and "/passes/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {Path(f.filename).name}:{f.lineno} ({(f.line or '').strip()})"


def _propagate(gm: torch.fx.GraphModule, example: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as err:
        raise ArqcError(f"the model does not run on an input of shape {tuple(example.shape)}: "
                        f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}; "
                        "check --input-shape or the data's image size") from None


def _describe(gm: torch.fx.GraphModule, n: torch.fx.Node) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__
    return getattr(n.target, "__name__", str(n.target))


def _source_key(gm: torch.fx.GraphModule, node: torch.fx.Node):
    return type(gm.get_submodule(node.target)) if node.op == "call_module" else node.target


def _canonicalize(gm: torch.fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node._erased:  # removed while folding an earlier node
            continue
        if node.op == "placeholder":
            node.meta[KEY] = NodeInfo(kind="input")
        elif node.op == "get_attr":
            node.meta[KEY] = NodeInfo(kind="constant")
        elif node.op == "output":
            out = node.args[0]
            if isinstance(out, list | tuple):
                if len(out) != 1:
                    raise ArqcError(f"the model returns {len(out)} outputs; arqc compiles classifiers "
                                    "that return one logits tensor")
                node.args = (out[0],)
            node.meta[KEY] = NodeInfo(kind="output")
        elif node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif not isinstance(node.meta.get("tensor_meta"), TensorMetadata):
            _canonicalize_non_tensor(gm, node)  # sizes, tuples: dead once their users are canonical
        else:
            _canonicalize_op(gm, node)


def _canonicalize_non_tensor(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    if ops.matches(node.target, ops.BATCHNORM_SOURCES):  # aten batch norm returning (out, mean, rstd)
        _fold_batchnorm(gm, node)


def _canonicalize_op(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    key = _source_key(gm, node)
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if ops.matches(key, ops.IDENTITY_SOURCES):
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        return
    if ops.matches(key, ops.BATCHNORM_SOURCES):
        _fold_batchnorm(gm, node)
        return
    if key is operator.getitem:
        _canonicalize_getitem(gm, node)
        return
    rule = ops.rule_for_source(key)
    if rule is None:
        return  # reported by capture() unless it turns out dead
    rule = rule.refine(node)
    if rule.quantizable:
        if node.op != "call_module":
            _make_layer_module(gm, node, rule)
        module = gm.get_submodule(node.target)
        _check_layer(module, node)
        node.meta[KEY] = NodeInfo(kind=rule.kind, layer=node.target)
        return
    try:
        args = rule.canonical_args(node, module)
    except NotImplementedError as err:
        raise ArqcError(f"unsupported use of {rule.kind} in node '{node.name}': {err}; rewrite that part of "
                        "the model or add support in passes/ops/") from None
    node.op, node.target, node.args, node.kwargs = "call_function", rule.fn, args, {}
    node.meta[KEY] = NodeInfo(kind=rule.kind)


def _check_layer(module: nn.Module, node: torch.fx.Node) -> None:
    if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
        raise ArqcError(f"conv layer '{node.target}' uses padding={module.padding!r}, "
                        f"padding_mode={module.padding_mode!r}; arqc lowers explicit zero padding only")


CHUNK_SOURCES = (torch.chunk, torch.ops.aten.chunk.default, "chunk")
SPLIT_SOURCES = (torch.split, torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default, "split")


def _piece(source: torch.fx.Node, i: int) -> tuple[int, int, int] | None:
    """(dim, start, end) of piece ``i`` of a chunk/split node, None for other nodes."""
    chunk, split = ops.matches(source.target, CHUNK_SOURCES), ops.matches(source.target, SPLIT_SOURCES)
    if not (chunk or split):
        return None
    x, how = source.args[0], source.args[1]
    dim = source.kwargs.get("dim", source.args[2] if len(source.args) > 2 else 0)
    size = x.meta["tensor_meta"].shape[dim]
    if isinstance(how, list | tuple):  # split into the given sizes
        sizes = [int(v) for v in how]
    else:  # chunk into n pieces of ceil(size / n), or split into pieces of ``how``
        step = -(-size // int(how)) if chunk else int(how)
        sizes = [min(step, size - k) for k in range(0, size, step)]
    start = sum(sizes[:i])
    return int(dim) % len(x.meta["tensor_meta"].shape), start, start + sizes[i]


def _canonicalize_getitem(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """``x[:, :, ::2, ::2]`` (basic slicing of a tensor) becomes a chain of canonical slices, and so does piece
    i of ``x.chunk(n, dim)`` / ``x.split(s, dim)`` (the chunk node is then dead)."""
    source, index = node.args
    if isinstance(source, torch.fx.Node) and isinstance(index, int) and (piece := _piece(source, index)):
        dim, start, end = piece
        rule = ops.RULES["slice"]
        with gm.graph.inserting_before(node):
            value = gm.graph.call_function(rule.fn, (source.args[0], dim, start, end, 1))
            value.meta[KEY] = NodeInfo(kind=rule.kind)
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
        if not source.users:
            gm.graph.erase_node(source)
        return
    index = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, slice) or i is Ellipsis for i in index) or index.count(Ellipsis) > 1:
        raise ArqcError(f"unsupported indexing {index!r} in node '{node.name}'; arqc supports basic slicing")
    rank = len(source.meta["tensor_meta"].shape)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (rank - len(index) + 1) + index[at + 1:]
    rule = ops.RULES["slice"]
    value = source
    with gm.graph.inserting_before(node):
        for dim, s in enumerate(index):
            if s == slice(None):
                continue
            value = gm.graph.call_function(rule.fn, (value, dim, s.start, s.stop, s.step or 1))
            value.meta[KEY] = NodeInfo(kind=rule.kind)
    node.replace_all_uses_with(value)
    gm.graph.erase_node(node)


def _constant(gm: torch.fx.GraphModule, arg) -> torch.Tensor | None:
    if arg is None:
        return None
    if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr"):
        raise ArqcError(f"layer weights must be parameters or buffers of the model, got node '{arg}'")
    return get_attr(gm, arg.target).detach()


def get_attr(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    """The parameter or buffer a get_attr node names (``target`` is a dotted path)."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def _make_layer_module(gm: torch.fx.GraphModule, node: torch.fx.Node, rule: ops.OpRule) -> None:
    """Turn a functional conv/linear (aten or F.*) with constant weights into a call_module layer."""
    args = list(node.args) + [None] * 9
    weight, bias = _constant(gm, args[1]), _constant(gm, args[2])
    if rule.kind == "linear":
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        if node.target is torch.ops.aten.convolution.default:
            stride, padding, dilation, transposed, groups = args[3], args[4], args[5], args[6], args[8]
            if transposed:
                raise ArqcError(f"transposed convolution in node '{node.name}' is not supported")
        else:
            names = ("stride", "padding", "dilation", "groups")
            given = dict(zip(names, args[3:7], strict=True)) | dict(node.kwargs)
            stride, padding, dilation, groups = (given.get(k) for k in names)
        groups = groups or 1
        if isinstance(padding, str):
            raise ArqcError(f"conv node '{node.name}' uses padding={padding!r}; use explicit padding")
        module = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                           stride=ops._as_tuple(stride or 1), padding=ops._as_tuple(padding or 0),
                           dilation=ops._as_tuple(dilation or 1), groups=groups, bias=bias is not None)
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    path = args[1].target.removesuffix(".weight")
    if path == args[1].target or not path:
        path = node.name
    owner, _, name = path.rpartition(".")
    setattr(gm.get_submodule(owner), name, module)
    node.op, node.target, node.args, node.kwargs = "call_module", path, (node.args[0],), {}


def _bn_scale(gamma, var, eps) -> torch.Tensor:
    """A BatchNorm's per-channel scale γ / sqrt(var + eps), in float64."""
    inv = torch.rsqrt(var.double() + eps)
    return inv if gamma is None else gamma.double() * inv


def _batchnorm_outputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes that carry a BatchNorm's result (the getitem 0 of the aten variant that returns a tuple)."""
    if node.target is torch.ops.aten._native_batch_norm_legit_no_training.default:
        return [u for u in node.users if u.target is operator.getitem]
    return [node]


def _standalone_batchnorm(gm: torch.fx.GraphModule, node: torch.fx.Node, gamma, beta, mean, var, eps) -> None:
    """A BatchNorm that no conv precedes (DenseNet's after a concat) becomes the per-channel ``affine`` entry,
    x·scale + shift, with both constants as buffers of the graph module."""
    rank = len(node.args[0].meta["tensor_meta"].shape)
    with torch.no_grad():
        scale = _bn_scale(gamma, var, eps)
        shift = (0 if beta is None else beta.double()) - mean.double() * scale
    shape = (-1,) + (1,) * (rank - 2)
    rule = ops.RULES["affine"]
    names = []
    for what, value in (("scale", scale), ("shift", shift)):
        name = f"arqc_affine_{node.name}_{what}"
        gm.register_buffer(name, value.float().reshape(shape).contiguous())
        names.append(name)
    with gm.graph.inserting_before(node):
        constants = [gm.graph.get_attr(name) for name in names]
        for c in constants:
            c.meta[KEY] = NodeInfo(kind="constant")
        value = gm.graph.call_function(rule.fn, (node.args[0], *constants))
        value.meta[KEY] = NodeInfo(kind=rule.kind)
        value.meta["tensor_meta"] = node.meta.get("tensor_meta")
    for out in _batchnorm_outputs(node):
        out.replace_all_uses_with(value)
        if out is not node:
            gm.graph.erase_node(out)
    gm.graph.erase_node(node)


def _fold_batchnorm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Fold an inference-mode BatchNorm into the conv (or linear) that feeds it, and drop it."""
    producer = node.args[0]
    if node.op == "call_module":
        bn = gm.get_submodule(node.target)
        gamma, beta, mean, var, eps = bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
    else:  # aten.batch_norm(x, w, b, mean, var, training, momentum, eps) or the _no_training variant
        args = list(node.args)
        gamma, beta, mean, var = (_constant(gm, a) for a in args[1:5])
        eps = args[7] if node.target is torch.ops.aten.batch_norm.default else args[6]
    if not (producer.op == "call_module" and producer.meta.get(KEY) and producer.meta[KEY].quantizable
            and len(producer.users) == 1):
        _standalone_batchnorm(gm, node, gamma, beta, mean, var, eps)
        return
    layer = gm.get_submodule(producer.target)
    with torch.no_grad():
        g = _bn_scale(gamma, var, eps)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.copy_((layer.weight.double() * g.reshape(shape)).float())
        old_bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean, dtype=torch.float64)
        new_bias = (old_bias - mean.double()) * g + (0 if beta is None else beta.double())
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias.float())
        else:
            layer.bias.copy_(new_bias.float())
    for out in _batchnorm_outputs(node):
        out.replace_all_uses_with(producer)
        if out is not node:
            gm.graph.erase_node(out)
    gm.graph.erase_node(node)
