"""tf.distribute: the same training under MirroredStrategy (two logical CPU devices) and under the default strategy.

Each case runs in its own Python process: logical devices must be configured before TensorFlow initialises them.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tests.infra.conftest import run

pytestmark = [pytest.mark.infra, pytest.mark.slow]

# Trains a dropout-free tiny U-Net from the same weights under each strategy: 3 steps on one global batch of 12 images
# (6 per replica when mirrored). One batch per step, because the distributed dataset shuffles in another order.
SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from covidcxr import models, training

rng = np.random.default_rng(0)
x = rng.random((12, 16, 16), dtype=np.float32)
y = (x > 0.5).astype(np.float32)
keras.utils.set_random_seed(0)
weights = models.build_unet(2, (16, 16, 1), dropout_scale=0.0).get_weights()
out = {}
for name in sys.argv[1:]:
    strategy = training.distribution_strategy(name)
    with strategy.scope():
        model = models.build_unet(2, (16, 16, 1), dropout_scale=0.0)
        model.set_weights(weights)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=models.bce_dice_loss)
    history = training.fit(model, (x, y), (x, y), epochs=3, batch_size=12, seed=3)
    out[name] = {"replicas": strategy.num_replicas_in_sync, "loss": history["loss"], "val_loss": history["val_loss"],
                 "kernel": model.get_layer("mask").get_weights()[0].ravel().tolist()}
print("RESULT " + json.dumps(out))
"""


def result(output: str) -> dict:
    return json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[len("RESULT "):])


def test_mirrored_strategy_on_two_cpus_trains_like_the_default_strategy():
    out = result(run([sys.executable, "-c", SCRIPT, "default", "mirrored"], timeout=120).stdout)
    default, mirrored = out["default"], out["mirrored"]
    assert default["replicas"] == 1 and mirrored["replicas"] == 2
    assert default["loss"][0] > default["loss"][1] > default["loss"][2]  # it trained
    np.testing.assert_allclose(mirrored["loss"], default["loss"], rtol=1e-5)
    np.testing.assert_allclose(mirrored["val_loss"], default["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(mirrored["kernel"], default["kernel"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tf_config, match", [
    (None, "strategy must be one of"),  # the name below is "tpu"
    ("{not json", "TF_CONFIG is not valid JSON"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}', "not in its cluster"),
])
def test_unknown_strategies_and_malformed_tf_config_are_refused(monkeypatch, tf_config, match):
    """Refused before TensorFlow builds anything (two-worker training itself: tests/infra/test_multiworker.py)."""
    from covidcxr import training

    if tf_config is not None:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ValueError, match=match):
        training.distribution_strategy("tpu" if tf_config is None else "multi-worker")
