"""The code each workflow step runs, as a digest (noisynn/pipeline/codedigest.py).

What a user relies on: a result is only current if the code that made it is. A changed line of
code changes the digest of exactly the steps that run it; a comment or a docstring changes nothing;
a training without noise does not depend on the noise operators. (The workflow test checks that
Snakemake then reruns exactly those jobs.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from noisynn.pipeline import codedigest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A copy of the package whose digests are computed, so that its files can be edited."""
    copy = tmp_path / "noisynn"
    shutil.copytree(REPO / "noisynn", copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codedigest, "PACKAGE", copy)
    codedigest.clear_cache()
    yield copy
    codedigest.clear_cache()


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))
    codedigest.clear_cache()


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if before[k] != after[k]}


def test_a_comment_or_a_docstring_changes_no_digest(package):
    before = codedigest.all_digests()
    _edit(package / "noise.py", '"""The noises of NoisyNN', '"""The noises (reworded) of NoisyNN')
    _edit(package / "evaluate.py", "class _NoRoom(Exception):", "# a comment\nclass _NoRoom(Exception):")
    assert codedigest.all_digests() == before


def test_the_noise_code_reruns_every_step_that_imports_it_and_not_data_preparation(package):
    before = codedigest.all_digests()
    _edit(package / "noise.py", "return (x + x.sum(dim=dim, keepdim=True)) / (k + 1)",
          "return (x + x.sum(dim=dim, keepdim=True)) / (k + 1.0)")
    changed = _changed(before, codedigest.all_digests())
    assert {"evaluate", "finetune", "pretrain", "import_weights"} <= changed
    assert not {"prepare", "aggregate"} & changed


def test_a_training_without_noise_runs_no_module_its_digest_leaves_out(digits_dir, tmp_path):
    """The digest follows imports; this traces a real training without noise and finds every noisynn
    module whose code ran in its digest (a hand-kept list that dropped the noise and injection modules
    from such trainings was wrong: validation cuts its batches with the injection code)."""
    import sys

    from conftest import RESNET_MODEL

    from noisynn.train import TrainConfig, train

    package = REPO / "noisynn"
    ran = set()

    def trace(frame, event, arg):
        path = Path(frame.f_code.co_filename)
        if event == "call" and path.is_relative_to(package):
            rel = path.relative_to(package).with_suffix("")
            ran.add(".".join(["noisynn", *(rel.parts[:-1] if rel.name == "__init__" else rel.parts)]))

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), data_dir=str(digits_dir), stage="pretrain", model=RESNET_MODEL,
                      epochs=1, batch_size=128, lr=1e-3, warmup_epochs=0)
    sys.setprofile(trace)
    try:
        train(cfg)
    finally:
        sys.setprofile(None)
    assert {"noisynn.train", "noisynn.inject.hook", "noisynn.noise"} <= ran
    assert ran <= set(codedigest.step_code("pretrain"))


def test_a_model_family_registration_reruns_every_step_that_injects(package):
    """The families are registered by noisynn/inject/__init__.py, which no step names in an import:
    a real import runs a package's __init__ first, and so does the digest."""
    before = codedigest.all_digests()
    _edit(package / "inject" / "families.py", "stream_bytes=2,  # the maps are in the autocast dtype\n))",
          "stream_bytes=4,\n))")
    changed = _changed(before, codedigest.all_digests())
    assert {"evaluate", "finetune", "pretrain", "import_weights"} <= changed
    assert not {"prepare", "aggregate", "report"} & changed


def test_the_reporting_code_reruns_the_report_only(package):
    before = codedigest.all_digests()
    others = {m for step in codedigest.STEPS if step != "report" for m in codedigest.step_code(step)}
    report = next(m for m in sorted(codedigest.step_code("report")) if m.startswith("noisynn.") and m not in others)
    rel = report.split(".")[1:]
    path = package.joinpath(*rel).with_suffix(".py")
    path = path if path.is_file() else package.joinpath(*rel, "__init__.py")
    path.write_text(path.read_text() + "\n_UNUSED = 1\n")
    codedigest.clear_cache()
    figures = {f"figure:{name}" for name in codedigest.figures()}
    assert _changed(before, codedigest.all_digests()) == {"report", "summary"} | figures


def test_editing_one_plotting_function_redraws_that_figure_alone(package):
    before = codedigest.all_digests()
    _edit(package / "report/plots.py", '"""Per model: top-1 of the m images of one class against m',
          '"""Per model: top-1 of the m images of one class against m (a docstring changes nothing)')
    assert codedigest.all_digests() == before
    _edit(package / "report/plots.py", "def purity_figure(r: Results, dataset: str):\n",
          "def purity_figure(r: Results, dataset: str):\n    _unused = 1\n")
    # the report step as a whole changed; of its jobs, the purity figure alone
    assert _changed(before, codedigest.all_digests()) == {"report", "figure:purity"}


def test_a_helper_shared_by_figures_redraws_each_figure_that_draws_with_it(package):
    before = codedigest.all_digests()
    _edit(package / "report/plots.py", '"class_pure": "#ff7f0e"', '"class_pure": "#ff7f0f"')  # one colour
    changed = _changed(before, codedigest.all_digests()) - {"report"}
    users = {f"figure:{name}" for name in codedigest.figures()
             if "noisynn.report.plots:_COLORS" in codedigest.figure_code(name)}
    assert changed == users and "figure:purity" in users and "summary" not in changed


def test_the_summary_follows_the_list_of_figures_not_their_drawing(package):
    before = codedigest.summary_digest()
    _edit(package / "report/plots.py", "def layers_figure(r: Results, dataset: str):\n",
          "def layers_figure(r: Results, dataset: str):\n    _unused = 1\n")
    assert codedigest.summary_digest() == before
    _edit(package / "report/plots.py", '"purity": purity_figure}', '"purity": purity_figure, "again": purity_figure}')
    assert codedigest.summary_digest() != before and "again" in codedigest.figures()


def test_the_command_line_of_one_verb_reruns_that_step_only(package):
    before = codedigest.all_digests()
    _edit(package / "cli.py", 'aggregate(args.evaluations, args.out, args.sweeps_out)\n    return 0',
          'aggregate(args.evaluations, args.out, args.sweeps_out)\n    return int(0)')
    assert _changed(before, codedigest.all_digests()) == {"aggregate"}


def test_every_step_covers_its_modules_and_the_digest_file_is_written_once(tmp_path):
    assert "noisynn.evaluate" in codedigest.step_code("evaluate")
    assert "noisynn.train" in codedigest.step_code("finetune")
    out = tmp_path / "digest.json"
    codedigest.main(["--out", str(out)])
    first = out.stat().st_mtime_ns
    codedigest.main(["--out", str(out)])
    assert out.stat().st_mtime_ns == first, "an unchanged digest must leave the file untouched"
