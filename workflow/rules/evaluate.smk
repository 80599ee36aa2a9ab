# One job per (checkpoint, site, seed): every setting of the group shares one pass of the test
# images up to the site (noisynn/pipeline/grid.py). Adding a setting to a group reruns that group only.
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
        mem_mb=lambda wildcards, attempt: evaluate_resource("mem_mb", 4000) * attempt,
        runtime=lambda wildcards, attempt: evaluate_resource("runtime", 30) * attempt,
    params:
        settings=group_settings,
        protocols=",".join(CFG["evaluate"]["protocols"]),
        batch=model_test_batch_size,
        metric=model_reported_metric,
        workers=CFG["evaluate"]["num_workers"],
        forward=CFG["evaluate"]["forward_batch_size"],
        code=code_digest("evaluate"),
    shell:
        "exec python -m noisynn evaluate --checkpoint {input.checkpoint} --data {input.data} "
        "--out {output.evaluations} --predictions {output.predictions} --site {wildcards.site} "
        "--settings {params.settings} --protocols {params.protocols} "
        "--test-batch-size {params.batch} --reported-metric {params.metric} "
        "--seed {wildcards.seed} --num-workers {params.workers} --forward-batch-size {params.forward} > {log} 2>&1"
