"""vae.device: seeding and device choice."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vae.config import ConfigError
from vae.device import get_device, set_seed


def test_set_seed_seeds_python_numpy_and_torch():
    set_seed(3)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_seed(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_get_device_picks_cpu_when_asked():
    assert get_device("cpu") == torch.device("cpu")
    assert get_device("auto").type in ("cpu", "cuda", "mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_get_device_refuses_a_missing_device_as_a_config_error():
    with pytest.raises(ConfigError, match="device: 'cuda' was asked for but is not available"):
        get_device("cuda")


def test_bf16_units_are_read_from_the_cpu_flags_and_absent_where_there_is_no_cpuinfo(tmp_path):
    from vae.device import cpu_has_bf16_units

    for name, flags, expected in (("amx", "fpu avx512f amx_bf16 amx_tile", True),
                                  ("zen4", "fpu avx512f avx512_bf16", True), ("avx2", "fpu avx2 fma", False)):
        (tmp_path / name).write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        assert cpu_has_bf16_units(tmp_path / name) is expected, name
    assert cpu_has_bf16_units(tmp_path / "missing") is False
