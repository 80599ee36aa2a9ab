#!/usr/bin/env bash
# Pull the shared results (prepared data, checkpoints, evaluations) and make Snakemake accept them,
# so that nothing is retrained.
#
# `dvc pull` writes files with fresh modification times, in no particular order: Snakemake would
# then find outputs older than their inputs and rerun those jobs. `snakemake --touch` marks every
# job's outputs as up to date, in the order of the workflow's DAG; the dry run after it must find
# nothing to do, or the script fails (a file the remote lacks, or a config that differs from the
# one the results were made with).
#
# Usage: scripts/sync-results.sh [dvc pull arguments, e.g. `-r lab` or a target]
set -euo pipefail
cd "$(dirname "$0")/.."

# The tools of the repository's .venv when there is one (`make venv`), else those on PATH.
if [ -x .venv/bin/dvc ]; then
    PATH="$PWD/.venv/bin:$PATH"
fi

dvc pull "$@"
snakemake --touch --cores 1 --quiet
if ! plan=$(snakemake --dry-run --quiet 2>&1); then
    printf '%s\n' "$plan" >&2
    echo "sync-results: error: Snakemake's dry run failed after the pull (see above)." >&2
    exit 1
fi
if ! grep -q "Nothing to be done" <<<"$plan"; then
    printf '%s\n' "$plan" >&2
    echo "sync-results: error: after the pull Snakemake would still run the jobs above;" \
        "the pulled results do not match this checkout's config/config.yaml and code." >&2
    exit 1
fi
echo "sync-results: the pulled results are up to date; Snakemake has nothing to do."
