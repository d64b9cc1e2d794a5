"""The register stage refuses `champion` to a model whose shortcut audit failed, unless params allow it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from covidcxr import audit
from pipelines import register


def write_audit(path: Path) -> Path:
    checks = [
        audit.lungs_removed_check("vgg16", 0.99, 0.98, warn=0.3, fail=0.6),  # c_vgg16 (and e_vgg16) fail
        audit.lungs_removed_check("vgg19", 0.99, 0.55, warn=0.3, fail=0.6),  # pass
        audit.heatmap_check("d_vgg19/covid", 0.3, 0.25, warn=1.5, fail=1.0),  # warn
        audit.heatmap_check("c_vgg19/covid", 0.8, 0.25, warn=1.5, fail=1.0),  # pass
    ]
    path.write_text(json.dumps(audit.report(checks)))
    return path


def test_audit_verdict_per_model(tmp_path):
    path = write_audit(tmp_path / "audit.json")
    assert register.audit_verdict("c_vgg16", path) == ("fail", ["lungs_removed_auc:c_vgg16"])
    assert register.audit_verdict("e_vgg16", path) == ("fail", ["lungs_removed_auc:c_vgg16"])
    assert register.audit_verdict("d_vgg19", path) == ("warn", [])
    assert register.audit_verdict("c_vgg19", path) == ("pass", [])
    with pytest.raises(FileNotFoundError, match="missing.*audit stage"):
        register.audit_verdict("c_vgg16", tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text('{"status": "pass"}')
    with pytest.raises(ValueError, match="bad.json: not an audit report"):
        register.audit_verdict("c_vgg16", tmp_path / "bad.json")


@pytest.mark.parametrize("status, allow, champion, alias", [
    ("fail", False, None, "challenger"),  # refused even with no champion at all
    ("fail", False, 0.5, "challenger"),
    ("fail", True, None, "champion"),
    ("fail", True, 0.95, "challenger"),  # allowed, but still worse than the champion
    ("warn", False, None, "champion"),
    ("pass", False, 0.9, "champion"),
])
def test_decision_with_the_audit(status, allow, champion, alias):
    assert register.decide(0.9, champion, status, allow) == alias
    why = register.reason(alias, "roc_auc", 0.9, "no champion", status, ["heatmap_lung_mass:c_vgg16/covid"], allow)
    assert ("champion refused" in why) == (status == "fail" and not allow)
    assert ("allow_failed_audit is true" in why) == (status == "fail" and allow)
