"""Precision policies: which (w_bits, a_bits) each quantizable layer gets, and the pass that records them.

A policy file is JSON mapping layer name → {"w_bits": b, "a_bits": b}, b in 2..8 or 32 (not quantized).
A report JSON written by ``arqc compile`` (which holds the mapping under "policy") is accepted too, when it was
written under this arqc's quantization semantics (its "semantics" key).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.fx

from arqc.base import ArqcError
from arqc.passes.meta import FP32, check_semantics, info, quantizable_nodes

Policy = dict[str, tuple[int, int]]
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, FP32)


def check_bits(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in VALID_BITS:
        raise ArqcError(f"{what} = {value!r} is not a valid precision; use an integer in 2..8, or 32 for float")
    return value


def load_policy(path: str | Path) -> Policy:
    """Read a policy file (layer → {w_bits, a_bits}); every entry is checked."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ArqcError(f"policy file {path} does not exist; give a JSON file mapping layer names to "
                        "{\"w_bits\": b, \"a_bits\": b}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArqcError(f"policy file {path} is not valid JSON ({err}); fix or regenerate it") from None
    if isinstance(data, dict) and isinstance(data.get("policy"), dict):  # a file arqc wrote: a report, a search
        check_semantics(data.get("semantics"), f"policy file {path}")
        data = data["policy"]
    if not isinstance(data, dict):
        raise ArqcError(f"policy file {path} must hold a JSON object mapping layer names to bits")
    policy = {}
    for layer, bits in data.items():
        if not isinstance(bits, dict) or set(bits) - {"w_bits", "a_bits"} or not bits:
            raise ArqcError(f"policy file {path}: entry '{layer}' must look like {{\"w_bits\": 4, \"a_bits\": 8}}")
        policy[layer] = (check_bits(bits.get("w_bits", FP32), f"{layer}.w_bits"),
                         check_bits(bits.get("a_bits", FP32), f"{layer}.a_bits"))
    return policy


def policy_to_json(policy: Policy) -> dict:
    return {layer: {"w_bits": w, "a_bits": a} for layer, (w, a) in policy.items()}


def policy_from_json(data: dict) -> Policy:
    """The inverse of :func:`policy_to_json`, for what arqc itself wrote (a file from elsewhere: load_policy)."""
    return {layer: (bits["w_bits"], bits["a_bits"]) for layer, bits in data.items()}


def uniform(gm: torch.fx.GraphModule, w_bits: int, a_bits: int) -> Policy:
    return {info(n).layer: (check_bits(w_bits, "w_bits"), check_bits(a_bits, "a_bits"))
            for n in quantizable_nodes(gm)}


def apply_policy(gm: torch.fx.GraphModule, policy: Policy) -> torch.fx.GraphModule:
    """Record the policy's bits in each layer's meta; layers the policy does not name stay at 32 bits."""
    layers = {info(n).layer: n for n in quantizable_nodes(gm)}
    unknown = [name for name in policy if name not in layers]
    if unknown:
        known = ", ".join(list(layers)[:6])
        raise ArqcError(f"the policy names {len(unknown)} layer(s) the model does not have (first: "
                        f"'{unknown[0]}'); layer names look like: {known}, ... (see `arqc analyze`)")
    for name, node in layers.items():
        info(node).w_bits, info(node).a_bits = policy.get(name, (FP32, FP32))
    return gm


def current_policy(gm: torch.fx.GraphModule) -> Policy:
    return {info(n).layer: (info(n).w_bits, info(n).a_bits) for n in quantizable_nodes(gm)}
