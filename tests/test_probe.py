"""Tests of noisynn/probe.py: does a prediction depend on the other images of its batch, and where
does the model first mix them?

What a user relies on: the probe says "mixes the batch at <module>" for each way a batch can be
mixed at inference (the optimal Q at a ViT site, the InterLUDE shift after a ResNet stage, BatchNorm
in train mode, the impulse noise's batch maximum) and names the module where it happens, says
"batch-independent" for a plain model in eval mode and for a per-image random noise, counts a model
that changes its own state while predicting as dependent, and leaves the model as it found it.
"""

from __future__ import annotations

from json import dumps as json_dumps

import timm
import torch
from torch import nn

from noisynn.cli import main
from noisynn.inject.hook import inject
from noisynn.noise import NoiseSpec
from noisynn.probe import probe

VIT = {"timm_name": "vit_tiny_patch16_224",
       "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2, "num_classes": 10, "in_chans": 1}}
RESNET = {"timm_name": "resnet18",
          "kwargs": {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16, "num_classes": 10, "in_chans": 1}}
INPUT = (1, 16, 16)


def _model(cfg) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(cfg["timm_name"], **cfg["kwargs"]).eval()


def _probe_with(model, site, spec, **kw):
    handle = inject(model, site, spec, at_train=True, at_eval=True)
    try:
        return probe(model, INPUT, injections=[handle], **kw)
    finally:
        handle.remove()


def test_optimal_q_at_a_vit_site_mixes_the_batch_there():
    r = _probe_with(_model(VIT), "blocks.2.attn", NoiseSpec("linear-optimal", axis="batch"))
    assert not r.batch_independent
    assert r.first_mixing == "blocks.2.attn (input)"
    assert r.sentence().startswith("mixes the batch at blocks.2.attn (input)")


def test_the_interlude_shift_after_the_second_stage_mixes_at_the_third():
    spec = NoiseSpec("linear-shift", alpha=0.1, axis="batch", neighbour="next")
    r = _probe_with(_model(RESNET), "layer3.0", spec)
    assert r.first_mixing == "layer3.0 (input)" and not r.batch_independent


def test_a_resnet_in_train_mode_mixes_the_batch_at_its_first_batchnorm():
    model = _model(RESNET)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = probe(model, INPUT, train_mode=True)
    assert r.sentence().startswith("mixes the batch at bn1:")
    assert "bn1.running_mean" in r.state_changed  # and it learns from every batch it sees
    # the model is handed back as it came: eval mode, same weights and statistics
    assert not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_plain_models_in_eval_mode_are_batch_independent():
    for cfg in (VIT, RESNET):
        r = probe(_model(cfg), INPUT)
        assert r.batch_independent and r.first_mixing is None
        assert r.sentence().startswith("batch-independent")


def test_gaussian_noise_draws_per_image_so_it_is_batch_independent():
    r = _probe_with(_model(VIT), "blocks.2.attn", NoiseSpec("gaussian", strength=0.5))
    assert r.batch_independent, r.sentence()


def test_impulse_noise_mixes_through_the_batch_maximum():
    # the released impulse noise sets pixels to the max/min of the whole batch tensor
    r = _probe_with(_model(VIT), "blocks.2.attn", NoiseSpec("impulse", strength=0.2))
    assert r.first_mixing == "blocks.2.attn (input)"


class _TestTimeAdapter(nn.Module):
    """Each image alone within a batch, but a counter of the batches seen that scales the logits."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(1))
        self.head = nn.Linear(16 * 16, 10)

    def forward(self, x):
        self.seen += 1
        return self.head(x.flatten(1)) * self.seen


def test_a_model_that_adapts_at_test_time_is_not_batch_independent():
    r = probe(_TestTimeAdapter(), INPUT)
    assert r.max_change == 0 and r.state_changed == ["seen"]
    assert not r.batch_independent and "adapts to what it sees" in r.sentence()


def test_the_cli_answers_with_its_exit_status(capsys):
    assert main(["probe", "--model", json_dumps(VIT), "--noise", '{"kind": "linear-optimal", "axis": "batch"}',
                 "--site", "blocks.2.attn"]) == 1
    assert capsys.readouterr().out.startswith("mixes the batch at blocks.2.attn (input)")
    assert main(["probe", "--model", json_dumps(RESNET)]) == 0
    assert capsys.readouterr().out.startswith("batch-independent")
    assert main(["probe", "--model", json_dumps(RESNET), "--train-mode"]) == 1
    assert "mixes the batch at bn1" in capsys.readouterr().out


def test_probe_mistakes_are_one_sentence(capsys):
    assert main(["probe"]) == 2
    assert "probe needs --model" in capsys.readouterr().err
    assert main(["probe", "--model", json_dumps(RESNET), "--site", "layer3.0"]) == 2
    assert "--noise and --site together" in capsys.readouterr().err


def test_a_trained_checkpoint_with_the_released_noise_mixes_at_its_site(resnet_run, capsys):
    noise = '{"kind": "linear-shift", "alpha": 0.3, "axis": "batch", "neighbour": "next"}'
    assert main(["probe", "--checkpoint", str(resnet_run.checkpoint), "--noise", noise, "--site", resnet_run.last_site]) == 1
    assert capsys.readouterr().out.startswith(f"mixes the batch at {resnet_run.last_site} (input)")
    assert main(["probe", "--checkpoint", str(resnet_run.checkpoint)]) == 0
