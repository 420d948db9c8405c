"""Parameter grids whose full product runs only under ``-m slow`` (or ``-m ""``).

The default run (the README's command, CI on 2 CPU cores) keeps a subset that still
reaches every value of every axis; the rest of the product is marked ``slow``, so no
case leaves the suite: ``benchmarks/device_run.sh`` runs them all on the GPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import pytest


def _parts(value) -> tuple[tuple, tuple, str | None]:
    """``(values, marks, id)`` of an axis entry: a plain value, a tuple of values
    (several argnames), or a ``pytest.param``."""
    if isinstance(value, type(pytest.param(None))):
        return tuple(value.values), tuple(value.marks), value.id
    return (value if isinstance(value, tuple) else (value,)), (), None


def grid(*axes: Sequence, default: Callable[..., bool]) -> list:
    """The product of ``axes`` as ``pytest.param``s, in order; the combinations for which
    ``default(*values)`` is false are marked slow. Ids join the axes' ids with ``-``."""
    cases = []
    for combo in itertools.product(*axes):
        values, marks, ids = (), (), []
        for entry in combo:
            entry_values, entry_marks, entry_id = _parts(entry)
            values += entry_values
            marks += entry_marks
            ids.append(entry_id if entry_id is not None else "-".join(map(str, entry_values)))
        if not default(*values):
            marks += (pytest.mark.slow,)
        cases.append(pytest.param(*values, marks=marks, id="-".join(ids)))
    return cases


def rotate(index: int, choices: Sequence):
    """``choices[index % len(choices)]``: spreads one axis (say, the dtype) over the
    cases of another, so that the default run meets every value once per few cases."""
    return choices[index % len(choices)]
