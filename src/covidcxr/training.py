"""Training loops: seeded tf.data pipelines from in-memory arrays, a Keras fit that reports every epoch, and what a
model is built under: the ``tf.distribute`` strategy (one device, every local device, or every device of several
machines) and the precision (float32, or Keras' mixed precision: bfloat16 or float16 compute, float32 weights).

Several machines (``multi-worker``): every machine runs the same command with the same data and params, and
``TF_CONFIG`` says who is who::

    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}'

(``index`` 1 on the second machine; the ports must be free and reachable between the machines). Worker 0 is the chief
(``is_chief``): only it should write outputs and log to MLflow. Keras 3's ``fit`` fails under
``MultiWorkerMirroredStrategy`` (keras-team/keras#20585), so ``fit`` trains such models with its own distributed loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = ("default", "mirrored")  # one machine: what every caller, tuning trials included, may use
MULTI_WORKER = "multi-worker"  # several machines in lockstep: train_* stages only (tuning shares a study instead)
#: Keras dtype policies a model may be built under: float32, or mixed precision (bfloat16/float16 compute, float32
#: weights; the models' logits and outputs stay float32, see ``covidcxr.models``).
PRECISIONS: tuple[str, ...] = ("float32", "mixed_bfloat16", "mixed_float16")

_multi_worker_strategy = None  # TensorFlow allows one MultiWorkerMirroredStrategy per process: made once, then reused


def tf_config(text: str | None = None) -> dict | None:
    """The parsed ``TF_CONFIG`` (``text``, else the environment's), or None when unset; a clear error when malformed."""
    text = os.environ.get("TF_CONFIG") if text is None else text
    if not text or not text.strip():
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"TF_CONFIG is not valid JSON: {err}") from None
    cluster, task = (config.get("cluster"), config.get("task")) if isinstance(config, dict) else (None, None)
    if not isinstance(cluster, dict) or not isinstance(cluster.get("worker", []), list):
        raise ValueError('TF_CONFIG needs "cluster": {"worker": ["host:port", ...]}')
    if not isinstance(task, dict) or not isinstance(task.get("type"), str) or not isinstance(task.get("index"), int):
        raise ValueError('TF_CONFIG needs "task": {"type": "worker", "index": N}')
    members = cluster.get(task["type"])
    if not isinstance(members, list) or not 0 <= task["index"] < len(members):
        raise ValueError(f"TF_CONFIG task {task['type']}:{task['index']} is not in its cluster")
    return config


def is_chief(text: str | None = None) -> bool:
    """Whether this process writes outputs and logs: always on one machine; under ``TF_CONFIG`` only the ``chief``
    task, or worker 0 of a cluster without one."""
    config = tf_config(text)
    if config is None:
        return True
    task, cluster = config["task"], config["cluster"]
    if "chief" in cluster:
        return task["type"] == "chief"
    return task["type"] == "worker" and task["index"] == 0


def distribution_strategy(name: str = "default"):
    """The ``tf.distribute`` strategy to build and compile a model under (``with strategy.scope(): ...``).

    ``default``: TensorFlow's default (one device; the behaviour without a strategy). ``mirrored``: synchronous data
    parallelism over every local GPU, or over every logical CPU device when there is no GPU; Keras' ``fit`` splits each
    global batch across the replicas, so ``batch_size`` stays the global batch. ``multi-worker``:
    ``MultiWorkerMirroredStrategy`` over the machines of ``TF_CONFIG`` (see the module docstring; without it, one
    worker), ``batch_size`` again the global batch; create it before any other TensorFlow work in the process.
    """
    global _multi_worker_strategy
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if not gpus:
            log.warning(no_gpu_note(name))
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == MULTI_WORKER:
        tf_config()  # a malformed TF_CONFIG fails here, with a message, not deep inside TensorFlow
        if _multi_worker_strategy is None:
            _multi_worker_strategy = tf.distribute.MultiWorkerMirroredStrategy()
            if not tf.config.list_logical_devices("GPU"):  # only now: the strategy must come before TensorFlow starts
                log.warning(no_gpu_note(name))
        return _multi_worker_strategy
    raise ValueError(f"strategy must be one of {[*STRATEGIES, MULTI_WORKER]}, got {name!r}")


def no_gpu_note(name: str) -> str:
    """What a GPU strategy ``name`` that found no GPU says: it trains on the CPU instead, which a GPU runner set up with
    the locked ``tensorflow-cpu`` (no CUDA kernels) would otherwise do without a word."""
    from importlib import metadata

    try:
        build = f"the installed TensorFlow is tensorflow-cpu {metadata.version('tensorflow-cpu')}, built without CUDA"
    except metadata.PackageNotFoundError:
        build = "no GPU is visible to TensorFlow (driver, CUDA_VISIBLE_DEVICES)"
    return (f"strategy {name!r} asked for the local GPUs but TensorFlow sees none: training on the CPU instead "
            f"({build}; GPU runners: README, 'Profiles')")


@contextlib.contextmanager
def precision(name: str = "float32") -> Iterator[None]:
    """Build models under the Keras dtype policy ``name`` (one of :data:`PRECISIONS`); the previous policy after.

    A layer keeps the policy it was built under, in training and once saved and loaded (evaluation and serving
    compute as training did). ``mixed_bfloat16`` trains 1.3-1.9x faster on CPUs with bfloat16 instructions (AVX512-BF16,
    AMX) and on recent GPUs; where a CPU has none it is emulated, and slower than float32 (:func:`precision_note`).
    ``mixed_float16`` is for GPUs (Keras scales the loss).
    """
    import keras

    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {name!r}")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def precision_note(name: str, cpu_flags: set[str] | None = None) -> str | None:
    """Why ``name`` may be slow here, or None: bfloat16 on a machine with no GPU whose CPU lacks bfloat16 instructions
    (``cpu_flags``: /proc/cpuinfo's, read when None; unknown flags give no note) or whose kernels are the portable ones
    (``COVIDCXR_PORTABLE_CPU``: oneDNN capped at AVX2)."""
    if name != "mixed_bfloat16":
        return None
    import tensorflow as tf

    from covidcxr import runtime

    if tf.config.list_physical_devices("GPU"):
        return None
    if cpu_flags is None and runtime.portable_cpu_requested():
        return (f"precision mixed_bfloat16 under {runtime.PORTABLE_CPU_ENV}=1 (oneDNN capped at AVX2): bfloat16 is "
                "emulated, likely slower than float32")
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    if not flags or flags & {"avx512_bf16", "amx_bf16"}:
        return None
    return ("precision mixed_bfloat16 on a CPU without bfloat16 instructions (avx512_bf16, amx_bf16): emulated, "
            "likely slower than float32")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next((set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags")), set())
    except OSError:
        return set()


@contextlib.contextmanager
def build_scope(strategy: str = "default", precision_name: str = "float32") -> Iterator[object]:
    """Where a training stage builds and compiles its model: under :func:`distribution_strategy` ``strategy`` and
    :func:`precision` ``precision_name``. Yields the strategy."""
    chosen = distribution_strategy(strategy)
    note = precision_note(precision_name)
    if note:
        log.warning(note)
    with precision(precision_name), chosen.scope():
        yield chosen


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and TensorFlow, and ask TensorFlow for deterministic kernels."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")


def learning_rate(lr: float, schedule: str = "constant", *, epochs: int = 1, n_train: int = 1, batch_size: int = 1):
    """The optimizer's learning rate: ``lr`` throughout (``constant``), or ``lr`` decayed to zero along a half cosine
    over every training step of ``epochs`` epochs of ``n_train`` images in batches of ``batch_size`` (``cosine``:
    the last epochs refine at small steps instead of ending wherever a full-size step left the weights)."""
    if schedule == "constant":
        return float(lr)
    if schedule != "cosine":
        raise ValueError(f"learning-rate schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    import keras

    steps = int(epochs) * max(1, -(-int(n_train) // int(batch_size)))  # the batches fit draws: the last one partial
    return keras.optimizers.schedules.CosineDecay(float(lr), decay_steps=steps, alpha=0.0)


#: A seed ensemble's networks train with ``seed``, ``seed + MEMBER_SEED_STRIDE``, ...: apart from other runs' seeds.
MEMBER_SEED_STRIDE = 1000


def member_seeds(seed: int, members: int) -> list[int]:
    """The seed of each network of a ``members``-network seed ensemble trained with ``seed`` (the first: ``seed``)."""
    if members < 1:
        raise ValueError(f"an ensemble has at least one member, got {members}")
    return [int(seed) + MEMBER_SEED_STRIDE * i for i in range(int(members))]


def fit_members(seeds: list[int], first, build: Callable, fit: Callable) -> tuple[list, object, dict]:
    """Train a seed ensemble (:func:`member_seeds`) one network after another.

    ``first`` is member 0, built by the caller under ``seeds[0]`` where it builds a single network (so one member trains
    exactly as one network did); ``build(seed, i)`` makes each further member after every generator is re-seeded with
    its seed; ``fit(member, seed, i)`` trains one and returns its history. Returns the members in order, the first's
    history and the model info naming them (``{}`` for one network)."""
    members, history = [], None
    for i, seed in enumerate(seeds):
        member = first
        if i:  # its own initial weights, batches and augmentation
            seed_everything(seed)
            member = build(seed, i)
        fitted = fit(member, seed, i)
        history = fitted if history is None else history
        members.append(member)
    info = {"members": len(seeds), "member_seeds": [int(s) for s in seeds]} if len(seeds) > 1 else {}
    return members, history, info


AUGMENT_LEVELS: tuple[str, ...] = ("none", "basic", "strong")


@dataclass(frozen=True)
class Augmentation:
    """Seeded random transforms of each training image, and of its mask (U-Net) for the geometric ones.

    Drawn from a ``tf.random.Generator`` seeded by the training seed, in a sequential tf.data map: one seed gives the
    same images on every run. Never a left/right flip: the two lungs differ (heart, fissures). Geometric (image and
    mask together, bilinear; the mask re-binarised at 0.5; borders repeat the nearest pixel): ``shift`` (largest
    translation, a fraction of the side), ``rotate`` (largest rotation, degrees), ``scale`` (zoom in
    ``[1 - scale, 1 + scale]``). Photometric (image only, on the standardised image): ``gamma`` (exponent in
    ``[e^-gamma, e^gamma]`` on the image min-max scaled to [0, 1], scaled back after), ``contrast`` (about the image
    mean, a factor in ``[1 - contrast, 1 + contrast]``), ``brightness`` (an offset in ``[-brightness, brightness]``),
    ``noise`` (Gaussian, this standard deviation). ``wrap``: the original jitter, a circular roll of up to ``shift``
    and a brightness offset (level ``basic``, kept exactly as it was, seed for seed).
    """

    shift: float = 0.0
    rotate: float = 0.0
    scale: float = 0.0
    gamma: float = 0.0
    contrast: float = 0.0
    brightness: float = 0.0
    noise: float = 0.0
    wrap: bool = False

    def __post_init__(self) -> None:
        for name in ("shift", "rotate", "scale", "gamma", "contrast", "brightness", "noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"augmentation {name} must be >= 0, got {getattr(self, name)}")
        if self.shift > 0.5 or self.scale >= 1.0 or self.contrast >= 1.0 or self.rotate > 45.0:
            raise ValueError(f"augmentation out of range (shift <= 0.5, scale < 1, contrast < 1, rotate <= 45): {self}")
        if self.wrap and (self.rotate or self.scale or self.gamma or self.contrast or self.noise):
            raise ValueError("wrap (the original circular shift) takes only shift and brightness")

    @classmethod
    def of(cls, value: object) -> Augmentation:
        """From a level name (:data:`AUGMENT_LEVELS`), a bool (True: ``basic``, the original), a mapping of fields, or
        an Augmentation."""
        if isinstance(value, Augmentation):
            return value
        if isinstance(value, bool) or value is None:
            return LEVELS["basic" if value else "none"]
        if isinstance(value, str):
            if value not in LEVELS:
                raise ValueError(f"augment must be one of {AUGMENT_LEVELS}, a bool or a mapping, got {value!r}")
            return LEVELS[value]
        if isinstance(value, dict):
            return cls(**value)
        raise ValueError(f"augment must be one of {AUGMENT_LEVELS}, a bool or a mapping, got {value!r}")

    @property
    def active(self) -> bool:
        return any((self.shift, self.rotate, self.scale, self.gamma, self.contrast, self.brightness, self.noise))

    def map_fn(self, seed: int):
        """``(image, target) -> (image, target)`` for ``Dataset.map`` (images ``[H, W, 1]``; a ``[H, W, 1]`` target
        is a mask and moves with the image)."""
        import math

        import tensorflow as tf

        if self.wrap:
            on_batches = self.batch_fn(seed)

            def jitter(img, target):
                img, target = on_batches(img[None], target[None])
                return img[0], target[0]

            return jitter
        rng = tf.random.Generator.from_seed(seed)
        geometric = bool(self.shift or self.rotate or self.scale)

        def warp(image, transform):
            return tf.raw_ops.ImageProjectiveTransformV3(
                images=image[None], transforms=transform, output_shape=tf.shape(image)[:2], fill_value=0.0,
                interpolation="BILINEAR", fill_mode="NEAREST")[0]

        def augment(img, target):
            u = rng.uniform([7], -1.0, 1.0)  # one draw per image: each transform's share of its range
            if geometric:
                height, width = tf.cast(tf.shape(img)[0], tf.float32), tf.cast(tf.shape(img)[1], tf.float32)
                angle = u[0] * (self.rotate * math.pi / 180.0)
                zoom = 1.0 + u[1] * self.scale
                cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
                cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
                ox, oy = cx + u[2] * self.shift * width, cy + u[3] * self.shift * height
                # output pixel -> input pixel: rotate and zoom about the centre, then translate
                transform = tf.stack([cos, sin, cx - cos * ox - sin * oy, -sin, cos, cy + sin * ox - cos * oy,
                                      0.0, 0.0])[None]
                img = warp(img, transform)
                if target.shape.rank == 3:  # masks move with the image, and stay binary
                    target = tf.cast(warp(tf.cast(target, tf.float32), transform) >= 0.5, target.dtype)
            if self.gamma:
                lo, hi = tf.reduce_min(img), tf.reduce_max(img)
                span = tf.maximum(hi - lo, 1e-6)
                img = tf.pow((img - lo) / span, tf.exp(u[4] * self.gamma)) * span + lo
            if self.contrast:
                mean = tf.reduce_mean(img)
                img = (img - mean) * (1.0 + u[5] * self.contrast) + mean
            if self.brightness:
                img = img + u[6] * self.brightness
            if self.noise:
                img = img + rng.normal(tf.shape(img), stddev=self.noise)
            return img, target

        return augment

    def batch_fn(self, seed: int):
        """The ``wrap`` jitter on whole batches: ``(images [B, H, W, 1], targets) -> (images, targets)`` (a
        ``[B, H, W, 1]`` target is a mask and rolls with its image).

        Image for image the same draws as one image at a time from ``tf.random.Generator.from_seed(seed)`` (its
        ``uniform([2])`` shift, then its ``uniform([])`` offset), and the same pixels: the batch reads the generator's
        state and advances it as those draws would, then takes the draws from the Philox stream at the counters each
        image's calls would have used. Per image, the map calls cost more than the jitter itself: at 64 px, 88 ms of
        pipeline per 1,024 images against 8 without augmentation, and a tenth of the classifier's training speed.
        """
        import tensorflow as tf
        from tensorflow.python.ops import gen_stateful_random_ops

        if not self.wrap:
            raise ValueError("only the wrap jitter (level basic) runs on whole batches")
        rng = tf.random.Generator.from_seed(seed)
        # A stateful draw of k numbers advances the Philox counter by 256 k (TensorFlow's choice); each counter value
        # gives 4 numbers. One image draws 2 + 1 numbers: 3 x 256 counters, its shift at the first, its offset at 512.
        per_draw = 256 * 4  # numbers of the stream that one drawn number moves past
        per_image, stride = 3, 3 * per_draw
        lo_shift, hi_shift = tf.constant(-self.shift, tf.float32), tf.constant(self.shift, tf.float32)
        lo_offset, hi_offset = tf.constant(-self.brightness, tf.float32), tf.constant(self.brightness, tf.float32)

        def roll(images, rows, cols):  # rows, then columns as rows of the transposed images: whole-row copies
            rolled = tf.gather(images, rows, axis=1, batch_dims=1)
            rolled = tf.gather(tf.transpose(rolled, [0, 2, 1, 3]), cols, axis=1, batch_dims=1)
            return tf.transpose(rolled, [0, 2, 1, 3])

        def jitter(img, target):
            n = tf.shape(img)[0]
            state = tf.bitcast(gen_stateful_random_ops.rng_read_and_skip(
                rng.state.handle, alg=rng.algorithm, delta=tf.cast(per_image * n, tf.uint64)), tf.uint64)
            u = tf.reshape(tf.raw_ops.StatelessRandomUniformV2(
                shape=[n * stride], key=state[2:], counter=state[:2], alg=rng.algorithm, dtype=tf.float32),
                [n, stride])
            shift = u[:, :2] * (hi_shift - lo_shift) + lo_shift  # what Generator.uniform computes from [0, 1)
            offset = u[:, 2 * per_draw] * (hi_offset - lo_offset) + lo_offset
            size = tf.shape(img)[1:3]
            steps = tf.cast(shift * tf.cast(size, tf.float32), tf.int32)  # [n, 2]: rows, columns, as tf.roll took
            rows = tf.math.floormod(tf.range(size[0])[None] - steps[:, :1], size[0])
            cols = tf.math.floormod(tf.range(size[1])[None] - steps[:, 1:], size[1])
            rolled = tf.ensure_shape(roll(img, rows, cols), img.shape)
            if target.shape.rank == 4:  # masks move with the image
                target = tf.ensure_shape(roll(target, rows, cols), target.shape)
            return rolled + offset[:, None, None, None], target

        return jitter


#: Named augmentation levels: ``basic`` is the original jitter (a circular shift of up to 5% and a brightness offset);
#: ``strong`` adds a small affine (8 degrees, 10% zoom, 6% shift) and gamma, contrast and noise.
LEVELS: dict[str, Augmentation] = {
    "none": Augmentation(),
    "basic": Augmentation(shift=0.05, brightness=0.1, wrap=True),
    "strong": Augmentation(shift=0.06, rotate=8.0, scale=0.1, gamma=0.3, contrast=0.2, brightness=0.1, noise=0.03),
}


#: About how many images go through the ``basic`` jitter in one map call (a whole number of batches).
JITTER_GROUP_IMAGES = 256


def balanced_groups(labels: np.ndarray, sources: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sampling groups for balanced training: each sample's group number and each group's share of the draws.

    The classes weigh the same; with ``sources``, so does every source within a class (source-balanced sampling: a
    hospital with few images is drawn as often as one with many, so neither the class nor the source is learnt from
    how often it comes up).
    """
    labels = np.asarray(labels).astype(str).ravel()
    if sources is None:
        keys = [(lab, "") for lab in labels]
    else:
        sources = np.asarray(sources).astype(str).ravel()
        if len(sources) != len(labels):
            raise ValueError(f"{len(sources)} sources for {len(labels)} labels")
        keys = list(zip(labels, sources))
    names = sorted(set(keys))
    number = {k: i for i, k in enumerate(names)}
    per_class = Counter(lab for lab, _ in names)
    shares = np.array([1.0 / (len(per_class) * per_class[lab]) for lab, _ in names])
    return np.array([number[k] for k in keys], dtype=np.int64), shares


SAMPLINGS: tuple[str, ...] = ("class", "balanced", "source")


def sampling(mode: str, labels: np.ndarray, sources: np.ndarray | None = None) -> dict:
    """``fit``'s weighting keywords (``class_weight``, ``balance``) for a sampling mode of :data:`SAMPLINGS`.

    ``class``: the loss weighs each class by its inverse frequency (every batch as the data comes); ``balanced``:
    batches drawn class-balanced instead (the minority repeated, seeded); ``source``: drawn class- and
    source-balanced (:func:`balanced_groups` with ``sources``).
    """
    if mode == "class":
        return {"class_weight": balanced_class_weight(labels), "balance": None}
    if mode == "balanced":
        return {"class_weight": None, "balance": balanced_groups(labels)}
    if mode == "source":
        if sources is None:
            raise ValueError("source-balanced sampling needs each image's source")
        return {"class_weight": None, "balance": balanced_groups(labels, sources)}
    raise ValueError(f"sampling must be one of {SAMPLINGS}, got {mode!r}")


def dataset(
    x: np.ndarray, y: np.ndarray, *, batch_size: int, shuffle: bool = False, seed: int = 0,
    augment: bool | str | Augmentation | dict = False, balance: tuple[np.ndarray, np.ndarray] | None = None,
):
    """A batched ``tf.data.Dataset`` over arrays already decoded and resized (the cache), so training is compute-bound.

    ``augment``: an :class:`Augmentation` or its level (``True``: ``basic``, the original shifts and brightness).
    ``balance`` (``balanced_groups``; training only, with ``shuffle``): each element is drawn by first choosing a group
    by its share, then the next image of that group (each group reshuffled on every pass, the minority ones repeated):
    as many draws per epoch as images, every draw seeded, so an epoch costs what it did.
    """
    import tensorflow as tf

    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    y = np.asarray(y, dtype=np.float32)
    if y.ndim == 3:
        y = y[..., None]
    if balance is not None and shuffle:
        groups, shares = balance
        groups = np.asarray(groups)
        if len(groups) != len(x):
            raise ValueError(f"balance: {len(groups)} group numbers for {len(x)} images")
        x_all, y_all = tf.constant(x), tf.constant(y)
        pools = []
        for g in range(len(shares)):
            members = np.flatnonzero(groups == g).astype(np.int64)
            if not len(members):
                raise ValueError(f"balance: group {g} has no images")
            pools.append(tf.data.Dataset.from_tensor_slices(members)
                         .shuffle(len(members), seed=seed + 1 + g, reshuffle_each_iteration=True).repeat())
        order = tf.data.Dataset.sample_from_datasets(pools, weights=[float(w) for w in shares], seed=seed,
                                                     rerandomize_each_iteration=True).take(len(x))
        ds = order.map(lambda i: (tf.gather(x_all, i), tf.gather(y_all, i)), num_parallel_calls=1, deterministic=True)
    else:
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if shuffle:
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    transform = Augmentation.of(augment)
    if transform.wrap and transform.active:
        # Groups of whole batches through the jitter, cut back to batch_size: the same batches and draws, a few map
        # calls per epoch instead of one per batch (on 2 cores each call's ops also slow the model's step beside it).
        group = batch_size * max(1, JITTER_GROUP_IMAGES // batch_size)
        ds = ds.batch(group).map(transform.batch_fn(seed), num_parallel_calls=1, deterministic=True)
        ds = ds.rebatch(batch_size).apply(tf.data.experimental.assert_cardinality(-(-len(x) // batch_size)))
    else:
        if transform.active:
            ds = ds.map(transform.map_fn(seed), num_parallel_calls=1, deterministic=True)
        ds = ds.batch(batch_size)
    return ds.prefetch(2).with_options(fixed_pipeline_options())


def fixed_pipeline_options():
    """``tf.data`` options for pipelines whose parallelism and buffers are fixed (no ``AUTOTUNE``): autotuning off.

    With it on, whole epochs of the U-Net F0=64 at 128 px trained on one core of two (20.5 s against 10.9 s for the
    same three steps; 3 of 4 epochs, measured 2026-12-05), as if the tuner's thread held one of the intra-op threads;
    off, every epoch used both. The elements and their order are the same either way.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def fit(
    model,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    augment: bool | str | Augmentation | dict = False,
    class_weight: dict[int, float] | None = None,
    balance: tuple[np.ndarray, np.ndarray] | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    verbose: int = 0,
) -> dict[str, list[float]]:
    """Fit a compiled model; ``on_epoch_end(epoch, logs)`` receives every epoch's metrics (for MLflow, pruning).

    ``augment`` and ``balance`` as :func:`dataset` (training data only); ``class_weight`` weighs the loss instead.

    A model built under ``multi-worker`` trains with ``_fit_multi_worker`` (same steps, metrics and history; the hook
    runs on the chief only, and ``model.stop_training`` set there stops every worker).
    """
    import keras
    import tensorflow as tf

    if isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return _fit_multi_worker(model, train, val, epochs=epochs, batch_size=batch_size, seed=seed, augment=augment,
                                 class_weight=class_weight, balance=balance, on_epoch_end=on_epoch_end)
    callbacks = []
    if on_epoch_end is not None:
        callbacks.append(keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: on_epoch_end(epoch, {k: float(v) for k, v in (logs or {}).items()})
        ))
    history = model.fit(
        dataset(*train, batch_size=batch_size, shuffle=True, seed=seed, augment=augment, balance=balance),
        validation_data=dataset(*val, batch_size=batch_size),
        epochs=epochs,
        class_weight=class_weight,
        callbacks=callbacks,
        verbose=verbose,
        shuffle=False,  # the dataset shuffles itself, seeded (Keras would only warn that it ignores the flag)
    )
    return {k: [float(v) for v in vs] for k, vs in history.history.items()}


def _fit_multi_worker(
    model,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    augment: bool | str | Augmentation | dict,
    class_weight: dict[int, float] | None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None,
    balance: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, list[float]]:
    """``fit`` under ``MultiWorkerMirroredStrategy``, whose Keras 3 ``fit`` fails (keras-team/keras#20585).

    The same loop as Keras' ``fit``: the model's own ``train_step``/``test_step`` under ``strategy.run`` in a
    ``tf.function``, over the same seeded datasets, each global batch split across all replicas of all workers (data
    sharding: every worker reads the same arrays). The loss and metric variables are mirrored and summed across
    workers at every update, so every worker reads the global epoch metrics and returns the same history. No progress
    bar (``verbose`` is ignored).
    """
    import tensorflow as tf

    strategy = model.distribute_strategy
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_ds = dataset(*train, batch_size=batch_size, shuffle=True, seed=seed, augment=augment, balance=balance)
    if class_weight is not None:
        train_ds = train_ds.map(_class_weight_fn(class_weight))
    train_dist = strategy.experimental_distribute_dataset(train_ds.with_options(options))
    val_dist = strategy.experimental_distribute_dataset(dataset(*val, batch_size=batch_size).with_options(options))
    with strategy.scope():
        # What Keras' fit does first (its _maybe_symbolic_build is what breaks): create the optimizer's, loss'
        # and metrics' variables under the strategy, from the batch's spec, not a batch (no iteration consumed).
        model._symbolic_build(data_batch=train_ds.element_spec)
    train_step = tf.function(lambda batch: strategy.run(model.train_step, args=(batch,)), reduce_retracing=True)
    test_step = tf.function(lambda batch: strategy.run(model.test_step, args=(batch,)), reduce_retracing=True)
    any_stops = tf.function(lambda flag: strategy.reduce("SUM", strategy.run(tf.identity, args=(flag,)), axis=None))
    chief = is_chief()
    history: dict[str, list[float]] = {}
    model.stop_training = False
    for epoch in range(epochs):
        model.reset_metrics()
        if epoch:  # Keras' epoch iterator opens the dataset once more between epochs, and each opening draws the
            iter(train_dist)  # next shuffle order: skip one the same way, so both train on the same orders
        for batch in train_dist:
            train_step(batch)
        logs = {k: float(v) for k, v in model.get_metrics_result().items()}
        model.reset_metrics()
        for batch in val_dist:
            test_step(batch)
        logs.update({f"val_{k}": float(v) for k, v in model.get_metrics_result().items()})
        for k, v in logs.items():
            history.setdefault(k, []).append(v)
        if on_epoch_end is not None and chief:
            on_epoch_end(epoch, dict(logs))
        if any_stops(tf.constant(float(bool(model.stop_training)))) > 0:  # all workers stop after this epoch, or none
            break
    return history


def _class_weight_fn(class_weight: dict[int, float]):
    """A map adding Keras' class-weight sample weights to ``(x, y)`` batches (classes absent from it weigh 1)."""
    import tensorflow as tf

    table = tf.constant([float(class_weight.get(c, 1.0)) for c in range(max(class_weight) + 1)], tf.float32)

    def add_weights(x, y):
        if y.shape.rank is None or y.shape.rank > 2:
            raise ValueError(f"class_weight needs one label (or one-hot row) per sample, got targets shaped {y.shape}")
        if y.shape.rank == 2 and y.shape[-1] != 1:
            classes = tf.argmax(y, axis=-1)
        else:
            classes = tf.cast(tf.round(tf.reshape(y, [-1])), tf.int64)
        return x, y, tf.gather(table, classes)

    return add_weights


def balanced_class_weight(y: np.ndarray) -> dict[int, float]:
    """Inverse-frequency weights for binary labels (both classes weigh the same in the loss)."""
    y = np.asarray(y).astype(int).ravel()
    counts = np.bincount(y, minlength=2).astype(float)
    if (counts == 0).any():
        raise ValueError(f"both classes are needed to weight them, got counts {counts.tolist()}")
    return {k: float(len(y) / (2 * counts[k])) for k in (0, 1)}


def predict(model, x: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """Model outputs for arrays (adds the channel axis), as float32 numpy.

    A ``multi-worker`` model predicts locally, batch by batch (every worker holds all the weights): Keras' ``predict``
    would split the arrays across the workers and gather the outputs, hanging unless every worker called it at once.
    """
    import tensorflow as tf

    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if not len(x):  # (Keras' predict fails on no rows)
        return np.zeros((0, *model.output_shape[1:]), dtype=np.float32)
    if isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return np.concatenate([np.asarray(model(x[i:i + batch_size], training=False), dtype=np.float32)
                               for i in range(0, len(x), batch_size)])
    # A dataset of our own rather than Keras' from the arrays, for its options: with tf.data autotuning on, the U-Net
    # F0=64 at 128 px predicted on 1.35 cores of two (10.3 s against 6.9 s for 64 images).
    data = tf.data.Dataset.from_tensor_slices(x).batch(batch_size).prefetch(2).with_options(fixed_pipeline_options())
    return np.asarray(model.predict(data, verbose=0), dtype=np.float32)
