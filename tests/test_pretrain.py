"""Self-supervised pretraining: the contrastive loss, a seeded encoder that the classifiers start from, the stage."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from covidcxr import models, preprocess, pretrain, training


def test_nt_xent_rewards_views_that_find_each_other():
    rng = np.random.default_rng(0)
    z = tf.constant(rng.normal(size=(8, 16)), tf.float32)
    matched, matched_acc = pretrain.nt_xent(z, z + 0.01, temperature=0.2)
    shuffled, _ = pretrain.nt_xent(z, tf.roll(z, 1, axis=0), temperature=0.2)
    assert float(matched_acc) == 1.0 and float(matched) < float(shuffled)
    # the loss is the cross-entropy of picking the partner among the other 2B - 1 embeddings
    zn = tf.math.l2_normalize(tf.concat([z, z], 0), axis=1).numpy()
    logits = zn @ zn.T / 0.5
    np.fill_diagonal(logits, -np.inf)
    partner = np.r_[np.arange(8, 16), np.arange(8)]
    expected = np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(16), partner])
    assert float(pretrain.nt_xent(z, z, temperature=0.5)[0]) == pytest.approx(expected, rel=1e-5)


def images(n: int = 24, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:size, :size] / size
    return np.stack([np.clip(0.5 + 0.3 * np.sin(6 * (xx * rng.uniform(0.5, 2) + yy * rng.uniform(0.5, 2)))
                             + 0.05 * rng.normal(size=(size, size)), 0, 1) for _ in range(n)]).astype(np.float32)


def train(seed: int):
    training.seed_everything(seed)
    return pretrain.pretrain(images(), depth=16, width=1 / 16, epochs=2, batch_size=8, lr=1e-3, projection=(16, 8),
                             augment="strong", seed=seed)


@pytest.mark.slow
def test_pretraining_is_seeded_and_learns_a_vgg_encoder():
    encoder, history, std = train(1)
    again, history_again, _ = train(1)
    assert history["loss"] == history_again["loss"] and len(history["loss"]) == 2
    for a, b in zip(encoder.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [layer.name for layer in encoder.layers if isinstance(layer, keras.layers.Conv2D)][-1] == "block5_conv3"
    assert std.n_images_ == 24 and 0.0 <= history["accuracy"][-1] <= 1.0
    keras.utils.set_random_seed(1)
    start = models.build_vgg_encoder(16, (32, 32, 1), width=1 / 16)
    assert not np.array_equal(start.get_weights()[0], encoder.get_weights()[0])  # it trained


def test_pretraining_needs_views_that_differ():
    with pytest.raises(ValueError, match="augmentation"):
        pretrain.pretrain(images(4), depth=16, width=1 / 16, epochs=1, augment="none")


@pytest.mark.slow
def test_the_stage_writes_an_encoder_that_weights_pretrained_loads(tmp_path, monkeypatch):
    """`pretrain` on a tiny cache, every film of its test and held-out patients left out: the encoder, its JSON and
    index, the report; then `weights: pretrained`."""
    from pipelines import _common, _models
    from pipelines import pretrain as stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cache = tmp_path / _common.CACHE_DIR
    cache.mkdir(parents=True)
    x = images(16)
    ids = [f"i{i}" for i in range(16)]
    # one film per patient, but p0's second film i7 and p8's two films i8 (Cohen, Germany) and i9 (site unknown)
    patients = [f"p{i}" for i in range(7)] + ["p0", "p8", "p8"] + [f"p{i}" for i in range(10, 16)]
    sites = [None] * 8 + ["Germany"] + [None] * 7
    m = pd.DataFrame({"image_id": ids, "patient_id": patients, "source": ["cohen"] * 10 + ["kermany"] * 6,
                      "site": sites, "label": "negative"})
    preprocess.save_cache(cache, m[["image_id", "source", "patient_id", "site"]], x, np.zeros(x.shape, bool))
    # a held-out run's split tables: i0-i1 the classifiers' test (a held-out source's rows and the others' test
    # patients), i2 a held-out image the projection filter never learns from (its `external` split), i3 the filter's
    # test image (train_projection can start from the encoder: its test figures would be transductive). i7 (a
    # finding outside the experiment's rules, an unknown projection) and p8's films are in no task table.
    covid = pd.DataFrame({"image_id": ids[:7], "patient_id": patients[:7], "label": "negative",
                          "split": ["test", "test", "train", "train", "val", "train", "train"]})
    projection = pd.DataFrame({"image_id": ids[1:5], "patient_id": patients[1:5], "label": "frontal",
                               "split": ["test", "external", "test", "train"]})
    _common.write_csv(_common.split_table("covid"), covid)
    _common.write_csv(_common.split_table("projection"), projection)
    _common.write_csv(_common.MANIFEST, m)  # with the tables, the runs' data version
    held_out = [{"source": "cohen", "site": "Germany"}]  # split.holdout: a held-out hospital's patient p8
    index = _models.load_cache()[0]
    assert list(stage.unseen(index, m, [])) == [0, 1, 2, 3, 7]  # i7: a covid test patient's film in no table
    assert list(stage.unseen(index, m, held_out)) == [0, 1, 2, 3, 7, 8, 9]  # i9: the held-out patient's other film
    p = {"backbones": ["vgg16"], "width": 1 / 16, "epochs": 1, "batch_size": 8, "lr": 1e-3, "temperature": 0.2,
         "projection": [8], "augment": "strong", "seed": 0}
    result = stage.run(p, held_out)
    assert result["vgg16"]["n_images"] == 9 and result["vgg16"]["n_left_out"] == 7  # no test or held-out patient
    assert result["vgg16"]["epochs"] == 1
    assert json.loads((tmp_path / stage.METRICS).read_text())["vgg16"]["loss_last"] > 0
    assert json.loads((tmp_path / _common.PRETRAIN_DIR / stage.INDEX).read_text()) == {
        "vgg16": "encoder_vgg16.weights.h5"}
    path = _models.vgg_weights("pretrained", 16)
    assert models.encoder_spec(path)["size"] == 32
    models.build_vgg(16, (32, 32, 1), weights=path, width=1 / 16, head=(4,))
    with pytest.raises(FileNotFoundError, match="add vgg19 to pretrain.backbones"):
        _models.vgg_weights("pretrained", 19)
    assert _models.vgg_weights("none", 19) == "none"
    assert stage.run({**p, "backbones": []}, held_out) == {}  # no backbone: nothing trained, an empty index
    assert json.loads((tmp_path / _common.PRETRAIN_DIR / stage.INDEX).read_text()) == {}
