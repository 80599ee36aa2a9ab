"""Run one fine-tuning with a batch-axis training noise and record what the noise hook receives.

Used by tests/test_distributed.py: ``python -m torch.distributed.run ... tests/distributed_capture.py
DATA INIT OUT``. Every call of the hook appends (training mode, rows of its input) to
``OUT/../hook-rank<r>.json``, so the test sees how many samples each noised batch mixed.
"""

import json
import os
import sys
from pathlib import Path

from noisynn.inject.hook import Injection
from noisynn.train import TrainConfig, train

OPTIMAL = {"kind": "linear-optimal", "axis": "batch"}
# 64 a step over 2 processes: 32 each, in two forward passes of k = 16
SECTION = {"epochs": 1, "batch_size": 64, "noise_batch": 16, "lr": 3e-4, "warmup_epochs": 0}

if __name__ == "__main__":
    data, init, out = sys.argv[1:4]
    seen = []
    hook = Injection._hook

    def recording(self, module, args):
        if self.active():
            seen.append([self.model.training, int(args[0].shape[0])])
        return hook(self, module, args)

    Injection._hook = recording
    cfg = TrainConfig.from_section(SECTION, out_dir=out, data_dir=data, stage="finetune", init_checkpoint=init, seed=0,
                                   noise=OPTIMAL, site="blocks.1.attn", apply="train+eval")
    train(cfg)
    Path(out).parent.joinpath(f"hook-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))
