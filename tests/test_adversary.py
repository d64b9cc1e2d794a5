"""Source-adversarial training: the targets it packs, the reversed gradient, and a classifier trained through it."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from covidcxr import adversary, models, training


def test_targets_carry_label_weight_and_balanced_sources_of_negatives_only():
    labels = np.array([1, 0, 0, 0, 0, 1], np.float32)
    sources = np.array(["cohen", "cohen", "kermany", "kermany", "kermany", "cohen"])
    names = adversary.source_names(labels, sources)
    assert names == ["cohen", "kermany"]
    packed = adversary.pack_targets(labels, sources, names, class_weight={0: 0.75, 1: 1.5})
    assert packed.shape == (6, 4)
    np.testing.assert_array_equal(packed[:, 0], labels)
    np.testing.assert_array_equal(packed[:, 1], [1.5, 0.75, 0.75, 0.75, 0.75, 1.5])
    # positives teach the adversary nothing; one Cohen negative weighs as much as the three Kermany ones together
    np.testing.assert_array_equal(packed[[0, 5], 2:], 0.0)
    np.testing.assert_allclose(packed[1, 2:], [2.0, 0.0])
    np.testing.assert_allclose(packed[2:5, 2:], [[0.0, 2 / 3]] * 3)
    assert packed[:, 2].sum() == pytest.approx(packed[:, 3].sum())


def test_a_negative_of_a_source_unseen_in_training_is_left_out():
    packed = adversary.pack_targets(np.array([0, 0], np.float32), np.array(["cohen", "montgomery"]), ["cohen"])
    np.testing.assert_array_equal(packed[:, 2:], [[1.0], [0.0]])
    np.testing.assert_array_equal(packed[:, 1], 1.0)  # no class weight given: every label weighs 1


def test_bad_targets_are_refused():
    with pytest.raises(ValueError, match="3 sources for 2 labels"):
        adversary.pack_targets(np.zeros(2), np.array(["a", "b", "c"]), ["a"])
    with pytest.raises(ValueError, match="at least one negative source"):
        adversary.pack_targets(np.ones(2), np.array(["a", "a"]), [])


def test_gradient_reversal_is_identity_forward_and_negated_backward():
    layer = adversary.GradientReversal(0.3)
    x = tf.constant([[1.0, -2.0, 3.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * tf.constant([[1.0, 2.0, 4.0]]))
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), [[-0.3, -0.6, -1.2]], rtol=1e-6)


def _tiny_vgg() -> object:
    return models.build_vgg(16, (32, 32, 1), width=1 / 32, head=(8,), name="covid_c_vgg16")


def test_the_encoder_receives_the_adversarys_gradient_reversed_and_scaled():
    training.seed_everything(0)
    x = tf.random.stateless_normal((6, 32, 32, 1), seed=(1, 2))
    y = tf.constant(adversary.pack_targets(np.array([0, 0, 0, 0, 1, 1]), np.array(["a", "b", "a", "b", "a", "a"]),
                                           ["a", "b"]))
    model = _tiny_vgg()
    grads = {}
    for weight in (0.0, 1.0, 2.5):
        trainer = adversary.build_trainer(model, 2, weight=weight, seed=0)
        conv = model.get_layer("block1_conv1").kernel
        with tf.GradientTape() as tape:
            source = tf.reduce_mean(adversary.source_loss(y, trainer(x, training=False)))
        grads[weight] = tape.gradient(source, conv)
    np.testing.assert_array_equal(grads[0.0].numpy(), 0.0)  # weight 0: the source loss does not reach the features
    assert float(tf.reduce_max(tf.abs(grads[1.0]))) > 0
    # every trainer's head starts from the same seed, so the gradients differ only by the reversal's scale
    # (float32 sums in another order on another CPU: entries near zero carry an absolute error of the largest's scale)
    scale = float(tf.reduce_max(tf.abs(grads[1.0])))
    np.testing.assert_allclose(grads[2.5].numpy(), 2.5 * grads[1.0].numpy(), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_the_classifier_trains_through_the_adversarial_model_and_stays_a_plain_classifier(precision):
    training.seed_everything(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 32, 32)).astype(np.float32)
    labels = np.tile([0, 0, 1], 8).astype(np.float32)
    sources = np.tile(["a", "b", "a"], 8)
    x[labels > 0.5, 8:24, 8:24] += 2.0  # the disease: a bright square
    names = adversary.source_names(labels, sources)
    with training.precision(precision):  # mixed: the reversed gradient is bfloat16, the outputs stay float32
        model = _tiny_vgg()
        trainer = adversary.build_trainer(model, len(names), weight=0.5, seed=0)
    before = [w.copy() for w in model.get_weights()]
    adversary.compile_trainer(trainer, 1e-3)
    weighing = training.sampling("class", labels)
    targets = adversary.pack_targets(labels, sources, names, weighing["class_weight"])
    history = training.fit(trainer, (x, targets), (x[:6], targets[:6]), epochs=2, batch_size=8, seed=0)
    assert set(history) >= {"loss", "auc", "accuracy", "source_loss", "val_loss", "val_auc"}
    assert all(np.isfinite(v).all() for v in history.values())
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    # the classifier saved and served is the plain model: one probability, the trainer's first column
    assert model.output_shape == (None, 1)
    np.testing.assert_allclose(training.predict(model, x)[:, 0], training.predict(trainer, x)[:, 0], atol=1e-6)


def test_a_negative_weight_is_refused():
    with pytest.raises(ValueError, match="weight must be >= 0"):
        adversary.build_trainer(_tiny_vgg(), 2, weight=-1.0)


def test_the_ramp_starts_at_zero_and_reaches_the_weight():
    assert adversary.ramp(0.3, 0.0) == 0.0
    values = [adversary.ramp(0.3, p) for p in (0.1, 0.2, 0.5, 1.0)]
    assert values == sorted(values) and 0.13 < values[0] < 0.15 and values[-1] == pytest.approx(0.3, abs=1e-4)
    assert adversary.ramp(0.3, 2.0) == adversary.ramp(0.3, 1.0)  # progress is clipped to [0, 1]


def test_the_ramp_hook_sets_the_reversal_weight_for_each_next_epoch_and_reports_the_one_used():
    trainer = adversary.build_trainer(_tiny_vgg(), 2, weight=0.5, seed=0)
    logged = []
    hook = adversary.ramp_hook(trainer, 0.5, epochs=4, then=lambda epoch, logs: logged.append((epoch, logs)))
    layer = trainer.get_layer("source_gradient_reversal")
    assert float(layer.scale.numpy()) == 0.0  # the first epoch learns the label alone
    for epoch in range(4):
        hook(epoch, {"loss": 1.0})
        assert float(layer.scale.numpy()) == pytest.approx(adversary.ramp(0.5, (epoch + 1) / 4), rel=1e-6)
    used = [logs["source_adversary_weight"] for _, logs in logged]
    assert used[0] == 0.0 and used == sorted(used) and all(logs["loss"] == 1.0 for _, logs in logged)


@pytest.mark.slow
def test_a_changed_reversal_weight_reaches_the_traced_training_step():
    training.seed_everything(0)
    x = np.random.default_rng(0).normal(size=(8, 32, 32)).astype(np.float32)
    y = adversary.pack_targets(np.array([0, 0, 0, 0, 1, 1, 1, 1]), np.array(["a", "b"] * 4), ["a", "b"])
    model = _tiny_vgg()
    trainer = adversary.build_trainer(model, 2, weight=0.0, seed=0)
    adversary.compile_trainer(trainer, 1e-3)
    trainer.get_layer("source_gradient_reversal").scale.assign(0.0)
    conv = model.get_layer("block1_conv1")
    # with the label weight 0 (no label loss) and reversal 0, nothing reaches the conv base
    y_adv_only = y.copy()
    y_adv_only[:, 1] = 0.0
    before = conv.kernel.numpy().copy()
    trainer.train_on_batch(x[..., None], y_adv_only)
    np.testing.assert_array_equal(conv.kernel.numpy(), before)
    trainer.get_layer("source_gradient_reversal").scale.assign(1.0)  # the same traced step now moves the base
    trainer.train_on_batch(x[..., None], y_adv_only)
    assert not np.array_equal(conv.kernel.numpy(), before)
