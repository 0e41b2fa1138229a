"""Leaf functions of known models, rewritten with the batch dimension kept in front.

torch.fx treats a function registered with ``torch.fx.wrap`` as one opaque call. torchvision wraps Swin's window
attention and patch merging this way, and their code folds the windows into the batch dimension
(``B * num_windows``), which the canonical IR does not allow (every tensor keeps its batch in dimension 0, so the
lowering and the bounds work for any batch size). A rewrite computes the same function with the windows as a
dimension of their own. Capture calls it on fx Proxies of the call's arguments, which records its torch calls in
the graph in place of the opaque call; the usual canonicalization then turns them into registry entries (and the
constants they compute, such as shifted-window masks, into buffers).

A rewrite is ``fn(gm, node, *args, **kwargs) -> Proxy``: ``args``/``kwargs`` are the call's, with every fx Node
as a Proxy; ``gm`` and ``node`` give access to constants (:func:`constant`) and shapes (:func:`shape`).
:data:`REWRITES` maps the wrapped function to its rewrite; see the README's "Ops arqc does not know" for adding one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torchvision.models import swin_transformer

REWRITES: dict[Callable, Callable] = {}


def shape(proxy: torch.fx.Proxy) -> tuple[int, ...]:
    """The shape a Proxy's node had when the model was traced with the example (batch 1)."""
    return tuple(proxy.node.meta["tensor_meta"].shape)


def constant(gm: torch.fx.GraphModule, proxy: torch.fx.Proxy | None) -> torch.Tensor | None:
    """The value of a Proxy that stands for a parameter or buffer (a get_attr node), else None."""
    if proxy is None or proxy.node.op != "get_attr":
        return None
    owner, _, name = proxy.node.target.rpartition(".")
    return getattr(gm.get_submodule(owner), name).detach()


def add_constant(gm: torch.fx.GraphModule, node: torch.fx.Node, name: str, value: torch.Tensor,
                 tracer) -> torch.fx.Proxy:
    """A new buffer of the graph module, as a Proxy of its get_attr node."""
    target = f"arqc_{node.name}_{name}"
    gm.register_buffer(target, value.detach().clone().float())
    return torch.fx.Proxy(gm.graph.get_attr(target), tracer)


def _shift_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """The shifted-window attention mask of Swin (Liu et al. 2021), (num_windows, N, N): -100 between positions
    that came from different regions of the rolled map, 0 within one."""
    region = torch.zeros(height, width)
    count = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            region[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    region = region.view(height // window[0], window[0], width // window[1], window[1]).permute(0, 2, 1, 3)
    region = region.reshape(-1, window[0] * window[1])
    differs = region.unsqueeze(1) != region.unsqueeze(2)
    return torch.where(differs, torch.tensor(-100.0), torch.tensor(0.0))


def swin_window_attention(gm, node, x, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads,
                          shift_size, attention_dropout=0.0, dropout=0.0, qkv_bias=None, proj_bias=None,
                          logit_scale=None, training=False):
    """torchvision's ``shifted_window_attention`` (Swin V1, and V2 with ``logit_scale``), at inference, on
    (B, H, W, C) with the windows in a dimension of their own: (B, windows, heads, N, N) attention."""
    tracer = x.tracer
    _, height, width, channels = shape(x)
    wh, ww = window_size
    pad_r, pad_b = (ww - width % ww) % ww, (wh - height % wh) % wh
    if pad_r or pad_b:
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    ph, pw = height + pad_b, width + pad_r
    shift = (0 if wh >= ph else shift_size[0], 0 if ww >= pw else shift_size[1])
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nh, nw, n, d = ph // wh, pw // ww, wh * ww, channels // num_heads
    x = x.reshape(-1, nh, wh, nw, ww, channels).permute(0, 1, 3, 2, 4, 5).reshape(-1, nh * nw, n, channels)
    if logit_scale is not None and qkv_bias is not None:  # V2: no key bias
        bias = constant(gm, qkv_bias).clone()
        bias[channels:2 * channels] = 0
        qkv_bias = add_constant(gm, node, "qkv_bias", bias, tracer)
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(-1, nh * nw, n, 3, num_heads, d)
    q, k, v = (qkv[:, :, :, i].permute(0, 1, 3, 2, 4) for i in range(3))  # (B, windows, heads, N, d)
    if logit_scale is not None:  # V2: cosine attention with a learned, clamped temperature per head
        attn = torch.matmul(F.normalize(q, dim=-1), F.normalize(k, dim=-1).transpose(-2, -1))
        scale = torch.clamp(constant(gm, logit_scale), max=math.log(100.0)).exp()
        attn = attn * add_constant(gm, node, "logit_scale", scale, tracer)
    else:
        attn = torch.matmul(q * d ** -0.5, k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        mask = _shift_mask(ph, pw, (wh, ww), shift).reshape(1, nh * nw, 1, n, n)
        attn = attn + add_constant(gm, node, "shift_mask", mask, tracer)
    attn = F.softmax(attn, dim=-1)
    x = torch.matmul(attn, v).transpose(2, 3).reshape(-1, nh * nw, n, channels)
    x = F.linear(x, proj_weight, proj_bias)
    x = x.reshape(-1, nh, nw, wh, ww, channels).permute(0, 1, 3, 2, 4, 5).reshape(-1, ph, pw, channels)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x[:, :height, :width, :] if pad_r or pad_b else x


def swin_merge_pad(gm, node, x):
    """torchvision's ``_patch_merging_pad`` on (B, H, W, C): pad H and W to even sizes and concatenate the four
    interleaved half-resolution maps along channels."""
    _, height, width, _ = shape(x)
    if height % 2 or width % 2:
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
    return torch.cat([x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :], x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]], -1)


REWRITES[swin_transformer.shifted_window_attention] = swin_window_attention
REWRITES[swin_transformer._patch_merging_pad] = swin_merge_pad


def apply_rewrites(gm: torch.fx.GraphModule) -> bool:
    """Replace every call of a function in :data:`REWRITES` by its rewrite; True when one was replaced (the new
    nodes then need shapes: capture propagates the example again)."""
    graph = gm.graph
    tracer = torch.fx.proxy.GraphAppendingTracer(graph)
    changed = False
    for node in list(graph.nodes):
        rewrite = REWRITES.get(node.target) if node.op == "call_function" else None
        if rewrite is None:
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: torch.fx.Proxy(n, tracer))
        with graph.inserting_before(node):
            out = rewrite(gm, node, *args, **kwargs)
        node.replace_all_uses_with(out.node)
        graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return changed
