"""The paper profile on a GPU: training throughput of the projection VGG19 (224 px, batch 64), the U-Net F0=64 (224 px)
and the classifier VGG19 (224 px), each with mixed precision on and off and XLA on and off, beside that GPU's matrix
peak measured in the same run; and a short end-to-end `dvc exp run` of the paper profile (random weights: ImageNet
weights cannot be downloaded offline).

    python -m bench --gpu            # on a machine with a GPU (TensorFlow with CUDA, or Keras 3 on JAX)

The networks are the project's own (`covidcxr.models.build_vgg`, `build_unet`: Keras 3, backend-agnostic). The
backend is Keras' (``KERAS_BACKEND``): TensorFlow when it sees a GPU, else JAX when it does. Without a GPU every row is
skipped and says so. XLA off means Keras' ``jit_compile=False`` (TensorFlow graphs without XLA; op by op on JAX).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
#: (name, builder arguments, batch, is a mask model): the paper profile's three networks.
NETWORKS = (("projection_vgg19_224", {"kind": "vgg", "depth": 19, "head": (1024, 512, 64)}, 64, False),
            ("unet_f0_64_224", {"kind": "unet", "f0": 64}, 32, True),
            ("classifier_vgg19_224", {"kind": "vgg", "depth": 19, "head": (1024, 512, 64)}, 64, False))
SIZE = 224


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


def matmul_tflops(dtype: str, n: int = 8192, repeats: int = 20) -> float:
    """Dense ``n x n x n`` matrix products on the GPU (random data), in TFLOP/s: the ceiling for this dtype."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        key = jax.random.PRNGKey(0)
        a = jax.random.normal(key, (n, n), dtype=dtype)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype=dtype)
        f = jax.jit(lambda x, y: x @ y)
        f(a, b).block_until_ready()
        start = time.perf_counter()
        for _ in range(repeats):
            out = f(a, b)
        out.block_until_ready()
    else:
        import tensorflow as tf

        a = tf.random.normal((n, n), dtype=dtype)
        b = tf.random.normal((n, n), dtype=dtype)
        tf.matmul(a, b).numpy()
        start = time.perf_counter()
        for _ in range(repeats):
            out = tf.matmul(a, b)
        out.numpy()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


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


def end_to_end(smoke: bool) -> dict:
    """A short `dvc exp run` of the paper profile on the demo data (2 epochs each, random weights), or why not."""
    import importlib.util

    missing = [m for m in ("tensorflow", "dvc", "mlflow") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"the pipeline needs {missing} here (install requirements.lock with a CUDA TensorFlow)"}
    if not (ROOT / "data" / "demo" / "labels.csv").is_file():
        return {"skipped": "no demo data: run `make data` first"}
    sets = ["cache.size=224", "train_projection.width=1.0", "train_projection.epochs=1",
            "train_projection.batch_size=64", "train_unet.f0=64", "train_unet.epochs=1", "train_unet.batch_size=32",
            "train_unet.use_tuned=false", "tune_unet.n_trials=1", "tune_unet.epochs=1", "train_classifier.width=1.0",
            "train_classifier.epochs=1", "train_classifier.batch_size=64"]
    cmd = ["dvc", "exp", "run", "-n", "paper-gpu-smoke", *(a for s in sets for a in ("-S", s)), "evaluate"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    return {"command": " ".join(cmd), "returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "tail": (proc.stdout + proc.stderr)[-2000:]}


def run(*, smoke: bool = False, allow_cpu: bool = False) -> dict:
    """Every network x mixed precision x XLA; ``smoke``: a few steps each. ``allow_cpu`` (tests only): run the same
    code on the CPU at 32 px, batch 2, to check it works where there is no GPU."""
    backend, gpu = backend_gpu()
    result: dict = {"backend": backend, "gpu": gpu}
    if gpu is None and not allow_cpu:
        result["skipped"] = f"no GPU visible to Keras' {backend} backend"
        return result
    from bench.training import forward_flops

    size, n = (SIZE, 8192) if gpu else (32, 256)
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
    result["end_to_end"] = end_to_end(smoke) if gpu else {"skipped": "no GPU: the paper profile is for GPUs"}
    return result


def _partial(result: dict) -> None:
    """With ``BENCH_GPU_PARTIAL`` set, write the figures so far there (a run stopped by its time limit keeps them)."""
    path = os.environ.get("BENCH_GPU_PARTIAL")
    if path:
        import json

        Path(path).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


def rows(result: dict) -> list[dict]:
    """One row per network and setting: achieved TFLOP/s beside the GPU's matmul peak of the same dtype."""
    from bench import row, skipped

    if result.get("skipped"):
        return [skipped("gpu", result["skipped"])]
    out = []
    for key, figures in sorted(result.items()):
        if not isinstance(figures, dict) or key in ("matmul_tflops", "end_to_end"):
            continue
        if "error" in figures:
            out.append(skipped(f"gpu.{key}", figures["error"]))
            continue
        dtype = "bfloat16" if ".bf16." in key else "float32"
        out.append(row(f"gpu.{key}", figures["achieved_tflops"], result["matmul_tflops"][dtype],
                       f"{dtype} matmul peak of this GPU ({result['gpu']}), same run", "TFLOP/s"))
    e2e = result.get("end_to_end", {})
    out.append(skipped("gpu.end_to_end", e2e["skipped"]) if "skipped" in e2e else
               row("gpu.end_to_end", e2e["seconds"], None, "", "s", None))
    return out


if __name__ == "__main__":  # on a GPU machine without the project's environment: python bench/gpu.py
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "src"))
    import importlib.util
    import json

    os.environ.setdefault("KERAS_BACKEND", "tensorflow" if importlib.util.find_spec("tensorflow") else "jax")
    print(json.dumps(run(smoke="--smoke" in sys.argv), indent=2))
