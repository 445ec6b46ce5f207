"""The package's layering, checked from the source and from a fresh interpreter.

- The model (`model/`) reaches kernels only through `ops.attention` / `ops.mlp` functions: it imports no
  kernel module, no backend list and no torch private hook registry.
- `dinov3_packing`, its CLI and the torch-free modules the CLI reads import without torch or transformers,
  so `--help` and argument errors answer before the heavy imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dinov3_packing"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement in `path`, relative imports resolved."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


@pytest.mark.parametrize("path", sorted((PACKAGE / "model").glob("*.py")), ids=lambda p: p.name)
def test_model_modules_reach_kernels_only_through_ops_functions(path):
    for module, names in _imports(path):
        assert not module.startswith("dinov3_packing.ops.triton"), (path.name, module)
        assert module not in ("dinov3_packing.ops.sdpa", "dinov3_packing.ops.fa4"), (path.name, module)
        assert "torch.nn.modules.module" not in module, (path.name, module)
        if module.startswith("dinov3_packing.ops"):
            assert module in ("dinov3_packing.ops.attention", "dinov3_packing.ops.mlp", "dinov3_packing.ops.norm"), (
                path.name,
                module,
            )
            assert not any(n.isupper() for n in names), f"{path.name} imports a backend list: {names}"


def test_layers_take_x_and_the_packed_batch():
    """Every block-level forward has the signature (self, x, batch, ...)."""
    tree = ast.parse((PACKAGE / "model" / "layers.py").read_text())
    blocks = {"DINOv3ViTPackedAttention", "DINOv3ViTPackedDropPath", "DINOv3ViTPackedLayer", "DINOv3ViTPackedEncoder"}
    seen = set()
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in blocks):
        forward = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "forward")
        assert [a.arg for a in forward.args.args[:3]] == ["self", "x", "batch"], cls.name
        seen.add(cls.name)
    assert seen == blocks


def _fresh_modules(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=PACKAGE.parent,
    ).stdout
    return set(out.split())


@pytest.mark.parametrize(
    "code",
    [
        "import dinov3_packing",
        "import dinov3_packing.cli",
        "from dinov3_packing.cli import build_parser; build_parser()",
        "from dinov3_packing.ops.attention import ATTENTION_BACKENDS",
    ],
)
def test_light_imports_stay_free_of_torch_and_transformers(code):
    loaded = _fresh_modules(code)
    assert "torch" not in loaded and "transformers" not in loaded, code


def test_help_and_a_bad_flag_answer_without_torch():
    """`--help` and a rejected flag exit before anything heavy is imported (a sitecustomize-free child that
    fails loudly if torch gets imported)."""
    guard = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name in ('torch', 'transformers'):\n"
        "            raise ImportError('heavy import: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from dinov3_packing.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    for argv, code in ((["--help"], 0), (["embed", "x", "--out", "y", "--batch-tokens", "0"], 2)):
        proc = subprocess.run([sys.executable, "-c", guard, *argv], capture_output=True, text=True, cwd=PACKAGE.parent)
        assert proc.returncode == code, proc.stderr
        assert "heavy import" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--batch-tokens" in proc.stderr, proc.stderr


def test_lazy_exports_resolve():
    import dinov3_packing

    for name in dinov3_packing.__all__:
        assert getattr(dinov3_packing, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        dinov3_packing.no_such_name  # noqa: B018
