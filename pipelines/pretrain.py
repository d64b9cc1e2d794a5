"""Stage `pretrain`: self-supervised (SimCLR) pretraining of the VGG conv base on the cached images but the tests.

The images of the working-size cache (all sources, all views; no label is read) train one encoder per backbone of
`pretrain.backbones`, at `pretrain.width` and the cache's working size; none by default, and then the stage only
writes an empty index and costs nothing. Left out, read from the split tables' `split` column: the covid task's test
split (the images the classifiers are tested on: in a held-out run, every image the `split.holdout` rules hold out,
with the other sources' test patients) and the projection task's `test` and `external` splits (the images the filter
is tested on, every covid test patient's films among them, and the held-out images it never learns from; the U-Net
never starts from the encoder, so its splits stay in). Unlabelled as they are, an encoder trained on them would make
every test and held-out figure of a `weights: pretrained` model transductive. `weights: pretrained` in
`train_classifier` and `train_projection` (and so the audit's source classifier) starts the VGG's conv base from it;
a model of another depth, width or working size is refused (``covidcxr.models.EncoderMismatchError``, naming the
file).
"""

from __future__ import annotations

import numpy as np

from covidcxr import models, pretrain, tracking, training
from pipelines import _common, _models, _tracking

METRICS = "reports/pretrain/metrics.json"
INDEX = "encoders.json"  # {backbone: weights file} of the folder; {} when pretrain.backbones is empty
MLFLOW_EXPERIMENT = "covidcxr-pretrain"  # shared by every paper experiment: the stage never reads split.experiment
#: (task, split) of the split tables whose images pretraining never sees: the classifiers' test, held-out rows included,
#: and the projection filter's test and held-out images (train_projection can start from the encoder too).
UNSEEN = (("covid", "test"), ("projection", "test"), ("projection", "external"))


def unseen(index) -> np.ndarray:
    """Positions in the cache ``index`` of the images of the :data:`UNSEEN` splits."""
    held = [part[0] for task, split in UNSEEN for name, part in _models.split_arrays(task, index).items()
            if name == split]
    return np.unique(np.concatenate(held)) if held else np.array([], dtype=int)


def run(p: dict) -> dict:
    log = _common.setup_logging()
    _tracking.setup_tracking()
    index, images, _ = _models.load_cache()
    left_out = unseen(index)
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
            log.info("pretrained %s encoder: %d images (%d test or held-out images left out) x %d epochs in %.0f s, "
                     "contrastive loss %.3f -> %.3f, partner found %.2f -> %.2f", backbone, len(images), len(left_out),
                     p["epochs"], figures["seconds"],
                     figures["loss_first"], figures["loss_last"], figures["accuracy_first"], figures["accuracy_last"])
        _common.write_json(out / INDEX, {b: _common.pretrained_encoder(b).rpartition("/")[2] for b in result})
    if not result:
        log.info("pretrain: no backbones in pretrain.backbones, no encoder (weights: pretrained needs one)")
    _common.write_json(METRICS, result)
    return result


if __name__ == "__main__":
    run(_common.params("pretrain"))
    _common.finish()
