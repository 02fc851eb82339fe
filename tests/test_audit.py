"""bench.audit: every Triton kernel compiled for an H100 (sm_90) on this machine, GPU or not.

It runs in a subprocess: the audit needs triton.jit's compilable kernels, and this test process may
have chosen Triton's interpreter (TRITON_INTERPRET=1) before importing triton.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_audit(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "bench.audit", "--quick", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_every_shipped_kernel_config_compiles_for_sm90_without_spills_and_with_wgmma() -> None:
    """The whole quick audit (tiny shapes, bf16 and fp32, every config that survives pruning): no compile
    error, no spill, shared memory within the H100's, every 16-bit GEMM on wgmma, every kernel launched."""
    result = run_audit()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.splitlines()[-2:]
    assert summary[0].startswith("sm_90: ") and " 0 spill " in summary[0] and "compile errors 0" in summary[0]
    assert summary[1] == "0 failures"
    gemm_rows = [line for line in result.stdout.splitlines() if "moe.gate_up " in line]
    assert gemm_rows and all("wgmma(bf16)" in line for line in gemm_rows if "tiny/bf16" in line)


@pytest.mark.slow
def test_a_spilling_tile_fails_the_audit() -> None:
    """down_dgrad at 128 x 128 with 8 warps spills on sm_90 (its epilogue holds h, dgate, dup and the
    activation): added back to the shipped configs, the audit names it and exits 1."""
    result = run_audit("--only", "down_dgrad", "--dtypes", "bf16", "--try-tile", "down_dgrad:128x128x64:w8:s4")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:]
    failures = [line for line in result.stdout.splitlines() if line.startswith("  _grouped_mm_kernel")]
    assert failures and all("[moe.down_dgrad]" in f and "BLOCK_M=128 BLOCK_N=128" in f and "w8 s4" in f
                            and "spills" in f for f in failures), result.stdout[-3000:]


def test_a_bad_tile_is_one_clear_line() -> None:
    result = run_audit("--try-tile", "down:128x128:w8")
    assert result.returncode != 0 and "expected ROLE:BMxBNxBK:wW:sS" in result.stderr
