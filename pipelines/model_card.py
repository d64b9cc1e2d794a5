"""Stage `model_card`: a self-contained HTML model card for the model `register` just registered.

Reads the reports (register, with the candidates and the held-out results of the model's settings; evaluate, explain,
audit), the split tables and the manifest's source column (aggregate counts only), and the Grad-CAM grids, which are
test radiographs with whatever text is burned into them (`model_card.images: false` leaves them out, for data that is
not public), renders with covidcxr.modelcard, writes reports/model_card/<name>-v<version>.html and index.html, and
logs the card to the MLflow run that produced the registered version, tagging the version with it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covidcxr import modelcard
from covidcxr.modelcard import ModelCardError
from pipelines import _common, _tracking

OUT = Path("reports/model_card")
REGISTERED = _common.REGISTERED
AUDIT = _common.AUDIT_REPORT
SPLITS = Path(_common.SPLITS_DIR)
MANIFEST = Path(_common.MANIFEST)
#: Model-version tag that points to the card's artifact.
TAG = "model_card"


def read_json(path: str | Path, made_by: str) -> object:
    """A report as JSON (``_common.read_report``); a malformed one is a :class:`ModelCardError`."""
    return _common.read_report(path, made_by, ModelCardError)


def model_facts(registered: dict, evaluation: dict, run_id: str) -> dict:
    """What the registered model is: identity, classifier, working size and thresholds, as `register` bundled them."""
    for key in ("model_name", "version", "classifier", "serving"):
        if key not in registered:
            raise ModelCardError(f"{REGISTERED} has no '{key}'")
    classifier = str(registered["classifier"])
    variant, _, backbone = classifier.partition("_")
    serving = registered["serving"]
    facts = {
        "model_name": registered["model_name"], "version": registered["version"], "alias": registered.get("alias"),
        "classifier": classifier, "variant": variant, "backbone": backbone,
        "working_size": f"{int(serving['size'])} px",
        "operating_threshold": evaluation.get("operating_threshold"),
        # the filter folder's threshold (registered since it stopped being copied into the serving configuration)
        "frontal_threshold": registered.get("frontal_threshold", serving.get("frontal_threshold")),
        "mask_threshold": registered.get("mask_threshold"),
        "lung_area_bounds": f"{serving['min_area']} – {serving['max_area']}",
        # (a key with "patient" in it is hidden as a possible identifier)
        "intended_population": ("any age" if serving.get("min_age") is None else
                     f"aged {float(serving['min_age']):g} and over: a DICOM giving a younger age is refused "
                     "(outside_intended_use); a file without an age is scored"),
        "experiment": registered.get("experiment"), "mlflow_run_id": run_id,
        # what the figures were computed on (modelcard.DATA_VERSION), and the code; data.dvc's hash of data/ besides
        "git_commit": registered.get("git_commit"), "data_version": registered.get("data_version"),
        "data_dvc": registered.get("data_dvc"),
    }
    if registered.get("selected_by"):
        value = registered.get("candidate_value")
        shown = f"{float(value):.4f}" if value is not None else "n/a"
        facts["selected_by"] = f"{registered['selected_by'].replace('_', ' ', 1)} = {shown}"
    return facts


def split_tables() -> dict[str, pd.DataFrame]:
    """Every split table (artifacts/splits/<task>.csv) with the manifest's source per image."""
    if not MANIFEST.is_file():
        raise FileNotFoundError(f"{MANIFEST} does not exist: run the `ingest` stage first")
    sources = pd.read_csv(MANIFEST, usecols=["image_id", "source"], keep_default_na=False)
    tables = {}
    for path in sorted(SPLITS.glob("*.csv")):
        table = pd.read_csv(path, keep_default_na=False, na_values=[""])
        missing = {"image_id", "patient_id", "split"} - set(table.columns)
        if missing:
            raise ModelCardError(f"{path}: lacks columns {sorted(missing)}")
        tables[path.stem] = table.merge(sources, on="image_id", how="left").fillna({"source": "unknown"})
    if "covid" not in tables:
        raise FileNotFoundError(f"{SPLITS / 'covid.csv'} does not exist: run the `split` stage first")
    return tables


def classifier_summary() -> dict[str, dict]:
    """Every trained classifier's headline figures: evaluate's summary and the Grad-CAM lung mass share."""
    evaluated = read_json("reports/evaluate/summary.json", "evaluate")
    explain = Path("reports/explain/metrics.json")
    explained = read_json(explain, "explain") if explain.is_file() else {}
    return {name: {**figures, **({"lung_mass_share": explained[name]["test"].get("lung_mass_share")}
                                 if name in explained else {})}
            for name, figures in evaluated.items()}


def gradcam_images(classifier: str, all_variants: bool) -> dict[str, bytes]:
    """Grad-CAM grids: the registered classifier's, and with ``all_variants`` the other variants of its backbone."""
    variant, _, backbone = classifier.partition("_")
    names = [classifier] + (sorted(p.stem for p in Path("reports/explain/gradcam").glob(f"*_{backbone}.png")
                                   if p.stem != classifier) if all_variants else [])
    images = {}
    for name in names:
        path = Path(f"reports/explain/gradcam/{name}.png")
        if path.is_file():
            images[f"{name} (registered)" if name == classifier else name] = path.read_bytes()
    return images


def registered_evaluation(registered: dict) -> dict:
    """Evaluate's report of the registered classifier, when it measured the weights that were registered
    (:func:`pipelines._common.evaluation_of_weights`: its ``run_id`` is the classifier run ``register`` bundled,
    ``component_runs``). A :class:`ModelCardError` naming both run ids otherwise (the classifier was retrained and
    evaluate rerun after registering), or when either file does not record its run (written before they did: which
    weights the figures are of cannot be checked)."""
    return _common.evaluation_of_weights(
        str(registered["classifier"]), (registered.get("component_runs") or {}).get("classifier"),
        holder=f"{registered['model_name']} v{registered['version']} bundles",
        recorded_in=f"{REGISTERED} (component_runs)", rerun="evaluate and register (`dvc repro register`)",
        error=ModelCardError)


def collect(p: dict, registered: dict, run_id: str, n_boot: int | None = None) -> modelcard.CardData:
    """The card's content from the reports on disk (``n_boot``: evaluate's bootstrap resamples)."""
    classifier = str(registered["classifier"])
    evaluation = registered_evaluation(registered)
    curves = {name: read_json(f"reports/evaluate/{classifier}/{name}.json", "evaluate")
              for name in modelcard.CURVES if Path(f"reports/evaluate/{classifier}/{name}.json").is_file()}
    tables = split_tables()
    data = modelcard.data_summary(tables["covid"])
    if Path("reports/ingest/summary.json").is_file():
        ingest = read_json("reports/ingest/summary.json", "ingest")
        data["extra"] = [f"Ingest: {ingest.get('accepted')} images accepted of {ingest.get('listed')} listed, "
                         f"{ingest.get('rejected')} rejected (with their reason), {ingest.get('duplicates')} "
                         f"duplicates removed, {ingest.get('patients')} patients."]
    audit = read_json(AUDIT, "audit") if AUDIT.is_file() else None
    return modelcard.CardData(
        model=model_facts(registered, evaluation, run_id), data=data,
        split_check={task: modelcard.split_check(t) for task, t in tables.items()},
        metrics={k: evaluation[k] for k in ("test", "val") if k in evaluation}, n_boot=n_boot, curves=curves,
        gradcam=gradcam_images(classifier, bool(p["gradcam_all_variants"])) if p["images"] else {},
        images=bool(p["images"]), audit=audit,
        heldout=registered.get("heldout"), heldout_untouched=bool(p["heldout_untouched"]),
        selection=registered.get("candidates") or (), selected_by=registered.get("selected_by"),
        classifiers=classifier_summary(),
        synthetic="demo" in data["sources"],
    )


def run(p: dict, n_boot: int | None = None) -> dict:
    """Render, write and log the card; ``n_boot``: the resamples of evaluate's bootstrap CIs (``evaluate.n_boot``),
    against which the card judges how many of them left a metric undefined."""
    import mlflow
    from mlflow.exceptions import MlflowException

    log = _common.setup_logging()
    _tracking.setup_tracking()
    registered = read_json(REGISTERED, "register")
    if not isinstance(registered, dict) or "model_name" not in registered or "version" not in registered:
        raise ModelCardError(f"{REGISTERED}: needs model_name and version")
    name, version = str(registered["model_name"]), str(registered["version"])
    client = mlflow.MlflowClient()
    try:
        run_id = client.get_model_version(name, version).run_id
    except MlflowException as exc:
        raise ModelCardError(f"{REGISTERED} names {name} v{version}, which the registry at "
                             f"{mlflow.get_tracking_uri()} does not hold") from exc

    page = modelcard.render(collect(p, registered, run_id, n_boot))
    card = OUT / f"{name}-v{version}.html"
    for path in (card, OUT / "index.html"):
        _common.write_with(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    client.log_artifact(run_id, str(card), "model_card")
    uri = f"runs:/{run_id}/model_card/{card.name}"
    client.set_model_version_tag(name, version, TAG, uri)
    log.info("model card for %s v%s: %s (%d bytes), logged as %s", name, version, card, len(page.encode()), uri)
    return {"path": str(card), "artifact_uri": uri, "run_id": run_id, "bytes": len(page.encode())}


if __name__ == "__main__":
    run(_common.params("model_card"), n_boot=int(_common.params("evaluate.n_boot")))
    _common.finish()
