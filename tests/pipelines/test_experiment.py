"""The experiment runner (overlays to `dvc exp run -S` arguments), held-out splits, one-class test splits.

(not a pipeline run: the real experiments are documented commands, see README "Experiments on real chest X-rays")
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from covidcxr import splits
from pipelines import _common, evaluate, experiment
from pipelines import split as split_stage

ROOT = Path(__file__).resolve().parents[2]


def test_every_overlay_loads_and_names_a_known_selection():
    names = experiment.available()
    assert {"comparison", "adult-negatives", "leave-one-source-out", "segmentation", "projection",
            "all-sources"} <= set(names)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name in names:
        spec = experiment.load(name)
        assert spec["params"]["split.experiment"] in params["split"]["experiments"], name
        sources = {s["name"] for s in spec["params"]["ingest.sources"]}
        matrices = [(spec.get("matrix") or {}).get("split.holdout", {}), (spec.get("heldout") or {}).get("matrix", {})]
        for _, rules in (item for m in matrices for item in experiment._named(m)):
            assert {r["source"] for r in rules} <= sources, (name, rules)
        if spec["kind"] == "classifier":  # every classifier experiment runs the shortcut audit
            assert set(spec["targets"]) & experiment.AUDITED, name


def test_unknown_experiment_is_a_clear_error(tmp_path: Path):
    with pytest.raises(experiment.ExperimentError,
                       match=r"unknown experiment 'nope'; available: ablation, adult-negatives"):
        experiment.load("nope")
    with pytest.raises(experiment.ExperimentError, match="unknown experiment '_base'"):
        experiment.load("_base")  # the shared base is not an experiment
    (tmp_path / "bad.yaml").write_text("params: {cache.size: 64}\ntargets: [evaluate]\nkind: magic\n")
    with pytest.raises(experiment.ExperimentError, match=r"bad.yaml: kind 'magic' is not one of"):
        experiment.load("bad", tmp_path)
    (tmp_path / "broken.yaml").write_text("params: [\n")
    with pytest.raises(experiment.ExperimentError, match="broken.yaml: not valid YAML"):
        experiment.load("broken", tmp_path)


def test_matrix_gives_one_dvc_experiment_per_held_out_source(tmp_path: Path):
    spec = experiment.load("leave-one-source-out")
    planned = experiment.runs("leave-one-source-out", spec)
    assert [n for n, _ in planned] == ["leave-one-source-out-kermany", "leave-one-source-out-montgomery",
                                       "leave-one-source-out-shenzhen", "leave-one-source-out-hospitals"]
    real = tmp_path / "corpus"
    cmd = experiment.dvc_command(*planned[1], spec["targets"], real)
    assert cmd[:5] == ["dvc", "exp", "run", "-n", "leave-one-source-out-montgomery"] and cmd[-1] == "audit"
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-S"]
    assert "split.holdout=[{source:montgomery}]" in sets and "split.experiment=leave-one-source-out" in sets
    assert any(s.startswith("ingest.sources=") and f"'{real.as_posix()}/kermany'" in s for s in sets)
    assert not any("{real_data}" in s for s in sets)


def reached(params: dict, keys) -> dict:
    """``params`` reduced to the nodes the dotted ``keys`` reach (each whole, with its ancestors but not their other
    keys): where DVC's override parser meets the same keys, present or absent, as in the whole file, which it parses
    and writes back each time (most of the cost, 130 runs)."""
    out: dict = {}
    for key in keys:
        *parents, last = key.split(".")
        src, dst = params, out
        for part in parents:
            if not isinstance(src.get(part), dict):  # a leaf or a missing key on the way: as it stands
                if part in src:
                    dst[part] = src[part]
                break
            src, dst = src[part], dst.setdefault(part, {})
        else:
            if last in src:
                dst[last] = src[last]
    return out


def test_overrides_parse_back_through_dvc(tmp_path: Path):
    """The -S arguments, read by DVC's own override parser, give exactly the overlay's values (into params.yaml's
    nodes those keys reach)."""
    from dvc.utils.hydra import apply_overrides

    real = Path("/corpus with space/it's here")
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())
    figures = {"figure": "worst held-out specificity (kermany)", "select": ["kermany"],
               "by_classifier": {"c_vgg16": 0.25, "d_vgg16": None},
               "sources": {"kermany": {"c_vgg16": {"n_covid": 0, "auc": None, "used_to_choose": True}}}}
    for name in experiment.available():
        spec = experiment.load(name)
        planned = experiment.runs(name, spec) + experiment.heldout_runs(name, spec)
        if spec.get("heldout"):  # the main runs also carry the held-out runs' figures to register
            planned = [(n, {**p, "register.heldout": figures}) for n, p in planned]
        for exp_name, params in planned:
            path = tmp_path / f"{exp_name}.yaml"
            path.write_text(yaml.safe_dump(reached(defaults, params)))
            cmd = experiment.dvc_command(exp_name, params, [], real)
            apply_overrides(str(path), [cmd[i + 1] for i, a in enumerate(cmd) if a == "-S"])
            got = yaml.safe_load(path.read_text())
            for key, value in params.items():  # dotted keys nest as deep as they go (audit.source.epochs)
                node = got
                for part in key.split("."):
                    node = node[part]
                assert node == experiment._substitute(value, real), (exp_name, key)


@pytest.mark.parametrize("value", [None, True, 3, 0.0005, "true", "a-b", "/x/y", ["a", 1], {"k": "v w"}])
def test_hydra_value_keeps_types(value, tmp_path: Path):
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "p.yaml"
    path.write_text("s:\n  k: 0\n")
    apply_overrides(str(path), [f"s.k={experiment.hydra_value(value)}"])
    assert yaml.safe_load(path.read_text())["s"]["k"] == value


def test_real_data_root_must_hold_the_corpus(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(experiment.REAL_DATA_ENV, str(tmp_path))
    with pytest.raises(experiment.ExperimentError, match="no cohen/metadata.csv"):
        experiment.real_data_root()
    (tmp_path / "cohen").mkdir()
    (tmp_path / "cohen" / "metadata.csv").write_text("patientid\n")
    assert experiment.real_data_root() == tmp_path.resolve()


def manifest_rows() -> pd.DataFrame:
    """A manifest of three sources: `pos` has covid and negatives, `neg1`/`neg2` negatives; `neg2` has masks."""
    rows = []
    for source, n, covid in (("pos", 40, 0.6), ("neg1", 30, 0.0), ("neg2", 30, 0.0)):
        for i in range(n):
            rows.append({"image_id": f"{source}/{i}", "patient_id": f"{source}:{i // 2}", "source": source,
                         "label": "covid" if i < n * covid else "negative", "projection": "frontal",
                         "mask_path": f"m/{source}{i}.png" if source != "neg1" else None})
    return pd.DataFrame(rows)


def stage_params(**extra) -> dict:
    return {"seed": 1, "fractions": dict(splits.PAPER_FRACTIONS), "tolerance": 0.1, "experiment": "all",
            "holdout": [], "segmentation_external": [],
            "experiments": {"all": {"positives": [{"source": "pos", "label": "covid"}],
                                    "negatives": [{"label": "negative"}]}}, **extra}


def test_split_stage_holds_out_a_source_and_external_masks():
    m = manifest_rows()
    tables, _ = split_stage.task_tables(m, stage_params(holdout=[{"source": "neg1"}], segmentation_external=["pos"]))
    covid = tables["covid"].merge(m[["image_id", "source"]])
    assert set(covid.loc[covid["split"] == "test", "source"]) == {"neg1"}
    assert set(covid.loc[covid["source"] == "neg1", "split"]) == {"test"}
    assert (covid.groupby("patient_id")["split"].nunique() == 1).all()
    seg = tables["segmentation"]
    assert set(seg.loc[seg["label"] == "pos", "split"]) == {"external"}
    assert set(seg.loc[seg["label"] == "neg2", "split"]) == {"train", "val", "test"}
    assert split_stage.validated_fractions("covid", stage_params(holdout=[{"source": "neg1"}])) == \
        pytest.approx({"train": 0.75, "val": 0.25})
    # defaults: exactly the plain patient-level split
    plain, _ = split_stage.task_tables(m, stage_params())
    again, _ = split_stage.task_tables(m, stage_params(holdout=[], segmentation_external=[]))
    assert plain["covid"].equals(again["covid"]) and set(plain["covid"]["split"]) == {"train", "val", "test"}


@pytest.mark.parametrize("rule", [{"source": "neg2"}, {"source": "neg2", "label": "negative"}])
def test_a_held_out_source_masks_never_train_the_unet(rule):
    """Holding out a source with lung masks holds its masks out of the U-Net's train/val too (its `external` split),
    matched by the manifest's own columns (its label, not the segmentation table's label, which is the source)."""
    m = manifest_rows()
    p = stage_params(holdout=[rule, {"source": "neg1"}])  # neg1 has no masks: its rule leaves segmentation alone
    tables, _ = split_stage.task_tables(m, p)
    seg, covid = tables["segmentation"], tables["covid"].merge(m[["image_id", "source"]])
    assert set(seg.loc[seg["label"] == "neg2", "split"]) == {"external"}
    assert set(seg.loc[seg["label"] == "pos", "split"]) == {"train", "val", "test"}
    assert set(covid.loc[covid["source"] == "neg2", "split"]) == {"test"}
    assert split_stage._held_out("segmentation", p, m[m["mask_path"].notna()]) == ([rule], "external")
    # the masks of sources the covid task keeps are split as without the hold-out rules
    plain, _ = split_stage.task_tables(m, stage_params(holdout=[{"source": "neg1"}]))
    assert plain["segmentation"].equals(split_stage.task_tables(m, stage_params())[0]["segmentation"])
    assert set(plain["segmentation"].loc[plain["segmentation"]["label"] == "neg2", "split"]) != {"external"}


def test_a_held_out_source_never_trains_the_projection_filter():
    """The projection filter that keeps or refuses a held-out source's images never learned from that source: its
    rows are the projection task's `external` split, reported apart; without hold-out rules the split is as before."""
    m = manifest_rows()
    lateral = (m["source"] == "pos") & (m.index % 4 == 3)  # every source but pos is all frontal
    m.loc[lateral, "projection"] = "lateral"
    p = stage_params(holdout=[{"source": "neg1"}], holdout_with_test=True)
    tables, _ = split_stage.task_tables(m, p)
    proj = tables["projection"].merge(m[["image_id", "source"]])
    assert set(proj.loc[proj["source"] == "neg1", "split"]) == {"external"}
    assert set(proj.loc[proj["split"] == "external", "source"]) == {"neg1"}
    assert {"train", "val", "test"} <= set(proj.loc[proj["source"] != "neg1", "split"])
    assert split_stage._held_out("projection", p, split_stage._projection_rows(m)) == ([{"source": "neg1"}],
                                                                                       "external")
    plain, _ = split_stage.task_tables(m, stage_params())
    assert "external" not in set(plain["projection"]["split"])
    kept = proj[proj["source"] != "neg1"][["image_id", "split"]].reset_index(drop=True)
    assert len(kept) == len(plain["projection"]) - int((m["source"] == "neg1").sum())


@pytest.mark.parametrize("extra", [{}, {"holdout": [{"source": "neg1"}], "holdout_with_test": True}])
def test_no_covid_test_patient_has_lungs_the_unet_learned(extra):
    m = manifest_rows()
    tables, _ = split_stage.task_tables(m, stage_params(**extra))
    seg, covid = tables["segmentation"], tables["covid"]
    learned = set(seg.loc[seg["split"].isin(["train", "val"]), "patient_id"])
    assert learned and not learned & set(covid.loc[covid["split"] == "test", "patient_id"])
    both = covid.merge(seg, on=["image_id", "patient_id"], suffixes=("", "_seg"))
    kept = both[both["split_seg"] != "test"]
    assert len(kept) and (kept["split"] == kept["split_seg"]).all()  # the same split, train or val
    assert {"covid", "negative"} <= set(covid.loc[covid["split"] == "test", "label"])


def collected_c_vgg16(workdir: Path, result: dict, threshold: float, test_classes: dict) -> dict:
    """What the experiment runner collects for c_vgg16 from a workdir holding ``result`` as its evaluate report (with
    the operating threshold) and ``test_classes`` as the split's test counts."""
    _common.write_json(workdir / "reports/evaluate/c_vgg16/metrics.json", {**result, "operating_threshold": threshold})
    _common.write_json(workdir / "reports/split/summary.json", {"covid": {"test": test_classes}})
    got = experiment.collect_classifier(workdir, {"train_classifier.variants": ["c"],
                                                  "train_classifier.backbones": ["vgg16"]})
    return got["models"]["c_vgg16"]


def test_evaluation_reports_what_serving_answers_and_held_out_rows_carry_it(tmp_path: Path):
    """A held-out source's negatives: those above the folder's OOD threshold are refused (serving's rule), the rest
    answered at the operating threshold; the held-out rows show the share called COVID-19 and the share refused."""
    from covidcxr import folders
    from covidcxr.ood import MahalanobisDetector

    rng = np.random.default_rng(1)
    detector = MahalanobisDetector(n_components=2).fit(rng.normal(size=(12, 3))).calibrate(np.arange(10.0))
    detector.save(tmp_path / "ood.npz")
    loaded = folders.ood_detector(tmp_path)
    assert loaded.threshold == detector.threshold == 9.0 and folders.ood_detector(tmp_path / "none") is None
    scores = [0.9, 0.8, 0.2, 0.6, 0.1, 0.7, 0.3, 0.4]
    ood = [1.0, 9.5, 2.0, 9.0, 3.0, 12.0, 4.0, 5.0]  # above 9: refused (9.0 itself is answered, as serving does)
    pred = pd.DataFrame({"split": ["val"] * 4 + ["test"] * 8, "label": ["covid", "negative"] * 2 + ["negative"] * 8,
                         "score": [0.9, 0.1, 0.8, 0.2, *scores], "ood_score": [1.0] * 4 + ood,
                         "patient_id": [f"p{i}" for i in range(12)]})
    p = {"n_boot": 20, "seed": 0, "calibration_bins": 5, "site_calibration": {"n_per_class": 20, "draws": 10}}
    rule = {"threshold": 0.5, "objective": "sensitivity", "min_sensitivity": 0.9}
    result = evaluate.evaluate_model(pred, rule, p, loaded)
    served = result["test"]["served"]
    assert (served["n_negative"], served["refused"]) == (8, 2)
    assert served["negatives_called_covid"] == pytest.approx(2 / 8)  # 0.9 and 0.6 answered; 0.8 and 0.7 refused
    assert result["test"]["at_operating"]["specificity"] == pytest.approx(4 / 8)  # counts the refused ones too
    assert evaluate.evaluate_model(pred, rule, p)["test"]["served"]["refused"] == 0  # no detector: nothing refused
    assert result["test"]["site_calibration"]["status"] == "skipped" and "site_calibration" not in result["val"]
    model = collected_c_vgg16(tmp_path, result, 0.5, {"negative": 8})
    assert model["test_served"]["negatives_called_covid"] == pytest.approx(0.25)
    assert model["test_served"]["negatives_refused"] == pytest.approx(0.25)
    run = {"models": {"c_vgg16": model}}
    old = {"models": {"c_vgg16": {k: v for k, v in model.items() if k != "test_served"}}}  # recorded before it
    figures = experiment.heldout_figures({"select": ["kermany"]}, {"kermany": [run, run, old], "shenzhen": [run]})
    three = figures["sources"]["kermany"]["c_vgg16"]
    assert "called_covid" not in three  # one seed without the figure: no mean over the others
    figures = experiment.heldout_figures({"select": ["kermany"]}, {"kermany": [run, run], "shenzhen": [run]})
    two, one = figures["sources"]["kermany"]["c_vgg16"], figures["sources"]["shenzhen"]["c_vgg16"]
    assert two["called_covid"] == pytest.approx(0.25) and two["called_covid_sd"] == 0.0
    assert two["refused_by_seed"] == [pytest.approx(0.25)] * 2 and one["refused"] == pytest.approx(0.25)
    assert "detected" not in two  # a source of negatives only: no COVID-19 film to detect
    with_covid = {"models": {"c_vgg16": {**model, "test_served": {**model["test_served"],
                                                                  "positives_called_covid": 0.4}}}}
    hospitals = experiment.heldout_figures({"select": ["kermany"]}, {"kermany": [run], "hospitals": [with_covid]})
    assert hospitals["sources"]["hospitals"]["c_vgg16"]["detected"] == 0.4
    rendered = "\n".join(experiment._heldout_summary_rows({"x": {"heldout": figures}}))
    assert "negatives called COVID-19 by serving" in rendered and "0.250 ± 0.000 (0.250 to 0.250)" in rendered


def test_held_out_rows_say_why_serving_refused_and_of_how_many_films(tmp_path: Path):
    """Since evaluate counts the films refused before scoring, a held-out run's refused negatives are lateral views,
    failed lung masks and films out of distribution together: the rows keep the two kinds apart, as shares of every
    test film, beside how many films the shares are of (and how many were scored), and the summary's header says what
    was refused; a record made before (its refusals out of distribution only, of the films scored) renders as it did."""
    from covidcxr.ood import MahalanobisDetector

    rng = np.random.default_rng(1)
    detector = MahalanobisDetector(n_components=2).fit(rng.normal(size=(12, 3))).calibrate(np.arange(10.0))
    ood = [1.0, 9.5, 2.0, 9.0, 3.0, 12.0, 4.0, 5.0]  # 9.5 and 12.0 refused as out of distribution
    pred = pd.DataFrame({"split": ["val"] * 4 + ["test"] * 8, "label": ["covid", "negative"] * 2 + ["negative"] * 8,
                         "score": [0.9, 0.1, 0.8, 0.2, 0.9, 0.8, 0.2, 0.6, 0.1, 0.7, 0.3, 0.4],
                         "ood_score": [1.0] * 4 + ood, "patient_id": [f"p{i}" for i in range(12)]})
    before = pd.DataFrame({"split": ["test"] * 4 + ["train"], "label": ["negative"] * 2 + ["covid"] * 2 + ["negative"],
                           "reason": ["lateral_view", "lateral_view", "empty_lung_mask", "lung_mask_too_large",
                                      "lateral_view"]})
    p = {"n_boot": 20, "seed": 0, "calibration_bins": 5, "site_calibration": {"n_per_class": 20, "draws": 10}}
    result = evaluate.evaluate_model(pred, {"threshold": 0.5}, p, detector, before)
    model = collected_c_vgg16(tmp_path, result, 0.5, {"negative": 8})
    assert model["test_classes"] == {"covid": 0, "negative": 8}  # the films scored, which the AUC and CIs are of
    assert model["test_served"]["refused_by_reason"] == {"empty_lung_mask": 1, "lateral_view": 2,
                                                         "lung_mask_too_large": 1, "out_of_distribution": 2}
    run = {"models": {"c_vgg16": model}}
    row = experiment.heldout_figures({"select": ["kermany"]}, {"kermany": [run]})["sources"]["kermany"]["c_vgg16"]
    assert (row["films_covid"], row["films_negative"], row["n_covid"], row["n_negative"]) == (2, 10, 0, 8)
    assert row["refused"] == pytest.approx(4 / 10)  # 2 laterals and 2 out of distribution of 10 negatives
    assert (row["refused_before"], row["refused_ood"]) == (pytest.approx(4 / 12), pytest.approx(2 / 12))
    figures = experiment.heldout_figures({"select": ["kermany"]}, {"kermany": [run, run]})
    rendered = "\n".join(experiment._heldout_summary_rows({"x": {"heldout": figures}}))
    assert "negatives refused (lateral view, lung mask or OOD)" in rendered and "(OOD) |" not in rendered
    assert "| test films refused before scoring (lateral view, lung mask) | test films refused as OOD |" in rendered
    assert "| 0.400 ± 0.000 (0.400 to 0.400) | 0.333 ± 0.000 (0.333 to 0.333) | 0.167 ± 0.000 (0.167 to 0.167) | " \
           in rendered
    served = {k: v for k, v in model["test_served"].items() if k in experiment.SERVED}
    old = {"models": {"c_vgg16": {**model, "test_served": served}}}  # recorded before: its refusals were OOD only
    figures = experiment.heldout_figures({"select": ["kermany"]}, {"kermany": [old, old]})
    assert not {"refused_before", "refused_ood", "films_covid"} & set(figures["sources"]["kermany"]["c_vgg16"])
    rendered = experiment._heldout_summary_rows({"x": {"heldout": figures}})
    assert rendered[3:5] == ["| held out | role | classifier | specificity | ROC AUC | sensitivity | negatives called "
                             "COVID-19 by serving | negatives refused (OOD) | COVID-19 called COVID-19 by serving | "
                             "seeds |", "|---|---|---|---|---|---|---|---|---|---|"]


def test_a_held_out_site_with_both_classes_reports_its_own_threshold_beside_the_model_s(tmp_path: Path):
    """At a new site every score sits higher (its healthy films look like COVID-19 to the model): the model's
    threshold calls most negatives COVID-19; a threshold chosen on 20 + 20 of the site's own films, by the model's rule
    (sensitivity 0.9, kept on the site's next films), calls far fewer, and the held-out rows and summary carry both on
    the same films."""
    rng = np.random.default_rng(3)
    n_pos, n_neg = 60, 120
    test_scores = np.r_[rng.uniform(0.6, 1.0, n_pos), rng.uniform(0.35, 0.75, n_neg)]
    pred = pd.DataFrame({"split": ["val"] * 4 + ["test"] * (n_pos + n_neg),
                         "label": ["covid", "negative"] * 2 + ["covid"] * n_pos + ["negative"] * n_neg,
                         "score": [0.9, 0.1, 0.8, 0.2, *test_scores], "ood_score": 1.0,
                         "patient_id": [f"p{i}" for i in range(4 + n_pos + n_neg)]})
    rule = {"threshold": 0.3, "objective": "sensitivity", "min_sensitivity": 0.9}
    p = {"n_boot": 20, "seed": 0, "calibration_bins": 5, "site_calibration": {"n_per_class": 20, "draws": 50}}
    result = evaluate.evaluate_model(pred, rule, p)
    site = result["test"]["site_calibration"]
    assert site["status"] == "measured" and (site["n_covid"], site["n_negative"]) == (n_pos, n_neg)
    assert site["model_specificity"] == 0.0 and site["model_sensitivity"] == 1.0  # every film above 0.3
    assert site["specificity"] > 0.5 and site["sensitivity"] >= 0.8 and site["threshold_median"] > 0.55
    run = {"models": {"c_vgg16": collected_c_vgg16(tmp_path, result, 0.3, {"covid": n_pos})}}
    older = {"models": {"c_vgg16": {k: v for k, v in run["models"]["c_vgg16"].items()
                                    if k != "test_site_calibration"}}}
    assert "site_specificity" not in experiment.heldout_figures({"select": ["x"]}, {"x": [run, older]})[
        "sources"]["x"]["c_vgg16"]  # a seed without the figure: no mean over the others
    figures = experiment.heldout_figures({"select": ["kermany"]}, {"kermany": [run, run], "hospitals": [run, run]})
    row = figures["sources"]["hospitals"]["c_vgg16"]
    assert row["site_specificity"] == pytest.approx(site["specificity"]) and row["site_specificity_sd"] == 0.0
    assert row["site_model_specificity"] == 0.0 and row["site_n_per_class"] == 20
    assert row["site_promised_sensitivity"] == pytest.approx(19 / 21)  # 20 films, 0.9: one may fall below
    rendered = "\n".join(experiment._heldout_summary_rows({"x": {"heldout": figures}}))
    assert ("the model's own rule, its sensitivity target kept on the site's next films (promised 0.905) on 20 "
            "COVID-19 and 20 negative patients") in rendered
    # evaluate passes the patients: it draws patients, and their other films test nothing (sites.local_calibration)
    assert ("drawn at random, every film of theirs choosing and each patient counted once by the rule, and the other "
            "patients' films called with it") in rendered and "its other films called with it" not in rendered
    # a record made while evaluate drew films says so
    films = {source: {model: {**row, "site_unit": "films"} for model, row in rows.items()}
             for source, rows in figures["sources"].items()}
    rendered = "\n".join(experiment._heldout_summary_rows({"x": {"heldout": {**figures, "sources": films}}}))
    assert ("on 20 COVID-19 and 20 negative films of the held-out run's test, drawn at random, and the other "
            "patients' films called with it (a drawn film's patient's other films are not tested)") in rendered
    assert f"| hospitals | c_vgg16 | {site['specificity']:.3f} ± 0.000" in rendered
    # the site's pool is the films serving scores and answers: those refused before scoring are not in it either
    assert "films refused before scoring, a lateral view or a failed lung mask, or as out of distribution left out" \
        in rendered
    # serving refused most of the site's COVID-19 films in one seed: the row says so instead of a mean of the others
    few = {**run["models"]["c_vgg16"], "test_site_calibration": {
        "status": "skipped", "n_covid": 7, "reason": "7 COVID-19 and 434 negative films: too few"}}
    figures = experiment.heldout_figures({"select": ["kermany"]}, {"kermany": [run], "hospitals": [
        run, {"models": {"c_vgg16": few}}]})
    assert figures["sources"]["hospitals"]["c_vgg16"]["site_skipped"] == "1 of 2 seeds: 7 COVID-19 and 434 negative " \
                                                                         "films: too few"
    assert "site_skipped" not in figures["sources"]["kermany"]["c_vgg16"]
    rendered = "\n".join(experiment._heldout_summary_rows({"x": {"heldout": figures}}))
    assert "| hospitals | c_vgg16 | not measured: 1 of 2 seeds: 7 COVID-19" in rendered
    # when no seed measured it, the table still says what each set out to draw
    none = {**few, "test_site_calibration": {"status": "skipped", "n_covid": 30, "n_per_class": 20, "unit": "patients",
                                             "reason": "10 COVID-19 and 434 negative patients: too few"}}
    figures = experiment.heldout_figures({"select": ["kermany"]}, {"kermany": [{"models": {"c_vgg16": none}}]})
    rendered = "\n".join(experiment._heldout_summary_rows({"x": {"heldout": {**figures, "seeds": 2}}}))
    assert "on 20 COVID-19 and 20 negative patients of the held-out run's test" in rendered


def test_holding_out_the_only_positive_source_is_refused():
    with pytest.raises(splits.SelectionError, match=r"train split has no \['covid'\] images .*'pos'"):
        split_stage.task_tables(manifest_rows(), stage_params(holdout=[{"source": "pos"}]))


def test_one_class_test_split_reports_specificity_only(tmp_path: Path):
    """A held-out source of negatives only: evaluation does not crash; AUC and sensitivity are null, specificity set."""
    rng = np.random.default_rng(0)
    n = 30
    pred = pd.DataFrame({"split": ["val"] * n + ["test"] * n,
                         "label": ["covid", "negative"] * (n // 2) + ["negative"] * n,
                         "score": np.r_[rng.random(n), np.linspace(0.05, 0.95, n)],
                         "patient_id": [f"p{i}" for i in range(2 * n)]})
    rule = {"threshold": 0.5, "objective": "sensitivity", "min_sensitivity": 0.9}
    p = {"n_boot": 50, "seed": 0, "calibration_bins": 5, "site_calibration": {"n_per_class": 20, "draws": 10}}
    result = evaluate.evaluate_model(pred, rule, p)
    assert result["test"]["at_operating"]["specificity"] == pytest.approx(0.5)
    site = result["test"]["site_calibration"]  # no COVID-19 film: a site threshold cannot be chosen, and it says so
    assert site["status"] == "skipped" and "0 COVID-19 and 30 negative patients" in site["reason"]
    assert np.isnan(result["test"]["at_operating"]["roc_auc"])
    curves = evaluate.curves(pred, 5)
    assert curves["roc"] == [] and curves["pr"] == []
    result["operating_threshold"] = 0.5
    _common.write_json(tmp_path / "reports/evaluate/c_vgg16/metrics.json", result)
    _common.write_json(tmp_path / "reports/split/summary.json", {"covid": {"test": {"negative": n}}})
    _common.write_json(tmp_path / "reports/train_classifier/c_vgg16.json",  # the held-out source refused as OOD
                       {"ood": {"threshold": 9.5, "quantile": 0.95, "refused": {"val": 0.05, "test": 0.9}}})
    got = experiment.collect_classifier(tmp_path, {"train_classifier.variants": ["c"],
                                                   "train_classifier.backbones": ["vgg16"]})
    model = got["models"]["c_vgg16"]
    assert model["test_auc"]["value"] is None and model["test_sensitivity"]["value"] is None
    assert model["test_specificity"]["value"] == pytest.approx(0.5)
    assert model["test_specificity"]["low"] < 0.5 < model["test_specificity"]["high"]
    assert model["test_classes"] == {"covid": 0, "negative": n} and model["test_ood_refused"] == 0.9
    assert "unet_external" not in got  # a U-Net with no held-out masks
    json.dumps(got, allow_nan=False)  # strict JSON: what bench/ and DVC read
    # the held-out source's masks were the U-Net's external split: its Dice on them joins the held-out run's figures
    scores = {"n": 12, "dice": 0.81, "iou": 0.7, "dice_clean": 0.83, "paper_pixel_dice": 0.8}
    _common.write_json(tmp_path / "reports/train_unet/metrics.json", {"test": scores, "external": scores})
    held = experiment.collect_classifier(tmp_path, {"train_classifier.variants": ["c"],
                                                    "train_classifier.backbones": ["vgg16"]})
    assert held["unet_external"] == {"n": 12, "dice": 0.81, "iou": 0.7, "dice_clean": 0.83}
    assert "projection_external" not in held  # a filter that learned from every source
    # the held-out source's images were the projection filter's external split: its recall on them joins them too
    by_source = {"kermany": {"frontal_recall": 0.9, "lateral_recall": None, "n_frontal": 40, "n_lateral": 0,
                             "frontal_refused": 4, "lateral_refused": 0},
                 "cohen": {"frontal_recall": 1.0, "lateral_recall": 1 / 3, "n_frontal": 10, "n_lateral": 3,
                           "frontal_refused": 0, "lateral_refused": 1}}
    expected = {"n_frontal": 50, "n_lateral": 3, "frontal_refused": 4, "frontal_recall": pytest.approx(0.92),
                "lateral_recall": pytest.approx(1 / 3)}
    _common.write_json(tmp_path / "reports/train_projection/metrics.json",
                       {"test": {"by_source": by_source}, "external": {"by_source": by_source}})
    held = experiment.collect_classifier(tmp_path, {"train_classifier.variants": ["c"],
                                                    "train_classifier.backbones": ["vgg16"]})
    assert held["projection_external"] == expected
    # a record written before the stage counted the laterals refused: the count comes back from recall x laterals
    for v in by_source.values():
        del v["lateral_refused"]
    _common.write_json(tmp_path / "reports/train_projection/metrics.json", {"external": {"by_source": by_source}})
    assert experiment.collect_classifier(tmp_path, {"train_classifier.variants": ["c"],
                                                    "train_classifier.backbones": ["vgg16"]})["projection_external"] \
        == expected

    result = {"experiment": "loso", "description": "d", "kind": "classifier", "command": "python -m x", "notes": "n",
              "settings": experiment._settings({"cache.size": 64}, {"train_unet": {"f0": 16}}), "paper": None,
              "wall_seconds": 60.0, "finished": "now", "runs": {"loso-b": got},
              "headline": experiment.headline("classifier", {"loso-b": got})}
    assert result["settings"]["cache.size"] == 64 and result["settings"]["train_unet.f0"] == 16
    effective = {"train_unet": {"precision": "x"}, "train_classifier": {"precision": "float32"}}
    precision = experiment._settings({"train_unet.precision": "mixed_bfloat16"}, effective)  # the overlay's first
    assert (precision["train_unet.precision"], precision["train_classifier.precision"]) == ("mixed_bfloat16", "float32")
    assert result["headline"]["loso-b/c_vgg16"]["test_auc"] is None
    experiment.record(tmp_path, "loso", result)
    table = experiment.render_summary(tmp_path).read_text()
    assert "| loso-b | c_vgg16 | 0/30 | null | null | 0.500 [" in table and "| 0.900 |" in table
    assert "held-out masks" not in table
    result["heldout_runs"] = {"loso-heldout-kermany-s1": held, "loso-heldout-kermany-s2": held}
    experiment.record(tmp_path, "loso", result)
    table = experiment.render_summary(tmp_path).read_text()
    assert table.count("| loso-heldout-kermany | 12 | 0.810 | 0.700 | 0.830 |") == 1  # one U-Net for the seeds
    assert table.count("| loso-heldout-kermany | 50 | 0.920 | 3 | 0.333 | 4 |") == 1  # one filter for the seeds


def test_the_summary_opens_with_where_the_goals_stand(tmp_path: Path):
    base = {"experiment": "one", "command": "c", "description": "d", "settings": {}, "wall_seconds": 60.0,
            "finished": "now", "headline": {}, "runs": {}, "kind": "classifier"}
    experiment.record(tmp_path, "one", base)
    assert "goals stand" not in experiment.render_summary(tmp_path).read_text()  # no goals file: nothing invented
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / experiment.GOALS).write_text("## Where the goals stand\n\n| goal | today |\n")
    summary = experiment.render_summary(tmp_path).read_text()
    assert summary.index("## Where the goals stand") < summary.index("| experiment | command |")
    assert "1.0 min on 2 shared CPU cores (CPU not recorded)" in summary  # a record from before machines were kept
    experiment.record(tmp_path, "one", {**base, "machine": {"cpus": 2, "cpu": "Test CPU"}})
    assert "1.0 min on 2 cores of Test CPU" in experiment.render_summary(tmp_path).read_text()
    assert (ROOT / "experiments" / experiment.GOALS).is_file()  # the project's own, rendered by --summary


def test_record_keeps_other_experiments(tmp_path: Path):
    base = {"command": "c", "settings": {}, "wall_seconds": 1.0, "finished": "now", "headline": {"x": 1}}
    experiment.record(tmp_path, "one", {**base, "runs": {}})
    machine = {"cpus": 2, "cpu": "Test CPU", "python": "3.11.7", "platform": "Linux", "cpu_kernels": "native"}
    experiment.record(tmp_path, "two", {**base, "headline": {"x": 2}, "runs": {}, "machine": machine})
    bench = json.loads((tmp_path / experiment.BENCH).read_text())
    assert bench["one"]["headline"] == {"x": 1} and bench["two"]["headline"] == {"x": 2}
    assert bench["one"]["machine"] is None and bench["two"]["machine"] == machine  # a wall time names its machine
    assert json.loads((tmp_path / "reports/experiments/two.json").read_text())["runs"] == {}


def _model(spec: float | None, auc: float | None = None) -> dict:
    ci = lambda v: {"value": v, "low": None if v is None else v - 0.1, "high": None if v is None else v + 0.1}  # noqa: E731
    return {"test_specificity": ci(spec), "test_auc": ci(auc), "test_sensitivity": ci(None if auc is None else 0.9),
            "test_classes": {"covid": 0 if auc is None else 20, "negative": 30}, "operating_threshold": 0.3}


def test_heldout_figures_choose_on_the_selection_runs_and_mark_the_rest_as_tests():
    collected = {"kermany": {"models": {"c_vgg16": _model(0.2), "d_vgg16": _model(0.7)}},
                 "montgomery": {"models": {"c_vgg16": _model(0.5), "d_vgg16": _model(0.6)}},
                 "hospitals": {"models": {"c_vgg16": _model(0.9, auc=0.8), "d_vgg16": _model(0.1, auc=0.6)}}}
    figures = experiment.heldout_figures({"select": ["kermany", "montgomery"]}, collected)
    assert figures["by_classifier"] == {"c_vgg16": 0.2, "d_vgg16": 0.6}  # the worst of the selection runs only
    assert figures["mean"] == pytest.approx({"c_vgg16": 0.35, "d_vgg16": 0.65})  # hospitals never counts
    assert figures["standard_error"] == {"c_vgg16": None, "d_vgg16": None}  # one seed: no spread to measure
    assert figures["sources"]["hospitals"]["c_vgg16"]["used_to_choose"] is False
    assert figures["sources"]["kermany"]["d_vgg16"]["used_to_choose"] is True
    assert figures["sources"]["hospitals"]["c_vgg16"]["auc"] == 0.8 and "kermany, montgomery" in figures["figure"]
    with pytest.raises(experiment.ExperimentError, match="not in heldout.matrix"):
        experiment.heldout_figures({"select": ["nih"]}, collected)


def test_heldout_figures_over_seeds_choose_by_the_worst_mean():
    # c is better than d in one seed of kermany and worse on average: the mean over seeds decides, not one seed
    collected = {"kermany": [{"models": {"c_vgg16": _model(s), "d_vgg16": _model(0.5)}} for s in (0.9, 0.1, 0.2)],
                 "hospitals": [{"models": {"c_vgg16": _model(0.6, auc=a), "d_vgg16": _model(0.6, auc=0.7)}}
                               for a in (0.8, 0.6, None)]}
    figures = experiment.heldout_figures({"select": ["kermany"]}, collected)
    assert figures["by_classifier"]["c_vgg16"] == pytest.approx(0.4) and figures["by_classifier"]["d_vgg16"] == 0.5
    assert figures["seeds"] == 3 and "mean of 3 seeds" in figures["figure"]
    # the worst mean's standard error over seeds (sd / sqrt 3), and the mean over the select runs (kermany alone here)
    assert figures["standard_error"]["c_vgg16"] == pytest.approx(0.4359 / 3**0.5, abs=1e-4)
    assert figures["standard_error"]["d_vgg16"] == 0.0 and figures["mean"]["c_vgg16"] == pytest.approx(0.4)
    row = figures["sources"]["kermany"]["c_vgg16"]
    assert row["n_seeds"] == 3 and row["specificity_by_seed"] == [0.9, 0.1, 0.2]
    assert row["specificity_sd"] == pytest.approx(0.4359, abs=1e-4)
    assert (row["specificity_min"], row["specificity_max"]) == (0.1, 0.9) and row["used_to_choose"] is True
    assert row["auc"] is None and "specificity_low" not in row  # a one-seed CI is no spread over seeds
    hospital = figures["sources"]["hospitals"]["c_vgg16"]
    assert hospital["auc"] is None and hospital["auc_by_seed"] == [0.8, 0.6, None]  # undefined in a seed: no mean
    assert figures["sources"]["hospitals"]["d_vgg16"]["auc"] == pytest.approx(0.7)
    assert hospital["used_to_choose"] is False and hospital["threshold_by_seed"] == [0.3, 0.3, 0.3]
    one = experiment.heldout_figures({"select": ["kermany"]}, {"kermany": [collected["kermany"][0]]})
    assert one["sources"]["kermany"]["c_vgg16"]["specificity_low"] == pytest.approx(0.8)  # one seed: its CI
    rendered = "\n".join(experiment._heldout_summary_rows({"x": {"heldout": figures}}))
    assert "0.400 ± 0.436 (0.100 to 0.900)" in rendered and "| hospitals | test | c_vgg16 |" in rendered


def test_heldout_seeds_run_each_heldout_run_once_per_seed_for_one_main_run():
    spec = {"params": {"split.experiment": "x"},
            "heldout": {"matrix": {"k": [{"source": "kermany"}]}, "seeds": [1, 2], "params": {}}}
    held = experiment.seeded(experiment.heldout_runs("exp", spec), {**spec, "seeds": spec["heldout"]["seeds"]})
    assert [(n, p["train_classifier.seed"]) for n, p, _ in held] == [("exp-heldout-k-s1", 1), ("exp-heldout-k-s2", 2)]
    assert [n for n, _, _ in experiment.seeded(experiment.runs("exp", spec), spec)] == ["exp"]
    spec["heldout"]["matrix"]["m"] = [{"source": "montgomery"}]  # a run's seeds in a row: upstream stages stay put
    held = experiment.seeded(experiment.heldout_runs("exp", spec), {**spec, "seeds": spec["heldout"]["seeds"]})
    assert [n for n, _, _ in held] == ["exp-heldout-k-s1", "exp-heldout-k-s2", "exp-heldout-m-s1", "exp-heldout-m-s2"]


def test_every_run_once_per_seed_and_the_spread_over_seeds():
    spec = {"params": {"split.experiment": "x"}, "seeds": [1, 2, 3]}
    planned = experiment.seeded(experiment.runs("exp", spec), spec)
    assert [(n, p["train_classifier.seed"]) for n, p, _ in planned] == [("exp-s1", 1), ("exp-s2", 2), ("exp-s3", 3)]
    figures = {f"exp-s{s}/c_vgg16": {"test_auc": auc, "test_specificity": None}
               for s, auc in ((1, 0.7), (2, 0.8), (3, 0.9))}
    spread = experiment.over_seeds(figures)["exp/c_vgg16 over seeds"]
    assert spread["test_auc"]["mean"] == pytest.approx(0.8) and spread["test_auc"]["sd"] == pytest.approx(0.1)
    assert spread["test_auc"]["n"] == 3 and "test_specificity" not in spread  # undefined figures are not averaged
    spec["heldout"] = {"matrix": {"k": [{"source": "kermany"}]}, "params": {"split.experiment": "loso"}}
    held = experiment.seeded(experiment.heldout_runs("exp", spec), spec)
    assert held[0][0] == "exp-heldout-k-s1" and held[0][1]["split.holdout"] == [{"source": "kermany"}]
    assert held[0][1]["split.experiment"] == "loso"


def test_a_projection_run_with_a_held_out_source_reports_the_filter_on_it_over_seeds():
    def record(kept: int) -> dict:
        test = {"frontal_recall": 1.0, "lateral_recall": 1.0, "n_frontal": 30, "n_lateral": 2, "frontal_refused": 0,
                "lateral_refused": 2}
        unseen = {"frontal_recall": kept / 40, "lateral_recall": None, "n_frontal": 40, "n_lateral": 0,
                  "frontal_refused": 40 - kept, "lateral_refused": 0}
        split = {"n": 32, "accuracy": 1.0, "frontal_accuracy": 1.0, "lateral_accuracy": 1.0}
        return {"metrics": {s: {**split, "by_source": {"cohen": test}} for s in ("train", "val", "test")}
                | {"external": {**split, "by_source": {"kermany": unseen}}},
                "split_counts": {s: {"frontal": 30, "lateral": 2} for s in ("train", "val", "test")}}

    runs = {f"unseen-s{seed}": record(kept) for seed, kept in ((1, 20), (2, 38), (3, 40))}
    h = experiment.headline("projection", runs)
    first = h["unseen-s1"]
    assert first["unseen_frontal_recall"] == pytest.approx(0.5) and first["unseen_frontal_refused"] == 20
    assert first["unseen_lateral_recall"] is None  # no lateral among the held-out images: not measured
    spread = h["unseen over seeds"]
    assert spread["unseen_frontal_recall"]["min"] == pytest.approx(0.5)
    assert spread["unseen_frontal_recall"]["mean"] == pytest.approx(98 / 120)
    assert spread["worst_source_frontal_recall"]["mean"] == 1.0  # the test split's sources, apart
    rows = "\n".join(experiment._projection_rows({"runs": runs}))
    assert "| unseen-s1 | kermany | 40 (20) | 0.500 | 0 | null |" in rows and "held-out source" in rows
    assert "| unseen-s2 | test | 32 (2 lateral) | 1.000 | 1.000 | 1.000 |" in rows  # each split row names its run
    cell = experiment._short({"kind": "projection", "headline": h, "experiment": "projection", "runs": runs})
    assert cell == ("unseen: frontal recall on the held-out source 0.817 (min 0.500), worst test source's 1.000 "
                    "(min 1.000) over 3 seeds")


def test_experiments_compare_projection_filters_by_the_filter_alone_not_the_deployed_rule(tmp_path):
    """train_projection reports the rule (each file's view position first) and, under ``filter_only``, the filter
    alone: experiments compare filters, so they read the latter, as every record before the rule's figures held."""
    alone = {"frontal_recall": 0.5, "lateral_recall": None, "n_frontal": 40, "n_lateral": 0, "frontal_refused": 20,
             "lateral_refused": 0}
    rule = {**alone, "frontal_recall": 1.0, "frontal_refused": 0}  # every file's header said frontal
    split = {"n": 40, "accuracy": 1.0, "frontal_accuracy": 1.0, "lateral_accuracy": None, "by_header": 40,
             "by_source": {"kermany": rule}}
    alone_split = {**split, "accuracy": 0.5, "frontal_accuracy": 0.5, "by_source": {"kermany": alone}}
    del alone_split["by_header"]
    metrics = {s: {**split, "filter_only": alone_split} for s in ("train", "val", "test", "external")}
    metrics["lateral_check"] = {"status": "off"}
    assert experiment.filter_only(metrics) == {**{s: alone_split for s in ("train", "val", "test", "external")},
                                               "lateral_check": {"status": "off"}}
    old = {s: alone_split for s in ("test", "external")}  # a record before the rule's figures: the filter's alone
    assert experiment.filter_only(old) == old
    _common.write_json(tmp_path / "reports/train_projection/metrics.json", metrics)
    _common.write_json(tmp_path / "reports/split/summary.json", {"projection": {}})
    got = experiment.collect_projection(tmp_path, {}, project=tmp_path)
    assert got["metrics"]["test"]["accuracy"] == 0.5
    assert experiment.headline("projection", {"p": got})["p"]["unseen_frontal_recall"] == 0.5


def test_holdout_with_test_keeps_a_test_split_of_the_rest():
    m = manifest_rows()
    p = stage_params(holdout=[{"source": "neg1"}], holdout_with_test=True)
    tables, _ = split_stage.task_tables(m, p)
    covid = tables["covid"].merge(m[["image_id", "source"]])
    assert set(covid.loc[covid["source"] == "neg1", "split"]) == {"test"}
    rest = covid[covid["source"] != "neg1"]
    assert set(rest["split"]) == {"train", "val", "test"}  # the other sources keep their own test patients
    assert {"covid", "negative"} <= set(covid.loc[covid["split"] == "test", "label"])
    assert split_stage.validated_fractions("covid", p) == dict(splits.PAPER_FRACTIONS)
    assert not set(rest.loc[rest["split"] == "test", "patient_id"]) & set(rest.loc[rest["split"] != "test",
                                                                                   "patient_id"])


def test_the_ablation_plans_every_lever_on_the_same_runs_over_seeds(tmp_path: Path):
    spec = experiment.load("ablation")
    plan = experiment.ablation_plan("ablation", spec)
    levers, run_names, seeds = spec["levers"], spec["runs"], spec["seeds"]
    assert len(plan) == len(levers) * len(run_names) * len(seeds) and len(seeds) >= 3
    assert {"baseline", "lung-crop", "clahe", "augment-strong", "source-balanced", "size-128", "pretrained"} <= \
        set(levers)
    step = next(s for s in plan if s["name"] == "ablation-lung-crop-kermany-s2")
    assert step["params"]["split.holdout"] == [{"source": "kermany"}] and step["params"]["split.holdout_with_test"]
    assert step["params"]["train_classifier.input"]["crop"] is True and step["params"]["train_classifier.seed"] == 2
    assert step["params"]["cache.size"] == 64 and step["targets"] == ["train_classifier"]  # _base under it all
    assert {s["params"]["split.experiment"] for s in plan} == {"leave-one-source-out", "adult-negatives",
                                                              "cohen-pneumonia"}
    only = experiment.ablation_plan("ablation", spec, levers=["baseline", "clahe"])
    assert {s["lever"] for s in only} == {"baseline", "clahe"}
    with pytest.raises(experiment.ExperimentError, match="unknown levers"):
        experiment.ablation_plan("ablation", spec, levers=["dropout"])
    held = experiment.ablation_plan("ablation", spec, levers=["baseline"], runs=["shenzhen", "kermany"])
    assert [s["name"] for s in held[:2]] == ["ablation-baseline-kermany-s1", "ablation-baseline-shenzhen-s1"]
    assert len(held) == 2 * len(seeds)
    with pytest.raises(experiment.ExperimentError, match="unknown runs"):
        experiment.ablation_plan("ablation", spec, runs=["padchest"])
    estimate = experiment.ablation_estimate(only, yaml.safe_load((ROOT / "params.yaml").read_text()))
    per_seed = 3 * 2 + 2 + 2  # three held-out runs of c and e, adult negatives c and d, Cohen pneumonias c and d
    assert estimate["classifier_trainings"] == 2 * per_seed * len(seeds) and estimate["upstream_sets"] == 1
    assert estimate["dvc_runs"] == len(only)
    ensembles = experiment.ablation_plan("ablation", spec, levers=["lung-crop-equalize-ensemble-3"])
    trained = experiment.ablation_estimate(ensembles, yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert trained["classifier_trainings"] == 3 * per_seed * len(seeds)  # three networks per model


def test_the_dry_run_counts_one_projection_filter_per_data_selection(tmp_path: Path, capsys):
    """Each selection trains its own filter (the projection split pins its covid test patients to its test split:
    test_deps), and so does each lever that changes the filter's inputs; the estimate counted one filter in all."""
    spec = experiment.load("ablation")
    baseline = yaml.safe_load((ROOT / "params.yaml").read_text())
    selections = {json.dumps({k: v for k, v in run["params"].items() if k.startswith("split.")}, sort_keys=True)
                  for run in spec["runs"].values()}
    assert len(selections) == len(spec["runs"]) == 5  # three held-out sources, adult negatives, Cohen pneumonias
    plain = experiment.ablation_plan("ablation", spec, levers=["baseline", "clahe"])  # the filter's inputs as _base's
    assert experiment.ablation_estimate(plain, baseline)["projection_filter_trainings"] == len(selections)
    one = experiment.ablation_plan("ablation", spec, levers=["baseline"], runs=["adult-negatives"])
    assert experiment.ablation_estimate(one, baseline)["projection_filter_trainings"] == 1  # over every seed
    # size-128 changes the filter's cache, pretrained the pretrain stage it depends on: five filters more each
    inputs = experiment.ablation_plan("ablation", spec, levers=["baseline", "size-128", "pretrained"])
    assert experiment.ablation_estimate(inputs, baseline)["projection_filter_trainings"] == 3 * len(selections)

    (tmp_path / "cohen").mkdir()
    (tmp_path / "cohen/metadata.csv").write_text("filename\n")
    assert experiment.main(["ablation", "--dry-run", "--levers", "baseline", "--real-data", str(tmp_path)]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "5 projection filter trainings (one per data selection" in summary
    assert "upstream stage sets (cache, U-Net, segment, pretrain" in summary  # no longer says the filter is shared


def _workdir(root: Path, scores: dict[str, tuple[list, list, list]], threshold: float = 0.5) -> Path:
    """A finished run's files: the cache index (sources), the split summary, params and each classifier's
    predictions.csv and threshold.json. ``scores``: model -> (image ids, labels, scores) of the test split."""
    ids = sorted({i for v in scores.values() for i in v[0]})
    pd.DataFrame({"image_id": ids, "source": [i.split("/")[0] for i in ids]}).to_csv(
        root / "index.csv", index=False)
    (root / "artifacts/cache").mkdir(parents=True)
    (root / "index.csv").rename(root / "artifacts/cache/index.csv")
    _common.write_json(root / "reports/split/summary.json", {"covid": {"test": {}}})
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    for model, (image_ids, labels, values) in scores.items():
        folder = root / f"artifacts/models/classifier_{model}"
        folder.mkdir(parents=True)
        pd.DataFrame({"image_id": image_ids, "split": "test", "label": labels, "score": values}).to_csv(
            folder / "predictions.csv", index=False)
        _common.write_json(folder / "threshold.json", {"threshold": threshold})
    return root


def test_ablation_figures_come_from_each_model_s_predictions(tmp_path: Path):
    ids = ["cohen/1", "cohen/2", "cohen/3", "cohen/4", "kermany/1", "kermany/2", "kermany/3", "kermany/4"]
    labels = ["covid", "covid", "negative", "negative"] + ["negative"] * 4
    work = _workdir(tmp_path, {"c_vgg16": (ids, labels, [0.9, 0.4, 0.2, 0.6, 0.1, 0.2, 0.7, 0.3]),
                               "e_vgg16": (ids, labels, [0.6, 0.5, 0.5, 0.4, 0.5, 0.5, 0.5, 0.55])})
    params = {"train_classifier.variants": ["c", "e"], "train_classifier.backbones": ["vgg16"],
              "split.holdout": [{"source": "kermany"}]}
    got = experiment.collect_ablation(work, params, project=tmp_path)
    c = got["models"]["c_vgg16"]
    assert got["heldout_sources"] == ["kermany"] and c["sensitivity"] == 0.5 and c["n_covid"] == 2
    assert c["specificity_by_source"] == {"cohen": {"value": 0.5, "n": 2}, "kermany": {"value": 0.75, "n": 4}}
    assert c["test_auc"] == pytest.approx(10 / 12)
    # each source's negatives against the same COVID-19 positives, whatever the threshold
    assert c["auc_by_source"] == {"cohen": pytest.approx(3 / 4), "kermany": pytest.approx(7 / 8)}
    expected = max(0.0, (got["models"]["e_vgg16"]["test_auc"] - 0.5) / (c["test_auc"] - 0.5))
    assert got["lungs_removed"]["vgg16"] == pytest.approx(expected)
    json.dumps(got, allow_nan=False)

    def run(lever, name, seed, spec, sens, auc=None):
        models = {"c_vgg16": {"specificity_by_source": {"kermany": {"value": spec}}, "sensitivity": sens,
                              "test_auc": auc, "auc_by_source": {"kermany": spec + 0.5}}}
        params = {"train_unet.epochs": 40, "train_classifier.seed": seed,  # one profile: the levers' changes alone
                  **({"train_classifier.input": {"crop": True}} if lever == "lung-crop" else {})}
        return {"lever": lever, "run": name, "seed": seed, "wall_seconds": 120.0, "models": models, "cpu": "Test CPU",
                "heldout_sources": ["kermany"] if name == "kermany" else [], "lungs_removed": {"vgg16": 0.5},
                "params": params}

    runs = {f"{lever}-{name}-s{seed}": run(lever, name, seed, spec, sens, auc)
            for lever, base in (("baseline", 0.2), ("lung-crop", 0.6))
            for seed, (spec, sens, auc) in ((1, (base, 0.9, 0.7)), (2, (base + 0.1, 0.95, 0.8)))
            for name in ("kermany", "cohen-pneumonia")}
    table = experiment.ablation_table(runs)
    assert table["lung-crop"]["specificity kermany"]["mean"] == pytest.approx(0.65)
    assert table["baseline"]["specificity kermany"]["sd"] == pytest.approx(np.std([0.2, 0.3], ddof=1))
    assert table["baseline"]["cohen-pneumonia AUC c"]["mean"] == pytest.approx(0.75)
    assert table["lung-crop"]["AUC kermany vs COVID-19"]["mean"] == pytest.approx(1.15)
    assert table["baseline"]["wall_minutes"]["mean"] == pytest.approx(4.0)  # two runs of 2 minutes per seed
    result = {"experiment": "ablation", "kind": "ablation", "runs": runs, "headline": table, "reference": "baseline",
              "levers": {"baseline": {}, "lung-crop": {"train_classifier.input": {"crop": True}}}}
    rows = "\n".join(experiment._ablation_rows(result))
    assert "| lung-crop | " in rows and "0.650 ± 0.071 (+0.400)" in rows and "`lung-crop`: " in rows
    result["reference"] = "lung-crop"  # the changes are from the reference lever
    rows = "\n".join(experiment._ablation_rows(result))
    assert "0.250 ± 0.071 (-0.400)" in rows and "the change from `lung-crop`" in rows
    result.update(description="d", command="python -m pipelines.experiment ablation", notes="", goals="g >= 0.7",
                  settings=experiment._settings({"cache.size": 64}, {}), wall_seconds=600.0, finished="now")
    experiment.record(tmp_path, "ablation", result)
    summary = experiment.render_summary(tmp_path).read_text()
    assert "| ablation | `python -m pipelines.experiment ablation` |" in summary and "Goals: g >= 0.7" in summary
    # its record's wall time is its last invocation's, its settings its last run's: said so, with the runs' own sum
    assert "| the last run's: 64 px; epochs:" in summary and "- settings (the last run's: " in summary
    assert "| 10.0 min (the last invocation); its 8 runs 16.0 min in all |" in summary
    assert "- wall time: 10.0 min (the last invocation) on 2 shared CPU cores (CPU not recorded) (finished now); " \
           "its 8 runs 16.0 min in all" in summary
    assert experiment.headline("ablation", runs) == table  # --summary recomputes the same table


def test_a_partial_ablation_keeps_what_was_recorded(tmp_path: Path, monkeypatch):
    """--levers/--runs run a subset: the other recorded runs, and their dvc commands, stay in the record."""
    import argparse

    spec = experiment.load("ablation")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    ran: list[str] = []

    def fake_execute(workdir, exp_name, params, targets, kind, real_data, log, commands):
        ran.append(exp_name)
        commands.append(f"dvc exp run -n {exp_name} train_classifier")
        return {"models": {}, "heldout_sources": [], "lungs_removed": {}, "wall_seconds": 60.0}

    monkeypatch.setattr(experiment, "PROJECT", tmp_path)
    monkeypatch.setattr(experiment, "prepare_workdir", lambda project, workdir: workdir)
    monkeypatch.setattr(experiment, "execute", fake_execute)
    args = dict(name="ablation", workdir=tmp_path, reuse_code=False, dry_run=False, set=[], resume=False)
    one = argparse.Namespace(**args, levers="clahe", runs="kermany")
    assert experiment.run_ablation(one, spec, tmp_path) == 0
    two = argparse.Namespace(**{**args, "resume": True}, levers="equalize", runs="kermany")
    assert experiment.run_ablation(two, spec, tmp_path) == 0
    record = json.loads((tmp_path / experiment.REPORTS / "ablation.json").read_text())
    assert ran == [f"ablation-{lever}-kermany-s{s}" for lever in ("clahe", "equalize") for s in spec["seeds"]]
    assert set(record["runs"]) == set(ran) and set(record["levers"]) == {"clahe", "equalize"}
    assert [c.split()[4] for c in record["dvc_commands"]] == ran
    assert record["command"].count("--levers") == 2
    assert experiment.run_ablation(two, spec, tmp_path) == 0  # resumed: the recorded equalize runs are kept
    assert len(ran) == 2 * len(spec["seeds"])
    record = json.loads((tmp_path / experiment.REPORTS / "ablation.json").read_text())
    assert [c.split()[4] for c in record["dvc_commands"]] == ran  # a kept run keeps its command
    assert experiment.MISSING_COMMANDS not in record and record["command"].endswith("--resume")


def test_an_ablation_run_reads_its_overlay_once(tmp_path: Path, monkeypatch, capsys):
    """The summary and table a run writes take the overlay as the run read it (the file may say otherwise by then:
    here its notes), never a second reading; its --set changes the runs, not the overlay they are compared with."""
    import argparse

    overlay = {**experiment.load("ablation"), "notes": "notes as the run read them"}
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.setattr(experiment, "PROJECT", tmp_path)
    monkeypatch.setattr(experiment, "prepare_workdir", lambda project, workdir: workdir)
    monkeypatch.setattr(experiment, "execute", lambda *args: {"models": {}, "heldout_sources": [],
                                                              "lungs_removed": {}, "wall_seconds": 60.0})
    a = argparse.Namespace(name="ablation", workdir=tmp_path, reuse_code=False, dry_run=False, set=["test.only=1"],
                           resume=False, levers="clahe", runs="kermany")
    assert experiment.run_ablation(a, overlay, tmp_path) == 0
    assert "notes as the run read them" in (tmp_path / experiment.REPORTS / "README.md").read_text()
    n = len(overlay["seeds"])
    assert f"0 of the {n} recorded runs have the params the overlay plans" in capsys.readouterr().out
    assert "test.only" not in overlay["params"]


def test_a_record_says_which_runs_dvc_commands_it_lost(tmp_path: Path):
    """An earlier --resume dropped the commands of the runs it kept: they cannot be made again, and the record and the
    summary name those runs rather than leave nothing."""
    base = {"experiment": "one", "command": "c", "description": "d", "settings": {}, "wall_seconds": 60.0,
            "finished": "now", "headline": {}, "kind": "classifier", "runs": {"one-a": {"models": {}},
                                                                             "one-b": {"models": {}}},
            "dvc_commands": ["dvc exp run -n one-a -S x=1 evaluate"]}
    experiment.record(tmp_path, "one", base)
    record = json.loads((tmp_path / experiment.REPORTS / "one.json").read_text())
    assert record[experiment.MISSING_COMMANDS]["runs"] == ["one-b"]
    assert "cannot be recovered" in record[experiment.MISSING_COMMANDS]["why"]
    assert "- dvc commands not recorded for 1 runs (until " in experiment.render_summary(tmp_path).read_text()
    experiment.record(tmp_path, "one", {**record, "dvc_commands": [*base["dvc_commands"], "dvc exp run -n one-b e"]})
    assert experiment.MISSING_COMMANDS not in json.loads((tmp_path / experiment.REPORTS / "one.json").read_text())


@pytest.mark.parametrize("flags", [["--resume"], ["--levers", "baseline"], ["--runs", "kermany", "--resume"]])
def test_ablation_options_given_to_another_experiment_are_refused(flags, tmp_path: Path, capsys):
    """--levers, --runs and --resume mean something to an ablation only: elsewhere they are an error, never ignored
    (all-sources --resume would have rerun every run)."""
    (tmp_path / "cohen").mkdir()
    (tmp_path / "cohen" / "metadata.csv").write_text("")
    with pytest.raises(SystemExit) as err:
        experiment.main(["comparison", "--dry-run", "--real-data", str(tmp_path), *flags])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "only an ablation takes them; comparison is of kind classifier" in message and flags[0] in message


def test_a_run_over_stale_outputs_is_refused_not_recorded(tmp_path: Path):
    """Images at another size than the run asked for are an earlier run's outputs: an error, never its figures."""
    (tmp_path / "artifacts/cache").mkdir(parents=True)
    np.save(tmp_path / "artifacts/cache/images.npy", np.zeros((2, 8, 8), np.float16))
    experiment.check_working_size(tmp_path, {"cache.size": 8})
    with pytest.raises(experiment.ExperimentError, match=r"images.npy: images of 8x8 px after a run at cache.size 16"):
        experiment.check_working_size(tmp_path, {"cache.size": 16})
    (tmp_path / "params.yaml").write_text("cache: {size: 16}\n")  # the workdir's own params when the run sets none
    with pytest.raises(experiment.ExperimentError, match="stale outputs"):
        experiment.check_working_size(tmp_path, {})
    (tmp_path / "artifacts/cache_projection").mkdir()  # the projection filter's cache, at its own size
    np.save(tmp_path / "artifacts/cache_projection/images.npy", np.zeros((2, 16, 16), np.float16))
    experiment.check_working_size(tmp_path, {"cache.size": 8, "train_projection.size": 16})
    with pytest.raises(experiment.ExperimentError, match=r"cache_projection/images.npy: .* at train_projection.size 8"):
        experiment.check_working_size(tmp_path, {"cache.size": 8, "train_projection.size": None})


def test_reuse_code_refuses_a_baseline_whose_params_were_committed_by_hand(tmp_path: Path):
    """The runner's own baseline passes, and so does a commit of code alone; a commit that takes in an experiment's
    applied params.yaml (what `git add -A` after a run does) is refused, as is a workdir the runner never prepared."""
    project, workdir = tmp_path / "project", tmp_path / "work"
    project.mkdir()
    (project / "params.yaml").write_text("train_classifier:\n  seed: 42\n")
    (project / "stage.py").write_text("print('stage')\n")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                 ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "project"]):
        subprocess.run(["git", *args], cwd=project, check=True)
    experiment.prepare_workdir(project, workdir)
    experiment.check_baseline(workdir)

    def commit(name: str, text: str) -> None:
        (workdir / name).write_text(text)
        for args in (["add", name], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", name]):
            subprocess.run(["git", *args], cwd=workdir, check=True)

    commit("stage.py", "print('stage, mended')\n")
    experiment.check_baseline(workdir)  # code alone: the params every run starts from are the runner's
    commit("params.yaml", "train_classifier:\n  seed: 3\n")  # a held-out run's applied seed, committed by hand
    with pytest.raises(experiment.ExperimentError, match="baseline commit's params.yaml"):
        experiment.check_baseline(workdir)
    experiment.prepare_workdir(project, workdir)  # run without --reuse-code: the project's params again
    experiment.check_baseline(workdir)
    (workdir / ".git" / experiment.BASELINE_DIGEST).unlink()
    with pytest.raises(experiment.ExperimentError, match="run once without --reuse-code"):
        experiment.check_baseline(workdir)


def test_a_held_out_site_whose_covid_films_the_ood_check_refuses_reports_them_admitted(tmp_path: Path):
    """c at the held-out hospitals: the model's OOD check refuses the new site's COVID-19 films, so its own threshold
    cannot be measured on the films serving answers (skipped, with the counts); admitted past the check, it can, and
    the held-out rows and summary carry both, with the shares refused."""
    from covidcxr import ood as ood_module

    rng = np.random.default_rng(4)
    n_pos, n_neg = 60, 120
    detector = ood_module.MahalanobisDetector()
    detector.threshold_ = 10.0
    pred = pd.DataFrame({"split": ["val"] * 4 + ["test"] * (n_pos + n_neg),
                         "label": ["covid", "negative"] * 2 + ["covid"] * n_pos + ["negative"] * n_neg,
                         "score": [0.9, 0.1, 0.8, 0.2, *rng.uniform(0.5, 1.0, n_pos), *rng.uniform(0.0, 0.7, n_neg)],
                         "ood_score": [1.0] * 4 + [*rng.uniform(12.0, 20.0, n_pos), *rng.uniform(0.0, 8.0, n_neg)],
                         "patient_id": [f"p{i}" for i in range(4 + n_pos + n_neg)]})
    rule = {"threshold": 0.6, "objective": "sensitivity", "min_sensitivity": 0.9}
    p = {"n_boot": 20, "seed": 0, "calibration_bins": 5, "site_calibration": {"n_per_class": 20, "draws": 30}}
    result = evaluate.evaluate_model(pred, rule, p, detector)
    assert result["test"]["site_calibration"]["status"] == "skipped"  # no COVID-19 film answered
    admitted = result["test"]["site_admission"]
    assert admitted["status"] == "measured" and admitted["model_sensitivity"] is None
    assert admitted["sensitivity"] >= 0.85 and admitted["refused"] < 0.05
    assert "site_admission" not in evaluate.evaluate_model(pred, rule, p)["test"]  # no detector: nothing to admit
    run = {"models": {"c_vgg16": collected_c_vgg16(tmp_path, result, 0.6, {"covid": n_pos})}}
    figures = experiment.heldout_figures({"select": ["kermany"]}, {"kermany": [run], "hospitals": [run, run]})
    row = figures["sources"]["hospitals"]["c_vgg16"]
    assert row["site_skipped"].startswith("2 of 2 seeds: 0 COVID-19")
    assert row["admit_sensitivity"] == pytest.approx(admitted["sensitivity"]) and row["admit_refused_sd"] == 0.0
    assert row["admit_model_refused"] == pytest.approx(admitted["model_refused"])
    assert "admit_model_sensitivity" not in row  # undefined: left out, not averaged as zero
    rendered = "\n".join(experiment._heldout_summary_rows({"x": {"heldout": figures}}))
    assert "with the site's films also admitted past the out-of-distribution check" in rendered
    assert (f"| hospitals | c_vgg16 | {admitted['specificity']:.3f} ± 0.000 (min {admitted['specificity']:.3f}"
            in rendered or f"| hospitals | c_vgg16 | {admitted['specificity']:.3f} ± 0.000" in rendered)
    assert "| hospitals | c_vgg16 | not measured: 2 of 2 seeds: 0 COVID-19" in rendered


def _ablation_run(lever: str, run: str, seed: int, spec: float | None, cpu: str | None = None,
                  **params: object) -> dict:
    """One recorded ablation run of a held-out source (Kermany) with model c's specificity ``spec`` there, made under
    the profile ``params`` (the U-Net's 40 epochs, and its seed, unless given)."""
    models = {"c_vgg16": {"specificity_by_source": {"kermany": {"value": spec}}, "sensitivity": 0.9,
                          "test_auc": 0.8, "auc_by_source": {"kermany": 0.7}}}
    return {"lever": lever, "run": run, "seed": seed, "wall_seconds": 60.0, "models": models, "cpu": cpu,
            "heldout_sources": ["kermany"], "lungs_removed": {"vgg16": 0.5},
            "params": {"train_unet.epochs": 40, "train_classifier.seed": seed, **params}}


def test_an_ablation_cell_over_fewer_seeds_says_so_and_its_change_is_over_the_shared_seeds():
    """An interrupted lever (one seed) and a seed whose figure is missing: the cell says its n, one seed has no sd,
    and the change from the reference is over the seeds both measured, not against the reference's every seed."""
    runs = {f"{lever}-kermany-s{seed}": _ablation_run(lever, "kermany", seed, spec, cpu="Test CPU")
            for lever, specs in (("baseline", (0.2, 0.3, 0.5)), ("lung-crop", (0.6,)), ("clahe", (0.5, None, 0.7)))
            for seed, spec in zip((1, 2, 3), specs)}
    table = experiment.ablation_table(runs)
    assert table["lung-crop"]["specificity kermany"]["n"] == 1 and table["lung-crop"]["specificity kermany"]["sd"] \
        is None
    assert table["clahe"]["specificity kermany"]["seeds"] == [1, 3]
    rows = "\n".join(experiment._ablation_rows({"experiment": "test", "runs": runs, "reference": "baseline"}))
    assert "Mean ± sd over seeds [1, 2, 3]" in rows
    lung_crop = next(line for line in rows.splitlines() if line.startswith("| lung-crop |"))
    assert "0.600 (n=1) (+0.400 over n=1)" in lung_crop and "±" not in lung_crop.split("|")[2]
    assert "0.600 ± 0.141 (n=2) (+0.250 over n=2)" in rows  # clahe: seeds 1 and 3 against baseline's 0.2 and 0.5
    assert "0.333 ± 0.153 |" in rows  # the reference: every seed, no n
    assert "over the seeds both levers measured" in rows


def test_the_ablation_table_says_which_machine_each_lever_ran_on_and_flags_a_change_across_machines():
    """--resume keeps runs of whatever CPU they ran on: each lever names its machines, and a change from the reference
    between runs of different machines (or of one not recorded) is marked, never presented as the lever's alone."""
    xeon, epyc = "Intel(R) Xeon(R) Processor", "AMD EPYC 9B14"
    runs = {f"{lever}-kermany-s{seed}": _ablation_run(lever, "kermany", seed, spec + seed / 100, cpu)
            for lever, spec, cpu in (("baseline", 0.2, None), ("lung-crop", 0.5, xeon), ("clahe", 0.4, xeon),
                                     ("equalize", 0.3, epyc))
            for seed in (1, 2, 3)}
    runs["clahe-kermany-s1"]["cpu"] = None
    result = {"experiment": "test", "runs": runs, "reference": "lung-crop"}
    assert experiment.ablation_table(runs)["clahe"]["specificity kermany"]["machines"] == [xeon, None]
    rows = "\n".join(experiment._ablation_rows(result))
    line = {row.split(" | ")[0].removeprefix("| "): row for row in rows.splitlines() if row.startswith("| ")}
    assert line["lung-crop"].endswith("| M2 (3) |") and line["baseline"].endswith("| unknown (3) |")
    assert line["clahe"].endswith("| M2 (2), unknown (1) |") and line["equalize"].endswith("| M1 (3) |")
    assert "(-0.300†)" in line["baseline"] and "(-0.100†)" in line["clahe"] and "(-0.200†)" in line["equalize"]
    assert f"M1 {epyc}; M2 {xeon}; unknown not recorded" in rows
    runs["clahe-kermany-s1"]["cpu"] = xeon  # one and the same recorded machine: no mark
    line = next(row for row in experiment._ablation_rows(result) if row.startswith("| clahe |"))
    assert "(-0.100)" in line and "†" not in line


def test_an_ablation_change_between_runs_of_different_profiles_is_marked_with_what_differs():
    """The runs a change compares may have been made under other upstream settings than the reference's (lung-crop's
    over an 8-epoch U-Net with segmentation_external [cohen], baseline's over 40 epochs): such a change is marked ‡,
    and the legend names the keys and both sides' values; a lever over the reference's profile is not marked; a cell
    whose own runs mix profiles is marked §; runs with no params recorded cannot be compared and are marked too; each
    lever's params are printed as its runs set them, not as the record's definition says."""
    def inputs(**kw: object) -> dict:
        return {"train_classifier.input": {"crop": True, "margin": 0.1, "intensity": "none", **kw}}

    runs = {}
    for seed in (1, 2, 3):
        for lever, spec, params in (
                ("baseline", 0.2 + seed / 100, inputs()),
                ("lung-crop", 0.5, {**inputs(), "train_unet.epochs": 8, "split.segmentation_external": ["cohen"]}),
                ("clahe", 0.4, inputs(intensity="clahe")),
                ("equalize", 0.3, {**inputs(intensity="equalize"), **({"train_unet.epochs": 16} if seed == 3 else {})}),
                ("old", 0.1, {})):
            runs[f"{lever}-kermany-s{seed}"] = _ablation_run(lever, "kermany", seed, spec, "Test CPU", **params)
        runs[f"old-kermany-s{seed}"].pop("params")  # recorded before runs kept their params
    levers = {"baseline": {}, "lung-crop": inputs(), "clahe": inputs(intensity="clahe", clip_limit=0.02),
              "equalize": inputs(intensity="equalize"), "old": inputs(crop=False)}
    rows = experiment._ablation_rows({"experiment": "test", "runs": runs, "reference": "baseline", "levers": levers})
    line = {row.split(" | ")[0].removeprefix("| "): row for row in rows if row.startswith("| ")}
    assert "0.500 ± 0.000 (+0.280‡)" in line["lung-crop"] and "†" not in line["lung-crop"]
    assert "0.400 ± 0.000 (+0.180)" in line["clahe"] and "‡" not in line["clahe"]  # the same profile: the lever's
    assert "0.300 ± 0.000§ (+0.080‡)" in line["equalize"]  # its seed 3 over another U-Net than seeds 1 and 2
    assert "(-0.120‡)" in line["old"] and "§" not in line["baseline"]
    text = "\n".join(rows)
    assert ('- `lung-crop`: `split.segmentation_external` ["cohen"] against not set; `train_unet.epochs` 8 against 40'
            in text)
    assert "- `equalize`: `train_unet.epochs` 16, 40 against 40; its own runs (§) set `train_unet.epochs` to 16 or 40" \
        in text
    assert "- `old`: 3 of the runs compared recorded no params (their profile unknown)" in text
    assert "‡ marks a change between runs of different profiles" in text and "§ marks a cell" in text
    assert "- `clahe`: {\"train_classifier.input\": {\"crop\": true, \"intensity\": \"clahe\", \"margin\": 0.1}}" \
        in text  # as its runs set it (the record's definition says clip_limit 0.02)
    assert "- `baseline`: no params of its own" in text
    assert "- `old`: not recorded (none of its 3 runs recorded its params)" in text


def test_a_stage_is_called_reused_only_when_its_training_was_not_the_run_s_own():
    """A run that trained its model within its own wall time did not reuse it: "reused" only where the training
    began before the run (both recorded) or took longer than the whole run; the summary's header names the
    records' machines instead of claiming shared cores."""
    assert experiment.stage_reused({"train_seconds": 100.0, "wall_seconds": 150.0}) is False
    assert experiment.stage_reused({"train_seconds": 173.2, "wall_seconds": 7.9}) is True
    assert experiment.stage_reused({"train_seconds": 50.0, "wall_seconds": 150.0, "train_started_unix": 1000.0,
                                    "started_unix": 2000.0}) is True  # from an earlier run, however short
    assert experiment.stage_reused({"train_seconds": 100.0, "wall_seconds": 150.0, "train_started_unix": 2010.0,
                                    "started_unix": 2000.0}) is False
    assert experiment.stage_reused({"wall_seconds": 150.0}) is None
    record = {"kind": "segmentation", "wall_seconds": 600.0,
              "runs": {"a": {"train_seconds": 300.0, "wall_seconds": 310.0},
                       "b": {"train_seconds": 174.0, "wall_seconds": 8.0}}}
    assert experiment._wall(record) == "10.0 min (stage reused in 1 of 2 runs; its training took 2.9 min)"
    record["runs"].pop("b")
    assert experiment._wall(record) == "10.0 min"


def test_the_summary_header_names_the_records_machines(tmp_path: Path):
    base = {"experiment": "one", "command": "c", "description": "d", "settings": {}, "wall_seconds": 60.0,
            "finished": "now", "headline": {}, "runs": {}, "kind": "classifier"}
    experiment.record(tmp_path, "one", {**base, "machine": {"cpus": 2, "cpu": "Test CPU"}})
    experiment.record(tmp_path, "two", {**base, "experiment": "two"})
    header = experiment.render_summary(tmp_path).read_text().splitlines()[2]
    assert "on the machine it names (2 cores of Test CPU; 1 records from before 2026-12-07 name none;" in header
    assert "shared with other work" not in header and "comparison did here" not in header


def test_every_run_records_the_machine_it_ran_on():
    """`execute` records the CPU and the kernels of each run: the ablation's table reads them back per run."""
    import inspect

    assert 'result["cpu"], result["cpu_kernels"]' in inspect.getsource(experiment.execute)
    assert experiment.run_machine({"cpu": "X", "cpu_kernels": "portable"}) == "X (portable kernels)"
    assert experiment.run_machine({"cpu": "X", "cpu_kernels": "native"}) == "X"
    assert experiment.run_machine({}) is None


def test_the_summary_shows_an_overlay_s_current_description_not_the_one_recorded(tmp_path: Path):
    """A record keeps the description it ran with; the summary shows the overlay's (corrected since: the held-out
    sources of all-sources are development figures, where the record said they never influenced a choice), and the
    record's as superseded."""
    base = {"experiment": "all-sources", "command": "c", "description": "never influence a choice", "settings": {},
            "wall_seconds": 60.0, "finished": "now", "headline": {}, "runs": {}, "kind": "classifier"}
    experiment.record(tmp_path, "all-sources", base)
    summary = experiment.render_summary(tmp_path).read_text()
    current = summary.index("is a development figure")
    assert current < summary.index("made under, superseded: never influence a choice)")
    current = experiment.load("all-sources")["description"].strip()
    experiment.record(tmp_path, "all-sources", {**base, "description": current})  # the same: shown once
    assert "superseded" not in experiment.render_summary(tmp_path).read_text()
