#!/usr/bin/env bash
# Pull the shared results (prepared data, checkpoints, evaluations) and make Snakemake accept them,
# so that nothing is retrained.
#
# `dvc pull` writes files with fresh modification times, in no particular order: Snakemake would
# then find outputs older than their inputs and rerun those jobs. `snakemake --touch` marks every
# job's outputs as up to date, in the order of the workflow's DAG; the dry run after it must find
# nothing to do. Touching blesses whatever is there, so it happens only when DVC confirms that the
# pulled results were made by this checkout's code and config (dvc.lock matches).
#
# Usage: scripts/sync-results.sh [dvc pull options, e.g. `-r lab` for another remote]
set -euo pipefail
cd "$(dirname "$0")/.."

# The tools of the repository's .venv when there is one (`make venv`), else those on PATH.
if [ -x .venv/bin/dvc ]; then
    PATH="$PWD/.venv/bin:$PATH"
fi

dvc pull "$@"
if [ "$(dvc status --json)" != "{}" ]; then
    dvc status >&2
    echo "sync-results: error: the pulled results were not made by this checkout's code and" \
        "config/config.yaml (above: what differs from dvc.lock); run \`dvc repro\` to update them." >&2
    exit 1
fi
snakemake --touch --cores 1 --quiet
if ! plan=$(snakemake --dry-run --quiet 2>&1); then
    printf '%s\n' "$plan" >&2
    echo "sync-results: error: Snakemake's dry run failed after the pull (see above)." >&2
    exit 1
fi
if ! grep -q "Nothing to be done" <<<"$plan"; then
    printf '%s\n' "$plan" >&2
    echo "sync-results: error: after the pull Snakemake would still run the jobs above." >&2
    exit 1
fi
echo "sync-results: the pulled results are up to date; Snakemake has nothing to do."
