"""noisynn/vocab.py: the words every layer shares are written once; the config schema, the noise
operators and the path tokens all agree with them (a word added to one and not the others fails here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from noisynn import noise, vocab
from noisynn.vocab import released_metric

SCHEMA = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())


def _enum(*path):
    node = SCHEMA
    for key in path:
        node = node[key]
    while "enum" not in node:  # an array of enums
        node = node["items"]
    return tuple(node["enum"])


def test_the_schema_offers_exactly_the_vocabulary():
    props = SCHEMA["properties"]
    noise_entry = props["noises"]["items"]["properties"]
    sweep = props["layer_sweep"]["properties"]
    assert tuple(noise_entry["kind"]["enum"]) == vocab.NOISE_KINDS
    assert _enum("properties", "noises", "items", "properties", "axis") == vocab.AXES == tuple(sweep["axis"]["enum"])
    assert tuple(noise_entry["neighbour"]["enum"]) == vocab.NEIGHBOURS == tuple(sweep["neighbour"]["enum"])
    assert tuple(noise_entry["detach"]["enum"]) == vocab.DETACH == tuple(sweep["detach"]["enum"])
    assert _enum("properties", "noises", "items", "properties", "apply") == vocab.APPLY == tuple(sweep["apply"]["enum"])
    assert tuple(sweep["kind"]["enum"]) == vocab.LINEAR_NOISE_KINDS
    model = props["models"]["additionalProperties"]["properties"]
    assert tuple(model["reported_metric"]["enum"]) == vocab.REPORTED_METRICS
    assert tuple(model["preprocess"]["enum"]) == vocab.PREPROCESSES
    assert _enum("properties", "evaluate", "properties", "protocols") == vocab.PROTOCOLS


def test_the_noise_operators_accept_every_kind_of_the_vocabulary_and_no_other():
    import pytest

    from noisynn.errors import UserError

    for kind in vocab.NOISE_KINDS:
        extra = {"strength": 0.1} if kind in vocab.ADDITIVE_NOISE_KINDS else {"alpha": 0.3} if kind == "linear-shift" else {}
        spec = noise.NoiseSpec.from_dict({"kind": kind, **({"axis": "batch"} if kind in vocab.LINEAR_NOISE_KINDS else {}), **extra})
        assert spec.kind == kind
    with pytest.raises(UserError, match="noise kind must be one of"):
        noise.NoiseSpec.from_dict({"kind": "uniform"})


def test_every_protocol_names_an_order_of_the_vocabulary_and_the_noisy_ones_are_marked():
    assert all(vocab.PROTOCOL_DEFS[p].order in vocab.ORDERS for p in vocab.PROTOCOLS)
    assert set(vocab.NOISY_PROTOCOLS) == {p for p in vocab.PROTOCOLS if vocab.PROTOCOL_DEFS[p].noise_on}
    assert "clean" in vocab.PROTOCOLS and "clean" not in vocab.NOISY_PROTOCOLS


def test_noise_tokens_name_each_detach_and_neighbour_apart():
    base = {"kind": "linear-shift", "alpha": 0.3, "axis": "batch"}
    tokens = {vocab.noise_token({**base, "neighbour": n, "detach": d}) for n in vocab.NEIGHBOURS for d in vocab.DETACH}
    assert len(tokens) == len(vocab.NEIGHBOURS) * len(vocab.DETACH)


def test_released_metric_is_the_mean_of_running_accuracies():
    correct = [3, 1, 2]
    sizes = [4, 4, 2]
    # running accuracy after each batch: 3/4 = 0.75, (3+1)/(4+4) = 0.5, (3+1+2)/(4+4+2) = 0.6
    expected = (0.75 + 0.5 + 0.6) / 3  # = 0.61666…
    plain = (3 + 1 + 2) / (4 + 4 + 2)  # = 0.6
    assert released_metric(correct, sizes) == pytest.approx(expected, abs=1e-12)
    assert released_metric(correct, sizes) != pytest.approx(plain, abs=1e-6)


def test_released_metric_rewards_early_correct_batches():
    # the same 10 correct out of 20, first in one order, then in the other: the plain accuracy is
    # 0.5 both times, the released metric is not: (1 + 0.5) / 2 = 0.75 against (0 + 0.5) / 2 = 0.25
    assert released_metric([10, 0], [10, 10]) == pytest.approx(0.75)
    assert released_metric([0, 10], [10, 10]) == pytest.approx(0.25)


def test_released_metric_refuses_mismatched_inputs():
    with pytest.raises(ValueError):
        released_metric([1, 2], [10])
    with pytest.raises(ValueError):
        released_metric([], [])
