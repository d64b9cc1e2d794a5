"""Stage `split`: patient-level, label-stratified splits for each task, checked by the splits expectation suite.

Tasks: `covid` (the experiment chosen in params: positives vs negatives, optionally curated as the paper's exp. 2;
stratified by label and source),
`projection` (frontal vs lateral, every image whose projection is known) and `segmentation` (images with lung masks).
The segmentation split is drawn first; a covid-task patient whose masks the U-Net trains or is selected on keeps that
split (train or val), so that the U-Net never learned a covid test patient's lungs. The projection split is drawn last,
with every covid test patient in its test split: the filter that decides which covid test images are usable never
learned from a covid test patient's films.

External validation: `holdout` (rules, e.g. `[{source: kermany}]` or `[{source: cohen, site: Germany},
{source: montgomery}]`) puts every covid-task image they match in test and splits the rest into train/val (held-out
sources or hospitals); with `holdout_with_test` the rest is split train/val/test and the held-out rows join its test,
so that one model gives both a held-out source's and the other sources' test figures. `segmentation_external` puts
the masks of those sources in an `external` split that the U-Net never trains on; so do the `holdout` rules, for the
masks they match, and for the projection task's images (its `external` split): a held-out source or hospital is
unseen by the projection filter that keeps its images and the U-Net that crops and masks them, as by the classifier.
The rules are matched on the manifest's rows (its own columns: a task's table relabels `label`); every task holds
out every image of the matched images' patients (ingest merges the patient keys of sources that share a file, so a
person held out by source may have films of another source: they go to the held-out side with the rest), and a
held-out patient found in the projection or segmentation task's train or val is a :class:`HeldOutLeak`. Held-out
rows are checked only for patient disjointness (they are whole sources or sites).

The stage first reads the validate stage's verdict on the manifest (:data:`VALIDATED`) and refuses to split a
manifest that failed a critical expectation or was never validated (:class:`ManifestNotValidated`). The reports
(summary, checks, data docs) are written first; a critical failure of the suite then stops the stage
before the tables are written, and the three tables replace an earlier run's together or not at all.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

from covidcxr import manifest, splits, validation
from pipelines import _common

MANIFEST = _common.MANIFEST
CURATED = "reports/split/curated_out.csv"
SUMMARY = "reports/split/summary.json"
CHECKS = "reports/split/validation.json"
DOCS = "reports/split/data_docs"
DATA_DOCS = f"{DOCS}/index.html"
VALIDATED = "reports/validate/manifest.json"  # the validate stage's report on MANIFEST (pipelines.validate.CHECKS)
COLUMNS = ["image_id", "patient_id", "label", "split"]
PROJECTION_CLASSES = tuple(x for x in manifest.PROJECTIONS if x != "unknown")  # frontal, lateral


class ManifestNotValidated(RuntimeError):
    """The validate stage's report on the manifest is missing or unreadable, or says a critical expectation failed."""


class HeldOutLeak(splits.SelectionError):
    """A patient of the held-out rows is in the train or val split of a task whose model serves the classifier."""


def task_tables(m: pd.DataFrame, p: dict) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """The split table of every task, and the images curation removed."""
    experiment = p["experiments"][p["experiment"]]
    covid = splits.select_experiment(m, experiment["positives"], experiment["negatives"])
    dropped = covid.iloc[0:0]
    if experiment.get("curate", False):
        covid, dropped = splits.drop_negatives_among_positives(covid)

    projection = _projection_rows(m).assign(label=lambda d: d["projection"])
    segmentation = _segmentation_rows(m)  # labelled by source once split
    # covid strata: label x source, so that every source keeps its share in every split around the U-Net's patients
    covid = covid.assign(stratum=covid["label"].astype(str) + "/" + covid["source"].astype(str))
    _check_rules(m, p, covid)
    tasks = {"segmentation": segmentation, "covid": covid, "projection": projection}
    seed = int(p["seed"])
    out = {}
    for name, frame in tasks.items():
        fractions = p.get("fractions_" + name) or p["fractions"]
        held = _held_rows(name, p, m, frame)
        held_split = _held_out(name, p)[1]
        fixed = None  # the patients another task's model learned from, or tests on, keep that task's split
        if name == "covid":
            fixed = _unet_patients(out["segmentation"])
        elif name == "projection":
            fixed = _covid_test_patients(out["covid"])
        stratify = {"covid": "stratum", "segmentation": "source"}.get(name, "label")
        if held.any():
            assigned = splits.split_held_out(frame, held, holdout_split=held_split, seed=seed, stratify=stratify,
                                             fractions=validated_fractions(name, p), fixed=fixed,
                                             what=f"the held-out rows {_held_out(name, p, m)[0]}")
        else:
            assigned = splits.split_patients(frame, fractions=fractions, seed=seed, stratify=stratify, fixed=fixed)
        frame = frame.assign(split=assigned)
        if name == "segmentation":
            frame = frame.assign(label=frame["source"])
        out[name] = frame[COLUMNS].sort_values("image_id").reset_index(drop=True)
    out = {name: out[name] for name in ("covid", "projection", "segmentation")}
    check_held_out(out, splits.rule_patients(m, p["holdout"] or []))
    train = out["covid"][out["covid"]["split"] == "train"]
    missing = sorted({"covid", "negative"} - set(train["label"]))
    if missing:
        raise splits.SelectionError(f"covid task: the train split has no {missing} images "
                                    f"(split.holdout={p['holdout']!r} holds all of them)")
    return out, dropped


def check_held_out(tables: dict[str, pd.DataFrame], held_patients: set[str]) -> None:
    """A :class:`HeldOutLeak` if a held-out patient is in the train or val split of the projection or segmentation
    task: the filter or the U-Net would have learned from a held-out source or hospital it is meant never to see."""
    for task, model in (("projection", "projection filter"), ("segmentation", "U-Net")):
        table = tables[task]
        leaked = table[table["split"].isin(["train", "val"]) & table["patient_id"].astype(str).isin(held_patients)]
        if len(leaked):
            raise HeldOutLeak(f"{task} task: {leaked['patient_id'].nunique()} held-out patient(s) "
                              f"({len(leaked)} images) are in its train or val split: the {model} would learn from "
                              "the held-out rows (split.holdout) it is meant never to see")


def _check_rules(m: pd.DataFrame, p: dict, covid: pd.DataFrame) -> None:
    """A SelectionError for a `holdout` rule that matches no image of the covid task, or a `segmentation_external`
    source without masks (a misspelt source or site)."""
    for rule in p["holdout"] or []:
        if not covid["image_id"].isin(m.loc[splits.rule_matches(m, [rule]), "image_id"]).any():
            raise splits.SelectionError(f"held-out rule {dict(rule)} matches no row of the covid task")
    masked = set(_segmentation_rows(m)["source"].astype(str))
    for source in p["segmentation_external"]:
        if str(source) not in masked:
            raise splits.SelectionError(f"split.segmentation_external: source {source!r} has no image with lung masks")


def _segmentation_rows(m: pd.DataFrame) -> pd.DataFrame:
    """The manifest's images with lung masks: the segmentation task's rows."""
    return m[m["mask_path"].notna()]


def _projection_rows(m: pd.DataFrame) -> pd.DataFrame:
    """The manifest's images whose projection is known: the projection task's rows."""
    return m[m["projection"].isin(["frontal", "lateral"])]


def _task_rows(task: str, m: pd.DataFrame) -> pd.DataFrame:
    """A task's rows in the manifest (the covid task: every row; its experiment selects among them)."""
    return {"segmentation": _segmentation_rows, "projection": _projection_rows}.get(task, lambda rows: rows)(m)


def _unet_patients(segmentation: pd.DataFrame) -> dict[str, str]:
    """The patients whose masks the U-Net trains or is selected on, and their split: the covid task keeps them in the
    same split, so that no covid test patient's lungs were learned by the U-Net that masks them (variants d and e, the
    lung crop). Held-out rows still go to test; their masks are the U-Net's `external` split (:func:`_held_out`)."""
    learned = segmentation[segmentation["split"].isin(["train", "val"])]
    return dict(zip(learned["patient_id"].astype(str), learned["split"].astype(str)))


def _covid_test_patients(covid: pd.DataFrame) -> dict[str, str]:
    """The covid task's test patients: the projection task puts them in its test split too, so that the filter that
    decides which covid test images are usable never trained or was selected on their films. Only test is pinned: the
    rest fill around them, and a held-out run whose covid task has no test split of its own (its test is the held-out
    rows, the projection task's `external` ones, :func:`_held_rows`) still gets a projection test split."""
    test = covid[covid["split"] == "test"]
    return dict.fromkeys(test["patient_id"].astype(str), "test")


def _held_out(task: str, p: dict, m: pd.DataFrame | None = None) -> tuple[list[dict], str]:
    """The rules of rows a task holds out of its patient-level split, and the split they go to.

    Segmentation holds out the `segmentation_external` sources and every `holdout` rule whose patients have rows in
    the task (``m``: the manifest, or any part of it holding the task's rows; without it, every rule): the masks of a
    source or hospital held out of the covid task never train or select the U-Net whose masks its images get.
    Projection holds out the `holdout` rules alike: the filter that keeps or refuses a held-out source's images never
    learned from that source either, and its `external` split says how it does on a source it never saw. Rules are
    matched on ``m``'s own columns (a task's table relabels `label`).
    """
    if task == "covid" and p["holdout"]:
        return [dict(rule) for rule in p["holdout"]], "test"
    if task in ("segmentation", "projection"):
        rules = [{"source": str(s)} for s in p["segmentation_external"]] if task == "segmentation" else []
        patients = None if m is None else _task_rows(task, m)["patient_id"]
        rules += [dict(rule) for rule in p["holdout"] or []
                  if patients is None or patients.astype(str).isin(splits.rule_patients(m, [rule])).any()]
        return rules, "external" if rules else ""
    return [], ""


def _held_rows(task: str, p: dict, m: pd.DataFrame, frame: pd.DataFrame) -> pd.Series:
    """The rows of ``frame`` (a task's table) that ``task`` holds out: every image of the patients of the images its
    rules match in the manifest ``m`` (a patient whose key ingest merged across sources keeps all films together)."""
    return frame["patient_id"].astype(str).isin(splits.rule_patients(m, _held_out(task, p, m)[0]))


def task_classes(task: str, p: dict, m: pd.DataFrame) -> list[str]:
    """The classes every checked split of ``task`` must hold, from the task's definition, never from its split table
    (where a class that no row has would pass unnoticed): covid/negative, frontal/lateral, and for segmentation every
    source with lung masks in the manifest ``m`` but those whose masks are all held out (an `external` split)."""
    if task == "covid":
        return list(validation.CLASSES)
    if task == "projection":
        return list(PROJECTION_CLASSES)
    masked = _segmentation_rows(m)
    return sorted(masked.loc[~_held_rows(task, p, m, masked), "source"].astype(str).unique())


def validated_fractions(task: str, p: dict) -> dict[str, float]:
    """Target split shares of the rows split by patient (a held-out test source leaves only train and val, unless
    ``holdout_with_test``: then the rest has its own test split, which the held-out rows join)."""
    fractions = p.get("fractions_" + task) or p["fractions"]
    held, held_split = _held_out(task, p)
    if task == "covid" and p.get("holdout_with_test"):
        return dict(fractions)
    return splits.without_split(fractions, held_split) if held and held_split in fractions else dict(fractions)


def check_tables(tables: dict[str, pd.DataFrame], p: dict, m: pd.DataFrame,
                 expectations: str) -> list[validation.SuiteResult]:
    """The splits suite on every task's table (held-out rows left out: they are checked only for patient
    disjointness), its results named ``<task>/<suite>``."""
    results = []
    for name, table in tables.items():
        held, held_split = _held_out(name, p, m)
        checked_rows = table[table["split"] != held_split] if held else table
        if held and name == "covid" and p.get("holdout_with_test"):  # the rest's own test split is checked too
            checked_rows = table[~_held_rows(name, p, m, table)]
        checked = validation.validate_splits(checked_rows, expectations, fractions=validated_fractions(name, p),
                                             tolerance=float(p["tolerance"]), classes=task_classes(name, p, m))
        results += [dataclasses.replace(r, name=f"{name}/{r.name}") for r in checked]
    return results


def check_validated(path: str | Path = VALIDATED) -> None:
    """A :class:`ManifestNotValidated` naming ``path`` unless the validate stage's report there says no critical
    expectation failed: a stage run on its own (``dvc repro -s split``, ``python -m pipelines.split``) after a failed
    validate would split a manifest that failed its checks. A non-critical failure (a warning) does not stop it, as it
    does not stop the validate stage."""
    path = Path(path)
    rerun = "run the validate stage (dvc repro validate, or python -m pipelines.validate) before splitting"
    if not path.is_file():
        raise ManifestNotValidated(f"{path}: not found: the manifest {MANIFEST} has not been validated; {rerun}")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestNotValidated(f"{path}: not a readable validation report ({err}); {rerun}") from err
    failed = report.get("n_critical_failed") if isinstance(report, dict) else None
    if not isinstance(failed, int) or isinstance(failed, bool) or not isinstance(report.get("suites"), dict):
        raise ManifestNotValidated(f"{path}: not a validation report (no n_critical_failed count or suites); {rerun}")
    if failed:
        names = sorted(f"{suite}: {e.get('type')}({e.get('column') or 'table'})"
                       for suite, result in report["suites"].items() if isinstance(result, dict)
                       for e in result.get("expectations", []) if e.get("critical") and e.get("success") is False)
        raise ManifestNotValidated(f"{path}: the manifest {MANIFEST} failed {failed} critical expectation(s) "
                                   f"({'; '.join(names)}): fix the data, then rerun the validate stage before "
                                   "splitting")


def run(p: dict, expectations: str) -> dict:
    log = _common.setup_logging()
    check_validated()
    m = manifest.read_csv(MANIFEST)
    tables, dropped = task_tables(m, p)

    results = check_tables(tables, p, m, expectations)
    held_rules = {name: _held_out(name, p, m)[0] for name in tables}
    summary = {
        name: {
            split: {lab: int(n) for lab, n in t[t["split"] == split]["label"].value_counts().sort_index().items()}
            for split in sorted(t["split"].unique())
        }
        for name, t in tables.items()
    }
    summary["experiment"] = p["experiment"]
    summary["curated_out"] = len(dropped)
    if p["holdout"] or p["segmentation_external"]:  # absent by default: the demo summary is unchanged
        summary["held_out"] = {"holdout": p["holdout"], "segmentation_external": list(p["segmentation_external"]),
                               "segmentation": held_rules["segmentation"], "projection": held_rules["projection"]}
    _common.write_csv(CURATED, dropped[["image_id", "patient_id", "label"]])
    _common.write_json(SUMMARY, summary)
    _common.write_json(CHECKS, validation.results_to_json(results))
    page = validation.render_data_docs(results)
    _common.write_with(DATA_DOCS, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    log.info("experiment %s: %s", p["experiment"], summary["covid"])
    validation.raise_for_critical(results)  # before the tables: a stage run directly never trains on failing ones
    with _common.atomic_dir(_common.SPLITS_DIR) as out:  # the three tables replace the old ones together, or none
        for name, table in tables.items():
            _common.write_csv(out / Path(_common.split_table(name)).name, table)
    return summary


if __name__ == "__main__":
    run(_common.params("split"), _common.params("validate.expectations"))
    _common.finish()
