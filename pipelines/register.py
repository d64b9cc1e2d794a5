"""Stage `register`: the whole pipeline (projection filter, U-Net, one classifier) as one MLflow pyfunc, registered.

The classifier is chosen by :func:`covidcxr.selection.select` among those params allow (`variant`/`backbone`, `best` for
any): candidates whose own shortcut audit failed are not eligible while another is; then the best by the held-out figure
of the same settings when `register.heldout` holds one for every eligible candidate (the experiment runner fills it from
its held-out-source runs; candidates within the seeds' noise of the best are tied, and the mean over the held-out runs
chooses among them), else by the validation `metric`. The new version takes the alias `champion` when its figure
is at least the current champion's and its audit (graded on validation) did not fail (or
`register.allow_failed_audit: true`); otherwise `challenger`. A champion's figure of other data (its `data_version`:
the SHA-256 of the manifest and the covid split table, so another corpus, download, selection or split seed is other
data) or of another measure (its `selection_figure`) is no yardstick: the new version is then judged as if the champion
had none, and the reason says which. Every candidate with its figures and why it was or was not chosen, the decision
and its reason are printed, logged to MLflow and written to reports/register/registered.json. The validation figures
are evaluate's, of the weights in each classifier's folder only (:func:`evaluated`: evaluate records the folder's run),
and the projection filter and U-Net bundled are those whose calls and masks the classifiers learnt from, under the mask
rules served (:func:`components_applied`: filter_frontal and segment record what they applied).

The drift reference (what the served model logs for the validation split, scored through the bundled pipeline) is
bundled with the model and logged to the register run as ``monitoring/reference.json``, for `covidcxr monitor`; each
film is sent as the cache and evaluate read it (:func:`as_sent`). The
model's input example is a synthetic phantom: no corpus image travels with the model.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np

from covidcxr import (
    audit,
    dburl,
    folders,
    manifest,
    monitoring,
    phantoms,
    predlog,
    preprocess,
    selection,
    serving,
    sites,
    tracking,
)
from pipelines import _common, _tracking

OUT = _common.REGISTERED
#: Distributions the served model needs, at their installed (requirements.lock) versions.
SERVING_PACKAGES = ("tensorflow-cpu", "keras", "mlflow", "cloudpickle", "numpy", "pandas", "scipy", "pillow",
                    "pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "scikit-learn", "sqlalchemy")
REFERENCE_ARTIFACT = "reference"
log = logging.getLogger("covidcxr.pipelines")


#: The paper's control: variant e sees everything but the lungs. It measures the shortcut and is never a diagnostic
#: candidate under ``variant: best`` (all-sources once chose it when every variant's held-out figure was near zero);
#: ``variant: e`` still registers it on purpose.
CONTROL_VARIANTS = ("e",)


def candidates(p: dict, classifiers: dict, audit_report: dict) -> list[selection.Candidate]:
    """The trained classifiers params allow, with their validation metrics (evaluate) and audit verdicts."""
    chosen = [(v, b) for v in classifiers["variants"] for b in classifiers["backbones"]
              if (p["variant"] == v or (p["variant"] == "best" and v not in CONTROL_VARIANTS))
              and p["backbone"] in ("best", b)]
    if not chosen:
        raise _common.ParamsError(
            f"register.variant={p['variant']!r} / backbone={p['backbone']!r} match no trained classifier "
            f"(train_classifier.variants {classifiers['variants']}, backbones {classifiers['backbones']}; best "
            f"never takes the lungs-removed control {', '.join(CONTROL_VARIANTS)})")
    figures = p.get("heldout") or {}
    heldout = figures.get("by_classifier") or {}
    out = []
    for variant, backbone in chosen:
        name = f"{variant}_{backbone}"
        evaluation = evaluated(variant, backbone, p["ood_action"])
        status, failed = audit.model_verdict(audit_report, name)
        out.append(selection.Candidate(variant=variant, backbone=backbone, validation=evaluation["val"]["at_operating"],
                                       audit_status=status,
                                       audit_failed=tuple(f"{c['name']}:{c['subject']}" for c in failed),
                                       heldout=heldout.get(name),
                                       heldout_se=(figures.get("standard_error") or {}).get(name),
                                       heldout_mean=(figures.get("mean") or {}).get(name)))
    return out


def evaluated(variant: str, backbone: str, ood_action: str) -> dict:
    """Evaluate's report of a classifier (``metrics.json``), when it measured the weights its model folder holds now
    under the ``ood_action`` served (:func:`pipelines._common.evaluation_of_weights`: its ``run_id`` is the folder's,
    its ``ood_action`` register's). A ValueError naming both run ids otherwise (the classifier was retrained after
    evaluate ran, e.g. ``dvc repro -f -s register`` or a hand-run register after retraining one classifier: the new
    weights would be registered with the old weights' figures), or both actions, or when the report or the folder
    records no run id (written before it was recorded: which weights the figures are of cannot be checked)."""
    folder = _common.model_dir(variant, backbone)
    return _common.evaluation_of_weights(
        f"{variant}_{backbone}", folders.folder_info(folder).get("run_id"), holder=f"{folder} holds",
        recorded_in=f"{folder}/{folders.RUN_FILE} (run_id)",
        rules={"ood_action": (ood_action, "params.yaml register.ood_action")},
        rerun="evaluate (`dvc repro evaluate`) before registering")


#: What the stages before the classifiers applied, and the bundled model folder whose run each records.
COMPONENT_REPORTS = {"projection": (_common.FRONTAL_REPORT, "filter_frontal", "projection_run_id", "projection filter",
                                    "frontal calls"),
                     "unet": (_common.SEGMENT_REPORT, "segment", "unet_run_id", "U-Net", "masks")}


def components_applied(folders_of: dict[str, str], runs: dict[str, object], segment: dict) -> None:
    """Refuse to bundle a projection filter or U-Net other than the one whose frontal calls and lung masks the
    classifiers were trained and evaluated on, or serve other mask rules (``segment``'s min_area, max_area) than
    those masks were made by: filter_frontal's and segment's reports record the run and rules they applied
    (:func:`pipelines._common.made_with`). ``dvc repro -f -s train_unet`` then ``dvc repro -s register`` served a new
    U-Net whose masks no classifier had seen, and nothing said so. ``runs``: each part's folder run id."""
    rules = {"unet": {name: (float(segment[name]), f"params.yaml segment.{name}") for name in ("min_area", "max_area")}}
    for part, (report, stage, key, model, product) in COMPONENT_REPORTS.items():
        _common.made_with(report, stage, runs[part], key=key, model=model, verb="applied", product=product,
                          holder=f"{folders_of[part]} holds", recorded_in=f"{folders_of[part]}/{folders.RUN_FILE} "
                          "(run_id)", rules=rules.get(part),
                          rerun=f"{stage} and every stage after it (`dvc repro register`) before registering")


def read_audit(path: Path = _common.AUDIT_REPORT) -> dict:
    """The audit report; a missing or malformed one is an error naming it."""
    report = _common.read_report(path, "audit")
    if not isinstance(report, dict) or not isinstance(report.get("checks"), list):
        raise ValueError(f"{path}: not an audit report (no 'checks' list)")
    return report


def stage_bundle(tmp: Path, variant: str, backbone: str, config: serving.Config, metadata: dict) -> dict[str, str]:
    """Copy what serving needs into ``tmp``: the three model folders (model files only), config and metadata."""
    sources = {"projection": _common.PROJECTION_MODEL, "unet": _common.UNET_MODEL,
               "classifier": _common.model_dir(variant, backbone)}
    artifacts = {}
    for name, src in sources.items():
        dest = tmp / name
        dest.mkdir()
        for file in folders.folder_files(src):
            shutil.copy2(Path(src) / file, dest / file)
        artifacts[name] = str(dest)
    config.save(tmp / "serving.json")
    (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    artifacts[serving.CONFIG_ARTIFACT] = str(tmp / "serving.json")
    artifacts[serving.METADATA_ARTIFACT] = str(tmp / "metadata.json")
    return artifacts


def stage_code(tmp: Path) -> str:
    """The covidcxr package, without caches, bundled with the model (the code the model was registered with)."""
    dest = tmp / "code" / "covidcxr"
    shutil.copytree(_common.PROJECT / "src" / "covidcxr", dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(dest)


#: The seed of the input example's phantom: every version carries the same example.
EXAMPLE_SEED = 0
#: The smallest phantom :func:`covidcxr.phantoms.chest_phantom` draws; a smaller working size gets it resized.
PHANTOM_MIN_SIZE = 64


def input_example(size: int) -> dict:
    """A request that works and is of no patient: one synthetic frontal chest (a fixed :mod:`covidcxr.phantoms`
    phantom) at ``size``, the larger of the working sizes (at the smaller, one model would be shown an upsampled
    image that production never sends it), as a base64 PNG.

    Never a corpus image: the example travels with every version of the model (input_example.json,
    serving_input_example.json), whatever ``model_card.images`` says of the data being public.
    """
    image, _ = phantoms.chest_phantom(np.random.default_rng(EXAMPLE_SEED), max(int(size), PHANTOM_MIN_SIZE),
                                      projection="frontal", covid=False, site=phantoms.SiteStyle())
    pixels = np.round(255 * np.clip(preprocess.resize(image, int(size)), 0, 1)).astype(np.uint8)  # an 8-bit PNG
    return {serving.INPUT_COLUMN: [serving.png_base64(pixels)]}


def log_pyfunc(artifacts: dict[str, str], code: str, size: int):
    """Log the bundled pipeline as the active run's pyfunc model, with its signature, pins and the synthetic input
    example at working size ``size`` (MLflow scores the example to check it, as a server would read it)."""
    import mlflow

    return mlflow.pyfunc.log_model(
        name="covidcxr", python_model=serving.CovidCxrModel(), artifacts=artifacts, code_paths=[code],
        signature=serving.signature(), input_example=input_example(size),
        pip_requirements=tracking.pins(SERVING_PACKAGES),
    )


#: The largest value a lossless 16-bit PNG holds (it holds the integers 0 to this).
PNG16_MAX = 2**16 - 1


def as_sent(path: str, photometric: str | None = None, bits_stored: int | None = None) -> tuple[str | None, str]:
    """A validation film as a request carries it (base64), as serving's users are told to send it (README, "Reading
    images"), and how: ``"file"``, its own file, when serving reads those bytes as the cache reads the file with the
    manifest's ``photometric`` and ``bits_stored`` (the same pixels: every DICOM, most rasters); ``"reencoded"``, the
    pixels the cache reads (air dark) as a lossless 16-bit PNG (:func:`covidcxr.serving.png_base64`), when serving
    would read the file otherwise (a MONOCHROME1 PNG export, BIMCV's and PadChest's, which serving reads air bright)
    or not at all (a JSRT raw file: its bytes carry no suffix). ``(None, reason)`` for a film the cache's reading
    refuses (the reader's reason code) or whose pixels no 16-bit PNG holds exactly (``not_16bit``)."""
    from covidcxr import io as image_io

    data = Path(path).read_bytes()
    try:  # named by its path: the suffix marks a JSRT raw file, as for the cache
        cached, _ = image_io.read_image(data, name=path, photometric=photometric, bits_stored=bits_stored)
    except image_io.ImageReadError as err:
        return None, err.reason
    try:
        if np.array_equal(image_io.read_image(data)[0], cached):
            return base64.b64encode(data).decode("ascii"), "file"
    except image_io.ImageReadError:
        pass  # bytes alone are no image serving reads (a JSRT raw file): sent as the cache reads it
    if cached.min() < 0 or cached.max() > PNG16_MAX or not np.array_equal(cached, np.round(cached)):
        return None, "not_16bit"
    return serving.png_base64(cached.astype(np.uint16)), "reencoded"


def drift_reference(artifacts: dict[str, str], config: serving.Config) -> monitoring.Reference:
    """What the served model logs for the validation split: every validation image of the covid task, sent as
    production sends it (:func:`as_sent`: its own file, so a DICOM's view position decides its projection and each
    model reads the file at its own size; re-encoded air dark where serving would read the file otherwise than the
    cache and evaluate did), scored by the bundled pipeline into a memory log. ``meta`` counts the films sent
    re-encoded (``reencoded``) and, by reason, those that could not be sent (``not_scored``): none is dropped
    unsaid."""
    import pandas as pd

    rows = manifest.read_csv(_common.MANIFEST).set_index("image_id")
    table = pd.read_csv(_common.split_table("covid"), keep_default_na=False, na_values=[""])
    val = rows.loc[[i for i in table.loc[table["split"] == "val", "image_id"] if i in rows.index]]
    if val.empty:
        raise ValueError(f"{_common.split_table('covid')}: no validation image in {_common.MANIFEST} for the drift "
                         "reference")
    paths = [str(p) for p in val["path"]]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} validation images of the drift reference are gone, e.g. {missing[0]}")
    pipeline = serving.Pipeline.load(artifacts)
    pipeline.prediction_log = sink = predlog.MemoryLog()
    how: Counter[str] = Counter()
    not_scored: Counter[str] = Counter()
    batch: list[str] = []
    for path, photometric, bits_stored in zip(paths, *manifest.decode_hints(val), strict=True):
        image, sent = as_sent(path, photometric, bits_stored)
        if image is None:
            not_scored[sent] += 1
            continue
        how[sent] += 1
        batch.append(image)
        if len(batch) == config.limits.max_images:
            pipeline.score(batch)
            batch = []
    if batch:
        pipeline.score(batch)
    if not_scored:
        log.warning("drift reference: %d validation image(s) not scored, by reason %s", sum(not_scored.values()),
                    dict(sorted(not_scored.items())))
    detector = pipeline.classifier.ood
    meta = {"model_name": config.model_name, "model_version": config.model_version, "split": "val",
            "n": len(sink.records), "ood_threshold": detector.threshold if detector is not None else None,
            "ood_quantile": detector.quantile if detector is not None else None, "ood_action": config.ood_action,
            "reencoded": how["reencoded"], "not_scored": dict(sorted(not_scored.items()))}
    return monitoring.Reference(sink.frame(), meta)


def component_metrics() -> dict:
    """Validation figures of the projection filter and the U-Net, for the metadata."""
    out = {}
    for name in ("projection", "unet"):
        path = f"reports/train_{name}/metrics.json"
        if Path(path).is_file():
            out[name] = json.loads(Path(path).read_text()).get("val")
    return out


#: A registered-model tag: the highest version number this stage has been given. The registry numbers a new version
#: after every version it ever made, deleted ones included, and its search no longer returns deleted ones: without the
#: tag, deleting the newest version made every later registration mispredict its number and fail.
LAST_VERSION_TAG = "covidcxr.last_version"


def next_version(client, name: str) -> int:
    """The version number the registry will give the next version of ``name``."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return 1
    versions = client.search_model_versions(f"name='{name}'")
    last = str(model.tags.get(LAST_VERSION_TAG, ""))
    return max([int(v.version) for v in versions] + [int(last) if last.isdigit() else 0]) + 1


#: A model-version tag: the name of the figure that chose it (a held-out figure's name, or ``val_<metric>``), so that a
#: later registration compares its figure with the champion's only when both are the same measure.
FIGURE_TAG = "selection_figure"


def current_champion(client, name: str, by: str, *, data_version: str | None = None,
                     figure: str | None = None) -> tuple[int | None, float | None, str]:
    """(version, its selection figure ``by``, why that figure is not comparable or "") of the current champion, or
    (None, None, ""). A figure measured on other data (its ``data_version`` tag differs from ``data_version``) or
    another measure (its :data:`FIGURE_TAG` differs from ``figure``) is no yardstick: its value is then None, and the
    reason says which. Checked before the champion's tag ``by`` is looked up: a champion chosen by another measure
    has no tag of ours, and the reason is then the other measure, not a missing figure (which stays "": a champion
    registered before the tags existed)."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, selection.CHAMPION)
    except MlflowException:
        return None, None, ""
    theirs = {"data_version": version.tags.get("data_version"), FIGURE_TAG: version.tags.get(FIGURE_TAG)}
    for key, ours, what in (("data_version", data_version, "other data"), (FIGURE_TAG, figure, "another measure")):
        if ours is not None and theirs[key] not in (None, "") and theirs[key] != ours:
            return int(version.version), None, f"its figure is of {what}: {key} {theirs[key]}, not this {ours}"
    value = version.tags.get(by)
    if value in (None, ""):
        return int(version.version), None, ""
    return int(version.version), float(value), ""


def run(p: dict, classifiers: dict, experiment: str = "demo", *, size: int, segment: dict,
        projection_size: int | None = None) -> dict:
    import mlflow

    log = _common.setup_logging()
    _tracking.setup_tracking()
    client = mlflow.MlflowClient()
    name = p["model_name"]
    heldout = p.get("heldout")
    chosen = selection.select(candidates(p, classifiers, read_audit()), p["metric"],
                              heldout_name=heldout["figure"] if heldout else "held-out figure")
    best = chosen.chosen
    classifier = best.name
    allow_failed = bool(p["allow_failed_audit"])
    figure = heldout["figure"] if heldout and chosen.by == "heldout" else chosen.by
    tags = _tracking.repro_tags("register", experiment)
    champion_version, champion_value, not_comparable = current_champion(
        client, name, chosen.by, data_version=tags["data_version"], figure=figure)
    version = next_version(client, name)
    if p["prediction_log"] and dburl.has_password(p["prediction_log"]):
        raise _common.ParamsError("register.prediction_log holds a password: give it in PGPASSWORD (or ~/.pgpass), "
                                  "never in params")

    config = serving.Config(
        size=int(size), variant=best.variant,  # frontal_threshold: None, the filter folder's own (as filter_frontal)
        projection_size=None if projection_size in (None, size) else int(projection_size),
        min_area=float(segment["min_area"]), max_area=float(segment["max_area"]), max_aspect=float(p["max_aspect"]),
        model_version=str(version),
        limits=serving.Limits(max_images=int(p["max_images"]), max_image_bytes=int(p["max_image_bytes"]),
                              max_pixels=int(p["max_pixels"])),
        model_name=name, ood_action=p["ood_action"], prediction_log=p["prediction_log"] or None,
        min_age=None if p["min_age"] is None else float(p["min_age"]),
    )
    evaluation = evaluated(best.variant, best.backbone, p["ood_action"])
    parts = {"projection": _common.PROJECTION_MODEL, "unet": _common.UNET_MODEL,
             "classifier": _common.model_dir(best.variant, best.backbone)}
    runs = {part: folders.folder_info(folder).get("run_id") for part, folder in parts.items()}
    components_applied(parts, runs, segment)
    metadata = {
        "model_name": name, "model_version": str(version), "classifier": classifier, "variant": best.variant,
        "backbone": best.backbone, "git_commit": tags["git_commit"], "data_version": tags["data_version"],
        "data_dvc": tags["data_dvc"], "experiment": tags["experiment"],
        "selection": {"by": chosen.by, "value": chosen.value, "rule": f"{p['variant']}/{p['backbone']}",
                      "candidates": chosen.table, "heldout_figure": heldout["figure"] if heldout else None},
        "validation": {"classifier": evaluation["val"], **component_metrics()},
        "operating_threshold": evaluation["operating_threshold"],
        "mask_threshold": folders.operating_threshold(_common.UNET_MODEL),
        "frontal_threshold": folders.operating_threshold(_common.PROJECTION_MODEL),
        "component_runs": runs, "config": config.to_dict(),
        "audit": {"status": best.audit_status, "failed": list(best.audit_failed)},
    }

    with tracking.run(_common.mlflow_experiment(experiment), f"register-{classifier}",
                      params={**p, "selected": classifier}, tags=tags), tempfile.TemporaryDirectory() as tmp:
        artifacts = stage_bundle(Path(tmp), best.variant, best.backbone, config, metadata)
        # Neither the reference nor an input example MLflow may score is a served prediction: no log meanwhile; and
        # both are the model's own answers, whatever site's thresholds a shell left in $COVIDCXR_SITE.
        with mock.patch.dict(os.environ, {predlog.ENV: "none", sites.ENV: ""}):
            reference = drift_reference(artifacts, config)
            reference.save(Path(tmp) / "reference.json")
            artifacts[REFERENCE_ARTIFACT] = str(Path(tmp) / "reference.json")
            mlflow.log_artifact(artifacts[REFERENCE_ARTIFACT], Path(monitoring.REFERENCE_ARTIFACT).parent.as_posix())
            with tracking.artifact_upload(f"the {name} pyfunc model"):  # registered only once fully uploaded
                info = log_pyfunc(artifacts, stage_code(Path(tmp)), max(int(size), int(projection_size or size)))
        registered = mlflow.register_model(info.model_uri, name)
        client.set_registered_model_tag(name, LAST_VERSION_TAG, str(max(version, int(registered.version))))
        if int(registered.version) != version:
            raise RuntimeError(f"registry gave {name} version {registered.version}, not {version} as predicted "
                               "(another registration ran at the same time); rerun the stage")
        decision = selection.decide(chosen.value, champion_value, best.audit_status, allow_failed)
        against = (f"champion v{champion_version} {champion_value:.4f}" if champion_value is not None
                   else f"champion v{champion_version} (not comparable: {not_comparable})" if not_comparable
                   else f"champion v{champion_version} (no {chosen.by} recorded)" if champion_version
                   else "no champion")
        why = selection.reason(decision, chosen.by, chosen.value, against, best.audit_status, best.audit_failed,
                               allow_failed)
        for key, tag in {chosen.by: str(chosen.value), FIGURE_TAG: figure, "classifier": classifier,
                         "git_commit": tags["git_commit"],
                         "data_version": tags["data_version"], "data_dvc": tags["data_dvc"], "decision": decision,
                         "audit_status": best.audit_status, "decision_reason": why}.items():
            client.set_model_version_tag(name, registered.version, key, tag)
        client.set_registered_model_alias(name, decision, registered.version)
        mlflow.log_metrics({"reference.n": reference.meta["n"],
                            **({"ood.threshold": reference.meta["ood_threshold"]}
                               if reference.meta["ood_threshold"] is not None else {})})
        mlflow.log_metrics({f"candidate.{chosen.by}": chosen.value,
                            **({f"champion.{chosen.by}": champion_value} if champion_value is not None else {})})
        mlflow.log_dict({"candidates": chosen.table}, "register/candidates.json")
        mlflow.set_tags({"register.decision": decision, "register.version": registered.version,
                         "register.audit_status": best.audit_status, "register.reason": why})

    message = f"{name} v{registered.version} ({classifier}): {why} -> alias {decision}"
    print(f"register: {message}")
    for row in chosen.table:
        log.info("candidate %s: %s", row["classifier"], row["reason"])
    log.info("register: %s", message)
    result = {
        "model_name": name, "version": int(registered.version), "alias": decision, "classifier": classifier,
        "selected_by": chosen.by, "candidate_value": chosen.value, "champion_version": champion_version,
        "champion_value": champion_value, "git_commit": tags["git_commit"], "data_version": tags["data_version"],
        "data_dvc": tags["data_dvc"],
        "audit_status": best.audit_status, "audit_failed": ", ".join(best.audit_failed),
        "allow_failed_audit": allow_failed, "reason": why, "candidates": chosen.table, "experiment": experiment,
        "serving": config.to_dict(), "mask_threshold": metadata["mask_threshold"],
        "frontal_threshold": metadata["frontal_threshold"], "heldout": heldout, "component_runs": runs,
        "drift_reference": {k: reference.meta[k] for k in ("split", "n", "ood_threshold", "ood_quantile", "reencoded",
                                                           "not_scored")},
    }
    _common.write_json(OUT, result)
    return result


if __name__ == "__main__":
    run(_common.params("register"), {"variants": _common.params("train_classifier.variants"),
                                     "backbones": _common.params("train_classifier.backbones")},
        _common.params("split.experiment"),
        size=_common.params("cache.size"),
        segment=_common.params("segment"), projection_size=_common.params("train_projection.size"))
    _common.finish()
