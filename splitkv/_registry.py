"""Backend registry: choose an implementation for an op and say why the others were not chosen.

Each op (the merge, partial attention) owns one :class:`BackendRegistry` holding
its backends in order of preference. A backend answers ``why_not(*args)`` with
``None`` when it can run the given inputs, or a short reason when it cannot;
``auto`` takes the first backend whose ``why_not_auto`` is ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Reason = str | None


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable
    why_not: Callable[..., Reason]
    # Reasons that keep "auto" away although an explicit request may run it
    # (e.g. the Triton interpreter on CPU tensors is for testing, not for use).
    why_not_auto: Callable[..., Reason] | None = field(default=None)

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
                lines.append(f"  {backend.name}: chosen")
                continue
            reason = backend.why_not(*args) if requested != "auto" else backend.auto_reason(*args)
            if reason is None:
                reason = "not requested" if requested != "auto" else "a preferred backend can run these inputs"
            lines.append(f"  {backend.name}: {reason}")
        return "\n".join(lines)
