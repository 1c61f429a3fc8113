"""What `pip install .` puts into site-packages: the dfine package only, Triton kernels as dfine.kernels."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_build_installs_only_the_dfine_namespace(tmp_path):
    out = tmp_path / "lib"
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, DFINE_WITH_CUDA="0"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["dfine"]
    kernels = out / "dfine" / "kernels"
    assert not kernels.is_symlink()  # real files, copied from the top-level kernels/ folder
    names = {p.name for p in kernels.glob("*.py")}
    assert {"__init__.py", "ms_deform_attn.py", "fdr_decode.py", "golsd_losses.py"} <= names
    for layer in ("ops", "model", "loss", "data", "deploy", "engine", "apps"):
        assert (out / "dfine" / layer / "__init__.py").is_file(), layer
