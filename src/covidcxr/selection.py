"""Champion selection: which trained classifier to register, and whether the new version becomes the champion.

``select`` ranks the candidates (one per variant and backbone): those whose own shortcut audit failed are not eligible
while another is; among the eligible, the best by the selection figure, and the figure is a held-out-source one when
every eligible candidate has it (how the model does on hospitals it never saw), else a validation metric. A held-out
figure that is a mean over seeds comes with its standard error: candidates within noise of the best (a difference no
larger than the two standard errors combined) are tied on it, and so are candidates with exactly the best figure,
standard errors or not (one seed has none); their mean over the held-out runs breaks the tie, so that the seeds' noise
on one near-hopeless source, or the order of params, does not choose. Every candidate is listed with its figures and the
reason it was or was not chosen. ``decide`` gives the new version its alias; ``reason`` says why in one line. Nothing
here touches MLflow: the `register` stage does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from covidcxr import audit

CHAMPION, CHALLENGER = "champion", "challenger"
#: Validation metrics at the operating threshold that may decide (all: higher is better).
METRICS: tuple[str, ...] = ("roc_auc", "average_precision", "accuracy", "sensitivity", "specificity", "f1",
                            "precision")


@dataclass(frozen=True)
class Candidate:
    """A trained classifier: its validation metrics, its own audit verdict, and a held-out-source figure if any."""

    variant: str
    backbone: str
    validation: Mapping[str, float | None]
    audit_status: str = audit.PASS
    audit_failed: tuple[str, ...] = ()
    heldout: float | None = None  # higher is better, e.g. the worst held-out source's specificity
    heldout_detail: Mapping[str, object] = field(default_factory=dict)
    heldout_se: float | None = None  # the standard error of ``heldout`` over seeds (None: one seed, no spread)
    heldout_mean: float | None = None  # the tie-break: e.g. the specificity's mean over every held-out run

    @property
    def name(self) -> str:
        return f"{self.variant}_{self.backbone}"

    def metric(self, name: str) -> float:
        value = self.validation.get(name)
        return float("nan") if value is None else float(value)


@dataclass(frozen=True)
class Selection:
    """The chosen candidate, the figure that chose it, and one row per candidate with the reason."""

    chosen: Candidate
    by: str  # "val_<metric>" or "heldout"
    value: float
    table: list[dict]


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def noise(c: Candidate, best: Candidate) -> float | None:
    """The combined standard error of two held-out figures when ``c``'s is within it of ``best``'s, else None (also
    when either has no standard error: one seed says nothing of the noise)."""
    if not (_finite(c.heldout) and _finite(best.heldout) and _finite(c.heldout_se) and _finite(best.heldout_se)):
        return None
    combined = math.hypot(float(c.heldout_se), float(best.heldout_se))
    return combined if abs(float(best.heldout) - float(c.heldout)) <= combined else None


def select(candidates: Sequence[Candidate], metric: str, *, heldout_name: str = "held-out figure") -> Selection:
    """The candidate to register (see the module docstring); ties no held-out mean breaks keep the first in
    ``candidates`` order."""
    if metric not in METRICS:
        raise ValueError(f"the selection metric must be one of {METRICS} (higher is better), got {metric!r}")
    if not candidates:
        raise ValueError("no candidate classifier to select from")
    eligible = [c for c in candidates if c.audit_status != audit.FAIL] or list(candidates)
    all_failed = all(c.audit_status == audit.FAIL for c in candidates)
    use_heldout = all(_finite(c.heldout) for c in eligible)
    by = "heldout" if use_heldout else f"val_{metric}"

    def figure(c: Candidate) -> float:
        return float(c.heldout) if use_heldout else c.metric(metric)

    scored = [c for c in eligible if math.isfinite(figure(c))]
    if not scored:
        raise ValueError(f"validation {metric} is undefined for every eligible candidate "
                         f"{[c.name for c in eligible]}")
    best = max(scored, key=figure)  # max keeps the first of equals: params order breaks ties the mean cannot
    tied = [c for c in scored if use_heldout and (figure(c) == figure(best) or noise(c, best) is not None)]
    chosen = best
    if len(tied) > 1 and all(_finite(c.heldout_mean) for c in tied):
        chosen = max(tied, key=lambda c: float(c.heldout_mean))
    else:
        tied = [best]
    label = heldout_name if use_heldout else f"val {metric}"
    table = []
    for c in candidates:
        if c is chosen:
            why = f"chosen: best {label} ({figure(c):.4f})"
            if len(tied) > 1:
                how = "tied on" if all(figure(t) == figure(best) for t in tied) else "within noise of"
                why = (f"chosen: best held-out mean ({c.heldout_mean:.4f}) of the {len(tied)} {how} the best "
                       f"{label} ({figure(best):.4f})")
            if all_failed:
                why += " though every candidate failed its audit"
        elif c.audit_status == audit.FAIL and not all_failed:
            why = f"not eligible: its audit failed ({', '.join(c.audit_failed) or 'fail'})"
        elif not math.isfinite(figure(c)):
            why = f"{label} undefined"
        elif any(c is t for t in tied):
            other = chosen if c is best else best
            why = (f"{label} {figure(c):.4f} = {figure(other):.4f}" if figure(c) == figure(other) else
                   f"{label} {figure(c):.4f} within noise of {figure(other):.4f} (difference "
                   f"{abs(figure(c) - figure(other)):.4f} <= {noise(c, other):.4f}, the standard errors combined)")
            why += (f"; held-out mean {c.heldout_mean:.4f} < {chosen.heldout_mean:.4f}"
                    if c.heldout_mean < chosen.heldout_mean else
                    f"; held-out mean {c.heldout_mean:.4f} = {chosen.heldout_mean:.4f}, the first in params order is "
                    "chosen")
        elif figure(c) == figure(best):  # equal, and no held-out mean to break the tie
            why = f"{label} {figure(c):.4f} = {figure(best):.4f}; tied, the first in params order is chosen"
        else:
            why = f"{label} {figure(c):.4f} < {figure(best):.4f}"
        table.append({
            "classifier": c.name, "variant": c.variant, "backbone": c.backbone, "chosen": c is chosen,
            "reason": why, "audit_status": c.audit_status, "audit_failed": list(c.audit_failed),
            f"val_{metric}": c.metric(metric), "heldout": c.heldout, **({"heldout_detail": dict(c.heldout_detail)}
                                                                       if c.heldout_detail else {}),
            **({"heldout_se": c.heldout_se, "heldout_mean": c.heldout_mean}
               if c.heldout_se is not None or c.heldout_mean is not None else {}),
        })
    return Selection(chosen=chosen, by=by, value=figure(chosen), table=table)


def decide(candidate: float, champion: float | None, audit_status: str = audit.PASS,
           allow_failed_audit: bool = False) -> str:
    """Champion when at least as good as the current champion (or there is none, or it has no such figure), unless
    its audit failed and failed audits are not allowed: then challenger, whatever its figure."""
    if audit_status == audit.FAIL and not allow_failed_audit:
        return CHALLENGER
    return CHAMPION if champion is None or not math.isfinite(champion) or candidate >= champion else CHALLENGER


def reason(decision: str, by: str, value: float, against: str, audit_status: str, failed: Sequence[str],
           allow_failed_audit: bool) -> str:
    """One line saying why the new version got its alias."""
    figure = by.replace("_", " ", 1) if by.startswith("val_") else by
    if audit_status == audit.FAIL and not allow_failed_audit:
        return (f"audit failed ({', '.join(failed)}): champion refused (register.allow_failed_audit is false); "
                f"{figure} {value:.4f} vs {against}")
    verdict = ">=" if decision == CHAMPION else "<"
    note = (f"; audit failed ({', '.join(failed)}) but register.allow_failed_audit is true"
            if audit_status == audit.FAIL else f"; audit {audit_status}")
    return f"{figure} {value:.4f} {verdict} {against}{note}"
