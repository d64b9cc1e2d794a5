"""Tests of covidcxr.gradcam on tiny Keras models built here (no trained weights, no covidcxr.models)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from covidcxr import gradcam as G

SIZE = 32


def _tiny_model(
    *,
    left_only: bool = False,
    fused: bool = False,
    n_classes: int = 1,
    seed: int = 0,
) -> keras.Model:
    """Input 32x32x1 -> [left-half mask] -> conv_first -> conv_last -> GAP -> Dense -> sigmoid/softmax "prediction"."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 1))
    x = inputs
    if left_only:
        half = np.zeros((1, SIZE, SIZE, 1), np.float32)
        half[:, :, : SIZE // 2] = 1.0
        x = keras.layers.Lambda(lambda t: t * half, name="left_half")(x)
    positive = keras.initializers.RandomUniform(0.05, 1.0, seed=seed)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", use_bias=False, kernel_initializer=positive,
                            name="conv_first")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", use_bias=False, kernel_initializer=positive,
                            name="conv_last")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    activation = "sigmoid" if n_classes == 1 else "softmax"
    dense_init = keras.initializers.RandomNormal(seed=seed + 1) if n_classes > 1 else positive
    if fused:
        outputs = keras.layers.Dense(n_classes, activation=activation, kernel_initializer=dense_init,
                                     name="prediction")(x)
    else:
        logit = keras.layers.Dense(n_classes, kernel_initializer=dense_init, name="logit")(x)
        outputs = keras.layers.Activation(activation, name="prediction")(logit)
    return keras.Model(inputs, outputs, name="tiny")


def _scaled_copy(model: keras.Model, scale: float, *, fused: bool = False) -> keras.Model:
    """The same network with the final dense weights multiplied by ``scale`` (a larger logit, same ranking)."""
    copy = _tiny_model(fused=fused)
    copy.set_weights(model.get_weights())
    dense = copy.get_layer("prediction" if fused else "logit")
    dense.set_weights([w * scale for w in dense.get_weights()])
    return copy


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.random((6, SIZE, SIZE, 1)).astype(np.float32)
    x[:, :, SIZE // 2:] *= 3.0  # a brighter right half: a distractor for the left-only model
    return x


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return _tiny_model()


def test_heatmaps_shape_range(model, images):
    maps = G.gradcam(model, images)
    assert maps.shape == (len(images), SIZE, SIZE) and maps.dtype == np.float32
    assert maps.min() >= 0 and np.allclose(maps.max(axis=(1, 2)), 1.0)
    np.testing.assert_allclose(G.gradcam(model, images[..., 0]), maps)  # (N, H, W) input
    np.testing.assert_allclose(G.gradcam(model, images, batch_size=4), maps, atol=1e-6)


def test_a_mixed_precision_model_gives_float32_maps_close_to_its_float32_twin(model, images):
    from covidcxr import training

    with training.precision("mixed_bfloat16"):
        mixed = _tiny_model()
    mixed.set_weights(model.get_weights())
    maps, reference = G.gradcam(mixed, images), G.gradcam(model, images)
    assert maps.dtype == np.float32 and np.allclose(maps.max(axis=(1, 2)), 1.0)
    np.testing.assert_allclose(maps, reference, atol=0.05)  # bfloat16 keeps 3 significant digits


def test_heat_follows_the_evidence(images):
    """A model whose logit depends only on the left half puts its heat there, despite a brighter right half."""
    left = _tiny_model(left_only=True)
    maps = G.gradcam(left, images)
    left_mask = np.zeros((len(images), SIZE, SIZE), bool)
    left_mask[:, :, : SIZE // 2] = True
    share = G.mass_inside(maps, left_mask)
    assert np.all(share > 0.9), share
    # the unmasked model on the same images does not: its heat follows the brighter right half
    assert np.all(G.mass_inside(G.gradcam(_tiny_model(), images), left_mask) < 0.5)


def test_gradients_on_the_logit_survive_saturation(model, images):
    calm = _scaled_copy(model, 0.002)
    saturated = _scaled_copy(model, 200.0)
    assert np.all(np.asarray(saturated(images)) == 1.0)  # float32 sigmoid saturated
    assert np.all(np.abs(np.asarray(calm(images)) - 0.5) < 0.2)
    calm_maps, saturated_maps = G.gradcam(calm, images), G.gradcam(saturated, images)
    assert np.all(saturated_maps.max(axis=(1, 2)) == 1.0)
    np.testing.assert_allclose(saturated_maps, calm_maps, atol=1e-5)

    # what the authors did: gradients of the sigmoid output vanish on the saturated model
    probe = keras.Model(saturated.inputs, [saturated.get_layer("conv_last").output, saturated.output])
    with tf.GradientTape() as tape:
        features, prob = probe(tf.convert_to_tensor(images))
        target = prob[:, 0]
    post_sigmoid = tape.gradient(target, features).numpy()
    assert np.all(post_sigmoid == 0.0)


def test_fused_dense_sigmoid_is_handled_and_restored(model, images):
    fused = _tiny_model(fused=True)
    fused.set_weights(model.get_weights())
    np.testing.assert_allclose(G.gradcam(fused, images), G.gradcam(model, images), atol=1e-6)
    saturated = _scaled_copy(model, 200.0, fused=True)
    before = np.asarray(saturated(images))
    np.testing.assert_allclose(G.gradcam(saturated, images), G.gradcam(model, images), atol=1e-5)
    assert saturated.get_layer("prediction").activation is keras.activations.sigmoid
    np.testing.assert_array_equal(np.asarray(saturated(images)), before)


def test_layer_choice(model, images):
    np.testing.assert_allclose(G.gradcam(model, images), G.gradcam(model, images, layer="conv_last"))
    first = G.gradcam(model, images, layer="conv_first")
    assert first.shape == (len(images), SIZE, SIZE)
    with pytest.raises(ValueError, match="no layer 'block5_conv4'"):
        G.gradcam(model, images, layer="block5_conv4")


def test_softmax_class_index(images):
    two = _tiny_model(n_classes=2)
    maps0 = G.gradcam(two, images, class_index=0)
    maps1 = G.gradcam(two, images, class_index=1)
    assert not np.allclose(maps0, maps1)
    with pytest.raises(ValueError, match="class_index"):
        G.gradcam(two, images, class_index=2)


@pytest.mark.parametrize("shape", [(SIZE, SIZE), (0, SIZE, SIZE, 1), (2, 3, SIZE, SIZE, 1)])
def test_gradcam_rejects_bad_images(model, shape):
    with pytest.raises(ValueError):
        G.gradcam(model, np.zeros(shape, np.float32))


def test_mass_inside():
    rng = np.random.default_rng(1)
    maps = rng.random((3, 8, 8))
    maps[2] = 0.0
    full, empty = np.ones((3, 8, 8)), np.zeros((3, 8, 8, 1))
    assert np.allclose(G.mass_inside(maps, full)[:2], 1.0) and np.isnan(G.mass_inside(maps, full)[2])
    assert np.allclose(G.mass_inside(maps, empty)[:2], 0.0)
    half = np.zeros((3, 8, 8))
    half[:, :4] = 1
    expected = maps[0, :4].sum() / maps[0].sum()
    assert G.mass_inside(maps, half)[0] == pytest.approx(expected)
    with pytest.raises(ValueError):
        G.mass_inside(maps, np.ones((3, 4, 4)))
    with pytest.raises(ValueError):
        G.mass_inside(-maps, full)


def test_jet_endpoints():
    colours = G.jet(np.array([0.0, 0.5, 1.0]))
    assert colours.shape == (3, 3)
    assert np.argmax(colours[0]) == 2 and np.argmax(colours[1]) == 1 and np.argmax(colours[2]) == 0


def test_overlay(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.normal(size=(SIZE, SIZE)).astype(np.float32)  # standardised, negative values included
    heat = np.zeros((SIZE // 2, SIZE // 2), np.float32)
    heat[:, SIZE // 4:] = 1.0
    out = G.overlay(image, heat)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    gray = G.overlay(image, heat, alpha=0.0)
    assert np.all(gray[..., 0] == gray[..., 1]) and gray.min() == 0 and gray.max() == 255
    hot = G.overlay(image[..., None], heat, alpha=1.0)
    assert np.all(hot[:, -4:, 0] > hot[:, -4:, 2])  # right: red
    assert np.all(hot[:, :4, 2] > hot[:, :4, 0])  # left: blue
    Image.fromarray(out).save(tmp_path / "overlay.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "overlay.png")), out)
    with pytest.raises(ValueError):
        G.overlay(image, heat, alpha=2.0)


@pytest.mark.parametrize("titles", [None, ["COVID p=0.97", "no finding", "c", "d", "e"]])
def test_grid(tmp_path, titles):
    rng = np.random.default_rng(3)
    tiles = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(4)]
    tiles.append(rng.random((SIZE - 8, SIZE)))  # a smaller grayscale float tile is padded
    out = G.grid(tiles, ncols=3, titles=titles)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    pad = 2
    assert out.shape[1] == 3 * (SIZE + pad) + pad
    band = (out.shape[0] - pad) // 2 - SIZE - pad
    assert band == 0 if titles is None else band > 5
    np.testing.assert_array_equal(out[pad + band: pad + band + SIZE, pad: pad + SIZE], tiles[0])
    if titles is not None:
        assert out[pad:pad + band, pad:pad + SIZE].min() < 100  # text drawn in the title band
    Image.fromarray(out).save(tmp_path / "grid.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grid.png")), out)


def test_grid_rejects_bad_arguments():
    tile = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError):
        G.grid([], ncols=2)
    with pytest.raises(ValueError):
        G.grid([tile], ncols=1, titles=["a", "b"])
    with pytest.raises(ValueError):
        G.grid([tile], ncols=0)


def test_nested_model_gives_a_clear_error(model, images):
    inputs = keras.Input((SIZE, SIZE, 1))
    outer = keras.Model(inputs, keras.layers.Activation("linear", name="head")(model(inputs)), name="outer")
    with pytest.raises(ValueError, match="nested models"):
        G.gradcam(outer, images)


def test_an_ensembles_heat_maps_are_the_mean_of_its_networks(images):
    class Ensemble:  # what heat_maps reads of a models.Component: its networks and its standardised inputs
        networks = [_tiny_model(left_only=True, seed=1), _tiny_model(seed=2)]

        @staticmethod
        def inputs(x: np.ndarray) -> np.ndarray:
            return x[..., None]

    plain = images[..., 0]
    each = [G.gradcam(n, images) for n in Ensemble.networks]
    assert not np.allclose(each[0], each[1], atol=1e-3)
    covid = np.ones(len(images), bool)
    np.testing.assert_allclose(G.heat_maps(Ensemble(), plain, covid), (each[0] + each[1]) / 2, atol=1e-6)
    Ensemble.networks = Ensemble.networks[:1]  # one network: its own maps
    np.testing.assert_array_equal(G.heat_maps(Ensemble(), plain, covid), each[0])
    with pytest.raises(ValueError, match="one call per image"):
        G.heat_maps(Ensemble(), plain, covid[:1])


def test_a_negative_call_is_explained_by_the_negated_logit(images):
    """A model whose only evidence is for the negative class (its logit falls with the left half's brightness): the
    COVID-19 logit's map is empty, so a negative call explained by it would show nothing (and the audit's negative
    class would have been graded on the few non-empty maps); the negated logit shows where it read."""
    negative = _tiny_model(left_only=True, seed=4)
    logit = negative.get_layer("logit")
    logit.set_weights([-np.abs(w) for w in logit.get_weights()])
    assert not G.gradcam(negative, images).any()  # nothing argues for COVID-19
    against = G.gradcam(negative, images, against=np.ones(len(images), bool))
    assert against.max(axis=(1, 2)).min() == pytest.approx(1.0)
    assert against[:, :, SIZE // 2 + 1:].sum() < 0.01 * against.sum()  # the heat is where it read: the left half
    mixed = G.gradcam(negative, images, against=np.arange(len(images)) % 2 == 0)  # per image
    np.testing.assert_allclose(mixed[::2], against[::2], atol=1e-6)
    assert not mixed[1::2].any()
    with pytest.raises(ValueError, match="one bool per image"):
        G.gradcam(negative, images, against=np.ones(2, bool))
