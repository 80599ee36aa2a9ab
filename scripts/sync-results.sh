#!/usr/bin/env bash
# Pull the shared results (prepared data, checkpoints, predictions, evaluations) of every config
# that dvc.yaml runs, and make Snakemake accept them, so that nothing is retrained.
#
# `dvc pull` writes files with fresh modification times, in no particular order: Snakemake would
# then find outputs older than their inputs and rerun those jobs. `snakemake --touch` marks every
# job's outputs as up to date, in the order of the workflow's DAG; the dry run after it must find
# nothing to do. Touching blesses whatever is there, so it happens only when DVC confirms that the
# pulled results were made by this checkout's code and configs (dvc.lock matches).
#
# A workflow stage (one per config, dvc.yaml) that dvc.lock does not record has no results to
# pull yet: it is named and skipped (`dvc repro <stage>` makes them).
#
# Usage: scripts/sync-results.sh [dvc pull options, e.g. `-r lab` for another remote]
set -euo pipefail
cd "$(dirname "$0")/.."

# The tools of the repository's .venv when there is one (`make venv`), else those on PATH.
if [ -x .venv/bin/dvc ]; then
    PATH="$PWD/.venv/bin:$PATH"
fi

# "<stage> <config>" for each workflow stage (a stage whose command runs snakemake; its params
# file is the config it runs) that dvc.lock records
recorded=$(python - <<'EOF'
import os
import sys

import yaml

lock = yaml.safe_load(open("dvc.lock")) if os.path.exists("dvc.lock") else {}
done = set((lock or {}).get("stages", {}))
for name, stage in yaml.safe_load(open("dvc.yaml"))["stages"].items():
    if "snakemake" not in str(stage.get("cmd", "")):
        continue
    config = next(iter(stage["params"][0]))
    if name in done:
        print(name, config)
    else:
        print(f"sync-results: {name} ({config}) has no results in dvc.lock yet; skipped "
              f"(`dvc repro {name}` makes them).", file=sys.stderr)
EOF
)
stages=() configs=()
while read -r stage config; do
    [ -n "$stage" ] && stages+=("$stage") && configs+=("$config")
done <<<"$recorded"
if [ ${#stages[@]} -eq 0 ]; then
    echo "sync-results: error: dvc.lock records no workflow stage; run \`dvc repro\` first." >&2
    exit 1
fi

dvc pull "$@" code "${stages[@]}"
if [ "$(dvc status --json code "${stages[@]}")" != "{}" ]; then
    dvc status code "${stages[@]}" >&2
    echo "sync-results: error: the pulled results were not made by this checkout's code and" \
        "configs (above: what differs from dvc.lock); run \`dvc repro\` to update them." >&2
    exit 1
fi
for config in "${configs[@]}"; do
    snakemake --touch --cores 1 --quiet --configfile "$config"
    if ! plan=$(snakemake --dry-run --quiet --configfile "$config" 2>&1); then
        printf '%s\n' "$plan" >&2
        echo "sync-results: error: Snakemake's dry run of $config failed after the pull (see above)." >&2
        exit 1
    fi
    if ! grep -q "Nothing to be done" <<<"$plan"; then
        printf '%s\n' "$plan" >&2
        echo "sync-results: error: after the pull Snakemake would still run the jobs above ($config)." >&2
        exit 1
    fi
done
echo "sync-results: the pulled results of ${configs[*]} are up to date; Snakemake has nothing to do."
