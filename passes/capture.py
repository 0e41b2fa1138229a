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
import linecache
import math
import operator
import re
import traceback
from pathlib import Path

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata

from arqc.base import ArqcError
from arqc.passes import ops
from arqc.passes.meta import KEY, NodeInfo
from arqc.passes.rewrites import apply_rewrites

_TORCH_DIR = str(Path(torch.__file__).parent)


def capture(model: nn.Module | torch.export.ExportedProgram, example: torch.Tensor) -> torch.fx.GraphModule:
    """Trace ``model`` (or unlift an exported program) and canonicalize it; ``example`` is one input batch.
    The model itself is left untouched (capture works on a copy of its parameters)."""
    ops.load_plugins()
    if isinstance(model, torch.export.ExportedProgram):
        gm = model.module()  # unlifted: parameters become get_attr nodes; already in inference form
        gm.graph.set_codegen(torch.fx.graph.CodeGen())  # plain tensors in and out, no pytree specs
        _propagate(gm, _export_example(gm, example))
    else:
        gm = _trace(copy.deepcopy(model).eval())
        _propagate(gm, example)
        if apply_rewrites(gm):
            _propagate(gm, example)
    _fold_constants(gm)
    _canonicalize(gm)
    gm.graph.eliminate_dead_code()
    leftover = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")
                and KEY not in n.meta]
    if leftover:
        n = leftover[0]
        raise ArqcError(f"unsupported op {_describe(gm, n)} in node '{n.name}'{_source_line(n)}; register an "
                        f"entry for it from your own package (README \"Ops arqc does not know\": entry point group "
                        f"'{ops.PLUGIN_GROUP}', or {ops.PLUGIN_ENV}=your.module) or add one to passes/ops/")
    gm.delete_all_unused_submodules()
    gm = torch.fx.GraphModule(gm, gm.graph, type(gm).__name__)  # a plain GraphModule, also for exports
    gm.eval()
    gm.graph.lint()
    _propagate(gm, example)
    return gm


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        tracer = torch.fx.Tracer()
        tracer.record_stack_traces = True  # for the source line of an unsupported op
        graph = tracer.trace(model)
        return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
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


def _source_line(node: torch.fx.Node) -> str:
    """" at file.py:LINE (code)" of the model's own code that made ``node`` (from the stack trace that tracing
    and torch.export record), or ""."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.stack_trace or node.meta.get("stack_trace") or "")
    for filename, line in frames:
        if not filename.startswith(_TORCH_DIR) and "/passes/" not in filename:
            code = linecache.getline(filename, int(line)).strip()
            return f" at {Path(filename).name}:{line}" + (f" ({code})" if code else "")
    return ""


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
        elif node.op == "call_module" and node.target == "_guards_fn" or node.target in ASSERTS:
            graph.erase_node(node)  # shape checks: the canonical graph's shapes were checked by tracing
        elif not isinstance(node.meta.get("tensor_meta"), TensorMetadata):
            _canonicalize_non_tensor(gm, node)  # sizes, tuples: dead once their users are canonical
        else:
            _canonicalize_op(gm, node)


ASSERTS = (torch._assert, torch.ops.aten._assert_async.msg, torch.ops.aten._assert_scalar.default)


def _canonicalize_non_tensor(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    if ops.matches(node.target, ops.BATCHNORM_SOURCES):  # aten batch norm returning (out, mean, rstd)
        _fold_batchnorm(gm, node)
    elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
        _expand_attention(gm, node)


def _fold_constants(gm: torch.fx.GraphModule) -> None:
    """Compute once what does not depend on the input (relative position biases gathered from their tables, a
    bias MLP run on a constant coordinate table, masks): each such tensor that the rest of the graph reads becomes
    a buffer of the graph module (a get_attr node), and the nodes that computed it go."""
    values: dict[torch.fx.Node, object] = {}
    graph = gm.graph
    for node in graph.nodes:
        if node.op == "get_attr":
            values[node] = get_attr(gm, node.target)
            continue
        if node.op not in ("call_function", "call_method", "call_module") or node.target in ASSERTS \
                or any(a not in values for a in node.all_input_nodes):
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: values[a])
        with torch.no_grad():
            if node.op == "call_function":
                values[node] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                values[node] = gm.get_submodule(node.target)(*args, **kwargs)
    for node in list(graph.nodes):
        value = values.get(node)
        if node.op == "get_attr" or node not in values or all(u in values for u in node.users):
            continue
        if isinstance(value, torch.Tensor):
            name = f"arqc_constant_{node.name}"
            gm.register_buffer(name, value.detach().clone())
            with graph.inserting_before(node):
                folded = graph.get_attr(name)
            folded.meta = {k: v for k, v in node.meta.items() if k == "tensor_meta"}
            node.replace_all_uses_with(folded)
        elif isinstance(value, int | float | bool) or (isinstance(value, tuple | list)
                                                         and all(isinstance(v, int) for v in value)):
            for user in list(node.users):
                user.args, user.kwargs = torch.fx.node.map_arg((user.args, user.kwargs),
                                                              lambda a, n=node, v=value: v if a is n else a)
    for node in reversed(list(graph.nodes)):  # the computations of folded constants, in-place ones included
        if node in values and node.op != "get_attr" and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()


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
    if ops.matches(key, EINSUM_SOURCES):
        _canonicalize_einsum(gm, node)
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
        node.meta[KEY] = NodeInfo(kind=ops.rule_for_source(type(module)).kind, layer=node.target)
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
            value.meta["tensor_meta"] = node.meta.get("tensor_meta")
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
        if not source.users:
            gm.graph.erase_node(source)
        return
    index = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, slice | int) or i is Ellipsis for i in index) or index.count(Ellipsis) > 1 \
            or isinstance(index[0], int):
        raise ArqcError(f"unsupported indexing {index!r} in node '{node.name}'; arqc supports basic slicing and "
                        "integer indices after the batch dimension")
    rank = len(source.meta["tensor_meta"].shape)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (rank - len(index) + 1) + index[at + 1:]
    value, dim = source, 0
    with gm.graph.inserting_before(node):
        for s in index:
            if s == slice(None):
                dim += 1
                continue
            if isinstance(s, int):  # removes the dimension
                rule, args = ops.RULES["select"], (value, dim, s)
            else:
                rule, args, dim = ops.RULES["slice"], (value, dim, s.start, s.stop, s.step or 1), dim + 1
            value = gm.graph.call_function(rule.fn, args)
            value.meta[KEY] = NodeInfo(kind=rule.kind)
    if value is not source:
        value.meta["tensor_meta"] = node.meta.get("tensor_meta")
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


def _module_path(gm: torch.fx.GraphModule, node: torch.fx.Node, what: str) -> str:
    """A free submodule path for a layer made from a function call: inside the module that made the call (its
    ``nn_module_stack``) when known, named ``what`` (``matmul``, ``matmul_1``, ...), else the node's name."""
    stack = node.meta.get("nn_module_stack")
    owner = next(reversed(stack.values()))[0] if stack else ""
    owner = owner if owner and _has_submodule(gm, owner) else ""
    base = f"{owner}.{what}" if owner else node.name
    path, k = base, 1
    while _has_submodule(gm, path):
        path, k = f"{base}_{k}", k + 1
    return path


def _has_submodule(gm: torch.fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def _add_layer(gm: torch.fx.GraphModule, path: str, module: nn.Module) -> None:
    owner, _, name = path.rpartition(".")
    gm.get_submodule(owner).add_module(name, module)


def _make_matmul(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """A matmul of two activations becomes a :class:`~arqc.passes.ops.MatMul` layer; one whose second operand is a
    constant matrix is a linear layer (its weight is that matrix transposed)."""
    a, b = node.args[:2]
    if not isinstance(a, torch.fx.Node) or a.op == "get_attr" or not isinstance(b, torch.fx.Node):
        raise ArqcError(f"matmul node '{node.name}' multiplies a constant from the left; arqc quantizes "
                        "x @ W and products of two activations")
    if b.op == "get_attr" and b.meta["tensor_meta"].shape.__len__() == 2:
        module: nn.Module = _linear_from(get_attr(gm, b.target).detach().t(), None)
        path = _module_path(gm, node, "linear")
        node.args = (a,)
    elif b.op == "get_attr":
        raise ArqcError(f"matmul node '{node.name}' multiplies by a constant of rank "
                        f"{len(b.meta['tensor_meta'].shape)}; arqc quantizes x @ W for a matrix W")
    else:
        module, path = ops.MatMul(), _module_path(gm, node, "matmul")
        node.args = (a, b)
    _add_layer(gm, path, module)
    node.op, node.target, node.kwargs = "call_module", path, {}


EINSUM_SOURCES = (torch.einsum, torch.ops.aten.einsum.default)


def _canonicalize_einsum(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """A two-operand einsum that is a batched matrix product (maxvit's "bghid,bghjd->bghij") becomes permutes
    of its operands into (batch..., i, k) and (batch..., k, j), a matmul layer, and a permute of the result."""
    equation, operands = node.args[0], node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], list | tuple):
        operands = tuple(operands[0])
    spec = equation.replace(" ", "")
    inputs, _, out = spec.partition("->")
    terms = inputs.split(",")
    if len(operands) != 2 or len(terms) != 2 or not out or "." in spec:
        raise ArqcError(f"unsupported einsum '{equation}' in node '{node.name}'; arqc supports two-operand "
                        "batched matrix products with an explicit output")
    first, second = terms
    shared = [c for c in out if c in first and c in second]
    rows = [c for c in first if c not in second]
    cols = [c for c in second if c not in first]
    depth = [c for c in first if c in second and c not in out]
    if len(rows) != 1 or len(cols) != 1 or len(depth) != 1 or sorted(out) != sorted(shared + rows + cols) \
            or not shared or shared[0] != first[0] or shared[0] != second[0] or shared[0] != out[0]:
        raise ArqcError(f"unsupported einsum '{equation}' in node '{node.name}'; arqc supports two-operand "
                        "batched matrix products whose first index is the batch")
    permute = ops.RULES["permute"]
    graph = gm.graph
    sizes = dict(zip(first, operands[0].meta["tensor_meta"].shape, strict=True))
    sizes |= dict(zip(second, operands[1].meta["tensor_meta"].shape, strict=True))
    with graph.inserting_before(node):
        def arranged(x, term, order):
            perm = tuple(term.index(c) for c in order)
            if perm == tuple(range(len(term))):
                return x
            value = graph.call_function(permute.fn, (x, perm))
            value.meta[KEY] = NodeInfo(kind=permute.kind)
            _set_shape(value, [sizes[c] for c in order])
            return value
        a = arranged(operands[0], first, shared + rows + depth)
        b = arranged(operands[1], second, shared + depth + cols)
        product = graph.call_function(torch.matmul, (a, b))
        product.meta = {k: v for k, v in node.meta.items() if k == "nn_module_stack"}
        _make_matmul(gm, product)
        product.meta[KEY] = NodeInfo(kind="matmul", layer=product.target)
        _set_shape(product, [sizes[c] for c in shared + rows + cols])
        result = arranged(product, "".join(shared + rows + cols), list(out))
    node.replace_all_uses_with(result)
    graph.erase_node(node)


def _set_shape(node: torch.fx.Node, shape) -> None:
    """The ``tensor_meta`` of a float32 tensor of ``shape`` on a node that capture made (later rules read it)."""
    node.meta["tensor_meta"] = _extract_tensor_metadata(torch.empty(tuple(shape)))


def _with_weights(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """``module`` (a fresh layer of the right shape) holding ``weight`` and ``bias``."""
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    return module


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    return _with_weights(nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None), weight, bias)


def _expand_attention(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """An nn.MultiheadAttention (batch_first, no masks: ViT's self-attention) becomes the layers and ops it
    computes, with the batch kept in front: q, k, v projections (linear layers ``<attention>.q_proj``, ``k_proj``,
    ``v_proj`` cut from ``in_proj_weight``), per-head reshapes and permutes, the matmul layer q·kᵀ, the scale
    1/√d, softmax, the matmul layer with v, and ``out_proj``."""
    mha = gm.get_submodule(node.target)
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
    given = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    if not mha.batch_first or given.get("key_padding_mask") is not None or given.get("attn_mask") is not None \
            or mha.bias_k is not None or mha.add_zero_attn or given.get("is_causal"):
        raise ArqcError(f"attention '{node.target}' uses batch_first=False, masks or extra key/value biases; "
                        "arqc supports batch_first self- and cross-attention without masks")
    users = list(node.users)
    if any(u.target is not operator.getitem for u in users):
        raise ArqcError(f"the output of attention '{node.target}' is used as a tuple; arqc supports out, _ = attn(...)")
    if any(u.args[1] != 0 and u.users for u in users):
        raise ArqcError(f"the attention weights of '{node.target}' are used; arqc supports need_weights=False")
    E, h = mha.embed_dim, mha.num_heads
    d = E // h
    if mha._qkv_same_embed_dim:
        weights = mha.in_proj_weight.detach().split(E)
    else:
        weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
    biases = mha.in_proj_bias.detach().split(E) if mha.in_proj_bias is not None else (None,) * 3
    graph, rules = gm.graph, ops.RULES

    def call(kind: str, *args) -> torch.fx.Node:
        value = graph.call_function(rules[kind].fn, args)
        value.meta[KEY] = NodeInfo(kind=kind)
        return value

    def layer(path: str, module: nn.Module, *args) -> torch.fx.Node:
        if not _has_submodule(gm, path):
            _add_layer(gm, path, module)
        value = graph.call_module(path, args)
        value.meta[KEY] = NodeInfo(kind="matmul" if isinstance(module, ops.MatMul) else "linear", layer=path)
        return value

    with graph.inserting_before(node):
        heads = []
        for what, x, w, b, perm in zip(("q_proj", "k_proj", "v_proj"), (given["query"], given["key"], given["value"]),
                                       weights, biases, ((0, 2, 1, 3), (0, 2, 3, 1), (0, 2, 1, 3)), strict=True):
            projected = layer(f"{node.target}.{what}", _linear_from(w, b), x)
            length = x.meta["tensor_meta"].shape[1]
            heads.append(call("permute", call("reshape", projected, (length, h, d)), perm))
        scores = layer(f"{node.target}.scores", ops.MatMul(), heads[0], heads[1])
        weights_ = call("softmax", call("mul", scores, 1.0 / math.sqrt(d)), 3)
        context = layer(f"{node.target}.context", ops.MatMul(), weights_, heads[2])
        length = given["query"].meta["tensor_meta"].shape[1]
        merged = call("reshape", call("permute", context, (0, 2, 1, 3)), (length, E))
        out = layer(f"{node.target}.out_proj", _linear_from(mha.out_proj.weight.detach(), mha.out_proj.bias), merged)
    for u in users:
        if u.args[1] == 0:
            out.meta["tensor_meta"] = u.meta.get("tensor_meta")
            u.replace_all_uses_with(out)
        graph.erase_node(u)
    graph.erase_node(node)


def _make_layer_module(gm: torch.fx.GraphModule, node: torch.fx.Node, rule: ops.OpRule) -> None:
    """Turn a functional conv/linear (aten or F.*) with constant weights into a call_module layer."""
    if rule.kind == "matmul":
        _make_matmul(gm, node)
        return
    args = list(node.args) + [None] * 9
    weight, bias = _constant(gm, args[1]), _constant(gm, args[2])
    if rule.kind == "linear":
        module = _linear_from(weight, bias)
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
        _with_weights(module, weight, bias)
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
        info = producer.meta[KEY]
        info.bn_scale = (g if info.bn_scale is None else info.bn_scale.double() * g).float()
    for out in _batchnorm_outputs(node):
        out.replace_all_uses_with(producer)
        if out is not node:
            gm.graph.erase_node(out)
    gm.graph.erase_node(node)
