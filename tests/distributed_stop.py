"""Run one fine-tuning under torchrun and stop it as if SIGTERM arrived after N optimizer steps.

Used by tests/test_distributed.py: ``python -m torch.distributed.run ... tests/distributed_stop.py
STEPS DATA INIT OUT``. The stop is the trainer's own interruption path (every rank saves its state,
the run exits 143), reached deterministically at a chosen step.
"""

import sys

from noisynn.train import EXIT_INTERRUPTED, TrainConfig, train

GAUSSIAN = {"kind": "gaussian", "strength": 0.5}
SECTION = {"epochs": 2, "batch_size": 64, "lr": 3e-4, "warmup_epochs": 0}

if __name__ == "__main__":
    steps, data, init, out = int(sys.argv[1]), *sys.argv[2:5]
    cfg = TrainConfig.from_section(SECTION, out_dir=out, data_dir=data, stage="finetune", init_checkpoint=init, seed=0,
                                   noise=GAUSSIAN, site="blocks.1.attn", apply="train+eval")
    try:
        train(cfg, stop_after_steps=steps or None)
    except SystemExit as e:
        sys.exit(e.code if e.code == EXIT_INTERRUPTED else 1)
