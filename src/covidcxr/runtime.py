"""The process environment of every covidcxr entry point: telemetry off, third-party noise quiet unless asked for.

One place for it: importing ``covidcxr`` applies :func:`telemetry_off` and the quiet defaults (``setdefault``, so a
user's own setting wins); the CLI and the stages call :func:`configure` with their ``-v`` flag; tests and tools that
start subprocesses take :func:`environment`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

#: Telemetry and analytics of MLflow, DVC and Great Expectations, off (and ``analytics = false`` in .dvc/config).
TELEMETRY_OFF: dict[str, str] = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}
#: Hidden unless verbose: TensorFlow's C++ log lines (the CPU feature guard, the absl pre-init notice, and ERROR lines
#: such as tf.data's harmless "NodeDef mentions attribute use_unbounded_threadpool"; real failures raise in Python)
#: and MLflow's artifact progress bars.
QUIET: dict[str, str] = {"TF_CPP_MIN_LOG_LEVEL": "3", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
#: CPU numerics that do not depend on the processor's instruction set: TensorFlow turns its oneDNN graph kernels on by
#: default only on CPUs with AVX-512 (VNNI, BF16, AMX), and oneDNN's matrix products dispatch to the widest
#: instructions the CPU has; both change the order of float sums, so the same seed trained other weights on an AVX-512
#: machine. Eigen kernels with oneDNN products capped at AVX2 give every x86-64 CPU with AVX2 the same kernels.
#: ``COVIDCXR_NATIVE_CPU=1`` keeps TensorFlow's own choice (faster on AVX-512, results differ from other CPUs).
PORTABLE_CPU: dict[str, str] = {"TF_ENABLE_ONEDNN_OPTS": "0", "ONEDNN_MAX_CPU_ISA": "AVX2"}
NATIVE_CPU_ENV = "COVIDCXR_NATIVE_CPU"
VERBOSE_ENV = "COVIDCXR_VERBOSE"
#: Python loggers of third-party libraries that print INFO lines on every run.
NOISY_LOGGERS: tuple[str, ...] = ("great_expectations", "absl", "tensorflow", "h5py", "matplotlib", "PIL", "alembic",
                                  "mlflow", "urllib3", "botocore", "optuna", "numexpr")


def verbose_requested(argv: list[str] | None = None) -> bool:
    """Whether ``-v``/``--verbose`` is among the arguments, or ``COVIDCXR_VERBOSE`` is set to a true value."""
    argv = sys.argv[1:] if argv is None else argv
    flag = any(a in ("-v", "--verbose") for a in argv)
    return flag or os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def telemetry_off() -> None:
    """Set the telemetry variables in this process (a value the user set is kept)."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def apply_defaults() -> None:
    """Telemetry off, TensorFlow's C++ notices quiet (unless verbose) and portable CPU numerics (:data:`PORTABLE_CPU`)
    in this process; what the user set is kept.

    Run when ``covidcxr`` is imported, so that a served model or a notebook gets them too (TensorFlow reads the CPU
    settings when it starts: import covidcxr first).
    """
    telemetry_off()
    if not verbose_requested():
        for key, value in QUIET.items():
            os.environ.setdefault(key, value)
    if os.environ.get(NATIVE_CPU_ENV, "").strip().lower() not in ("1", "true", "yes"):
        for key, value in PORTABLE_CPU.items():
            os.environ.setdefault(key, value)


def configure(verbose: bool = False) -> logging.Logger:
    """Logging for an entry point: INFO of covidcxr to stderr; third-party INFO and TensorFlow's C++ lines only when
    ``verbose``. Call it before TensorFlow is imported for the C++ part to take effect."""
    telemetry_off()
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "true"
    else:
        for key, value in QUIET.items():
            os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    return logging.getLogger("covidcxr")


def environment(base: Mapping[str, str] | None = None, *, verbose: bool = False, **extra: str) -> dict[str, str]:
    """An environment for a subprocess: ``base`` (default: this process's) with telemetry off and the quiet defaults."""
    env = dict(os.environ if base is None else base)
    env.update(TELEMETRY_OFF)
    if env.get(NATIVE_CPU_ENV, "").strip().lower() not in ("1", "true", "yes"):
        env.update({k: env.get(k, v) for k, v in PORTABLE_CPU.items()})
    if verbose:
        env[VERBOSE_ENV] = "1"
    else:
        env.update({k: env.get(k, v) for k, v in QUIET.items()})
    env.update(extra)
    return env
