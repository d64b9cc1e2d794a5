"""Patient-level splits and experiment curation.

A patient's images always land in one split (the paper's 60/20/20 "following the clinical information to avoid images
from the same subject in two different partitions"). Strata (for example the label) keep their proportions in every
split. Everything is seeded and independent of row order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

SPLITS: tuple[str, ...] = ("train", "val", "test")
PAPER_FRACTIONS: dict[str, float] = {"train": 0.6, "val": 0.2, "test": 0.2}


class SelectionError(ValueError):
    """An experiment selection that is empty, ambiguous or refers to unknown columns."""


def split_patients(
    df: pd.DataFrame,
    *,
    fractions: Mapping[str, float] = PAPER_FRACTIONS,
    seed: int = 0,
    stratify: str | None = "label",
    group: str = "patient_id",
    fixed: Mapping[str, str] | None = None,
) -> pd.Series:
    """Assign every row a split name so that no group (patient) spans two splits.

    Within each stratum, patients are shuffled with ``seed`` and given, one by one, to the split that is furthest below
    its target share of the stratum's images; a patient with several strata is placed by their most frequent one
    (ties: the lexically first). ``fixed`` (patient -> split) places those patients first and the others fill around
    them, e.g. to keep the patients another model trained on out of this task's test split; without fixed patients
    in ``df`` the result is the same as without ``fixed``. Returns a string Series aligned with ``df.index``.
    """
    names = list(fractions)
    target = np.array([fractions[n] for n in names], dtype=float)
    if np.any(target < 0) or not np.isclose(target.sum(), 1.0):
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {dict(fractions)}")
    if df.empty:
        return pd.Series(pd.array([], dtype="string"), index=df.index, name="split")
    if df[group].isna().any():
        raise ValueError(f"{int(df[group].isna().sum())} rows have no {group}: cannot split by patient")

    groups = df[group].astype(str)
    if stratify is None:
        strata = pd.Series("all", index=df.index)
    else:
        strata = df[stratify].astype("string").fillna("<NA>")
    # Each patient's most frequent stratum (ties: the lexically first), from one count per (patient, stratum) pair
    # sorted by patient, count descending and stratum: a per-patient Python call took seconds on the real corpus.
    counts = pd.DataFrame({"g": groups, "s": strata}).groupby(["g", "s"]).size().rename("n").reset_index()
    per_patient = (
        counts.sort_values(["g", "n", "s"], ascending=[True, False, True]).drop_duplicates("g").set_index("g")["s"]
    )
    sizes = groups.value_counts()

    pinned = {str(g): s for g, s in (fixed or {}).items() if str(g) in per_patient.index}
    unknown = sorted({s for s in pinned.values()} - set(names))
    if unknown:
        raise ValueError(f"fixed patients are assigned to splits {unknown} that are not among {names}")

    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for stratum in sorted(per_patient.unique()):
        patients = np.array(sorted(per_patient.index[per_patient == stratum]))
        patients = patients[rng.permutation(len(patients))]
        total = float(sizes[patients].sum())
        filled = np.zeros(len(names))
        for patient in (p for p in patients if p in pinned):
            assignment[patient] = pinned[patient]
            filled[names.index(pinned[patient])] += sizes[patient]
        for patient in (p for p in patients if p not in pinned):
            deficit = np.where(target > 0, target * total - filled, -np.inf)
            k = int(np.argmax(deficit))
            assignment[patient] = names[k]
            filled[k] += sizes[patient]
    return pd.Series(pd.array(groups.map(assignment), dtype="string"), index=df.index, name="split")


def _matches(df: pd.DataFrame, rule: Mapping[str, object]) -> pd.Series:
    """Rows matching every key of ``rule`` (a value or a list of accepted values)."""
    unknown = [k for k in rule if k not in df.columns]
    if unknown:
        raise SelectionError(f"selection rule {dict(rule)} uses unknown columns {unknown}")
    mask = pd.Series(True, index=df.index)
    for col, accepted in rule.items():
        values = accepted if isinstance(accepted, (list, tuple, set)) else [accepted]
        mask &= df[col].astype("string").isin([str(v) for v in values]).fillna(False).astype(bool)
    return mask


def rule_matches(df: pd.DataFrame, rules: Sequence[Mapping[str, object]]) -> pd.Series:
    """Rows matching any of ``rules`` (each as in :func:`select_experiment`)."""
    mask = pd.Series(False, index=df.index)
    for rule in rules:
        mask |= _matches(df, rule)
    return mask


def rule_patients(df: pd.DataFrame, rules: Sequence[Mapping[str, object]]) -> set[str]:
    """Patients with any row matching ``rules``: what a held-out rule holds out (whole patients, every film)."""
    return set(df.loc[rule_matches(df, rules), "patient_id"].astype(str))


def select_experiment(
    manifest: pd.DataFrame,
    positives: Sequence[Mapping[str, object]],
    negatives: Sequence[Mapping[str, object]],
) -> pd.DataFrame:
    """Rows of ``manifest`` chosen by an experiment's rules, relabelled ``covid`` / ``negative``.

    A rule is a mapping of manifest columns to accepted values, e.g. ``{"source": "cohen", "label": "covid"}``; a row is
    positive when any positive rule matches it, negative when any negative rule does. A row matched by both is an error,
    and so is an experiment without one of its classes.
    """
    pos = pd.Series(False, index=manifest.index)
    for rule in positives:
        pos |= _matches(manifest, rule)
    neg = pd.Series(False, index=manifest.index)
    for rule in negatives:
        neg |= _matches(manifest, rule)
    both = manifest.loc[pos & neg, "image_id"]
    if len(both):
        raise SelectionError(f"{len(both)} images match both positive and negative rules, e.g. {list(both[:5])}")
    if not pos.any() or not neg.any():
        raise SelectionError(
            f"experiment selects {int(pos.sum())} positive and {int(neg.sum())} negative images: both classes are "
            "needed"
        )
    out = manifest.loc[pos | neg].copy()
    out["label"] = pd.array(np.where(pos[pos | neg], "covid", "negative"), dtype="string")
    return out


def drop_negatives_among_positives(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's experiment-2 curation: remove negative images of patients who also have a positive image.

    Returns ``(kept, dropped)`` so that the caller reports what was removed.
    """
    positive_patients = set(df.loc[df["label"] == "covid", "patient_id"])
    drop = (df["label"] == "negative") & df["patient_id"].isin(positive_patients)
    return df.loc[~drop], df.loc[drop]


def split_held_out(
    df: pd.DataFrame,
    held: pd.Series,
    *,
    holdout_split: str = "test",
    fractions: Mapping[str, float] = PAPER_FRACTIONS,
    seed: int = 0,
    stratify: str | None = "label",
    group: str = "patient_id",
    fixed: Mapping[str, str] | None = None,
    what: str = "the held-out rows",
) -> pd.Series:
    """Split by patient, except that the rows where ``held`` is true all go to ``holdout_split``.

    Used for external validation: held-out sources or sites (``held`` from :func:`rule_matches`) are the whole test
    split (``fractions`` then name only train and val), and external segmentation data (``holdout_split="external"``).
    A patient on both sides, or nothing left to split, is a :class:`SelectionError` (``what`` names the held-out rows
    in its message). ``fixed`` places patients of the rest as in :func:`split_patients`.
    """
    held = held.reindex(df.index, fill_value=False).astype(bool)
    if held.all():
        raise SelectionError(f"holding out {what} leaves no rows to train on")
    shared = set(df.loc[held, group].astype(str)) & set(df.loc[~held, group].astype(str))
    if shared:
        raise SelectionError(f"{len(shared)} patients have images both in and out of {what}")
    rest = split_patients(df.loc[~held], fractions=fractions, seed=seed, stratify=stratify, group=group, fixed=fixed)
    out = pd.Series(pd.array([holdout_split] * len(df), dtype="string"), index=df.index, name="split")
    out[~held] = rest
    return out


def without_split(fractions: Mapping[str, float], name: str) -> dict[str, float]:
    """``fractions`` without split ``name``, the others rescaled to sum to 1 (e.g. train/val once test is held out)."""
    kept = {k: float(v) for k, v in fractions.items() if k != name}
    total = sum(kept.values())
    if total <= 0:
        raise ValueError(f"no split fractions left without {name!r}: {dict(fractions)}")
    return {k: v / total for k, v in kept.items()}
