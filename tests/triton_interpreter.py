"""Run a test script under Triton's CPU interpreter, in a subprocess: Triton reads ``TRITON_INTERPRET=1`` when it
is imported, so the interpreter cannot be switched on inside the test process.

The caller's ``PYTHONPATH`` is kept behind the repository, so the same tests check another Triton than the
installed one, e.g. Triton 3.6 (the GPU machine's) unpacked into /tmp/t36:
``PYTHONPATH=/tmp/t36 python -m pytest -s tests/test_linear_gelu.py`` (``-s`` shows the version that ran).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Triton's interpreter before triton-lang/triton#9172 turns a loop bound into a Python int with
# `int(<array of shape [1]>)`, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python
# scalars", triton-lang/triton#9171), so every kernel with a runtime loop bound fails under Triton 3.6. Below
# 3.8 the interpreter gets the `__index__` that Triton 3.8 ships; it is an interpreter bug, not the kernels'.
_PRELUDE = """
import triton
if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 8):
    from triton.runtime import interpreter as _interpreter

    _patch_lang_tensor = _interpreter._patch_lang_tensor

    def _patch_with_0d_index(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _interpreter._patch_lang_tensor = _patch_with_0d_index
print("TRITON " + triton.__version__)
"""


def run_interpreted(script: str, *args: str, timeout: float) -> dict:
    """Run `script` (which prints one line ``RESULT<json>``) with `args` under the interpreter; its JSON."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-c", _PRELUDE + script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    print(next(ln for ln in lines if ln.startswith("TRITON ")), "interpreter")
    return json.loads(next(ln for ln in lines if ln.startswith("RESULT")).removeprefix("RESULT"))
