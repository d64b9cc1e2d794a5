"""Self-supervised pretraining of the one-channel VGG conv base on unlabelled radiographs (SimCLR, Chen et al. 2020).

The offline stand-in for the ImageNet transfer the paper calls vital (its weights cannot be downloaded here): two
seeded random views of every image (small affine, zoom, gamma, contrast, brightness, noise; never a left/right flip)
pass the encoder and a small projection head, and the NT-Xent loss pulls the two views of an image together while
pushing the batch's other images away. No label is read, so every image of every source and view can be used. The
encoder (``models.build_vgg_encoder``: the conv base and global average pooling) is what is kept;
``models.save_encoder`` writes it with what it fits, and ``models.build_vgg(..., weights=<that file>)`` starts from it.

Arrays in, a Keras model and numbers out: nothing here reads params or writes files (``pipelines/pretrain.py`` does).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np


def nt_xent(z1, z2, temperature: float = 0.2):
    """SimCLR's normalized temperature-scaled cross-entropy of two views ``[B, D]`` of the same ``B`` images.

    Each of the ``2B`` embeddings must pick its partner among the other ``2B - 1`` by cosine similarity over
    ``temperature``; returns ``(mean loss, share of embeddings whose nearest other embedding is their partner)``.
    """
    import tensorflow as tf

    z = tf.math.l2_normalize(tf.concat([z1, z2], axis=0), axis=1)
    n = tf.shape(z1)[0]
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    logits = logits - 1e9 * tf.eye(2 * n, dtype=logits.dtype)  # an embedding is not its own partner
    partner = tf.concat([tf.range(n, 2 * n), tf.range(0, n)], axis=0)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=partner, logits=logits))
    accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), partner), tf.float32))
    return loss, accuracy


def two_views(x: np.ndarray, *, batch_size: int, seed: int, augment: object):
    """A ``tf.data.Dataset`` of ``(view1, view2)`` batches of standardised images ``[N, H, W]``: reshuffled every
    epoch, each view from its own seeded ``training.Augmentation`` (full batches only, so shapes never change)."""
    import tensorflow as tf

    from covidcxr.training import Augmentation, fixed_pipeline_options

    transform = Augmentation.of(augment)
    if not transform.active:
        raise ValueError("contrastive pretraining needs an augmentation: two identical views teach nothing")
    first, second = transform.map_fn(seed), transform.map_fn(seed + 1)
    no_target = tf.zeros([])

    def views(image):
        return first(image, no_target)[0], second(image, no_target)[0]

    x = np.asarray(x, dtype=np.float32)[..., None]
    ds = tf.data.Dataset.from_tensor_slices(x).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(views, num_parallel_calls=1, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(2).with_options(fixed_pipeline_options())


def pretrain(
    images: np.ndarray,
    *,
    depth: int,
    width: float,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    temperature: float = 0.2,
    projection: Sequence[int] = (64, 32),
    augment: object = "strong",
    seed: int = 0,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
):
    """Train a VGG encoder contrastively on working-size images ``[N, H, W]`` in [0, 1] (every image, no labels).

    The images are standardised with their own mean and std (a :class:`~covidcxr.preprocess.Standardizer`, as every
    model here), then views are drawn by ``augment`` (a ``training.Augmentation`` or its level). Seed the process first
    (``training.seed_everything``) for identical weights run to run. Returns ``(encoder, history, standardizer)``:
    ``history`` holds per-epoch ``loss`` and ``accuracy`` (share of views that find their partner in the batch) and
    ``seconds``.
    """
    import keras
    import tensorflow as tf

    from covidcxr import models
    from covidcxr.preprocess import Standardizer

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3 or len(images) < 2:
        raise ValueError(f"pretraining needs at least 2 images [N, H, W], got shape {images.shape}")
    if epochs < 1 or not projection:
        raise ValueError(f"need epochs >= 1 and a projection head, got epochs={epochs}, projection={projection}")
    std = Standardizer().fit(images)
    batch = max(2, min(int(batch_size), len(images)))
    data = two_views(std.transform(images), batch_size=batch, seed=seed, augment=augment)

    encoder = models.build_vgg_encoder(depth, images.shape[1:] + (1,), width=width)
    head = keras.Sequential(
        [keras.Input(shape=encoder.output_shape[1:])]
        + [keras.layers.Dense(units, activation="relu", kernel_initializer="he_normal", name=f"projection{i}")
           for i, units in enumerate(projection[:-1], start=1)]
        + [keras.layers.Dense(projection[-1], name="embedding")],
        name="projection_head",
    )
    variables = encoder.trainable_variables + head.trainable_variables
    optimizer = keras.optimizers.Adam(lr)
    optimizer.build(variables)

    @tf.function(reduce_retracing=True)
    def step(view1, view2):
        with tf.GradientTape() as tape:
            z = head(encoder(tf.concat([view1, view2], axis=0), training=True), training=True)
            loss, accuracy = nt_xent(z[:batch], z[batch:], temperature)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss, accuracy

    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "seconds": []}
    started = time.monotonic()
    for epoch in range(epochs):
        losses, accuracies = [], []
        for view1, view2 in data:
            loss, accuracy = step(view1, view2)
            losses.append(float(loss))
            accuracies.append(float(accuracy))
        logs = {"loss": float(np.mean(losses)), "accuracy": float(np.mean(accuracies))}
        history["loss"].append(logs["loss"])
        history["accuracy"].append(logs["accuracy"])
        history["seconds"].append(round(time.monotonic() - started, 1))
        if on_epoch_end is not None:
            on_epoch_end(epoch, logs)
    return encoder, history, std
