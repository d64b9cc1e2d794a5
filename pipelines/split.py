"""Stage `split`: patient-level, label-stratified splits for each task, checked by the splits expectation suite.

Tasks: `covid` (the experiment chosen in params: positives vs negatives, optionally curated as the paper's experiment 2),
`projection` (frontal vs lateral, every image whose projection is known) and `segmentation` (images with lung masks).
"""

from __future__ import annotations

import dataclasses

import pandas as pd

from covidcxr import manifest, splits, validation
from pipelines import _common

MANIFEST = "artifacts/manifest.csv"
OUT_DIR = "artifacts/splits"
CURATED = "reports/split/curated_out.csv"
SUMMARY = "reports/split/summary.json"
CHECKS = "reports/split/validation.json"
DOCS = "reports/split/data_docs"
COLUMNS = ["image_id", "patient_id", "label", "split"]


def task_tables(m: pd.DataFrame, p: dict) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """The split table of every task, and the images curation removed."""
    experiment = p["experiments"][p["experiment"]]
    covid = splits.select_experiment(m, experiment["positives"], experiment["negatives"])
    dropped = covid.iloc[0:0]
    if experiment.get("curate", False):
        covid, dropped = splits.drop_negatives_among_positives(covid)

    projection = m[m["projection"].isin(["frontal", "lateral"])].assign(label=lambda d: d["projection"])
    segmentation = m[m["mask_path"].notna()].assign(label=lambda d: d["source"])
    tasks = {"covid": covid, "projection": projection, "segmentation": segmentation}
    seed = int(p["seed"])
    out = {}
    for name, frame in tasks.items():
        fractions = p.get("fractions_" + name, p["fractions"])
        frame = frame.assign(split=splits.split_patients(frame, fractions=fractions, seed=seed))
        out[name] = frame[COLUMNS].sort_values("image_id").reset_index(drop=True)
    return out, dropped


def run(p: dict, expectations: str) -> dict:
    log = _common.setup_logging()
    m = manifest.read_csv(MANIFEST)
    tables, dropped = task_tables(m, p)

    results = []
    for name, table in tables.items():
        fractions = p.get("fractions_" + name, p["fractions"])
        classes = sorted(table["label"].unique()) if name != "covid" else ["covid", "negative"]
        checked = validation.validate_splits(table, expectations, fractions=fractions, tolerance=float(p["tolerance"]),
                                             classes=classes)
        results += [dataclasses.replace(r, name=f"{name}/{r.name}") for r in checked]
    summary = {
        name: {
            split: {lab: int(n) for lab, n in t[t["split"] == split]["label"].value_counts().sort_index().items()}
            for split in sorted(t["split"].unique())
        }
        for name, t in tables.items()
    }
    summary["experiment"] = p["experiment"]
    summary["curated_out"] = len(dropped)
    for name, table in tables.items():
        _common.write_csv(f"{OUT_DIR}/{name}.csv", table)
    _common.write_csv(CURATED, dropped[["image_id", "patient_id", "label"]])
    _common.write_json(SUMMARY, summary)
    _common.write_json(CHECKS, validation.results_to_json(results))
    validation.write_data_docs(results, DOCS)
    log.info("experiment %s: %s", p["experiment"], summary["covid"])
    validation.raise_for_critical(results)
    return summary


if __name__ == "__main__":
    run(_common.params("split"), _common.params("validate")["expectations"])
