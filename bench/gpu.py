"""The paper profile on a GPU: training throughput of the projection VGG19 (224 px, batch 64), the U-Net F0=64 (224 px)
and the classifier VGG19 (224 px), each with mixed precision on and off and XLA on and off, beside that GPU's matrix
peak measured in the same run; and a short end-to-end `dvc exp run` of the paper profile (random weights: ImageNet
weights cannot be downloaded offline) in a throwaway copy of the project, as the CPU pipeline benchmark runs.

    python -m bench --gpu            # on a machine with a GPU (TensorFlow with CUDA, or Keras 3 on JAX)

The networks are the project's own (`covidcxr.models.build_vgg`, `build_unet`: Keras 3, backend-agnostic). The
backend is Keras' own choice, ``KERAS_BACKEND`` (TensorFlow unless it is set; `python bench/gpu.py` sets JAX where
TensorFlow is not installed). Without a GPU visible to that backend the benchmark is skipped and says why (the
locked ``tensorflow-cpu`` has no CUDA kernels), and `python -m bench --gpu` leaves bench/results-gpu.json as it is.
XLA off means Keras' ``jit_compile=False`` (TensorFlow graphs without XLA; op by op on JAX). The float32 rows run as
TF32 on the tensor cores where the backend allows it (both do by default on NVIDIA GPUs from Ampere on): their
baseline says so (:func:`float32_matmul`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
#: (name, builder arguments, batch, is a mask model): the paper profile's three networks.
NETWORKS = (("projection_vgg19_224", {"kind": "vgg", "depth": 19, "head": (1024, 512, 64)}, 64, False),
            ("unet_f0_64_224", {"kind": "unet", "f0": 64}, 32, True),
            ("classifier_vgg19_224", {"kind": "vgg", "depth": 19, "head": (1024, 512, 64)}, 64, False))
SIZE = 224
#: The end-to-end run: the paper profile, one epoch each, ending at evaluate.
END_TO_END_SETS = ("cache.size=224", "train_projection.width=1.0", "train_projection.epochs=1",
                   "train_projection.batch_size=64", "train_unet.f0=64", "train_unet.epochs=1",
                   "train_unet.batch_size=32", "train_unet.use_tuned=false", "tune_unet.n_trials=1",
                   "tune_unet.epochs=1", "train_classifier.width=1.0", "train_classifier.epochs=1",
                   "train_classifier.batch_size=64")
END_TO_END = ["dvc", "exp", "run", "-n", "paper-gpu-smoke", *(a for s in END_TO_END_SETS for a in ("-S", s)),
              "evaluate"]


def backend_gpu() -> tuple[str, str | None]:
    """(Keras backend, the GPU's name) or (backend, None) without one."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        return backend, (gpus[0].device_kind if gpus else None)
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return backend, None
        return backend, tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    return backend, None


def float32_matmul(gpu: str | None) -> str:
    """``"TF32"`` where float32 matrix products and convolutions may run as TensorFloat-32 on the GPU's tensor cores
    (TensorFlow's ``tensor_float_32_execution_enabled``, on by default; JAX's default matmul precision, TF32 on such
    GPUs unless set to 'highest' or 'float32'), else ``"float32"``. GPUs before Ampere compute float32 whatever the
    switch says; without a GPU it is float32."""
    import keras

    if gpu is None:
        return "float32"
    if keras.backend.backend() == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        capability = float(getattr(gpus[0], "compute_capability", "0") or 0)
        precision = getattr(jax.config, "jax_default_matmul_precision", None) or "default"
        allowed = str(precision).lower() not in ("highest", "float32")
    else:
        import tensorflow as tf

        details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        capability = float(details.get("compute_capability", (0, 0))[0])
        allowed = tf.config.experimental.tensor_float_32_execution_enabled()
    return "TF32" if allowed and capability >= 8 else "float32"


def matmul_tflops(dtype: str, n: int = 8192, repeats: int = 20, rounds: int = 3) -> float:
    """Dense ``n x n x n`` matrix products on the GPU (random data), in TFLOP/s, best of ``rounds``: the ceiling for
    this dtype. Each round ends on a scalar of the last product (a sum), not on copying the whole product to the host,
    which would be timed too."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype=dtype)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype=dtype)
        f = jax.jit(lambda x, y: x @ y)

        def wait(out) -> None:
            out.block_until_ready()
    else:
        import tensorflow as tf

        a = tf.random.normal((n, n), dtype=dtype)
        b = tf.random.normal((n, n), dtype=dtype)
        f = tf.matmul

        def wait(out) -> None:
            float(tf.reduce_sum(out))  # the products run in order on one stream: this waits for the last
    wait(f(a, b))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            out = f(a, b)
        wait(out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best / 1e12


def build(spec: dict, size: int = SIZE):
    from covidcxr import models

    if spec["kind"] == "unet":
        return models.build_unet(spec["f0"], (size, size, 1))
    return models.build_vgg(spec["depth"], (size, size, 1), head=spec["head"])


def train_images_per_second(spec: dict, batch: int, mask: bool, *, mixed: bool, xla: bool, steps: int,
                            size: int = SIZE) -> float:
    """Images per second of ``model.fit`` steps on in-memory tensors (after a warm-up that compiles); ``mixed``: the
    network built as the stages' ``precision: mixed_bfloat16`` builds it (:func:`covidcxr.training.precision`)."""
    import keras

    from covidcxr import training

    keras.backend.clear_session()
    with training.precision("mixed_bfloat16" if mixed else "float32"):
        model = build(spec, size)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, size, size, 1)).astype(np.float32)
    y = (rng.random((batch * steps, size, size, 1)) if mask else rng.random((batch * steps, 1))) > 0.5
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy", jit_compile=xla)
    model.fit(x[: 2 * batch], y[: 2 * batch].astype(np.float32), batch_size=batch, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(x, y.astype(np.float32), batch_size=batch, epochs=1, verbose=0)
    return batch * steps / (time.perf_counter() - start)


def end_to_end(demo: Path = ROOT / "data" / "demo", *, command: list[str] | None = None,
               timeout: float = 3600) -> dict:
    """A short `dvc exp run` of the paper profile (:data:`END_TO_END`: one epoch each, random weights) on ``demo`` in a
    throwaway copy of the project (:func:`bench.pipeline.scratch_project`: the checkout's params.yaml, dvc.lock and
    reports stay as they are), or why not; ``failed`` says why it did not finish. ``command``: run this instead."""
    import importlib.util

    missing = [m for m in ("tensorflow", "dvc", "mlflow") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"the pipeline needs {missing} here (install requirements.lock with a CUDA TensorFlow)"}
    if not (demo / "labels.csv").is_file():
        return {"skipped": f"no demo data in {demo}: run `make data` first"}
    from bench.pipeline import scratch_project
    from covidcxr import runtime

    cmd = command or END_TO_END
    env = runtime.environment(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    record: dict = {"command": " ".join(cmd)}
    with tempfile.TemporaryDirectory() as tmp:
        project = scratch_project(Path(tmp) / "project", demo)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            output = "".join(o if isinstance(o, str) else (o or b"").decode(errors="replace")
                             for o in (err.stdout, err.stderr))
            return {**record, "tail": output[-2000:], "failed": f"timed out after {timeout:g} s: {output[-300:]}"}
    record.update(returncode=proc.returncode, seconds=round(time.perf_counter() - start, 1),
                  tail=(proc.stdout + proc.stderr)[-2000:])
    if proc.returncode:
        record["failed"] = f"exited {proc.returncode}: {record['tail'][-300:]}"
    return record


def run(*, smoke: bool = False, allow_cpu: bool = False, demo: Path = ROOT / "data" / "demo") -> dict:
    """Every network x mixed precision x XLA; ``smoke``: a few steps each. ``allow_cpu``: run the same code on the CPU
    at 32 px, batch 2, no end-to-end run, to check by hand that it works where there is no GPU (4 minutes on 2 cores:
    no test runs it whole; tests/test_bench.py runs its parts)."""
    backend, gpu = backend_gpu()
    result: dict = {"backend": backend, "gpu": gpu}
    if gpu is None and not allow_cpu:
        result["skipped"] = f"no GPU visible to Keras' {backend} backend"
        if backend == "tensorflow":  # the locked tensorflow-cpu, most likely: the stages' own note says so
            from covidcxr import training

            result["skipped"] += f" (as `strategy: mirrored` would say here: {training.no_gpu_note('mirrored')})"
        return result
    from bench.training import forward_flops

    size, n = (SIZE, 8192) if gpu else (32, 256)
    try:
        result["float32_matmul"] = float32_matmul(gpu)
    except Exception as err:  # noqa: BLE001 - a label must not cost a lent GPU's figures
        result["float32_matmul"] = f"unknown ({type(err).__name__}: {err})"[:200]
    result["matmul_tflops"] = {"bfloat16": round(matmul_tflops("bfloat16", n), 4),
                               "float32": round(matmul_tflops("float32", n), 4)}
    _partial(result)
    for name, spec, batch, mask in NETWORKS:
        batch = batch if gpu else 2
        flops = forward_flops(build(spec, size))
        for mixed in (True, False):
            for xla in (True, False):
                steps = (2 if smoke else 10) if xla else (1 if smoke else 3)
                key = f"{name}.{'bf16' if mixed else 'fp32'}.{'xla' if xla else 'noxla'}"
                try:
                    ips = train_images_per_second(spec, batch, mask, mixed=mixed, xla=xla, steps=steps, size=size)
                except Exception as err:  # noqa: BLE001 - one configuration's failure keeps the others' figures
                    result[key] = {"error": f"{type(err).__name__}: {err}"[:500]}
                    continue
                peak = result["matmul_tflops"]["bfloat16" if mixed else "float32"]
                tflops = ips * 3 * flops / 1e12  # training ~ 3x the forward pass
                result[key] = {"train_images_per_second": round(ips, 1), "achieved_tflops": round(tflops, 4),
                               "ratio_to_matmul_peak": round(tflops / peak, 3), "batch": batch, "size": size}
                _partial(result)
    if gpu is None:
        result["end_to_end"] = {"skipped": "no GPU: the paper profile is for GPUs"}
    else:
        try:  # the network figures above stay whatever happens here
            result["end_to_end"] = end_to_end(demo)
        except Exception as err:  # noqa: BLE001
            result["end_to_end"] = {"failed": f"{type(err).__name__}: {err}"[:500]}
    return result


def _partial(result: dict) -> None:
    """With ``BENCH_GPU_PARTIAL`` set, write the figures so far there (a run stopped by its time limit keeps them)."""
    path = os.environ.get("BENCH_GPU_PARTIAL")
    if path:
        import json

        Path(path).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


def rows(result: dict) -> list[dict]:
    """One row per network and setting: achieved TFLOP/s beside the GPU's matmul peak of the same dtype (float32 named
    TF32 where it ran so); a configuration or end-to-end run that broke is a ``failed:`` row."""
    from bench import row, skipped

    if result.get("skipped"):
        return [skipped("gpu", result["skipped"])]
    out = []
    for key, figures in sorted(result.items()):
        if not isinstance(figures, dict) or key in ("matmul_tflops", "end_to_end"):
            continue
        if "error" in figures:
            out.append(skipped(f"gpu.{key}", f"failed: {figures['error']}"))
            continue
        dtype = "bfloat16" if ".bf16." in key else "float32"
        mode = result.get("float32_matmul", "float32")
        label = dtype if dtype != "float32" else {"TF32": "float32 as TF32", "float32": "float32"}.get(
            mode, f"float32 (TF32 or not: {mode})")
        out.append(row(f"gpu.{key}", figures["achieved_tflops"], result["matmul_tflops"][dtype],
                       f"{label} matmul peak of this GPU ({result['gpu']}), same run", "TFLOP/s"))
    e2e = result.get("end_to_end", {})
    if "skipped" in e2e:
        out.append(skipped("gpu.end_to_end", e2e["skipped"]))
    elif "failed" in e2e:
        out.append(skipped("gpu.end_to_end", f"failed: {e2e['failed']}"))
    else:
        out.append(row("gpu.end_to_end", e2e["seconds"], None, "", "s", None))
    return out


if __name__ == "__main__":  # on a GPU machine without the project's environment: python bench/gpu.py
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "src"))
    import importlib.util
    import json

    os.environ.setdefault("KERAS_BACKEND", "tensorflow" if importlib.util.find_spec("tensorflow") else "jax")
    print(json.dumps(run(smoke="--smoke" in sys.argv), indent=2))
