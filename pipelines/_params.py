"""The typed schema of ``params.yaml``: one pydantic model per section, with the defaults in one place.

A stage validates the sections it reads before any work (``_common.params``): a wrong type, an unknown key, a value
out of range, an unknown variant, backbone or source stops it with a :class:`ParamsError` naming the key and what is
allowed. ``params.yaml`` may leave out keys that have a default here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The library's vocabularies, spelled out so that this module imports nothing of covidcxr (every stage imports it:
# a dependency on the library here would make every stage depend on those modules); tests/pipelines/test_params.py
# checks that they equal the library's own (datasets.NAMES, preprocess.VARIANTS, metrics.THRESHOLD_OBJECTIVES, ...).
SOURCES = ("bimcv", "cohen", "demo", "generic", "jsrt", "kermany", "montgomery", "nih", "padchest", "shenzhen")
MANIFEST_COLUMNS = ("image_id", "path", "source", "patient_id", "projection", "view_position", "label", "finding",
                    "site", "sex", "age", "width", "height", "photometric", "bits_stored", "sha256", "mask_path",
                    "modality", "header_view_position", "pixel_sha256")
Variant = Literal["c", "d", "e"]
Backbone = Literal["vgg16", "vgg19"]
Strategy = Literal["default", "mirrored", "multi-worker"]
TuningStrategy = Literal["default", "mirrored"]
Precision = Literal["float32", "mixed_bfloat16", "mixed_float16"]
Fold = Literal["luminance", "sum"]
ThresholdObjective = Literal["youden", "f1", "sensitivity"]
SelectionMetric = Literal["roc_auc", "average_precision", "accuracy", "sensitivity", "specificity", "f1", "precision"]
Source = Literal[SOURCES]  # type: ignore[valid-type]
AugmentLevel = Literal["none", "basic", "strong"]
LRSchedule = Literal["constant", "cosine"]
Sampling = Literal["class", "balanced", "source"]
Intensity = Literal["none", "equalize", "equalize-lungs", "clahe"]
Share = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[int, Field(ge=1)]
Rate = Annotated[float, Field(gt=0.0, le=1.0)]


class ParamsError(ValueError):
    """``params.yaml`` (or an override) holds a value the stage cannot use."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --- data ------------------------------------------------------------------------------------------------------------


class IngestSource(BaseModel):
    """One source: its adapter and folder; extra keys are the adapter's options (e.g. ``on_missing: skip``)."""

    model_config = ConfigDict(extra="allow")
    name: Source
    root: str


class Ingest(Section):
    sources: list[IngestSource] = Field(min_length=1)
    max_pixels: Positive = 64_000_000
    max_reject_fraction: Share = 0.05
    pseudonymize: bool = True
    salt: str = "covidcxr"
    max_age: Annotated[int, Field(ge=1)] | None = 90
    workers: Positive | None = None


class Validate(Section):
    expectations: str = "expectations"


class Fractions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: Share
    val: Share
    test: Share

    @model_validator(mode="after")
    def _sum_to_one(self) -> Fractions:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self


class Rule(BaseModel):
    """Manifest rows whose columns equal these values (``source: cohen, label: covid``)."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _known_columns(self) -> Rule:
        values = self.model_extra or {}
        unknown = sorted(set(values) - set(MANIFEST_COLUMNS))
        if unknown:
            raise ValueError(f"rule columns {unknown} are not manifest columns ({', '.join(MANIFEST_COLUMNS)})")
        if not values:
            raise ValueError("a rule needs at least one column, e.g. {source: cohen, label: covid}")
        if "source" in values and values["source"] not in SOURCES:
            raise ValueError(f"unknown source {values['source']!r} (allowed: {', '.join(SOURCES)})")
        return self


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    positives: list[Rule] = Field(min_length=1)
    negatives: list[Rule] = Field(min_length=1)
    curate: bool = False


class Split(Section):
    seed: int = 42
    fractions: Fractions = Fractions(train=0.6, val=0.2, test=0.2)
    fractions_segmentation: Fractions | None = None
    tolerance: Share = 0.1
    experiment: str = "demo"
    holdout: list[Rule] = []  # rows of the covid task that are the whole test split (held-out sources or hospitals)
    holdout_with_test: bool = False  # true: the rest is split train/val/test too, and the held-out rows join its test
    segmentation_external: list[Source] = []
    experiments: dict[str, Experiment] = Field(min_length=1)

    @model_validator(mode="after")
    def _experiment_is_defined(self) -> Split:
        if self.experiment not in self.experiments:
            raise ValueError(f"experiment {self.experiment!r} is not one of the experiments defined here "
                             f"({', '.join(self.experiments)})")
        return self


class Cache(Section):
    size: Annotated[int, Field(ge=16, multiple_of=16)] = 64
    workers: Positive = 1


# --- models ----------------------------------------------------------------------------------------------------------


class AugmentSpec(BaseModel):
    """An augmentation by its parts (``covidcxr.training.Augmentation``); unnamed parts are off."""

    model_config = ConfigDict(extra="forbid")
    shift: Annotated[float, Field(ge=0.0, le=0.5)] = 0.0
    rotate: Annotated[float, Field(ge=0.0, le=45.0)] = 0.0
    scale: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    gamma: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    contrast: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    brightness: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    noise: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0


# false/none: off; true/basic: the original shifts and brightness; strong: small affine, gamma, contrast, noise
Augment = bool | AugmentLevel | AugmentSpec


class Training(Section):
    epochs: Positive
    batch_size: Positive
    lr: Annotated[float, Field(gt=0.0, lt=1.0)]
    augment: Augment = False
    lr_schedule: LRSchedule = "constant"  # cosine: lr decays to zero over the run (covidcxr.training.learning_rate)
    strategy: Strategy = "default"
    precision: Precision = "float32"
    seed: int = 42


class VGG(Training):
    weights: str = "none"  # none | imagenet | pretrained (the pretrain stage's encoder) | a path to a weights file
    fold: Fold = "luminance"
    width: Rate = 1.0
    # class: class weights in the loss; balanced: batches drawn class-balanced; source: class- and source-balanced
    sampling: Sampling = "class"
    members: Annotated[int, Field(ge=1, le=16)] = 1  # above 1: a seed ensemble of that many networks, served as one


class TrainProjection(VGG):
    depth: Literal[16, 19] = 19
    size: Annotated[int, Field(ge=16, multiple_of=16)] | None = None  # its own cache's working size; None: cache.size
    lateral_check: bool = True  # a lateral must lie within the training laterals' features (covidcxr.projection)
    lateral_quantile: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.95  # of the validation laterals' check scores
    threshold: Share = 0.5  # P(frontal) below which the network calls lateral; saved with the filter


class TrainUnet(Training):
    f0: Positive = 16
    dropout_scale: Annotated[float, Field(ge=0.0, le=3.0)] = 1.0
    mask_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    use_tuned: bool = True


class Segment(Section):
    min_area: Share = 0.05
    max_area: Share = 0.8

    @model_validator(mode="after")
    def _ordered(self) -> Segment:
        if self.min_area > self.max_area:
            raise ValueError(f"min_area ({self.min_area}) must not exceed max_area ({self.max_area})")
        return self


class ClassifierInput(BaseModel):
    """The classifiers' input transform (``covidcxr.preprocess.InputTransform``), saved in each model folder."""

    model_config = ConfigDict(extra="forbid")
    crop: bool = False            # the square box around the predicted lungs, with margin, resized to the working size
    margin: Share = 0.1           # of the box's longer side, on each side
    intensity: Intensity = "none"
    clip_limit: Annotated[float, Field(gt=0.0, le=1.0)] = 0.01  # CLAHE only


class TrainClassifier(VGG):
    input: ClassifierInput = ClassifierInput()
    variants: list[Variant] = Field(default=["c", "d", "e"], min_length=1)
    backbones: list[Backbone] = Field(default=["vgg16", "vgg19"], min_length=1)
    head: list[Positive] = [1024, 512, 64]
    calibration: Literal["platt", "none"] = "platt"
    threshold_objective: ThresholdObjective = "sensitivity"
    min_sensitivity: Rate = 0.95  # above 0: a target of 0 calls nothing positive, a threshold above every score
    ood_quantile: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.95
    ood_components: Positive = 16
    # above 0: a head learns the training negatives' source through a reversed gradient of this weight (not served)
    source_adversary: Annotated[float, Field(ge=0.0, le=10.0)] = 0.0
    source_adversary_ramp: bool = False  # true: that weight ramps up from 0 over the epochs (Ganin & Lempitsky)

    @model_validator(mode="after")
    def _ramp_on_one_machine(self) -> TrainClassifier:
        # the ramp moves its weight at each epoch's end, which only the chief runs: the other workers would keep 0
        if self.source_adversary_ramp and self.strategy == "multi-worker":
            raise ValueError("source_adversary_ramp cannot run under strategy multi-worker: the weight moves at each "
                             "epoch's end, which only the chief worker runs (the others would keep it at 0)")
        return self

    @field_validator("variants", "backbones")
    @classmethod
    def _unique(cls, value: list) -> list:
        if len(set(value)) != len(value):
            raise ValueError(f"values must be unique, got {value}")
        return value


class Pretrain(Section):
    """Self-supervised (SimCLR) pretraining of the VGG conv base on every cached image; no label is read."""

    backbones: list[Backbone] = []  # none: no encoder, and the stage costs nothing
    width: Rate = 0.125           # must equal the width of the models that start from it
    epochs: Positive = 10
    batch_size: Annotated[int, Field(ge=2)] = 64
    lr: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.001
    temperature: Annotated[float, Field(gt=0.0, le=1.0)] = 0.2
    projection: list[Positive] = Field(default=[64, 32], min_length=1)
    augment: Augment = AugmentSpec(shift=0.1, rotate=10.0, scale=0.25, gamma=0.4, contrast=0.3, brightness=0.2,
                                   noise=0.05)
    seed: int = 42

    @field_validator("backbones")
    @classmethod
    def _unique(cls, value: list) -> list:
        if len(set(value)) != len(value):
            raise ValueError(f"values must be unique, got {value}")
        return value


class SiteCalibration(Section):
    """covidcxr.sites.local_calibration: films of each class a site's threshold is chosen on, and how many draws."""

    n_per_class: Annotated[int, Field(ge=2)] = 20
    draws: Positive = 200


class Evaluate(Section):
    n_boot: Positive = 500
    calibration_bins: Annotated[int, Field(ge=2)] = 10
    site_calibration: SiteCalibration = SiteCalibration()
    seed: int = 42


class Explain(Section):
    per_group: Positive = 3
    display_size: Annotated[int, Field(ge=64, le=1024)] = 224  # longest side of each Grad-CAM tile, in pixels
    images: bool = True  # false: the figures only, no image of a film written (git) or logged (MLflow)


class Grades(BaseModel):
    model_config = ConfigDict(extra="forbid")
    warn: float
    fail: float


class LungsRemoved(Grades):
    # above chance: the check takes a share of c's AUC above 0.5
    min_c_auc: Annotated[float, Field(gt=0.5, le=1.0)] = 0.6
    n_boot: Positive = 1000  # patient resamples of the share's interval, which a pass needs below warn


class HeatmapCheck(Grades):
    min_maps: Positive = 5  # fewer maps with any heat in a class: inconclusive


class SourceCheck(Grades):
    backbone: Backbone = "vgg16"
    variant: Variant = "c"
    epochs: Positive = 10
    batch_size: Positive = 8
    seed: int = 42
    min_site_images: Positive = 20  # sites with fewer training images are read as their dataset source


class Audit(Section):
    lungs_removed: LungsRemoved
    heatmap: HeatmapCheck
    source: SourceCheck


class HeldOut(BaseModel):
    """Held-out-source figures of the same settings (the experiment runner fills them): what register chooses by."""

    model_config = ConfigDict(extra="forbid")
    figure: str
    by_classifier: dict[str, float | None]
    select: list[str] = []
    seeds: Positive = 1  # how many times each held-out run was repeated (its rows then hold means over seeds)
    sources: dict[str, dict[str, dict[str, Any]]] = {}
    standard_error: dict[str, float | None] = {}  # of by_classifier over seeds: within it, candidates are tied
    mean: dict[str, float | None] = {}  # the specificity's mean over the select runs: breaks such a tie


class Register(Section):
    model_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] = "covidcxr"
    variant: Literal["c", "d", "e", "best"] = "best"
    backbone: Literal["vgg16", "vgg19", "best"] = "best"
    metric: SelectionMetric = "roc_auc"
    allow_failed_audit: bool = False
    heldout: HeldOut | None = None  # set by `python -m pipelines.experiment` from its held-out runs
    max_images: Positive = 16
    max_image_bytes: Positive = 32 << 20
    max_pixels: Positive = 36_000_000
    max_aspect: Annotated[float, Field(ge=1.0)] = 2.5
    ood_action: Literal["refuse", "flag"] = "refuse"
    min_age: Annotated[float, Field(ge=0.0, le=150.0)] | None = 18.0
    prediction_log: str | None = "sqlite:///predictions.db"


class ModelCard(Section):
    images: bool = True
    gradcam_all_variants: bool = True
    heldout_untouched: bool = False


class Space(BaseModel):
    """The U-Net search space: each name a value, ``{choices: [...]}`` or ``{low, high, log}``."""

    model_config = ConfigDict(extra="forbid")
    f0: Any
    lr: Any
    dropout_scale: Any
    batch_size: Any
    mask_threshold: Any


class TuneUnet(Section):
    study: Annotated[str, Field(min_length=1)] = "unet"
    storage: str | None = None
    n_trials: Annotated[int, Field(ge=0)] = 4
    epochs: Positive = 3
    seed: int = 42
    augment: bool = False
    lr_schedule: LRSchedule = "constant"  # the trials' schedule (covidcxr.training.learning_rate, over their epochs)
    strategy: TuningStrategy = "default"
    space: Space
    sampler: dict[str, Any] = {}
    pruner: dict[str, Any] = {}


SECTIONS: dict[str, type[Section]] = {
    "ingest": Ingest, "validate": Validate, "split": Split, "cache": Cache, "train_projection": TrainProjection,
    "train_unet": TrainUnet, "segment": Segment,
    "train_classifier": TrainClassifier, "pretrain": Pretrain, "evaluate": Evaluate, "explain": Explain, "audit": Audit,
    "register": Register, "model_card": ModelCard, "tune_unet": TuneUnet,
}


def validate(section: str, values: object, *, source: str = "params.yaml") -> dict:
    """``values`` of ``section`` checked against its schema, defaults filled in, as plain data (JSON types)."""
    if section not in SECTIONS:
        raise ParamsError(f"{source}: unknown section {section!r}; sections: {', '.join(SECTIONS)}")
    if not isinstance(values, dict):
        raise ParamsError(f"{source}: section {section!r} must be a mapping, got {type(values).__name__}")
    try:
        return SECTIONS[section].model_validate(values).model_dump(mode="json")
    except ValidationError as err:
        raise ParamsError(describe(err, section, source)) from None


def describe(err: ValidationError, section: str, source: str) -> str:
    """Every problem of a validation error on one line each: the dotted key, what is wrong, the value given."""
    lines = []
    for problem in err.errors():
        key = section + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in problem["loc"])
        if problem["type"] == "extra_forbidden":
            allowed = ", ".join(SECTIONS[section].model_fields) if len(problem["loc"]) == 1 else "see params.yaml"
            lines.append(f"{key}: unknown key (allowed: {allowed})")
            continue
        message = problem["msg"].removeprefix("Value error, ")
        given = problem.get("input")
        shown = f" (got {given!r})" if given is not None and not isinstance(given, dict | list) else ""
        lines.append(f"{key}: {message}{shown}")
    return f"{source}: invalid params:\n  " + "\n  ".join(lines)
