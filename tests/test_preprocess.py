import numpy as np
import pytest

from covidcxr import preprocess


def test_resize_shapes_and_range():
    img = np.linspace(0, 1, 300 * 200, dtype=np.float32).reshape(300, 200)
    out = preprocess.resize(img, 64)
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert out[0].mean() < out[-1].mean()  # orientation kept
    assert preprocess.resize(img, (30, 20)).shape == (30, 20)


def test_minmax():
    img = np.array([[2.0, 4.0], [6.0, 10.0]])
    np.testing.assert_allclose(preprocess.minmax(img), [[0, 0.25], [0.5, 1.0]])
    assert not preprocess.minmax(np.full((3, 3), 7.0)).any()


def test_standardizer_uses_training_statistics_only(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.normal(0.3, 0.1, size=(40, 16, 16))
    test = rng.normal(0.8, 0.5, size=(10, 16, 16))  # very different: must not move the fitted statistics
    s = preprocess.Standardizer().fit(train)
    assert s.mean_ == pytest.approx(train.mean(), abs=1e-9) and s.std_ == pytest.approx(train.std(), rel=1e-6)
    before = (s.mean_, s.std_)
    z = s.transform(test)
    assert (s.mean_, s.std_) == before
    np.testing.assert_allclose(z, (test - train.mean()) / train.std(), rtol=1e-4, atol=1e-4)
    z_train = s.transform(train)
    assert abs(z_train.mean()) < 1e-4 and abs(z_train.std() - 1) < 1e-3

    s.save(tmp_path / "std.json")
    again = preprocess.Standardizer.load(tmp_path / "std.json")
    np.testing.assert_array_equal(again.transform(test), z)


def test_standardizer_refuses_unfitted_and_empty():
    with pytest.raises(RuntimeError, match="not fitted"):
        preprocess.Standardizer().transform(np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="no images"):
        preprocess.Standardizer().fit(np.zeros((0, 2, 2)))


def _float16_grid() -> np.ndarray:
    """Float32 values around every rounding decision of float16 in [-65504, 65504]: each float16 value, each midpoint
    between neighbours (the ties), one float32 step either side of both, a stride through all float32 patterns, and the
    subnormal range of float16 densely."""
    halves = np.arange(0, 0x7BFF + 1, dtype=np.uint16).view(np.float16).astype(np.float32)  # 0 .. 65504
    mids = (halves[:-1].astype(np.float64) + halves[1:]) / 2
    near = np.concatenate([halves, mids.astype(np.float32)])
    bits = near.view(np.uint32)
    around = np.concatenate([bits, bits + 1, bits - 1]).view(np.float32)
    stride = np.arange(0, np.float32(65504).view(np.uint32), 997, dtype=np.uint32).view(np.float32)
    subnormal = np.linspace(0, 2**-13, 200_001, dtype=np.float32)
    grid = np.concatenate([around, stride, subnormal])
    grid = grid[np.isfinite(grid) & (np.abs(grid) <= 65504)]
    return np.concatenate([grid, -grid])


def test_working_precision_is_numpys_float16_round_trip_bit_for_bit():
    grid = _float16_grid()
    expected = grid.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(preprocess.to_working_precision(grid).view(np.uint32), expected.view(np.uint32))
    odd = np.array([np.nan, np.inf, -np.inf, 65520.0, 70000.0, -1e9, 0.5], dtype=np.float32)  # numpy's own path
    np.testing.assert_array_equal(preprocess.to_working_precision(odd), odd.astype(np.float16).astype(np.float32))
    image = np.random.default_rng(0).random((37, 53)).astype(np.float32)
    out = preprocess.to_working_precision(image)
    assert out.shape == image.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, image.astype(np.float16).astype(np.float32))


def test_working_image_is_resize_then_minmax_at_cache_precision():
    pixels = np.random.default_rng(1).normal(1000, 300, (300, 260)).astype(np.float32)
    resized = preprocess.resize(pixels, 64)
    expected = ((resized - resized.min()) / (resized.max() - resized.min())).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(preprocess.working_image(pixels, 64), expected)


# --- the classifiers' input transform: lung crop, intensity normalisation ------------------------------------------


def lungs(size: int = 32, rows=(10, 22), cols=(6, 26)) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


def test_lung_box_is_square_widened_by_the_margin_and_inside_the_image():
    r0, r1, c0, c1 = preprocess.lung_box(lungs(), margin=0.1)  # lungs 12 x 20: side 20 * 1.2 = 24
    assert (r1 - r0, c1 - c0) == (24, 24)
    assert r0 <= 10 and r1 >= 22 and c0 <= 6 and c1 >= 26
    assert preprocess.lung_box(lungs(rows=(0, 30), cols=(0, 8)), margin=0.2) == (0, 32, 0, 32)  # cut to the image
    r0, r1, c0, c1 = preprocess.lung_box(lungs(rows=(0, 8), cols=(0, 8)), margin=0.25)
    assert (r0, c0) == (0, 0) and r1 - r0 == c1 - c0 == 12  # moved inside, not shrunk
    assert preprocess.lung_box(np.zeros((32, 32), bool)) == (0, 32, 0, 32)  # no lungs: the whole image


def test_place_in_box_puts_a_crop_s_map_back_where_the_crop_was():
    box = (4, 20, 8, 24)
    back = preprocess.place_in_box(np.ones((1, 32, 32), np.float32), np.array([box]), 32)[0]
    assert back[4:20, 8:24].min() == pytest.approx(1.0) and back.sum() == pytest.approx(16 * 16)
    heat = np.random.default_rng(0).random((2, 32, 32)).astype(np.float32)
    whole = np.array([[0, 32, 0, 32]] * 2)
    np.testing.assert_array_equal(preprocess.place_in_box(heat, whole, 32), heat)


@pytest.mark.parametrize("normalise", [preprocess.equalize, preprocess.clahe])
def test_intensity_normalisation_keeps_zero_one_and_order(normalise):
    rng = np.random.default_rng(1)
    image = np.clip(rng.normal(0.3, 0.05, (32, 32)), 0, 1).astype(np.float32)  # a dull, low-contrast image
    out = normalise(image)
    assert out.shape == image.shape and out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0
    assert out.std() > 2 * image.std()  # contrast spread out
    assert not normalise(np.full((8, 8), 0.4, np.float32)).any()  # a constant image maps to zeros
    if normalise is preprocess.equalize:  # global equalisation is monotone: the order of pixels is kept
        order = np.argsort(image, axis=None)
        assert (np.diff(out.ravel()[order]) >= -1e-7).all()


def test_equalize_lungs_takes_the_histogram_of_the_lungs_alone():
    rng = np.random.default_rng(3)
    image = np.clip(rng.normal(0.8, 0.05, (32, 32)), 0, 1).astype(np.float32)  # bright soft tissue and borders
    mask = lungs()
    image[mask] = np.clip(rng.normal(0.2, 0.02, mask.sum()), 0, 1)  # dull, dark lungs: a small part of the image
    whole, in_lungs = preprocess.equalize(image), preprocess.equalize(image, mask=mask)
    assert in_lungs.shape == image.shape and in_lungs.dtype == np.float32
    assert 0.0 <= in_lungs.min() and in_lungs.max() <= 1.0
    assert in_lungs[mask].std() > 2 * whole[mask].std()  # the lungs' own contrast spread over [0, 1]
    assert in_lungs[mask].std() == pytest.approx(np.sqrt(1 / 12), abs=0.03)  # ~uniform inside the lungs
    order = np.argsort(image, axis=None)  # still one monotone map of the whole image
    assert (np.diff(in_lungs.ravel()[order]) >= -1e-7).all()
    no_lungs = np.zeros_like(mask)
    np.testing.assert_array_equal(preprocess.equalize(image, mask=no_lungs), whole)  # nothing to read: global
    prepared = preprocess.InputTransform(crop=True, intensity="equalize-lungs").apply(image[None], mask[None], "c")
    assert prepared.images[0][prepared.masks[0]].std() > 0.25
    with pytest.raises(ValueError, match="equalize-lungs needs lung masks"):
        preprocess.InputTransform(intensity="equalize-lungs").apply(image[None], None, "c")


def test_input_transform_default_is_the_papers_input():
    rng = np.random.default_rng(2)
    images = rng.random((3, 32, 32)).astype(np.float32)
    masks = np.stack([lungs()] * 3)
    for variant in "cde":
        prepared = preprocess.InputTransform().apply(images, masks, variant)
        np.testing.assert_array_equal(prepared.images, preprocess.apply_variant(images, masks, variant))
        np.testing.assert_array_equal(prepared.boxes, [[0, 32, 0, 32]] * 3)
    assert preprocess.InputTransform().apply(images, None, "c").images.shape == (3, 32, 32)  # c needs no masks
    with pytest.raises(ValueError, match="needs lung masks"):
        preprocess.InputTransform().apply(images, None, "d")
    with pytest.raises(ValueError, match="needs lung masks"):
        preprocess.InputTransform(crop=True).apply(images, None, "c")


def test_lung_crop_drops_what_lies_outside_the_lungs_and_crops_the_masks_alike():
    image = np.full((32, 32), 0.4, np.float32)
    image[1:4, 1:6] = 1.0  # a burned-in marker in the corner, far from the lungs
    mask = lungs()
    image[mask] = 0.2 + 0.01 * np.arange(mask.sum())
    prepared = preprocess.InputTransform(crop=True, margin=0.05).apply(image[None], mask[None], "c")
    assert prepared.images.shape == (1, 32, 32) and prepared.images.max() == pytest.approx(1.0)  # min-max again
    r0, r1, c0, c1 = prepared.boxes[0]
    assert r0 > 3 or c0 > 5  # the marker is outside the box
    assert prepared.masks[0].mean() > mask.mean()  # the lungs fill more of the cropped image
    d = preprocess.InputTransform(crop=True, margin=0.05).apply(image[None], mask[None], "d")
    assert not d.images[0][~d.masks[0]].any()  # variant d keeps exactly the cropped mask


def test_input_transform_round_trip_and_refusals(tmp_path):
    transform = preprocess.InputTransform(crop=True, margin=0.15, intensity="clahe", clip_limit=0.02)
    transform.save(tmp_path / "input.json")
    assert preprocess.InputTransform.load(tmp_path / "input.json") == transform
    assert not transform.identity and preprocess.InputTransform().identity
    with pytest.raises(ValueError, match="intensity"):
        preprocess.InputTransform(intensity="gamma")
    with pytest.raises(ValueError, match="margin"):
        preprocess.InputTransform(margin=2.0)
