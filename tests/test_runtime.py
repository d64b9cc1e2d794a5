"""covidcxr.runtime: one place for telemetry, quiet third-party logs and CPU numerics that do not depend on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys

from covidcxr import runtime


def test_importing_covidcxr_sets_telemetry_quiet_and_portable_numerics_unless_the_user_did():
    names = [*runtime.TELEMETRY_OFF, *runtime.QUIET, *runtime.PORTABLE_CPU]
    code = f"import os, covidcxr; print({{k: os.environ.get(k) for k in {names!r}}})"
    clean = {k: v for k, v in os.environ.items()
             if k not in {*runtime.TELEMETRY_OFF, *runtime.QUIET, *runtime.PORTABLE_CPU, runtime.NATIVE_CPU_ENV}}
    seen = eval(subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True,
                               check=True).stdout)
    assert seen == {**runtime.TELEMETRY_OFF, **runtime.QUIET, **runtime.PORTABLE_CPU}
    mine = eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               env={**clean, "TF_CPP_MIN_LOG_LEVEL": "0", runtime.NATIVE_CPU_ENV: "1"}).stdout)
    assert mine["TF_CPP_MIN_LOG_LEVEL"] == "0" and mine["ONEDNN_MAX_CPU_ISA"] is None


def test_tensorflow_prints_nothing_on_import_and_first_use():
    code = "import covidcxr, tensorflow as tf; print(float(tf.reduce_sum(tf.ones((2, 2)))))"
    clean = {k: v for k, v in os.environ.items() if k not in runtime.QUIET}
    proc = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "4.0" and proc.stderr == ""


def test_a_subprocess_environment_has_telemetry_off_and_keeps_what_is_given():
    env = runtime.environment({"PATH": "/bin", "TF_CPP_MIN_LOG_LEVEL": "1"}, MLFLOW_TRACKING_URI="sqlite:///x.db")
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["DVC_NO_ANALYTICS"] == "1"
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "1" and env["MLFLOW_TRACKING_URI"] == "sqlite:///x.db"
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert runtime.environment({}, verbose=True)[runtime.VERBOSE_ENV] == "1"
