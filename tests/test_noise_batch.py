"""The k a batch-mixing training noise sees, and which noises mix a batch (noisynn/noise_batch.py).

The config check, the training and the report's unit of dependence all ask ``mixes_batch``; here it
is held to what the noise operators do: a noise mixes the batch exactly when a sample's output
changes with the other samples of its batch.
"""

from __future__ import annotations

import pytest
import torch

from noisynn.noise import NoiseSpec, apply_noise
from noisynn.noise_batch import mixes_batch, noise_batch_problem


@pytest.mark.parametrize("noise", [
    {"kind": "impulse", "strength": 0.5},
    {"kind": "gaussian", "strength": 0.5},
    {"kind": "linear-optimal", "axis": "batch"},
    {"kind": "linear-optimal", "axis": "rows"},
    {"kind": "linear-shift", "alpha": 0.3, "axis": "batch"},
    {"kind": "linear-shift", "alpha": 0.3, "axis": "features"},
])
def test_a_noise_mixes_the_batch_exactly_when_a_sample_s_output_depends_on_the_others(noise):
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    other = x.clone()
    other[1:] *= 10  # the other samples of the batch, not the first
    spec = NoiseSpec.from_dict(noise)
    out, out_other = (apply_noise(spec, t, torch.Generator().manual_seed(1)) for t in (x, other))
    assert mixes_batch(noise) == (not torch.equal(out[0], out_other[0]))


def test_a_config_entry_mixes_the_batch_if_any_of_its_axes_is_the_batch():
    assert mixes_batch({"kind": "linear-optimal", "axis": ["rows", "batch"]})
    assert not mixes_batch({"kind": "linear-optimal", "axis": ["rows", "features"]})


def test_k_must_divide_each_process_s_share_of_the_batch():
    assert noise_batch_problem(64, 16, 2) is None  # 32 a process: two forward passes of 16
    assert "would mix 32, not the 64" in noise_batch_problem(64, None, 2)
