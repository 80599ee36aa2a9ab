rule finetune:
    input:
        data=rules.prepare_data.output.data,
        init=lambda wildcards: GRID.start_checkpoint(wildcards.model),
    output:
        weights=pattern(FINETUNE_PATH),
        sidecar=pattern(FINETUNE_PATH, "model.json"),
    log:
        f"logs/finetune/{DATASET}/{{model}}/noise~{{noise}}_site~{{site}}_seed~{{seed}}.log",
    benchmark:
        f"logs/finetune/{DATASET}/{{model}}/noise~{{noise}}_site~{{site}}_seed~{{seed}}.benchmark.tsv"
    conda:
        CONDA_ENV
    threads: lambda wildcards: model_resources(wildcards.model, "threads", 1)
    resources:
        gpu=lambda wildcards: model_resources(wildcards.model, "gpu", 0),
        nproc=lambda wildcards: model_resources(wildcards.model, "nproc", 1),
        mem_mb=lambda wildcards, attempt: model_resources(
            wildcards.model, "mem_mb", 4000
        )
        * attempt,
        runtime=lambda wildcards, attempt: model_resources(
            wildcards.model, "runtime", 60
        )
        * attempt,
    params:
        noise=noise_json,
        site=site_arg,
        train=lambda wildcards: training_json("finetune"),
        launch=lambda wildcards, resources: launcher(resources),
        code=code_digest("finetune"),
    shell:
        "{params.launch} finetune --data {input.data} --init {input.init} "
        "--out $(dirname {output.weights}) --noise {params.noise} {params.site} "
        "--apply train+eval --seed {wildcards.seed} --train {params.train} >> {log} 2>&1"
