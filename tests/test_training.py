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


@pytest.mark.slow
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


WORKERS = {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]}


@pytest.mark.parametrize("config, chief", [
    (None, True),  # one machine
    ({"cluster": WORKERS, "task": {"type": "worker", "index": 0}}, True),
    ({"cluster": WORKERS, "task": {"type": "worker", "index": 1}}, False),
    ({"cluster": {**WORKERS, "chief": ["10.0.0.3:2222"]}, "task": {"type": "worker", "index": 0}}, False),
    ({"cluster": {**WORKERS, "chief": ["10.0.0.3:2222"]}, "task": {"type": "chief", "index": 0}}, True),
])
def test_is_chief_reads_tf_config(monkeypatch, config, chief):
    import json

    monkeypatch.delenv("TF_CONFIG", raising=False)
    if config is not None:
        monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert training.is_chief() is chief


@pytest.mark.parametrize("text, match", [
    ("[1, 2]", "needs \"cluster\""),
    ('{"cluster": {"worker": ["h:1"]}}', "needs \"task\""),
    ('{"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": "0"}}', "needs \"task\""),
    ('{"cluster": {"worker": ["h:1"]}, "task": {"type": "ps", "index": 0}}', "not in its cluster"),
    ("{", "not valid JSON"),
])
def test_malformed_tf_config_is_refused(text, match):
    with pytest.raises(ValueError, match=match):
        training.tf_config(text)


def test_multi_worker_class_weights_match_keras():
    """The multi-worker loop's class-weight sample weights are those Keras' fit derives on the default path."""
    from keras.src.trainers.data_adapters.tf_dataset_adapter import make_class_weight_map_fn

    x, y = tiny_data(10, size=4)
    weights = {0: 0.7, 1: 1.9}
    ours = training.dataset(x, y, batch_size=4).map(training._class_weight_fn(weights))
    keras_own = training.dataset(x, y, batch_size=4).map(make_class_weight_map_fn(weights))
    for (_, _, a), (_, _, b) in zip(ours, keras_own, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(sorted(set(np.concatenate([w.numpy() for _, _, w in ours]).tolist())), [0.7, 1.9])
