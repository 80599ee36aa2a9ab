# The workflow lives in workflow/Snakefile (a root Snakefile always wins Snakemake's lookup).
include: "workflow/Snakefile"


# Snakemake ignores a default target declared in an included file (snakemake/snakemake#2773),
# so the default rule is named here; it builds exactly what workflow/Snakefile's `all` builds.
rule default:
    default_target: True
    input:
        rules.all.input,
