"""Every kernel of the CUDA engine compiles for sm_90 with the arguments its launcher builds, and the
decode GEMV keeps its registers (no spills): checked here without a GPU, through Triton's own ptxas
(tests/tools/compile_sm90.py, in a subprocess because this test session runs Triton's interpreter)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

REPO = Path(__file__).resolve().parents[2]
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(not (TOOLS / "ptxas").exists() or not (TOOLS / "cuobjdump").exists(),
                    reason="this Triton has no bundled ptxas / cuobjdump")
def test_cuda_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.tools.compile_sm90"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    table = run.stdout
    assert run.returncode == 0, table + run.stderr[-3000:]
    for name in ("qmatmul GEMV Q4_K", "qmatmul GEMV Q6_K", "k_write q4_0", "v_write q4_0", "decode split",
                 "decode merge", "prefill attention", "rope_heads", "add_rms_norm", "gated_activation",
                 "k_scales partial", "k_scales finalize", "verify split q4_0 (16 rows, sinks, tile)",
                 "verify split q4_0 (16 rows, sinks, packed)"):
        assert name in table, f"{name} missing from:\n{table}"
    assert "FAILED" not in table and "SPILLS" not in table, table


@pytest.mark.skipif(not (TOOLS / "nvdisasm").exists(), reason="this Triton has no bundled nvdisasm")
def test_gemv_loop_sass_counts_the_loop():
    """tests/tools/gemv_loop_sass.py on the fused gate/up launch (Q4_K, 2 warps) finds a loop and counts it
    (about 360 instructions a K-tile with Triton 3.6 and 3.9)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.tools.gemv_loop_sass", "Q4_K", "17920x1536",
                          "--warps", "2", "--split", "3"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert 100 < int(re.search(r"(\d+) loop instructions", run.stdout).group(1)) < 2000, run.stdout
