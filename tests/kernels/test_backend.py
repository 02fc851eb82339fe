"""The backend switch: $TACHYON_KERNELS, set_backend and use(); a bad value fails where it is used."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import kernels


def test_use_restores_the_previous_backend() -> None:
    before = kernels.get_backend()
    with kernels.use("reference"):
        assert kernels.get_backend() == "reference"
        with kernels.use("triton"):
            assert kernels.get_backend() == "triton"
        assert kernels.get_backend() == "reference"
    assert kernels.get_backend() == before


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown kernel backend 'fast': choose one of auto, triton, reference"):
        kernels.set_backend("fast")


def test_a_bad_environment_value_fails_when_used_not_at_import() -> None:
    """`import kernels` with TACHYON_KERNELS=nonsense works (a CLI can then report it in one line); asking
    for the backend raises a one-line ValueError naming the variable; an explicit backend still works."""
    script = (
        "import kernels, torch\n"
        "with kernels.use('reference'):\n"
        "    assert kernels.get_backend() == 'reference'\n"
        "try:\n"
        "    kernels.rms_norm(torch.ones(2, 4), torch.ones(4))\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "TACHYON_KERNELS": "nonsense"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("unknown $TACHYON_KERNELS value 'nonsense': choose one of auto, triton, "
                                     "reference")
