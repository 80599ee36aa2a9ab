"""The environment the workflow's jobs inherit (noisynn/pipeline/jobs.py).

A job's shell runs ``python -m noisynn`` (workflow/rules/common.smk): it must start the Python the
workflow runs under, and import noisynn from the workflow's own copy of the repository even when
PYTHONPATH already names another copy (an older checkout, another worktree).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from noisynn.pipeline.jobs import job_environment


def test_a_job_runs_this_python_and_imports_noisynn_from_the_workflow_s_repository(tmp_path, monkeypatch):
    repo, other = tmp_path / "repo", tmp_path / "other"
    for copy in (repo, other):
        (copy / "noisynn").mkdir(parents=True)
        (copy / "noisynn" / "__init__.py").write_text("")
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))  # a shell whose first python is not ours
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(other), str(repo)]))
    job_environment(repo)
    # run from a folder that holds no noisynn, so that only PYTHONPATH decides which copy is imported
    job = subprocess.run(["python", "-c", "import sys, noisynn; print(sys.executable); print(noisynn.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    executable, package = job.stdout.splitlines()
    assert Path(executable).parent == Path(sys.executable).parent
    assert Path(package) == repo / "noisynn" / "__init__.py"
    # the other copy stays importable after this one, and the repository is named once
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(repo), str(other)]
