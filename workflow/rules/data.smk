rule prepare_data:
    output:
        data=directory(DATA),
    log:
        f"logs/prepare_data/{DATASET}.log",
    conda:
        CONDA_ENV
    params:
        args=prepare_args(),
    shell:
        "python -m noisynn prepare {params.args} --out {output.data} > {log} 2>&1"
