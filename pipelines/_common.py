"""What every stage shares: params, stable JSON and atomic writes, telemetry off."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

PROJECT = Path(__file__).resolve().parent.parent
_UMASK = os.umask(0)
os.umask(_UMASK)


def params(section: str, path: str | os.PathLike = "params.yaml") -> dict:
    """One stage's section of ``params.yaml`` (the stage name)."""
    with open(path, encoding="utf-8") as fh:
        everything = yaml.safe_load(fh) or {}
    if section not in everything:
        raise KeyError(f"{path} has no '{section}' section")
    return everything[section]


def setup_logging() -> logging.Logger:
    """Plain INFO logging to stderr for a stage."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return logging.getLogger("covidcxr.pipelines")


def show_progress() -> bool:
    """Progress bars only on a terminal."""
    return sys.stderr.isatty()


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it into place only if the block finishes.

    A stage killed half way thus never leaves a partial output that DVC could take as valid.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the user's usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside ``path`` to build a directory output in; it replaces ``path`` only if the block
    finishes.

    A stage killed half way leaves at most a hidden ``.<name>.*.tmp`` sibling, never a partial ``path`` that DVC could
    take as valid; the next run of the stage removes such leftovers before it starts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders; outputs get the user's usual mode
        old = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        if path.is_dir() and not path.is_symlink():
            os.rename(path, old)  # a folder cannot be renamed over a non-empty one: move the old one aside first
        elif path.exists() or path.is_symlink():
            path.unlink()
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_leftovers(path: Path) -> None:
    """Remove the temporary siblings of ``path`` (``.<name>.<8 chars>.tmp``) that a killed run left behind.

    Safe because one stage at a time writes a given output (DVC locks the repository).
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    for stale in path.parent.iterdir():
        if not pattern.fullmatch(stale.name):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def write_with(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """Write ``path`` atomically with ``writer(tmp_path)``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_json(path: str | os.PathLike, data: object) -> Path:
    """Stable, diffable JSON (sorted keys, fixed indent, trailing newline), written atomically."""
    text = json.dumps(_finite(data), indent=2, sort_keys=True, ensure_ascii=False, default=_jsonable) + "\n"
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_csv(path: str | os.PathLike, frame) -> Path:
    """A DataFrame as CSV without the index, written atomically."""
    return write_with(path, lambda tmp: frame.to_csv(tmp, index=False, lineterminator="\n"))


def save_npy(path: str | os.PathLike, array) -> Path:
    """A numpy array as .npy, written atomically."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    return write_with(path, write)


def _finite(value: object) -> object:
    """NaN and infinities become null: strict JSON readers (DVC, browsers) reject them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return _finite(value.item())
    return value


def _jsonable(value: object) -> object:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return value.as_posix()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --- shared by the model stages ---------------------------------------------------------------------------------------

CACHE_DIR = "artifacts/cache"


def load_cache() -> tuple["pd.DataFrame", "np.ndarray", "np.ndarray"]:
    """The working-size cache: index (image_id, has_mask, manifest columns), images [N,H,W] in [0,1], true masks."""
    import numpy as np
    import pandas as pd

    index = pd.read_csv(f"{CACHE_DIR}/index.csv", keep_default_na=False, na_values=[""])
    images = np.load(f"{CACHE_DIR}/images.npy").astype(np.float32)
    masks = np.load(f"{CACHE_DIR}/masks.npy")
    return index, images, masks


def rows_for(index: "pd.DataFrame", image_ids) -> "np.ndarray":
    """Positions in the cache of ``image_ids`` (in their order); unknown ids raise, naming a few."""
    import numpy as np

    position = dict(zip(index["image_id"], range(len(index))))
    missing = [i for i in image_ids if i not in position]
    if missing:
        raise KeyError(f"{len(missing)} images are not in the cache, e.g. {missing[:3]}")
    return np.array([position[i] for i in image_ids], dtype=int)


def mlflow_experiment() -> str:
    """One MLflow experiment per paper experiment (split.experiment)."""
    return f"covidcxr-{params('split')['experiment']}"


def setup_tracking() -> None:
    """Default store: sqlite in the project directory; MLFLOW_TRACKING_URI overrides it.

    A non-chief worker of a multi-worker cluster (``TF_CONFIG``) trains like the chief but must not add runs to the
    team's store: it logs to a throwaway store in a temporary folder, and only the chief's runs count.
    """
    import mlflow

    from covidcxr import training

    if not training.is_chief():
        scratch = Path(tempfile.mkdtemp(prefix="covidcxr-worker-mlruns-"))
        logging.getLogger("covidcxr").info("not the chief worker: MLflow runs go to a throwaway store in %s", scratch)
        mlflow.set_tracking_uri(f"sqlite:///{scratch / 'mlflow.db'}")
        return
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")


def repro_tags(stage: str) -> dict[str, str]:
    """What makes a run reproducible: the code version, the data version, and the stage that made it."""
    from covidcxr import tracking

    return {
        "git_commit": tracking.git_commit(),
        "data_version": tracking.dvc_file_hash("data.dvc"),
        "dvc_stage": stage,
        "experiment": params("split")["experiment"],
    }


def save_model_dir(out_dir: str | os.PathLike, model, standardizer, run_id: str, extra: dict | None = None) -> None:
    """A model folder: model.keras, standardizer.json, run.json (the MLflow run that evaluation logs into)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / ".partial.keras"  # Keras insists on the suffix; renamed into place once complete
    model.save(partial)
    os.replace(partial, out / "model.keras")
    write_with(out / "standardizer.json", lambda tmp: standardizer.save(tmp))
    write_json(out / "run.json", {"run_id": run_id, **(extra or {})})
    import mlflow

    if mlflow.active_run() is not None:  # the fitted preprocessing travels with the model's run
        mlflow.log_artifact(str(out / "standardizer.json"), "preprocessing")


def load_model_dir(model_dir: str | os.PathLike):
    """(model, standardizer, run info) from a folder written by save_model_dir."""
    import json

    import keras

    from covidcxr.preprocess import Standardizer

    model_dir = Path(model_dir)
    model = keras.saving.load_model(model_dir / "model.keras", compile=False)
    standardizer = Standardizer.load(model_dir / "standardizer.json")
    info = json.loads((model_dir / "run.json").read_text())
    return model, standardizer, info


def split_arrays(task: str, index):
    """{split: (positions in the cache, split table rows)} for a task's split table (artifacts/splits/<task>.csv)."""
    import pandas as pd

    table = pd.read_csv(f"artifacts/splits/{task}.csv", keep_default_na=False, na_values=[""])
    return {name: (rows_for(index, part["image_id"]), part.reset_index(drop=True))
            for name, part in table.groupby("split", sort=True)}


def compile_binary(model, lr: float) -> None:
    """Adam + binary cross-entropy, with accuracy and ROC AUC reported every epoch."""
    import keras

    model.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy",
                  metrics=["accuracy", keras.metrics.AUC(name="auc")])
