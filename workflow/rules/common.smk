import json
import shlex
import sys
from pathlib import Path

REPO = Path(workflow.current_basedir).parents[1]
sys.path.insert(0, str(REPO))

from noisynn.config import check_models_known, job_environment, validate_config
from noisynn.errors import UserError
from noisynn.grid import Grid

CONFIG_SOURCE = ", ".join(str(p) for p in workflow.configfiles) or "the config"
try:
    CFG = validate_config(config, CONFIG_SOURCE)
    check_models_known(
        CFG, CONFIG_SOURCE, Path(".snakemake/noisynn-known-timm-models.json")
    )
except UserError as error:
    # one sentence and exit status 2, before any job: a config mistake is not a workflow bug
    print(f"noisynn: error: {error}", file=sys.stderr)
    sys.exit(2)

GRID = Grid(CFG)
DATASET = CFG["dataset"]["name"]
DATA = f"results/{DATASET}/data"

# Jobs run `python -m noisynn` with this Python first on PATH (a conda env under --sdm conda
# goes before it) and the repository on PYTHONPATH.
job_environment(REPO)
CONDA_ENV = "../envs/noisynn.yaml"


wildcard_constraints:
    dataset=r"[^/]+",
    model=r"[^/]+",
    noise=r"[^/]+",
    site=r"[^/]+",
    seed=r"\d+",
    apply=r"eval|train\+eval",


def q(value):
    """Shell-quote a value (JSON for dicts and lists, keys sorted: the order of keys in the YAML
    must not change a job's params, or Snakemake would rerun it)."""
    return shlex.quote(
        value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    )


def launcher(resources):
    """`python -m noisynn`, or torchrun over the job's GPUs (or CPU processes, with gloo).

    `exec`: Python replaces the job's shell, so a scheduler's SIGTERM (time limit, scancel)
    reaches it inside the job step, which then waits for the resume state to be saved.
    """
    procs = int(resources.get("gpu", 0) or 0) or int(resources.get("nproc", 1) or 1)
    if procs > 1:
        return f"exec python -m torch.distributed.run --standalone --nproc_per_node={procs} -m noisynn"
    return "exec python -m noisynn"


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


# A pretraining that only wraps downloaded weights (skip_pretrain) needs no GPU and little time.
WRAP_ONLY = {"gpu": 0, "nproc": 1, "threads": 1, "mem_mb": 16000, "runtime": 30}


def pretrain_resources(model, key, default):
    if CFG["models"][model]["skip_pretrain"]:
        return WRAP_ONLY[key]
    return model_resources(model, key, default)


def prepare_args():
    d = CFG["dataset"]
    if d["kind"] == "digits":
        return f"--kind digits --image-size {d['image_size']} --seed {d['split_seed']}"
    verify = "" if d["verify_images"] else " --no-verify-images"
    return (
        f"--kind imagefolder --root {q(d['root'])} --train-dir {q(d['train_dir'])} "
        f"--val-dir {q(d['val_dir'])} --name {q(d['name'])} --image-size {d['image_size']} "
        f"--hash-mode {d['hash_mode']} --on-bad-image {d['on_bad_image']}{verify}"
    )


def pretrain_model_json(wildcards):
    m = CFG["models"][wildcards.model]
    keep = ("timm_name", "kwargs", "pretrained", "augment", "image_size")
    return q({k: m[k] for k in keep if m.get(k) is not None})


def pretrain_epochs(wildcards):
    # skip_pretrain: the pretrained weights themselves are the starting point (the released recipe)
    return (
        0
        if CFG["models"][wildcards.model]["skip_pretrain"]
        else CFG["pretrain"]["epochs"]
    )


def noise_json(wildcards):
    if wildcards.noise == "none":
        return q({"kind": "none"})
    if wildcards.noise not in GRID.noises:
        raise ValueError(f"noise {wildcards.noise!r} is not in the config's grid")
    return q(GRID.noises[wildcards.noise])


def site_arg(wildcards):
    return "" if wildcards.site == "none" else f"--site {q(wildcards.site)}"


def evaluation_checkpoint(wildcards):
    e = GRID.lookup(
        wildcards.model,
        wildcards.noise,
        wildcards.apply,
        wildcards.site,
        wildcards.seed,
    )
    return GRID.checkpoint(e)


def evaluate_resource(key, default):
    return CFG["evaluate"]["resources"].get(key, default)
