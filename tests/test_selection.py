"""covidcxr.selection: which classifier is registered, and whether the new version becomes the champion."""

from __future__ import annotations

import math

import pytest

from covidcxr import audit, selection
from covidcxr.selection import Candidate


def candidate(name: str, auc: float | None, status: str = "pass", heldout: float | None = None) -> Candidate:
    variant, backbone = name.split("_")
    return Candidate(variant, backbone, {"roc_auc": auc}, audit_status=status,
                     audit_failed=("source_classifier:all",) if status == "fail" else (), heldout=heldout)


def test_the_best_by_the_validation_metric_ties_to_the_first():
    pool = [candidate("c_vgg16", 0.6), candidate("d_vgg16", 0.9), candidate("d_vgg19", None),
            candidate("e_vgg19", 0.9)]
    chosen = selection.select(pool, "roc_auc")
    assert chosen.chosen.name == "d_vgg16" and chosen.by == "val_roc_auc" and chosen.value == 0.9
    rows = {r["classifier"]: r for r in chosen.table}
    assert [r["classifier"] for r in chosen.table] == ["c_vgg16", "d_vgg16", "d_vgg19", "e_vgg19"]
    assert rows["d_vgg16"]["chosen"] and rows["d_vgg16"]["reason"].startswith("chosen")
    assert "undefined" in rows["d_vgg19"]["reason"]
    assert rows["e_vgg19"]["reason"] == "val roc_auc 0.9000 = 0.9000; tied, the first in params order is chosen"


def test_a_failed_audit_is_not_eligible_while_another_candidate_is():
    pool = [candidate("c_vgg16", 0.99, "fail"), candidate("d_vgg16", 0.80, "warn"), candidate("e_vgg16", 0.70)]
    chosen = selection.select(pool, "roc_auc")
    assert chosen.chosen.name == "d_vgg16"
    assert "not eligible: its audit failed (source_classifier:all)" in chosen.table[0]["reason"]
    everyone_failed = selection.select([candidate("c_vgg16", 0.9, "fail"), candidate("d_vgg16", 0.8, "fail")],
                                       "roc_auc")
    assert everyone_failed.chosen.name == "c_vgg16" and "every candidate failed" in everyone_failed.table[0]["reason"]


def test_held_out_figures_decide_when_every_eligible_candidate_has_one():
    pool = [candidate("c_vgg16", 0.99, heldout=0.20), candidate("d_vgg16", 0.90, heldout=0.75)]
    chosen = selection.select(pool, "roc_auc", heldout_name="worst held-out specificity")
    assert chosen.chosen.name == "d_vgg16" and chosen.by == "heldout" and chosen.value == 0.75
    assert "worst held-out specificity 0.2000 < 0.7500" in chosen.table[0]["reason"]
    partial = selection.select([candidate("c_vgg16", 0.99, heldout=0.2), candidate("d_vgg16", 0.9)], "roc_auc")
    assert partial.by == "val_roc_auc" and partial.chosen.name == "c_vgg16"


def heldout(name: str, worst: float, se: float | None, mean: float | None, status: str = "pass") -> Candidate:
    return Candidate(*name.split("_"), {"roc_auc": 0.9}, audit_status=status, heldout=worst, heldout_se=se,
                     heldout_mean=mean)


def test_held_out_figures_within_noise_are_tied_and_the_mean_breaks_the_tie():
    # the 2026-12-05 all-sources run: Montgomery decided, c 0.063 +- 0.023 against d 0.045 +- 0.012 (standard errors)
    pool = [heldout("d_vgg16", 0.063, 0.023, 0.22), heldout("c_vgg16", 0.045, 0.012, 0.365),
            heldout("c_vgg19", 0.010, 0.004, 0.90)]  # far below the best's noise: never tied, whatever its mean
    chosen = selection.select(pool, "roc_auc", heldout_name="worst held-out specificity")
    assert chosen.chosen.name == "c_vgg16" and chosen.by == "heldout" and chosen.value == 0.045
    rows = {r["classifier"]: r for r in chosen.table}
    assert "best held-out mean (0.3650) of the 2 within noise of the best worst held-out specificity (0.0630)" in (
        rows["c_vgg16"]["reason"])
    assert "0.0630 within noise of 0.0450 (difference 0.0180 <= 0.0259" in rows["d_vgg16"]["reason"]
    assert "held-out mean 0.2200 < 0.3650" in rows["d_vgg16"]["reason"]
    assert rows["c_vgg19"]["reason"] == "worst held-out specificity 0.0100 < 0.0630"
    assert rows["c_vgg16"]["heldout_se"] == 0.012 and rows["c_vgg16"]["heldout_mean"] == 0.365


def test_equal_held_out_figures_are_tied_without_standard_errors_and_the_mean_breaks_the_tie():
    # one held-out seed: no standard error, yet 0.0 and 0.0 are tied; params order chose c, saying "0.0000 < 0.0000"
    pool = [heldout("c_vgg16", 0.0, None, 0.10), heldout("d_vgg16", 0.0, None, 0.45)]
    chosen = selection.select(pool, "roc_auc")
    assert chosen.chosen.name == "d_vgg16" and chosen.value == 0.0
    rows = {r["classifier"]: r for r in chosen.table}
    assert rows["d_vgg16"]["reason"] == ("chosen: best held-out mean (0.4500) of the 2 tied on the best held-out "
                                         "figure (0.0000)")
    assert rows["c_vgg16"]["reason"] == "held-out figure 0.0000 = 0.0000; held-out mean 0.1000 < 0.4500"
    # equal means too: the first in params order, and the reasons say so
    same = selection.select([heldout("c_vgg16", 0.0, 0.01, 0.2), heldout("d_vgg16", 0.0, None, 0.2)], "roc_auc")
    assert same.chosen.name == "c_vgg16"
    assert same.table[1]["reason"] == ("held-out figure 0.0000 = 0.0000; held-out mean 0.2000 = 0.2000, the first in "
                                       "params order is chosen")
    # no mean to break it: the first, tied
    bare = selection.select([heldout("c_vgg16", 0.0, None, None), heldout("d_vgg16", 0.0, None, 0.45)], "roc_auc")
    assert bare.chosen.name == "c_vgg16"
    assert bare.table[1]["reason"] == "held-out figure 0.0000 = 0.0000; tied, the first in params order is chosen"


@pytest.mark.parametrize("pool, why", [
    ([heldout("d_vgg16", 0.30, 0.02, 0.3), heldout("c_vgg16", 0.20, 0.02, 0.9)], "apart by more than their noise"),
    ([heldout("d_vgg16", 0.30, None, 0.3), heldout("c_vgg16", 0.29, None, 0.9)], "one seed: no standard error"),
    ([heldout("d_vgg16", 0.30, 0.05, 0.3), heldout("c_vgg16", 0.29, 0.05, None)], "a tied candidate has no mean"),
])
def test_the_best_held_out_figure_chooses_when_no_tie_can_be_measured(pool, why):
    chosen = selection.select(pool, "roc_auc")
    assert chosen.chosen.name == "d_vgg16", why
    assert chosen.table[0]["reason"] == "chosen: best held-out figure (0.3000)"


def test_a_tie_never_brings_back_a_candidate_whose_audit_failed():
    pool = [heldout("d_vgg16", 0.30, 0.05, 0.3), heldout("c_vgg16", 0.29, 0.05, 0.9, status="fail")]
    assert selection.select(pool, "roc_auc").chosen.name == "d_vgg16"


def test_bad_selections_are_errors():
    with pytest.raises(ValueError, match="higher is better"):
        selection.select([candidate("c_vgg16", 0.9)], "ece")
    with pytest.raises(ValueError, match="undefined for every eligible candidate"):
        selection.select([candidate("c_vgg16", None)], "roc_auc")
    with pytest.raises(ValueError, match="no candidate"):
        selection.select([], "roc_auc")


@pytest.mark.parametrize("value, champion, alias", [
    (0.9, None, "champion"), (0.9, 0.8, "champion"), (0.8, 0.8, "champion"), (0.7, 0.8, "challenger"),
    (0.7, math.nan, "champion"),
])
def test_decision_against_the_champion(value, champion, alias):
    assert selection.decide(value, champion) == alias


@pytest.mark.parametrize("status, allow, champion, alias", [
    ("fail", False, None, "challenger"),  # refused even with no champion at all
    ("fail", False, 0.5, "challenger"),
    ("fail", True, None, "champion"),
    ("fail", True, 0.95, "challenger"),  # allowed, but still worse than the champion
    ("warn", False, None, "champion"),
    ("pass", False, 0.9, "champion"),
])
def test_decision_with_the_audit(status, allow, champion, alias):
    assert selection.decide(0.9, champion, status, allow) == alias
    why = selection.reason(alias, "val_roc_auc", 0.9, "no champion", status, ["heatmap_lung_mass:c_vgg16/covid"],
                           allow)
    assert why.startswith("audit failed") or why.startswith("val roc_auc 0.9000")
    assert ("champion refused" in why) == (status == "fail" and not allow)
    assert ("allow_failed_audit is true" in why) == (status == "fail" and allow)
    assert audit.FAIL == "fail"
