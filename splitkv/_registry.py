"""Backend registry: choose an implementation for an op and say why the others were not chosen.

Each op (the merge, partial attention) owns one :class:`BackendRegistry` holding
its backends in order of preference. A backend answers ``why_not(*args)`` with
``None`` when it can run the given inputs, or a short reason when it cannot;
``auto`` takes the first backend whose ``why_not_auto`` is ``None``.

A backend also declares what it can do, as xformers' ``SUPPORTED_*`` fields do:
its dtypes, its largest head_dim, whether it writes split partial states, takes
``seqused_k`` or a block table, the LSE it gives a row that saw no key, and
whether a gradient flows through it. The callers read these facts (their
``why_not`` functions, split-KV's and cascade's choice of kernel, the LSE
fix-up after a flash kernel) instead of keeping lists of backend names; the
``explain_*`` reports print them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

Reason = str | None


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable
    why_not: Callable[..., Reason]
    # Reasons that keep "auto" away although an explicit request may run it
    # (e.g. the Triton interpreter on CPU tensors is for testing, not for use).
    why_not_auto: Callable[..., Reason] | None = field(default=None)
    # Declared facts. dtypes: the input dtypes it takes (None: every dtype the op
    # takes); max_head_dim: None for no limit of its own.
    dtypes: tuple[torch.dtype, ...] | None = field(default=None, kw_only=True)
    max_head_dim: int | None = field(default=None, kw_only=True)
    # Writes float32 partial states of key chunks (split-KV, cascade passes) for a merge.
    writes_partial_states: bool = field(default=False, kw_only=True)
    takes_seqused_k: bool = field(default=False, kw_only=True)
    takes_block_table: bool = field(default=False, kw_only=True)
    # The LSE its run gives a query row that saw no key: -inf (splitkv's convention) or
    # +inf (flash-attn's, which the caller turns into -inf); None for a backend that
    # declares no facts (the merges, for now).
    empty_row_lse: float | None = field(default=None, kw_only=True)
    # A gradient flows through it (else auto keeps away when one is required).
    differentiable: bool = field(default=False, kw_only=True)

    def declared(self) -> str:
        """The declared facts as one line ('' for a backend that declares none)."""
        if self.empty_row_lse is None:
            return ""
        facts = ["dtypes " + ("any" if self.dtypes is None else "/".join(str(d).removeprefix("torch.")
                                                                        for d in self.dtypes))]  # fmt: skip
        facts.append("head_dim " + ("any" if self.max_head_dim is None else f"<= {self.max_head_dim}"))
        facts += [label for flag, label in ((self.writes_partial_states, "partial states"),
                                            (self.takes_seqused_k, "seqused_k"),
                                            (self.takes_block_table, "block_table"),
                                            (self.differentiable, "differentiable")) if flag]  # fmt: skip
        facts.append("empty rows' LSE " + ("+inf" if self.empty_row_lse == math.inf else "-inf"))
        return ", ".join(facts)

    def auto_reason(self, *args) -> Reason:
        reason = self.why_not(*args)
        if reason is None and self.why_not_auto is not None:
            reason = self.why_not_auto(*args)
        return reason


class BackendRegistry:
    def __init__(self, op_name: str, backends: Sequence[Backend]):
        self.op_name = op_name
        self.backends = tuple(backends)
        self._by_name = {b.name: b for b in backends}
        self.choices = ("auto",) + tuple(self._by_name)

    def __getitem__(self, name: str) -> Backend:
        return self._by_name[name]

    def first_with(self, fact: str) -> Backend:
        """The most preferred backend that declares ``fact`` (a boolean field) true."""
        return next(backend for backend in self.backends if getattr(backend, fact))

    def select(self, requested: str, *args) -> Backend:
        """The backend that runs ``args``: the requested one, or the first eligible for ``auto``."""
        if requested == "auto":
            for backend in self.backends:
                if backend.auto_reason(*args) is None:
                    return backend
            raise RuntimeError(f"{self.op_name}: no backend can run these inputs\n{self.explain('auto', *args)}")
        backend = self._by_name.get(requested)
        if backend is None:
            raise ValueError(f"{self.op_name}: backend must be one of {self.choices}, got {requested!r}")
        reason = backend.why_not(*args)
        if reason is not None:
            raise ValueError(f"{self.op_name}: backend={requested!r} cannot run these inputs: {reason}")
        return backend

    def explain(self, requested: str, *args) -> str:
        """One line per backend: which one ``requested`` picks for ``args`` and why not the others."""
        try:
            chosen = self.select(requested, *args).name
        except (RuntimeError, ValueError):
            chosen = None
        lines = [f"{self.op_name}(backend={requested!r}) -> {chosen or 'no backend'}"]
        for backend in self.backends:
            if backend.name == chosen:
                reason = "chosen"
            else:
                reason = backend.why_not(*args) if requested != "auto" else backend.auto_reason(*args)
            if reason is None:
                reason = "not requested" if requested != "auto" else "a preferred backend can run these inputs"
            lines.append(f"  {backend.name}: {reason}")
            if backend.declared():
                lines.append(f"    declares: {backend.declared()}")
        return "\n".join(lines)
