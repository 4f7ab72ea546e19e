"""peftbench report: loading, aggregates, statistics against scipy, golden tables, LaTeX, bad input.

Regenerate the golden tables after an intended change of the output with
    PEFTBENCH_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_report.py -k golden
and review the diff of tests/golden/ before committing it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sst
from statsmodels.stats.multitest import multipletests
from typer.testing import CliRunner

from peftbench.cli import app
from peftbench.errors import UsageError
from peftbench.report import aggregate, build_report, load
from peftbench.report import stats as rstats
from peftbench.report.build import family, select
from peftbench.report.tables import Cell, Column, Table, escape_latex
from peftbench.results import SCHEMA_VERSION, ResultStore

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
REGEN = os.environ.get("PEFTBENCH_REGEN_GOLDEN") == "1"


def _generator():
    spec = importlib.util.spec_from_file_location(
        "report_store_gen", HERE / "fixtures/report_store/generate.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report_store")
    _generator().write(root)
    return root


@pytest.fixture(scope="module")
def frame(store) -> pd.DataFrame:
    return load(store)


@pytest.fixture(scope="module")
def cli_run(store, tmp_path_factory):
    """`peftbench report` on the fixture store (LaTeX and Markdown): (output folder, CLI result)."""
    out = tmp_path_factory.mktemp("report_out")
    args = [
        "report",
        "--results-dir",
        str(store),
        "--out",
        str(out),
        "--format",
        "latex,md",
        "--control",
        "mail_pp",
    ]
    return out, CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def tables(cli_run) -> Path:
    out, res = cli_run
    assert res.exit_code == 0, res.output
    return out


# ---------------------------------------------------------------------------------------------- loading
def test_load_latest_ok_records_and_failed_listed(frame):
    gen = _generator()
    recs = gen.records()
    latest: dict[str, dict] = {}
    for r in recs:  # append order = finished_at order in the fixture
        latest[r["config_hash"]] = r
    ok = [r for r in latest.values() if r["status"] == "ok"]
    assert frame["config_hash"].nunique() == len(ok)
    assert len(frame) == sum(len(r["metrics"]) for r in ok)
    failed = frame.attrs["failed"]
    assert [(f["method"], f["dataset"], f["shots"], f["seed"]) for f in failed] == [("coop", "dtd", 16, 3)]
    # the failed-then-retried cell is present with its ok value
    retried = frame[
        (frame.method_label == "clip_adapter") & (frame.dataset == "eurosat") & (frame.shots == 1)
    ]
    assert sorted(retried["seed"]) == [1, 2, 3]


def test_labels_group_by_user_overrides_not_resolved_defaults(frame):
    cls = frame[frame.task == "classification"]
    assert sorted(cls["method_label"].unique()) == [
        "clip_adapter", "coop", "mail_pp", "mail_pp[bridge=none]", "zeroshot",
    ]  # fmt: skip
    # resolved epochs differ between 1 and 16 shots, yet mail_pp stays one row
    agg = aggregate(frame)
    mail = agg[(agg.method_label == "mail_pp") & (agg.task == "classification")]
    assert set(mail["n"]) == {3} and len(mail) == 8 * 2
    ucdr = frame[frame.task == "ucdr"]
    assert sorted(ucdr["dataset_label"].unique()) == [
        "domainnet/clipart", "domainnet/infograph", "domainnet/painting", "domainnet/quickdraw",
        "domainnet/sketch", "sketchy", "tuberlin",
    ]  # fmt: skip


def test_never_average_across_backbones_or_variants(frame):
    other = frame.copy()
    other["backbone"] = "ViT-B-32@openai"
    other["value"] = other["value"] + 10.0
    agg = aggregate(pd.concat([frame, other], ignore_index=True))
    assert agg["n"].max() == 3  # seeds only, never pooled with another backbone
    a = agg[(agg.method_label == "mail_pp") & (agg.dataset_label == "dtd") & (agg.shots == 1)]
    assert sorted(a["backbone"]) == ["ViT-B-16-quickgelu@openai", "ViT-B-32@openai"]
    assert a["mean"].max() - a["mean"].min() == pytest.approx(10.0)


def test_aggregate_matches_scipy(frame):
    agg = aggregate(frame)
    row = agg[(agg.method_label == "coop") & (agg.dataset_label == "dtd") & (agg.shots == 1)].iloc[0]
    vals = frame[(frame.method_label == "coop") & (frame.dataset_label == "dtd") & (frame.shots == 1)][
        "value"
    ]
    lo, hi = sst.t.interval(0.95, len(vals) - 1, loc=vals.mean(), scale=sst.sem(vals))
    assert row["n"] == 3
    assert row["std"] == pytest.approx(np.std(vals, ddof=1))
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))


# ---------------------------------------------------------------------------------------------- statistics
def _means(rng, n_datasets, offsets) -> pd.DataFrame:
    base = rng.uniform(40, 90, n_datasets)
    return pd.DataFrame(
        {m: base + off + rng.normal(0, 0.5, n_datasets) for m, off in offsets.items()},
        index=[f"d{i}" for i in range(n_datasets)],
    )


def test_versus_control_matches_scipy_wilcoxon_and_holm():
    rng = np.random.default_rng(0)
    means = _means(rng, 9, {"ctrl": 0.0, "a": -3.0, "b": -0.1, "c": 2.0})
    res = rstats.versus_control(means, "ctrl", "higher")
    ps = [sst.wilcoxon(means[m], means["ctrl"]).pvalue for m in ("a", "b", "c")]
    holm = multipletests(ps, method="holm")[1]
    for m, p, ph in zip(("a", "b", "c"), ps, holm, strict=True):
        assert res["methods"][m]["p"] == pytest.approx(p)
        assert res["methods"][m]["p_holm"] == pytest.approx(ph)
    assert res["methods"]["a"]["worse"] and not res["methods"]["c"]["worse"] and res["methods"]["c"]["better"]
    # direction: when lower is better, the same numbers flip worse and better
    low = rstats.versus_control(means, "ctrl", "lower")
    assert low["methods"]["c"]["worse"] and not low["methods"]["a"]["worse"]


def test_exact_smallest_p_and_no_claim_below_six_pairs():
    # all 8 differences negative: the exact two-sided p is 2 / 2**8
    means = pd.DataFrame({"ctrl": np.arange(8.0) + 10, "x": np.arange(8.0) + 10 - np.linspace(1, 2, 8)})
    assert rstats.versus_control(means, "ctrl", "higher")["methods"]["x"]["p"] == pytest.approx(2 / 2**8)
    five = means.iloc[:5]
    r = rstats.versus_control(five, "ctrl", "higher")["methods"]["x"]
    assert r["test"] is None and r["p"] is None and not r["worse"] and "6" in r["reason"]
    diff = five["x"] - five["ctrl"]
    lo, hi = sst.t.interval(0.95, 4, loc=diff.mean(), scale=sst.sem(diff))
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    # and scipy agrees that 5 pairs cannot reach 0.05
    assert sst.wilcoxon(five["x"], five["ctrl"]).pvalue > 0.05


def test_friedman_nemenyi_matches_scipy_and_demsar_cd():
    rng = np.random.default_rng(1)
    means = _means(rng, 10, {"a": 0.0, "b": 1.0, "c": 2.0, "d": 2.5})
    res = rstats.friedman_nemenyi(means, "higher")
    fr = sst.friedmanchisquare(*(means[c] for c in means.columns))
    assert res["friedman"]["p"] == pytest.approx(fr.pvalue)
    assert res["friedman"]["statistic"] == pytest.approx(fr.statistic)
    ranks = means.rank(axis=1, ascending=False).mean()
    assert res["average_ranks"] == pytest.approx(ranks.to_dict())
    # Demsar (JMLR 2006), Table 5: q_0.05 = 2.569 for k = 4 -> CD = 2.569 sqrt(4*5 / (6*14)) on 14 datasets
    assert rstats.critical_difference(4, 14) == pytest.approx(2.569 * np.sqrt(20 / 84), abs=1e-3)
    assert "skipped" in rstats.friedman_nemenyi(means.iloc[:4], "higher")  # < 5 datasets
    assert "skipped" in rstats.friedman_nemenyi(means[["a", "b"]], "higher")  # < 3 methods


def test_metric_families_pick_each_datasets_metric(frame):
    assert family("map@200") == family("map@all") == "map" and family("map@200_mixed") == "map_mixed"
    rows = select(aggregate(frame[frame.task == "ucdr"]), "map")
    used = rows.groupby("dataset_label")["metric"].unique()
    assert list(used["tuberlin"]) == ["map@all"] and list(used["sketchy"]) == ["map@200"]


# ---------------------------------------------------------------------------------------------- tables
def test_golden_tables(tables):
    produced = sorted(p.name for p in (tables / "tables").iterdir())
    if REGEN:
        shutil.rmtree(GOLDEN, ignore_errors=True)
        GOLDEN.mkdir(parents=True)
        for name in produced:
            shutil.copy(tables / "tables" / name, GOLDEN / name)
    expected = sorted(p.name for p in GOLDEN.iterdir())
    assert produced == expected, (
        "table set changed; regenerate with PEFTBENCH_REGEN_GOLDEN=1 (see module doc)"
    )
    for name in produced:
        assert (tables / "tables" / name).read_text() == (GOLDEN / name).read_text(), name


def test_markers_follow_direction_and_ties():
    def table(direction):
        cells = {("a_b", 0): Cell(1.0, 0.1, 3), ("c", 0): Cell(2.0, 0.1, 3), ("d", 0): Cell(3.0, 0.1, 3),
                 ("e", 0): Cell(3.0, 0.2, 3)}  # fmt: skip
        return Table("t", "cap", [Column("x", direction=direction)], ["a_b", "c", "d", "e"], cells)

    hi, lo = table("higher").marks(), table("lower").marks()
    assert hi == {("d", 0): "best", ("e", 0): "best", ("c", 0): "second"}
    assert lo == {("a_b", 0): "best", ("c", 0): "second"}
    tex = table("lower").to_latex()
    assert r"\textbf{1.00 $\pm$ 0.10}" in tex and r"\underline{2.00 $\pm$ 0.10}" in tex and "a\\_b" in tex
    assert "**1.00 ± 0.10**" in table("lower").to_markdown()


def test_escape_latex():
    assert escape_latex("clip_adapter & 50% {x} #1 $ ~ ^ \\") == (
        r"clip\_adapter \& 50\% \{x\} \#1 \$ \textasciitilde{} \textasciicircum{} \textbackslash{}"
    )


def test_dagger_only_on_average_columns(tables):
    md = (tables / "tables" / "classification-acc-ViT-B-16-quickgelu-openai-k16_datasets.md").read_text()
    rows = [r for r in md.splitlines() if r.startswith("| ") and not r.startswith("| Method")]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert all("†" not in c for c in cells[1:-1])
    daggered = {r.split("|")[1].strip() for r in rows if "†" in r.split("|")[-2]}
    assert "zeroshot" in daggered and "mail\\_pp" not in daggered


@pytest.mark.skipif(
    shutil.which("pdflatex") is None,
    reason="pdflatex not installed (apt: texlive-latex-base "
    "texlive-latex-recommended); the LaTeX compile check needs it",
)
def test_latex_compiles(tables, tmp_path):
    body = "\n".join(rf"\input{{{p}}}" for p in sorted((tables / "tables").glob("*.tex")))
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs,graphicx}\n\\begin{document}\n"
                   f"{body}\n\\end{{document}}\n")  # fmt: skip
    out = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 0


# ---------------------------------------------------------------------------------------------- outputs
def test_stats_json_and_figures(store, frame, tmp_path):
    from peftbench.report import plots

    rep = build_report(frame[frame.task == "ucdr"], control="mail_pp")
    c = rep.comparisons[0]
    paths = plots.cd_diagram(c, tmp_path, ["png", "pdf"]) + plots.shots_curves(
        rep.aggregates, [x for x in rep.comparisons if x.metric == "map"], tmp_path, ["png"]
    )
    assert [p.suffix for p in paths] == [".png", ".pdf", ".png"] and all(
        p.stat().st_size > 1000 for p in paths
    )
    js = json.loads(json.dumps(c.to_json()))
    assert js["friedman_nemenyi"]["friedman"]["p"] < 0.05
    assert js["versus_control"]["methods"]["zeroshot"]["worse"]


def test_cli_report_writes_json_and_tables(cli_run):
    out, res = cli_run
    assert res.exit_code == 0, res.output
    assert "1 failed cell(s) not aggregated: coop/dtd/16-shot/seed 3" in res.output
    js = json.loads((out / "stats.json").read_text())
    assert js["metrics"] == {"classification": "acc", "ucdr": "map"}
    assert js["failed"][0]["method"] == "coop" and js["skipped"] == [] and js["refused"] == []
    cls16 = next(c for c in js["comparisons"] if c["task"] == "classification" and c["shots"] == 16)
    assert cls16["versus_control"]["control"] == "mail_pp" and len(cls16["means"]) == 8
    assert (out / "report.md").is_file() and (out / "aggregates.csv").is_file()
    assert not (out / "figures").exists()  # no png/pdf asked for


# ---------------------------------------------------------------------------------------------- bad input
def test_empty_store_says_how_to_run(tmp_path):
    res = CliRunner().invoke(app, ["report", "--results-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "peftbench run" in res.output


def test_unreadable_partial_and_other_schema_records(store, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(store, root)
    rec = _generator().records()[0]
    rs = ResultStore(root)
    (rs.cell_dir("ab" * 32)).mkdir(parents=True)
    (rs.cell_dir("ab" * 32) / "broken.json").write_text("{not json")
    rs.append({**rec, "config_hash": "cd" * 32, "record_id": "partial", "resolved": None})
    rs.append({**rec, "config_hash": "ef" * 32, "record_id": "future", "schema": SCHEMA_VERSION + 1})
    with pytest.warns(UserWarning, match="skipped 2 unreadable or partial"):
        frame = load(root)
    assert any("newer" in r for r in frame.attrs["refused"]) and len(frame.attrs["refused"]) == 1
    assert frame["config_hash"].nunique() == load(store, quiet=True)["config_hash"].nunique()


def test_unknown_metric_or_control_lists_choices(frame):
    with pytest.raises(UsageError, match=r"choices: acc, .*map@200"):
        build_report(frame, metric="top5")
    with pytest.raises(UsageError, match=r"choices: clip_adapter, coop, mail_pp, mail_pp\[bridge=none\]"):
        build_report(frame, control="mail")
    with pytest.raises(UsageError, match="--format"):
        from peftbench.report.writer import parse_formats

        parse_formats("latex,docx")


def test_all_tied_methods_give_json_safe_stats():
    means = pd.DataFrame({m: np.full(6, 50.0) for m in ("a", "b", "c")}, index=[f"d{i}" for i in range(6)])
    fr = rstats.friedman_nemenyi(means, "higher")
    vs = rstats.versus_control(means, "a", "higher")
    json.dumps({"fr": fr, "vs": vs}, allow_nan=False)  # raises on NaN
    assert vs["methods"]["b"]["p"] == 1.0 and not vs["methods"]["b"]["worse"]
