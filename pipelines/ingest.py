"""Stage `ingest`: every configured source -> one manifest; rejects and duplicates reported, never dropped silently.

A radiograph listed twice (by two sources, or by one under two patient ids), as a byte-identical file or as two files
that decode to identical pixels (an 8-bit DICOM and a PNG of its pixels; not an 8-bit export of a 12-bit DICOM, whose
values differ), is kept once, the first copy in source order; the patient keys that share such an image become one
(:func:`covidcxr.manifest.merge_patients`), so that the split keeps that person's images together, and copies whose
labels disagree are counted (``label_conflicts``) and warned about: the kept copy's label is the one the manifest
holds. What only a dropped copy of the kept copy's source and site held (a lung mask, the view, sex, age, or a label
with its finding where the kept copy's is unknown: :data:`covidcxr.manifest.CARRIED`) is carried to the kept copy,
never replacing its own value (:func:`covidcxr.manifest.fill_from_copies`); duplicates.csv says what each copy gave
(``carried``), where it held another value, unused (``conflicting``), and what a copy of another source or site held
that the kept copy lacks, not carried (``other_source``: the split's external and held-out rules follow a mask's and
a film's source, so a mask never moves to another source's film). Films of different patients whose thumbnails are
nearly identical (a lossy re-encode or a rescaled copy, :func:`covidcxr.manifest.near_duplicates`) are listed for a
person to decide, never merged: a false merge would make two patients one. An image a source lists but that is
missing on disk (a source loaded with ``on_missing: skip``) is a reject of reason ``missing`` and is counted as
``missing``; it is left out of ``reject_fraction`` (rejected over the listed images found on disk), since skipping the
files not there is what that option asks for (part of an archive unpacked), while an unreadable file is a problem of
the data.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath

import pandas as pd

from covidcxr import datasets, io, manifest, tracking
from pipelines import _common, _tracking

MANIFEST = _common.MANIFEST
REJECTS = "reports/ingest/rejects.csv"
DUPLICATES = "reports/ingest/duplicates.csv"
NEAR_DUPLICATES = "reports/ingest/near_duplicates.csv"
SUMMARY = "reports/ingest/summary.json"
SALT_ENV = "COVIDCXR_PSEUDONYM_SALT"
#: Adapters of a site's own data: their patient ids are not public, unlike those of the public datasets' adapters.
PRIVATE_ADAPTERS = ("generic",)


class TooManyRejects(RuntimeError):
    """More images were rejected than params allow."""


def pseudonymize_patients(frame: pd.DataFrame, salt: str) -> pd.DataFrame:
    """Replace the raw part of ``source:id`` patient keys by a salted hash (equal ids stay equal)."""
    out = frame.copy()
    if out.empty:  # every image rejected: nothing to hash (splitting no keys gives no columns to index)
        return out
    parts = out["patient_id"].str.split(":", n=1, expand=True)
    out["patient_id"] = parts[0] + ":" + parts[1].map(lambda raw: io.pseudonymize(raw, salt))
    return out


def check_unique_ids(listed: pd.DataFrame) -> None:
    """A DatasetLayoutError when two sources list the same image id: two `generic` folders with the same relative
    paths (ids are the source's name and the path), whose images the duplicate handling below would then confuse."""
    clash = listed[listed["image_id"].duplicated(keep=False)]
    if len(clash):
        first = clash["image_id"].iloc[0]
        roots = sorted(set(clash.loc[clash["image_id"] == first, "_root"]))
        raise datasets.DatasetLayoutError(
            f"{clash['image_id'].nunique()} image id(s) listed by more than one source (first: {first}, under "
            f"{' and '.join(roots)}): give the collections different folder layouts, or merge them into one CSV")


def pseudonym_salt(p: dict) -> str:
    """The salt patient ids are hashed with: :data:`SALT_ENV` when set, else ``ingest.salt``.

    ``ingest.salt`` is public (params.yaml, dvc.lock): fine for the public datasets, whose patient ids are published
    with them, but a site's own ids hashed with it can be recovered by hashing guesses. So a :class:`ParamsError`,
    before any work, when ids of a :data:`PRIVATE_ADAPTERS` source would be pseudonymised with it.
    """
    salt = os.environ.get(SALT_ENV)
    if salt:
        return salt
    private = sorted({s["name"] for s in p["sources"] if s["name"] in PRIVATE_ADAPTERS})
    if p["pseudonymize"] and private:
        raise _common.ParamsError(
            f"ingest.sources has a {' and a '.join(private)} source (a site's own data) and {SALT_ENV} is not set: "
            f"ingest.salt is public (params.yaml, dvc.lock), and patient ids hashed with it can be recovered by "
            f"hashing guesses. Set {SALT_ENV} to a secret kept with the data (the same value on every run over it)")
    return str(p["salt"])


def run(p: dict, experiment: str = "demo") -> dict:
    log = _common.setup_logging()
    salt = pseudonym_salt(p)
    frames, missing = [], []
    for source in p["sources"]:
        options = {k: v for k, v in source.items() if k not in ("name", "root")}
        frame = datasets.load(source["name"], source["root"], **options)
        missing.append(missing_rejects(frame, source["name"]))
        log.info("%s: %d images listed under %s (%d of them missing on disk)", source["name"],
                 len(frame) + len(missing[-1]), source["root"], len(missing[-1]))
        frames.append(frame.assign(_root=str(source["root"])))
    combined = pd.concat(frames, ignore_index=True)
    check_unique_ids(combined)
    listed = manifest.conform(combined.drop(columns="_root"))

    described, rejects, thumbnails = manifest.describe_images(
        listed, max_pixels=p["max_pixels"], workers=int(p["workers"] or os.cpu_count() or 1),
        progress=_common.show_progress(), thumbnails=True,
    )
    described, patients_merged = manifest.merge_patients(described)
    duplicates = manifest.find_duplicates(described)
    label_conflicts = int(duplicates["same_label"].eq(False).sum())
    kept = ~described["image_id"].isin(duplicates["image_id"]).to_numpy(dtype=bool)
    result = manifest.fill_from_copies(described)[kept].reset_index(drop=True)  # a dropped copy's mask is kept
    near = manifest.near_duplicates(result, thumbnails[kept])
    if p["pseudonymize"]:
        result = pseudonymize_patients(result, salt)
    if p["max_age"] is not None:  # ages above the cap are identifying (HIPAA safe harbour: 90+)
        result["age"] = result["age"].clip(upper=float(p["max_age"]))

    rejected = int((rejects["kind"] == "image").sum())
    rejects = pd.concat([rejects, *missing], ignore_index=True)[manifest.REJECT_COLUMNS]
    n_missing = sum(len(m) for m in missing)
    summary = {
        "listed": len(listed) + n_missing,
        "missing": n_missing,
        "accepted": len(result),
        "rejected": rejected,
        "masks_rejected": int((rejects["kind"] == "mask").sum()),
        "duplicates": len(duplicates),
        "pixel_duplicates": int((duplicates["match"] == "pixels").sum()),
        "near_duplicates": len(near),
        "label_conflicts": label_conflicts,
        "carried": field_counts(duplicates["carried"]),
        "conflicting": field_counts(duplicates["conflicting"], label=False),  # another label: label_conflicts
        "other_source": field_counts(duplicates["other_source"]),
        "patients_merged": patients_merged,
        "reject_fraction": round(rejected / max(len(listed), 1), 6),  # of the images found: not the missing ones
        "by_source": {s: int(n) for s, n in result["source"].value_counts().sort_index().items()},
        "by_label": {s: int(n) for s, n in result["label"].value_counts().sort_index().items()},
        "by_projection": {s: int(n) for s, n in result["projection"].value_counts().sort_index().items()},
        "rejects_by_reason": {s: int(n) for s, n in rejects["reason"].value_counts().sort_index().items()},
        "patients": int(result["patient_id"].nunique()),
    }
    _common.write_csv(MANIFEST, result)
    _common.write_csv(REJECTS, rejects)
    _common.write_csv(DUPLICATES, duplicates)
    _common.write_csv(NEAR_DUPLICATES, near)
    _common.write_json(SUMMARY, summary)
    for row in rejects.itertuples():
        log.warning("rejected %s of %s (%s): %s", row.kind, row.image_id, row.reason, row.problem)
    log.info("manifest: %d images of %d patients; %d images and %d masks rejected, %d duplicates, %d missing on disk",
             len(result), summary["patients"], rejected, summary["masks_rejected"], len(duplicates), n_missing)
    if patients_merged:
        log.warning("%d patient key(s) merged into another: they share an image, byte- or pixel-identical (%s)",
                    patients_merged, DUPLICATES)
    if len(near):
        log.warning("%d pair(s) of images of different patients look like one film re-encoded or rescaled, not "
                    "merged: see %s, and declare each true pair one patient in its source", len(near), NEAR_DUPLICATES)
    carried, conflicting, other = (", ".join(f"{k} {n}" for k, n in summary[key].items() if n)
                                   for key in ("carried", "conflicting", "other_source"))
    if carried:
        log.info("copies kept took what only a dropped duplicate held (%s): see carried in %s", carried, DUPLICATES)
    if summary["carried"].get("label"):  # a source listing one film unknown and labelled: worth a human look
        log.warning("%d image(s) listed as unknown took the label of a copy of the same film in their source: see "
                    "carried in %s", summary["carried"]["label"], DUPLICATES)
    if conflicting:
        log.warning("duplicate image(s) hold another value than the copy kept, whose value the manifest holds (%s): "
                    "see conflicting in %s", conflicting, DUPLICATES)
    if other:
        log.warning("duplicate image(s) of another source or site than the copy kept hold what it lacks, not carried: "
                    "the split's rules follow a film's and a mask's source and site (%s): see other_source in %s",
                    other, DUPLICATES)
    if label_conflicts:
        log.warning("%d duplicate image(s) carry another label than the copy kept, whose label the manifest holds: "
                    "see same_label in %s", label_conflicts, DUPLICATES)
    _tracking.setup_tracking()
    with tracking.run(_common.mlflow_experiment(experiment), "ingest", params=run_params(p),
                      tags=_tracking.repro_tags("ingest", experiment)):  # a failure below: run FAILED, rejects logged
        log_to_mlflow(summary, rejects, {str(s["root"]): s["name"] for s in p["sources"]})
        if summary["reject_fraction"] > float(p["max_reject_fraction"]):
            raise TooManyRejects(
                f"{rejected} of {len(listed)} images rejected ({summary['reject_fraction']:.1%}), more than "
                f"ingest.max_reject_fraction={p['max_reject_fraction']}"
                f"{f' (not counting {n_missing} missing on disk)' if n_missing else ''}: see {REJECTS}"
            )
        if result.empty:  # whatever the fraction allows: no stage after this one has anything to work on
            raise TooManyRejects(f"no usable image: {rejected} of {len(listed)} listed image(s) rejected"
                                 f"{f', {n_missing} more missing on disk' if n_missing else ''}; see {REJECTS}")
    return summary


def field_counts(fields: pd.Series, label: bool = True) -> dict[str, int]:
    """How many duplicates name each :data:`covidcxr.manifest.CARRIED` field (``label`` among them unless ``label`` is
    False: ``conflicting`` never names it) in a ``;``-joined column of duplicates.csv (``carried``, ``conflicting``,
    ``other_source``): every field, 0 included."""
    named = [f for cell in fields.dropna() for f in str(cell).split(";") if f]
    return {field: named.count(field) for field in sorted(manifest.CARRIED) if label or field != "label"}


def missing_rejects(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """The images ``source``'s adapter left out of ``frame`` as missing on disk (``on_missing: skip``), as reject
    rows (:data:`covidcxr.manifest.REJECT_COLUMNS`) of kind ``image`` and reason ``missing``."""
    skipped = datasets.skipped(frame)
    return skipped.assign(source=source, kind="image", reason="missing",
                          problem="listed by the source's metadata, missing on disk (on_missing: skip)")


def run_params(p: dict) -> dict:
    """What the MLflow run records of params: everything but the pseudonymisation salt (it would make the patient
    hashes reversible by guessing ids), and of each source only its adapter's name (a site's folder names the site)."""
    return {k: v for k, v in p.items() if k != "salt"} | {"sources": ", ".join(s["name"] for s in p["sources"])}


def mlflow_rejects(rejects: pd.DataFrame, roots: dict[str, str] | None = None) -> pd.DataFrame:
    """The rejects as MLflow gets them: images named by ``image_id`` only, without the file path column, with the
    path cut out of each problem text and every other file under a source's root (``roots``: root -> adapter name)
    named ``<adapter>/<path under the root>`` like an image id, as the other mask of a left/right pair is (a tracking
    server is shared more widely than the project's own outputs, and a site's folder names the site)."""
    prefixes = sorted(((f"{PurePosixPath(root)}/", f"{name}/") for root, name in (roots or {}).items()
                       if str(PurePosixPath(root)) != "."), key=lambda pair: -len(pair[0]))  # nested roots: longest

    def clean(problem: str, path: str, image_id: str) -> str:
        head, sep, rest = problem.partition(": ")
        if sep and ("/" in head or "\\" in head):  # "<file>: <what is wrong>", the file being the image or its mask
            problem = rest
        problem = problem.replace(path, image_id)
        for prefix, name in prefixes:
            problem = problem.replace(prefix, name)
        return problem

    problems = [clean(str(problem), str(path), str(image_id))
                for problem, path, image_id in zip(rejects["problem"], rejects["path"], rejects["image_id"])]
    return rejects.drop(columns=["path"]).assign(problem=problems)


def log_to_mlflow(summary: dict, rejects: pd.DataFrame, roots: dict[str, str] | None = None) -> None:
    """Counts as metrics, the rejects (:func:`mlflow_rejects`) and the summary as artifacts of the active run."""
    import mlflow

    mlflow.log_metrics({"n_listed": summary["listed"], "n_missing": summary["missing"],
                        "n_accepted": summary["accepted"], "n_rejected": summary["rejected"],
                        "n_masks_rejected": summary["masks_rejected"],
                        "n_duplicates": summary["duplicates"], "n_label_conflicts": summary["label_conflicts"],
                        "n_pixel_duplicates": summary["pixel_duplicates"],
                        "n_near_duplicates": summary["near_duplicates"],
                        "n_masks_carried": summary["carried"]["mask_path"],
                        "n_mask_conflicts": summary["conflicting"]["mask_path"],
                        "n_masks_other_source": summary["other_source"]["mask_path"],
                        "reject_fraction": summary["reject_fraction"]})
    mlflow.log_text(mlflow_rejects(rejects, roots).to_csv(index=False, lineterminator="\n"), "ingest/rejects.csv")
    mlflow.log_dict(summary, "ingest/summary.json")


if __name__ == "__main__":
    run(_common.params("ingest"), _common.filed_under())
    _common.finish()
