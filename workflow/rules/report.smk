# The report: `aggregate` gathers the evaluation groups into two tidy tables; then one job per
# figure and one for the tables, SUMMARY.md and metrics.json (`noisynn report --only <group>`), so
# that a figure is its own node of the DAG. SUMMARY.md embeds the figures as an article does, so it
# depends on them and `rule all` needs only it. The paper's numbers feed the summary alone.
# The report jobs run where Snakemake runs (localrule), also under the SLURM executor.
FIGURES = list(figures())  # noisynn/report/plots.py's, read without importing it
TABLES = [
    "audit",
    "strength",
    "layers",
    "entropy",
    "changes",
    "batch_size",
    "purity",
    "pooling_control",
    "paper_vs_ours",
]
OUT = f"results/{DATASET}"
PAPER = "config/paper_results.csv"
REPORT_SHELL = (
    "python -m noisynn report --evaluations {input.evaluations} --sweeps {input.sweeps} "
    "--out-dir {params.out_dir} --dataset {params.dataset} "
    "--only {params.only} --stages {params.stages} > {log} 2>&1"
)


rule aggregate:
    input:
        evaluations=GRID.group_files(),
        predictions=GRID.prediction_files(),
    output:
        table=f"{OUT}/evaluations.csv",
        sweeps=f"{OUT}/sweeps.csv",
    log:
        f"logs/aggregate/{DATASET}.log",
    conda:
        CONDA_ENV
    params:
        code=code_digest("aggregate"),
    shell:
        "python -m noisynn aggregate --out {output.table} --sweeps-out {output.sweeps} "
        "{input.evaluations} > {log} 2>&1"


for _figure in FIGURES:

    rule:
        name:
            f"figure_{_figure}"
        input:
            evaluations=rules.aggregate.output.table,
            sweeps=rules.aggregate.output.sweeps,
            predictions=GRID.prediction_files(),
        output:
            png=report(
                f"{OUT}/figures/{_figure}.png",
                caption=f"../report/{_figure}.rst",
                category="1 Headline" if _figure == "headline" else "3 Figures",
            ),
            pdf=f"{OUT}/figures/{_figure}.pdf",
        log:
            f"logs/figure_{_figure}/{DATASET}.log",
        # seconds of plotting: never worth a cluster job
        localrule: True
        conda:
            CONDA_ENV
        params:
            out_dir=lambda wildcards, output: str(Path(output.png).parent.parent),
            dataset=DATASET,
            only=_figure,
            stages=q(stages_description()),
            # the code that draws this figure alone: editing another plot leaves it be
            code=figure_code_digest(_figure),
        shell:
            REPORT_SHELL


rule summary:
    input:
        evaluations=rules.aggregate.output.table,
        sweeps=rules.aggregate.output.sweeps,
        predictions=GRID.prediction_files(),
        paper=PAPER,
        # the summary links the figures, never reads them: a redrawn figure does not rewrite it
        figures=[
            ancient(getattr(rules, f"figure_{name}").output.png) for name in FIGURES
        ],
    output:
        **{
            f"table_{name}_{ext}": (
                report(
                    f"{OUT}/tables/{name}.md",
                    caption=f"../report/table_{name}.rst",
                    category="4 Tables",
                )
                if ext == "md"
                else f"{OUT}/tables/{name}.{ext}"
            )
            for name in TABLES
            for ext in ("csv", "md", "tex")
        },
        cells=report(
            f"{OUT}/tables/cells.csv",
            caption="../report/table_cells.rst",
            category="4 Tables",
        ),
        summary=report(
            f"{OUT}/SUMMARY.md", caption="../report/summary.rst", category="2 Summary"
        ),
        metrics=f"{OUT}/metrics.json",
    log:
        f"logs/summary/{DATASET}.log",
    localrule: True
    conda:
        CONDA_ENV
    params:
        out_dir=lambda wildcards, output: str(Path(output.metrics).parent),
        dataset=DATASET,
        only="summary",
        stages=q(stages_description()),
        code=summary_code_digest(),
    shell:
        REPORT_SHELL.replace("--out-dir", "--paper {input.paper} --out-dir")
