"""covidcxr.runtime: one place for telemetry, quiet third-party logs and CPU numerics that do not depend on the CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from covidcxr import runtime


def test_importing_covidcxr_sets_telemetry_and_quiet_and_portable_numerics_only_when_asked_unless_the_user_did():
    names = [*runtime.TELEMETRY_OFF, *runtime.QUIET, *runtime.PORTABLE_CPU]
    code = f"import os, covidcxr; print({{k: os.environ.get(k) for k in {names!r}}})"
    clean = {k: v for k, v in os.environ.items()
             if k not in {*runtime.TELEMETRY_OFF, *runtime.QUIET, *runtime.PORTABLE_CPU, runtime.PORTABLE_CPU_ENV}}

    def seen(**env: str) -> dict:
        return eval(subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                                   check=True).stdout)

    assert seen() == {**runtime.TELEMETRY_OFF, **runtime.QUIET, **dict.fromkeys(runtime.PORTABLE_CPU)}
    assert seen(**{runtime.PORTABLE_CPU_ENV: "1"}) == {**runtime.TELEMETRY_OFF, **runtime.QUIET, **runtime.PORTABLE_CPU}
    mine = seen(TF_CPP_MIN_LOG_LEVEL="0", ONEDNN_MAX_CPU_ISA="AVX512_CORE", **{runtime.PORTABLE_CPU_ENV: "1"})
    assert mine["TF_CPP_MIN_LOG_LEVEL"] == "0" and mine["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"
    assert mine["TF_ENABLE_ONEDNN_OPTS"] == "0"


def test_tensorflow_prints_nothing_on_import_and_first_use():
    code = "import covidcxr, tensorflow as tf; print(float(tf.reduce_sum(tf.ones((2, 2)))))"
    clean = {k: v for k, v in os.environ.items() if k not in runtime.QUIET}
    proc = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "4.0" and proc.stderr == ""


def test_a_subprocess_environment_has_telemetry_off_and_keeps_what_is_given():
    env = runtime.environment({"PATH": "/bin", "TF_CPP_MIN_LOG_LEVEL": "1"}, MLFLOW_TRACKING_URI="sqlite:///x.db")
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["DVC_NO_ANALYTICS"] == "1"
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "1" and env["MLFLOW_TRACKING_URI"] == "sqlite:///x.db"
    assert "ONEDNN_MAX_CPU_ISA" not in env
    assert runtime.environment({runtime.PORTABLE_CPU_ENV: "1"})["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert runtime.environment({}, verbose=True)[runtime.VERBOSE_ENV] == "1"


def test_stderr_without_drops_only_the_named_notices_and_keeps_every_other_line_in_order():
    code = ("import os, sys\nfrom covidcxr import runtime\nprint('before', file=sys.stderr)\n"
            "with runtime.stderr_without(('NOTICE',)):\n"
            "    os.write(2, b'c level one\\nI0000 port.cc:153] NOTICE: on\\n')\n"
            "    print('python level', file=sys.stderr)\n"
            "print('after', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stderr.splitlines() == ["before", "c level one", "python level", "after"]


def test_a_native_abort_in_the_block_leaves_its_message_on_stderr():
    """TensorFlow aborts from C++ while it loads (an unsupported CPU, a CUDA check): the lines it wrote just before
    are the only clue, and a capture written back at the block's end lost them all."""
    code = ("import os\nfrom covidcxr import runtime\nwith runtime.stderr_without(('NOTICE',)):\n"
            "    os.write(2, b'I0000 port.cc:153] NOTICE: on\\nF0000 cpu_feature_guard.cc:1] this CPU lacks AVX\\n')\n"
            "    os.abort()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGABRT
    assert proc.stderr.splitlines() == ["F0000 cpu_feature_guard.cc:1] this CPU lacks AVX"]


def test_tensorflow_keeps_its_own_loader_and_a_failing_block_restores_stderr():
    code = ("import os, sys, covidcxr\nfrom covidcxr import runtime\nimport tensorflow as tf\n"
            "assert tf.__spec__.loader is tf.__loader__ and type(tf.__loader__).__name__ == 'SourceFileLoader'\n"
            "assert not any(isinstance(f, runtime._QuietTensorFlowFinder) for f in sys.meta_path)\n"
            "try:\n    with runtime.stderr_without(('x',)):\n        raise KeyError('boom')\n"
            "except KeyError:\n    pass\nos.write(2, b'still here\\n')\n")
    clean = {k: v for k, v in os.environ.items() if k not in runtime.QUIET}
    proc = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    assert proc.stderr == "still here\n"


def test_tensorflow_warnings_print_once_and_per_model_tracing_only_when_verbose():
    # TensorFlow imported before logging is configured (it then adds a handler of its own), then six new models each
    # predicting once: Keras' predict step is traced once per model, which TensorFlow's detector calls retracing.
    code = """if True:
        import sys, logging, numpy as np, tensorflow as tf, keras
        from covidcxr import runtime
        runtime.configure(verbose=sys.argv[1] == "verbose")
        logging.getLogger("tensorflow").warning("a warning of its own")
        for _ in range(6):
            model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
            model.predict(np.ones((3, 2), np.float32), verbose=0)
    """
    clean = {k: v for k, v in os.environ.items() if k not in (runtime.VERBOSE_ENV, *runtime.QUIET)}
    quiet, verbose = (subprocess.run([sys.executable, "-c", code, mode], env=clean, capture_output=True, text=True,
                                     check=True, timeout=120).stderr for mode in ("quiet", "verbose"))
    assert quiet.count("a warning of its own") == 1 and verbose.count("a warning of its own") == 1
    assert "make_predict_function" in verbose and "triggered tf.function retracing" in verbose
    assert "retracing" not in quiet
