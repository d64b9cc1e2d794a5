"""Training loops: seeded tf.data pipelines from in-memory arrays, a Keras fit that reports every epoch, and the
``tf.distribute`` strategy a model is built under (one device, or every local device)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

STRATEGIES: tuple[str, ...] = ("default", "mirrored")


def distribution_strategy(name: str = "default"):
    """The ``tf.distribute`` strategy to build and compile a model under (``with strategy.scope(): ...``).

    ``default``: TensorFlow's default (one device; the behaviour without a strategy). ``mirrored``: synchronous data
    parallelism over every local GPU, or over every logical CPU device when there is no GPU; Keras' ``fit`` splits each
    global batch across the replicas, so ``batch_size`` stays the global batch. ``multi-worker`` is refused: Keras 3's
    ``fit`` fails under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585); several machines share the work
    through a shared Optuna study instead, each training its own trials.
    """
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi-worker":
        raise ValueError("strategy 'multi-worker' is not supported: Keras 3's fit fails under "
                         "MultiWorkerMirroredStrategy (keras-team/keras#20585). Use 'mirrored' for the GPUs of one "
                         "machine, and `covidcxr tune` workers on a shared study for several machines")
    raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {name!r}")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and TensorFlow, and ask TensorFlow for deterministic kernels."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


def dataset(
    x: np.ndarray, y: np.ndarray, *, batch_size: int, shuffle: bool = False, seed: int = 0, augment: bool = False
):
    """A batched ``tf.data.Dataset`` over arrays already decoded and resized (the cache), so training is compute-bound.

    ``augment`` adds small seeded shifts and brightness changes (no flips: left and right lungs differ).
    """
    import tensorflow as tf

    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    y = np.asarray(y, dtype=np.float32)
    if y.ndim == 3:
        y = y[..., None]
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if augment:
        rng = tf.random.Generator.from_seed(seed)

        def jitter(img, target):
            shift = rng.uniform([2], -0.05, 0.05)
            img = tf.roll(img, shift=tf.cast(shift * tf.cast(tf.shape(img)[:2], tf.float32), tf.int32), axis=[0, 1])
            if target.shape.rank == 3:  # masks move with the image
                target = tf.roll(target, shift=tf.cast(shift * tf.cast(tf.shape(img)[:2], tf.float32), tf.int32),
                                 axis=[0, 1])
            return img + rng.uniform([], -0.1, 0.1), target

        ds = ds.map(jitter, num_parallel_calls=1, deterministic=True)
    return ds.batch(batch_size).prefetch(2)


def fit(
    model,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    augment: bool = False,
    class_weight: dict[int, float] | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    verbose: int = 0,
) -> dict[str, list[float]]:
    """Fit a compiled model; ``on_epoch_end(epoch, logs)`` receives every epoch's metrics (for MLflow, pruning)."""
    import keras

    callbacks = []
    if on_epoch_end is not None:
        callbacks.append(keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: on_epoch_end(epoch, {k: float(v) for k, v in (logs or {}).items()})
        ))
    history = model.fit(
        dataset(*train, batch_size=batch_size, shuffle=True, seed=seed, augment=augment),
        validation_data=dataset(*val, batch_size=batch_size),
        epochs=epochs,
        class_weight=class_weight,
        callbacks=callbacks,
        verbose=verbose,
    )
    return {k: [float(v) for v in vs] for k, vs in history.history.items()}


def balanced_class_weight(y: np.ndarray) -> dict[int, float]:
    """Inverse-frequency weights for binary labels (both classes weigh the same in the loss)."""
    y = np.asarray(y).astype(int).ravel()
    counts = np.bincount(y, minlength=2).astype(float)
    if (counts == 0).any():
        raise ValueError(f"both classes are needed to weight them, got counts {counts.tolist()}")
    return {k: float(len(y) / (2 * counts[k])) for k in (0, 1)}


def predict(model, x: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """Model outputs for arrays (adds the channel axis), as float32 numpy."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)
