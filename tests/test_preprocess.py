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
