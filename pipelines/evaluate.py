"""Stage `evaluate`: every classifier on val and test, its calibrated (served) score at 0.5 and at its operating
threshold, what serving answers (refused before the classifier or as out of distribution, called COVID-19, called
negative) for each split's images, and what the test split's site would gain from a threshold chosen on a few of its
own labelled films.

The threshold metrics (AUC, sensitivity and specificity, their CIs, calibration) are of the films the classifier scored
(``predictions.csv``); what serving answers is of every film of the split, those serving refuses before the classifier
(``refused.csv``: a lateral view, a lung mask that fails the rules) counted as refused with their reason. ``films``
says how many each covers. Serving's other refusals before the models are not applied to the splits, so ``served``
counts none of them: :func:`covidcxr.serving.check_plausible` (long side over short above ``register.max_aspect``; a
DICOM's modality not a radiograph's, its body part not the chest, or FOR PROCESSING) and
:func:`covidcxr.serving.check_intended_use` (a DICOM's age under ``register.min_age``). None refuses a film of the
corpora this project runs: the demo's 305 films are chest CR and DX DICOMs, square, FOR PRESENTATION or unstated, aged
20 to 89; the real corpus's 1,886 are PNG and JPEG files (no DICOM header to refuse by), long sides at most 2.24
times the short. A corpus of DICOMs of children, of other modalities or body parts, or of films beyond
``max_aspect`` would be served fewer films than ``served`` counts.

Metrics with patient-level bootstrap 95% CIs, calibration, ROC/PR/reliability data (DVC plots and MLflow figures),
and a comparison table laid out like the paper's Tables 6/10/14: the network's own output at 0.5, as the paper
thresholds it (not the calibrated score).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr import folders, metrics, sites, tracking
from pipelines import _common, _tracking

OUT = _common.EVALUATE_DIR


def evaluate_model(pred: pd.DataFrame, rule: dict, p: dict, detector=None,
                   before: pd.DataFrame | None = None, folder: Path | None = None) -> dict:
    """Per split (val, test): metrics of the calibrated score (``score``, as served) at 0.5 (``at_0.5``) and at the
    operating threshold (``rule``: the choice saved with the model), with CIs and calibration; where the predictions
    hold it, of the network's own output (``raw_score``, before the calibration) at 0.5 (``network_at_0.5``: what the
    paper's tables threshold); ``served``, what serving answers for every film of the split: the scored ones
    (``detector``: the folder's OOD detector, whose refusals serving makes; None: a folder without one, or served with
    ``ood_action: flag``, which refuses none of them as out of distribution) and ``before``, the films refused before
    the classifier (rows with ``split``, ``label`` and serving's ``reason``; None: none), with ``refused_by_reason``;
    ``films``: how many films the split holds, how many were scored (what the threshold metrics cover) and how many
    were refused before scoring, by reason; and for the test split, ``site_calibration``: what a site gains by choosing
    its own threshold with the model's rule on a few of its labelled films (:func:`covidcxr.sites.local_calibration`, on
    the films serving answers: a film refused before scoring has no score to choose with, nor is it answered), and
    ``site_admission``: the same when the site also admits its own films past the OOD check (``covidcxr
    calibrate-site --admit``, which admits no film refused before scoring; with a detector only). ``folder``: the
    classifier's folder the frames were read from, named in the errors."""
    threshold = float(rule["threshold"])
    before = pd.DataFrame(columns=["split", "label", "reason"]) if before is None else before
    unscored = sorted(set(before["split"]) - set(pred["split"]) - {"train"})
    if unscored:  # every film of such a split was refused before scoring: no threshold metric, nothing to compare
        where = (f"{folder / _common.REFUSED} and {folder / _common.PREDICTIONS}" if folder is not None
                 else f"{_common.REFUSED} and {_common.PREDICTIONS}")
        raise ValueError(f"{where}: split(s) {unscored} hold films refused before scoring and none scored (no "
                         "threshold metric to measure there)")
    result: dict = {}
    for split, part in pred.groupby("split"):
        if split == "train":
            continue
        y = (part["label"] == "covid").to_numpy(int)
        s = part["score"].to_numpy(float)
        refused = (detector.is_out(part["ood_score"].to_numpy(float)) if detector is not None
                   else np.zeros(len(part), dtype=bool))
        early = before[before["split"] == split]
        reasons = np.r_[np.where(refused, "out_of_distribution", ""), early["reason"].to_numpy(dtype=str)]
        result[split] = {
            "films": {"n": len(part) + len(early), "scored": len(part),
                      "refused_before_scoring": {str(k): int(v) for k, v in
                                                 early["reason"].value_counts().sort_index().items()}},
            "served": metrics.served_outcomes(np.r_[y, (early["label"] == "covid").to_numpy(int)],
                                              np.r_[s, np.full(len(early), np.nan)], reasons != "",
                                              threshold=threshold, reasons=reasons),
            "at_0.5": metrics.classification_metrics(y, s, threshold=0.5),
            "at_operating": metrics.classification_metrics(y, s, threshold=threshold),
            "ci_at_operating": metrics.confidence_intervals(
                y, s, part["patient_id"].to_numpy(), n_boot=int(p["n_boot"]), seed=int(p["seed"]), threshold=threshold
            ),
            "ece": metrics.expected_calibration_error(y, s, n_bins=int(p["calibration_bins"])),
        }
        if split == "test":  # a held-out site's test split: what its own threshold would give it
            site = {"n_per_class": int(p["site_calibration"]["n_per_class"]),
                    "draws": int(p["site_calibration"]["draws"]), "seed": int(p["seed"])}
            patients = part["patient_id"].astype(str).to_numpy()
            result[split]["site_calibration"] = sites.local_calibration(y[~refused], s[~refused], rule,
                                                                        patients=patients[~refused], **site)
            if detector is not None:  # ... and its own threshold on its own films, admitted however far they lie
                result[split]["site_admission"] = sites.local_calibration(
                    y, s, rule, ood=(part["ood_score"].to_numpy(float), detector.threshold), patients=patients,
                    **site)
        if "raw_score" in part:  # before the calibration fitted on validation: what it changed, and the paper's view
            raw = part["raw_score"].to_numpy(float)
            result[split]["network_at_0.5"] = metrics.classification_metrics(y, raw, threshold=0.5)
            result[split]["ece_uncalibrated"] = metrics.expected_calibration_error(
                y, raw, n_bins=int(p["calibration_bins"]))
    return result


def read_refused(path: Path) -> pd.DataFrame:
    """A classifier's films refused before scoring (``refused.csv``). A folder without it (written before
    train_classifier wrote it) is a FileNotFoundError, a file without its columns or a row without a reason a
    ValueError, each naming the file: the served figures would leave those films out."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the films serving refuses before the classifier, which the "
                                "served figures count); rerun train_classifier")
    frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    missing = sorted({"split", "label", "reason"} - set(frame.columns))
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; rerun train_classifier")
    if (frame["reason"] == "").any():
        raise ValueError(f"{path}: {int((frame['reason'] == '').sum())} film(s) without a reason")
    return frame


def curves(pred: pd.DataFrame, n_bins: int) -> dict[str, list[dict]]:
    """Test-split curves as DVC plot rows."""
    test = pred[pred["split"] == "test"]
    y, s = (test["label"] == "covid").to_numpy(int), test["score"].to_numpy(float)
    roc, pr = metrics.roc_curve_points(y, s), metrics.pr_curve_points(y, s)
    rel = metrics.reliability_diagram(y, s, n_bins=n_bins)
    return {
        "roc": [{"fpr": a, "tpr": b} for a, b in zip(roc["fpr"], roc["tpr"])],
        "pr": [{"recall": a, "precision": b} for a, b in zip(pr["recall"], pr["precision"])],
        "reliability": [{"mean_predicted": a, "observed_frequency": b, "count": c}
                        for a, b, c in zip(rel["mean_predicted"], rel["observed_frequency"], rel["counts"])],
    }


def figure(name: str, data: dict[str, list[dict]]):
    """ROC, PR and reliability panels for MLflow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    specs = [("roc", "fpr", "tpr", "ROC"), ("pr", "recall", "precision", "Precision-recall"),
             ("reliability", "mean_predicted", "observed_frequency", "Reliability")]
    for ax, (key, xk, yk, title) in zip(axes, specs):
        rows = [r for r in data[key]
                if r[xk] is not None and r[yk] is not None and np.isfinite(r[xk]) and np.isfinite(r[yk])]
        ax.plot([r[xk] for r in rows], [r[yk] for r in rows], marker="." if key == "reliability" else None)
        if key != "pr":
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(title=f"{title}: {name}", xlabel=xk, ylabel=yk, xlim=(0, 1), ylim=(0, 1.02))
    fig.tight_layout()
    return fig


def run(p: dict, classifiers: dict, experiment: str = "demo", ood_action: str = "refuse") -> dict:
    """Every classifier's metrics; ``served`` follows the registered model's ``ood_action`` (register's param): under
    ``flag`` serving answers every image it scores, so none counts as refused out of distribution (those refused before
    the classifier still are)."""
    import mlflow

    log = _common.setup_logging()
    _tracking.setup_tracking()
    rows, everything = [], {}
    for variant in classifiers["variants"]:
        for backbone in classifiers["backbones"]:
            name = f"{variant}_{backbone}"
            d = Path(_common.model_dir(variant, backbone))
            pred = pd.read_csv(d / _common.PREDICTIONS)
            if "raw_score" not in pred:
                raise ValueError(f"{d / _common.PREDICTIONS}: no raw_score column (the network's own output, which "
                                 "the paper's table thresholds at 0.5); rerun train_classifier")
            before = read_refused(d / _common.REFUSED)
            threshold = folders.operating_threshold(d)
            run_id = folders.folder_info(d)["run_id"]
            result = evaluate_model(pred, folders.folder_threshold(d), p,
                                    folders.ood_detector(d) if ood_action == "refuse" else None, before, d)
            # run_id: which weights these figures measured; register and model_card refuse them for other weights
            result["operating_threshold"], result["ood_action"], result["run_id"] = threshold, ood_action, run_id
            data = curves(pred, int(p["calibration_bins"]))
            for key, value in data.items():
                _common.write_json(OUT / name / f"{key}.json", value)
            written = _common.write_json(OUT / name / "metrics.json", result)
            everything[name] = result
            for split in ("val", "test"):  # the paper thresholds the network's output, not a calibrated score
                rows.append({"variant": variant, "backbone": backbone, "split": split,
                             **result[split]["network_at_0.5"]})
            with tracking.run(_common.mlflow_experiment(experiment), name, run_id=run_id):
                tracking.log_finite_metrics({s: result[s] for s in ("val", "test")}, prefix="eval.")
                fig = figure(name, data)
                mlflow.log_figure(fig, "evaluation/curves.png")
                mlflow.log_artifact(str(written), "evaluation")  # the file as written: NaN as null, strict JSON
                import matplotlib.pyplot as plt

                plt.close(fig)
    table = metrics.paper_table(rows)
    _common.write_with(OUT / "comparison.md", lambda tmp: tmp.write_text(
        "# COVID-19 label metrics of the network's output at threshold 0.5, as the paper (layout of its Tables "
        "6/10/14; before the calibration, which serving applies)\n\n"
        + table.round(4).to_markdown() + "\n", encoding="utf-8"))
    _common.write_csv(OUT / "comparison.csv", table.round(6).reset_index())
    summary = {name: {"test_auc": r["test"]["at_0.5"]["roc_auc"], "val_auc": r["val"]["at_0.5"]["roc_auc"],
                      "test_ece": r["test"]["ece"], "test_ece_uncalibrated": r["test"].get("ece_uncalibrated")}
               for name, r in everything.items()}
    _common.write_json(OUT / "summary.json", summary)
    log.info("evaluation: %s", summary)
    return everything


if __name__ == "__main__":
    run(_common.params("evaluate"), {"variants": _common.params("train_classifier.variants"),
                                  "backbones": _common.params("train_classifier.backbones")},
        _common.params("split.experiment"), _common.params("register.ood_action"))
    _common.finish()
