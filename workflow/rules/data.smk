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
        args=prepare_args(),
    shell:
        "python -m noisynn prepare {params.args} --out {output.data} > {log} 2>&1"
