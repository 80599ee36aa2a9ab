def evaluation_checkpoint(wildcards):
    e = GRID.lookup(wildcards.model, wildcards.noise, wildcards.apply, wildcards.site, wildcards.seed)
    return GRID.checkpoint(e)


rule evaluate:
    input:
        data=rules.prepare_data.output.data,
        checkpoint=evaluation_checkpoint,
    output:
        evaluation=f"results/{DATASET}/{{model}}/evaluate/noise~{{noise}}/apply~{{apply}}/site~{{site}}/seed~{{seed}}/evaluation.json",
    params:
        noise=lambda wildcards: q(GRID.noises.get(wildcards.noise, {"kind": "none"})),
        site=lambda wildcards: "" if wildcards.site == "none" else f"--site {q(wildcards.site)}",
        protocols=",".join(CFG["evaluate"]["protocols"]),
        batch=CFG["evaluate"]["test_batch_size"],
        workers=CFG["evaluate"]["num_workers"],
    resources:
        gpu=CFG["evaluate"]["resources"].get("gpu", 0),
        mem_mb=lambda wildcards, attempt: CFG["evaluate"]["resources"].get("mem_mb", 4000) * attempt,
        runtime=lambda wildcards, attempt: CFG["evaluate"]["resources"].get("runtime", 30) * attempt,
    log:
        f"logs/evaluate/{DATASET}/{{model}}/noise~{{noise}}_apply~{{apply}}_site~{{site}}_seed~{{seed}}.log",
    benchmark:
        f"logs/evaluate/{DATASET}/{{model}}/noise~{{noise}}_apply~{{apply}}_site~{{site}}_seed~{{seed}}.benchmark.tsv"
    shell:
        "{NOISYNN} evaluate --checkpoint {input.checkpoint} --data {input.data} --out {output.evaluation} "
        "--noise {params.noise} {params.site} --protocols {params.protocols} "
        "--test-batch-size {params.batch} --seed {wildcards.seed} --num-workers {params.workers} > {log} 2>&1"
