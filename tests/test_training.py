import numpy as np
import pytest

from covidcxr import models, training


def tiny_data(n=24, size=32, seed=0):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.float32)
    x = rng.normal(size=(n, size, size)).astype(np.float32) + y[:, None, None]  # learnable: positives brighter
    return x, y


def fit_once(seed):
    import keras

    training.seed_everything(seed)
    x, y = tiny_data()
    model = models.build_vgg(16, (32, 32, 1), width=0.0625, head=(8,))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    epochs = []
    history = training.fit(model, (x, y), (x, y), epochs=2, batch_size=8, seed=seed, augment=True,
                           on_epoch_end=lambda e, logs: epochs.append((e, sorted(logs))))
    return history, epochs, training.predict(model, x)


def test_fit_is_seeded_and_reports_every_epoch():
    h1, epochs, p1 = fit_once(3)
    h2, _, p2 = fit_once(3)
    assert [e for e, _ in epochs] == [0, 1] and "val_loss" in epochs[0][1]
    assert h1["loss"] == h2["loss"]
    np.testing.assert_array_equal(p1, p2)
    assert p1.shape == (24, 1)


def test_dataset_batches_and_adds_channel():
    x, y = tiny_data(10)
    batches = list(training.dataset(x, y, batch_size=4))
    assert [tuple(b[0].shape) for b in batches] == [(4, 32, 32, 1), (4, 32, 32, 1), (2, 32, 32, 1)]
    masks = (x > 0).astype(np.float32)
    xb, mb = next(iter(training.dataset(x, masks, batch_size=10, augment=True, seed=1)))
    assert mb.shape == (10, 32, 32, 1)  # masks keep their shape (and move with their image)


def test_balanced_class_weight():
    w = training.balanced_class_weight(np.array([0, 0, 0, 1]))
    assert w[1] == pytest.approx(3 * w[0]) and w[0] * 3 + w[1] * 1 == pytest.approx(4)
    with pytest.raises(ValueError, match="both classes"):
        training.balanced_class_weight(np.zeros(5))
