"""Training loops: seeded tf.data pipelines from in-memory arrays, a Keras fit that reports every epoch, and the
``tf.distribute`` strategy a model is built under (one device, every local device, or every device of several machines).

Several machines (``multi-worker``): every machine runs the same command with the same data and params, and
``TF_CONFIG`` says who is who::

    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}'

(``index`` 1 on the second machine; the ports must be free and reachable between the machines). Worker 0 is the chief
(``is_chief``): only it should write outputs and log to MLflow. Keras 3's ``fit`` fails under
``MultiWorkerMirroredStrategy`` (keras-team/keras#20585), so ``fit`` trains such models with its own distributed loop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

STRATEGIES: tuple[str, ...] = ("default", "mirrored")  # one machine: what every caller, tuning trials included, may use
MULTI_WORKER = "multi-worker"  # several machines in lockstep: train_* stages only (tuning shares a study instead)

_multi_worker_strategy = None  # TensorFlow allows one MultiWorkerMirroredStrategy per process: made once, then reused


def tf_config(text: str | None = None) -> dict | None:
    """The parsed ``TF_CONFIG`` (``text``, else the environment's), or None when unset; a clear error when malformed."""
    text = os.environ.get("TF_CONFIG") if text is None else text
    if not text or not text.strip():
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"TF_CONFIG is not valid JSON: {err}") from None
    cluster, task = (config.get("cluster"), config.get("task")) if isinstance(config, dict) else (None, None)
    if not isinstance(cluster, dict) or not isinstance(cluster.get("worker", []), list):
        raise ValueError('TF_CONFIG needs "cluster": {"worker": ["host:port", ...]}')
    if not isinstance(task, dict) or not isinstance(task.get("type"), str) or not isinstance(task.get("index"), int):
        raise ValueError('TF_CONFIG needs "task": {"type": "worker", "index": N}')
    members = cluster.get(task["type"])
    if not isinstance(members, list) or not 0 <= task["index"] < len(members):
        raise ValueError(f"TF_CONFIG task {task['type']}:{task['index']} is not in its cluster")
    return config


def is_chief(text: str | None = None) -> bool:
    """Whether this process writes outputs and logs: always on one machine; under ``TF_CONFIG`` only the ``chief``
    task, or worker 0 of a cluster without one."""
    config = tf_config(text)
    if config is None:
        return True
    task, cluster = config["task"], config["cluster"]
    if "chief" in cluster:
        return task["type"] == "chief"
    return task["type"] == "worker" and task["index"] == 0


def distribution_strategy(name: str = "default"):
    """The ``tf.distribute`` strategy to build and compile a model under (``with strategy.scope(): ...``).

    ``default``: TensorFlow's default (one device; the behaviour without a strategy). ``mirrored``: synchronous data
    parallelism over every local GPU, or over every logical CPU device when there is no GPU; Keras' ``fit`` splits each
    global batch across the replicas, so ``batch_size`` stays the global batch. ``multi-worker``:
    ``MultiWorkerMirroredStrategy`` over the machines of ``TF_CONFIG`` (see the module docstring; without it, one
    worker), ``batch_size`` again the global batch; create it before any other TensorFlow work in the process.
    """
    global _multi_worker_strategy
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == MULTI_WORKER:
        tf_config()  # a malformed TF_CONFIG fails here, with a message, not deep inside TensorFlow
        if _multi_worker_strategy is None:
            _multi_worker_strategy = tf.distribute.MultiWorkerMirroredStrategy()
        return _multi_worker_strategy
    raise ValueError(f"strategy must be one of {[*STRATEGIES, MULTI_WORKER]}, got {name!r}")


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
    """Fit a compiled model; ``on_epoch_end(epoch, logs)`` receives every epoch's metrics (for MLflow, pruning).

    A model built under ``multi-worker`` trains with ``_fit_multi_worker`` (same steps, metrics and history; the hook
    runs on the chief only, and ``model.stop_training`` set there stops every worker).
    """
    import keras
    import tensorflow as tf

    if isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return _fit_multi_worker(model, train, val, epochs=epochs, batch_size=batch_size, seed=seed, augment=augment,
                                 class_weight=class_weight, on_epoch_end=on_epoch_end)
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
        shuffle=False,  # the dataset shuffles itself, seeded (Keras would only warn that it ignores the flag)
    )
    return {k: [float(v) for v in vs] for k, vs in history.history.items()}


def _fit_multi_worker(
    model,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    augment: bool,
    class_weight: dict[int, float] | None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None,
) -> dict[str, list[float]]:
    """``fit`` under ``MultiWorkerMirroredStrategy``, whose Keras 3 ``fit`` fails (keras-team/keras#20585).

    The same loop as Keras' ``fit``: the model's own ``train_step``/``test_step`` under ``strategy.run`` in a
    ``tf.function``, over the same seeded datasets, each global batch split across all replicas of all workers (data
    sharding: every worker reads the same arrays). The loss and metric variables are mirrored and summed across
    workers at every update, so every worker reads the global epoch metrics and returns the same history. No progress
    bar (``verbose`` is ignored).
    """
    import tensorflow as tf

    strategy = model.distribute_strategy
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_ds = dataset(*train, batch_size=batch_size, shuffle=True, seed=seed, augment=augment)
    if class_weight is not None:
        train_ds = train_ds.map(_class_weight_fn(class_weight))
    train_dist = strategy.experimental_distribute_dataset(train_ds.with_options(options))
    val_dist = strategy.experimental_distribute_dataset(dataset(*val, batch_size=batch_size).with_options(options))
    with strategy.scope():
        # What Keras' fit does first (its _maybe_symbolic_build is what breaks): create the optimizer's, loss'
        # and metrics' variables under the strategy, from the batch's spec, not a batch (no iteration consumed).
        model._symbolic_build(data_batch=train_ds.element_spec)
    train_step = tf.function(lambda batch: strategy.run(model.train_step, args=(batch,)), reduce_retracing=True)
    test_step = tf.function(lambda batch: strategy.run(model.test_step, args=(batch,)), reduce_retracing=True)
    any_stops = tf.function(lambda flag: strategy.reduce("SUM", strategy.run(tf.identity, args=(flag,)), axis=None))
    chief = is_chief()
    history: dict[str, list[float]] = {}
    model.stop_training = False
    for epoch in range(epochs):
        model.reset_metrics()
        if epoch:  # Keras' epoch iterator opens the dataset once more between epochs, and each opening draws the
            iter(train_dist)  # next shuffle order: skip one the same way, so both train on the same orders
        for batch in train_dist:
            train_step(batch)
        logs = {k: float(v) for k, v in model.get_metrics_result().items()}
        model.reset_metrics()
        for batch in val_dist:
            test_step(batch)
        logs.update({f"val_{k}": float(v) for k, v in model.get_metrics_result().items()})
        for k, v in logs.items():
            history.setdefault(k, []).append(v)
        if on_epoch_end is not None and chief:
            on_epoch_end(epoch, dict(logs))
        if any_stops(tf.constant(float(bool(model.stop_training)))) > 0:  # all workers stop after this epoch, or none
            break
    return history


def _class_weight_fn(class_weight: dict[int, float]):
    """A map adding Keras' class-weight sample weights to ``(x, y)`` batches (classes absent from it weigh 1)."""
    import tensorflow as tf

    table = tf.constant([float(class_weight.get(c, 1.0)) for c in range(max(class_weight) + 1)], tf.float32)

    def add_weights(x, y):
        if y.shape.rank is None or y.shape.rank > 2:
            raise ValueError(f"class_weight needs one label (or one-hot row) per sample, got targets shaped {y.shape}")
        if y.shape.rank == 2 and y.shape[-1] != 1:
            classes = tf.argmax(y, axis=-1)
        else:
            classes = tf.cast(tf.round(tf.reshape(y, [-1])), tf.int64)
        return x, y, tf.gather(table, classes)

    return add_weights


def balanced_class_weight(y: np.ndarray) -> dict[int, float]:
    """Inverse-frequency weights for binary labels (both classes weigh the same in the loss)."""
    y = np.asarray(y).astype(int).ravel()
    counts = np.bincount(y, minlength=2).astype(float)
    if (counts == 0).any():
        raise ValueError(f"both classes are needed to weight them, got counts {counts.tolist()}")
    return {k: float(len(y) / (2 * counts[k])) for k in (0, 1)}


def predict(model, x: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """Model outputs for arrays (adds the channel axis), as float32 numpy.

    A ``multi-worker`` model predicts locally, batch by batch (every worker holds all the weights): Keras' ``predict``
    would split the arrays across the workers and gather the outputs, hanging unless every worker called it at once.
    """
    import tensorflow as tf

    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
        outputs = [np.asarray(model(x[i:i + batch_size], training=False), dtype=np.float32)
                   for i in range(0, len(x), batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, *model.output_shape[1:]), np.float32)
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)
