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
