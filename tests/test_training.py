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


def test_pipelines_run_without_autotuning_and_predict_matches_keras():
    import keras

    x, y = tiny_data(10)
    ds = training.dataset(x, y, batch_size=4, shuffle=True, seed=0, augment=True)
    assert ds.options().autotune.enabled is False  # it held training to one core of two
    model = models.build_vgg(16, (32, 32, 1), width=0.0625, head=(8,))
    predicted = training.predict(model, x, batch_size=4)
    assert predicted.shape == (10, 1) and predicted.dtype == np.float32
    np.testing.assert_allclose(predicted, keras.ops.convert_to_numpy(model(x[..., None], training=False)), atol=1e-6)
    assert training.predict(model, x[:0]).shape[0] == 0


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


# --- augmentation and balanced sampling ------------------------------------------------------------------------------


def _legacy_dataset(x, y, *, batch_size, seed):
    """The original ``dataset(..., shuffle=True, augment=True)`` (before augmentation levels), to compare with."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x[..., None], y[..., None] if y.ndim == 3 else y))
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    rng = tf.random.Generator.from_seed(seed)

    def jitter(img, target):
        shift = rng.uniform([2], -0.05, 0.05)
        img = tf.roll(img, shift=tf.cast(shift * tf.cast(tf.shape(img)[:2], tf.float32), tf.int32), axis=[0, 1])
        if target.shape.rank == 3:
            target = tf.roll(target, shift=tf.cast(shift * tf.cast(tf.shape(img)[:2], tf.float32), tf.int32),
                             axis=[0, 1])
        return img + rng.uniform([], -0.1, 0.1), target

    return ds.map(jitter, num_parallel_calls=1, deterministic=True).batch(batch_size)


def batches(ds):
    return [(b[0].numpy(), b[1].numpy()) for b in ds]


@pytest.mark.parametrize("n, size, batch_size", [(12, 32, 5), (300, 32, 16)])  # one group of batches; two
def test_augment_true_and_basic_are_the_original_jitter(n, size, batch_size):
    """Batch for batch and epoch after epoch (the generator carries on), with a short last batch, masks and labels."""
    x, labels = tiny_data(n, size=size)
    masks = (x > 0.5).astype(np.float32)
    for target in (masks, labels):
        legacy_ds = _legacy_dataset(x, target, batch_size=batch_size, seed=4)
        legacy = [batches(legacy_ds) for _ in range(2)]
        for value in (True, "basic"):
            ds = training.dataset(x, target, batch_size=batch_size, shuffle=True, seed=4, augment=value)
            assert int(ds.cardinality()) == len(legacy[0])
            for epoch in legacy:
                for (a, am), (b, bm) in zip(batches(ds), epoch, strict=True):
                    np.testing.assert_array_equal(a, b)
                    np.testing.assert_array_equal(am, bm)
    assert not np.array_equal(legacy[0][0][0], legacy[1][0][0])


def test_basic_jitter_one_image_at_a_time_draws_as_on_batches():
    import tensorflow as tf

    x, _ = tiny_data(7)
    legacy = np.concatenate([b[0] for b in batches(_legacy_dataset(x, x, batch_size=7, seed=9))])
    one_at_a_time = training.LEVELS["basic"].map_fn(9)
    ds = tf.data.Dataset.from_tensor_slices(x[..., None]).shuffle(7, seed=9).map(lambda im: one_at_a_time(im, im))
    np.testing.assert_array_equal(np.stack([im.numpy() for im, _ in ds]), legacy)
    assert training.Augmentation.of(False) == training.Augmentation.of("none") and not training.LEVELS["none"].active


def test_strong_augmentation_is_seeded_and_moves_masks_with_images():
    x = np.zeros((8, 32, 32), np.float32)
    x[:, 8:24, 4:14] = 1.0  # the image is its own mask: after a geometric transform they must still coincide
    geometric = training.Augmentation(shift=0.1, rotate=10.0, scale=0.15)
    a = batches(training.dataset(x, x.copy(), batch_size=8, shuffle=True, seed=1, augment=geometric))[0]
    b = batches(training.dataset(x, x.copy(), batch_size=8, shuffle=True, seed=1, augment=geometric))[0]
    c = batches(training.dataset(x, x.copy(), batch_size=8, shuffle=True, seed=2, augment=geometric))[0]
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    image, mask = a
    assert set(np.unique(mask)) <= {0.0, 1.0}  # masks stay binary
    assert ((image >= 0.5) == (mask >= 0.5)).mean() > 0.995
    assert not np.array_equal(mask, x[..., None])  # they did move
    assert (image[:, :, :16].sum(axis=(1, 2, 3)) > image[:, :, 16:].sum(axis=(1, 2, 3))).all()  # never flipped


def test_photometric_augmentation_leaves_masks_alone():
    x, _ = tiny_data(8)
    masks = (x > 0.5).astype(np.float32)
    photometric = training.Augmentation(gamma=0.5, contrast=0.3, brightness=0.2, noise=0.05)
    image, mask = batches(training.dataset(x, masks, batch_size=8, shuffle=False, seed=3, augment=photometric))[0]
    np.testing.assert_array_equal(mask[..., 0], masks)
    assert np.isfinite(image).all() and not np.allclose(image[..., 0], x)


@pytest.mark.parametrize("value, match", [
    ("extreme", "augment must be one of"), ({"rotate": 90.0}, "out of range"), ({"shift": -0.1}, ">= 0"),
    ({"wrap": True, "rotate": 5.0}, "wrap"), (3, "augment must be one of"),
])
def test_bad_augmentations_are_refused(value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        training.Augmentation.of(value)


def test_balanced_groups_weigh_classes_then_sources_equally():
    groups, shares = training.balanced_groups(np.array([0, 0, 0, 0, 1]))
    assert shares.tolist() == [0.5, 0.5] and groups.tolist() == [0, 0, 0, 0, 1]
    labels = np.array([1, 1, 0, 0, 0, 0])
    sources = np.array(["cohen", "cohen", "cohen", "kermany", "kermany", "shenzhen"])
    groups, shares = training.balanced_groups(labels, sources)
    by_group = {(lab, src): shares[g] for lab, src, g in zip(labels, sources, groups)}
    assert by_group == {(1, "cohen"): 0.5, (0, "cohen"): pytest.approx(1 / 6), (0, "kermany"): pytest.approx(1 / 6),
                        (0, "shenzhen"): pytest.approx(1 / 6)}
    assert shares.sum() == pytest.approx(1.0)


def test_balanced_sampling_draws_the_minority_as_often_and_is_seeded():
    x, _ = tiny_data(40, size=4)
    y = (np.arange(40) < 4).astype(np.float32)  # 10% positives
    balance = training.balanced_groups(y)
    ds = training.dataset(x, y, batch_size=40, shuffle=True, seed=5, balance=balance)
    epochs = [np.concatenate([b[1].numpy() for b in ds]) for _ in range(5)]
    assert all(len(e) == 40 for e in epochs)  # an epoch is as long as the data
    assert 0.35 < np.mean(epochs) < 0.65
    again = training.dataset(x, y, batch_size=40, shuffle=True, seed=5, balance=balance)
    first = [np.concatenate([b[1].numpy() for b in again]) for _ in range(2)]
    np.testing.assert_array_equal(first[0], epochs[0])  # a fresh pipeline of the same seed draws the same epochs
    np.testing.assert_array_equal(first[1], epochs[1])
    assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])  # every epoch draws anew


def test_sampling_modes():
    y = np.array([0, 0, 0, 1])
    assert training.sampling("class", y)["class_weight"] == training.balanced_class_weight(y)
    assert training.sampling("class", y)["balance"] is None
    assert training.sampling("balanced", y)["class_weight"] is None
    assert len(training.sampling("source", y, np.array(["a", "b", "a", "a"]))["balance"][1]) == 3
    with pytest.raises(ValueError, match="each image's source"):
        training.sampling("source", y)
    with pytest.raises(ValueError, match="sampling"):
        training.sampling("oversample", y)


def test_an_ensembles_members_train_with_seeds_apart_from_other_runs():
    assert training.member_seeds(42, 1) == [42]
    assert training.member_seeds(1, 3) == [1, 1001, 2001]
    seeds = {s for run in (1, 2, 3) for s in training.member_seeds(run, 3)}
    assert len(seeds) == 9  # three runs' three-network ensembles share no seed
    with pytest.raises(ValueError, match="at least one member"):
        training.member_seeds(1, 0)


def test_fit_members_reseeds_each_further_member_and_names_the_ensemble():
    draws, fitted = [], []

    def build(seed, i):
        draws.append(np.random.random())  # the member's initial weights, from generators its seed set
        return f"m{i}"

    def fit(member, seed, i):
        fitted.append((member, seed, i))
        return {"loss": [float(i)]}

    training.seed_everything(5)
    members, history, info = training.fit_members([1, 1001, 2001], "m0", build, fit)
    assert members == ["m0", "m1", "m2"] and history == {"loss": [0.0]}
    assert fitted == [("m0", 1, 0), ("m1", 1001, 1), ("m2", 2001, 2)]
    assert info == {"members": 3, "member_seeds": [1, 1001, 2001]}
    expected = []
    for seed in (1001, 2001):
        training.seed_everything(seed)
        expected.append(np.random.random())
    assert draws == expected
    draws.clear()
    assert training.fit_members([7], "m0", build, fit) == (["m0"], {"loss": [0.0]}, {})
    assert draws == []  # one network: nothing re-seeded or built beyond the caller's


def test_models_built_under_a_precision_keep_it_and_the_policy_is_restored():
    import keras

    with training.precision("mixed_bfloat16"):
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        vgg = models.build_vgg(16, (32, 32, 1), width=0.0625, head=(8,))
        unet = models.build_unet(4, (32, 32, 1))
    assert keras.mixed_precision.global_policy().name == "float32"
    conv = vgg.get_layer("block1_conv1")
    assert (conv.compute_dtype, conv.variable_dtype) == ("bfloat16", "float32")  # bfloat16 maths, float32 weights
    # the scores stay float32: bfloat16 logits would tie images that the ROC curve and the threshold must separate
    assert {vgg.get_layer(n).compute_dtype for n in (models.LOGITS_LAYER, models.PREDICTION_LAYER)} == {"float32"}
    assert unet.get_layer("mask").compute_dtype == "float32"
    assert unet.get_layer("down1_conv1").compute_dtype == "bfloat16"
    x = np.random.default_rng(0).random((2, 32, 32, 1)).astype(np.float32)
    assert vgg(x).dtype == "float32" and unet(x).dtype == "float32"
    with pytest.raises(ValueError, match="precision must be one of"):
        with training.precision("float8"):
            pass
    assert keras.mixed_precision.global_policy().name == "float32"


def test_build_scope_is_the_strategy_under_the_precision_and_warns_when_bfloat16_is_emulated(caplog, monkeypatch):
    import keras
    import tensorflow as tf

    monkeypatch.setattr(training, "_cpu_flags", lambda: {"avx2", "fma"})  # a CPU without bfloat16 instructions
    with caplog.at_level("WARNING", logger="covidcxr.training"):
        with training.build_scope("default", "mixed_bfloat16") as strategy:
            assert strategy is tf.distribute.get_strategy()
            assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "float32"
    assert any("emulated" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="covidcxr.training"), training.build_scope("default", "float32"):
        pass
    assert not caplog.records


def test_a_gpu_strategy_that_finds_no_gpu_warns_that_it_trains_on_the_cpu(caplog):
    """`mirrored` on a machine without a GPU (or with the locked tensorflow-cpu) falls back to the CPU, and says so."""
    from importlib import metadata

    import tensorflow as tf

    with caplog.at_level("WARNING", logger="covidcxr.training"), training.build_scope("mirrored") as strategy:
        assert strategy.num_replicas_in_sync >= 1
    notes = [r.getMessage() for r in caplog.records if "sees none" in r.getMessage()]
    if tf.config.list_logical_devices("GPU"):
        assert not notes
    else:
        assert len(notes) == 1 and "strategy 'mirrored' asked for the local GPUs" in notes[0]
        assert "training on the CPU instead" in notes[0]
        assert f"tensorflow-cpu {metadata.version('tensorflow-cpu')}, built without CUDA" in notes[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="covidcxr.training"), training.build_scope("default"):
        pass
    assert not caplog.records  # the default strategy asks for no GPU


@pytest.mark.slow
def test_a_multi_worker_strategy_that_finds_no_gpu_warns_that_it_trains_on_the_cpu():
    """In its own process: TensorFlow allows one multi-worker strategy per process, made before anything else."""
    import os
    import subprocess
    import sys

    import tensorflow as tf

    from covidcxr import runtime

    env = runtime.environment({k: v for k, v in os.environ.items() if k != "TF_CONFIG"})  # one worker, no cluster
    code = "from covidcxr import training; print(training.distribution_strategy('multi-worker').num_replicas_in_sync)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = "strategy 'multi-worker' asked for the local GPUs but TensorFlow sees none" in proc.stderr
    assert warned is not bool(tf.config.list_physical_devices("GPU")), proc.stderr[-3000:]


def test_bfloat16_on_a_cpu_without_bfloat16_instructions_says_it_will_be_slow():
    assert "emulated" in training.precision_note("mixed_bfloat16", cpu_flags={"avx2", "fma"})
    assert training.precision_note("mixed_bfloat16", cpu_flags={"avx512f", "avx512_bf16"}) is None
    assert training.precision_note("mixed_bfloat16", cpu_flags={"amx_bf16"}) is None
    assert training.precision_note("float32", cpu_flags={"avx2"}) is None
    assert training.precision_note("mixed_bfloat16", cpu_flags=set()) is None  # flags unknown: no claim


def test_bfloat16_under_the_portable_cpu_kernels_says_it_will_be_slow(monkeypatch):
    from covidcxr import runtime

    monkeypatch.setenv(runtime.PORTABLE_CPU_ENV, "1")
    assert "AVX2" in training.precision_note("mixed_bfloat16")
    monkeypatch.setenv(runtime.PORTABLE_CPU_ENV, "0")
    assert training.precision_note("float32") is None


@pytest.mark.slow
def test_a_bfloat16_model_trains_deterministically_and_learns_as_its_float32_twin_does():
    import keras
    from sklearn.metrics import roc_auc_score

    def run(precision):
        training.seed_everything(3)
        x, y = tiny_data()
        with training.precision(precision):
            model = models.build_vgg(16, (32, 32, 1), width=0.0625, head=(8,))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
        history = training.fit(model, (x, y), (x, y), epochs=2, batch_size=8, seed=3)
        return history["loss"], training.predict(model, x)

    loss_a, p_a = run("mixed_bfloat16")
    loss_b, p_b = run("mixed_bfloat16")
    assert loss_a == loss_b and np.array_equal(p_a, p_b)  # seeded: bit for bit
    assert p_a.dtype == np.float32 and np.all(np.isfinite(loss_a))
    _, p_32 = run("float32")
    assert not np.array_equal(p_a, p_32)  # bfloat16 maths did happen
    _, y = tiny_data()
    assert roc_auc_score(y, p_a[:, 0]) > 0.8 and roc_auc_score(y, p_32[:, 0]) > 0.8  # both learn the task (0.94, 1.0)


@pytest.mark.slow
def test_learning_rate_is_constant_or_a_cosine_to_zero_over_every_step_fit_takes():
    import keras

    assert training.learning_rate(0.001) == 0.001
    assert training.learning_rate(0.001, "constant", epochs=3, n_train=10, batch_size=4) == 0.001
    with pytest.raises(ValueError, match="schedule"):
        training.learning_rate(0.001, "step")
    x, y = tiny_data(n=20)
    schedule = training.learning_rate(0.01, "cosine", epochs=2, n_train=len(x), batch_size=8)
    assert schedule.decay_steps == 6  # 3 batches an epoch (the last one partial), 2 epochs
    assert float(schedule(0)) == pytest.approx(0.01) and float(schedule(3)) == pytest.approx(0.005)
    training.seed_everything(0)
    model = models.build_vgg(16, (32, 32, 1), width=0.0625, head=(8,))
    optimizer = keras.optimizers.Adam(schedule)
    model.compile(optimizer=optimizer, loss="binary_crossentropy")
    training.fit(model, (x, y), (x, y), epochs=2, batch_size=8)
    assert int(optimizer.iterations) == 6 and float(optimizer.learning_rate) == pytest.approx(0.0, abs=1e-9)
