"""tf.distribute across machines: two worker processes on 127.0.0.1 (TF_CONFIG, CPU only) train like one process.

Each worker runs the same script on the same seeded arrays; worker 0 (the chief) then also trains the same model from
the same weights under the default strategy, for reference. Both workers are killed if they outlive the time limit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.infra.conftest import base_env, free_port, stop_group

pytestmark = [pytest.mark.infra, pytest.mark.slow]

TIMEOUT_S = 150

# A small dropout-free classifier (so both runs draw no random numbers in the model), trained as train_classifier
# trains: class weights, augmentation, accuracy and AUC; global batch 4 over 12 images, so each worker gets 2 per step.
# The hook asks to stop after epoch 1 of 3, on the chief only (the other worker never runs it).
SCRIPT = r"""
import json, sys
import numpy as np
from covidcxr import training
training.seed_everything(0)  # as the stages do, before they make the strategy
strategy = training.distribution_strategy(sys.argv[1])
import keras

rng = np.random.default_rng(0)
y = (np.arange(12) % 3 == 0).astype(np.float32)
x = rng.normal(size=(12, 8, 8)).astype(np.float32) + y[:, None, None]

def build():
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                             keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1, activation="sigmoid")])

def train(strategy):
    keras.utils.set_random_seed(0)
    start = build().get_weights()
    with strategy.scope():
        model = build()
        model.set_weights(start)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy",
                      metrics=["accuracy", keras.metrics.AUC(name="auc")])
    seen = []

    def on_epoch_end(epoch, logs):
        seen.append(epoch)
        model.stop_training = epoch == 1

    history = training.fit(model, (x, y), (x, y), epochs=3, batch_size=4, seed=3, augment=True,
                           class_weight=training.balanced_class_weight(y), on_epoch_end=on_epoch_end)
    return {"replicas": strategy.num_replicas_in_sync, "history": history, "seen": seen,
            "start": np.concatenate([w.ravel() for w in start]).tolist(),
            "weights": np.concatenate([w.ravel() for w in model.get_weights()]).tolist(),
            # on the chief alone: Keras' own predict runs collectives, which fail without the other worker
            "predict": training.predict(model, x, batch_size=5).ravel().tolist() if training.is_chief() else None}

out = {"chief": training.is_chief(), "run": train(strategy)}
if out["chief"]:  # alone now: the other worker may have exited
    out["reference"] = train(training.distribution_strategy("default"))
print("RESULT " + json.dumps(out), flush=True)
"""


def start_workers(n: int, workdir: Path) -> list[tuple[subprocess.Popen, Path]]:
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(n)]}
    workers = []
    for index in range(n):
        log = workdir / f"worker{index}.log"
        env = base_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                       CUDA_VISIBLE_DEVICES="")
        with open(log, "w") as fh:
            workers.append((subprocess.Popen([sys.executable, "-c", SCRIPT, "multi-worker"], stdout=fh,
                                             stderr=subprocess.STDOUT, env=env, start_new_session=True), log))
    return workers


def result(log: Path) -> dict:
    text = log.read_text()
    line = next((line for line in text.splitlines() if line.startswith("RESULT ")), None)
    assert line is not None, f"no result in {log.name}:\n{text[-5000:]}"
    return json.loads(line[len("RESULT "):])


def test_two_workers_train_like_one_process():
    with tempfile.TemporaryDirectory(prefix="covidcxr-mw-") as tmp:
        workers = start_workers(2, Path(tmp))
        try:
            deadline = time.monotonic() + TIMEOUT_S
            for proc, log in workers:
                try:
                    proc.wait(max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{log.name} still running after {TIMEOUT_S} s:\n{log.read_text()[-5000:]}")
                assert proc.returncode == 0, f"{log.name} exited {proc.returncode}:\n{log.read_text()[-5000:]}"
            chief, other = (result(log) for _, log in workers)
        finally:
            for proc, _ in workers:
                stop_group(proc)

    assert chief["chief"] and not other["chief"]
    run, reference = chief["run"], chief["reference"]
    assert run["replicas"] == 2 and other["run"]["replicas"] == 2 and reference["replicas"] == 1
    # the hook ran on the chief only, and its stop request stopped both workers after epoch 1
    assert run["seen"] == [0, 1] and other["run"]["seen"] == [] and reference["seen"] == [0, 1]
    assert set(run["history"]) == set(reference["history"]) >= {"loss", "auc", "val_loss", "val_accuracy"}
    assert all(len(v) == 2 for v in other["run"]["history"].values())
    assert not np.allclose(reference["weights"], reference["start"], atol=1e-3)  # it trained
    for key, values in reference["history"].items():
        np.testing.assert_allclose(run["history"][key], values, rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(other["run"]["history"][key], values, rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(run["weights"], reference["weights"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(other["run"]["weights"], reference["weights"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(run["predict"], reference["predict"], rtol=1e-4, atol=1e-6)
