"""The process environment of every covidcxr entry point: telemetry off, third-party noise quiet unless asked for.

One place for it: importing ``covidcxr`` applies :func:`telemetry_off` and the quiet defaults (``setdefault``, so a
user's own setting wins); the CLI and the stages call :func:`configure` with their ``-v`` flag; tests and tools that
start subprocesses take :func:`environment`.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import subprocess
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
#: CPU numerics that do not depend on the processor's instruction set, for whoever needs the same weights from the same
#: seed on every x86-64 CPU: TensorFlow turns its oneDNN graph kernels on by default only on CPUs with AVX-512 (VNNI,
#: BF16, AMX), and oneDNN's matrix products dispatch to the widest instructions the CPU has; both change the order of
#: float sums. Eigen kernels with oneDNN products capped at AVX2 give every CPU with AVX2 the same kernels, at a price
#: on AVX-512: on this project's 2-core Xeon (AVX-512, AMX) they trained the U-Net F0=64 at 128 px 2.8x and VGG19 2.5x
#: slower (measured 2026-12-05). Off by default (TensorFlow's own choice: the same weights run to run on one machine,
#: other CPUs may differ in the last bits and, through training, more); ``COVIDCXR_PORTABLE_CPU=1`` turns them on.
PORTABLE_CPU: dict[str, str] = {"TF_ENABLE_ONEDNN_OPTS": "0", "ONEDNN_MAX_CPU_ISA": "AVX2"}
PORTABLE_CPU_ENV = "COVIDCXR_PORTABLE_CPU"
VERBOSE_ENV = "COVIDCXR_VERBOSE"
#: Python loggers of third-party libraries that print INFO lines on every run.
NOISY_LOGGERS: tuple[str, ...] = ("great_expectations", "absl", "tensorflow", "h5py", "matplotlib", "PIL", "alembic",
                                  "mlflow", "urllib3", "botocore", "optuna", "numexpr")
#: TensorFlow's functions that are traced once per model, each model's own graph: a Component's forward pass and Keras'
#: predict step. Its warning that they "triggered tf.function retracing" counts every function made from the same code
#: as one, so the tuner's trials and register's candidate pipelines, each a new model, set it off (6 times in a demo
#: run) where nothing was traced twice; it is dropped for these functions only, unless verbose.
PER_MODEL_FUNCTIONS: tuple[str, ...] = ("Component._traced.<locals>", "make_predict_function.<locals>")


class _PerModelTracing(logging.Filter):
    """Drops TensorFlow's retracing warning about :data:`PER_MODEL_FUNCTIONS`; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "triggered tf.function retracing" not in message or not any(f in message for f in PER_MODEL_FUNCTIONS)


def verbose_requested(argv: list[str] | None = None) -> bool:
    """Whether ``-v``/``--verbose`` is among the arguments, or ``COVIDCXR_VERBOSE`` is set to a true value."""
    argv = sys.argv[1:] if argv is None else argv
    flag = any(a in ("-v", "--verbose") for a in argv)
    return flag or _env_flag(os.environ, VERBOSE_ENV)


def portable_cpu_requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``COVIDCXR_PORTABLE_CPU`` asks for the CPU-independent kernels (:data:`PORTABLE_CPU`)."""
    return _env_flag(os.environ if env is None else env, PORTABLE_CPU_ENV)


def _env_flag(env: Mapping[str, str], name: str) -> bool:
    """Whether the variable ``name`` of ``env`` is set to 1, true or yes (any case, spaces ignored)."""
    return env.get(name, "").strip().lower() in ("1", "true", "yes")


def telemetry_off() -> None:
    """Set the telemetry variables in this process (a value the user set is kept)."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def apply_defaults() -> None:
    """Telemetry off, TensorFlow's C++ notices quiet (unless verbose) and, when asked for, portable CPU numerics
    (:data:`PORTABLE_CPU`) in this process; what the user set is kept.

    Run when ``covidcxr`` is imported, so that a served model or a notebook gets them too (TensorFlow reads the CPU
    settings when it starts: import covidcxr first).
    """
    telemetry_off()
    if not verbose_requested():
        for key, value in QUIET.items():
            os.environ.setdefault(key, value)
    if portable_cpu_requested():
        for key, value in PORTABLE_CPU.items():
            os.environ.setdefault(key, value)
    elif "tensorflow" not in sys.modules and not verbose_requested():
        quiet_tensorflow_import()


#: What TensorFlow writes to stderr while it is imported with its oneDNN kernels on, whatever TF_CPP_MIN_LOG_LEVEL
#: says (absl logs before it is initialised): a notice that the kernels are on, and absl's note that it is not
#: initialised yet. Nothing else is dropped.
TENSORFLOW_IMPORT_NOTICES: tuple[str, ...] = ("oneDNN custom operations are on",
                                              "All log messages before absl::InitializeLog() is called")
#: How long :func:`stderr_without` waits for its filter to forward the last lines of the block.
FORWARDER_WAIT_S = 5.0


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once, through the other finders, with a loader that runs its import under
    :func:`stderr_without` the start-up notices; then leaves ``sys.meta_path``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # the module keeps its own loader
        with stderr_without(TENSORFLOW_IMPORT_NOTICES):
            self.loader.exec_module(module)


def quiet_tensorflow_import() -> None:
    """Import TensorFlow, when something first does, without its start-up notices (:data:`TENSORFLOW_IMPORT_NOTICES`).

    With oneDNN's kernels on (the default), TensorFlow writes them to stderr from C++ on import, which
    ``TF_CPP_MIN_LOG_LEVEL`` no longer silences; a stage's or the CLI's output would open with them every time.
    """
    if not any(isinstance(finder, _QuietTensorFlowFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())


#: The filter process of :func:`stderr_without`: copies its stdin to its stdout as lines arrive, except the lines that
#: hold one of its arguments, until its stdin ends (also when the process writing it dies); never stopped by Ctrl-C.
_FORWARDER = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
notices, pending, out = [n.encode() for n in sys.argv[1:]], b"", True
def forward(data):
    global out
    try:
        while out and data:
            data = data[os.write(1, data):]
    except OSError:
        out = False  # stderr is gone: keep reading, so the writer never blocks or breaks
while chunk := os.read(0, 65536):
    *lines, pending = (pending + chunk).split(b"\n")
    forward(b"".join(line + b"\n" for line in lines if not any(n in line for n in notices)))
if not any(n in pending for n in notices):
    forward(pending)
"""


@contextlib.contextmanager
def stderr_without(notices: tuple[str, ...]):
    """Run the block with file descriptor 2 (C and Python alike) going through a filter that forwards every line as
    it arrives, except those containing one of ``notices``.

    The filter is a separate process, not a thread: a native abort in the block (TensorFlow's CPU feature check, a CUDA
    check failure) ends this process at once, and a thread of it would not have run (the aborting thread holds the
    GIL), so the message would be lost; the filter reads on to the end and forwards it. If the filter cannot start,
    the block runs with stderr as it is (the notices show, nothing is lost).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    read, write = os.pipe()
    try:
        forwarder = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FORWARDER, *notices], stdin=read,
                                     stdout=saved, stderr=subprocess.DEVNULL)
    except (OSError, ValueError):
        forwarder = None
    os.close(read)
    if forwarder is None:
        os.close(write)
        os.close(saved)
        yield
        return
    os.dup2(write, 2)
    os.close(write)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closed: the filter forwards what is left and ends
        os.close(saved)
        with contextlib.suppress(subprocess.TimeoutExpired):  # a child started in the block may hold the pipe on
            forwarder.wait(timeout=FORWARDER_WAIT_S)


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
    tensorflow = logging.getLogger("tensorflow")
    # TensorFlow gives its logger a handler of its own when it is imported before logging is configured: with the
    # root's, each of its lines would print twice.
    tensorflow.handlers.clear()
    for old in [f for f in tensorflow.filters if isinstance(f, _PerModelTracing)]:
        tensorflow.removeFilter(old)
    if not verbose:
        tensorflow.addFilter(_PerModelTracing())
    return logging.getLogger("covidcxr")


def environment(base: Mapping[str, str] | None = None, *, verbose: bool = False, **extra: str) -> dict[str, str]:
    """An environment for a subprocess: ``base`` (default: this process's) with telemetry off and the quiet defaults."""
    env = dict(os.environ if base is None else base)
    env.update(TELEMETRY_OFF)
    if portable_cpu_requested(env):
        env.update({k: env.get(k, v) for k, v in PORTABLE_CPU.items()})
    if verbose:
        env[VERBOSE_ENV] = "1"
    else:
        env.update({k: env.get(k, v) for k, v in QUIET.items()})
    env.update(extra)
    return env
