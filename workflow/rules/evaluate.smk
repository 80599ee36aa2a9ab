# Every setting of a group (checkpoint, site, seed) shares one pass of the test images up to the
# site (noisynn/pipeline/grid.py). evaluate.jobs picks the jobs: `site`, one per group, which a
# cluster runs side by side (adding a setting to a group reruns that group only); `checkpoint`, one
# per checkpoint over its groups (its sites, and its seeds when they share it), which pays Python's
# and torch's start-up and the reading of the checkpoint and the data once (profiles/default sets
# it for local runs); `model`, one per model over every checkpoint of it, which pays them once per
# model (the fewest start-ups; a job waits for all of the model's trainings). All write the same files.
if CFG["evaluate"]["jobs"] == "site":

    rule evaluate:
        input:
            data=rules.prepare_data.output.data,
            checkpoint=group_checkpoint,
        output:
            evaluations=pattern(GROUP_PATH),
            predictions=pattern(GROUP_PREDICTIONS),
        log:
            f"logs/evaluate/{DATASET}/{{model}}/train~{{train}}_site~{{site}}_seed~{{seed}}.log",
        benchmark:
            f"logs/evaluate/{DATASET}/{{model}}/train~{{train}}_site~{{site}}_seed~{{seed}}.benchmark.tsv"
        conda:
            CONDA_ENV
        threads: evaluate_resource("threads", 1)
        resources:
            gpu=evaluate_resource("gpu", 0),
            mem_mb=evaluate_mem_mb,
            runtime=evaluate_runtime(1),
        params:
            settings=group_settings,
            protocols=",".join(CFG["evaluate"]["protocols"]),
            batch=lambda wildcards: model_test_batch_size(wildcards.model),
            metric=lambda wildcards: model_reported_metric(wildcards.model),
            workers=CFG["evaluate"]["num_workers"],
            forward=CFG["evaluate"]["forward_batch_size"],
            code=code_digest("evaluate"),
        shell:
            "exec python -m noisynn evaluate --checkpoint {input.checkpoint} --data {input.data} "
            "--out {output.evaluations} --predictions {output.predictions} --site {wildcards.site} "
            "--settings {params.settings} --protocols {params.protocols} "
            "--test-batch-size {params.batch} --reported-metric {params.metric} "
            "--seed {wildcards.seed} --num-workers {params.workers} --forward-batch-size {params.forward} > {log} 2>&1"

else:

    for _job in GRID.evaluation_jobs(CFG["evaluate"]["jobs"]):

        rule:
            name:
                f"evaluate_{_job.name}"
            input:
                data=rules.prepare_data.output.data,
                checkpoints=_job.checkpoints,
            output:
                evaluations=[g.path for g in _job.groups],
                predictions=[g.predictions_path for g in _job.groups],
            log:
                f"logs/evaluate/{DATASET}/{_job.folder}.log",
            benchmark:
                f"logs/evaluate/{DATASET}/{_job.folder}.benchmark.tsv"
            conda:
                CONDA_ENV
            threads: evaluate_resource("threads", 1)
            resources:
                gpu=evaluate_resource("gpu", 0),
                mem_mb=evaluate_mem_mb,
                runtime=evaluate_runtime(len(_job.groups)),
            params:
                groups=job_groups(_job),
                protocols=",".join(CFG["evaluate"]["protocols"]),
                batch=model_test_batch_size(_job.model),
                metric=model_reported_metric(_job.model),
                workers=CFG["evaluate"]["num_workers"],
                forward=CFG["evaluate"]["forward_batch_size"],
                code=code_digest("evaluate"),
            shell:
                "exec python -m noisynn evaluate --data {input.data} --groups {params.groups} --protocols {params.protocols} "
                "--test-batch-size {params.batch} --reported-metric {params.metric} "
                "--num-workers {params.workers} --forward-batch-size {params.forward} > {log} 2>&1"
