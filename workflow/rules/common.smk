import json
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

REPO = Path(workflow.basedir).parent
sys.path.insert(0, str(REPO))

from noisynn.config import check_models_known, validate_config
from noisynn.errors import UserError
from noisynn.grid import Grid

CONFIG_SOURCE = ", ".join(str(p) for p in workflow.configfiles) or "the config"
try:
    CFG = validate_config(config, CONFIG_SOURCE)
    check_models_known(CFG, CONFIG_SOURCE, Path(".snakemake/noisynn-known-timm-models.json"))
except UserError as error:
    raise WorkflowError(f"noisynn: error: {error}")

GRID = Grid(CFG)
DATASET = CFG["dataset"]["name"]
DATA = f"results/{DATASET}/data"

# Jobs call the package with the Python that runs Snakemake, unless a conda env provides one.
_deploy = str(getattr(workflow.deployment_settings, "deployment_method", ""))
PYTHON = "python" if "CONDA" in _deploy.upper() else shlex.quote(sys.executable)
NOISYNN = f"PYTHONPATH={shlex.quote(str(REPO))} {PYTHON} -m noisynn"


wildcard_constraints:
    dataset=r"[^/]+",
    model=r"[^/]+",
    noise=r"[^/]+",
    site=r"[^/]+",
    seed=r"\d+",
    apply=r"eval|train\+eval",


def q(value):
    """Shell-quote a value (JSON for dicts and lists)."""
    return shlex.quote(value if isinstance(value, str) else json.dumps(value))


def launcher(resources):
    """`python -m noisynn`, or torchrun over the job's GPUs (or CPU processes, with gloo)."""
    procs = int(resources.get("gpu", 0) or 0) or int(resources.get("nproc", 1) or 1)
    if procs > 1:
        return (
            f"PYTHONPATH={shlex.quote(str(REPO))} {PYTHON} -m torch.distributed.run "
            f"--standalone --nproc_per_node={procs} -m noisynn"
        )
    return NOISYNN


def training_args(section):
    t = CFG[section]
    return (
        f"--epochs {t['epochs']} --batch-size {t['batch_size']} --lr {t['lr']} "
        f"--min-lr {t['min_lr']} --warmup-epochs {t['warmup_epochs']} --warmup-lr {t['warmup_lr']} "
        f"--weight-decay {t['weight_decay']} --label-smoothing {t['label_smoothing']} "
        f"--eval-batch-size {t['eval_batch_size']} --num-workers {t['num_workers']}"
    )


def model_resources(model, key, default):
    return CFG["models"][model].get("resources", {}).get(key, default)
