FIGURES = ["audit", "strength", "layers", "entropy"]
TABLES = ["audit", "strength", "layers", "entropy", "paper_vs_ours"]
OUT = f"results/{DATASET}"


rule aggregate:
    input:
        evaluations=GRID.evaluation_files(),
    output:
        table=f"{OUT}/evaluations.csv",
    log:
        f"logs/aggregate/{DATASET}.log",
    conda:
        CONDA_ENV
    shell:
        "python -m noisynn aggregate --out {output.table} {input.evaluations} > {log} 2>&1"


rule figures:
    input:
        table=rules.aggregate.output.table,
        paper="config/paper_results.csv",
    output:
        **{
            f"figure_{name}_{ext}": (
                report(
                    f"{OUT}/figures/{name}.png",
                    caption=f"../report/{name}.rst",
                    category="Figures",
                )
                if ext == "png"
                else f"{OUT}/figures/{name}.pdf"
            )
            for name in FIGURES
            for ext in ("png", "pdf")
        },
        **{
            f"table_{name}_{ext}": (
                report(
                    f"{OUT}/tables/{name}.md",
                    caption=f"../report/table_{name}.rst",
                    category="Tables",
                )
                if ext == "md"
                else f"{OUT}/tables/{name}.{ext}"
            )
            for name in TABLES
            for ext in ("csv", "md", "tex")
        },
        summary=report(
            f"{OUT}/SUMMARY.md", caption="../report/summary.rst", category="Summary"
        ),
        metrics=f"{OUT}/metrics.json",
    log:
        f"logs/figures/{DATASET}.log",
    conda:
        CONDA_ENV
    params:
        out_dir=lambda wildcards, output: str(Path(output.metrics).parent),
        dataset=DATASET,
    shell:
        "python -m noisynn figures --evaluations {input.table} --paper {input.paper} "
        "--out-dir {params.out_dir} --dataset {params.dataset} > {log} 2>&1"
