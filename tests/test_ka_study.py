"""The knowledge-attenuation study (issue 16): ``experiment=ka_study`` composes to its eight
rows, every evaluation scores the first batch in full and one fixed set of neighbourhood
prompts (``fixed/specificity``: at step 0 the unedited model's score of those prompts),
perplexity at start and end, and ``python -m kaedit.results.ka_study publish`` turns tiny
runs into summary.csv, copies and figures."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import (
    Compose,
    assert_close_to_scale,
    csv_approx,
    csv_rel,
    load_tiny,
    memit_crashes_at_call,
)
from kaedit import experiment
from kaedit.evaluate import CounterFactEval, Scorer, aggregate
from kaedit.evaluation import Evaluation
from kaedit.records import EditRequest
from kaedit.results import ka_study
from kaedit.results.plots import load_run, retained_aged, retention_by_age
from kaedit.schedule import Schedule, ScheduleError
from kaedit.setup import build_records
from test_experiments import check_binds, compose_with_hydra, sweep_points


# ------------------------------------------------------------------------- the config
@pytest.mark.parametrize("scale", ["paper", "cpu"])
def test_ka_study_sweeps_eight_rows(compose: Compose, scale: str) -> None:
    cfg = compose_with_hydra(compose, ["experiment=ka_study", f"scale={scale}"])
    points = sweep_points(OmegaConf.to_container(cfg.hydra.sweeper.params))
    rows = set()
    for point in points:
        job = compose(["experiment=ka_study", f"scale={scale}", *point])
        check_binds(job)
        s = job.schedule
        assert (s.n_edits, s.batch_size, s.eval_every) == (1000, 100, 1)
        assert s.first_batch_in_full and s.fixed_sample > 0 and s.retention_sample > 0
        # fluency/consistency and perplexity at step 0 and the last step, at both scales
        assert s.generation_every is None and job.perplexity.every is None
        assert job.dataset.name == "counterfact"
        assert job.fusion.scope == "layer"
        kind = job.fusion._target_.rsplit(".", 1)[-1]
        if kind == "DropRescale":
            assert job.fusion.p == 0.8
        rows.add((job.method._target_.rsplit(".", 1)[-1], kind))
        assert job.model.name == ("smollm2" if scale == "cpu" else "llama2")
    assert rows == {(m, f) for m in ("MEMIT", "PMET", "AdaPLE", "AlphaEdit")
                    for f in ("Add", "DropRescale")}
    # the CPU file has the records for 1,000 edits
    if scale == "cpu":
        assert len(build_records(job)) >= 1000


def test_bad_fixed_sample_is_a_schedule_error() -> None:
    with pytest.raises(ScheduleError, match=r"schedule\.fixed_sample=-1"):
        Schedule(fixed_sample=-1).batches(10)


# ------------------------------------------------------------------------- evaluation
class Recording:
    """An evaluator that records the requests of every call and scores each request by
    its index (efficacy = specificity = index / 100) -- to check which edits are scored."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], bool]] = []

    def __call__(self, scorer, requests: Sequence[EditRequest], texts=None) -> dict:
        self.calls.append(([r.case_id for r in requests], texts is not None))
        v = np.array([int(r.case_id) / 100 for r in requests])
        out = {"efficacy": v, "generalization": v, "specificity": v, "specificity_mag": v}
        if texts is not None:
            out["fluency"] = v
        return out


def test_fixed_set_and_first_batch_are_the_same_at_every_step() -> None:
    planned = [EditRequest(case_id=str(i), subject="s", prompt="{} p", target_new="n")
               for i in range(40)]
    rec = Recording()
    ev = Evaluation(rec, scorer=None, planned=planned, sample=3, seed=0, texts=object(),
                    first_batch=range(10), fixed=5)
    assert len(ev.fixed) == 5 and set(ev.fixed) <= set(range(40))
    fixed = list(ev.fixed)
    for step, n_done in enumerate((0, 10, 20, 30)):
        batch = list(range(max(0, n_done - 10), n_done)) or list(range(10))
        before = len(rec.calls)
        row, tracked, values = ev(batch, n_done, generate=step in (0, 3))
        calls = rec.calls[before:]
        scored = [int(i) for ids, _ in calls for i in ids]
        assert len(scored) == len(set(scored))  # each request once per evaluation
        seen = ev.seen_indices(n_done)
        # the batch and the sample get text metrics on generation steps; the first batch
        # and the fixed set are scored in a second call, never with text metrics
        assert calls[0] == ([str(i) for i in sorted(set(batch) | set(seen))], step in (0, 3))
        assert not any(with_texts for _, with_texts in calls[1:])
        assert set(fixed) | set(range(10)) <= set(scored)
        assert ev.fixed == fixed  # the same fixed set at every step
        assert tracked == sorted(set(seen) | set(range(10)))
        assert row["seen/efficacy"] == pytest.approx(np.mean(seen))  # the sample only
        assert row["fixed/specificity"] == pytest.approx(np.mean(fixed))
        assert "fixed/efficacy" not in row  # only the neighbourhood metrics
        assert values["efficacy"].tolist() == pytest.approx([i / 100 for i in tracked])


# ------------------------------------------------------------------------- tiny runs
@pytest.fixture(scope="module")
def study_runs(tmp_path_factory: pytest.TempPathFactory, compose: Compose,
               tiny_run_overrides: list[str], tiny_rome_dataset: Path,
               tiny_corpus: Path) -> list[Path]:
    """Four tiny runs with the study's evaluation (:data:`RUNS`):
    8 edits in 4 batches of 2, a seen sample of 1, the first batch in full, a fixed set
    of 3, generation and perplexity at start and end."""
    root = tmp_path_factory.mktemp("ka")
    base = study_overrides(tiny_run_overrides, tiny_rome_dataset, tiny_corpus)
    dirs = []
    # tracking.choices: what python -m kaedit.run fills from Hydra's group choices
    for name, fusion in RUNS.items():
        dirs.append(root / name)
        experiment.run(compose([*base, *fusion]), run_dir=str(dirs[-1]))
    return dirs


#: The tiny runs: MEMIT with fusion=add and with layer-scoped DR p=0.8 and p=0.5, PMET
#: with add.
RUNS = {"memit-add": ["fusion=add", "+tracking.choices.fusion=add"],
        "memit-dr": ["fusion=drop_rescale", "fusion.scope=layer",
                     "+tracking.choices.fusion=drop_rescale"],
        "memit-dr5": ["fusion=drop_rescale", "fusion.scope=layer", "fusion.p=0.5",
                      "+tracking.choices.fusion=drop_rescale"],
        "pmet-add": ["method=pmet", "+tracking.choices.method=pmet", "fusion=add",
                     "+tracking.choices.fusion=add"]}


def study_overrides(tiny_run_overrides: list[str], tiny_rome_dataset: Path,
                    tiny_corpus: Path) -> list[str]:
    return [*tiny_run_overrides, f"dataset.path='{tiny_rome_dataset}'", "schedule.n_edits=8",
            "schedule.batch_size=2", "schedule.retention_sample=1",
            "schedule.first_batch_in_full=true", "schedule.fixed_sample=3",
            "schedule.generation_every=null", "generation.max_new_tokens=4",
            "perplexity.every=null", f"perplexity.corpus=['{tiny_corpus}']",
            "perplexity.n_tokens=256", "perplexity.seq_len=64"]


def test_first_batch_is_scored_in_full_and_seen_stays_the_sample(study_runs: list[Path]) -> None:
    run_dir = study_runs[0]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    retention = pd.read_csv(run_dir / "retention.csv")
    assert metrics["step"].tolist() == [0, 1, 2, 3, 4]
    for step in range(1, 5):
        at = retention[retention["step"] == step]
        first = at[at["step_made"] == 1]
        assert sorted(first["case_id"]) == [0, 1]  # every edit of the first batch
        assert len(at) <= 3  # the sample of one, and the first batch
        logged = metrics.loc[metrics["step"] == step, "retention/first_batch"].item()
        # 6 digits of the mean (metrics.csv) vs the mean of 6-digit values (retention.csv)
        assert logged == csv_approx(100 * first["efficacy"].mean(), roundings=2)


def test_fixed_specificity_at_step_0_is_the_unedited_models_score(
        study_runs: list[Path], compose: Compose) -> None:
    run_dir = study_runs[0]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["fixed/specificity"].notna().all()  # every evaluated step
    assert metrics["fixed/specificity_mag"].notna().all()
    # perplexity and fluency: the unedited and the final model only
    for column in ("general/perplexity", "seen/fluency"):
        assert metrics.dropna(subset=[column])["step"].tolist() == [0, 4], column

    cfg = OmegaConf.load(run_dir / "config.yaml")
    records = build_records(cfg)
    planned = records[:8]
    fixed = Evaluation(CounterFactEval(), None, planned, 1, int(cfg.seed), fixed=3).fixed
    lm = load_tiny(compose, "tiny_llama")  # the unedited model the run started from
    values = CounterFactEval()(Scorer(lm, 64), [planned[i] for i in fixed])
    expected = aggregate(values, "fixed")
    step0 = metrics[metrics["step"] == 0].iloc[0]
    # the same scoring code on other batch compositions (padding): float32 rounding only
    assert_close_to_scale(
        torch.tensor([step0["fixed/specificity"], step0["fixed/specificity_mag"]]),
        torch.tensor([expected["fixed/specificity"], expected["fixed/specificity_mag"]]),
        rel=1e-4, msg="fixed set at step 0 vs the unedited model")


def test_study_run_resumes_to_the_same_rows(
        study_runs: list[Path], compose: Compose, tiny_run_overrides: list[str],
        tiny_rome_dataset: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    """Killed while computing step 3 (after step 2's checkpoint), resumed with
    resume=RUN_DIR: the same metrics.csv and retention.csv as the uninterrupted run (the
    fixed set and the first batch are chosen again, identically, from the seed)."""
    overrides = [*study_overrides(tiny_run_overrides, tiny_rome_dataset, tiny_corpus),
                 *RUNS["memit-dr"]]
    run_dir = tmp_path / "memit-dr"
    with memit_crashes_at_call(3), pytest.raises(RuntimeError, match="simulated crash"):
        experiment.run(compose(overrides), run_dir=str(run_dir))
    experiment.run(compose([*overrides, f"resume={run_dir}"]))

    def untimed(path: Path) -> pd.DataFrame:
        df = pd.read_csv(path)
        return df[[c for c in df.columns if not c.startswith("time/")]]

    ref = study_runs[1]
    pd.testing.assert_frame_equal(untimed(run_dir / "metrics.csv"), untimed(ref / "metrics.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "retention.csv"),
                                  pd.read_csv(ref / "retention.csv"))


def test_publish_writes_summary_copies_and_figures(study_runs: list[Path],
                                                   tmp_path: Path) -> None:
    out = tmp_path / "ka-1k"
    assert ka_study.main(["publish", *map(str, study_runs), "--out", str(out)]) == 0
    table = pd.read_csv(out / "summary.csv")
    assert table["run"].tolist() == ["memit-add", "memit-dr", "memit-dr5", "pmet-add"]
    assert table["method"].tolist() == ["memit", "memit", "memit", "pmet"]
    assert table["fusion"].tolist() == ["add", "drop_rescale", "drop_rescale", "add"]
    assert table["scope"].tolist() == ["step", "layer", "layer", "step"]
    assert np.isnan(table["p"][0]) and table["p"][1:3].tolist() == [0.8, 0.5]
    assert (table["batch_size"] == 2).all() and (table["edits_done"] == 8).all()
    assert (table["status"] == "done").all()
    for run in study_runs:
        metrics = pd.read_csv(run / "metrics.csv")
        row = table[table["run"] == run.name].iloc[0]
        last = metrics.iloc[-1]
        # from summary.json (full precision), each printed with %.6g: the last metrics row
        # printed the same float, but a CSV digit apart is all the files promise
        for column in ("seen/efficacy", "seen/generalization", "seen/specificity",
                       "seen/score", "retention/first_batch"):
            assert row[column] == csv_approx(last[column]), column
        # the rest are read from metrics.csv and printed again with %.6g: the same digits,
        # so approx's default rel=1e-6 (far above float64 parsing noise) holds exactly
        assert row["fixed_specificity_end"] == pytest.approx(last["fixed/specificity"])
        assert row["perplexity_start"] == pytest.approx(metrics["general/perplexity"][0])
        assert row["perplexity_end"] == pytest.approx(last["general/perplexity"])
        assert row["fluency_start"] == pytest.approx(metrics["seen/fluency"][0])
        assert not np.isnan(row["consistency_end"])
        summary = json.loads((run / "summary.json").read_text())
        assert row["time_s"] == csv_approx(summary["elapsed_s"]) and row["time_s"] > 0
        assert isinstance(row["machine"], str)
        assert row["drift_end"] == pytest.approx(last["update/total_rel"]) and row["drift_end"] > 0
        assert row["drift_norm_end"] == pytest.approx(last["update/total_norm"])
        # add changes nothing; DR's change is ‖Δ‖·√(p/(1 − p)) in expectation (2‖Δ‖ at
        # p = 0.8, ‖Δ‖ at 0.5): a few thousand entries put one step within a few per cent
        if row["fusion"] == "add":
            assert row["fusion_change_ratio"] == 0
        else:
            expected = np.sqrt(row["p"] / (1 - row["p"]))
            assert row["fusion_change_ratio"] == pytest.approx(expected, rel=0.1)
        for name in ("metrics.csv", "retention.csv", "summary.json", "config.yaml",
                     "retention.png"):
            assert (out / run.name / name).is_file(), name
        assert (out / run.name / "metrics.csv").read_text() == (run / "metrics.csv").read_text()
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"seen_efficacy.png", "seen_generalization.png", "seen_specificity.png",
            "seen_score.png", "fixed_specificity.png", "first_batch.png", "perplexity.png",
            "compare.png", "drop_rate.png", "retained_by_age.png"} == figures
    # the attenuation column under its new name; retention by age of every run
    assert "ka_drop" not in table and "batch_minus_seen_efficacy" in table
    by_age = pd.read_csv(out / "retention_by_age.csv")
    assert by_age["run"].unique().tolist() == table["run"].tolist()
    assert set(by_age["metric"]) == {"efficacy"}  # no WILD in these runs
    assert (by_age["no_own_step"] == 0).all()  # every step evaluated: all have their own row
    for run in study_runs:
        expected = retention_by_age(pd.read_csv(run / "retention.csv"))
        got = by_age[by_age["run"] == run.name].drop(columns=["run", "metric"])
        got = got.reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected, check_dtype=False, rtol=csv_rel())
        row = table[table["run"] == run.name].iloc[0]
        assert row["retained_aged"] == csv_approx(retained_aged(expected)["retained_aged"])
        assert row["retained_aged_n"] == retained_aged(expected)["retained_aged_n"] > 0
    assert json.loads((out / "memit-add" / "summary.json").read_text())["edits_done"] == 8


def test_a_published_copy_publishes_again_to_the_same_summary(study_runs: list[Path],
                                                               tmp_path: Path) -> None:
    """The copies in ``<out>/<run>/`` are enough to publish again (new columns on old
    results): the same status, steps, override columns and metrics. What only a
    checkpoint holds (``drift_norm_end`` of runs that did not log it) is not copied."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert ka_study.main(["publish", *map(str, study_runs), "--out", str(first)]) == 0
    copies = [first / run.name for run in study_runs]
    for run, copy in zip(study_runs, copies, strict=True):  # runs made without Hydra have
        for name in ("resume.json", ".hydra/overrides.yaml"):  # no .hydra/: copied if there
            assert (copy / name).is_file() == (run / name).is_file(), name
    assert all((c / "resume.json").is_file() for c in copies)
    assert ka_study.main(["publish", *map(str, copies), "--out", str(second)]) == 0
    a, b = (pd.read_csv(d / "summary.csv") for d in (first, second))
    assert (b["status"] == "done").all()
    # time_s is summary.json's elapsed_s, copied: the same (to the CSV's digits)
    assert b["time_s"].tolist() == [csv_approx(t) for t in a["time_s"]]
    drop = ["time_s", "machine"]
    pd.testing.assert_frame_equal(a.drop(columns=drop), b.drop(columns=drop))
    for f in ("paired.csv", "retention_by_age.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(first / f), pd.read_csv(second / f))
    # copies published before resume.json was copied: a summary.json is a finished run
    for c in copies:
        (c / "resume.json").unlink()
    assert ka_study.main(["publish", *map(str, copies), "--out", str(tmp_path / "third")]) == 0
    assert (pd.read_csv(tmp_path / "third" / "summary.csv")["status"] == "done").all()
    # runs from before summary.json had elapsed_s: the seconds of their metrics rows
    for c in copies:
        summary = json.loads((c / "summary.json").read_text())
        summary.pop("elapsed_s")
        (c / "summary.json").write_text(json.dumps(summary))
    assert ka_study.main(["publish", *map(str, copies), "--out", str(tmp_path / "fourth")]) == 0
    old = pd.read_csv(tmp_path / "fourth" / "summary.csv").set_index("run")
    for c in copies:
        rows = pd.read_csv(c / "metrics.csv")
        assert old.loc[c.name, "time_s"] == csv_approx(
            rows[["time/step_s", "time/eval_s"]].sum().sum())


def test_paired_compares_runs_record_by_record(study_runs: list[Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ka-1k"
    assert ka_study.main(["publish", *map(str, study_runs), "--out", str(out)]) == 0
    retention = {run.name: pd.read_csv(run / "retention.csv") for run in study_runs}
    # fusions within a method: MEMIT's two DR runs against add (the baseline; PMET has no
    # DR run); methods within a fusion: PMET against MEMIT, both with add (the DR runs
    # have no PMET partner); drop rates: MEMIT DR p = 0.5 against p = 0.8 (add has no p).
    # Two subsets, three metrics each.
    for file, shared, pairs_expected in (
            ("paired.csv", "method", {("memit-add", "memit-dr"), ("memit-add", "memit-dr5")}),
            ("paired_methods.csv", "fusion", {("memit-add", "pmet-add")}),
            ("paired_p.csv", "method", {("memit-dr", "memit-dr5")})):
        pairs = pd.read_csv(out / file)
        assert set(zip(pairs["a"], pairs["b"], strict=True)) == pairs_expected, file
        assert len(pairs) == 6 * len(pairs_expected) and (pairs["step"] == 4).all()
        assert pairs.columns[0] == shared
        for _, row in pairs.iterrows():
            a, b = (retention[row[name]] for name in ("a", "b"))
            a, b = (df[(df["step"] == 4) & (df["step_made"] > 0)] for df in (a, b))
            if row["subset"] == "first_batch":
                a, b = a[a["step_made"] == 1], b[b["step_made"] == 1]
            assert row["n"] == len(a) == len(b)
            assert a["case_id"].tolist() == b["case_id"].tolist()  # the same edits
            # paired*.csv: %.6g of the mean of the same retention.csv values
            assert row["mean_a"] == csv_approx(100 * a[row["metric"]].mean())
            assert row["mean_b"] == csv_approx(100 * b[row["metric"]].mean())
            assert 0 <= row["p_sign"] <= row["p_holm"] <= 1
    assert pd.read_csv(out / "paired_methods.csv")["fusion"].eq("add").all()
    # p_holm: one family over the three files (in the order written), beside p_sign
    files = [pd.read_csv(out / f) for f in ("paired.csv", "paired_methods.csv", "paired_p.csv")]
    assert all(list(t.columns[-2:]) == ["p_sign", "p_holm"] for t in files)
    raw = np.concatenate([t["p_sign"] for t in files])
    np.testing.assert_allclose(np.concatenate([t["p_holm"] for t in files]),
                               ka_study.holm(raw), rtol=csv_rel(roundings=2))
    p_pairs = pd.read_csv(out / "paired_p.csv")
    assert (p_pairs["p_a"] == 0.8).all() and (p_pairs["p_b"] == 0.5).all()

    def pairs_with(option: str, value: str, file: str) -> set[tuple[str, str]]:
        assert ka_study.main(["publish", *map(str, study_runs), "--out", str(out),
                              option, value]) == 0
        pairs = pd.read_csv(out / file)
        return set(zip(pairs["a"], pairs["b"], strict=True))

    assert pairs_with("--method-baseline", "pmet", "paired_methods.csv") == {
        ("pmet-add", "memit-add")}
    assert pairs_with("--baseline", "drop_rescale", "paired.csv") == {
        ("memit-dr", "memit-add"), ("memit-dr5", "memit-add")}
    assert pairs_with("--p-baseline", "0.5", "paired_p.csv") == {("memit-dr5", "memit-dr")}
    # a baseline no run has: exit 2 naming it and the runs' values, nothing rewritten
    for option, value, named in (("--baseline", "dr", "'add', 'drop_rescale'"),
                                 ("--method-baseline", "rome", "'memit', 'pmet'"),
                                 ("--p-baseline", "0.3", "[0.5, 0.8]")):
        before = {f: (out / f).read_text() for f in ("summary.csv", "paired.csv",
                                                     "paired_methods.csv", "paired_p.csv")}
        assert ka_study.main(["publish", *map(str, study_runs), "--out", str(out),
                              option, value]) == 2
        err = capsys.readouterr().err
        assert option in err and value in err and named in err, err
        assert {f: (out / f).read_text() for f in before} == before
    with pytest.raises(SystemExit) as exc:  # argparse: not a number
        ka_study.main(["publish", *map(str, study_runs), "--out", str(out),
                       "--p-baseline", "high"])
    assert exc.value.code == 2 and "'high'" in capsys.readouterr().err


def test_ignore_pairs_runs_that_differ_in_a_key_their_method_never_reads(
        study_runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A run made before a model key existed (a module path added later, which its method
    never reads) is not paired with newer runs; ``--ignore KEY`` pairs it again, with the
    same numbers; a key outside the compared nodes is one error that writes nothing."""
    first = tmp_path / "first"
    assert ka_study.main(["publish", *map(str, study_runs), "--out", str(first)]) == 0
    older = tmp_path / "runs" / "pmet-add"
    shutil.copytree(study_runs[3], older)
    config = yaml.safe_load((older / "config.yaml").read_text())
    assert config["model"]["modules"].pop("mlp_gate")
    (older / "config.yaml").write_text(yaml.safe_dump(config))
    runs = [*map(str, study_runs[:3]), str(older)]
    out = tmp_path / "out"
    assert ka_study.main(["publish", *runs, "--out", str(out)]) == 0
    assert pd.read_csv(out / "paired_methods.csv").empty
    assert ka_study.main(["publish", *runs, "--out", str(out),
                          "--ignore", "model.modules.mlp_gate"]) == 0
    got, want = (pd.read_csv(d / "paired_methods.csv") for d in (out, first))
    pd.testing.assert_frame_equal(got, want)
    before = (out / "summary.csv").read_text()
    assert ka_study.main(["publish", *runs, "--out", str(out), "--ignore", "logger.mode"]) == 2
    assert "logger.mode" in capsys.readouterr().err
    assert (out / "summary.csv").read_text() == before


def test_drop_rate_groups_put_add_at_p_zero(study_runs: list[Path]) -> None:
    runs = [load_run(d) for d in study_runs]
    rows = [ka_study.run_row(run) for run in runs]
    groups = ka_study.drop_rate_groups(runs, rows)
    # one group: MEMIT's layer-scoped DR at 0.5 and 0.8, with its add run at 0; PMET has
    # only add, so no group
    assert len(groups) == 1
    label, points = groups[0]
    assert "memit" in label and "layer" in label
    assert [(r["run"], r["p"]) for r in points] == [
        ("memit-add", 0.0), ("memit-dr5", 0.5), ("memit-dr", 0.8)]
    assert not ka_study.drop_rate_groups(runs[3:], rows[3:])  # PMET add alone


def test_drift_norm_of_runs_without_update_columns_comes_from_the_checkpoint(
        study_runs: list[Path], tmp_path: Path) -> None:
    """A run logged before ``update/*`` existed: ‖W − W₀‖ at the end is the norm of its
    last checkpoint's deltas, the same number the runner logs as update/total_norm."""
    for source in study_runs[:3]:  # add, DR 0.8, DR 0.5
        old = tmp_path / source.name
        shutil.copytree(source, old)
        metrics = pd.read_csv(old / "metrics.csv")
        logged = metrics["update/total_norm"].iloc[-1]
        metrics.drop(columns=[c for c in metrics if c.startswith("update/")]).to_csv(
            old / "metrics.csv", index=False)
        row = ka_study.run_row(load_run(old))
        assert np.isnan(row["drift_end"]) and np.isnan(row["fusion_change_ratio"])
        # the same float32 tensors (the checkpoint keeps edits.total), squared and summed in
        # float64 either way (order noise ~1e-16); `logged` went through metrics.csv's
        # f"{v:.6g}": off by up to 5e-6 of the value (issue 25: rel=1e-6 failed)
        assert row["drift_norm_end"] == csv_approx(logged)
        # a checkpoint of an earlier step (a run cut short after its last metrics row
        # was kept) or none: not the end's weights, so NaN
        state = old / "checkpoint" / "latest.json"
        saved = json.loads(state.read_text())
        folder = old / "checkpoint" / saved["path"]
        step = json.loads((folder / "state.json").read_text())
        step["step"] -= 1
        (folder / "state.json").write_text(json.dumps(step))
        assert np.isnan(ka_study.drift_norm_end(load_run(old)))
        shutil.rmtree(old / "checkpoint")
        assert np.isnan(ka_study.drift_norm_end(load_run(old)))


def test_without_leaves_out_one_dotted_node() -> None:
    config = {"method": {"layers": [1, 2]}, "fusion": {"_target_": "DR", "p": 0.8},
              "seed": 0, "logger": {"mode": "offline"}}
    assert ka_study.without(config, "fusion.p")["fusion"] == {"_target_": "DR"}
    assert "fusion" not in ka_study.without(config, "fusion")
    assert ka_study.without(config, "method")["fusion"] == config["fusion"]
    assert config["fusion"]["p"] == 0.8  # the run's config is not changed
    # only SETTINGS count: the logger is left out, a missing setting is None
    kept = ka_study.without(config, "fusion.p")
    assert "logger" not in kept and kept["model"] is None
    # a null setting (fusion.seed: null, added after older runs) is the same as none; a
    # set one is not
    newer = {**config, "fusion": {**config["fusion"], "seed": None}}
    assert ka_study.without(newer, "fusion.p") == kept
    replicate = {**config, "fusion": {**config["fusion"], "seed": 1}}
    assert ka_study.without(replicate, "fusion.p") != kept


def test_compare_records_is_an_exact_sign_test_on_the_records_that_differ() -> None:
    ids = list(range(12))
    a = pd.DataFrame({"case_id": ids, "efficacy": [0] * 10 + [1, 1]})
    # b: 9 records up, 1 down, 2 tied; a record b did not track is left out
    b = pd.DataFrame({"case_id": [*ids, 99],
                      "efficacy": [1] * 9 + [0] + [0, 1] + [1]})
    row = ka_study.compare_records(a, b, "efficacy")
    assert (row["n"], row["b_higher"], row["a_higher"]) == (12, 9, 1)
    assert row["mean_a"] == pytest.approx(100 * 2 / 12)
    assert row["mean_b"] == pytest.approx(100 * 10 / 12)
    assert row["diff"] == pytest.approx(100 * 8 / 12)
    # two-sided P(X <= 1 or X >= 9), X ~ Bin(10, 1/2)
    assert row["p_sign"] == pytest.approx(2 * (1 + 10) / 2**10)
    same = ka_study.compare_records(a, a, "efficacy")
    assert (same["b_higher"], same["a_higher"], same["p_sign"]) == (0, 0, 1.0)


def test_publish_rejects_a_directory_without_a_run(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    assert ka_study.main(["publish", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no metrics.csv" in capsys.readouterr().err


def test_holm_adjusts_a_worked_example() -> None:
    """By hand: m = 4, sorted 0.005, 0.01, 0.03, 0.04 → 4·0.005 = 0.02, 3·0.01 = 0.03,
    2·0.03 = 0.06, 1·0.04 = 0.04 → running maximum 0.02, 0.03, 0.06, 0.06 (the last
    raised to keep the order), given back in the input order; NaN is not counted."""
    p = [0.01, 0.04, math.nan, 0.03, 0.005]
    got = ka_study.holm(p)
    np.testing.assert_allclose(got, [0.03, 0.06, math.nan, 0.06, 0.02])
    # capped at 1: 2·0.6 = 1.2 → 1, and the running maximum keeps the larger one at 1
    np.testing.assert_allclose(ka_study.holm([0.6, 0.7]), [1.0, 1.0])
    assert ka_study.holm([]).shape == (0,)


def test_holm_is_monotone_at_least_raw_and_at_most_one() -> None:
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0, 1, 200), rng.uniform(0, 1e-4, 20), [1.0, 1.0, 0.0]])
    adj = ka_study.holm(p)
    order = np.argsort(p, kind="stable")
    assert (np.diff(adj[order]) >= 0).all()  # the same order as the raw p-values
    assert (adj >= p).all() and (adj <= 1).all()
    # the smallest is multiplied by m (Bonferroni), the largest never below its raw value
    assert adj[order[0]] == pytest.approx(min(1.0, len(p) * p[order[0]]))


def test_adjust_family_spans_every_table() -> None:
    a = pd.DataFrame({"x": [1, 2], "p_sign": [0.01, 0.04], "n": [5, 5]})
    b = pd.DataFrame({"x": [3, 4], "p_sign": [0.03, 0.005], "n": [5, 5]})
    ka_study.adjust_family({"a": a, "b": b})
    assert list(a.columns) == ["x", "p_sign", "p_holm", "n"]
    np.testing.assert_allclose([*a["p_holm"], *b["p_holm"]], [0.03, 0.06, 0.06, 0.02])


# ------------------------------------------------------------- retention by age (B)
def retention_rows(rows: Sequence[tuple[int, str, int, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["step", "case_id", "step_made", "efficacy"])


def test_retention_by_age_by_hand() -> None:
    """Edits a, b, c made at step 1 (b fails at once), d, e at step 2, f at step 3; g, made
    at step 2, is tracked only at step 3 (no own-step row). By hand:

    * step 2, age 1 (made 1): tracked a b c; b failed at once; n = 2 (a, c), kept 1 (a);
    * step 3, age 1 (made 2): tracked d e g; g has no own row; n = 2 (d, e), kept 1 (d);
    * step 3, age 2 (made 1): tracked a b c; n = 2 (a, c), kept 0 (b's 1 does not count:
      it failed at its own step);
    * retained_aged at step 3: (1 + 0) / (2 + 2) = 25 %, 4 edits, 1 left out."""
    rows = retention_rows([
        (0, "a", 0, 0), (0, "b", 0, 1),  # the unedited model: not an edit yet
        (1, "a", 1, 1), (1, "b", 1, 0), (1, "c", 1, 1),
        (2, "a", 1, 1), (2, "b", 1, 1), (2, "c", 1, 0), (2, "d", 2, 1), (2, "e", 2, 1),
        (3, "a", 1, 0), (3, "b", 1, 1), (3, "c", 1, 0), (3, "d", 2, 1), (3, "e", 2, 0),
        (3, "f", 3, 1), (3, "g", 2, 1)])
    table = retention_by_age(rows)
    assert table[["step", "age", "step_made"]].values.tolist() == [[2, 1, 1], [3, 1, 2],
                                                                    [3, 2, 1]]
    assert table["tracked"].tolist() == [3, 3, 3]
    assert table["no_own_step"].tolist() == [0, 1, 0]
    assert table["failed_own_step"].tolist() == [1, 0, 1]
    assert table["n"].tolist() == [2, 2, 2]
    assert table["kept"].tolist() == [1, 1, 0]
    assert table["retained"].tolist() == [50.0, 50.0, 0.0]
    assert retained_aged(table) == {"retained_aged": 25.0, "retained_aged_n": 4,
                                    "retained_aged_no_own_step": 1}


def test_retention_by_age_counts_only_whole_successes_and_empty_is_nan() -> None:
    # zsRE-like values: 0.5 at its own step is not a success; nothing learnt: NaN, not 0
    table = retention_by_age(retention_rows([(1, "a", 1, 0.5), (2, "a", 1, 1.0)]))
    assert table[["failed_own_step", "n", "kept"]].values.tolist() == [[1, 0, 0]]
    assert np.isnan(table["retained"].item())
    assert np.isnan(retained_aged(table)["retained_aged"])
    only_new = retention_by_age(retention_rows([(0, "a", 0, 1.0), (1, "a", 1, 1.0)]))
    assert only_new.empty and np.isnan(retained_aged(only_new)["retained_aged"])


@pytest.mark.parametrize(("eval_every", "missing"), [(1, False), (2, True)])
def test_every_sampled_edit_has_its_own_step_row_when_every_step_is_evaluated(
        eval_every: int, missing: bool) -> None:
    """The seen sample (the first N of one seeded order among the edits made so far) with
    the first batch in full: an edit tracked at step t was tracked at its own step, so
    with every step evaluated no edit is left out; evaluated every other step, the edits
    of the skipped steps (and the first batch's) have no own-step row."""
    planned = [EditRequest(case_id=str(i), subject="s", prompt="{} p", target_new="n")
               for i in range(60)]
    ev = Evaluation(Recording(), scorer=None, planned=planned, sample=7, seed=3,
                    first_batch=range(4))
    made_at = [i // 4 + 1 for i in range(60)]  # 15 steps of 4
    rows = [(step, str(i), made_at[i] if i < 4 * step else 0, 1.0)
            for step in range(16) if step % eval_every == 0 or step == 15
            for i in ev.tracked_indices(4 * step)]
    table = retention_by_age(retention_rows(rows))
    assert (table["no_own_step"].sum() > 0) == missing
    assert (table["tracked"] == table["no_own_step"] + table["n"]).all()  # all 1.0


def test_read_summary_reads_old_files(tmp_path: Path) -> None:
    pd.DataFrame({"run": ["x"], "ka_drop": [9.8]}).to_csv(tmp_path / "old.csv", index=False)
    assert ka_study.read_summary(tmp_path / "old.csv")["batch_minus_seen_efficacy"].item() == 9.8
    new = pd.DataFrame({"run": ["x"], "batch_minus_seen_efficacy": [1.0]})
    new.to_csv(tmp_path / "new.csv", index=False)
    pd.testing.assert_frame_equal(ka_study.read_summary(tmp_path / "new.csv"), new)


def test_wild_end_reads_the_last_step_that_scored_wild(tmp_path: Path) -> None:
    """wild_end: wild/seen/* at step 0 and at its last logged step; the first batch's WILD
    exact match at the last step that has it (not at a later step without WILD, nor an
    earlier one), from the edits made at step 1 only."""
    from kaedit.results.plots import Run

    metrics = pd.DataFrame({"step": [0, 1, 2, 3],
                            "wild/seen/efficacy": [1.0, 20.0, 30.0, np.nan],
                            "wild/seen/locality": [100.0, np.nan, 40.0, np.nan]})
    retention = pd.DataFrame({
        "step": [1, 1, 2, 2, 2, 3, 3],
        "step_made": [1, 1, 1, 1, 2, 1, 1],
        "case_id": [7, 8, 7, 8, 9, 7, 8],
        "wild_efficacy": [1, 1, 1, 0, 0, np.nan, np.nan]})
    got = ka_study.wild_end(Run(tmp_path, metrics, retention, {}))
    assert got == {"wild_efficacy_start": 1.0, "wild_efficacy_end": 30.0,
                   "wild_locality_start": 100.0, "wild_locality_end": 40.0,
                   "wild_first_batch_end": 50.0}
    assert ka_study.wild_end(Run(tmp_path, metrics[["step"]], None, {})) == {}


def test_paired_adds_wild_scores_where_both_runs_have_them_at_the_compared_step(
        study_runs: list[Path], tmp_path: Path) -> None:
    """WILD scores in ``retention.csv`` (only on WILD steps) are compared record by record
    too, where both runs scored them at the compared step: MEMIT add against DR p = 0.8
    gets three more metrics per subset; DR p = 0.5, without WILD, keeps three."""
    runs = tmp_path / "runs"
    rng = np.random.default_rng(0)
    copies = []
    for src in study_runs:
        dst = runs / src.name
        shutil.copytree(src, dst)
        copies.append(dst)
        if src.name in ("memit-add", "memit-dr"):
            ret = pd.read_csv(dst / "retention.csv")
            last = ret["step"] == ret["step"].max()
            for metric in ka_study.WILD_PAIRED_METRICS:
                ret[metric] = np.where(last, rng.integers(0, 2, len(ret)), np.nan)
            ret.to_csv(dst / "retention.csv", index=False)
            metrics = pd.read_csv(dst / "metrics.csv")  # WILD at the start and the end
            ends = metrics["step"].isin([0, metrics["step"].max()])
            metrics["wild/seen/locality"] = np.where(
                metrics["step"] == 0, 100.0, np.where(ends, rng.uniform(0, 100), np.nan))
            metrics.to_csv(dst / "metrics.csv", index=False)
        if src.name == "pmet-add":  # WILD at every step: its retention by age as well
            ret = pd.read_csv(dst / "retention.csv")
            ret["wild_efficacy"] = ret["efficacy"]
            ret.to_csv(dst / "retention.csv", index=False)
    out = tmp_path / "out"
    assert ka_study.main(["publish", *map(str, copies), "--out", str(out)]) == 0
    summary = ka_study.read_summary(out / "summary.csv").set_index("run")
    every = summary.loc["pmet-add"]
    assert every["wild_retained_aged"] == csv_approx(every["retained_aged"])
    assert every["wild_retained_aged_n"] == every["retained_aged_n"] > 0
    assert every["wild_retained_aged_tf"] == csv_approx(every["retained_aged"])
    last_only = summary.loc["memit-add"]  # no aged edit has WILD at its own step
    assert last_only["wild_retained_aged_n"] == 0 and np.isnan(last_only["wild_retained_aged"])
    assert last_only["wild_retained_aged_no_own_step"] > 0
    assert np.isnan(summary.loc["memit-dr5", "wild_retained_aged"])
    # retention_by_age.csv: WILD rows for the run with WILD at every step only (here its
    # WILD scores are its teacher-forced ones, so the two tables agree)
    by_age = pd.read_csv(out / "retention_by_age.csv")
    wild_rows = by_age[by_age["metric"] == "wild_efficacy"]
    assert set(wild_rows["run"]) == {"pmet-add"}
    tf_rows = by_age[(by_age["metric"] == "efficacy") & (by_age["run"] == "pmet-add")]
    pd.testing.assert_frame_equal(wild_rows.drop(columns="metric").reset_index(drop=True),
                                  tf_rows.drop(columns="metric").reset_index(drop=True))
    assert set(by_age.loc[by_age["metric"] == "efficacy", "run"]) == set(summary.index)
    # the WILD columns of the last step that scored them (WILD at the last step only here)
    ret = pd.read_csv(runs / "memit-add" / "retention.csv")
    final = ret[ret["step"] == ret["step"].max()]
    assert last_only["wild_first_batch_end"] == pytest.approx(
        100 * final.loc[final["step_made"] == 1, "wild_efficacy"].mean())
    assert np.isnan(summary.loc["memit-dr5", "wild_first_batch_end"])
    ret = pd.read_csv(runs / "pmet-add" / "retention.csv")
    assert every["wild_first_batch_end"] == pytest.approx(
        100 * ret.loc[(ret["step"] == ret["step"].max()) & (ret["step_made"] == 1),
                      "efficacy"].mean())
    # wild/seen/<metric> of metrics.csv: its step-0 value and its last logged one
    logged = pd.read_csv(runs / "memit-add" / "metrics.csv")
    assert last_only["wild_locality_start"] == 100.0
    assert last_only["wild_locality_end"] == csv_approx(logged["wild/seen/locality"].iloc[-1])
    assert "wild_locality_end" in summary and np.isnan(summary.loc["pmet-add",
                                                                   "wild_locality_end"])
    pairs = pd.read_csv(out / "paired.csv")
    wild = pairs[pairs["b"] == "memit-dr"]
    assert set(wild["metric"]) == {*ka_study.PAIRED_METRICS, *ka_study.WILD_PAIRED_METRICS}
    assert len(wild) == 2 * 6
    assert set(pairs.loc[pairs["b"] == "memit-dr5", "metric"]) == set(ka_study.PAIRED_METRICS)
    retention = {name: pd.read_csv(runs / name / "retention.csv")
                 for name in ("memit-add", "memit-dr")}
    for _, row in wild[wild["metric"].str.startswith("wild_")].iterrows():
        a, b = (retention[row[name]] for name in ("a", "b"))
        a, b = (df[(df["step"] == row["step"]) & (df["step_made"] > 0)] for df in (a, b))
        if row["subset"] == "first_batch":
            a, b = a[a["step_made"] == 1], b[b["step_made"] == 1]
        assert row["mean_a"] == csv_approx(100 * a[row["metric"]].mean())
        assert row["mean_b"] == csv_approx(100 * b[row["metric"]].mean())
        diff = b[row["metric"]].to_numpy() - a[row["metric"]].to_numpy()
        assert (row["b_higher"], row["a_higher"]) == ((diff > 0).sum(), (diff < 0).sum())
    # the family: every row of the three files, WILD ones included
    files = [pd.read_csv(out / f) for f in ("paired.csv", "paired_methods.csv", "paired_p.csv")]
    np.testing.assert_allclose(np.concatenate([t["p_holm"] for t in files]),
                               ka_study.holm(np.concatenate([t["p_sign"] for t in files])),
                               rtol=csv_rel(roundings=2))


def test_retention_by_age_leaves_out_steps_that_did_not_score_the_metric() -> None:
    """WILD exact match scored at steps 1 and 3 only (NaN at step 2): by hand, at step 3
    age 2 (made at 1) a kept, b lost (n = 2, kept 1); c, made at step 2 whose own step
    was not scored, counts in no_own_step; step 2 has no row. Teacher-forced efficacy of
    the same rows still counts every step."""
    nan = np.nan
    rows = pd.DataFrame(
        [(1, "a", 1, 1, 1.0), (1, "b", 1, 1, 1.0),
         (2, "a", 1, 1, nan), (2, "b", 1, 1, nan), (2, "c", 2, 1, nan),
         (3, "a", 1, 1, 1.0), (3, "b", 1, 0, 0.0), (3, "c", 2, 1, 1.0)],
        columns=["step", "case_id", "step_made", "efficacy", "wild_efficacy"])
    wild = retention_by_age(rows, "wild_efficacy")
    assert wild[["step", "age", "step_made"]].values.tolist() == [[3, 1, 2], [3, 2, 1]]
    assert wild[["tracked", "no_own_step", "n", "kept"]].values.tolist() == [[1, 1, 0, 0],
                                                                              [2, 0, 2, 1]]
    assert retained_aged(wild) == {"retained_aged": 50.0, "retained_aged_n": 2,
                                   "retained_aged_no_own_step": 1}
    tf = retention_by_age(rows, "efficacy")
    assert tf["step"].tolist() == [2, 3, 3] and tf["no_own_step"].sum() == 0


def test_retention_by_age_kept_by_another_metric_counts_the_same_edits() -> None:
    """By hand, made at step 1, scored at 2: a is generated at once and later no more,
    though still preferred teacher-forced; b is generated at both; d is preferred but
    never generated (not learnt by WILD: failed_own_step); e is generated at both but its
    teacher-forced score is missing at 2 (not kept). WILD keeps b and e of {a, b, e};
    teacher forcing keeps a and b of the same three."""
    rows = pd.DataFrame(
        [(1, "a", 1, 1.0, 1.0), (1, "b", 1, 1.0, 1.0), (1, "d", 1, 1.0, 0.0),
         (1, "e", 1, 1.0, 1.0),
         (2, "a", 1, 1.0, 0.0), (2, "b", 1, 1.0, 1.0), (2, "d", 1, 1.0, 0.0),
         (2, "e", 1, np.nan, 1.0)],
        columns=["step", "case_id", "step_made", "efficacy", "wild_efficacy"])
    wild = retention_by_age(rows, "wild_efficacy")
    both = retention_by_age(rows, "wild_efficacy", kept_by="efficacy")
    cols = ["step", "age", "step_made", "tracked", "no_own_step", "failed_own_step", "n"]
    pd.testing.assert_frame_equal(both[cols], wild[cols])
    assert wild[[*cols, "kept"]].values.tolist() == [[2, 1, 1, 4, 0, 1, 3, 2]]
    assert both["kept"].tolist() == [2]
    assert both["retained"].tolist() == pytest.approx([200 / 3])


def test_compare_runs_pairs_any_runs_rescored_ones_too(study_runs: list[Path],
                                                       tmp_path: Path) -> None:
    """``compare`` pairs what ``publish`` does not: DR p = 0.8 against DR p = 0.5 (no
    ``add`` between them) and a rescore-like folder (``metrics.csv`` and ``retention.csv``
    only, WILD at its one step), record by record at the last common step, with Holm over
    the call; by hand from the files."""
    runs = {run.name: run for run in study_runs}
    rescored = tmp_path / "rescored" / "memit-add-rescored"
    rescored.mkdir(parents=True)
    shutil.copyfile(runs["memit-add"] / "metrics.csv", rescored / "metrics.csv")
    ret = pd.read_csv(runs["memit-add"] / "retention.csv")
    ret = ret[ret["step"] == ret["step"].max()].copy()  # what a rescore writes: its last step
    rng = np.random.default_rng(1)
    for metric in ka_study.WILD_PAIRED_METRICS:
        ret[metric] = rng.integers(0, 2, len(ret))
    ret.to_csv(rescored / "retention.csv", index=False)
    out = tmp_path / "cmp" / "compare.csv"
    argv = ["compare", str(runs["memit-dr"]), str(runs["memit-dr5"]), str(rescored),
            "--out", str(out)]
    assert ka_study.main(argv) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == list(ka_study.COMPARE_COLUMNS)
    assert set(table["a"]) == {"memit-dr"}
    # the baseline has no WILD scores: only the teacher-forced metrics are compared
    assert set(table["metric"]) == set(ka_study.PAIRED_METRICS)
    assert len(table) == 2 * 2 * len(ka_study.PAIRED_METRICS)
    base = pd.read_csv(runs["memit-dr"] / "retention.csv")
    for name, other in (("memit-dr5", pd.read_csv(runs["memit-dr5"] / "retention.csv")),
                        ("memit-add-rescored", ret)):
        step = min(base["step"].max(), other["step"].max())
        a, b = (df[(df["step"] == step) & (df["step_made"] > 0)] for df in (base, other))
        for _, row in table[table["b"] == name].iterrows():
            x, y = (a, b) if row["subset"] == "tracked" else \
                (a[a["step_made"] == 1], b[b["step_made"] == 1])
            merged = x.merge(y, on="case_id", suffixes=("_a", "_b"))
            diff = merged[f"{row['metric']}_b"] - merged[f"{row['metric']}_a"]
            assert row["step"] == step and row["n"] == len(merged) > 0
            assert (row["b_higher"], row["a_higher"]) == ((diff > 0).sum(), (diff < 0).sum())
            assert row["mean_b"] == csv_approx(100 * merged[f"{row['metric']}_b"].mean())
    np.testing.assert_allclose(table["p_holm"], ka_study.holm(table["p_sign"]),
                               rtol=csv_rel(roundings=2))
    # against the rescored folder as baseline, the WILD scores are compared as well
    assert ka_study.main(["compare", str(rescored), str(rescored.parent.parent / "w"),
                          "--out", str(out)]) == 2  # a missing folder: bad input
    wild_base = tmp_path / "w" / "wild-twin"
    shutil.copytree(rescored, wild_base)
    assert ka_study.main(["compare", str(rescored), str(wild_base), "--out", str(out)]) == 0
    twin = pd.read_csv(out)
    assert set(twin["metric"]) == {*ka_study.PAIRED_METRICS, *ka_study.WILD_PAIRED_METRICS}
    assert (twin["b_higher"] == 0).all() and (twin["p_sign"] == 1).all()


def test_compare_final_pairs_each_runs_own_last_step(study_runs: list[Path],
                                                     tmp_path: Path) -> None:
    """``compare --final`` compares each run at its own last step (runs whose steps do not
    line up: other batch sizes), ``step`` the baseline's and ``step_b`` the other's; without
    it, both at the last step both reached. By hand from the files, against a run whose
    evaluations stop two steps earlier."""
    runs = {run.name: run for run in study_runs}
    early = tmp_path / "early" / "memit-add-early"
    early.mkdir(parents=True)
    shutil.copyfile(runs["memit-add"] / "metrics.csv", early / "metrics.csv")
    ret = pd.read_csv(runs["memit-add"] / "retention.csv")
    last_b = int(ret["step"].max()) - 2
    ret[ret["step"] <= last_b].to_csv(early / "retention.csv", index=False)
    base = pd.read_csv(runs["memit-dr"] / "retention.csv")
    last_a = int(base["step"].max())
    assert last_a > last_b >= 1
    out = tmp_path / "cmp" / "final.csv"
    for flags, steps in (([], (last_b, last_b)), (["--final"], (last_a, last_b))):
        argv = ["compare", str(runs["memit-dr"]), str(early), "--out", str(out), *flags]
        assert ka_study.main(argv) == 0
        table = pd.read_csv(out)
        assert list(table.columns) == list(ka_study.COMPARE_COLUMNS)
        assert (table["step"] == steps[0]).all() and (table["step_b"] == steps[1]).all()
        a, b = (df[(df["step"] == st) & (df["step_made"] > 0)]
                for df, st in ((base, steps[0]), (ret, steps[1])))
        for _, row in table.iterrows():
            x, y = (a, b) if row["subset"] == "tracked" else \
                (a[a["step_made"] == 1], b[b["step_made"] == 1])
            merged = x.merge(y, on="case_id", suffixes=("_a", "_b"))
            diff = merged[f"{row['metric']}_b"] - merged[f"{row['metric']}_a"]
            assert row["n"] == len(merged) > 0
            assert (row["b_higher"], row["a_higher"]) == ((diff > 0).sum(), (diff < 0).sum())
            assert row["mean_a"] == csv_approx(100 * merged[f"{row['metric']}_a"].mean())


def test_compare_at_a_given_step(study_runs: list[Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    """``compare --step N`` compares both runs at step N (an earlier point of the same
    runs), by hand from the files; a step either run did not evaluate, step 0 and
    ``--step`` with ``--final`` are bad input naming the steps both evaluated, and write
    nothing."""
    runs = {run.name: run for run in study_runs}
    base, other = (pd.read_csv(runs[n] / "retention.csv") for n in ("memit-dr", "memit-add"))
    steps = sorted(set(base["step"]) & set(other["step"]) - {0})
    step = steps[0]
    assert step < max(steps)  # an earlier step than the default's
    out = tmp_path / "cmp" / "step.csv"
    argv = ["compare", str(runs["memit-dr"]), str(runs["memit-add"]), "--out", str(out)]
    assert ka_study.main([*argv, "--step", str(step)]) == 0
    table = pd.read_csv(out)
    assert (table["step"] == step).all() and (table["step_b"] == step).all()
    a, b = (df[(df["step"] == step) & (df["step_made"] > 0)] for df in (base, other))
    merged = a.merge(b, on="case_id", suffixes=("_a", "_b"))
    for _, row in table[table["subset"] == "tracked"].iterrows():
        diff = merged[f"{row['metric']}_b"] - merged[f"{row['metric']}_a"]
        assert row["n"] == len(merged) > 0
        assert (row["b_higher"], row["a_higher"]) == ((diff > 0).sum(), (diff < 0).sum())
        assert row["mean_b"] == csv_approx(100 * merged[f"{row['metric']}_b"].mean())
    out.unlink()
    capsys.readouterr()
    for flags in (["--step", str(max(steps) + 1)], ["--step", "0"],
                  ["--step", str(step), "--final"]):
        assert ka_study.main([*argv, *flags]) == 2, flags
        assert not out.exists()
    err = capsys.readouterr().err
    assert f"step={max(steps) + 1}" in err and str(steps) in err and "with final" in err


def test_compare_rejects_bad_folders_and_writes_nothing(study_runs: list[Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    runs = {run.name: run for run in study_runs}
    out = tmp_path / "compare.csv"
    no_retention = tmp_path / "no-retention"
    no_retention.mkdir()
    shutil.copyfile(runs["memit-add"] / "metrics.csv", no_retention / "metrics.csv")
    twin = tmp_path / "again" / "memit-add"
    shutil.copytree(runs["memit-add"], twin)
    disjoint = tmp_path / "disjoint"
    shutil.copytree(runs["memit-dr"], disjoint)
    ret = pd.read_csv(disjoint / "retention.csv")
    ret["case_id"] += 10**6  # no record in common with the baseline
    ret.to_csv(disjoint / "retention.csv", index=False)
    for bad, says in ((no_retention, "no retention.csv"), (twin, "more than once"),
                      (disjoint, "no edit in common")):
        argv = ["compare", str(runs["memit-add"]), str(bad), "--out", str(out)]
        assert ka_study.main(argv) == 2
        assert says in capsys.readouterr().err
    assert not out.exists()
