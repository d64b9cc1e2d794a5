"""Stage `pretrain`: self-supervised (SimCLR) pretraining of the VGG conv base on the cached films of every patient
but the test and held-out ones.

The images of the working-size cache (all sources, all views; no label is read) train one encoder per backbone of
`pretrain.backbones`, at `pretrain.width` and the cache's working size; none by default, and then the stage only
writes an empty index and costs nothing. Left out: every film of a patient of the covid task's test split (the
patients the classifiers are tested on), of the projection task's `test` and `external` splits (the patients the
filter is tested on, every covid test patient among them, and those it never learns from), and of every patient the
`split.holdout` rules match in the manifest (a held-out source or hospital, matched on the manifest's own columns by
:func:`covidcxr.splits.rule_patients`, as the split stage matches them). Whole patients, not the tables' images: a test
or held-out patient's film that no task table holds (a finding outside the experiment's rules, an unknown projection)
is left out too. The U-Net never starts from the encoder, so the segmentation splits stay in. Unlabelled as they are,
an encoder trained on those films would make every test and held-out figure of a `weights: pretrained` model
transductive.
`weights: pretrained` in `train_classifier` and `train_projection` (and so the audit's source classifier) starts the
VGG's conv base from it; a model of another depth, width or working size is refused
(``covidcxr.models.EncoderMismatchError``, naming the file).
"""

from __future__ import annotations

import numpy as np

from covidcxr import manifest, splits
from pipelines import _common

METRICS = "reports/pretrain/metrics.json"
INDEX = "encoders.json"  # {backbone: weights file} of the folder; {} when pretrain.backbones is empty
MLFLOW_EXPERIMENT = "covidcxr-pretrain"  # shared by every paper experiment: the stage never reads split.experiment
#: (task, split) of the split tables whose patients pretraining never sees: the classifiers' test, held-out rows
#: included, and the projection filter's test and held-out patients (train_projection can start from the encoder too).
UNSEEN = (("covid", "test"), ("projection", "test"), ("projection", "external"))


def unseen(index, m, holdout: list[dict]) -> np.ndarray:
    """Positions in the cache ``index`` of every film of the patients of the :data:`UNSEEN` splits and of the patients
    the ``holdout`` rules (`split.holdout`) match in the manifest ``m``."""
    from pipelines import _models

    patients = splits.rule_patients(m, holdout)  # as the split stage holds out
    for task, split in UNSEEN:
        for name, (_, rows) in _models.split_arrays(task, index).items():
            if name == split:
                patients |= set(rows["patient_id"].astype(str))
    return np.flatnonzero(index["patient_id"].astype(str).isin(patients).to_numpy())


def run(p: dict, holdout: list[dict]) -> dict:
    log = _common.setup_logging()
    if not p["backbones"]:  # the default: the empty index and report, without importing TensorFlow or reading the cache
        with _common.atomic_dir(_common.PRETRAIN_DIR) as out:
            _common.write_json(out / INDEX, {})
        log.info("pretrain: no backbones in pretrain.backbones, no encoder (weights: pretrained needs one)")
        _common.write_json(METRICS, {})
        return {}
    from covidcxr import models, pretrain, tracking, training  # TensorFlow (models) and MLflow: only to train
    from pipelines import _models, _tracking

    _tracking.setup_tracking()
    index, images, _ = _models.load_cache()
    left_out = unseen(index, manifest.read_csv(_common.MANIFEST), holdout)
    images = np.delete(images, left_out, axis=0)
    size = int(images.shape[1])
    result = {}
    with _common.atomic_dir(_common.PRETRAIN_DIR) as out:
        for backbone in p["backbones"]:
            depth = int(backbone.removeprefix("vgg"))
            training.seed_everything(p["seed"])
            with tracking.run(MLFLOW_EXPERIMENT, f"pretrain-{backbone}", params={**p, "backbone": backbone},
                              tags=_tracking.repro_tags("pretrain", "pretrain")) as active:
                encoder, history, std = pretrain.pretrain(
                    images, depth=depth, width=float(p["width"]), epochs=int(p["epochs"]),
                    batch_size=int(p["batch_size"]), lr=float(p["lr"]), temperature=float(p["temperature"]),
                    projection=tuple(p["projection"]), augment=p["augment"], seed=int(p["seed"]),
                    on_epoch_end=tracking.log_epoch)
                figures = {"n_images": int(len(images)), "n_left_out": int(len(left_out)), "epochs": int(p["epochs"]),
                           "seconds": history["seconds"][-1],
                           "loss_first": history["loss"][0], "loss_last": history["loss"][-1],
                           "accuracy_first": history["accuracy"][0], "accuracy_last": history["accuracy"][-1]}
                tracking.log_finite_metrics(figures, prefix="pretrain.")
                name = _common.pretrained_encoder(backbone).rpartition("/")[2]
                models.save_encoder(encoder, out / name, depth=depth, width=float(p["width"]), size=size,
                                    info={"run_id": active.info.run_id, "seed": int(p["seed"]),
                                          "standardizer": std.to_dict(), **figures})
            result[backbone] = figures
            log.info("pretrained %s encoder: %d images (%d films of test or held-out patients left out) x %d epochs in "
                     "%.0f s, contrastive loss %.3f -> %.3f, partner found %.2f -> %.2f", backbone, len(images),
                     len(left_out), p["epochs"], figures["seconds"],
                     figures["loss_first"], figures["loss_last"], figures["accuracy_first"], figures["accuracy_last"])
        _common.write_json(out / INDEX, {b: _common.pretrained_encoder(b).rpartition("/")[2] for b in result})
    _common.write_json(METRICS, result)
    return result


if __name__ == "__main__":
    run(_common.params("pretrain"), _common.params("split.holdout"))
    _common.finish()
