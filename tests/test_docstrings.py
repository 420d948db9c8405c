"""The docstring contract of every public function and class, and its examples run.

Public: the functions and classes of ``splitkv.__all__``, of ``splitkv.nn`` and
``splitkv.distributed``, and of ``splitkv.paged`` and every ``splitkv.integrations.*``
module that imports here. Each docstring has

* an ``Args:`` section (classes may say ``Attributes:`` instead),
* a ``Returns:`` section when the function returns something (a return annotation
  other than ``None``, or a ``return <value>`` in its body),
* a sentence with the word "differentiable" ("Differentiable with respect to ...",
  "Not differentiable ..."),
* an ``Example:`` (or ``Examples:``) section of ``>>>`` lines that import torch and
  splitkv themselves and run as written on CPU (checked here with doctest; the
  examples build their own small inputs, so the run is seeded only for repeatability).
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import pkgutil
import re
import textwrap

import pytest
import torch
import torch.distributed as dist

import splitkv

def _optional_modules() -> list:
    """splitkv.paged and splitkv.integrations.* where they exist and import here."""
    modules = []
    for name in ("splitkv.paged", "splitkv.integrations"):
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as error:
            if error.name is None or not name.startswith(error.name):
                raise  # the module exists but a dependency of it is missing: say so below
    integrations = next((m for m in modules if m.__name__ == "splitkv.integrations"), None)
    if integrations is not None and hasattr(integrations, "__path__"):
        for info in pkgutil.iter_modules(integrations.__path__, "splitkv.integrations."):
            try:
                modules.append(importlib.import_module(info.name))
            except ImportError:  # an integration whose framework is not installed here
                continue
    return modules


def _public_objects() -> dict[str, object]:
    """Qualified name (where it is defined) -> function or class, each object once."""
    sources = [(splitkv, splitkv.__all__)]
    for module in [splitkv.nn, splitkv.distributed, *_optional_modules()]:
        names = getattr(module, "__all__", None)
        if names is None:
            names = [n for n in vars(module) if not n.startswith("_")
                     and getattr(getattr(module, n), "__module__", None) == module.__name__]  # fmt: skip
        sources.append((module, names))
    found = {}
    for module, names in sources:
        for name in names:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return dict(sorted(found.items()))


_PUBLIC = _public_objects()


def _returns_something(fn) -> bool:
    annotation = inspect.signature(fn).return_annotation
    if annotation in (None, "None"):
        return False
    if annotation is not inspect.Signature.empty:
        return True
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    body = tree.body[0]

    def returns(node) -> bool:  # a return with a value, outside nested functions and classes
        if isinstance(node, ast.Return):
            return node.value is not None
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            return False
        return any(returns(child) for child in ast.iter_child_nodes(node))

    return any(returns(statement) for statement in body.body)


def _section(doc: str, *titles: str) -> bool:
    return re.search(rf"^\s*(?:{'|'.join(titles)}):\s*$", doc, re.M) is not None


def _contract_problems(obj) -> list[str]:
    doc = inspect.getdoc(obj) or ""
    if not doc:
        return ["no docstring"]
    problems = []
    if not _section(doc, "Args", *(["Attributes"] if inspect.isclass(obj) else [])):
        problems.append("no Args: section" + (" (or Attributes:)" if inspect.isclass(obj) else ""))
    if inspect.isfunction(obj) and _returns_something(obj) and not _section(doc, "Returns"):
        problems.append("no Returns: section, but it returns a value")
    if not re.search(r"\bdifferentiable\b", doc, re.I):
        problems.append('no sentence saying whether it is differentiable (the word "differentiable")')
    if not _section(doc, "Example", "Examples"):
        problems.append("no Example: section")
    lines = [line.strip()[4:] for line in doc.splitlines() if line.strip().startswith(">>> ")]
    if not lines:
        problems.append("no >>> lines to run")
    else:
        imported = " ".join(line for line in lines if re.match(r"(import|from)\s", line))
        for package in ("torch", "splitkv"):
            if not re.search(rf"\b{package}\b", imported):
                problems.append(f"the example does not import {package} itself (it must run as written)")
    return problems


def _run_examples(name: str, obj) -> str:
    """The doctest report of ``obj``'s examples ('' when they all pass)."""
    finder = doctest.DocTestFinder(recurse=True, exclude_empty=True)
    globs = {"torch": torch, "splitkv": splitkv}
    tests = finder.find(obj, name, module=inspect.getmodule(obj), globs=globs)
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        torch.manual_seed(0)
        try:
            runner.run(test, out=report.append, clear_globs=True)
        finally:
            if dist.is_available() and dist.is_initialized():  # an example that failed before its cleanup line
                dist.destroy_process_group()
    return "".join(report) if runner.failures else ""


def test_public_objects_found():
    # The discovery itself: a refactor that hid the public API from this file would pass vacuously.
    for expected in ("splitkv.merge.merge_states", "splitkv.distributed.context_parallel_attention",
                     "splitkv.nn.SharedPrefixKVCache"):  # fmt: skip
        assert expected in _PUBLIC


@pytest.mark.parametrize("name", list(_PUBLIC))
def test_docstring(name):
    obj = _PUBLIC[name]
    problems = _contract_problems(obj)
    assert not problems, f"{name}: " + "; ".join(problems)
    failures = _run_examples(name, obj)
    assert not failures, f"{name}: its docstring examples fail on CPU:\n{failures}"


def test_the_checks_can_fail():
    # A docstring that breaks every rule, and an example whose output is wrong.
    def undocumented(x):
        """Adds one.

        Example::

            >>> undocumented(1)
        """
        return x + 1

    def wrong_example(x: int) -> int:
        """Adds one.

        Args:
            x: a number.

        Returns:
            ``x + 1``.

        Not differentiable.

        Example:
            >>> import torch, splitkv
            >>> 1 + 1
            3
        """
        return x + 1

    problems = _contract_problems(undocumented)
    assert problems == ["no Args: section", "no Returns: section, but it returns a value",
                        'no sentence saying whether it is differentiable (the word "differentiable")',
                        "no Example: section", "the example does not import torch itself (it must run as written)",
                        "the example does not import splitkv itself (it must run as written)"]  # fmt: skip
    assert _contract_problems(wrong_example) == []
    report = _run_examples("wrong_example", wrong_example)
    assert "wrong_example" in report and "Expected:\n    3\nGot:\n    2" in report
