rule prepare_data:
    output:
        data=directory(DATA),
    log:
        f"logs/prepare_data/{DATASET}.log",
    conda:
        CONDA_ENV
    resources:
        # hashing and (optionally) opening every image of ImageNet takes a while
        mem_mb=16000,
        runtime=lambda wildcards, attempt: 240 * attempt,
    params:
        args=prepare_args(CFG["dataset"]),
        code=code_digest("prepare"),
    shell:
        "python -m noisynn prepare {params.args} --out {output.data} > {log} 2>&1"


if PRETRAIN_DATASET:

    rule prepare_pretrain_data:
        output:
            data=directory(PRETRAIN_DATA),
        log:
            f"logs/prepare_pretrain_data/{DATASET}.log",
        conda:
            CONDA_ENV
        resources:
            mem_mb=16000,
            runtime=lambda wildcards, attempt: 240 * attempt,
        params:
            args=prepare_args(PRETRAIN_DATASET),
            code=code_digest("prepare"),
        shell:
            "python -m noisynn prepare {params.args} --out {output.data} > {log} 2>&1"
