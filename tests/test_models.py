"""Model factories: U-Net shape and size, one-channel VGG folding and weight loading, Grad-CAM logits, refusals."""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from covidcxr import folders, models
from covidcxr.models import (
    WeightsFileError,
    WeightsUnavailableError,
    bce_dice_loss,
    build_unet,
    build_vgg,
    dice_loss,
    fold_kernel,
    last_conv_layer_name,
    logits_model,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    keras.utils.set_random_seed(0)


@pytest.fixture(scope="module")
def vgg16_base(tmp_path_factory) -> tuple[keras.Model, object]:
    """A 3-channel keras.applications VGG16 base with seeded random weights (biases too), and its .weights.h5 file."""
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(None, None, 3))
    rng = np.random.default_rng(7)
    base.set_weights(
        [
            rng.normal(0.0, np.sqrt(2.0 / np.prod(w.shape[:-1])), w.shape).astype("float32")
            if w.ndim == 4
            else rng.normal(0.0, 0.05, w.shape).astype("float32")
            for w in base.get_weights()
        ]
    )
    path = tmp_path_factory.mktemp("weights") / "vgg16_base.weights.h5"
    base.save_weights(path)
    return base, path


def _convs(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def _features(model: keras.Model, layer: str, x: np.ndarray) -> np.ndarray:
    return keras.Model(model.input, model.get_layer(layer).output)(x, training=False).numpy()


# ---------------------------------------------------------------------------------------------------------- U-Net


@pytest.fixture(scope="module")
def unet16() -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_unet(16, (128, 128, 1))


def test_unet_parameter_count_matches_the_classic_keras_unet(unet16):
    assert unet16.count_params() == 1_940_817


def test_unet_filters_and_dropout_per_block(unet16):
    for i, (filters, rate) in enumerate(zip((16, 32, 64, 128, 256), (0.1, 0.1, 0.2, 0.2, 0.3)), start=1):
        assert unet16.get_layer(f"down{i}_conv1").filters == filters
        assert unet16.get_layer(f"down{i}_conv2").filters == filters
        assert unet16.get_layer(f"down{i}_drop").rate == pytest.approx(rate)
    for j, (filters, rate) in enumerate(zip((128, 64, 32, 16), (0.2, 0.2, 0.1, 0.1)), start=1):
        for suffix in ("transpose", "conv1", "conv2"):
            assert unet16.get_layer(f"up{j}_{suffix}").filters == filters
        assert unet16.get_layer(f"up{j}_drop").rate == pytest.approx(rate)
    assert unet16.get_layer("up1_transpose").kernel_size == (2, 2)
    assert unet16.get_layer("up1_transpose").strides == (2, 2)
    assert unet16.get_layer("mask").filters == 1 and unet16.get_layer("mask").kernel_size == (1, 1)
    assert len([layer for layer in unet16.layers if isinstance(layer, keras.layers.MaxPooling2D)]) == 4


@pytest.mark.parametrize("shape", [(32, 32, 1), (64, 48, 1)])
def test_unet_mask_has_input_size_and_probabilities(shape):
    model = build_unet(4, shape)
    x = np.random.default_rng(0).normal(size=(2, *shape)).astype("float32")
    y = model(x, training=False).numpy()
    assert y.shape == (2, shape[0], shape[1], 1)
    assert y.min() >= 0.0 and y.max() <= 1.0


def test_unet_dropout_scale_multiplies_the_papers_rates():
    model = build_unet(2, (32, 32, 1), dropout_scale=0.5)
    down = [model.get_layer(f"down{i}_drop").rate for i in range(1, 6)]
    up = [model.get_layer(f"up{j}_drop").rate for j in range(1, 5)]
    np.testing.assert_allclose(down, [0.05, 0.05, 0.1, 0.1, 0.15])
    np.testing.assert_allclose(up, [0.1, 0.1, 0.05, 0.05])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"f0": 0}, r"f0 must be a positive number of filters, got 0"),
        ({"input_shape": (30, 32, 1)}, r"U-Net input height and width must be multiples of 16 .*\(30, 32, 1\)"),
        ({"dropout_scale": 4.0}, r"dropout_scale=4.0 gives dropout rates outside \[0, 1\)"),
        ({"dropout_scale": -1.0}, r"dropout_scale=-1.0 gives dropout rates outside \[0, 1\)"),
    ],
)
def test_unet_refuses_bad_arguments(kwargs, message):
    # the project's own messages: Keras raises ValueErrors of its own on such arguments, later
    with pytest.raises(ValueError, match=message):
        build_unet(**{"f0": 2, "input_shape": (32, 32, 1), **kwargs})


def test_bce_dice_loss_matches_a_numpy_reference():
    rng = np.random.default_rng(1)
    y_true = (rng.random((3, 8, 8, 1)) > 0.5).astype("float32")
    y_true[2] = 0.0  # an empty mask
    y_pred = rng.uniform(0.05, 0.95, (3, 8, 8, 1)).astype("float32")
    inter = (y_true * y_pred).sum(axis=(1, 2, 3))
    dice = 1 - (2 * inter + 1) / (y_true.sum(axis=(1, 2, 3)) + y_pred.sum(axis=(1, 2, 3)) + 1)
    bce = -(y_true * np.log(y_pred) + (1 - y_true) * np.log(1 - y_pred)).mean(axis=(1, 2, 3))

    np.testing.assert_allclose(keras.ops.convert_to_numpy(dice_loss(y_true, y_pred)), dice, rtol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bce_dice_loss(y_true, y_pred)), bce + dice, rtol=1e-4)
    perfect = keras.ops.convert_to_numpy(dice_loss(y_true, y_true))
    np.testing.assert_allclose(perfect, 0.0, atol=1e-6)  # the empty mask predicted empty scores a perfect 0


def test_bce_dice_loss_gives_every_unet_weight_a_finite_gradient():
    model = build_unet(2, (32, 32, 1))
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype("float32")
    y = (x > 0).astype("float32")
    with tf.GradientTape() as tape:
        per_image = bce_dice_loss(y, model(x, training=True))
        loss = tf.reduce_mean(per_image)
    grads = tape.gradient(loss, model.trainable_variables)
    assert per_image.shape == (2,)
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
    assert all(np.any(g.numpy() != 0) for g in grads)


# ------------------------------------------------------------------------------------------------------------ VGG


@pytest.mark.parametrize(("depth", "n_convs", "last"), [(16, 13, "block5_conv3"), (19, 16, "block5_conv4")])
def test_vgg_conv_layers(depth, n_convs, last):
    model = build_vgg(depth, (32, 32, 1), width=0.125)
    convs = _convs(model)
    assert len(convs) == n_convs
    assert last_conv_layer_name(model) == last == models.LAST_CONV_LAYER[depth]
    assert convs[0].name == "block1_conv1" and convs[0].kernel.shape == (3, 3, 1, 8)
    assert model.name == f"vgg{depth}"


def test_vgg_width_scales_filters_and_full_width_matches_keras_applications():
    narrow = build_vgg(19, (32, 32, 1), width=0.125)
    assert [narrow.get_layer(f"block{b}_conv1").filters for b in range(1, 6)] == [8, 16, 32, 64, 64]

    full = build_vgg(19, (32, 32, 1))
    reference = keras.applications.VGG19(include_top=False, weights=None, input_shape=(32, 32, 3))
    ours = {layer.name: layer.kernel.shape for layer in _convs(full)}
    theirs = {layer.name: layer.kernel.shape for layer in _convs(reference)}
    assert ours.keys() == theirs.keys()
    assert ours.pop("block1_conv1") == (3, 3, 1, 64) and theirs.pop("block1_conv1") == (3, 3, 3, 64)
    assert ours == theirs


@pytest.mark.parametrize(
    ("head", "outputs", "activation"),
    [((1024, 512, 64), 1, "sigmoid"), ((16,), 1, "sigmoid"), ((), 3, "softmax")],
)
def test_vgg_head_is_configurable_and_prediction_is_a_separate_activation(head, outputs, activation):
    model = build_vgg(16, (32, 32, 1), width=0.125, head=head, outputs=outputs, head_dropout=0.3)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == [*head, outputs]
    assert dense[-1].name == "logits" and dense[-1].get_config()["activation"] == "linear"
    assert model.get_layer("prediction").get_config()["activation"] == activation
    dropouts = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert dropouts == [0.3] * (1 + (len(head) > 0))

    x = np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype("float32")
    features, logits = logits_model(model)(x, training=False)
    prediction = model(x, training=False).numpy()
    expected = keras.activations.sigmoid(logits) if outputs == 1 else keras.activations.softmax(logits)
    np.testing.assert_allclose(prediction, keras.ops.convert_to_numpy(expected), rtol=1e-5, atol=1e-6)
    assert features.shape == (2, 2, 2, 64) and logits.shape == (2, outputs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth": 18}, r"VGG depth must be one of \[16, 19\], got 18"),
        ({"fold": "rgb"}, r"fold must be one of \['luminance', 'sum'\], got 'rgb'"),
        ({"input_shape": (32, 32, 3)}, r"build_vgg takes one-channel images .*input_shape=\(32, 32, 3\)"),
        ({"width": 0.0}, r"width must be positive, got 0.0"),
        ({"outputs": 0}, r"outputs must be at least 1, got 0"),
        ({"head_dropout": 1.0}, r"head_dropout must be in \[0, 1\), got 1.0"),
        ({"width": 0.5, "weights": "imagenet"}, r"pretrained weights \(imagenet\) need the real VGG \(width=1.0\)"),
        ({"width": 0.5, "weights": "some/file.weights.h5"},
         r"pretrained weights \(some/file.weights.h5\) need the real VGG \(width=1.0\), got width=0.5"),
    ],
)
def test_vgg_refuses_bad_arguments(kwargs, message):
    # the project's own messages: Keras raises ValueErrors of its own on such arguments, later
    with pytest.raises(ValueError, match=message):
        build_vgg(**{"depth": 16, "input_shape": (32, 32, 1), "width": 0.125, **kwargs})


def test_fold_kernel_uses_bgr_order():
    kernel = np.zeros((3, 3, 3, 2), dtype="float32")
    kernel[:, :, 0], kernel[:, :, 1], kernel[:, :, 2] = 1.0, 10.0, 100.0  # B, G, R
    np.testing.assert_allclose(fold_kernel(kernel, "luminance"), 0.1140 + 5.870 + 29.89, rtol=1e-6)
    np.testing.assert_allclose(fold_kernel(kernel, "sum"), 111.0)
    assert fold_kernel(kernel).shape == (3, 3, 1, 2)


def test_weights_file_is_loaded_and_first_kernel_folded(vgg16_base):
    base, path = vgg16_base
    model = build_vgg(16, (32, 32, 1), weights=path, fold="sum")
    for layer in _convs(base):
        kernel, bias = layer.get_weights()
        got_kernel, got_bias = model.get_layer(layer.name).get_weights()
        expected = kernel.sum(axis=2, keepdims=True) if layer.name == "block1_conv1" else kernel
        np.testing.assert_allclose(got_kernel, expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(got_bias, bias)


@pytest.mark.parametrize(("fold", "bgr_weights"), [("sum", (1.0, 1.0, 1.0)), ("luminance", (0.1140, 0.5870, 0.2989))])
def test_folded_model_equals_three_channel_model_on_weighted_gray(vgg16_base, fold, bgr_weights):
    """'sum' equals the gray image replicated into B, G, R; 'luminance' equals (0.1140x, 0.5870x, 0.2989x)."""
    base, path = vgg16_base
    model = build_vgg(16, (32, 32, 1), weights=path, fold=fold)
    x = np.random.default_rng(3).normal(size=(2, 32, 32, 1)).astype("float32")
    bgr = np.concatenate([c * x for c in bgr_weights], axis=-1)

    ours = _features(model, "block5_conv3", x)
    theirs = _features(base, "block5_conv3", bgr)
    assert np.abs(theirs).max() > 0.1  # a live network, not all-zero ReLUs
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def _write_keras_download_format(path, base: keras.Model) -> None:
    """Write ``base``'s conv weights the way Keras' downloaded ``*_notop.h5`` files are laid out (legacy, by layer)."""
    with h5py.File(path, "w") as f:
        convs = _convs(base)
        f.attrs["layer_names"] = np.array([layer.name.encode() for layer in convs])
        for layer in convs:
            group = f.create_group(layer.name)
            names = [f"{layer.name}_W_1:0".encode(), f"{layer.name}_b_1:0".encode()]
            group.attrs["weight_names"] = np.array(names)
            for name, value in zip(names, layer.get_weights()):
                group.create_dataset(name.decode(), data=value)


def test_imagenet_uses_the_keras_cache_first(vgg16_base, tmp_path, monkeypatch):
    base, _ = vgg16_base
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cached = tmp_path / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached.parent.mkdir()
    _write_keras_download_format(cached, base)

    model = build_vgg(16, (32, 32, 1), weights="imagenet", fold="luminance")
    kernel = base.get_layer("block1_conv1").get_weights()[0]
    np.testing.assert_allclose(model.get_layer("block1_conv1").get_weights()[0], fold_kernel(kernel), rtol=1e-6)
    np.testing.assert_array_equal(
        model.get_layer("block5_conv3").get_weights()[0], base.get_layer("block5_conv3").get_weights()[0]
    )


def test_imagenet_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    """Offline, made so on any runner and on loopback only: the HTTPS proxy the download would go through (which
    models._reachable probes instead of the host) is a closed port on 127.0.0.1."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with socket.socket() as closed:  # bound, never listening: a connection is refused at once
        closed.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
        monkeypatch.setenv("https_proxy", proxy)
        monkeypatch.setenv("HTTPS_PROXY", proxy)
        with pytest.raises(WeightsUnavailableError, match="^offline: ") as info:
            build_vgg(19, (32, 32, 1), weights="imagenet")
    message = str(info.value)
    fname = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert f"https://storage.googleapis.com/tensorflow/keras-applications/vgg19/{fname}" in message
    assert str(tmp_path / "models" / fname) in message
    assert "weights=" in message


def _unet_file(path):
    build_unet(2, (32, 32, 1)).save_weights(path)


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("unet.weights.h5", _unet_file),
        ("notes.weights.h5", lambda p: p.write_text("not weights")),
        ("notes.h5", lambda p: p.write_text("not weights")),
    ],
)
def test_wrong_weights_file_is_refused_by_name(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    with pytest.raises(WeightsFileError, match=name):
        build_vgg(16, (32, 32, 1), weights=path)


def test_weights_of_the_other_depth_are_refused(vgg16_base):
    _, path = vgg16_base
    with pytest.raises(WeightsFileError, match=path.name):
        build_vgg(19, (32, 32, 1), weights=path)


def test_missing_weights_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.weights.h5"):
        build_vgg(16, (32, 32, 1), weights=tmp_path / "absent.weights.h5")


def test_logits_model_names_missing_layers():
    with pytest.raises(ValueError, match="logits"):
        logits_model(build_unet(2, (32, 32, 1)))


# ------------------------------------------------------------------------------------- pretrained encoders


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """A tiny VGG16 encoder (1/16 wide, 32 px) saved as the pretrain stage saves it, with nonzero biases."""
    keras.utils.set_random_seed(5)
    encoder = models.build_vgg_encoder(16, (32, 32, 1), width=1 / 16)
    encoder.set_weights([w + 0.01 for w in encoder.get_weights()])
    return encoder, models.save_encoder(encoder, tmp_path_factory.mktemp("enc") / "encoder_vgg16.weights.h5",
                                        depth=16, width=1 / 16, size=32, info={"epochs": 3})


def test_a_pretrained_encoder_starts_the_conv_base_of_any_width(encoder_file):
    encoder, path = encoder_file
    assert models.encoder_spec(path)["epochs"] == 3 and models.encoder_spec(path)["size"] == 32
    model = build_vgg(16, (32, 32, 1), weights=path, width=1 / 16, head=(8,))
    for layer in _convs(encoder):
        for got, want in zip(model.get_layer(layer.name).get_weights(), layer.get_weights(), strict=True):
            np.testing.assert_array_equal(got, want)
    keras.utils.set_random_seed(5)
    plain = build_vgg(16, (32, 32, 1), width=1 / 16, head=(8,))
    assert not np.array_equal(plain.get_layer("block1_conv1").get_weights()[0],
                              model.get_layer("block1_conv1").get_weights()[0])


@pytest.mark.parametrize("depth, width, size, what", [
    (19, 1 / 16, 32, "depth 16 (the model: 19)"),
    (16, 1 / 8, 32, "width 0.0625 (the model: 0.125)"),
    (16, 1 / 16, 64, "working size 32 px (the model: 64 px)"),
])
def test_an_encoder_of_another_vgg_is_refused_naming_the_file(encoder_file, depth, width, size, what):
    _, path = encoder_file
    with pytest.raises(models.EncoderMismatchError, match=rf"{path.name}.*{re.escape(what)}"):
        build_vgg(depth, (size, size, 1), weights=path, width=width, head=(8,))


def test_a_keras_vgg_file_still_needs_the_real_vgg(vgg16_base):
    _, path = vgg16_base
    assert models.encoder_spec(path) is None
    with pytest.raises(ValueError, match="need the real VGG"):
        build_vgg(16, (32, 32, 1), weights=path, width=0.5)


# ------------------------------------------------------------------------------------- a classifier's input


def test_component_saves_its_input_transform_and_scores_through_it(tmp_path):
    from covidcxr import preprocess

    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(0)
    images = rng.random((4, 32, 32)).astype(np.float32)
    masks = np.zeros((4, 32, 32), bool)
    masks[:, 8:24, 6:26] = True
    model = build_vgg(16, (32, 32, 1), width=1 / 16, head=(4,))
    transform = preprocess.InputTransform(crop=True, intensity="clahe")
    std = preprocess.Standardizer().fit(transform.apply(images, masks, "d").images)
    folder = models.Component(model, std, info={"run_id": "x"}, input_transform=transform).save(tmp_path / "clf")
    assert folders.INPUT_FILE in folders.FOLDER_FILES and (folder / folders.INPUT_FILE).is_file()
    loaded = models.Component.load(folder)
    assert loaded.input_transform == transform
    np.testing.assert_array_equal(loaded.prepare(images, masks, "d").images, transform.apply(images, masks, "d").images)
    p = models.covid_probability(loaded, images, masks, "d")
    np.testing.assert_allclose(p, np.round(loaded(transform.apply(images, masks, "d").images)[:, 0], 6), atol=1e-6)
    # a folder saved before the record of its files and without input.json (every folder made before the levers)
    # scores the paper's input
    (folder / folders.INPUT_FILE).unlink()
    info = json.loads((folder / folders.RUN_FILE).read_text())
    del info[folders.SAVED_FILES_KEY]
    (folder / folders.RUN_FILE).write_text(json.dumps(info))
    plain = models.Component.load(folder)
    assert plain.input_transform is None
    np.testing.assert_array_equal(plain.prepare(images, masks, "d").images,
                                  preprocess.apply_variant(images, masks, "d"))
    assert not np.allclose(models.covid_probability(plain, images, masks, "d"), p)


@pytest.fixture(scope="module")
def saved_component(tmp_path_factory) -> Path:
    """A component saved with every optional file (input transform, calibration, OOD detector, threshold, a second
    member): built, fitted and saved once for the tests that each take one of its files away from a copy."""
    from covidcxr import calibration, ood, preprocess

    rng = np.random.default_rng(4)
    images = rng.random((8, 32, 32)).astype(np.float32)
    networks = [build_vgg(16, (32, 32, 1), width=1 / 16, head=(4,)) for _ in range(2)]
    component = models.Component(
        networks[0], preprocess.Standardizer().fit(images), members=networks[1:], info={"run_id": "x"},
        threshold={"threshold": 0.5}, input_transform=preprocess.InputTransform(intensity="equalize"),
        calibrator=calibration.PlattCalibrator().fit(np.array([0, 1] * 4), np.linspace(0.1, 0.9, 8)))
    component.ood = ood.MahalanobisDetector(n_components=2).fit(models.ood_features(component, images, None, "c"))
    component.ood.calibrate(models.out_of_distribution(component, images, None, "c").score)
    return component.save(tmp_path_factory.mktemp("component") / "clf")


@pytest.mark.parametrize("name", [folders.INPUT_FILE, folders.CALIBRATION_FILE, folders.OOD_FILE,
                                  folders.THRESHOLD_FILE, "member1.keras"])
def test_a_folder_that_lost_a_file_it_was_saved_with_is_refused_naming_it(saved_component, tmp_path, name):
    folder = Path(shutil.copytree(saved_component, tmp_path / "clf"))
    saved = json.loads((folder / folders.RUN_FILE).read_text())[folders.SAVED_FILES_KEY]
    assert set(saved) == set(folders.folder_files(folder)) - {folders.RUN_FILE}
    assert models.Component.load(folder).info == {"run_id": "x", folders.SAVED_FILES_KEY: saved}
    # what register bundles and serving loads: the same folder files, read by the same check
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for file in folders.folder_files(folder):
        if file != name:
            shutil.copy2(folder / file, bundle / file)
    with pytest.raises(FileNotFoundError, match=re.escape(f"lacks {name}")):
        models.Component.load(bundle)
    (folder / name).unlink()
    for check in (models.Component.load, folders.folder_info):
        with pytest.raises(FileNotFoundError, match=re.escape(f"{folder}: model folder lacks {name}")):
            check(folder)


def test_frontal_probability_reads_images_through_the_filters_input_transform(tmp_path):
    from covidcxr import preprocess

    keras.utils.set_random_seed(2)
    images = np.random.default_rng(1).random((3, 32, 32)).astype(np.float32) ** 3  # dark films: equalising moves them
    model = build_vgg(19, (32, 32, 1), width=1 / 16, head=(4,))
    std = preprocess.Standardizer().fit(images)
    plain = models.Component(model, std)
    np.testing.assert_array_equal(models.frontal_probability(plain, images), plain(images)[:, 0])
    transform = preprocess.InputTransform(intensity="equalize")
    folder = models.Component(model, std, input_transform=transform).save(tmp_path / "projection")
    loaded = models.Component.load(folder)
    p = models.frontal_probability(loaded, images)
    assert p.shape == (3,)
    np.testing.assert_allclose(p, loaded(transform.apply(images, None, "c").images)[:, 0], atol=1e-6)
    assert not np.allclose(p, plain(images)[:, 0], atol=1e-4)
    # the filter comes before the lungs: a lung crop cannot apply
    cropping = models.Component(model, std, input_transform=preprocess.InputTransform(crop=True))
    with pytest.raises(ValueError, match="needs lung masks"):
        models.frontal_probability(cropping, images)


def test_frontal_evidence_adds_the_filters_lateral_check_saved_in_its_folder(tmp_path):
    from covidcxr import ood, preprocess

    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    laterals = rng.random((12, 32, 32)).astype(np.float32) * 0.2  # dark, alike: what the check learns
    others = np.clip(rng.random((6, 32, 32)).astype(np.float32) + np.linspace(0, 1, 32)[None, None], 0, 1)
    model = build_vgg(19, (32, 32, 1), width=1 / 16, head=(4,))
    filt = models.Component(model, preprocess.Standardizer().fit(np.concatenate([laterals, others])))
    p, like = models.frontal_evidence(filt, others)
    assert like is None  # no check: the network decides alone
    np.testing.assert_array_equal(p, models.frontal_probability(filt, others))

    filt.ood = ood.MahalanobisDetector(n_components=4).fit(models.ood_features(filt, laterals[:8], None, "c"))
    filt.ood.calibrate(models.out_of_distribution(filt, laterals[8:], None, "c").score)
    loaded = models.Component.load(filt.save(tmp_path / "projection"))
    assert (tmp_path / "projection" / folders.OOD_FILE).is_file()
    p2, like2 = models.frontal_evidence(loaded, np.concatenate([laterals[8:], others]))
    np.testing.assert_allclose(p2[4:], p, atol=1e-6)
    assert like2[:4].all()  # the validation laterals set the threshold: each lies within it
    assert not like2[4:].any()  # images unlike every training lateral: the check would keep them as frontal


@pytest.mark.slow
def test_a_seed_ensemble_scores_the_mean_of_its_networks_and_saves_every_member(tmp_path):
    from covidcxr import preprocess

    images = np.random.default_rng(2).random((5, 32, 32)).astype(np.float32)
    networks = []
    for seed in (1, 2, 3):
        keras.utils.set_random_seed(seed)
        networks.append(build_vgg(16, (32, 32, 1), width=1 / 16, head=(4,)))
    std = preprocess.Standardizer().fit(images)
    singles = [models.Component(n, std)(images) for n in networks]
    assert not np.allclose(singles[0], singles[1], atol=1e-4)  # the members differ, or the test could not fail
    ensemble = models.Component(networks[0], std, members=networks[1:], threshold={"threshold": 0.5})
    assert ensemble.networks == networks
    np.testing.assert_allclose(ensemble(images), np.mean(singles, axis=0), atol=1e-6)
    folder = ensemble.save(tmp_path / "clf")
    assert folders.member_files(folder) == ["member1.keras", "member2.keras"]
    assert set(folders.folder_files(folder)) == {"model.keras", "standardizer.json", "run.json", "threshold.json",
                                                "member1.keras", "member2.keras"}
    loaded = models.Component.load(folder)
    assert len(loaded.networks) == 3
    np.testing.assert_allclose(loaded(images), ensemble(images), atol=1e-6)
    # a single network written over the ensemble's folder leaves no member behind to be averaged in
    models.Component(networks[0], std).save(folder)
    assert folders.member_files(folder) == []
    np.testing.assert_allclose(models.Component.load(folder)(images), singles[0], atol=1e-6)


def test_a_mixed_precision_component_scores_as_trained_once_saved_and_loaded(tmp_path):
    from covidcxr import preprocess, training

    rng = np.random.default_rng(0)
    images = rng.random((6, 32, 32)).astype(np.float32)
    with training.precision("mixed_bfloat16"):
        model = build_vgg(16, (32, 32, 1), width=1 / 16, head=(4,))
    component = models.Component(model, preprocess.Standardizer().fit(images), info={"run_id": "x"})
    folder = component.save(tmp_path / "clf")
    loaded = models.Component.load(folder)  # under the float32 default: each layer keeps the policy it was built under
    assert loaded.model.get_layer("block1_conv1").compute_dtype == "bfloat16"
    out, features = loaded(images), loaded.features(images)
    assert out.dtype == features.dtype == np.float32 and np.all(np.isfinite(features))
    np.testing.assert_array_equal(out, component(images))
    twin = build_vgg(16, (32, 32, 1), width=1 / 16, head=(4,))  # float32, the same weights
    twin.set_weights(model.get_weights())
    assert not np.array_equal(out, models.Component(twin, component.standardizer)(images))  # bfloat16 maths


@pytest.mark.parametrize("kind", ["single", "ensemble", "mixed_bfloat16"])
def test_one_forward_pass_gives_the_scores_and_the_features_of_two(kind):
    """Component.evidence (the stages' and serving's single pass) answers what __call__ and a features-only pass
    would, bit for bit, so that a probability or OOD score never depends on which of them computed it."""
    from covidcxr import ood, preprocess, training

    images = np.random.default_rng(3).random((70, 32, 32)).astype(np.float32)  # two batches of 64
    networks = []
    for seed in (1, 2, 3)[: 3 if kind == "ensemble" else 1]:
        keras.utils.set_random_seed(seed)
        with training.precision("mixed_bfloat16" if kind == "mixed_bfloat16" else "float32"):
            networks.append(build_vgg(16, (32, 32, 1), width=1 / 16, head=(4,)))
    component = models.Component(networks[0], preprocess.Standardizer().fit(images), members=networks[1:])
    outputs, features = component.evidence(images)
    np.testing.assert_array_equal(outputs, component(images))
    separate = models.Component(networks[0], component.standardizer, members=networks[1:])  # its own traced graphs
    inputs = separate.inputs(images)
    extractor = keras.Model(networks[0].inputs[0], separate.feature_layers())
    pooled = np.concatenate([np.asarray(keras.ops.mean(keras.ops.cast(t, "float32"), axis=(1, 2)))
                             if len(t.shape) == 4 else np.asarray(t, dtype=np.float32)
                             for t in extractor(inputs, training=False)], axis=1)
    np.testing.assert_allclose(features, pooled, rtol=1e-5, atol=1e-6)
    assert features.shape == (70, sum(int(t.shape[-1]) for t in separate.feature_layers()))
    np.testing.assert_array_equal(component.features(images), features)
    empty_out, empty_features = component.evidence(images[:0])
    assert empty_out.shape == (0, 1) and empty_features.shape == (0, features.shape[1])
    # the classifier's single pass: covid_probability and out_of_distribution, the same numbers
    masks = np.ones_like(images, dtype=bool)
    component.ood = ood.MahalanobisDetector(n_components=2).fit(models.ood_features(component, images, masks, "c"))
    component.ood.calibrate(models.out_of_distribution(component, images[:10], masks[:10], "c").score)
    p, scored = models.classifier_evidence(component, images, masks, "c")
    np.testing.assert_array_equal(p, models.covid_probability(component, images, masks, "c"))
    alone = models.out_of_distribution(component, images, masks, "c")
    np.testing.assert_array_equal(scored.score, alone.score)
    np.testing.assert_array_equal(scored.compact, alone.compact)
    component.ood = None
    p_plain, none = models.classifier_evidence(component, images, masks, "c")
    assert none is None
    np.testing.assert_array_equal(p_plain, p)
