rule finetune:
    input:
        data=rules.prepare_data.output.data,
        init=rules.pretrain.output.weights,
    output:
        weights=f"results/{DATASET}/{{model}}/finetune/noise~{{noise}}/site~{{site}}/seed~{{seed}}/model.safetensors",
        sidecar=f"results/{DATASET}/{{model}}/finetune/noise~{{noise}}/site~{{site}}/seed~{{seed}}/model.json",
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
        args=training_args("finetune"),
        launch=lambda wildcards, resources: launcher(resources),
    shell:
        "{params.launch} finetune --data {input.data} --init {input.init} "
        "--out $(dirname {output.weights}) --noise {params.noise} {params.site} "
        "--noise-at train,eval --seed {wildcards.seed} {params.args} >> {log} 2>&1"
