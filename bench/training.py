"""Training throughput (images/s) of VGG19 and the U-Net at 128 and 224 px on this CPU, beside the machine's
measured float32 matmul peak in the same run: the ratio achieved GFLOP/s / matmul GFLOP/s says how close training
runs to the hardware limit."""

from __future__ import annotations

import time

import numpy as np


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    import tensorflow as tf

    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    tf.matmul(a, b).numpy()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        tf.matmul(a, b).numpy()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def forward_flops(model) -> float:
    """Multiply-adds x 2 of the convolutions and dense layers for one image."""
    from keras import layers

    total = 0.0
    for layer in model.layers:
        if isinstance(layer, (layers.Conv2D, layers.Conv2DTranspose)):
            kh, kw = layer.kernel_size
            c_in = layer.input.shape[-1]
            _, h, w, c_out = layer.output.shape
            if isinstance(layer, layers.Conv2DTranspose):  # each input pixel spreads a kh x kw x c_out patch
                _, h, w, _ = layer.input.shape
            total += 2.0 * h * w * kh * kw * c_in * c_out
        elif isinstance(layer, layers.Dense):
            total += 2.0 * layer.input.shape[-1] * layer.units
    return total


def train_images_per_second(model, size: int, *, batch: int = 4, steps: int = 3, mask: bool = False) -> float:
    import keras

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, size, size, 1)).astype(np.float32)
    y = (rng.random((batch * steps, size, size, 1)) > 0.5 if mask else rng.random((batch * steps, 1)) > 0.5)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
    model.fit(x[:batch], y[:batch].astype(np.float32), batch_size=batch, epochs=1, verbose=0)  # build + warm-up
    start = time.perf_counter()
    model.fit(x, y.astype(np.float32), batch_size=batch, epochs=1, verbose=0)
    return batch * steps / (time.perf_counter() - start)


def run(*, smoke: bool = False) -> dict:
    """Smoke: one narrow VGG19 (width 1/8) at 32 px, one step, a small matmul."""
    from covidcxr import models

    peak = matmul_gflops(512, 2) if smoke else matmul_gflops()
    result: dict = {"matmul_gflops": round(peak, 1)}
    nets = [("vgg19", lambda s: models.build_vgg(19, (s, s, 1)), False),
            ("unet_f0_64", lambda s: models.build_unet(64, (s, s, 1)), True)]
    if smoke:
        nets = [("vgg19_w0.125", lambda s: models.build_vgg(19, (s, s, 1), width=0.125), False)]
    for size in (32,) if smoke else (128, 224):
        for name, build, is_mask in nets:
            model = build(size)
            ips = train_images_per_second(model, size, mask=is_mask, batch=2 if smoke else 4,
                                          steps=1 if smoke else 3)
            achieved = ips * 3 * forward_flops(model) / 1e9  # training ~ 3x the forward pass
            result[f"{name}_{size}px"] = {
                "train_images_per_second": round(ips, 2),
                "achieved_gflops": round(achieved, 1),
                "ratio_to_matmul_peak": round(achieved / peak, 3),
            }
    return result


def rows(result: dict) -> list[dict]:
    """One row per model and size: achieved training GFLOP/s beside this CPU's matmul GFLOP/s (no goal: headroom)."""
    from bench import row

    return [row(f"training.{name}", figures["achieved_gflops"], result["matmul_gflops"],
                "float32 matmul peak of this machine, same run", "GFLOP/s")
            for name, figures in sorted(result.items()) if isinstance(figures, dict)]
