"""Stage `ingest` on a small corpus with bad files: every reject reported (file and MLflow), the run fails only above
ingest.max_reject_fraction. Runs the stage in-process in a scratch project directory (real files, sqlite MLflow)."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines import ingest

ROOT = "data/private-site-7"  # stands for a site folder whose name must not reach the tracking server
SITE_SALT = "site-secret"  # a site's own data is pseudonymised only with a salt from the environment


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch, mlflow_db: Path) -> Path:
    """Four good PNGs, one truncated PNG and one zero-byte file, described by a generic manifest.csv."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_db}")
    monkeypatch.setenv(ingest.SALT_ENV, SITE_SALT)
    (tmp_path / "params.yaml").write_text("split:\n  experiment: ingest-test\n")
    root = tmp_path / ROOT
    (root / "scans").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 32), dtype=np.uint8)).save(root / f"scans/good_{i}.png")
        rows.append((f"scans/good_{i}.png", f"p{i}", "covid" if i % 2 else "negative"))
    full = (root / "scans/good_0.png").read_bytes()
    (root / "scans/cut.png").write_bytes(full[: len(full) // 2])
    (root / "scans/empty.png").write_bytes(b"")
    rows += [("scans/cut.png", "p8", "covid"), ("scans/empty.png", "p9", "negative")]
    pd.DataFrame(rows, columns=["path", "patient_id", "label"]).assign(projection="frontal").to_csv(
        root / "manifest.csv", index=False)
    yield tmp_path
    mlflow.set_tracking_uri(None)


def params(max_reject_fraction: float) -> dict:
    return {"sources": [{"name": "generic", "root": ROOT}], "max_pixels": 10_000_000,
            "max_reject_fraction": max_reject_fraction, "pseudonymize": True, "salt": "test-salt", "max_age": 90,
            "workers": 1}


def ingest_run(project: Path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("covidcxr-ingest-test")
    (found,) = client.search_runs([experiment.experiment_id], filter_string="tags.dvc_stage = 'ingest'")
    rejects = client.download_artifacts(found.info.run_id, "ingest/rejects.csv", str(project))
    return found, pd.read_csv(rejects)


def test_rejects_reported_and_logged_under_the_threshold(corpus: Path):
    summary = ingest.run(params(max_reject_fraction=0.4), "ingest-test")
    assert (summary["listed"], summary["accepted"], summary["rejected"]) == (6, 4, 2)

    rejects = pd.read_csv(corpus / ingest.REJECTS)
    assert dict(zip(rejects["path"].str.rsplit("/", n=1).str[-1], rejects["kind"])) == {
        "cut.png": "image", "empty.png": "image"}
    assert rejects["reason"].notna().all() and rejects["problem"].notna().all()
    assert len(pd.read_csv(corpus / ingest.MANIFEST)) == 4

    found, logged = ingest_run(corpus)
    assert found.info.status == "FINISHED"
    metrics = found.data.metrics
    assert (metrics["n_listed"], metrics["n_accepted"], metrics["n_rejected"]) == (6, 4, 2)
    assert metrics["reject_fraction"] == pytest.approx(2 / 6, abs=1e-6)
    # The same rejects, named by image_id, with the same reasons; no file paths, and no salt among the params.
    assert list(logged["image_id"]) == list(rejects["image_id"])
    assert list(logged["reason"]) == list(rejects["reason"])
    assert "path" not in logged.columns
    assert not logged.astype(str).apply(lambda c: c.str.contains("private-site-7")).any().any()
    assert "salt" not in found.data.params and "test-salt" not in str(found.data.params)
    assert found.data.params["max_reject_fraction"] == "0.4"


def test_too_many_rejects_fail_naming_the_share_and_the_threshold(corpus: Path):
    with pytest.raises(ingest.TooManyRejects) as caught:
        ingest.run(params(max_reject_fraction=0.2), "ingest-test")
    message = str(caught.value)
    assert "2 of 6 images rejected (33.3%)" in message and "ingest.max_reject_fraction=0.2" in message, message
    assert ingest.REJECTS in message
    # The rejects are still reported (file and MLflow); the run is marked failed.
    assert len(pd.read_csv(corpus / ingest.REJECTS)) == 2
    found, logged = ingest_run(corpus)
    assert found.info.status == "FAILED"
    assert found.data.metrics["n_rejected"] == 2 and len(logged) == 2


def test_two_sources_listing_the_same_image_ids_are_an_error_naming_both(corpus: Path):
    """Two hospitals' generic folders with the same relative paths gave the same image ids: the manifest held both,
    and the duplicate handling would remove both rows wherever one was a copy of another image; validate's uniqueness
    check was the first to say anything. Now ingest names the clash and both folders."""

    from covidcxr import datasets

    shutil.copytree(corpus / ROOT, corpus / "data/private-site-8")
    two = {**params(max_reject_fraction=0.4),
           "sources": [{"name": "generic", "root": ROOT}, {"name": "generic", "root": "data/private-site-8"}]}
    with pytest.raises(datasets.DatasetLayoutError, match=r"6 image id\(s\) listed by more than one source \(first: "
                                                          r"generic/scans/.*under data/private-site-7 and "
                                                          r"data/private-site-8\)"):
        ingest.run(two, "ingest-test")


def test_a_file_listed_under_two_patients_merges_them_and_a_label_conflict_is_counted(corpus: Path, caplog):
    """The same film under a second patient id (and another label): ingest dropped the copy but left its patient a
    separate person, whose other films the split could put in train while the kept copy's patient was in test; the
    copies' disagreement on the label was neither counted nor reported."""
    import logging

    root = corpus / ROOT
    (root / "scans/zz_copy_of_0.png").write_bytes((root / "scans/good_0.png").read_bytes())
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 32), dtype=np.uint8)).save(root / "scans/zz_p7.png")
    listed = pd.read_csv(root / "manifest.csv")
    extra = pd.DataFrame({"path": ["scans/zz_copy_of_0.png", "scans/zz_p7.png"], "patient_id": ["p7", "p7"],
                          "label": ["covid", "covid"], "projection": "frontal"})  # good_0: p0's, negative, listed first
    pd.concat([listed, extra]).to_csv(root / "manifest.csv", index=False)

    with caplog.at_level(logging.WARNING, logger="covidcxr"):
        summary = ingest.run(params(max_reject_fraction=0.4), "ingest-test")
    assert (summary["accepted"], summary["duplicates"]) == (5, 1)
    assert (summary["label_conflicts"], summary["patients_merged"]) == (1, 1)
    assert summary["patients"] == 4  # p0..p3, p7 now p0
    m = pd.read_csv(corpus / ingest.MANIFEST).set_index("image_id")
    assert m.loc["generic/scans/zz_p7", "patient_id"] == m.loc["generic/scans/good_0", "patient_id"]
    assert m.loc["generic/scans/good_0", "label"] == "negative"  # the kept copy's
    assert "1 duplicate image(s) carry another label than the copy kept" in caplog.text
    assert "1 patient key(s) merged" in caplog.text
    found, _ = ingest_run(corpus)
    assert found.data.metrics["n_label_conflicts"] == 1


def test_a_film_re_encoded_under_another_patient_is_merged_and_a_lossy_copy_is_listed(corpus: Path, caplog):
    """Ingest merged patients and dropped copies only for byte-identical files: the real Cohen corpus holds one
    radiograph as two JPEGs of other bytes under two patient ids, which the split put in train and test (4 seeds of
    12). A copy of identical pixels is now one image of one patient; a lossy copy is listed, not merged."""
    import logging

    from covidcxr import phantoms

    root = corpus / ROOT
    Image.open(root / "scans/good_0.png").save(root / "scans/zz_resaved_0.png", compress_level=0)  # other bytes
    image, _ = phantoms.chest_phantom(np.random.default_rng(5), 128, projection="frontal", covid=False,
                                      site=phantoms.SiteStyle())
    film = Image.fromarray(np.round(image * 255).astype(np.uint8))
    film.save(root / "scans/zz_film.png")
    film.save(root / "scans/zz_film_lossy.jpg", quality=50)
    listed = pd.read_csv(root / "manifest.csv")
    extra = pd.DataFrame({"path": ["scans/zz_resaved_0.png", "scans/zz_film.png", "scans/zz_film_lossy.jpg"],
                          "patient_id": ["p7", "p10", "p11"], "label": ["covid", "negative", "covid"],
                          "projection": "frontal"})
    pd.concat([listed, extra]).to_csv(root / "manifest.csv", index=False)
    assert (root / "scans/zz_resaved_0.png").read_bytes() != (root / "scans/good_0.png").read_bytes()

    with caplog.at_level(logging.WARNING, logger="covidcxr"):
        summary = ingest.run(params(max_reject_fraction=0.4), "ingest-test")
    assert (summary["accepted"], summary["duplicates"], summary["pixel_duplicates"]) == (6, 1, 1)
    assert (summary["patients_merged"], summary["label_conflicts"], summary["near_duplicates"]) == (1, 1, 1)
    duplicates = pd.read_csv(corpus / ingest.DUPLICATES)
    assert duplicates[["image_id", "kept_image_id", "match"]].values.tolist() == [
        ["generic/scans/zz_resaved_0", "generic/scans/good_0", "pixels"]]
    near = pd.read_csv(corpus / ingest.NEAR_DUPLICATES)
    assert near[["image_id", "other_image_id"]].values.tolist() == [["generic/scans/zz_film",
                                                                     "generic/scans/zz_film_lossy"]]
    m = pd.read_csv(corpus / ingest.MANIFEST).set_index("image_id")
    assert m.loc["generic/scans/zz_film", "patient_id"] != m.loc["generic/scans/zz_film_lossy", "patient_id"]
    assert m["pixel_sha256"].notna().all() and m["pixel_sha256"].is_unique
    assert "1 pair(s) of images of different patients look like one film" in caplog.text
    found, _ = ingest_run(corpus)
    assert (found.data.metrics["n_pixel_duplicates"], found.data.metrics["n_near_duplicates"]) == (1, 1)


def test_a_lung_mask_only_a_dropped_copy_held_is_kept_and_reported(corpus: Path, caplog):
    """A mask dataset's lossless re-save of a film that another collection lists first (without a mask): ingest kept
    the first copy and dropped the mask with the second, and duplicates.csv did not say so. The kept copy now takes
    the mask (and the age only the copy stated); a third copy's other mask is left unused and reported."""
    import logging

    root = corpus / ROOT
    (root / "masks").mkdir()
    lungs = np.zeros((40, 32), dtype=np.uint8)
    lungs[8:32, 4:28] = 255
    Image.fromarray(lungs).save(root / "masks/lungs_0.png")
    Image.fromarray(255 - lungs).save(root / "masks/other_0.png")
    Image.open(root / "scans/good_0.png").save(root / "scans/zz_resaved_0.png", compress_level=0)  # other bytes
    (root / "scans/zz_resaved_0_copy.png").write_bytes((root / "scans/good_0.png").read_bytes())
    listed = pd.read_csv(root / "manifest.csv")
    extra = pd.DataFrame({"path": ["scans/zz_resaved_0.png", "scans/zz_resaved_0_copy.png"], "patient_id": ["p0", "p0"],
                          "label": ["negative", "negative"], "projection": "frontal", "age": [61, 62],
                          "mask_path": ["masks/lungs_0.png", "masks/other_0.png"]})
    pd.concat([listed, extra]).to_csv(root / "manifest.csv", index=False)

    with caplog.at_level(logging.INFO, logger="covidcxr"):
        summary = ingest.run(params(max_reject_fraction=0.4), "ingest-test")
    assert (summary["accepted"], summary["duplicates"], summary["pixel_duplicates"]) == (4, 2, 1)
    assert summary["carried"] == {"age": 1, "label": 0, "mask_path": 1, "sex": 0, "view": 0}
    assert summary["conflicting"] == {"age": 1, "mask_path": 1, "sex": 0, "view": 0}
    assert not any(summary["other_source"].values())
    m = pd.read_csv(corpus / ingest.MANIFEST).set_index("image_id")
    assert m.loc["generic/scans/good_0", "mask_path"] == f"{ROOT}/masks/lungs_0.png"
    assert m.loc["generic/scans/good_0", "age"] == 61
    duplicates = pd.read_csv(corpus / ingest.DUPLICATES, keep_default_na=False)
    assert duplicates[["image_id", "carried", "conflicting"]].values.tolist() == [
        ["generic/scans/zz_resaved_0", "mask_path;age", ""], ["generic/scans/zz_resaved_0_copy", "", "mask_path;age"]]
    assert "copies kept took what only a dropped duplicate held (age 1, mask_path 1)" in caplog.text
    assert "hold another value than the copy kept, whose value the manifest holds (age 1, mask_path 1)" in caplog.text
    found, _ = ingest_run(corpus)
    assert (found.data.metrics["n_masks_carried"], found.data.metrics["n_mask_conflicts"]) == (1, 1)


def test_a_copy_of_another_source_carries_nothing_and_an_unknown_label_takes_its_sources_label(corpus: Path,
                                                                                                  caplog):
    """A mask carried from another source's copy sat under the kept copy's source, where the split's rules
    (segmentation_external, holdout by source) no longer found it: a mask source's film that another source lists
    first keeps its mask with its own copy now, reported (other_source) and warned about. A film its source lists
    twice, once unlabelled, took neither copy's label and counted as a label conflict: it takes the labelled copy's."""
    import logging

    root, mask_root = corpus / ROOT, corpus / "data/montgomery"
    (mask_root / "images").mkdir(parents=True)
    (mask_root / "masks").mkdir()
    (mask_root / "images/MCUCXR_0001_0.png").write_bytes((root / "scans/good_0.png").read_bytes())
    lungs = np.zeros((40, 32), dtype=np.uint8)
    lungs[8:32, 4:28] = 255
    Image.fromarray(lungs).save(mask_root / "masks/MCUCXR_0001_0.png")
    listed = pd.read_csv(root / "manifest.csv")
    listed.loc[listed["path"] == "scans/good_2.png", "label"] = "unknown"
    Image.open(root / "scans/good_2.png").save(root / "scans/zz_resaved_2.png", compress_level=0)  # other bytes
    extra = pd.DataFrame({"path": ["scans/zz_resaved_2.png"], "patient_id": ["p2"], "label": ["covid"],
                          "finding": ["COVID-19"], "projection": "frontal"})
    pd.concat([listed, extra]).to_csv(root / "manifest.csv", index=False)
    p = params(max_reject_fraction=0.4)
    p["sources"].append({"name": "montgomery", "root": "data/montgomery"})

    with caplog.at_level(logging.INFO, logger="covidcxr"):
        summary = ingest.run(p, "ingest-test")
    assert (summary["accepted"], summary["duplicates"], summary["label_conflicts"]) == (4, 2, 0)
    assert summary["carried"] == {"age": 0, "label": 1, "mask_path": 0, "sex": 0, "view": 0}
    assert summary["other_source"] == {"age": 0, "label": 0, "mask_path": 1, "sex": 0, "view": 1}
    m = pd.read_csv(corpus / ingest.MANIFEST).set_index("image_id")
    assert pd.isna(m.loc["generic/scans/good_0", "mask_path"]) and set(m["source"]) == {"generic"}
    assert tuple(m.loc["generic/scans/good_2", ["label", "finding"]]) == ("covid", "COVID-19")
    duplicates = pd.read_csv(corpus / ingest.DUPLICATES, keep_default_na=False)
    assert duplicates[["image_id", "carried", "other_source", "same_label"]].values.tolist() == [
        ["generic/scans/zz_resaved_2", "label", "", True],
        ["montgomery/images/MCUCXR_0001_0", "", "mask_path;view", True]]
    assert "of another source or site than the copy kept hold what it lacks, not carried" in caplog.text
    assert "(mask_path 1, view 1)" in caplog.text and "MCUCXR" not in caplog.text.split("not carried")[-1]
    found, _ = ingest_run(corpus)
    assert (found.data.metrics["n_masks_carried"], found.data.metrics["n_masks_other_source"]) == (0, 1)


def test_every_image_rejected_is_too_many_rejects_with_the_report_written(corpus: Path):
    """A source whose files are all Git LFS pointer texts (a clone without `git lfs pull`): pseudonymising the empty
    manifest crashed with a bare KeyError: 0 before any report was written."""
    root = corpus / ROOT
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 5120\n"
    for i in range(3):
        (root / f"scans/lfs_{i}.png").write_text(pointer.format(f"{i:064x}"))
    pd.DataFrame({"path": [f"scans/lfs_{i}.png" for i in range(3)], "patient_id": ["p1", "p2", "p3"],
                  "label": "covid", "projection": "frontal"}).to_csv(root / "manifest.csv", index=False)

    with pytest.raises(ingest.TooManyRejects, match=r"3 of 3 images rejected \(100.0%\)"):
        ingest.run(params(max_reject_fraction=0.4), "ingest-test")
    rejects = pd.read_csv(corpus / ingest.REJECTS)
    assert list(rejects["reason"]) == ["not_an_image"] * 3
    assert len(pd.read_csv(corpus / ingest.MANIFEST)) == 0
    found, logged = ingest_run(corpus)
    assert found.info.status == "FAILED" and len(logged) == 3
    # A fraction that allows every reject still leaves nothing to train or score on: an error too, not an empty manifest
    with pytest.raises(ingest.TooManyRejects, match=r"no usable image: 3 of 3 listed image\(s\) rejected"):
        ingest.run(params(max_reject_fraction=1.0), "ingest-test")


def test_a_site_s_own_data_is_not_pseudonymised_with_the_public_params_salt(corpus: Path, monkeypatch):
    """ingest.salt is in params.yaml and dvc.lock: a generic source's patient ids hashed with it could be recovered
    by hashing guesses. Without COVIDCXR_PSEUDONYM_SALT the stage now stops before any work, naming the variable."""
    from covidcxr import io
    from pipelines import _common

    monkeypatch.delenv(ingest.SALT_ENV)
    with pytest.raises(_common.ParamsError, match=r"generic source .*COVIDCXR_PSEUDONYM_SALT is not set"):
        ingest.run(params(max_reject_fraction=0.4), "ingest-test")
    assert not (corpus / "reports").exists() and not (corpus / ingest.MANIFEST).exists()

    # not pseudonymised: no salt needed; with the variable set, its salt is the one used
    ingest.run({**params(max_reject_fraction=0.4), "pseudonymize": False}, "ingest-test")
    monkeypatch.setenv(ingest.SALT_ENV, SITE_SALT)
    ingest.run(params(max_reject_fraction=0.4), "ingest-test")
    m = pd.read_csv(corpus / ingest.MANIFEST).set_index("image_id")
    assert m.loc["generic/scans/good_0", "patient_id"] == f"generic:{io.pseudonymize('p0', SITE_SALT)}"


def test_no_site_folder_name_reaches_mlflow(corpus: Path):
    """The run's params named each source's folder (generic:data/private-site-7), and a left/right mask pair of two
    shapes was reported with the first mask's full path, which cutting the leading path left in the logged rejects."""
    root = corpus / ROOT
    (root / "masks").mkdir()
    Image.fromarray(np.full((40, 32), 255, dtype=np.uint8)).save(root / "masks/left.png")
    Image.fromarray(np.full((20, 16), 255, dtype=np.uint8)).save(root / "masks/right.png")
    listed = pd.read_csv(root / "manifest.csv")
    listed["mask_path"] = ["masks/left.png;masks/right.png"] + [""] * (len(listed) - 1)
    listed.to_csv(root / "manifest.csv", index=False)

    summary = ingest.run(params(max_reject_fraction=0.4), "ingest-test")
    assert summary["masks_rejected"] == 1
    local = pd.read_csv(corpus / ingest.REJECTS)
    assert local["problem"].str.contains(f"of {ROOT}/masks/left.png").any()  # the local report keeps the paths

    found, logged = ingest_run(corpus)
    assert found.data.params["sources"] == "generic"
    assert "private-site-7" not in str(found.data.params)
    assert not logged.astype(str).apply(lambda c: c.str.contains("private-site-7")).any().any()
    (problem,) = logged.loc[logged["kind"] == "mask", "problem"]
    assert problem.endswith("of generic/masks/left.png"), problem


def test_images_missing_on_disk_are_reported_but_not_counted_as_rejects(corpus: Path):
    """With on_missing: skip the files a source lists but that are not on disk were only logged: not in
    rejects.csv, the summary or MLflow, and `listed` was counted after the skip."""
    root = corpus / ROOT
    listed = pd.read_csv(root / "manifest.csv")
    gone = pd.DataFrame([("scans/gone_a.png", "p10", "covid"), ("scans/gone_b.png", "p11", "negative")],
                        columns=["path", "patient_id", "label"]).assign(projection="frontal")
    pd.concat([listed, gone]).to_csv(root / "manifest.csv", index=False)
    p = {**params(max_reject_fraction=0.4), "sources": [{"name": "generic", "root": ROOT, "on_missing": "skip"}]}

    summary = ingest.run(p, "ingest-test")
    assert (summary["listed"], summary["missing"], summary["accepted"], summary["rejected"]) == (8, 2, 4, 2)
    assert summary["reject_fraction"] == pytest.approx(2 / 6, abs=1e-6)  # of the 6 images found on disk
    assert summary["rejects_by_reason"]["missing"] == 2
    rejects = pd.read_csv(corpus / ingest.REJECTS)
    missing = rejects[rejects["reason"] == "missing"]
    assert list(missing["image_id"]) == ["generic/scans/gone_a", "generic/scans/gone_b"]
    assert set(missing["kind"]) == {"image"} and missing["path"].str.endswith(".png").all()
    assert (rejects["reason"] != "missing").sum() == 2  # the unreadable ones, as before

    found, logged = ingest_run(corpus)
    assert found.data.metrics["n_missing"] == 2 and found.data.metrics["n_listed"] == 8
    assert found.data.metrics["reject_fraction"] == pytest.approx(2 / 6, abs=1e-6)
    assert list(logged.loc[logged["reason"] == "missing", "image_id"]) == list(missing["image_id"])
    assert "path" not in logged.columns
    assert not logged.astype(str).apply(lambda c: c.str.contains("private-site-7|gone_a.png")).any().any()

    with pytest.raises(ingest.TooManyRejects, match=r"2 of 6 images rejected .* \(not counting 2 missing on disk\)"):
        ingest.run({**p, "max_reject_fraction": 0.2}, "ingest-test")
