# The workflow lives in workflow/Snakefile; a root Snakefile always wins Snakemake's lookup.
include: "workflow/Snakefile"
