"""Run a named experiment on the real chest X-ray corpus as DVC experiments; record its headline figures.

    python -m pipelines.experiment comparison            # or adult-negatives, leave-one-source-out, segmentation,
    python -m pipelines.experiment --list                # projection; --dry-run prints the dvc commands only
    python -m pipelines.experiment ablation --dry-run    # every robustness lever x the same runs x seeds

An experiment is an overlay file `experiments/<name>.yaml`: params (dotted keys) applied with `dvc exp run -n <name>
-S key=value ...`, the stages to reproduce, and an optional `matrix` (one DVC experiment per value, e.g. each held-out
source). Overlays share `experiments/_base.yaml` (every source ingested, the working size, epochs), so that the
ingest, cache and U-Net of one experiment are reused by the next through DVC's run cache (with the same
`split.holdout`). The projection filter is not: the projection split puts the selection's covid test patients in its
test split, so each selection trains its own filter and reruns `filter_frontal` and what follows.

An overlay of kind `ablation` names `levers` (params each) and `runs` (params and targets each): every lever runs
every run for every seed, and one table gives each lever's figures (held-out specificity per source with the COVID-19
test sensitivity, AUCs, the lungs-removed value, wall time) as mean ± sd over seeds (a cell over fewer seeds says its
n; a change from the reference is over the seeds both levers measured), with the machines each lever's runs came
from; `--levers` runs a subset, `--resume` keeps the runs already recorded (whatever machine and profile they ran
under: the table marks a change between machines †, between profiles ‡, and a cell that mixes profiles §),
`--summary` re-renders the tables from the records, `--dry-run` prints every command and what it will train (the
three ablation options are refused for another kind of experiment).

The runs happen in a scratch copy of the project (`--workdir`, default `$TMPDIR/covidcxr-experiments`), never in this
checkout's workspace; MLflow runs go to this project's tracking store (`MLFLOW_TRACKING_URI` overrides it), one MLflow
experiment per paper experiment. The corpus is `$COVIDCXR_REAL_DATA`, else `../shared/real-data` beside the project.
Results: `reports/experiments/<name>.json` and the headline figures in `bench/experiments.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

import bench
from covidcxr import runtime
from pipelines import _common

PROJECT = _common.PROJECT
EXPERIMENTS = PROJECT / "experiments"
REAL_DATA_ENV = "COVIDCXR_REAL_DATA"
DEFAULT_REAL_DATA = "../shared/real-data"  # relative to the project root
PLACEHOLDER = "{real_data}"
REPORTS = "reports/experiments"
GOALS = "_goals.md"  # in experiments/: where the issue's goals stand, rendered at the top of the summary
BENCH = "bench/experiments.json"


class ExperimentError(ValueError):
    """An unknown experiment, a malformed overlay, a missing corpus or a failed run."""


def available(directory: Path = EXPERIMENTS) -> list[str]:
    """Names of the experiments (overlay files not starting with `_`)."""
    return sorted(p.stem for p in Path(directory).glob("*.yaml") if not p.stem.startswith("_"))


def load(name: str, directory: Path = EXPERIMENTS) -> dict:
    """The overlay of experiment ``name``, merged over its ``base`` (the base's params first)."""
    path = Path(directory) / f"{name}.yaml"
    if name.startswith("_") or not path.is_file():
        raise ExperimentError(f"unknown experiment {name!r}; available: {', '.join(available(directory)) or 'none'}")
    spec = _read(path)
    if spec.get("base"):
        base = _read(Path(directory) / f"{spec['base']}.yaml")
        spec = {**base, **spec, "params": {**base.get("params", {}), **spec.get("params", {})}}
    for key in ("params", "targets", "kind"):
        if key not in spec:
            raise ExperimentError(f"{path}: no '{key}'")
    if spec["kind"] not in COLLECTORS:
        raise ExperimentError(f"{path}: kind {spec['kind']!r} is not one of {sorted(COLLECTORS)}")
    return spec


def _current(name: object) -> dict:
    """A recorded experiment's overlay as it is today (:func:`load`), or {} where it has none (renamed or removed)."""
    return load(name) if name in available() else {}


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ExperimentError(f"overlay {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ExperimentError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(spec, dict):
        raise ExperimentError(f"{path}: an overlay is a mapping, got {type(spec).__name__}")
    return spec


def real_data_root(value: str | None = None) -> Path:
    """The corpus: ``value``, else $COVIDCXR_REAL_DATA, else ../shared/real-data beside the project (absolute)."""
    raw = value or os.environ.get(REAL_DATA_ENV) or DEFAULT_REAL_DATA
    root = Path(raw) if Path(raw).is_absolute() else (PROJECT / raw)
    root = root.resolve()
    if not (root / "cohen" / "metadata.csv").is_file():
        raise ExperimentError(f"{root} does not hold the real-data corpus (no cohen/metadata.csv); "
                              f"set {REAL_DATA_ENV} or --real-data")
    return root


def hydra_value(value: object) -> str:
    """A params value in the override grammar of `dvc exp run -S` (strings always quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        bare = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", value)
        if bare and value.lower() not in ("true", "false", "null", "nan", "inf"):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise ExperimentError(f"cannot pass a {type(value).__name__} as a params value: {value!r}")


def _substitute(value: object, real_data: Path) -> object:
    if isinstance(value, str):
        return value.replace(PLACEHOLDER, real_data.as_posix())
    if isinstance(value, list):
        return [_substitute(v, real_data) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, real_data) for k, v in value.items()}
    return value


def runs(name: str, spec: dict) -> list[tuple[str, dict]]:
    """(DVC experiment name, params) of every run: one, or one per value of the overlay's ``matrix`` key (a list of
    values, or a mapping of run names to values when the values are not names themselves, e.g. held-out rules)."""
    if spec.get("kind") == ABLATION:
        return [(step["name"], step["params"]) for step in ablation_plan(name, spec, seeds=[None])]
    matrix = spec.get("matrix") or {}
    if not matrix:
        return [(name, dict(spec["params"]))]
    if len(matrix) != 1:
        raise ExperimentError(f"experiment {name}: matrix takes one key, got {sorted(matrix)}")
    (key, values), = matrix.items()
    return [(f"{name}-{label}", {**spec["params"], key: value}) for label, value in _named(values)]


def _named(values: object) -> list[tuple[str, object]]:
    if isinstance(values, dict):
        return [(str(k), v) for k, v in values.items()]
    return [(str(v), v) for v in values]


#: The params a seed sets unless the overlay names others (``seed_keys``): the models' own initialisation and order.
SEED_KEYS = ("train_classifier.seed",)


def seeded(planned: list[tuple[str, dict]], spec: dict) -> list[tuple[str, dict, int | None]]:
    """Every run once per seed of the overlay's ``seeds`` (named ``<run>-s<seed>``), or once without.

    A run's seeds are consecutive: in one workdir, DVC then redoes only what the seed changes (the classifiers and
    their evaluation), where alternating held-out runs redid the split, the U-Net study stage and the evaluation at
    every switch (about 50 s each, measured 2026-12-05, once each held-out run has its own U-Net)."""
    seeds = spec.get("seeds") or [None]
    keys = spec.get("seed_keys") or SEED_KEYS
    return [(name if seed is None else f"{name}-s{seed}", params if seed is None else {**params, **dict.fromkeys(keys,
             int(seed))}, seed) for name, params in planned for seed in seeds]


def heldout_runs(name: str, spec: dict) -> list[tuple[str, dict]]:
    """The held-out runs of an overlay's ``heldout`` block: its params, each source or hospital held out in turn."""
    block = spec.get("heldout")
    if not block:
        return []
    base = {**spec["params"], **(block.get("params") or {})}
    return [(f"{name}-heldout-{label}", {**base, "split.holdout": rules}) for label, rules in _named(block["matrix"])]


def heldout_figures(block: dict, collected: dict[str, dict | list[dict]]) -> dict:
    """What `register` chooses by (``register.heldout``): per classifier, the worst specificity at its operating
    threshold over the held-out runs named in ``select`` (validation for the choice); and every held-out run's rows,
    each marked as used to choose or not (a run used to choose is not a test of the chosen model).

    ``collected``: per held-out run, its figures, or a list of them, one per seed (``heldout.seeds``). Over seeds, a
    run's specificity is the mean over its seeds, and the worst of those means chooses: one seed's figure moves by
    more than the models differ. Its row then holds means, the sd and range over seeds, and every seed's value.
    ``standard_error`` (that worst mean's, over seeds) and ``mean`` (the specificity's mean over the ``select`` runs)
    let `register` treat figures within noise of each other as tied and break the tie by the mean
    (:func:`covidcxr.selection.select`).
    """
    runs = {label: r if isinstance(r, list) else [r] for label, r in collected.items()}
    select = [str(s) for s in block.get("select") or runs]
    unknown = sorted(set(select) - set(runs))
    if unknown:
        raise ExperimentError(f"heldout.select names runs {unknown} that are not in heldout.matrix")
    models = sorted(next(iter(runs.values()))[0]["models"]) if runs else []
    rows = {label: {model: _heldout_row([r["models"][model] for r in rs if model in r["models"]], label in select)
                    for model in sorted({m for r in rs for m in r["models"]})}
            for label, rs in runs.items()}
    by_classifier, standard_error, mean = {}, {}, {}
    for model in models:
        used = [row for k in select if (row := rows[k].get(model) or {}).get("specificity") is not None]
        worst = min(used, key=lambda row: row["specificity"]) if used else {}
        by_classifier[model] = worst.get("specificity")
        sd, n = worst.get("specificity_sd"), worst.get("n_seeds") or 1
        standard_error[model] = sd / math.sqrt(n) if sd is not None and n > 1 else None
        mean[model] = float(np.mean([row["specificity"] for row in used])) if used else None
    n_seeds = max((len(rs) for rs in runs.values()), default=1)
    what = "worst held-out specificity at the operating threshold" + (f", mean of {n_seeds} seeds," if n_seeds > 1
                                                                        else "")
    return {"figure": f"{what} ({', '.join(select)})", "by_classifier": by_classifier, "select": select,
            "seeds": n_seeds, "sources": rows, "standard_error": standard_error, "mean": mean}


def _heldout_row(ms: list[dict], used: bool) -> dict:
    """One held-out run's row for one classifier: its figures with their bootstrap CIs (one seed), or their mean, sd
    and range over seeds (several; a CI of one seed's test says nothing of the spread between seeds)."""
    if len(ms) == 1:
        m = ms[0]
        return {"n_covid": m["test_classes"]["covid"], "n_negative": m["test_classes"]["negative"],
                "auc": m["test_auc"]["value"], "auc_low": m["test_auc"]["low"], "auc_high": m["test_auc"]["high"],
                "specificity": m["test_specificity"]["value"], "specificity_low": m["test_specificity"]["low"],
                "specificity_high": m["test_specificity"]["high"], "sensitivity": m["test_sensitivity"]["value"],
                "threshold": m["operating_threshold"], "used_to_choose": used,
                **_served_row([m]), **_site_row([m]), **_site_row([m], ADMISSION)}
    row: dict = {"n_covid": ms[0]["test_classes"]["covid"], "n_negative": ms[0]["test_classes"]["negative"],
                 "n_seeds": len(ms), "used_to_choose": used}
    for key, figure in (("auc", "test_auc"), ("specificity", "test_specificity"), ("sensitivity", "test_sensitivity")):
        row.update(_over_seeds(key, [m[figure]["value"] for m in ms]))
    row["threshold_by_seed"] = [m["operating_threshold"] for m in ms]
    return {**row, **_served_row(ms), **_site_row(ms), **_site_row(ms, ADMISSION)}


def _served_row(ms: list[dict]) -> dict:
    """What serving answered for a held-out run's test: its negatives called COVID-19 and refused, and (a run with
    COVID-19 films) its COVID-19 films called COVID-19, ``detected``, which counts a refused film as missed; mean and sd
    over seeds (one seed: its value). Nothing for records made before `evaluate` reported what serving answers.

    Records made since `evaluate` counted every film of the split (``refused_by_reason`` in the block) were refused
    before scoring (a lateral view, a lung mask) or as out of distribution: the row says which, as shares of all the
    test films (``refused_before``, ``refused_ood``), and how many films of each class the shares are of
    (``films_covid``, ``films_negative``; ``n_covid``, ``n_negative`` are the films scored). Older records refused
    out of distribution only, and their shares were of the films scored."""
    row = _block_row(ms, "test_served", (("called_covid", "negatives_called_covid"), ("refused", "negatives_refused"),
                                         ("detected", "positives_called_covid")))
    blocks = [m.get("test_served") or {} for m in ms]
    if not all("refused_by_reason" in b for b in blocks):
        return row
    shares: dict[str, list[float]] = {"refused_before": [], "refused_ood": []}
    for b in blocks:
        ood = b["refused_by_reason"].get("out_of_distribution", 0)  # serving's reason
        shares["refused_ood"].append(ood / b["n"])
        shares["refused_before"].append((sum(b["refused_by_reason"].values()) - ood) / b["n"])
    for key, values in shares.items():
        row.update(_seeds_figure(key, values))
    return {**row, "films_covid": blocks[0]["n_positive"], "films_negative": blocks[0]["n_negative"]}


#: The held-out rows' site figures: (record block, row prefix, figures).
SITE = ("test_site_calibration", "site_", ("sensitivity", "specificity", "model_sensitivity", "model_specificity"))
ADMISSION = ("test_site_admission", "admit_", (*SITE[2], "refused", "model_refused"))


def _site_row(ms: list[dict], kind: tuple = SITE) -> dict:
    """A held-out run with both classes: sensitivity and specificity with a threshold the site chose on a few of its
    own films (``site_``), and with the model's own threshold on the same films (``site_model_``), each the mean over
    draws; mean and sd over seeds. ``site_skipped``: why a seed with COVID-19 films could not measure it (e.g. serving
    refused most of them); nothing for a source of negatives only or a record made before it was measured.
    ``kind`` :data:`ADMISSION`: the same when the site also admits its own films past the OOD check (``admit_``), with
    the shares refused at the site's OOD threshold and at the model's."""
    block, prefix, keys = kind
    blocks = [m.get(block) or {} for m in ms]
    # a run whose test holds COVID-19 films, even if serving answered none of them (not a source of negatives only)
    skipped = [b for m, b in zip(ms, blocks, strict=True) if b.get("status") == "skipped"
               and ((m.get("test_classes") or {}).get("covid") or b.get("n_covid"))]
    if skipped:  # with what the seeds set out to draw, so that the table says it
        return {f"{prefix}skipped": f"{len(skipped)} of {len(blocks)} seeds: {skipped[0]['reason']}",
                **{f"{prefix}{k}": skipped[0][k] for k in ("n_per_class", "unit") if k in skipped[0]}}
    if any(b.get("status") != "measured" for b in blocks):
        return {}
    first = ms[0][block]
    promised = ({f"{prefix}promised_sensitivity": first["promised_sensitivity"]} if "promised_sensitivity" in first
                else {})
    # what was drawn: films (records made before evaluate drew patients say nothing) or patients
    return {f"{prefix}n_per_class": first["n_per_class"], f"{prefix}unit": first.get("unit", "films"), **promised,
            **_block_row(ms, block, tuple((f"{prefix}{k}", k) for k in keys))}


def _block_row(ms: list[dict], block: str, keys: tuple[tuple[str, str], ...]) -> dict:
    """Figures of one block of each seed's record (``keys``: row name, figure name) over seeds; a figure missing or
    undefined in some seed is left out, and a block missing in some seed leaves the row empty."""
    blocks = [m.get(block) for m in ms]
    if not blocks or None in blocks:
        return {}
    row: dict = {}
    for key, figure in keys:
        values = [b.get(figure) for b in blocks]
        if any(v is None or math.isnan(v) for v in values):
            continue
        row.update(_seeds_figure(key, values))
    return row


def _seeds_figure(key: str, values: list) -> dict:
    """One figure of a row: one seed's value as it is, several seeds' as :func:`_over_seeds` gives them."""
    return {key: values[0]} if len(values) == 1 else _over_seeds(key, values)


def _over_seeds(key: str, values: list) -> dict:
    """A held-out figure over seeds: every seed's value, and their mean, sd and range (None where the figure is
    undefined in some seed, e.g. no COVID-19 in a held-out negative source)."""
    s = _stats(values) if None not in values else None
    return {f"{key}_by_seed": values, key: s and s["mean"], f"{key}_sd": s and s["sd"], f"{key}_min": s and s["min"],
            f"{key}_max": s and s["max"]}


def dvc_command(exp_name: str, params: dict, targets: list[str], real_data: Path) -> list[str]:
    """`dvc exp run -n NAME -S key=value ... TARGETS`, with the corpus root filled in."""
    cmd = ["dvc", "exp", "run", "-n", exp_name]
    for key, value in params.items():
        cmd += ["-S", f"{key}={hydra_value(_substitute(value, real_data))}"]
    return cmd + list(targets)


# --- the scratch workspace --------------------------------------------------------------------------------------------

def _env(project: Path, workdir: Path | None = None) -> dict[str, str]:
    """The stages' environment: this venv first, the copy's own library, MLflow in the project's store."""
    bin_dir = Path(sys.executable).parent
    library = {"PYTHONPATH": str(workdir / "src")} if workdir is not None else {}  # not the editable install's
    return runtime.environment(**library, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                               MLFLOW_TRACKING_URI=os.environ.get("MLFLOW_TRACKING_URI")
                               or f"sqlite:///{project / 'mlflow.db'}")


def _git(args: list[str], cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def prepare_workdir(project: Path, workdir: Path) -> Path:
    """Copy the project's git-visible files into ``workdir`` (a git repository DVC experiments can run in).

    An existing workdir keeps its artifacts and DVC cache (so finished stages are reused) and gets the current code.
    """
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=project, capture_output=True, check=True).stdout.split(b"\0")
    workdir.mkdir(parents=True, exist_ok=True)
    for name in filter(None, (f.decode() for f in files)):
        src = project / name
        if src.is_file():
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, workdir / name)
    (workdir / "data").mkdir(exist_ok=True)  # the pipeline's declared data folder; the corpus comes from params
    if not (workdir / ".git").is_dir():
        _git(["init", "-q", "-b", "main"], workdir)
    _git(["add", "-A"], workdir)
    _git(["-c", "user.email=experiments@covidcxr", "-c", "user.name=covidcxr", "commit", "-q", "--allow-empty",
          "-m", "baseline for experiments"], workdir)
    (workdir / ".git" / BASELINE_DIGEST).write_text(_baseline_digest(workdir) + "\n", encoding="utf-8")
    return workdir


#: In the workdir's .git: the digest of the baseline params.yaml that :func:`prepare_workdir` committed.
BASELINE_DIGEST = "covidcxr-baseline-params.sha256"


def _baseline_digest(workdir: Path) -> str:
    head = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=workdir, check=True, capture_output=True).stdout
    return hashlib.sha256(head).hexdigest()


def check_baseline(workdir: Path) -> None:
    """``--reuse-code``: refuse a workdir whose baseline params are not the ones :func:`prepare_workdir` committed.

    Every run starts from the baseline commit's params.yaml, so a commit made in the workdir by hand (``git add -A``
    after a run takes in the params the last experiment applied to the workspace, such as a held-out run's classifier
    seed) would change every later run's params that its overlay does not set, silently (seen 2026-12-06: a main run
    trained with seed 3). Committing code alone keeps the params and passes.
    """
    recorded = workdir / ".git" / BASELINE_DIGEST
    if not recorded.is_file():
        raise ExperimentError(f"{workdir}: no record of the baseline params this runner copied (a workdir prepared "
                              "before the check, or by hand): run once without --reuse-code")
    if _baseline_digest(workdir) != recorded.read_text(encoding="utf-8").strip():
        raise ExperimentError(f"{workdir}: its baseline commit's params.yaml is not the one the runner copied (a "
                              "commit made in the workdir carries params of its own, such as an experiment's applied "
                              "values): run without --reuse-code to copy the project again, or reset the workdir to "
                              "the runner's baseline and commit only code")


def open_workdir(workdir: Path, *, reuse_code: bool) -> Path:
    """The workdir a batch runs in: with ``reuse_code``, an existing one as it is once its baseline is checked
    (:func:`check_baseline`); otherwise the project copied into it (:func:`prepare_workdir`)."""
    if reuse_code and (workdir / ".git").is_dir():
        check_baseline(workdir)
        return workdir
    return prepare_workdir(PROJECT, workdir)


def _ensure_mlflow_experiment(project: Path, name: str) -> None:
    """Create the MLflow experiment with its artifacts under the project's mlruns/ (not the scratch copy's)."""
    import mlflow

    mlflow.set_tracking_uri(_env(project)["MLFLOW_TRACKING_URI"])
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=(project / "mlruns" / name).as_uri())


# --- headline figures -------------------------------------------------------------------------------------------------

def _json(path: Path) -> dict:
    if not path.is_file():
        raise ExperimentError(f"the run did not write {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def _ci(block: dict, metric: str) -> dict:
    ci = block["ci_at_operating"][metric]
    return {"value": ci["value"], "low": ci["low"], "high": ci["high"]}


def _ood_refused(workdir: Path, variant: str, backbone: str) -> float | None:
    """Share of the test split above the classifier's out-of-distribution threshold (what serving refuses), from the
    classifier stage's report; None for a model trained without the detector."""
    path = workdir / f"reports/train_classifier/{variant}_{backbone}.json"
    report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return (report.get("ood") or {}).get("refused", {}).get("test")


SERVED = ("refused_share", "positives_called_covid", "negatives_called_covid", "negatives_refused",
          "answered_sensitivity", "answered_specificity")
#: Since `evaluate` counted every film of the split: how many films the shares are of, and why each refused one was.
SERVED_FILMS = ("n", "n_positive", "n_negative", "refused_by_reason")


def _served(split_metrics: dict) -> dict | None:
    """What serving answered for a test split (`evaluate`'s ``served``): the shares a site sees, and where `evaluate`
    counted the films refused before scoring (``refused_by_reason``), the films they are of and the refusals by
    reason; None in records made before `evaluate` reported it."""
    served = split_metrics.get("served")
    if not served:
        return None
    return {k: served[k] for k in (*SERVED, *(SERVED_FILMS if "refused_by_reason" in served else ()))}


AUDITED = {"audit", "register", "model_card"}  # targets that run the audit (and with register, a registration)


def collect_classifier(workdir: Path, params: dict, targets: tuple[str, ...] = ("evaluate",)) -> dict:
    """Test AUC with its 95% CI, sensitivity and specificity at the operating threshold, per variant/backbone, and the
    test split's share refused as out of distribution (a held-out source's, in leave-one-source-out).

    A one-class test split (a held-out source of negatives only) has no AUC and no sensitivity: they are null, and
    ``test_classes`` says why.
    """
    split = _json(workdir / "reports/split/summary.json")
    out: dict = {"split_counts": split["covid"], "models": {}}
    audit_report = _json(workdir / "reports/audit/audit.json") if AUDITED & set(targets) else None
    for variant in params.get("train_classifier.variants", ["c", "d", "e"]):
        for backbone in params.get("train_classifier.backbones", ["vgg16", "vgg19"]):
            m = _json(workdir / f"reports/evaluate/{variant}_{backbone}/metrics.json")
            test = m["test"]
            at = test["at_operating"]
            out["models"][f"{variant}_{backbone}"] = {
                "test_auc": _ci(test, "roc_auc"),
                "test_sensitivity": _ci(test, "sensitivity"),
                "test_specificity": _ci(test, "specificity"),
                "test_accuracy": _ci(test, "accuracy"),
                "test_classes": {"covid": at["n_positive"], "negative": at["n"] - at["n_positive"]},
                "test_at_0.5": {k: test["at_0.5"][k]
                                for k in ("accuracy", "sensitivity", "specificity", "f1", "roc_auc")},
                "val_auc": m["val"]["at_0.5"]["roc_auc"],
                "operating_threshold": m["operating_threshold"],
                "test_ece": test.get("ece"), "test_ece_uncalibrated": test.get("ece_uncalibrated"),
                "test_ood_refused": _ood_refused(workdir, variant, backbone),
                "test_served": _served(test),
                "test_site_calibration": test.get("site_calibration"),
                "test_site_admission": test.get("site_admission"),
            }
            if audit_report is not None:
                from covidcxr import audit

                status, failed = audit.model_verdict(audit_report, f"{variant}_{backbone}")
                out["models"][f"{variant}_{backbone}"]["audit"] = {
                    "status": status, "failed": [f"{c['name']}:{c['subject']}" for c in failed]}
    if audit_report is not None:
        out["audit"] = {c["name"] + ":" + c["subject"]: {"status": c["status"], "value": c["value"],
                                                          "reason": c["reason"]} for c in audit_report["checks"]}
    unet = workdir / "reports/train_unet/metrics.json"
    external = _json(unet).get("external") if unet.is_file() else None
    if external:  # a held-out source's masks: the U-Net that cropped and masked its images never learned them
        out["unet_external"] = {k: external[k] for k in ("n", "dice", "iou", "dice_clean")}
    projection = workdir / "reports/train_projection/metrics.json"
    unseen = filter_only(_json(projection)).get("external") if projection.is_file() else None
    if unseen:  # a held-out source's images: the filter that kept or refused them never learned from them
        out["projection_external"] = _filter_recalls(unseen["by_source"])
    if {"register", "model_card"} & set(targets):
        r = _json(workdir / "reports/register/registered.json")
        out["registered"] = {k: r.get(k) for k in ("model_name", "version", "alias", "classifier", "selected_by",
                                                    "candidate_value", "reason", "audit_status", "candidates")}
    return out


def _training_run(project: Path, model_dir: Path) -> dict:
    """``train_seconds``, the training time of the MLflow run that made a model, and ``train_started_unix``, when it
    began (the stage may have been reused from an earlier run: :func:`stage_reused`); None where unknown."""
    import mlflow

    from covidcxr import folders

    try:
        mlflow.set_tracking_uri(_env(project)["MLFLOW_TRACKING_URI"])
        info = mlflow.get_run(folders.folder_info(model_dir)["run_id"]).info
        seconds = round((info.end_time - info.start_time) / 1000.0, 1) if info.end_time else None
        return {"train_seconds": seconds, "train_started_unix": round(info.start_time / 1000.0, 1)}
    except Exception:  # noqa: BLE001 - a figure for the table, not a reason to fail the experiment
        return {"train_seconds": None, "train_started_unix": None}


def stage_reused(run: dict, wall_seconds: float | None = None) -> bool | None:
    """Whether a run's trained model came from DVC's run cache (an earlier run) rather than from its own training:
    its training began before the run did (both recorded since 2026-12-07, 17:00), or took longer than the run's
    whole wall time (``wall_seconds``, the experiment's, where the run recorded none of its own). None: no training
    recorded."""
    if not run.get("train_seconds"):
        return None
    if run.get("train_started_unix") is not None and run.get("started_unix") is not None:
        return run["train_started_unix"] < run["started_unix"]
    wall = run.get("wall_seconds", wall_seconds)
    return wall is not None and run["train_seconds"] > wall


def collect_segmentation(workdir: Path, params: dict, targets: tuple[str, ...] = (), project: Path = PROJECT) -> dict:
    """U-Net Dice/IoU on its held-out split (internal, per source) and on the external sources."""
    m = _json(workdir / "reports/train_unet/metrics.json")
    return {"internal_test": m["test"], "internal_val": m["val"], "external": m.get("external"),
            "split_counts": _json(workdir / "reports/split/summary.json")["segmentation"],
            **_training_run(project, workdir / "artifacts/models/unet")}


def filter_only(metrics: dict) -> dict:
    """``train_projection``'s figures of the filter alone (its network and lateral check, no file's view position),
    per split: what experiments compare filters by. The stage reports them under each split's ``filter_only``, beside
    the deployed rule's; records written before that held only them, at the split's top level."""
    return {k: v.get("filter_only", v) if isinstance(v, dict) else v for k, v in metrics.items()}


def collect_projection(workdir: Path, params: dict, targets: tuple[str, ...] = (), project: Path = PROJECT) -> dict:
    """Projection filter accuracy per split, overall and per class (frontal, lateral): the filter's alone
    (:func:`filter_only`)."""
    return {"metrics": filter_only(_json(workdir / "reports/train_projection/metrics.json")),
            "split_counts": _json(workdir / "reports/split/summary.json")["projection"],
            **_training_run(project, workdir / "artifacts/models/projection")}


# --- ablation: every robustness lever measured by the same runs, over seeds ------------------------------------------

ABLATION = "ablation"
BASELINE = "baseline"


def ablation_plan(name: str, spec: dict, *, levers: list[str] | None = None, runs: list[str] | None = None,
                  seeds: list[int | None] | None = None) -> list[dict]:
    """Every run of an ablation overlay, seed by seed, lever by lever: the overlay's ``params``, then the run's
    (``runs: {<run>: {params, targets}}``), then the lever's (``levers: {<lever>: {params}}``), then the seed
    (``seed_keys``). Each step: ``name`` (``<name>-<lever>-<run>[-s<seed>]``), ``lever``, ``run``, ``seed``,
    ``params`` and ``targets``. ``levers`` and ``runs`` choose subsets (the overlay's order is kept)."""
    all_levers = spec.get("levers") or {}
    all_runs = spec.get("runs") or {}
    if not all_levers or not all_runs:
        raise ExperimentError(f"experiment {name}: an ablation needs 'levers' and 'runs'")
    for what, pick, every in (("levers", levers, all_levers), ("runs", runs, all_runs)):
        unknown = sorted(set(pick or ()) - set(every))
        if unknown:
            raise ExperimentError(f"experiment {name}: unknown {what} {unknown}; {what}: {', '.join(every)}")
    chosen = list(all_levers) if levers is None else levers
    all_runs = {k: v for k, v in all_runs.items() if runs is None or k in runs}
    keys = spec.get("seed_keys") or SEED_KEYS
    plan = []
    for seed in (spec.get("seeds") or [None]) if seeds is None else seeds:
        for lever in chosen:
            for run, run_spec in all_runs.items():
                params = {**spec["params"], **(run_spec.get("params") or {}), **(all_levers[lever] or {})}
                if seed is not None:
                    params.update(dict.fromkeys(keys, int(seed)))
                plan.append({"name": f"{name}-{lever}-{run}" + ("" if seed is None else f"-s{seed}"),
                             "lever": lever, "run": run, "seed": seed, "params": params,
                             "targets": list(run_spec.get("targets") or spec["targets"])})
    return plan


#: Rough cost of one step for --dry-run: a classifier training at 64 px (measured: 45-60 s on 2 shared cores, 5
#: epochs, VGG16 1/8 wide; it grows with the pixel count), and the fixed cost of a `dvc exp run` (checks, cache
#: restores, a stage process per classifier).
TRAINING_SECONDS_64PX, RUN_OVERHEAD_SECONDS = 50.0, 30.0
UPSTREAM = ("cache.", "ingest.", "train_unet.", "tune_unet.", "pretrain.", "segment.")
#: The params that decide what train_projection learns from (its params, its cache's, pretrain's, and through
#: artifacts/splits/projection.csv ingest's, validate's and the data selection's: the projection split pins the
#: selection's covid test patients to its test split). DVC's run cache reuses a filter only where all are the same.
PROJECTION_FILTER_INPUTS = ("ingest.", "validate.", "split.", "cache.", "pretrain.", "train_projection.")


def ablation_estimate(plan: list[dict], baseline: dict) -> dict:
    """What a plan trains: classifier trainings (variants x backbones x ensemble members of every run), projection
    filter trainings (one per distinct data selection and filter inputs, :data:`PROJECTION_FILTER_INPUTS`), the
    other upstream stage sets (cache, U-Net, segment, pretrain) that differ and are computed once each (DVC's run
    cache shares the rest), and a rough wall time of the classifier trainings and runs."""
    def value(params: dict, key: str) -> object:
        section, _, leaf = key.partition(".")
        return params[key] if key in params else (baseline.get(section) or {}).get(leaf)

    trainings, seconds, upstream, filters = 0, 0.0, set(), set()
    for step in plan:
        p = step["params"]
        n = len(value(p, "train_classifier.variants") or []) * len(value(p, "train_classifier.backbones") or [])
        n *= int(value(p, "train_classifier.members") or 1)
        trainings += n
        size = int(value(p, "cache.size") or 64)
        seconds += n * TRAINING_SECONDS_64PX * (size / 64) ** 2 + RUN_OVERHEAD_SECONDS
        upstream.add(json.dumps({k: v for k, v in p.items() if k.startswith(UPSTREAM)}, sort_keys=True, default=str))
        filters.add(json.dumps({k: v for k, v in p.items() if k.startswith(PROJECTION_FILTER_INPUTS)}, sort_keys=True,
                               default=str))
    return {"dvc_runs": len(plan), "classifier_trainings": trainings, "projection_filter_trainings": len(filters),
            "upstream_sets": len(upstream), "hours_rough": round(seconds / 3600.0, 1)}


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    from covidcxr import metrics

    return metrics.classification_metrics(y, score)["roc_auc"] if 0 < y.sum() < len(y) else None


def collect_ablation(workdir: Path, params: dict, targets: tuple[str, ...] = (), project: Path = PROJECT) -> dict:
    """The issue's figures of one run, from each classifier's own predictions (``predictions.csv``, its operating
    threshold) and the cache's sources: test AUC, COVID-19 sensitivity, specificity per source at the operating
    threshold, per source the AUC of the test COVID-19 against that source's test negatives (whether the model ranks
    a source's negatives below COVID-19 at all, whatever the threshold: a held-out source with a high AUC and a low
    specificity is a threshold that did not carry, a low AUC a model that cannot tell), and per backbone the audit's
    lungs-removed value ``(AUC_e - 0.5) / (AUC_c - 0.5)``."""
    import pandas as pd

    from covidcxr import audit, folders

    index = pd.read_csv(workdir / "artifacts/cache/index.csv", usecols=["image_id", "source"])
    source_of = dict(zip(index["image_id"], index["source"].astype(str)))
    variants = params.get("train_classifier.variants", ["c", "d", "e"])
    backbones = params.get("train_classifier.backbones", ["vgg16", "vgg19"])
    out: dict = {"split_counts": _json(workdir / "reports/split/summary.json")["covid"], "models": {},
                 "heldout_sources": sorted({str(r["source"]) for r in params.get("split.holdout") or []
                                            if "source" in r}), "lungs_removed": {}}
    for variant in variants:
        for backbone in backbones:
            folder = workdir / f"artifacts/models/classifier_{variant}_{backbone}"
            pred = pd.read_csv(folder / "predictions.csv")
            threshold = folders.operating_threshold(folder)
            test = pred[pred["split"] == "test"]
            y = (test["label"] == "covid").to_numpy()
            score = test["score"].to_numpy()
            called = score >= threshold
            sources = test["image_id"].map(source_of).astype(str).to_numpy()
            out["models"][f"{variant}_{backbone}"] = {
                "test_auc": _auc(y.astype(float), score),
                "sensitivity": float(called[y].mean()) if y.any() else None, "n_covid": int(y.sum()),
                "specificity_by_source": {src: {"value": float((~called[~y & (sources == src)]).mean()),
                                                "n": int((~y & (sources == src)).sum())}
                                          for src in sorted(set(sources[~y]))},
                "auc_by_source": {src: _auc(y[keep].astype(float), score[keep])
                                  for src in sorted(set(sources[~y])) for keep in [y | (sources == src)]},
                "operating_threshold": threshold, **_training_run(project, folder)}
    min_c_auc = float(yaml.safe_load((workdir / "params.yaml").read_text(encoding="utf-8"))["audit"]["lungs_removed"]
                      .get("min_c_auc", 0.6))
    for backbone in backbones:
        auc = {v: (out["models"].get(f"{v}_{backbone}") or {}).get("test_auc") for v in ("c", "e")}
        if auc["c"] is not None and auc["e"] is not None:
            check = audit.lungs_removed_check(backbone, auc["c"], auc["e"], warn=0.3, fail=0.6, min_c_auc=min_c_auc)
            out["lungs_removed"][backbone] = check.value
    return out


def _stats(values: list) -> dict | None:
    """Mean, sd (n - 1; None below two values: one seed says nothing of the spread), min, max and n of the finite
    values; None when there is none."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and v is not None and np.isfinite(v)]
    if not vals:
        return None
    arr = np.asarray(vals)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if len(arr) > 1 else None,
            "min": float(arr.min()), "max": float(arr.max()), "n": len(arr)}


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def ablation_table(runs_out: dict) -> dict:
    """Per lever, each column's mean, sd, min and max over seeds (``headline`` of an ablation). Columns: per held-out
    run, the specificity of its held-out sources at the operating threshold (model c) and their AUC against the
    COVID-19 test patients (recorded since 2026-12-05: null for the runs before); the worst COVID-19 test
    sensitivity of those runs; per other run, the test AUC of every variant; the lungs-removed value (mean over the
    held-out runs, which have both classes in test); wall minutes per seed.

    A seed counts in a column only when every run that feeds the column in any seed of the lever measured it there
    (a worst or a mean over fewer runs, or a seed interrupted part way, is not the same figure): ``n`` and ``seeds``
    say which seeds a cell holds, ``values`` each one's figure (in the order of ``seeds``), so that a change between
    levers is taken over the seeds both measured (:func:`_ablation_rows`); ``machines`` the machines its runs ran on
    (:func:`run_machine`; null: not recorded)."""
    return _ablation_table(runs_out)[0]


def _ablation_table(runs_out: dict) -> tuple[dict, dict[str, dict[str, list[str]]]]:
    """:func:`ablation_table`, and per lever and column the names of the runs its cell counts (whose profiles
    :func:`_ablation_rows` compares)."""
    per: dict[str, dict[str, dict[object, dict[str, object]]]] = {}  # lever -> column -> seed -> run -> value
    machine: dict[tuple[str, object, str], str | None] = {}  # (lever, seed, run) -> machine
    named: dict[tuple[str, object, str], str] = {}  # (lever, seed, run) -> the run's experiment name

    def add(lever: str, column: str, seed: object, run: str, value: object) -> None:
        per.setdefault(lever, {}).setdefault(column, {}).setdefault(seed, {})[run] = value

    for exp_name, r in runs_out.items():
        lever, run, seed = r["lever"], r["run"], r.get("seed")
        machine[lever, seed, run] = run_machine(r)
        named[lever, seed, run] = exp_name
        add(lever, "wall_minutes", seed, run, r.get("wall_seconds", 0.0) / 60.0)
        models = r["models"]
        first = sorted({m.split("_", 1)[1] for m in models})[0] if models else None
        if r["heldout_sources"]:
            c = models.get(f"c_{first}") or {}
            for src in r["heldout_sources"]:
                add(lever, f"specificity {src}", seed, run,
                    (c.get("specificity_by_source", {}).get(src) or {}).get("value"))
                add(lever, f"AUC {src} vs COVID-19", seed, run, c.get("auc_by_source", {}).get(src))
            add(lever, "covid sensitivity (worst held-out run)", seed, run, c.get("sensitivity"))
            add(lever, "lungs-removed", seed, run, r["lungs_removed"].get(first))
        else:
            for model, m in models.items():
                if model.endswith(f"_{first}"):
                    add(lever, f"{run} AUC {model.split('_')[0]}", seed, run, m["test_auc"])
    table: dict = {}
    feeding_runs: dict[str, dict[str, list[str]]] = {}
    for lever, columns in sorted(per.items()):  # in the order a record's JSON keeps them
        table[lever], feeding_runs[lever] = {}, {}
        for column, by_seed in sorted(columns.items()):
            if column.startswith("covid sensitivity"):
                reduce = min
            elif column == "wall_minutes":
                reduce = sum
            else:
                reduce = np.mean
            feeding = set().union(*by_seed.values())
            counted = {seed: float(reduce(list(vs.values()))) for seed, vs in by_seed.items()
                       if set(vs) == feeding and all(_finite(v) for v in vs.values())}
            seeds = sorted(counted, key=str)
            stats = _stats([counted[s] for s in seeds])
            machines = _machines(machine[lever, seed, run] for seed in seeds for run in by_seed[seed])
            table[lever][column] = stats and {**stats, "seeds": seeds, "values": [counted[s] for s in seeds],
                                              "machines": machines}
            feeding_runs[lever][column] = [named[lever, seed, run] for seed in seeds for run in by_seed[seed]]
    return table, feeding_runs


def run_machine(r: dict) -> str | None:
    """The machine one run's figures come from: its CPU model, with the kernels TensorFlow ran when portable ones
    (``bench.machine``: trained weights differ between machines and kernels); None where the run did not record it
    (ablation runs before 2026-12-07)."""
    if not r.get("cpu"):
        return None
    return r["cpu"] + (" (portable kernels)" if r.get("cpu_kernels") == "portable" else "")


def _machines(labels: object) -> list[str | None]:
    """Distinct machines, known ones sorted, then None (unknown) if any run did not record its own."""
    found = set(labels)
    return sorted(m for m in found if m is not None) + ([None] if None in found else [])


def _ablation_cell(s: dict, base: dict | None, n_seeds: int, marks: str = "") -> str:
    """One lever's figure: mean ± sd, its n when below the footer's ``n_seeds`` (no sd under two seeds), and the
    change from the reference's ``base`` over the seeds both measured (their count when below ``n_seeds``), marked †
    unless both levers' runs of the column ran on one and the same recorded machine. ``marks``: the profile marks of
    :func:`_ablation_rows`, § (the cell's runs mix profiles) after the figure, ‡ (the change is between profiles)
    after the change."""
    cell = f"{s['mean']:.3f}" if s.get("sd") is None else f"{s['mean']:.3f} ± {s['sd']:.3f}"
    if s["n"] < n_seeds:
        cell += f" (n={s['n']})"
    cell += "§" if "§" in marks else ""
    if base is None:
        return cell
    mine, theirs = dict(zip(map(str, s["seeds"]), s["values"])), dict(zip(map(str, base["seeds"]), base["values"]))
    shared = [seed for seed in mine if seed in theirs]
    if not shared:
        return cell + " (no seed shared)"
    delta = float(np.mean([mine[seed] - theirs[seed] for seed in shared]))
    machines = {*s.get("machines", [None]), *base.get("machines", [None])}
    mixed = ("" if len(machines) == 1 and None not in machines else "†") + ("‡" if "‡" in marks else "")
    return cell + (f" ({delta:+.3f}{mixed})" if len(shared) >= n_seeds
                   else f" ({delta:+.3f}{mixed} over n={len(shared)})")


#: A key a run's params do not set: it took the workdir's params.yaml of its time, which the record does not keep.
UNSET = "not set"


def _ablation_keys(result: dict, overlay: dict) -> tuple[dict[str, set[str]], set[str]]:
    """The keys each lever sets (the record's ``levers``, else the overlay's), and the keys that are no lever's
    profile whatever the lever: each run's own (the overlay's ``runs``; without the overlay, the keys that differ
    between runs of one lever and seed) and the seed's (``seed_keys``)."""
    levers = {k: set(v or {}) for k, v in {**(overlay.get("levers") or {}), **(result.get("levers") or {})}.items()}
    run_keys = {k for run in (overlay.get("runs") or {}).values() for k in ((run or {}).get("params") or {})}
    if not overlay:
        groups: dict[tuple[str, str], list[dict]] = {}
        for r in result["runs"].values():
            if r.get("params") is not None:
                groups.setdefault((r["lever"], str(r.get("seed"))), []).append(r)
        run_keys = {k for rs in groups.values() for a in rs for b in rs if a["run"] != b["run"]
                    for k in _differing(a["params"], b["params"])}
    return levers, run_keys | set(overlay.get("seed_keys") or SEED_KEYS)


def _differing(a: dict, b: dict) -> set[str]:
    """The keys two params mappings set differently (a key one sets and the other does not included)."""
    return {k for k in {*a, *b} if k not in a or k not in b or _canonical(a[k]) != _canonical(b[k])}


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def run_profile(r: dict, drop: set[str]) -> str | None:
    """An ablation run's profile: its recorded params but the keys in ``drop`` (the compared levers' own, its run's
    and its seed's), as canonical JSON: what else its figures were made under (the upstream stages' settings, the
    overlay's params of the time); None for a run that recorded no params."""
    params = r.get("params")
    return None if params is None else _canonical({k: v for k, v in params.items() if k not in drop})


def _profile_values(runs: list[dict], drop: set[str]) -> dict[str, set[str]]:
    """Per key of the runs' profiles, the values they set it to (:data:`UNSET` where a run does not set it)."""
    known = [r["params"] for r in runs if r.get("params") is not None]
    keys = {k for params in known for k in params if k not in drop}
    return {k: {_canonical(params[k]) if k in params else UNSET for params in known} for k in sorted(keys)}


def _profile_marks(result: dict, feeding: dict[str, dict[str, list[str]]], reference: str, overlay: dict) -> tuple[
        dict[tuple[str, str], str], list[str]]:
    """Per (lever, column), its cell's profile marks: § where the cell's own runs ran under more than one profile
    (:func:`run_profile`), ‡ where its change from ``reference`` is between runs of differing profiles, or of runs
    whose params were not recorded; and the legend lines that say, lever by lever, which keys differ in those cells'
    runs and how."""
    runs = result["runs"]
    levers, fixed = _ablation_keys(result, overlay)
    marks: dict[tuple[str, str], str] = {}
    # lever -> (its runs, the reference's runs) of the cells marked ‡, and its runs of the cells marked §
    apart: dict[str, tuple[set[str], set[str]]] = {}
    mixed: dict[str, set[str]] = {}
    for lever, columns in feeding.items():
        own = fixed | levers.get(lever, set())
        pair = own | levers.get(reference, set())
        for column, names in columns.items():
            if not names:  # a null cell: nothing counted, nothing compared
                continue
            mark = ""
            profiles = {run_profile(runs[n], own) for n in names}
            if len(profiles) > 1:
                mark += "§"
                mixed.setdefault(lever, set()).update(names)
            theirs = feeding.get(reference, {}).get(column) or []
            if lever != reference and column != "wall_minutes" and theirs:
                mine_p = {run_profile(runs[n], pair) for n in names}
                theirs_p = {run_profile(runs[n], pair) for n in theirs}
                if None in mine_p or None in theirs_p or mine_p != theirs_p:
                    mark += "‡"
                    pairs = apart.setdefault(lever, (set(), set()))
                    pairs[0].update(names)
                    pairs[1].update(theirs)
            marks[lever, column] = mark
    legend = []
    for lever in feeding:
        parts = []
        if lever in apart:
            mine, theirs = ([runs[n] for n in sorted(names)] for names in apart[lever])
            unrecorded = sum(r.get("params") is None for r in mine + theirs)
            if unrecorded:
                parts.append(f"{unrecorded} of the runs compared recorded no params (their profile unknown)")
            pair = fixed | levers.get(lever, set()) | levers.get(reference, set())
            a, b = _profile_values(mine, pair), _profile_values(theirs, pair)
            parts += [f"`{k}` {_values(a.get(k, {UNSET}))} against {_values(b.get(k, {UNSET}))}"
                      for k in sorted({*a, *b}) if a.get(k, {UNSET}) != b.get(k, {UNSET})]
        if lever in mixed:
            values = _profile_values([runs[n] for n in sorted(mixed[lever])], fixed | levers.get(lever, set()))
            unrecorded = sum(runs[n].get("params") is None for n in mixed[lever])
            parts.append("its own runs (§) set " + "; ".join(
                [f"`{k}` to {_values(v, ' or ')}" for k, v in values.items() if len(v) > 1]
                + ([f"unknown params in {unrecorded} runs"] if unrecorded else [])))
        if parts:
            legend.append(f"- `{lever}`: " + "; ".join(parts))
    return marks, legend


def _values(values: set[str], sep: str = ", ") -> str:
    return sep.join(sorted(values, key=lambda v: (v == UNSET, v)))


def _lever_params(result: dict, overlay: dict) -> list[str]:
    """Each lever's own params as its recorded runs set them (the overlay may define the lever otherwise today)."""
    levers, _ = _ablation_keys(result, overlay)
    lines = []
    for lever in sorted({r["lever"] for r in result["runs"].values()}):
        keys = levers.get(lever, set())
        runs = [r for r in result["runs"].values() if r["lever"] == lever]
        counts: dict[str, int] = {}
        for r in runs:
            if r.get("params") is not None:
                text = _canonical({k: r["params"].get(k, UNSET) for k in sorted(keys)})
                counts[text] = counts.get(text, 0) + 1
        missing = sum(r.get("params") is None for r in runs)
        if not counts:
            text = f"not recorded (none of its {len(runs)} runs recorded its params)"
        elif not keys:
            text = "no params of its own (its runs' profile)"
        elif len(counts) == 1:
            text = next(iter(counts))
        else:
            text = "; ".join(f"{v} ({n} runs)" for v, n in counts.items())
        if missing and counts:
            text += f" ({missing} of its runs recorded no params)"
        now = (overlay.get("levers") or {}).get(lever)
        if lever in (overlay.get("levers") or {}) and keys and set(counts) != {_canonical(now or {})}:
            text += f"; the overlay defines it now as {_canonical(now or {})}"
        lines.append(f"- `{lever}`: {text}")
    return lines


def _planned_today(result: dict, overlay: dict) -> str | None:
    """How many recorded runs have the params the overlay would plan for them today (None without the overlay)."""
    if not overlay:
        return None
    try:
        plan = {step["name"]: step["params"] for step in ablation_plan(result["experiment"], overlay)}
    except ExperimentError:
        return None
    same = sum(_canonical(r.get("params")) == _canonical(plan.get(name)) for name, r in result["runs"].items())
    return (f"{same} of the {len(result['runs'])} recorded runs have the params the overlay plans for them today "
            "(the others ran under earlier versions of it).")


def _ablation_rows(result: dict, overlay: dict | None = None) -> list[str]:
    """The ablation's table and legends; ``overlay``: its overlay as loaded once by the caller (default
    :func:`_current`)."""
    overlay = _current(result.get("experiment")) if overlay is None else overlay
    table, feeding = _ablation_table(result["runs"])  # from the runs: a record made before a rule changed shows it
    columns = list(dict.fromkeys(c for lever in table.values() for c in lever))
    columns = [c for c in columns if c != "wall_minutes"] + ["wall_minutes"]
    # the lever the others are compared with: the record's `reference`, else the overlay's, else baseline
    reference = result.get("reference") or overlay.get("reference") or BASELINE
    base = table.get(reference, {})
    marks, legend = _profile_marks(result, feeding, reference, overlay)
    seeds = sorted({r.get("seed") for r in result["runs"].values()}, key=str)
    ran_on: dict[str, list[str | None]] = {}
    for r in result["runs"].values():
        ran_on.setdefault(r["lever"], []).append(run_machine(r))
    known = _machines(m for ms in ran_on.values() for m in ms)
    names = {m: "unknown" if m is None else f"M{i}" for i, m in enumerate(known, start=1)}
    rows = ["| lever | " + " | ".join(columns) + " | machines (runs) |", "|---|" + "---|" * (len(columns) + 1)]
    for lever, figures in table.items():
        cells = []
        for column in columns:
            s = figures.get(column)
            if s is None:
                cells.append("null")
                continue
            compare = lever != reference and column != "wall_minutes" and base.get(column) is not None
            cells.append(_ablation_cell(s, base.get(column) if compare else None, len(seeds),
                                        marks.get((lever, column), "")))
        machines = ", ".join(f"{names[m]} ({ran_on[lever].count(m)})" for m in _machines(ran_on[lever]))
        rows.append(f"| {lever} | " + " | ".join(cells) + f" | {machines} |")
    rows += ["", f"Mean ± sd over seeds {seeds} (in brackets: the change from `{reference}`, the mean of the "
             "per-seed differences over the seeds both levers measured). A cell over fewer seeds says its n, and one "
             "seed gives no sd; a seed counts in a cell only when every run of the column measured it (lungs-removed "
             "is undefined in a run whose model c has a test AUC under the audit's min_c_auc); a change over fewer "
             "shared seeds says its n. † marks a change between runs of different machines, or of a machine not "
             "recorded: trained weights differ from one CPU (and its TensorFlow kernels) to another, so the change "
             "may be the machine's rather than the lever's. Machines: "
             + "; ".join(f"{names[m]} {'not recorded (runs before the runner recorded it)' if m is None else m}"
                         for m in known) + ". ‡ marks a change between runs of different profiles (a run's profile: "
             "its recorded params but the two levers' own keys, its run's and its seed's: the upstream stages' "
             "settings and the overlay's params of its time), or of runs that recorded no params: the change may be "
             "the profile's rather than the lever's. § marks a cell whose own runs were made under more than one "
             "profile. Held-out runs: the "
             "source is not in train/val; its specificity is at the operating threshold chosen on validation "
             "(sensitivity >= min_sensitivity), with the COVID-19 sensitivity on the other sources' test patients "
             "of the same model."]
    if legend:
        rows += ["", f"What differs, lever by lever (its runs' values against `{reference}`'s in the cells marked; "
                 f"`{UNSET}`: the workdir's params.yaml of the time, which the record does not keep):", "", *legend]
    today = _planned_today(result, overlay)
    rows += ["", *([today, ""] if today else []), "Levers, as their recorded runs set them:", "",
             *_lever_params(result, overlay)]
    if result.get("goals"):
        rows += ["", f"Goals: {result['goals'].strip()}"]
    return rows


COLLECTORS = {"classifier": collect_classifier, "segmentation": collect_segmentation, "projection": collect_projection,
              ABLATION: collect_ablation}


SETTINGS = ("cache.size", "train_projection.size", "train_projection.epochs", "train_projection.lr",
            "train_projection.width", "train_unet.epochs", "train_unet.f0", "train_classifier.epochs",
            "train_classifier.width", "train_classifier.variants", "train_classifier.backbones",
            "train_projection.precision", "train_unet.precision", "train_classifier.precision")


def _settings(params: dict, effective: dict) -> dict:
    """The size/epochs/width/precision figures a reader compares runs by: the overlay's, else the params.yaml
    ``effective``."""
    def value(key: str) -> object:
        section, _, leaf = key.partition(".")
        return params[key] if key in params else (effective.get(section) or {}).get(leaf)

    return {k: value(k) for k in SETTINGS}


#: A record's runs whose dvc command it does not hold, and why (:func:`record` says so rather than leave nothing).
MISSING_COMMANDS = "dvc_commands_missing"


def _command_name(command: str) -> str:
    """The DVC experiment name of a recorded `dvc exp run -n NAME ...` command."""
    words = shlex.split(command)
    return words[words.index("-n") + 1]


def _missing_commands(result: dict) -> dict | None:
    """The runs of a record that lists its dvc commands but not theirs: lost, and cannot be made again."""
    if "dvc_commands" not in result:
        return None
    recorded = {_command_name(c) for c in result["dvc_commands"]}
    names = [n for n in [*(result.get("runs") or {}), *(result.get("heldout_runs") or {})] if n not in recorded]
    return {"runs": names, "why": "until 2026-12-07 17:00 `--resume` dropped the commands of the runs it "
            "kept, and a run renamed in the record keeps none; they cannot be recovered, but each run's params are "
            "recorded with its figures"} if names else None


def record(project: Path, name: str, result: dict) -> None:
    """reports/experiments/<name>.json, and the entry of bench/experiments.json (the other entries are kept). A run
    whose dvc command the record does not hold is named in ``dvc_commands_missing``."""
    missing = _missing_commands(result)
    result = {k: v for k, v in result.items() if k != MISSING_COMMANDS} | ({MISSING_COMMANDS: missing} if missing
                                                                           else {})
    _common.write_json(project / REPORTS / f"{name}.json", result)
    bench_path = project / BENCH
    bench = json.loads(bench_path.read_text(encoding="utf-8")) if bench_path.is_file() else {}
    bench[name] = {k: result.get(k) for k in ("command", "settings", "wall_seconds", "finished", "machine", "headline")}
    _common.write_json(bench_path, bench)


def _machine(result: dict) -> str:
    """The cores a record's wall time was measured on (records before 2026-12-07 did not say which CPU)."""
    m = result.get("machine")
    return f"{m['cpus']} cores of {m['cpu']}" if m else "2 shared CPU cores (CPU not recorded)"


def _machines_summary(results: list[dict]) -> str:
    """The machines the records name, for the summary's header."""
    named = sorted({_machine(r) for r in results if r.get("machine")})
    unnamed = sum(not r.get("machine") for r in results)
    parts = named + ([f"{unnamed} records from before 2026-12-07 name none"] if unnamed else [])
    return "; ".join(parts) or "no record"


def _wall(r: dict, where: str = "") -> str:
    """A record's wall time, then ``where`` (its machine): an ablation's last invocation, with the sum of its runs'
    after (each invocation records its own runs, maybe on another machine); a run's stage reused from an earlier one
    (:func:`stage_reused`) said so."""
    wall = f"{r['wall_seconds'] / 60:.1f} min"
    runs = r["runs"].values()
    if r["kind"] == ABLATION:
        total = sum(run.get("wall_seconds") or 0.0 for run in runs)
        return f"{wall} (the last invocation){where}; its {len(r['runs'])} runs {total / 60:.1f} min in all"
    reused = [run["train_seconds"] for run in runs if stage_reused(run, r["wall_seconds"])]
    if reused:
        some = "" if len(reused) == len(r["runs"]) else f" in {len(reused)} of {len(r['runs'])} runs"
        wall += f" (stage reused{some}; its training took {sum(reused) / 60:.1f} min)"
    return wall + where


def _fmt(value: object, ci: dict | None = None) -> str:
    if value is None:
        return "null"
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    if ci and ci.get("low") is not None:
        text += f" [{ci['low']:.3f}, {ci['high']:.3f}]"
    return text


def _classifier_rows(result: dict) -> list[str]:
    header = ["| run | model | test n (covid/neg) | test AUC [95% CI] | sensitivity | specificity | calibrated score "
              "at 0.5: acc / sens / spec / F1 | refused as OOD |", "|---|---|---|---|---|---|---|---|"]
    held = result.get("heldout_runs") or {}
    if not held:
        return header + _model_rows(result["runs"])
    # the same settings trained without a source: where choosing happens, and the test rows the card shows
    return ["Trained on every source (`runs`):", "", *header, *_model_rows(result["runs"]), "",
            "The same settings trained without a source, tested on it (`heldout`; the out-of-distribution detector's "
            "refused share on an unseen source beside the in-distribution test's above):", "", *header,
            *_model_rows(held), *_heldout_summary_rows(result["runs"]), *_heldout_upstream_rows(held)]


def _filter_recalls(by_source: dict) -> dict:
    """The projection filter's recalls pooled over sources (``train_projection``'s per-source counts): frontals
    kept, laterals refused (null without that class), and the frontals it refused (usable images lost)."""
    n_frontal = sum(int(v["n_frontal"]) for v in by_source.values())
    n_lateral = sum(int(v["n_lateral"]) for v in by_source.values())
    refused = sum(int(v["frontal_refused"]) for v in by_source.values())
    laterals_refused = sum(int(v["lateral_refused"]) if "lateral_refused" in v  # records before 2026-12-06: none
                           else round(v["lateral_recall"] * v["n_lateral"])
                           for v in by_source.values() if v["n_lateral"])
    return {"n_frontal": n_frontal, "n_lateral": n_lateral, "frontal_refused": refused,
            "frontal_recall": 1.0 - refused / n_frontal if n_frontal else None,
            "lateral_recall": laterals_refused / n_lateral if n_lateral else None}


def _heldout_upstream_rows(held: dict) -> list[str]:
    """The U-Net's Dice on each held-out run's masks, and the projection filter's recall on its images, neither of
    which they ever trained on (one U-Net and one filter for every seed of a run: the seeds are the classifier's)."""
    rows, filters = {}, {}
    for exp_name, r in held.items():
        run = re.sub(r"-s\d+$", "", exp_name)
        if r.get("unet_external"):
            rows.setdefault(run, r["unet_external"])
        if r.get("projection_external"):
            filters.setdefault(run, r["projection_external"])
    out = []
    if rows:
        out += ["", "The U-Net of each held-out run on the held-out masks (never trained or selected on them): Dice "
                "of its thresholded output, and of the cleaned masks the lung crop and variants d and e use.", "",
                "| run | masks | Dice | IoU | Dice (cleaned) |", "|---|---|---|---|---|",
                *(f"| {name} | {v['n']} | {_fmt(v['dice'])} | {_fmt(v['iou'])} | {_fmt(v.get('dice_clean'))} |"
                  for name, v in rows.items())]
    if filters:
        out += ["", "The projection filter of each held-out run on the held-out images (never trained or selected "
                "on them): frontals kept, laterals refused, and the frontals it refused (usable images lost).", "",
                "| run | frontals | frontal recall | laterals | lateral recall | frontals refused |",
                "|---|---|---|---|---|---|",
                *(f"| {name} | {v['n_frontal']} | {_fmt(v['frontal_recall'])} | {v['n_lateral']} | "
                  f"{_fmt(v['lateral_recall'])} | {v['frontal_refused']} |" for name, v in filters.items())]
    return out


def _heldout_summary_rows(runs: dict) -> list[str]:
    """The held-out figures a main run chose by, over the held-out runs' seeds: mean ± sd (range)."""
    out = []
    for exp_name, r in runs.items():
        figures = r.get("heldout") or {}
        if (figures.get("seeds") or 1) < 2:
            continue
        # records since evaluate counted the films refused before scoring say why; the older ones refused OOD only
        before = any("refused_before" in row for by_model in figures["sources"].values() for row in by_model.values())
        refused = ("negatives refused (lateral view, lung mask or OOD) | test films refused before scoring (lateral "
                   "view, lung mask) | test films refused as OOD" if before else "negatives refused (OOD)")
        keys = ("specificity", "auc", "sensitivity", "called_covid", "refused",
                *(("refused_before", "refused_ood") if before else ()), "detected")
        out += ["", f"What `{exp_name}` chose by ({figures['figure']}): per held-out run and classifier, mean ± sd "
                "(min to max) over seeds; chosen by the worst mean of the runs used to choose.", "",
                "| held out | role | classifier | specificity | ROC AUC | sensitivity | negatives called COVID-19 by "
                f"serving | {refused} | COVID-19 called COVID-19 by serving | seeds |",
                "|---|---|---|" + "---|" * (len(keys) + 1)]
        for label, by_model in figures["sources"].items():
            for model, row in by_model.items():
                role = "used to choose" if row["used_to_choose"] else "test"
                cells = [_spread(row, k) for k in keys]
                out.append(f"| {label} | {role} | {model} | {' | '.join(cells)} | {row.get('n_seeds', 1)} |")
        out += _site_tables(figures["sources"])
    return out


def _site_tables(sources: dict) -> list[str]:
    """The held-out rows' site figures as tables: the site's own threshold against the model's on the films serving
    answers (:data:`SITE`), and, where measured, the same with the site's films admitted (:data:`ADMISSION`)."""
    out: list[str] = []
    for (_, prefix, _), intro, columns in (
        (SITE, "against the model's threshold on the same films (films refused before scoring, a lateral view or a "
         "failed lung mask, or as out of distribution left out)",
         ("specificity", "sensitivity", "model_specificity", "model_sensitivity")),
        (ADMISSION, "with the site's films also admitted past the out-of-distribution check (its OOD threshold the "
         "highest OOD score of the drawn films, never below the model's; every drawn film chooses), against what "
         "serving answers without either (the model's thresholds); refused: the share of the other films above each "
         "OOD threshold", ("specificity", "sensitivity", "refused", "model_specificity", "model_sensitivity",
                           "model_refused")),
    ):
        sited = [(label, model, row) for label, by_model in sources.items() for model, row in by_model.items()
                 if row.get(f"{prefix}specificity") is not None or row.get(f"{prefix}skipped")]
        if not sited:
            continue
        n = next((row[f"{prefix}n_per_class"] for _, _, row in sited if row.get(f"{prefix}n_per_class")), "n")
        unit = next((row[f"{prefix}unit"] for _, _, row in sited if row.get(f"{prefix}unit")), "films")
        promised = next((row[f"{prefix}promised_sensitivity"] for _, _, row in sited
                         if row.get(f"{prefix}promised_sensitivity") is not None), None)
        rule = "the model's own rule" if promised is None else (
            f"the model's own rule, its sensitivity target kept on the site's next films (promised {promised:.3f})")
        at_site, as_served = (("site threshold", "model's threshold") if prefix == SITE[1]
                              else ("site's thresholds", "served as is"))
        names = [f"{c.removeprefix('model_')}, {as_served if c.startswith('model_') else at_site}" for c in columns]
        drawn = ("films of the held-out run's test, drawn at random, and the other patients' films called with it (a "
                 "drawn film's patient's other films are not tested)" if unit == "films" else
                 "patients of the held-out run's test, drawn at random, every film of theirs choosing and each patient "
                 "counted once by the rule, and the other patients' films called with it")
        out += ["", f"A threshold chosen at the site ({rule} on {n} COVID-19 and {n} negative {drawn}; mean over the "
                "draws, then mean ± sd "
                f"(min to max) over seeds) {intro}:", "",
                f"| held out | classifier | {' | '.join(names)} |", "|---|---|" + "---|" * len(columns)]
        for label, model, row in sited:
            cells = ([f"not measured: {row[f'{prefix}skipped']}", *[""] * (len(columns) - 1)]
                     if row.get(f"{prefix}skipped") else [_spread(row, f"{prefix}{k}") for k in columns])
            out.append(f"| {label} | {model} | {' | '.join(cells)} |")
    return out


def _spread(row: dict, key: str) -> str:
    if row.get(key) is None:
        return "null"
    if row.get(f"{key}_sd") is None:
        return f"{row[key]:.3f}"
    return f"{row[key]:.3f} ± {row[key + '_sd']:.3f} ({row[key + '_min']:.3f} to {row[key + '_max']:.3f})"


def _model_rows(runs: dict) -> list[str]:
    """One table row per model of every run."""
    rows = []
    for exp_name, r in runs.items():
        for model, m in r["models"].items():
            c, a = m["test_classes"], m["test_at_0.5"]
            rows.append(f"| {exp_name} | {model} | {c['covid']}/{c['negative']} | "
                        f"{_fmt(m['test_auc']['value'], m['test_auc'])} | "
                        f"{_fmt(m['test_sensitivity']['value'], m['test_sensitivity'])} | "
                        f"{_fmt(m['test_specificity']['value'], m['test_specificity'])} | "
                        f"{_fmt(a['accuracy'])} / {_fmt(a['sensitivity'])} / {_fmt(a['specificity'])} / "
                        f"{_fmt(a.get('f1'))} | {_fmt(m.get('test_ood_refused'))} |")
    return rows


def _segmentation_rows(result: dict) -> list[str]:
    rows = ["| data | n | Dice | IoU | authors' per-pixel Dice |", "|---|---|---|---|---|"]
    for r in result["runs"].values():
        parts = [("internal test (all)", r["internal_test"])]
        parts += [(f"internal test: {k}", v) for k, v in r["internal_test"].get("by_source", {}).items()]
        parts += [("internal val", r["internal_val"])]
        if r["external"]:
            parts += [("external: cohen (V7 masks)", r["external"])]
        rows += [f"| {n} | {v['n']} | {_fmt(v['dice'])} | {_fmt(v['iou'])} | {_fmt(v['paper_pixel_dice'])} |"
                 for n, v in parts]
    return rows


def _projection_rows(result: dict) -> list[str]:
    rows = ["| run | split | n | accuracy | frontal accuracy | lateral accuracy |", "|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        for split in ("train", "val", "test"):
            m = r["metrics"][split]
            lateral = r["split_counts"][split].get("lateral", 0)
            rows.append(f"| {name} | {split} | {m['n']} ({lateral} lateral) | {_fmt(m['accuracy'])} | "
                        f"{_fmt(m['frontal_accuracy'])} | {_fmt(m['lateral_accuracy'])} |")
    for split, what in (("test", "test source"), ("external", "held-out source (never trained on)")):
        per_source = [(name, src, v) for name, r in result["runs"].items()
                      for src, v in ((r["metrics"].get(split) or {}).get("by_source") or {}).items()]
        if per_source:
            rows += ["", f"| run | {what} | frontals (refused) | frontal recall | laterals | lateral recall |",
                     "|---|---|---|---|---|---|"]
            rows += [f"| {name} | {src} | {v['n_frontal']} ({v['frontal_refused']}) | {_fmt(v['frontal_recall'])} | "
                     f"{v['n_lateral']} | {_fmt(v['lateral_recall'])} |" for name, src, v in per_source]
    return rows


def _short(r: dict) -> str:
    """One table cell of an experiment's headline figures."""
    h = r["headline"]
    if r["kind"] == ABLATION:
        return f"{len(h)} levers x {len({x['run'] for x in r['runs'].values()})} runs: see its table"
    seeds = {k: v for k, v in h.items() if k.endswith(" over seeds")}
    if r["kind"] == "classifier" and seeds:
        def spread(v: dict, name: str) -> str:
            x = v.get(name)
            return f"{x['mean']:.3f} ± {x['sd']:.3f}" if x else "null"

        return "; ".join(f"{k.removesuffix(' over seeds').removeprefix(r['experiment'] + '-')}: "
                         + (f"AUC {spread(v, 'test_auc')}" if v.get("test_auc")
                            else f"specificity {spread(v, 'test_specificity')}")
                         + f" ({next(iter(v.values()))['n']} seeds)" for k, v in seeds.items())
    if r["kind"] == "classifier":
        return "; ".join(f"{k.split('/')[-1] if len(r['runs']) == 1 else k.removeprefix(r['experiment'] + '-')}: "
                         + (f"AUC {_fmt(v['test_auc'])}" if v["test_auc"] is not None
                            else f"specificity {_fmt(v['test_specificity'])}") for k, v in h.items())
    if seeds:  # segmentation or projection over seeds: mean (minimum)
        v = next(iter(seeds.values()))

        def mean_min(name: str) -> str:
            x = v.get(name)
            return f"{x['mean']:.3f} (min {x['min']:.3f})" if x else "null"

        n = next(iter(v.values()))["n"] if v else 0
        if r["kind"] == "segmentation":
            sources = ", ".join(f"{k.removeprefix('test_dice_')} {mean_min(k)}"
                                for k in v if k.startswith("test_dice_"))
            return (f"Dice internal {mean_min('internal_test_dice')}" + (f" ({sources})" if sources else "")
                    + f", external (Cohen) {mean_min('external_dice')} over {n} seeds")
        if any(x.get("unseen_frontal_recall") for x in seeds.values()):  # held-out sources: each run's own
            def of(x: dict, name: str) -> str:
                return f"{x[name]['mean']:.3f} (min {x[name]['min']:.3f})" if x.get(name) else "null"

            return "; ".join(f"{k.removesuffix(' over seeds').removeprefix(r['experiment'] + '-')}: frontal recall "
                             f"on the held-out source {of(x, 'unseen_frontal_recall')}, worst test source's "
                             f"{of(x, 'worst_source_frontal_recall')}" for k, x in seeds.items()) + f" over {n} seeds"
        return (f"accuracy {mean_min('accuracy')}; worst source: frontal recall "
                f"{mean_min('worst_source_frontal_recall')}, lateral recall {mean_min('worst_source_lateral_recall')}"
                f" over {n} seeds")
    if r["kind"] == "segmentation":
        v = next(iter(h.values()))
        return f"Dice internal {_fmt(v['internal_test_dice'])}, external (Cohen) {_fmt(v['external_dice'])}"
    v = next(iter(h.values()))
    return (f"accuracy {_fmt(v['accuracy'])} (frontal {_fmt(v['frontal_accuracy'])}, "
            f"lateral {_fmt(v['lateral_accuracy'])})")


def refresh(project: Path = PROJECT) -> None:
    """Recompute the headline of every recorded experiment (bench/experiments.json) and the summary README."""
    for path in sorted((project / REPORTS).glob("*.json")):
        r = json.loads(path.read_text(encoding="utf-8"))
        r["headline"] = headline(r["kind"], r["runs"])
        record(project, r["experiment"], r)
    render_summary(project)


def render_summary(project: Path = PROJECT, loaded: dict[str, dict] | None = None) -> Path:
    """reports/experiments/README.md: where the goals stand (experiments/_goals.md), then every recorded experiment's
    command, settings, wall time, figures and notes. Each record's overlay is read once (:func:`_current`), unless
    ``loaded`` holds it (by name: a run's own, as the run read it)."""
    results = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((project / REPORTS).glob("*.json"))]
    overlays = {r["experiment"]: (loaded or {}).get(r["experiment"]) or _current(r["experiment"]) for r in results}
    lines = ["# Experiments on the real chest X-ray corpus", "",
             "Written by `python -m pipelines.experiment` from the JSON files beside it (do not edit by hand: edit "
             "the overlay's `notes` in `experiments/`). Development figures: the corpus is a downscaled subset "
             "(about one patient in five held back), and the models are CPU-sized (no ImageNet weights). Wall times "
             f"are each record's, on the machine it names ({_machines_summary(results)}; whether other work shared "
             "it, the record's notes say); the experiments share ingest, cache and U-Net through DVC's run cache, so "
             "the first one run in a fresh workdir also computes those, and a later one may reuse a stage another "
             "trained (the wall time then says so); each selection trains its own projection filter (its split puts "
             "the selection's covid test patients in its test split).", ""]
    goals = Path(project) / "experiments" / GOALS
    if goals.is_file():  # the issue's goals: where each stands, what moved it, what next (written by hand)
        lines += [goals.read_text(encoding="utf-8").strip(), ""]
    render = {"classifier": _classifier_rows, "segmentation": _segmentation_rows, "projection": _projection_rows}
    lines += ["| experiment | command | working size / epochs | wall time | ours (test) | paper |",
              "|---|---|---|---|---|---|"]
    for r in results:
        st = r["settings"]
        filter_px = f" (projection filter {st['train_projection.size']} px)" if st.get("train_projection.size") else ""
        size = (f"{st.get('cache.size')} px{filter_px}; epochs: projection {st.get('train_projection.epochs')}, U-Net "
                f"{st.get('train_unet.epochs')}, classifier {st.get('train_classifier.epochs')}")
        if r["kind"] == ABLATION:  # its runs' own settings differ (the profiles under its table)
            size = f"the last run's: {size}"
        paper = overlays[r["experiment"]].get("paper_headline", "")
        lines.append(f"| {r['experiment']} | `{r['command']}` | {size} | {_wall(r)} | "
                     f"{_short(r)} | {paper or 'none'} |")
    lines.append("")
    for r in results:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        # the overlay's current description (corrected since, maybe), and the record's own where it differs
        description = r["description"].strip()
        now = (overlays[r["experiment"]].get("description") or "").strip()
        if now and now != description:
            description = f"{now}\n\n(The description this record was made under, superseded: {description})"
        what = (" (the last run's: the workdir's params.yaml after it, under the overlay's params; the runs' own "
                "differ: see under the table)" if r["kind"] == ABLATION else "")
        lines += [f"## {r['experiment']}", "", description, "",
                  f"- command: `{r['command']}`", f"- settings{what}: {settings}",
                  "- wall time: " + _wall(r, f" on {_machine(r)} (finished {r['finished']})")]
        missing = r.get(MISSING_COMMANDS)
        if missing:
            lines.append(f"- dvc commands not recorded for {len(missing['runs'])} runs ({missing['why']}): "
                         + ", ".join(missing["runs"]))
        lines += [f"- train_seconds ({name}): {_fmt(run['train_seconds'])}"
                  + (" (reused from an earlier run)" if stage_reused(run, r["wall_seconds"]) else "")
                  for name, run in r["runs"].items() if run.get("train_seconds") is not None]
        rows = _ablation_rows(r, overlays[r["experiment"]]) if r["kind"] == ABLATION else render[r["kind"]](r)
        lines += ["", *rows, ""]
        if r.get("paper"):
            lines += ["Paper: `" + json.dumps(r["paper"], sort_keys=True) + "`", ""]
        # the overlay's current notes (written after reading the figures), else the record's
        notes = overlays[r["experiment"]].get("notes") or r.get("notes")
        if notes:
            lines += [notes.strip(), ""]
    out = project / REPORTS / "README.md"
    _common.write_with(out, lambda tmp: tmp.write_text("\n".join(lines), encoding="utf-8"))
    return out


def headline(kind: str, runs_out: dict) -> dict:
    """The few numbers to compare run to run."""
    if kind == ABLATION:
        return ablation_table(runs_out)
    out: dict = {}
    for exp_name, r in runs_out.items():
        if kind == "classifier":
            for model, m in r["models"].items():
                out[f"{exp_name}/{model}"] = {
                    "test_auc": m["test_auc"]["value"], "test_auc_ci": [m["test_auc"]["low"], m["test_auc"]["high"]],
                    "test_sensitivity": m["test_sensitivity"]["value"],
                    "test_specificity": m["test_specificity"]["value"],
                    "test_ood_refused": m.get("test_ood_refused")}
        elif kind == "segmentation":
            ext = r["external"] or {}
            out[exp_name] = {"internal_test_dice": r["internal_test"]["dice"],
                             "internal_test_iou": r["internal_test"]["iou"],
                             "external_dice": ext.get("dice"), "external_iou": ext.get("iou")}
            if "dice_clean" in r["internal_test"]:  # the masks segment and serving use
                out[exp_name].update(internal_test_dice_clean=r["internal_test"]["dice_clean"],
                                     external_dice_clean=ext.get("dice_clean"))
            for source, v in sorted((r["internal_test"].get("by_source") or {}).items()):  # the goal is per source
                out[exp_name][f"test_dice_{source}"] = v["dice"]
        else:
            test = r["metrics"]["test"]
            out[exp_name] = {k: test[k] for k in ("accuracy", "frontal_accuracy", "lateral_accuracy")}
            by_source = test.get("by_source") or {}
            for cls in ("frontal", "lateral"):  # the goal holds on every source: its worst one
                recalls = [v[f"{cls}_recall"] for v in by_source.values() if v.get(f"{cls}_recall") is not None]
                if recalls:
                    out[exp_name][f"worst_source_{cls}_recall"] = min(recalls)
            if by_source:
                out[exp_name]["frontal_refused"] = sum(v["frontal_refused"] for v in by_source.values())
            unseen = (r["metrics"].get("external") or {}).get("by_source")
            if unseen:  # held-out sources' images: the filter never trained or chose on them
                pooled = _filter_recalls(unseen)
                out[exp_name].update(unseen_frontal_recall=pooled["frontal_recall"],
                                     unseen_frontal_refused=pooled["frontal_refused"],
                                     unseen_lateral_recall=pooled["lateral_recall"])
    return {**out, **over_seeds(out)}


def over_seeds(figures: dict[str, dict]) -> dict[str, dict]:
    """Mean and spread over seeds of every figure of runs named ``<run>-s<seed>[/<model>]``: one entry per run and
    model, ``<run>/<model> over seeds``, each figure ``{mean, sd, min, max, n}`` (sd with n - 1)."""
    groups: dict[str, list[dict]] = {}
    for key, values in figures.items():
        run, _, model = key.partition("/")
        base = re.sub(r"-s\d+$", "", run)
        if base != run:
            groups.setdefault(f"{base}/{model}" if model else base, []).append(values)
    out = {}
    for key, members in groups.items():
        if len(members) < 2:
            continue
        summary = {}
        for name in members[0]:
            vals = [m.get(name) for m in members]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                arr = np.asarray(vals, dtype=float)
                summary[name] = {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)), "min": float(arr.min()),
                                 "max": float(arr.max()), "n": len(arr)}
        out[f"{key} over seeds"] = summary
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.experiment", description=__doc__.split("\n")[0])
    parser.add_argument("name", nargs="?", help="experiment name (experiments/<name>.yaml)")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--summary", action="store_true",
                        help="recompute the headlines and reports/experiments/README.md from the recorded runs; exit")
    parser.add_argument("--real-data", help=f"corpus root (default ${REAL_DATA_ENV}, else {DEFAULT_REAL_DATA})")
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "covidcxr-experiments",
                        help="scratch copy of the project the DVC experiments run in (reused: stages are cached)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra params (YAML value) over the overlay's, e.g. for a quick smoke run")
    parser.add_argument("--reuse-code", action="store_true",
                        help="run on the code already copied into --workdir (one snapshot for a batch of experiments)")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc commands; run nothing")
    parser.add_argument("--levers", help="an ablation: only these levers (comma-separated; default every lever)")
    parser.add_argument("--runs", help="an ablation: only these runs (comma-separated; default every run)")
    parser.add_argument("--resume", action="store_true",
                        help="an ablation: keep the runs already recorded with the same params, run the others")
    a = parser.parse_args(argv)
    only_ablation = [flag for flag, given in (("--levers", a.levers), ("--runs", a.runs), ("--resume", a.resume))
                     if given]
    if a.summary:
        refresh(PROJECT)
        print(PROJECT / REPORTS / "README.md")
        return 0
    if a.list or not a.name:
        print("\n".join(available()))
        return 0
    overlay = load(a.name)  # read once: the summary and the record take this one, never the file again
    if only_ablation and overlay["kind"] != ABLATION:
        parser.error(f"{', '.join(only_ablation)}: only an ablation takes them; {a.name} is of kind {overlay['kind']}")
    spec = _with_sets(overlay, a.set)
    real_data = real_data_root(a.real_data)
    if spec["kind"] == ABLATION:
        return run_ablation(a, overlay, real_data)
    block = spec.get("heldout") or {}
    held_targets = list(block.get("targets") or ["evaluate"])
    main_runs = seeded(runs(a.name, spec), spec)
    held_seeds = block.get("seeds")  # the held-out runs' own seeds: every main run chooses by all of them
    held_runs = seeded(heldout_runs(a.name, spec), {**spec, "seeds": held_seeds} if held_seeds else spec)
    if a.dry_run:
        for n, p_, _ in held_runs:
            print(shlex.join(dvc_command(n, p_, held_targets, real_data)))
        for n, p_, _ in main_runs:
            extra = {"register.heldout": "<figures of the held-out runs>"} if held_runs else {}
            print(shlex.join(dvc_command(n, {**p_, **extra}, spec["targets"], real_data)))
        return 0

    log = _common.setup_logging()
    workdir = open_workdir(a.workdir.resolve(), reuse_code=a.reuse_code)
    started, results, held_results, commands = time.monotonic(), {}, {}, []
    for seed in spec.get("seeds") or [None]:
        figures = None
        if held_runs:
            collected: dict[str, list[dict]] = {}
            for exp_name, params, s_ in held_runs:
                if not held_seeds and s_ != seed:
                    continue
                if exp_name not in held_results:  # with heldout.seeds, run once for every main run
                    held_results[exp_name] = execute(workdir, exp_name, params, held_targets, spec["kind"], real_data,
                                                     log, commands)
                label = exp_name.removeprefix(f"{a.name}-heldout-").removesuffix("" if s_ is None else f"-s{s_}")
                collected.setdefault(label, []).append(held_results[exp_name])
            figures = heldout_figures(block, collected)
        for exp_name, params, s_ in main_runs:
            if s_ != seed:
                continue
            params = {**params, **({"register.heldout": figures} if figures else {})}
            results[exp_name] = execute(workdir, exp_name, params, list(spec["targets"]), spec["kind"], real_data, log,
                                        commands)
            if figures:
                results[exp_name]["heldout"] = figures
    command = f"python -m pipelines.experiment {a.name}" + "".join(f" --set {shlex.quote(s)}" for s in a.set)
    out = {
        "experiment": a.name, "description": spec.get("description", ""), "kind": spec["kind"], "command": command,
        "dvc_commands": [c.replace(real_data.as_posix(), "$COVIDCXR_REAL_DATA") for c in commands],
        "settings": _settings(spec["params"], yaml.safe_load((workdir / "params.yaml").read_text(encoding="utf-8"))),
        "seeds": spec.get("seeds"), "heldout_seeds": held_seeds, "wall_seconds": round(time.monotonic() - started, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": bench.machine(), "notes": spec.get("notes", ""),
        "paper": spec.get("paper"), "runs": results, "heldout_runs": held_results,
        "headline": headline(spec["kind"], results),
    }
    record(PROJECT, a.name, out)
    render_summary(PROJECT, {a.name: overlay})
    print(json.dumps(out["headline"], indent=2))
    return 0


def _with_sets(overlay: dict, sets: list[str]) -> dict:
    """The overlay with the ``--set KEY=VALUE`` params (YAML values) over its own; ``overlay`` itself unchanged."""
    params = dict(overlay["params"])
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ExperimentError(f"--set {item!r}: expected KEY=VALUE")
        params[key] = yaml.safe_load(value)
    return {**overlay, "params": params}


def run_ablation(a: argparse.Namespace, overlay: dict, real_data: Path) -> int:
    """Run (or with ``--dry-run`` print, with an estimate of what it trains) every step of an ablation overlay (as
    :func:`load` read it; ``a.set`` over its params), recording after each step, so that a long ablation stopped part
    way keeps what it measured (``--resume``)."""
    spec = _with_sets(overlay, a.set)
    levers, runs = ([x.strip() for x in text.split(",") if x.strip()] if text else None for text in (a.levers, a.runs))
    plan = ablation_plan(a.name, spec, levers=levers, runs=runs)
    if a.dry_run:
        for step in plan:
            print(shlex.join(dvc_command(step["name"], step["params"], step["targets"], real_data)))
        baseline = yaml.safe_load((PROJECT / "params.yaml").read_text(encoding="utf-8"))
        estimate = ablation_estimate(plan, baseline)
        print(f"# {estimate['dvc_runs']} dvc exp runs, {estimate['classifier_trainings']} classifier trainings, "
              f"{estimate['projection_filter_trainings']} projection filter trainings (one per data selection and "
              f"filter settings), {estimate['upstream_sets']} distinct upstream stage sets (cache, U-Net, segment, "
              f"pretrain: each computed once, then reused by DVC's run cache); roughly {estimate['hours_rough']} h "
              f"on 2 cores (at {TRAINING_SECONDS_64PX:.0f} s per classifier training at 64 px; the filters' and "
              "upstream stages' time not counted)")
        return 0
    log = _common.setup_logging()
    workdir = open_workdir(a.workdir.resolve(), reuse_code=a.reuse_code)
    path = PROJECT / REPORTS / f"{a.name}.json"
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"runs": {}}
    done = recorded["runs"] if a.resume else {}
    # the recorded runs outside this invocation's --levers/--runs stay as they were: a partial run loses nothing
    planned = {step["name"] for step in plan}
    results = {k: v for k, v in recorded["runs"].items() if k not in planned}
    started, commands = time.monotonic(), []
    command = f"python -m pipelines.experiment {a.name}" + (f" --levers {a.levers}" if a.levers else "") + (
        f" --runs {a.runs}" if a.runs else "") + (" --resume" if a.resume else "") + "".join(
        f" --set {shlex.quote(x)}" for x in a.set)
    if results:
        command = f"{recorded['command']}; {command}"
    for step in plan:
        previous = done.get(step["name"])
        if previous is not None and previous.get("params") == json.loads(json.dumps(step["params"])):
            results[step["name"]] = previous
            log.info("%s: recorded before, kept (--resume)", step["name"])
        else:
            figures = execute(workdir, step["name"], step["params"], step["targets"], ABLATION, real_data, log,
                              commands)
            results[step["name"]] = {**figures, "lever": step["lever"], "run": step["run"], "seed": step["seed"],
                                     "params": step["params"]}
        measured = {r["lever"] for r in results.values()}
        # every recorded run's command: a kept run's from the record, a run made now (maybe again) from now
        ran = {_command_name(c) for c in commands}
        kept_commands = [c for c in recorded.get("dvc_commands", []) if _command_name(c) in results
                         and _command_name(c) not in ran]
        out = {
            "experiment": a.name, "description": spec.get("description", ""), "kind": ABLATION, "command": command,
            "dvc_commands": kept_commands + [c.replace(real_data.as_posix(), "$COVIDCXR_REAL_DATA") for c in commands],
            "settings": _settings(spec["params"], yaml.safe_load((workdir / "params.yaml").read_text(
                encoding="utf-8"))),
            "seeds": spec.get("seeds"), "levers": {k: v for k, v in spec["levers"].items() if k in measured},
            "wall_seconds": round(time.monotonic() - started, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": bench.machine(), "notes": spec.get("notes", ""), "goals": spec.get("goals", ""), "paper": None,
            "runs": results,
            "reference": spec.get("reference", BASELINE),
            "headline": ablation_table(results),
        }
        record(PROJECT, a.name, out)
    render_summary(PROJECT, {a.name: overlay})
    print("\n".join(_ablation_rows(out, overlay)))
    return 0


def check_working_size(workdir: Path, params: dict) -> None:
    """Refuse to collect a run whose cached images are not at the working size it asked for.

    A `dvc exp run` can report success over outputs an earlier run left in the workspace when the workspace's dvc.lock
    was reset under them (seen 2026-12-05: after ``git reset --hard`` in the workdir, nine 64-px runs took 15 s each and
    would have recorded the 128-px runs' figures as their own). The projection filter's cache, where the run made
    one, is checked against ``train_projection.size`` (null: the cache's size).
    """
    own: dict = {}
    if ("cache.size" not in params or "train_projection.size" not in params) and (workdir / "params.yaml").is_file():
        own = yaml.safe_load((workdir / "params.yaml").read_text(encoding="utf-8"))
    size = params.get("cache.size", own.get("cache", {}).get("size"))
    filter_size = params.get("train_projection.size", (own.get("train_projection") or {}).get("size")) or size
    for folder, key, want in (("artifacts/cache", "cache.size", size),
                              ("artifacts/cache_projection", "train_projection.size", filter_size)):
        images = workdir / folder / "images.npy"
        if folder != "artifacts/cache" and not images.is_file():
            continue
        shape = np.load(images, mmap_mode="r").shape
        if tuple(shape[1:3]) != (int(want), int(want)):
            raise ExperimentError(f"{images}: images of {shape[1]}x{shape[2]} px after a run at {key} {want}: stale "
                                  "outputs in the workdir (remove its artifacts/ and dvc.lock, or use a new --workdir)")


def execute(workdir: Path, exp_name: str, params: dict, targets: list[str], kind: str, real_data: Path, log,
            commands: list[str]) -> dict:
    """One `dvc exp run` in the workdir from its baseline params, then the overlay kind's figures."""
    cmd = dvc_command(exp_name, params, targets, real_data)
    commands.append(shlex.join(cmd))
    _ensure_mlflow_experiment(PROJECT, f"covidcxr-{params.get('split.experiment', 'demo')}")
    baseline = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=workdir, check=True, capture_output=True)
    (workdir / "params.yaml").write_bytes(baseline.stdout)  # every run starts from the copy's baseline params
    log.info("%s: %s", exp_name, shlex.join(cmd))
    t0, started = time.monotonic(), round(time.time(), 1)
    subprocess.run(["dvc", "exp", "remove", exp_name], cwd=workdir, env=_env(PROJECT), capture_output=True)
    proc = subprocess.run(cmd, cwd=workdir, env=_env(PROJECT, workdir), text=True, capture_output=True)
    if proc.returncode != 0:
        raise ExperimentError(f"{exp_name}: dvc exp run exited {proc.returncode}\n{proc.stderr[-4000:]}")
    check_working_size(workdir, params)
    result = COLLECTORS[kind](workdir, params, tuple(targets))
    result["wall_seconds"], result["started_unix"] = round(time.monotonic() - t0, 1), started
    machine = bench.machine()  # an ablation's rows come from several sessions, maybe machines (run_machine)
    result["cpu"], result["cpu_kernels"] = machine["cpu"], machine["cpu_kernels"]
    result["seed"] = {k: v for k, v in params.items() if k.endswith(".seed")}
    log.info("%s done in %.0f s", exp_name, result["wall_seconds"])
    return result


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
