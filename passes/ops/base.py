"""The op registry: :class:`OpRule` (what an entry says about an op), :data:`RULES`, :func:`register` and the
lookups by kind and by source call, and the base class of the pass-through entries."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from typing import Any

import torch
from torch import nn

from arqc.base import ArqcError

aten = torch.ops.aten

RULES: dict[str, OpRule] = {}


def register(cls: type[OpRule]) -> type[OpRule]:
    RULES[cls.kind] = cls()
    return cls


PLUGIN_GROUP = "arqc.ops"  # the entry-point group of packages that register entries for ops arqc does not know
PLUGIN_ENV = "ARQC_OPS"  # or: comma-separated modules to import, for code that is not an installed package
_loaded: set[str] = set()


def load_plugins() -> list[str]:
    """Import every module that registers entries from outside arqc: the entry points of group
    :data:`PLUGIN_GROUP` of the installed packages, and the modules named in ``$ARQC_OPS``. Each is imported once;
    returns the ones imported by this call. A module that fails to import is an ArqcError naming it."""
    wanted = [(ep.value, ep.load) for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP)]
    names = [name.strip() for name in os.environ.get(PLUGIN_ENV, "").split(",") if name.strip()]
    wanted += [(name, lambda n=name: importlib.import_module(n)) for name in names]
    loaded = []
    for name, load in wanted:
        if name in _loaded:
            continue
        try:
            load()
        except Exception as err:  # the plugin's own code
            raise ArqcError(f"cannot load the op plugin '{name}' ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); fix it, or remove it from "
                            f"{PLUGIN_ENV} / uninstall the package that declares it") from None
        _loaded.add(name)
        loaded.append(name)
    return loaded


def rule_for_kind(kind: str) -> OpRule:
    return RULES[kind]


def matches(target: Any, sources: tuple) -> bool:
    """Whether a source call (a module type, a function or aten overload, a method name) is one of ``sources``;
    module subclasses match their base."""
    if isinstance(target, type):
        return any(isinstance(s, type) and issubclass(target, s) for s in sources)
    return any(target is s or (isinstance(s, str) and target == s) for s in sources)


def rule_for_source(target: Any) -> OpRule | None:
    """The entry that canonicalizes a source call."""
    for rule in RULES.values():
        if matches(target, rule.sources):
            return rule
    return None


class OpRule:
    kind: str = ""
    sources: tuple = ()
    quantizable = False  # a call_module layer with weights, quantized by the policy

    # -- canonical form ------------------------------------------------------------------------------
    @staticmethod
    def fn(*args):  # the canonical callable; overridden by every call_function entry
        raise NotImplementedError

    def canonical_args(self, node: torch.fx.Node, module: nn.Module | None) -> tuple:
        """Positional arguments of ``fn`` for a source node (``module`` is set for call_module sources)."""
        return tuple(node.args)

    def refine(self, node: torch.fx.Node) -> OpRule:
        """The entry for this source node: itself, or a more specific one when several entries share a source
        (a view that flattens is ``flatten``, any other view ``reshape``)."""
        return self

    # -- analysis --------------------------------------------------------------------------------------
    def macs(self, node: torch.fx.Node, module: nn.Module | None, out_shape: tuple[int, ...]) -> int:
        return 0

    def params(self, module: nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    def nonneg(self, node: torch.fx.Node, inputs_nonneg: list[bool]) -> bool:
        return False

    # -- lowering and bounds -------------------------------------------------------------------------
    def lower(self, b, node: torch.fx.Node, args: tuple) -> str:
        """Emit ONNX nodes through the builder ``b`` (passes/lower.py); ``args`` are the node's arguments
        with every fx Node replaced by the name of its ONNX value. Returns the output's name."""
        raise NotImplementedError(self.kind)

    def interval(self, node: torch.fx.Node, module: nn.Module | None, lo: list, hi: list,
                 sound: bool = True) -> tuple:
        """Element-wise bounds of the output. ``lo``/``hi`` are the node's arguments with every tensor input
        replaced by its lower/upper bound (constants appear as themselves in both).

        ``sound=True``: the bounds enclose what the *float32* forward of the simulation computes (in any
        summation order). They are computed in the dtype of ``lo`` (float64 or float32), and each rule widens
        its result by the a-priori rounding error of the float32 op plus that of its own arithmetic
        (:func:`~arqc.passes.ops.rounding.rounding_margin`). ``sound=False``: plain IBP, differentiable
        (through the straight-through quantizers), no margins: for training."""
        raise NotImplementedError(self.kind)


def has_interval(rule: OpRule) -> bool:
    return type(rule).interval is not OpRule.interval


class _PassThrough(OpRule):
    """Monotone non-decreasing in its (single) tensor input and computed without rounding (a selection or
    rearrangement of its input's values): non-negativity and intervals pass through exactly."""

    def nonneg(self, node, inputs_nonneg):
        return inputs_nonneg[0]

    def interval(self, node, module, lo, hi, sound=True):
        return self.fn(*lo), self.fn(*hi)
