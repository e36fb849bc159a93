"""The layer cake: every import inside the package points down (or to a shared utility), never up or sideways.

Bottom up: converter, label_tokens < calibration, metrics, pipelines < energy, export, loading < evaluation < cli <
commands.
Peers on one layer do not import each other, except that anyone may use metrics. The utilities (errors,
distributed, digits, architectures, validation) sit below everything. Imports inside functions count too.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

import spiking_diffusers

PACKAGE_DIR = Path(spiking_diffusers.__file__).parent

LAYERS: dict[str, int] = {
    "errors": 0,
    "distributed": 0,
    "digits": 0,
    "architectures": 0,
    "validation": 0,
    "converter": 1,
    "label_tokens": 1,
    "calibration": 2,
    "metrics": 2,
    "pipelines": 2,
    "energy": 3,
    "export": 3,
    "loading": 3,
    "evaluation": 4,
    "cli": 5,
    "commands": 6,
}
SHARED_PEERS = {"metrics"}
"""Peers may import these (metrics are used by every layer that measures)."""


def _unit(module: str) -> str | None:
    """The layer unit of a dotted module inside the package (``spiking_diffusers.converter.qcfs`` -> converter)."""
    parts = module.split(".")
    if parts[0] != "spiking_diffusers" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in the file at ``path`` (relative ones resolved)."""
    relative = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    package = list(relative.parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
                # `from . import distributed` names modules, not attributes
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module or ""))
    return found


def _violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        relative = path.relative_to(PACKAGE_DIR.parent)
        own = _unit(".".join(relative.with_suffix("").parts))
        if own is None or own == "__init__":
            continue  # the package facade re-exports the public API
        assert own in LAYERS, f"{relative} is in no layer; add its unit to LAYERS in this test"
        for line, module in _imports(path):
            other = _unit(module)
            if other is None or other == own or other not in LAYERS:
                continue  # outside the package, inside the same unit, or an attribute of the package facade
            upward = LAYERS[other] > LAYERS[own]
            sideways = LAYERS[other] == LAYERS[own] and other not in SHARED_PEERS and LAYERS[own] > 0
            if upward or sideways:
                problems.append(
                    f"{relative}:{line} ({own}, layer {LAYERS[own]}) imports {module} (layer {LAYERS[other]})"
                )
    return problems


def test_no_import_points_up_or_sideways() -> None:
    assert _violations() == []


def test_the_converter_needs_only_torch_and_diffusers() -> None:
    allowed = {"torch", "diffusers", "__future__"}
    for path in sorted((PACKAGE_DIR / "converter").rglob("*.py")):
        for line, module in _imports(path):
            root = module.split(".")[0]
            if root == "spiking_diffusers":  # itself, or a standard-library-only utility (layer 0)
                unit = _unit(module)
                assert unit == "converter" or LAYERS.get(unit) == 0, f"{path.name}:{line} imports {module}"
            elif root not in allowed:
                stdlib = root in sys.stdlib_module_names
                assert stdlib, f"{path.name}:{line} imports {module}: the converter needs torch and diffusers only"
                assert importlib.util.find_spec(root) is not None


@pytest.mark.parametrize("source", ["calibration/report.py", "converter/quantize.py"])
def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch, source) -> None:
    """The walker itself can fail: an upward import written into a copy of a module is reported."""
    original = (PACKAGE_DIR / source).read_text()
    fake_root = tmp_path / "spiking_diffusers"
    for path in PACKAGE_DIR.rglob("*.py"):
        target = fake_root / path.relative_to(PACKAGE_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (fake_root / source).write_text(original + "\n\ndef _late():\n    from ..evaluation import evaluate\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIR", fake_root)
    assert any("imports spiking_diffusers.evaluation" in problem for problem in _violations())
