rule pretrain:
    input:
        data=PRETRAIN_DATA,
    output:
        weights=pattern(PRETRAIN_PATH),
        sidecar=pattern(PRETRAIN_PATH, "model.json"),
    log:
        f"logs/pretrain/{DATASET}/{{model}}.log",
    benchmark:
        f"logs/pretrain/{DATASET}/{{model}}.benchmark.tsv"
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
        model=pretrain_model_json,
        train=lambda wildcards: training_json("pretrain"),
        seed=lambda wildcards: CFG["pretrain"]["seed"],
        launch=lambda wildcards, resources: launcher(resources),
        code=code_digest("pretrain"),
    shell:
        "{params.launch} pretrain --data {input.data} --out $(dirname {output.weights}) "
        "--model {params.model} --train {params.train} --seed {params.seed} >> {log} 2>&1"


# The released recipe starts from timm's ImageNet weights as they are (skip_pretrain): they are
# wrapped as a checkpoint, no optimizer step runs, and no GPU is needed.
rule import_weights:
    input:
        data=rules.prepare_data.output.data,
    output:
        weights=pattern(IMPORTED_PATH),
        sidecar=pattern(IMPORTED_PATH, "model.json"),
    log:
        f"logs/import_weights/{DATASET}/{{model}}.log",
    conda:
        CONDA_ENV
    resources:
        mem_mb=16000,
        runtime=30,
    params:
        model=pretrain_model_json,
        # a fine-tuning trains a new classifier where the weights have none for these classes
        head="--allow-new-head" if CFG["finetune"] is not None else "",
        code=code_digest("import_weights"),
    shell:
        "exec python -m noisynn import-weights --data {input.data} --model {params.model} "
        "--out $(dirname {output.weights}) {params.head} > {log} 2>&1"
