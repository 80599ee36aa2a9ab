"""Tests of noisynn/report/plots.py: the figures exist, carry no timestamps, and show what their data hold."""

from __future__ import annotations

import numpy as np
import pytest
import report_fixture as fx

from noisynn.report.plots import FIGURES, batch_size_figure, headline_figure, purity_figure
from noisynn.report.results import NO_DATA, Results, load_evaluations, load_sweeps
from noisynn.vocab import PROTOCOLS


@pytest.fixture(scope="module")
def every_file(tmp_path_factory):
    return fx.report_run(tmp_path_factory, "empty", only=None)


def _results(tmp_path_factory, name: str) -> Results:
    run = fx.shared_inputs(tmp_path_factory, name)
    return Results(load_evaluations(run["evaluations"], fx.DATASET), load_sweeps(run["sweeps"], fx.DATASET))


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]


def test_the_headline_figure_is_written_as_png_and_pdf(tmp_path_factory):
    run = fx.report_run(tmp_path_factory, "both_models", only="headline")
    png, pdf = (run["out"] / "figures" / f"headline.{ext}" for ext in ("png", "pdf"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_figures_carry_no_timestamp_or_software_stamp(every_file):
    for name in FIGURES:
        assert b"CreationDate" not in (every_file["out"] / "figures" / f"{name}.pdf").read_bytes(), name
        assert b"Software" not in (every_file["out"] / "figures" / f"{name}.png").read_bytes(), name


def test_the_headline_shows_each_protocol_beside_the_vanilla_model_and_the_sweep(tmp_path_factory):
    r = _results(tmp_path_factory, "both_models")
    fig = headline_figure(r, fx.DATASET)
    protocols_panel, sweep_panel = fig.axes[0], fig.axes[1]
    assert [t.get_text() for t in protocols_panel.get_xticklabels()] == list(PROTOCOLS)
    assert len(fig.axes) == 2 * len(r.models)
    labels = sweep_panel.get_legend_handles_labels()[1]
    assert {"class_pure", "shuffled", "class_mixed", "class_pure, pooling control"} <= set(labels)
    assert "vanilla (noise none, clean)" in protocols_panel.get_legend_handles_labels()[1]


def test_the_batch_size_figure_draws_the_theory_on_a_second_axis(tmp_path_factory):
    fig = batch_size_figure(_results(tmp_path_factory, "both_models"), fx.DATASET)
    twins = [ax for ax in fig.axes if ax.get_ylabel().startswith("theory")]
    assert len(twins) == len(fx.MODELS)
    (line,) = twins[0].get_lines()
    ks = np.asarray(fx.SWEEP_KS, dtype=float)
    assert np.allclose(line.get_ydata(), (ks - 1) * np.log(ks + 1))  # paper eq. 19: ΔS* = (k−1)·ln(k+1)
    assert fig.axes[0].get_xscale() == "log"


def test_a_figure_without_data_says_so(tmp_path_factory):
    r = _results(tmp_path_factory, "no_sweeps")
    for draw in (batch_size_figure, purity_figure):
        assert NO_DATA in _texts(draw(r, fx.DATASET)), draw.__name__
    headline = headline_figure(r, fx.DATASET)
    assert NO_DATA in _texts(headline.axes[1]) and NO_DATA not in _texts(headline.axes[0])  # protocols still drawn
