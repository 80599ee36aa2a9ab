"""The learning-rate schedule of a training section (noisynn/schedule.py): what the training follows
epoch by epoch, and what the config check refuses before any job starts."""

from __future__ import annotations

from noisynn.schedule import learning_rate, training_problem


def test_the_rate_warms_up_from_warmup_lr_to_lr_then_decays_towards_min_lr_without_passing_it():
    rates = [learning_rate(e, 10, lr=1e-3, min_lr=1e-5, warmup_epochs=2, warmup_lr=1e-6) for e in range(10)]
    assert rates[0] == 1e-6 and rates[2] == 1e-3
    assert rates[:3] == sorted(rates[:3]) and rates[2:] == sorted(rates[2:], reverse=True)
    assert min(rates[2:]) > 1e-5


def test_a_section_that_would_not_train_names_the_key_to_change():
    section = {"epochs": 3, "batch_size": 64, "lr": 1e-3}
    assert training_problem(section) is None
    assert training_problem({**section, "epochs": 1, "warmup_epochs": 1, "warmup_lr": 0.0})[0] == "warmup_epochs"
    assert training_problem({**section, "min_lr": 1e-2})[0] == "min_lr"
    assert training_problem({**section, "lr": float("nan")})[0] == "lr"
