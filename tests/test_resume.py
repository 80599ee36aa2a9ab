"""Tests of noisynn/resume.py: a resume state belongs to one run (its settings, data and starting
weights), is restored exactly (weights, optimizer, random state, partial sums), and one that is
foreign, torn or unreadable is dropped with a reason rather than resumed."""

from __future__ import annotations

import json

import torch
from torch import nn

from noisynn import resume
from noisynn.distributed import Distributed

ARGS = {"lr": 1e-3, "epochs": 2, "seed": 0, "out_dir": "/a", "data_dir": "/d", "num_workers": 0}


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_the_identity_ignores_where_a_run_lives_and_follows_what_decides_its_weights(tmp_path):
    init = tmp_path / "init.safetensors"
    init.write_bytes(b"weights v1")
    base = resume.run_identity(ARGS, str(init), "fp", 1)
    moved = resume.run_identity({**ARGS, "out_dir": "/b", "data_dir": "/e", "num_workers": 4}, str(init), "fp", 1)
    assert moved == base
    assert resume.identity_difference(base, resume.run_identity({**ARGS, "lr": 2e-3}, str(init), "fp", 1)) \
        == "lr was 0.001, now 0.002"
    assert resume.identity_difference(base, resume.run_identity(ARGS, str(init), "other", 1)) == "the dataset fingerprint changed"
    assert resume.identity_difference(base, resume.run_identity(ARGS, str(init), "fp", 2)) == "1 processes then, 2 now"
    init.write_bytes(b"weights v2")
    assert resume.identity_difference(base, resume.run_identity(ARGS, str(init), "fp", 1)) == "the starting checkpoint changed"


def test_a_saved_state_is_restored_exactly(tmp_path):
    dist = Distributed()
    model, optimizer = _model_and_optimizer(0)
    noise_rng = torch.Generator().manual_seed(7).get_state()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    partial = {"loss_sum": 0.1 + 0.2}  # a float whose decimal form would round
    resume.save(tmp_path, dist, model, optimizer, noise_rng, {"epoch": 1, "step": 5, "run": {"x": 1}}, partial)

    other, other_opt = _model_and_optimizer(1)
    torch.manual_seed(999)
    meta, noise_state, sums = resume.load(tmp_path, dist, torch.device("cpu"), other, other_opt)
    assert (meta["epoch"], meta["step"]) == (1, 5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True))
    mine, theirs = optimizer.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(mine[p][k], theirs[p][k]) for p in mine for k in mine[p])
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(noise_state, noise_rng)
    assert sums == partial  # bit for bit


def test_a_torn_save_is_dropped_not_resumed(tmp_path, capsys):
    dist = Distributed()
    model, optimizer = _model_and_optimizer(0)
    resume.save(tmp_path, dist, model, optimizer, None, {"epoch": 0, "step": 3}, None)
    meta = json.loads((tmp_path / "state.json").read_text())
    (tmp_path / "state.json").write_text(json.dumps({**meta, "step": 4}))  # the seal of another save
    assert resume.load(tmp_path, dist, torch.device("cpu"), model, optimizer) is None
    assert "are from different saves" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_a_foreign_state_is_discarded_and_a_matching_one_kept(tmp_path, capsys):
    dist = Distributed()
    model, optimizer = _model_and_optimizer(0)
    identity = resume.run_identity(ARGS, None, "fp", 1)
    resume.save(tmp_path, dist, model, optimizer, None, {"epoch": 0, "step": 3, "run": identity}, None)
    resume.discard_foreign(tmp_path, identity, is_main=True)
    assert (tmp_path / "state.json").is_file()
    resume.discard_foreign(tmp_path, resume.run_identity({**ARGS, "seed": 1}, None, "fp", 1), is_main=True)
    assert not (tmp_path / "state.json").exists() and not list(tmp_path.glob("*.safetensors"))
    assert "seed was 0, now 1" in capsys.readouterr().out
