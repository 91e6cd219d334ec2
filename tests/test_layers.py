"""The package's modules import only their own layer or the layers below (docs/design.md)."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "autostructn2v_jax"

# Layer of every module (docs/design.md, "Layers"). A new module gets an entry here; the prefixes
# place the structural-mask modules (autocorrelation, extraction, mask files) without one.
LAYERS = {
    # 0: foundation (no package imports but each other)
    "errors": 0, "files": 0, "parallel": 0, "randbits": 0, "compile_options": 0,
    # 1: IO
    "tiffio": 1, "preprocess": 1, "synth": 1,
    # 2: sampling, masking, autocorrelation and extraction
    "sampling": 2, "masking": 2, "structure": 2,
    # 3: model
    "models": 3,
    # 4: train and predict
    "train": 4, "policy": 4, "checkpoint": 4, "predict": 4, "posterior": 4, "stream": 4,
    # 5: pipeline (the modes, the run folder and its config, using a trained run, the report)
    "pipeline": 5, "inference": 5, "config": 5, "report": 5,
    # 6: cli and api
    "cli": 6, "api": 6, "__init__": 6, "__main__": 6,
}
LAYER_PREFIXES = {"autocorr": 2, "extract": 2, "mask": 2}


def layer(module: str) -> int:
    if module in LAYERS:
        return LAYERS[module]
    for prefix, value in LAYER_PREFIXES.items():
        if module.startswith(prefix):
            return value
    raise AssertionError(f"autostructn2v_jax/{module}.py has no layer: add it to LAYERS in {__file__}")


def package_imports(path: pathlib.Path) -> set[str]:
    """Modules of the package that `path` imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "autostructn2v_jax" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            absolute = node.level == 0 and (node.module or "").split(".")[0] == "autostructn2v_jax"
            if not (absolute or node.level == 1):
                continue
            parts = (node.module or "").split(".")
            inner = parts[1:] if absolute else parts
            if inner and inner[0]:
                found.add(inner[0])
            else:  # `from autostructn2v_jax import x` / `from . import x`
                found.update(alias.name for alias in node.names)
    return found


def test_every_module_has_a_layer():
    for path in PACKAGE.glob("*.py"):
        layer(path.stem)


def test_imports_follow_the_layers():
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        for imported in sorted(package_imports(path)):
            if (PACKAGE / f"{imported}.py").exists() and layer(imported) > layer(path.stem):
                upward.append(f"{path.stem} (layer {layer(path.stem)}) imports {imported} "
                              f"(layer {layer(imported)})")
    assert not upward, "\n".join(upward)


def test_the_checker_sees_every_import_form(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import autostructn2v_jax.cli\nfrom autostructn2v_jax import api as a, report\n"
                   "from autostructn2v_jax.pipeline import run_pipeline\nfrom . import train\n"
                   "from .models import UNet\ndef f():\n    from autostructn2v_jax import inference\n"
                   "import numpy\nfrom jax import numpy as jnp\n")
    assert package_imports(src) == {"cli", "api", "report", "pipeline", "train", "models", "inference"}
