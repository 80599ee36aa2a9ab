import json
import shlex
import string
import sys
from pathlib import Path

REPO = Path(workflow.current_basedir).parents[1]
sys.path.insert(0, str(REPO))

from noisynn.errors import UserError
from noisynn.pipeline.codedigest import (
    figure_digest,
    figures,
    step_digest,
    summary_digest,
)
from noisynn.noise_batch import processes
from noisynn.pipeline.config import read_config_file, validate_config
from noisynn.pipeline.grid import Grid
from noisynn.pipeline.jobs import job_environment
from noisynn.pipeline.model_checks import check_models_and_sites
from noisynn.vocab import (
    FINETUNE_PATH,
    GROUP_PATH,
    GROUP_PREDICTIONS,
    IMPORTED_PATH,
    PRETRAIN_PATH,
)

try:
    # The demo config, unless --configfile names another: Snakemake would otherwise merge the two
    # (the demo's models would join the paper's). Read here first, so that a YAML mistake names
    # the file and the line (Snakemake's own message names neither; a file given with
    # --configfile is read by Snakemake before this code runs).
    if not workflow.overwrite_configfiles:
        read_config_file(DEFAULT_CONFIG)
        workflow.configfile(DEFAULT_CONFIG)
    CONFIG_SOURCE = ", ".join(str(p) for p in workflow.configfiles) or "the config"
    CFG = validate_config(config, CONFIG_SOURCE)
    check_models_and_sites(
        CFG, CONFIG_SOURCE, Path(".snakemake/noisynn-checked-models.json")
    )
except UserError as error:
    # one sentence and exit status 2, before any job: a config mistake is not a workflow bug
    print(f"noisynn: error: {error}", file=sys.stderr)
    sys.exit(2)

GRID = Grid(CFG)
DATASET = CFG["dataset"]["name"]
DATA = f"results/{DATASET}/data"
# transfer: the pretraining reads its own dataset (config key pretrain_dataset)
PRETRAIN_DATASET = CFG["pretrain_dataset"]
PRETRAIN_DATA = f"results/{DATASET}/pretrain-data" if PRETRAIN_DATASET else DATA

# Jobs run `python -m noisynn` with this Python first on PATH (a conda env under --sdm conda
# goes before it) and the repository on PYTHONPATH.
job_environment(REPO)
CONDA_ENV = "../envs/noisynn.yaml"


wildcard_constraints:
    dataset=r"[^/]+",
    model=r"[^/]+",
    noise=r"[^/]+",
    train=r"[^/]+",
    site=r"[^/]+",
    seed=r"\d+",
    apply=r"eval|train\+eval",


def pattern(template, name=None):
    """A path template of noisynn.vocab / noisynn.pipeline.grid as a Snakemake pattern: the dataset filled
    in, every other field a wildcard (one spelling of each path, shared with the grid).
    """
    fields = [
        f for _, f, _, _ in string.Formatter().parse(template) if f and f != "dataset"
    ]
    path = template.format(dataset=DATASET, **{f: f"{{{f}}}" for f in fields})
    return path if name is None else str(Path(path).with_name(name))


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
    procs = processes(resources)
    if procs > 1:
        return f"exec python -m torch.distributed.run --standalone --nproc_per_node={procs} -m noisynn"
    return "exec python -m noisynn"


def training_json(section):
    """The config's training section, passed whole (its keys and defaults live in the schema)."""
    return q(CFG[section])


def code_digest(step):
    """The digest of the code a step's jobs run: a param, so a code change reruns them."""
    return step_digest(step)


def figure_code_digest(figure):
    """The digest of the code that draws one figure (the report's, with only that figure's plotting code)."""
    return figure_digest(figure)


def summary_code_digest():
    """The digest of the code that writes the summary and the tables (the report's, without the plots)."""
    return summary_digest()


def model_resources(model, key, default):
    return CFG["models"][model].get("resources", {}).get(key, default)


def prepare_args(d):
    if d["kind"] in ("digits", "mnist"):
        return f"--kind {d['kind']} --image-size {d['image_size']} --seed {d['split_seed']}"
    verify = "" if d["verify_images"] else " --no-verify-images"
    if d["kind"] == "list":
        return (
            f"--kind list --root {q(d['root'])} --train-list {q(d['train_list'])} "
            f"--test-list {q(d['test_list'])} --name {q(d['name'])} --image-size {d['image_size']} "
            f"--hash-mode {d['hash_mode']}{verify}"
        )
    return (
        f"--kind imagefolder --root {q(d['root'])} --train-dir {q(d['train_dir'])} "
        f"--val-dir {q(d['val_dir'])} --name {q(d['name'])} --image-size {d['image_size']} "
        f"--hash-mode {d['hash_mode']} --on-bad-image {d['on_bad_image']}{verify}"
    )


def pretrain_model_json(wildcards):
    m = CFG["models"][wildcards.model]
    keep = ("timm_name", "kwargs", "pretrained", "augment", "image_size", "preprocess")
    return q({k: m[k] for k in keep if m.get(k) is not None})


def noise_json(wildcards):
    if wildcards.noise not in GRID.noises:
        raise ValueError(f"noise {wildcards.noise!r} is not in the config's grid")
    return q(GRID.noises[wildcards.noise])


def site_arg(wildcards):
    return "" if wildcards.site == "none" else f"--site {q(wildcards.site)}"


def evaluation_group(wildcards):
    return GRID.group(
        wildcards.model, wildcards.train, wildcards.site, int(wildcards.seed)
    )


def group_checkpoint(wildcards):
    return evaluation_group(wildcards).checkpoint


def group_settings(wildcards):
    return q(GRID.settings(evaluation_group(wildcards)))


def job_groups(job):
    """What an evaluate job over several groups is told: each group's checkpoint, site, seed,
    settings and files."""
    return q(
        [
            {
                "checkpoint": g.checkpoint,
                "site": g.site,
                "seed": g.seed,
                "settings": GRID.settings(g),
                "out": g.path,
                "predictions": g.predictions_path,
            }
            for g in job.groups
        ]
    )


def model_test_batch_size(model):
    m = CFG["models"][model]
    return m["test_batch_size"] or CFG["evaluate"]["test_batch_size"]


def model_reported_metric(model):
    return CFG["models"][model]["reported_metric"]


def describe_dataset(d):
    if d["kind"] == "imagefolder":
        size = f"ImageFolder {d['root']}"
    elif d["kind"] == "list":
        size = f"lists {d['train_list']} and {d['test_list']}"
    else:
        size = f"{d['image_size']} px"
    return f"{d['name']} ({d['kind']}, {size})"


def stages_description():
    """Which data each stage used, for SUMMARY.md (a transfer pretrains on other data)."""
    test = describe_dataset(CFG["dataset"])
    models = CFG["models"].values()
    if all(m["skip_pretrain"] for m in models):
        pretraining = "none here: pretrained weights imported as loaded"
    elif PRETRAIN_DATASET:
        pretraining = describe_dataset(PRETRAIN_DATASET)
    else:
        pretraining = test
    finetuning = (
        test
        if CFG["finetune"] is not None
        else "none (the weights are evaluated as they are)"
    )
    return {
        "pretraining": pretraining,
        "fine-tuning": finetuning,
        "evaluation": f"{test}, test split",
    }


def evaluate_resource(key, default):
    return CFG["evaluate"]["resources"].get(key, default)


def evaluate_mem_mb(wildcards, attempt):
    return evaluate_resource("mem_mb", 4000) * attempt


def evaluate_runtime(groups):
    """The runtime of an evaluate job over this many groups: the config's is a group's."""

    def runtime(wildcards, attempt):
        return evaluate_resource("runtime", 30) * attempt * groups

    return runtime
