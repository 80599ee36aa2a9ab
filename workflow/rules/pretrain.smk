rule pretrain:
    input:
        data=rules.prepare_data.output.data,
    output:
        weights=f"results/{DATASET}/{{model}}/pretrain/model.safetensors",
        sidecar=f"results/{DATASET}/{{model}}/pretrain/model.json",
    log:
        f"logs/pretrain/{DATASET}/{{model}}.log",
    benchmark:
        f"logs/pretrain/{DATASET}/{{model}}.benchmark.tsv"
    conda:
        CONDA_ENV
    threads: lambda wildcards: pretrain_resources(wildcards.model, "threads", 1)
    resources:
        gpu=lambda wildcards: pretrain_resources(wildcards.model, "gpu", 0),
        nproc=lambda wildcards: pretrain_resources(wildcards.model, "nproc", 1),
        mem_mb=lambda wildcards, attempt: pretrain_resources(
            wildcards.model, "mem_mb", 4000
        )
        * attempt,
        runtime=lambda wildcards, attempt: pretrain_resources(
            wildcards.model, "runtime", 60
        )
        * attempt,
    params:
        model=pretrain_model_json,
        args=training_args("pretrain"),
        epochs=pretrain_epochs,
        seed=CFG["pretrain"]["seed"],
        launch=lambda wildcards, resources: launcher(resources),
    shell:
        "{params.launch} pretrain --data {input.data} --out $(dirname {output.weights}) "
        "--model {params.model} {params.args} --epochs {params.epochs} --seed {params.seed} "
        ">> {log} 2>&1"
