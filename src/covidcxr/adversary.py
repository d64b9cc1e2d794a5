"""Source-adversarial training: the classifier's features are pushed to forget which source a negative image came from.

Domain-adversarial training (Ganin & Lempitsky 2015), conditioned on the label: a small head reads the classifier's
pooled features through a gradient-reversal layer and learns to name each *negative* image's source; the reversed
gradient moves the convolutional base the other way, towards features on which healthy chests from every source look
alike. Positives take no part (in the real corpus every COVID-19 image comes from one collection: asking the features to
hide the source of positives would ask them to hide the label). What is served is the classifier alone: the head only
exists in the training model built by :func:`build_trainer`, which shares every layer and weight with it.

The targets carry everything the loss needs, so that :func:`covidcxr.training.fit` trains this model as any other:
``[label, label weight, source one-hot x source weight]`` (:func:`pack_targets`); the loss is the weighted binary
cross-entropy of the label plus the source cross-entropy over the negatives.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import layers

FEATURES_LAYER = "avg_pool"  # the conv base's pooled features (covidcxr.models.build_vgg)


def source_names(labels: np.ndarray, sources: np.ndarray) -> list[str]:
    """The sources among the negatives of ``labels`` (0/1), sorted: the adversary's classes."""
    labels, sources = np.asarray(labels).ravel(), np.asarray(sources).astype(str).ravel()
    return sorted(set(sources[labels < 0.5].tolist()))


def pack_targets(
    labels: np.ndarray, sources: np.ndarray, names: Sequence[str], class_weight: dict[int, float] | None = None
) -> np.ndarray:
    """Rows ``[label, label weight, one-hot source x weight]`` of the training model (float32, ``2 + len(names)`` wide).

    The one-hot row is zero for positives and for negatives of a source not in ``names`` (a source only in validation):
    they teach the adversary nothing. Each source of ``names`` weighs the same in the adversary's loss (its negatives
    weigh ``n / (k * n_source)``), so that it cannot score by naming the largest source. ``class_weight`` (inverse class
    frequency, :func:`covidcxr.training.sampling`) weighs the label's loss, which Keras' own ``class_weight`` cannot do
    for a target row wider than one label.
    """
    labels = np.asarray(labels, dtype=np.float32).ravel()
    sources = np.asarray(sources).astype(str).ravel()
    if len(sources) != len(labels):
        raise ValueError(f"{len(sources)} sources for {len(labels)} labels")
    if not names:
        raise ValueError("the source adversary needs at least one negative source")
    out = np.zeros((len(labels), 2 + len(names)), dtype=np.float32)
    out[:, 0] = labels
    out[:, 1] = 1.0 if class_weight is None else np.where(labels > 0.5, class_weight[1], class_weight[0])
    negative = labels < 0.5
    counts = {s: int(np.sum(negative & (sources == s))) for s in names}
    n = sum(counts.values())
    for k, name in enumerate(names):
        rows = negative & (sources == name)
        if counts[name]:
            out[rows, 2 + k] = n / (len(names) * counts[name])
    return out


def build_trainer(model: keras.Model, n_sources: int, *, weight: float, units: int = 64, seed: int = 0) -> keras.Model:
    """The training model: ``model``'s prediction beside the adversary's source probabilities, one row per image.

    ``weight`` (lambda) scales the gradient the adversary sends back into the features, reversed; the head itself
    learns at full strength. Every layer of ``model`` is shared, so fitting this model trains ``model``.
    """
    if weight < 0:
        raise ValueError(f"the adversary's weight must be >= 0, got {weight}")
    if n_sources < 1:
        raise ValueError(f"the adversary needs at least one source, got {n_sources}")
    features = model.get_layer(FEATURES_LAYER).output
    h = GradientReversal(weight, name="source_gradient_reversal")(features)
    h = layers.Dense(units, activation="relu", kernel_initializer=keras.initializers.HeNormal(seed),
                     name="source_dense")(h)
    sources = layers.Dense(n_sources, activation="softmax", kernel_initializer=keras.initializers.GlorotUniform(seed),
                           name="source_probability", dtype="float32")(h)  # float32 under mixed precision, as
    out = layers.Concatenate(name="label_and_source", dtype="float32")([model.output, sources])  # the label's output
    return keras.Model(model.input, out, name=f"{model.name}_source_adversarial")


def compile_trainer(trainer: keras.Model, lr) -> None:
    """Adam on :func:`loss`, with the label's accuracy and ROC AUC under the names a plain classifier reports; ``lr``
    a rate or a schedule (:func:`covidcxr.training.learning_rate`)."""
    trainer.compile(optimizer=keras.optimizers.Adam(lr), loss=loss,
                    metrics=[LabelAccuracy(name="accuracy"), LabelAUC(name="auc"), source_loss])


def loss(y_true, y_pred):
    """Weighted binary cross-entropy of the label plus the adversary's cross-entropy over the negatives, per image."""
    return label_loss(y_true, y_pred) + source_loss(y_true, y_pred)


def label_loss(y_true, y_pred):
    """The classifier's binary cross-entropy, weighted by the row's label weight."""
    p = tf.clip_by_value(y_pred[:, 0], 1e-7, 1.0 - 1e-7)
    y = y_true[:, 0]
    return -y_true[:, 1] * (y * tf.math.log(p) + (1.0 - y) * tf.math.log(1.0 - p))


def source_loss(y_true, y_pred):
    """The adversary's cross-entropy (weighted one-hot targets; zero for positives): how well it names the source."""
    return -tf.reduce_sum(y_true[:, 2:] * tf.math.log(tf.clip_by_value(y_pred[:, 1:], 1e-7, 1.0)), axis=-1)


class GradientReversal(layers.Layer):
    """Identity forward; the gradient multiplied by ``-scale`` backward (``scale`` a variable: :func:`ramp_hook` moves
    it between epochs without retracing)."""

    def __init__(self, scale: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.initial_scale = float(scale)
        self.scale = self.add_weight(shape=(), initializer=keras.initializers.Constant(self.initial_scale),
                                     trainable=False, name="scale")

    def call(self, x):
        scale = tf.convert_to_tensor(self.scale)

        @tf.custom_gradient
        def reverse(t):
            return tf.identity(t), lambda dy: -tf.cast(scale, dy.dtype) * dy

        return reverse(x)

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.initial_scale}


def ramp(weight: float, progress: float) -> float:
    """Ganin & Lempitsky's schedule: ``weight * (2 / (1 + exp(-10 p)) - 1)``, 0 at the start, ~weight by a third in.

    The reversed gradient at full strength from the first step can wreck features that do not yet tell anything
    apart (the classifier collapses to one answer); the ramp lets the label be learnt first.
    """
    return float(weight * (2.0 / (1.0 + np.exp(-10.0 * min(max(progress, 0.0), 1.0))) - 1.0))


def ramp_hook(trainer: keras.Model, weight: float, epochs: int, then=None):
    """Set the reversal's weight to :func:`ramp` of the training's progress: 0 for the first epoch, then after every
    epoch for the next one. Returns an ``on_epoch_end(epoch, logs)`` for :func:`covidcxr.training.fit` that records
    the weight the epoch trained with (``source_adversary_weight``) and calls ``then`` (e.g. the MLflow logger)."""
    layer = trainer.get_layer("source_gradient_reversal")
    layer.scale.assign(ramp(weight, 0.0))

    def on_epoch_end(epoch: int, logs: dict[str, float]) -> None:
        logs = {**logs, "source_adversary_weight": float(layer.scale.numpy())}
        layer.scale.assign(ramp(weight, (epoch + 1) / max(epochs, 1)))
        if then is not None:
            then(epoch, logs)

    return on_epoch_end


class LabelAUC(keras.metrics.AUC):
    """ROC AUC of the label column of the training model's rows."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(y_true[:, :1], y_pred[:, :1], sample_weight)


class LabelAccuracy(keras.metrics.BinaryAccuracy):
    """Accuracy (at 0.5) of the label column of the training model's rows."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(y_true[:, :1], y_pred[:, :1], sample_weight)
