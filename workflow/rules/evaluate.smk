rule evaluate:
    input:
        data=rules.prepare_data.output.data,
        checkpoint=evaluation_checkpoint,
    output:
        evaluation=f"results/{DATASET}/{{model}}/evaluate/noise~{{noise}}/apply~{{apply}}/site~{{site}}/seed~{{seed}}/evaluation.json",
    log:
        f"logs/evaluate/{DATASET}/{{model}}/noise~{{noise}}_apply~{{apply}}_site~{{site}}_seed~{{seed}}.log",
    benchmark:
        f"logs/evaluate/{DATASET}/{{model}}/noise~{{noise}}_apply~{{apply}}_site~{{site}}_seed~{{seed}}.benchmark.tsv"
    conda:
        CONDA_ENV
    threads: evaluate_resource("threads", 1)
    resources:
        gpu=evaluate_resource("gpu", 0),
        mem_mb=lambda wildcards, attempt: evaluate_resource("mem_mb", 4000) * attempt,
        runtime=lambda wildcards, attempt: evaluate_resource("runtime", 30) * attempt,
    params:
        noise=noise_json,
        site=site_arg,
        protocols=",".join(CFG["evaluate"]["protocols"]),
        batch=CFG["evaluate"]["test_batch_size"],
        workers=CFG["evaluate"]["num_workers"],
    shell:
        "exec python -m noisynn evaluate --checkpoint {input.checkpoint} --data {input.data} "
        "--out {output.evaluation} --noise {params.noise} {params.site} "
        "--protocols {params.protocols} --test-batch-size {params.batch} "
        "--seed {wildcards.seed} --num-workers {params.workers} > {log} 2>&1"
