"""Drift statistics, the HTML report and `covidcxr monitor` on a real sqlite prediction log (--reference: offline)."""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest

from covidcxr import cli, monitoring, predlog

THRESHOLD = 7.0


def traffic(n: int, seed: int, shift: float = 0.0, when: dt.datetime | None = None, threshold: float = 0.5,
            ood_limit: float = THRESHOLD, source: str | None = "model") -> pd.DataFrame:
    """Records as the server logs them; ``shift`` moves every figure (another hospital's images); ``threshold`` and
    ``ood_limit``: the thresholds served (a site's own, or the model's 0.5 and THRESHOLD), ``source`` whose they were
    (None: a log of an earlier version)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        ood = float(abs(rng.normal(5.0 + 8 * shift, 1.0)))
        accepted = ood <= ood_limit
        p = float(np.clip(rng.beta(2, 3) + shift, 0, 1))
        rows.append({"time": when or predlog.now(), "model_name": "covidcxr", "model_version": "3",
                     "accepted": accepted, "reason": None if accepted else "out_of_distribution",
                     "projection": "frontal", "projection_probability": float(rng.uniform(0.9, 1.0)),
                     "lung_area_fraction": float(rng.normal(0.25, 0.03)),
                     "covid_probability": p if accepted else None,
                     "label": ("covid" if p >= threshold else "negative") if accepted else None,
                     "threshold": threshold, "ood_threshold": ood_limit, "thresholds_from": source,
                     "ood_score": ood, **{c: float(rng.normal(0.45 + shift, 0.05)) for c in predlog.INTENSITY_COLUMNS},
                     "features": [float(v) for v in rng.normal(shift, 1.0, 8)]})
    return pd.DataFrame(rows, columns=list(predlog.COLUMNS))


REFERENCE = traffic(200, seed=1)


def test_the_same_distribution_is_no_drift_and_another_is():
    same = monitoring.compare(REFERENCE, traffic(80, seed=2), ood_threshold=THRESHOLD, permutations=300)
    assert same.status == "no_drift" and not same.drifted
    assert {t.name for t in same.tests} == {*monitoring.SCALARS, "features_mmd", "positive_rate", "refusal_rate",
                                            "ood_rate"}
    ran = [t for t in same.tests if t.p_value is not None]
    assert all(t.p_adjusted == pytest.approx(min(1.0, t.p_value * len(ran))) for t in ran)  # Bonferroni

    shifted = monitoring.compare(REFERENCE, traffic(80, seed=3, shift=0.3), ood_threshold=THRESHOLD, permutations=300)
    assert shifted.status == "drift"
    drifted = {t.name for t in shifted.tests if t.drift}
    assert {"ood_score", "intensity_mean", "features_mmd", "positive_rate", "ood_rate"} <= drifted
    rates = {t.name: t for t in shifted.tests}
    assert rates["ood_rate"].window > 0.5 and rates["ood_rate"].reference < 0.1
    assert rates["refusal_rate"].window == rates["refusal_rate"].reference == 0.0  # every refusal here is OOD
    assert shifted.reasons["window"]["out_of_distribution"] > 0.5
    metrics = shifted.metrics()
    assert metrics["drift"] == 1.0 and metrics["n_window"] == 80 and "features_mmd.p_value" in metrics

    few = monitoring.compare(REFERENCE, traffic(10, seed=4, shift=0.3), ood_threshold=THRESHOLD, min_records=20)
    assert few.status == "insufficient_data" and not few.drifted


def test_a_window_served_at_a_site_s_own_thresholds_is_held_to_the_model_s():
    """The same images served at a site's threshold (0.3) and OOD threshold (9): more labels say COVID-19 and fewer
    films are refused, with no change in the images; the rates compare them at the model's thresholds."""
    site = traffic(80, seed=2, threshold=0.3, ood_limit=9.0)
    drift = monitoring.compare(REFERENCE, site, ood_threshold=THRESHOLD, permutations=300)
    rates = {t.name: t for t in drift.tests}
    assert not rates["positive_rate"].drift and not rates["refusal_rate"].drift and drift.status == "no_drift"
    as_labelled = float((site.loc[site["accepted"], "label"] == "covid").mean())
    assert as_labelled > rates["positive_rate"].window + 0.2  # what the labels alone would have compared
    probabilities = site.loc[site["accepted"] & (site["ood_score"] <= THRESHOLD), "covid_probability"]
    assert rates["positive_rate"].window == pytest.approx(float((probabilities >= 0.5).mean()))


def admitted(n: int, seed: int, flagged: bool = False) -> pd.DataFrame:
    """Films beyond the model's OOD threshold (7) that a site's own (9) admitted, all called COVID-19 with confidence;
    ``flagged``: answered at the model's own thresholds too, as a model with ``ood_action: flag`` does."""
    rng = np.random.default_rng(seed)
    films = traffic(n, seed=seed, threshold=0.3, ood_limit=9.0, source="site")
    p = rng.uniform(0.8, 1.0, n)
    return films.assign(ood_score=rng.uniform(7.2, 8.9, n), accepted=True, covid_probability=p, label="covid",
                        reason="out_of_distribution" if flagged else None)


def test_films_a_site_admitted_past_the_model_s_ood_threshold_count_in_the_ood_share_only():
    """The model refuses films above its OOD threshold, so the reference holds none: a site that admits them (its own
    OOD threshold) added their probabilities to the window's, and the probability test called that drift."""
    site = traffic(80, seed=2, threshold=0.3, ood_limit=9.0, source="site")
    window = pd.concat([site, admitted(30, seed=9)], ignore_index=True)
    drift = monitoring.compare(REFERENCE, window, ood_threshold=THRESHOLD, permutations=300)
    tests = {t.name: t for t in drift.tests}
    answered = window.loc[window["accepted"] & (window["ood_score"] <= THRESHOLD)]
    assert not tests["covid_probability"].drift and tests["covid_probability"].n_window == len(answered)
    assert tests["positive_rate"].window == pytest.approx(float((answered["covid_probability"] >= 0.5).mean()))
    assert tests["positive_rate"].n_window == len(answered) and not tests["positive_rate"].drift
    beyond = int((window["accepted"] & (window["ood_score"] > THRESHOLD)).sum())  # the 30, and a few of the site's
    assert beyond >= 30 and f"{beyond} film(s) admitted past the model's OOD threshold" in tests["positive_rate"].note
    assert tests["ood_rate"].drift and tests["ood_rate"].n_window == len(window)  # still counted where they belong
    assert tests["refusal_rate"].n_window == len(window)

    # A model that flags such films answers them in its reference too: both sides keep them
    flagged = admitted(10, seed=11, flagged=True).assign(threshold=0.5, ood_threshold=THRESHOLD)
    flagging = pd.concat([REFERENCE, flagged], ignore_index=True)
    kept = monitoring.compare(flagging, window, ood_threshold=THRESHOLD, permutations=300)
    assert {t.name: t for t in kept.tests}["positive_rate"].n_window == int(window["accepted"].sum())

    # Answered films without an OOD score: the log cannot tell, and the report says so
    blind = monitoring.compare(REFERENCE, window.assign(ood_score=None), ood_threshold=THRESHOLD, permutations=300)
    assert "the log cannot tell" in {t.name: t for t in blind.tests}["covid_probability"].note


def test_films_refused_without_a_finite_ood_score_count_as_out_of_distribution(tmp_path):
    """A feature that overflowed gives a NaN OOD score, which serving refuses as out of distribution (ood.is_out) and
    the log stores as null: the OOD share left such films out altogether, so a window of them read as no more out of
    distribution than the reference. Through a real sqlite log, as the server writes them."""
    nan = float("nan")
    films = traffic(30, seed=8)
    entries = [{k: row[k] for k in predlog.ENTRY_COLUMNS} | {"accepted": False, "reason": "out_of_distribution",
                                                             "covid_probability": None, "label": None, "ood_score": nan}
               for row in films.to_dict(orient="records")]
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    sink = predlog.PredictionLog(url)
    sink.append(predlog.records(entries, {}, {i: [nan] + [1.0] * 7 for i in range(30)}, when=predlog.now(),
                                model_name="covidcxr", model_version="3"))
    assert sink.flush(10) and sink.written == 30
    logged = predlog.read(url)
    assert logged["ood_score"].isna().all()
    window = pd.concat([traffic(60, seed=2), logged], ignore_index=True)
    drift = monitoring.compare(REFERENCE, window, ood_threshold=THRESHOLD, permutations=300)
    tests = {t.name: t for t in drift.tests}
    in_window = int((window["ood_score"] > THRESHOLD).sum()) + 30
    assert tests["ood_rate"].n_window == 90 and tests["ood_rate"].window == pytest.approx(in_window / 90)
    assert tests["ood_rate"].drift and drift.status == "drift"
    assert "counted in ood_rate only (window: 30)" in tests["ood_score"].note
    mmd = tests["features_mmd"]
    assert mmd.n_window == 60 and "non-finite entry left out (window: 30)" in mmd.note
    assert tests["refusal_rate"].window == 0.0  # refused as out of distribution: not a refusal for another reason


def test_a_flagging_model_is_known_from_the_reference_s_meta_not_guessed(tmp_path, capsys):
    """Whether the model flags films past its OOD threshold (answers them) was guessed from whether its reference
    answered any: a small validation reference has none, so the model's own flagged answers were left out of the
    window's positive rate and probability test, with a note blaming a site's threshold. register saves ood_action in
    the reference's meta: it decides; a reference without it is still guessed, and the note says so."""
    small = REFERENCE.loc[REFERENCE["ood_score"] <= THRESHOLD].head(40)  # no film past the threshold
    flagged = admitted(20, seed=12, flagged=True).assign(threshold=0.5, ood_threshold=THRESHOLD,
                                                         thresholds_from="model")
    window = pd.concat([traffic(60, seed=2), flagged], ignore_index=True)
    answered = int(window["accepted"].sum())
    drift = monitoring.compare(small, window, ood_threshold=THRESHOLD, ood_action="flag", permutations=300)
    tests = {t.name: t for t in drift.tests}
    assert tests["positive_rate"].n_window == tests["covid_probability"].n_window == answered
    assert "site" not in tests["positive_rate"].note and "left out" not in tests["positive_rate"].note
    assert tests["ood_rate"].window >= 20 / len(window)  # flagged films still count as out of distribution

    within = int((window["accepted"] & (window["ood_score"] <= THRESHOLD)).sum())
    guessed = monitoring.compare(small, window, ood_threshold=THRESHOLD, permutations=300)  # an older reference
    positive_rate = {t.name: t for t in guessed.tests}["positive_rate"]
    assert "the reference does not say whether the model refuses or flags films" in positive_rate.note
    assert "taken as refuse" in positive_rate.note and positive_rate.n_window == within
    refusing = monitoring.compare(small, window, ood_threshold=THRESHOLD, ood_action="refuse", permutations=300)
    assert {t.name: t for t in refusing.tests}["positive_rate"].n_window == within
    with pytest.raises(ValueError, match="ood_action must be 'refuse' or 'flag'"):
        monitoring.compare(small, window, ood_threshold=THRESHOLD, ood_action="Flag")

    # `covidcxr monitor` reads it from the reference's meta
    reference = tmp_path / "reference.json"
    monitoring.Reference(small, {"ood_threshold": THRESHOLD, "model_version": "3", "ood_action": "flag"}).save(
        reference)
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    sink = predlog.PredictionLog(url)
    sink.append(window.astype(object).where(window.notna(), None).to_dict(orient="records"))
    assert sink.flush(10) and sink.written == len(window)
    out = tmp_path / "report.html"
    assert cli.main(["monitor", "--reference", str(reference), "--log", url, "--no-mlflow", "--out", str(out),
                     "--permutations", "200", "--since", "1d"]) in (0, cli.MONITOR_DRIFT)
    capsys.readouterr()
    summary = {t["name"]: t for t in json.loads(out.with_suffix(".json").read_text())["tests"]}
    assert summary["positive_rate"]["n_window"] == answered


def test_films_refused_at_a_stricter_ood_threshold_are_counted_not_silently_dropped():
    """A request (or a site) with a stricter OOD threshold than the model's refuses films the model would answer;
    refusing clears their probability, so they fell out of the probability test and the positive rate without a
    word. They are in distribution at the model's threshold (counted so in the OOD share, not as refusals), and the
    notes of the two tests count them."""
    window = traffic(80, seed=2, ood_limit=5.0, source="request")
    stricter = int(((window["reason"] == "out_of_distribution") & (window["ood_score"] <= THRESHOLD)).sum())
    assert stricter >= 10
    drift = monitoring.compare(REFERENCE, window, ood_threshold=THRESHOLD, ood_action="refuse", permutations=300)
    tests = {t.name: t for t in drift.tests}
    for name in ("positive_rate", "covid_probability"):
        assert f"window: {stricter} film(s) refused at a stricter OOD threshold than the model's" in tests[name].note
    assert tests["positive_rate"].n_window == int(window["accepted"].sum())
    assert tests["ood_rate"].n_window == len(window) and tests["refusal_rate"].window == 0.0
    assert tests["ood_rate"].window == pytest.approx(float((window["ood_score"] > THRESHOLD).mean()))


def test_the_ood_share_and_the_films_beyond_the_model_count_out_by_one_rule():
    """Which records are out at a threshold is said in one place (_ood_out: serving's rule, NA where the detector
    scored none), so the OOD share and the films left out as beyond the model cannot disagree about a film."""
    nan = float("nan")
    rows = traffic(5, seed=2).assign(ood_score=[3.0, 7.0, 7.5, nan, nan], accepted=[True, True, True, False, True],
                                     reason=[None, None, None, "out_of_distribution", None])
    out = monitoring._ood_out(rows.set_index(rows.index + 10), THRESHOLD)
    assert list(out.index) == list(range(10, 15)) and out.isna().tolist() == [False] * 4 + [True]
    assert out.dropna().tolist() == [False, False, True, True]  # at the threshold is in; a NaN served out is out

    window = pd.concat([traffic(60, seed=2, ood_limit=9.0, source="site"), admitted(20, seed=9),
                        *[rows.iloc[[3, 4]]] * 5], ignore_index=True)
    tests = {t.name: t for t in monitoring.compare(REFERENCE, window, ood_threshold=THRESHOLD,
                                                   permutations=300).tests}
    above = window["ood_score"] > THRESHOLD
    beyond = int((window["accepted"] & above).sum())
    assert beyond >= 20 and tests["ood_rate"].n_window == 85  # the 5 answered without a score left out
    assert round(tests["ood_rate"].window * 85) == int(above.sum()) + 5  # and the 5 refused without one counted out
    assert f"window: {beyond} film(s) admitted past" in tests["positive_rate"].note
    assert "window: 5 answered film(s) without an OOD score kept" in tests["positive_rate"].note

def shifted_features(frame: pd.DataFrame, sd: float = 3.0) -> pd.DataFrame:
    """The same records with every compact feature moved by ``sd`` standard deviations (1 in :func:`traffic`)."""
    return frame.assign(features=[[v + sd for v in f] for f in frame["features"]])


@pytest.mark.parametrize("options", [{"alpha": 0.01}, {"permutations": 100}, {"alpha": 0.002, "permutations": 300}])
def test_the_feature_test_can_always_fire(options):
    """Its smallest Monte Carlo p-value, 1 / (permutations + 1), times 13 tests stayed above alpha: features moved by
    3 SD read no drift. The permutations are raised to what alpha and the tests need, and the report says so."""
    drift = monitoring.compare(REFERENCE, shifted_features(traffic(80, seed=2)), ood_threshold=THRESHOLD, **options)
    mmd = {t.name: t for t in drift.tests}["features_mmd"]
    ran = sum(t.p_value is not None for t in drift.tests)
    assert mmd.drift and drift.status == "drift" and mmd.p_min * ran < drift.alpha
    assert "raised from" in mmd.note and not mmd.inconclusive
    assert all(t.p_min is not None for t in drift.tests if t.p_value is not None)
    with pytest.raises(ValueError, match="permutations must be at least 1"):
        monitoring.compare(REFERENCE, traffic(80, seed=2), ood_threshold=THRESHOLD, permutations=0)


def test_a_test_too_small_to_show_drift_is_inconclusive_not_no_drift():
    """Five records a side: the exact permutation test's smallest p-value is 2 / 252 over all splits, and no
    Kolmogorov-Smirnov or Fisher test can pass alpha / 13 either, however far apart the samples are."""
    drift = monitoring.compare(traffic(5, seed=1), shifted_features(traffic(5, seed=2)), ood_threshold=THRESHOLD,
                               min_records=5)
    mmd = {t.name: t for t in drift.tests}["features_mmd"]
    assert mmd.p_min == pytest.approx(2 / 252) and "exact over all 252 splits" in mmd.note
    assert mmd.inconclusive and not mmd.drift and "inconclusive" in mmd.note
    assert drift.status == "insufficient_data" and not drift.drifted
    page = monitoring.render(drift, model_name="covidcxr", model_version="3", since=None, until=None,
                             log_url="sqlite:///p.db", reference_meta={}, reference=traffic(5, seed=1),
                             window=traffic(5, seed=2))
    assert "smallest possible p" in page and "inconclusive" in page


def test_mmd_permutation_test_detects_a_shift_in_feature_vectors_only():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 8))
    same = monitoring.mmd_test(x, rng.normal(size=(60, 8)), min_n=5, permutations=500)
    moved = monitoring.mmd_test(x, rng.normal(size=(60, 8)) + np.r_[0.8, np.zeros(7)], min_n=5, permutations=500)
    assert same.p_value > 0.05 and moved.p_value < 0.01 and moved.statistic > same.statistic
    assert monitoring.mmd_test(x, x[:3], min_n=5).p_value is None  # too few: skipped, saying so
    big = monitoring.mmd_test(rng.normal(size=(900, 8)), rng.normal(size=(700, 8)), min_n=5, permutations=200)
    assert (big.n_reference, big.n_window) == (500, 500)  # subsampled


def test_time_windows():
    now = dt.datetime(2026, 5, 10, 12, 0)
    assert monitoring.parse_time("7d", now) == dt.datetime(2026, 5, 3, 12, 0)
    assert monitoring.parse_time("36h", now) == dt.datetime(2026, 5, 9, 0, 0)
    assert monitoring.parse_time("15m", now) == dt.datetime(2026, 5, 10, 11, 45)
    assert monitoring.parse_time("2026-05-01", now) == dt.datetime(2026, 5, 1)
    assert monitoring.parse_time("2026-05-01T10:00:00+02:00", now) == dt.datetime(2026, 5, 1, 8, 0)
    assert monitoring.parse_time("2026-05-01T10:00:00Z", now) == dt.datetime(2026, 5, 1, 10, 0)
    assert monitoring.parse_time(None) is None
    with pytest.raises(ValueError, match="Nd, Nh, Nm"):
        monitoring.parse_time("last week")


def test_the_report_is_self_contained_and_the_reference_round_trips(tmp_path):
    window = traffic(60, seed=5, shift=0.3)
    drift = monitoring.compare(REFERENCE, window, ood_threshold=THRESHOLD, permutations=200)
    page = monitoring.render(drift, model_name="covidcxr", model_version="3", since=None, until=None,
                             log_url="postgresql+psycopg2://covidcxr:secret99@db/log",
                             reference_meta={"ood_threshold": THRESHOLD, "model_version": "3"}, reference=REFERENCE,
                             window=window)
    assert "<script" not in page.lower() and not re.search(r"(?i)(src|href)\s*=", page) and "http" not in page
    assert page.count("<svg") == len(monitoring.SCALARS) + 1 and "secret99" not in page and "How to read" in page
    assert "features_mmd" in page and "out_of_distribution" in page
    assert "thresholds served in the window" in page and "0.5 / OOD 7 (model): 60" in page
    mixed = pd.concat([window, traffic(20, seed=6, threshold=0.3, ood_limit=9.25, source="site")])  # a site's own
    assert monitoring.served_thresholds(mixed) == "0.5 / OOD 7 (model): 60; 0.3 / OOD 9.25 (site): 20"
    assert monitoring.served_thresholds(mixed.assign(ood_threshold=None)).endswith("0.3 / OOD - (site): 20")
    earlier = traffic(5, seed=7, source=None)  # records of a server before thresholds_from: no source to show
    assert monitoring.served_thresholds(earlier) == "0.5 / OOD 7: 5"

    reference = monitoring.Reference(REFERENCE, {"ood_threshold": THRESHOLD, "model_version": "3", "split": "val"})
    reference.save(tmp_path / "reference.json")
    loaded = monitoring.Reference.load(tmp_path / "reference.json")
    assert loaded.meta == reference.meta and len(loaded.frame) == len(REFERENCE)
    again = monitoring.compare(loaded.frame, window, ood_threshold=THRESHOLD, permutations=200)
    assert [t.p_value for t in again.tests] == [t.p_value for t in drift.tests]
    with pytest.raises(monitoring.MonitorError, match="nothing.json: not a drift reference"):
        monitoring.Reference.load(tmp_path / "nothing.json")


def test_monitor_command_exits_by_verdict_for_a_scheduler(tmp_path, capsys):
    reference = tmp_path / "reference.json"
    monitoring.Reference(REFERENCE, {"ood_threshold": THRESHOLD, "model_version": "3"}).save(reference)
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    sink = predlog.PredictionLog(url)
    day1, day2 = dt.datetime(2026, 2, 1, 9), dt.datetime(2026, 2, 2, 9)
    for frame in (traffic(60, seed=6, when=day1), traffic(60, seed=7, shift=0.3, when=day2)):
        records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        sink.append([r | {"time": r["time"].to_pydatetime()} for r in records])
    assert sink.flush(10) and sink.written == 120

    def monitor(*args: str) -> tuple[int, dict]:
        out = tmp_path / "report.html"
        code = cli.main(["monitor", "--reference", str(reference), "--log", url, "--no-mlflow", "--out", str(out),
                         "--permutations", "200", *args])
        printed = capsys.readouterr()
        return code, json.loads(printed.out) if code != cli.MONITOR_ERROR else {"error": printed.err}

    code, summary = monitor("--since", "2026-02-01", "--until", "2026-02-02")
    assert code == 0 and summary["status"] == "no_drift" and summary["drifted_tests"] == []
    code, summary = monitor("--since", "2026-02-02")
    assert code == cli.MONITOR_DRIFT and summary["status"] == "drift" and "ood_rate" in summary["drifted_tests"]
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert json.loads((tmp_path / "report.json").read_text())["status"] == "drift"
    code, summary = monitor("--since", "2030-01-01")
    assert code == cli.MONITOR_UNMEASURED and summary["status"] == "insufficient_data"  # could not measure: no pass
    code, summary = monitor("--since", "yesterday-ish")
    assert code == cli.MONITOR_ERROR and "Nd, Nh, Nm" in summary["error"]
    code, summary = monitor("--log", f"sqlite:///{tmp_path / 'typo.db'}")  # a mistyped log: an error, not a quiet day
    assert code == cli.MONITOR_ERROR and "typo.db does not exist" in summary["error"]
    assert not (tmp_path / "typo.db").exists()
    code, summary = cli.main(["monitor", "--reference", str(tmp_path / "none.json"), "--no-mlflow"]), None
    assert code == cli.MONITOR_ERROR and "not a drift reference" in capsys.readouterr().err


def test_monitor_refuses_a_reference_of_another_model_or_version(tmp_path, capsys):
    """`monitor --reference v3.json --version 4` held v4's traffic to v3's OOD threshold and feature basis (false
    drift, or a meaningless no_drift) without a word. The reference's meta names its model and version: another one
    is an error (exit 2) naming both, and no report is written."""
    reference = tmp_path / "reference.json"
    monitoring.Reference(REFERENCE, {"ood_threshold": THRESHOLD, "model_name": "covidcxr", "model_version": "3"}).save(
        reference)
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    sink = predlog.PredictionLog(url)
    for version in ("3", "4"):
        frame = traffic(40, seed=6).assign(model_version=version)
        sink.append(frame.astype(object).where(frame.notna(), None).to_dict(orient="records"))
    assert sink.flush(10) and sink.written == 80

    def monitor(*args: str) -> tuple[int, str]:
        out = tmp_path / "report.html"
        out.unlink(missing_ok=True)
        code = cli.main(["monitor", "--reference", str(reference), "--log", url, "--no-mlflow", "--out", str(out),
                         "--permutations", "200", "--since", "1d", *args])
        err = capsys.readouterr().err
        assert out.exists() == (code != cli.MONITOR_ERROR)
        return code, err

    code, err = monitor("--version", "4")
    assert code == cli.MONITOR_ERROR == 2
    assert f"{reference}: the drift reference is of covidcxr v3, not of the monitored covidcxr v4" in err
    code, err = monitor("--model", "other", "--version", "3")
    assert code == cli.MONITOR_ERROR and "is of covidcxr v3, not of the monitored other v3" in err
    assert monitor("--version", "3")[0] == 0 and monitor()[0] == 0  # its own version, named or taken from the meta
    monitoring.Reference(REFERENCE, {"ood_threshold": THRESHOLD}).save(reference)  # a meta that names neither
    assert monitor("--version", "4")[0] == 0


def test_a_window_where_every_test_was_skipped_is_not_no_drift():
    """Enough records, but every test too small to run (min_per_test above both sides): nothing was measured, so the
    verdict cannot be that nothing drifted."""
    drift = monitoring.compare(traffic(30, seed=1), shifted_features(traffic(30, seed=2)), ood_threshold=THRESHOLD,
                               min_records=5, min_per_test=1000)
    assert all(t.p_value is None for t in drift.tests)
    assert drift.status == "insufficient_data" and not drift.drifted


def failed_on(frame: pd.DataFrame, reason: str) -> pd.DataFrame:
    """The records a server logs for images it failed on (a retry reason): refused, nothing measured."""
    failed = frame.copy()
    failed[["accepted", "reason"]] = [False, reason]
    blank = [c for c in predlog.COLUMNS if c not in ("time", "model_name", "model_version", "accepted", "reason",
                                                     "threshold", "ood_threshold", "thresholds_from")]
    failed[blank] = None
    return failed


def test_the_server_s_failures_are_neither_drift_nor_records_of_the_window():
    """Records of images the server failed on (internal_error, out_of_memory) counted as refusals of the images, and
    toward --min-records: the PACS worker sends those images again, so each is logged a second time as a real record.
    15 out_of_memory records turned a no-drift window into drift of the refusal rate, and a window of 20 internal
    errors was judged drift instead of insufficient data. They are left out of both sides, and counted."""
    same = traffic(80, seed=2)
    window = pd.concat([same, failed_on(same.iloc[:15], "out_of_memory")], ignore_index=True)
    reference = pd.concat([REFERENCE, failed_on(REFERENCE.iloc[:3], "internal_error")], ignore_index=True)
    drift = monitoring.compare(reference, window, ood_threshold=THRESHOLD, permutations=300)
    plain = monitoring.compare(REFERENCE, same, ood_threshold=THRESHOLD, permutations=300)
    assert drift.status == plain.status == "no_drift"
    assert drift.server_failures == {"reference": 3, "window": 15} and (drift.n_window, drift.n_reference) == (80, 200)
    assert [asdict(t) for t in drift.tests] == [asdict(t) for t in plain.tests]
    assert drift.to_dict()["server_failures"] == {"reference": 3, "window": 15}
    assert drift.metrics()["server_failures"] == 15.0
    html = monitoring.render(drift, model_name="covidcxr", model_version="3", since=None, until=None,
                             log_url="sqlite:///p.db", reference_meta={}, reference=reference, window=window)
    assert "reference: 3, window: 15" in html

    failures = monitoring.compare(REFERENCE, failed_on(traffic(20, seed=5), "internal_error"),
                                  ood_threshold=THRESHOLD, min_records=20)
    assert failures.status == "insufficient_data" and failures.n_window == 0
    assert failures.server_failures == {"reference": 0, "window": 20}
