"""Stage `register`: the whole pipeline (projection filter, U-Net, one classifier) as one MLflow pyfunc, registered.

The classifier is the one params name, or the best on the validation split (`best`). The new version takes the alias
`champion` when its validation metric is at least the current champion's and its shortcut audit (reports/audit/
audit.json) did not fail, or failed with `register.allow_failed_audit: true`; otherwise `challenger`. The decision,
its reason and both numbers are printed, logged and written to reports/register/registered.json.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from covidcxr import audit, serving, tracking
from pipelines import _common
from pipelines.train_classifier import model_dir

OUT = Path("reports/register/registered.json")
AUDIT = Path("reports/audit/audit.json")
#: Validation metrics that may decide the champion (all: higher is better).
METRICS = ("roc_auc", "average_precision", "accuracy", "sensitivity", "specificity", "f1", "precision")
#: Distributions the served model needs, pinned from requirements.lock.
SERVING_PACKAGES = ("tensorflow-cpu", "keras", "mlflow", "cloudpickle", "numpy", "pandas", "scipy", "pillow",
                    "pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg")
CHAMPION, CHALLENGER = "champion", "challenger"


def validation_metric(name: str, metric: str) -> float:
    """A classifier's validation metric at its operating threshold, from the `evaluate` stage's report."""
    result = json.loads(Path(f"reports/evaluate/{name}/metrics.json").read_text())
    value = result["val"]["at_operating"].get(metric)
    return float("nan") if value is None else float(value)


def select(p: dict, classifiers: dict) -> tuple[str, str, float]:
    """(variant, backbone, validation metric) of the classifier to register: fixed by params, or the best."""
    metric = p["metric"]
    if metric not in METRICS:
        raise ValueError(f"register.metric must be one of {METRICS} (higher is better), got {metric!r}")
    candidates = [(v, b) for v in classifiers["variants"] for b in classifiers["backbones"]
                  if p["variant"] in ("best", v) and p["backbone"] in ("best", b)]
    if not candidates:
        raise ValueError(f"register.variant={p['variant']!r} / backbone={p['backbone']!r} match no trained classifier "
                         f"(variants {classifiers['variants']}, backbones {classifiers['backbones']})")
    scored = [(validation_metric(f"{v}_{b}", metric), v, b) for v, b in candidates]
    finite = [s for s in scored if math.isfinite(s[0])]
    if not finite:
        raise ValueError(f"validation {metric} is undefined for every candidate {candidates}")
    best = max(finite, key=lambda s: s[0])  # max keeps the first of equals: params order breaks ties
    return best[1], best[2], best[0]


def pins(names: tuple[str, ...] = SERVING_PACKAGES, lock: str = "requirements.lock") -> list[str]:
    """``name==version`` for ``names`` as requirements.lock pins them (one source of truth for versions)."""
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pinned = {}
    for line in Path(lock).read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==", 1)
            pinned[norm(name.strip())] = version.strip()
    missing = [n for n in names if norm(n) not in pinned]
    if missing:
        raise ValueError(f"{lock} does not pin {missing}")
    return [f"{n}=={pinned[norm(n)]}" for n in names]


def stage_bundle(tmp: Path, variant: str, backbone: str, config: serving.Config, metadata: dict) -> dict[str, str]:
    """Copy what serving needs into ``tmp``: the three model folders (model files only), config and metadata."""
    sources = {"projection": "artifacts/models/projection", "unet": "artifacts/models/unet",
               "classifier": model_dir(variant, backbone)}
    artifacts = {}
    for name, src in sources.items():
        dest = tmp / name
        dest.mkdir()
        for file in serving.MODEL_FILES:
            if (Path(src) / file).is_file():
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


def input_example() -> dict:
    """A PNG of the first usable (frontal, good mask) cached image, base64: a request that works."""
    import pandas as pd
    from PIL import Image

    index, images, _ = _common.load_cache()
    flags = pd.read_csv("artifacts/masks/index.csv", keep_default_na=False)
    usable = sorted(flags.loc[flags["flag"] == "", "image_id"])
    if not usable:
        raise ValueError("no cached image has a usable lung mask: nothing to use as the input example")
    image = images[_common.rows_for(index, usable[:1])[0]]
    buffer = io.BytesIO()
    Image.fromarray(np.round(255 * np.clip(image, 0, 1)).astype(np.uint8)).save(buffer, format="PNG")
    return {serving.INPUT_COLUMN: [base64.b64encode(buffer.getvalue()).decode("ascii")]}


def component_metrics() -> dict:
    """Validation figures of the projection filter and the U-Net, for the metadata."""
    out = {}
    for name in ("projection", "unet"):
        path = f"reports/train_{name}/metrics.json"
        if Path(path).is_file():
            out[name] = json.loads(Path(path).read_text()).get("val")
    return out


def next_version(client, name: str) -> int:
    """The version number the registry will give the next version of ``name``."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        return 1
    versions = client.search_model_versions(f"name='{name}'")
    return max((int(v.version) for v in versions), default=0) + 1


def current_champion(client, name: str, metric: str) -> tuple[int | None, float | None]:
    """(version, its validation metric) of the current champion, or (None, None)."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    value = version.tags.get(f"val_{metric}")
    return int(version.version), (float(value) if value not in (None, "") else None)


def audit_verdict(classifier: str, path: Path = AUDIT) -> tuple[str, list[str]]:
    """(the audit's worst status among the checks that concern ``classifier``, those that failed as `name:subject`)."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
        status, failed = audit.model_verdict(report, classifier)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; run the audit stage first (dvc repro audit)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not an audit report ({type(err).__name__}: {err})") from None
    return status, [f"{c['name']}:{c['subject']}" for c in failed]


def decide(candidate: float, champion: float | None, audit_status: str = audit.PASS,
           allow_failed_audit: bool = False) -> str:
    """Champion when at least as good as the current champion (or there is none, or it has no such figure), unless
    its audit failed and failed audits are not allowed: then challenger, whatever its metric."""
    if audit_status == audit.FAIL and not allow_failed_audit:
        return CHALLENGER
    return CHAMPION if champion is None or not math.isfinite(champion) or candidate >= champion else CHALLENGER


def reason(decision: str, metric: str, value: float, against: str, audit_status: str, failed: list[str],
           allow_failed_audit: bool) -> str:
    """One line saying why the new version got its alias."""
    if audit_status == audit.FAIL and not allow_failed_audit:
        return (f"audit failed ({', '.join(failed)}): champion refused (register.allow_failed_audit is false); "
                f"val {metric} {value:.4f} vs {against}")
    verdict = ">=" if decision == CHAMPION else "<"
    note = (f"; audit failed ({', '.join(failed)}) but register.allow_failed_audit is true"
            if audit_status == audit.FAIL else f"; audit {audit_status}")
    return f"val {metric} {value:.4f} {verdict} {against}{note}"


def run(p: dict, classifiers: dict) -> dict:
    import mlflow

    log = _common.setup_logging()
    _common.setup_tracking()
    client = mlflow.MlflowClient()
    name, metric = p["model_name"], p["metric"]
    variant, backbone, value = select(p, classifiers)
    classifier = f"{variant}_{backbone}"
    audit_status, audit_failed = audit_verdict(classifier)
    allow_failed = bool(p.get("allow_failed_audit", False))
    champion_version, champion_value = current_champion(client, name, metric)
    version = next_version(client, name)

    segment, cache = _common.params("segment"), _common.params("cache")
    config = serving.Config(
        size=int(cache["size"]), variant=variant,
        frontal_threshold=float(_common.params("filter_frontal")["threshold"]),
        mask_threshold=float(segment["threshold"]), min_area=float(segment["min_area"]),
        max_area=float(segment["max_area"]), max_aspect=float(p["max_aspect"]), model_version=str(version),
        limits=serving.Limits(max_images=int(p["max_images"]), max_image_bytes=int(p["max_image_bytes"]),
                              max_pixels=int(p["max_pixels"])),
    )
    evaluation = json.loads(Path(f"reports/evaluate/{classifier}/metrics.json").read_text())
    tags = _common.repro_tags("register")
    runs = {part: json.loads((Path(src) / "run.json").read_text())["run_id"] for part, src in
            (("projection", "artifacts/models/projection"), ("unet", "artifacts/models/unet"),
             ("classifier", model_dir(variant, backbone)))}
    metadata = {
        "model_name": name, "model_version": str(version), "classifier": classifier, "variant": variant,
        "backbone": backbone, "git_commit": tags["git_commit"], "data_version": tags["data_version"],
        "experiment": tags["experiment"],
        "selection": {"metric": metric, "value": value, "rule": f"{p['variant']}/{p['backbone']}"},
        "validation": {"classifier": evaluation["val"], **component_metrics()},
        "operating_threshold": evaluation["operating_threshold"], "component_runs": runs, "config": config.to_dict(),
        "audit": {"status": audit_status, "failed": audit_failed},
    }

    with tracking.run(_common.mlflow_experiment(), f"register-{classifier}", params={**p, "selected": classifier},
                      tags=tags), tempfile.TemporaryDirectory() as tmp:
        with tracking.artifact_upload(f"the {name} pyfunc model"):  # registered only once fully uploaded
            info = mlflow.pyfunc.log_model(
                name="covidcxr", python_model=serving.CovidCxrModel(),
                artifacts=stage_bundle(Path(tmp), variant, backbone, config, metadata),
                code_paths=[stage_code(Path(tmp))], signature=serving.signature(), input_example=input_example(),
                pip_requirements=pins(),
            )
        registered = mlflow.register_model(info.model_uri, name)
        if int(registered.version) != version:
            raise RuntimeError(f"registry gave {name} version {registered.version}, not {version} as predicted "
                               "(another registration ran at the same time); rerun the stage")
        decision = decide(value, champion_value, audit_status, allow_failed)
        against = (f"champion v{champion_version} {champion_value:.4f}" if champion_value is not None
                   else f"champion v{champion_version} (no val {metric} recorded)" if champion_version
                   else "no champion")
        why = reason(decision, metric, value, against, audit_status, audit_failed, allow_failed)
        for key, tag in {f"val_{metric}": str(value), "classifier": classifier, "git_commit": tags["git_commit"],
                         "data_version": tags["data_version"], "decision": decision, "audit_status": audit_status,
                         "decision_reason": why}.items():
            client.set_model_version_tag(name, registered.version, key, tag)
        client.set_registered_model_alias(name, decision, registered.version)
        mlflow.log_metrics({f"candidate.val_{metric}": value,
                            **({f"champion.val_{metric}": champion_value} if champion_value is not None else {})})
        mlflow.set_tags({"register.decision": decision, "register.version": registered.version,
                         "register.audit_status": audit_status, "register.reason": why})

    message = f"{name} v{registered.version} ({classifier}): {why} -> alias {decision}"
    print(f"register: {message}")
    log.info("register: %s", message)
    result = {
        "model_name": name, "version": int(registered.version), "alias": decision, "classifier": classifier,
        "metric": metric, "candidate_value": value, "champion_version": champion_version,
        "champion_value": champion_value, "git_commit": tags["git_commit"], "data_version": tags["data_version"],
        "audit_status": audit_status, "audit_failed": ", ".join(audit_failed), "allow_failed_audit": allow_failed,
        "reason": why,
    }
    _common.write_json(OUT, result)
    return result


if __name__ == "__main__":
    run(_common.params("register"), _common.params("train_classifier"))
