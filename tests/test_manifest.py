import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from covidcxr import datasets, manifest, projection


def write_png(path, value_seed, size=(40, 30)):
    rng = np.random.default_rng(value_seed)
    Image.fromarray(rng.integers(0, 255, size=size, dtype=np.uint8)).save(path)
    return str(path)


def write_dicom(path, *, view="PA", sex="F", age="051Y"):
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.4"
    ds.Modality, ds.ViewPosition, ds.PatientSex, ds.PatientAge = "DX", view, sex, age
    ds.PatientName, ds.PatientID = "SECRET^NAME", "MRN-998877"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 32, 32, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def listed(rows):
    return manifest.conform(pd.DataFrame(rows))


def row(image_id, path, **extra):
    base = {"image_id": image_id, "path": path, "source": "t", "patient_id": f"t:{image_id}", "projection": "unknown",
            "label": "negative", "sex": "unknown"}
    return {**base, **extra}


def test_describe_fills_facts_from_files_and_headers(tmp_path):
    df = listed([row("a", write_dicom(tmp_path / "a.dcm", view="LL")), row("b", write_png(tmp_path / "b.png", 1))])
    out, rejects = manifest.describe_images(df)
    assert rejects.empty
    a, b = out.set_index("image_id").loc["a"], out.set_index("image_id").loc["b"]
    assert (a["width"], a["height"], a["bits_stored"], a["photometric"]) == (32, 32, 12, "MONOCHROME2")
    assert (a["view_position"], a["projection"], a["modality"], a["sex"], a["age"]) == ("LL", "lateral", "DX", "F", 51)
    assert (b["width"], b["height"]) == (30, 40)
    assert len(a["sha256"]) == 64 and a["sha256"] != b["sha256"]
    assert "SECRET" not in out.to_csv() and "MRN-998877" not in out.to_csv()


def test_describe_reports_every_rejected_file_with_its_reason(tmp_path):
    good = write_png(tmp_path / "good.png", 2)
    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray(np.full((20, 20), 9, np.uint8)).save(tmp_path / "flat.png")
    mask = tmp_path / "empty_mask.png"
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(mask)
    df = listed([
        row("good", good),
        row("text", str(tmp_path / "text.png")),
        row("flat", str(tmp_path / "flat.png")),
        row("missing", str(tmp_path / "nope.png")),
        row("masked", write_png(tmp_path / "m.png", 3), mask_path=str(mask)),
    ])
    out, rejects = manifest.describe_images(df, workers=2)
    assert list(out["image_id"]) == ["good", "masked"]  # an unusable mask does not reject its image
    assert out.set_index("image_id").loc["masked", "mask_path"] is pd.NA
    assert dict(zip(rejects["image_id"], rejects["kind"]))["masked"] == "mask"
    reasons = dict(zip(rejects["image_id"], rejects["reason"]))
    assert reasons == {"text": "not_an_image", "flat": "zero_variance", "missing": "unreadable", "masked": "empty_mask"}
    assert all(str(tmp_path) in p for p in rejects["problem"])  # the message names the file


def test_find_duplicates_by_content_hash(tmp_path):
    a = write_png(tmp_path / "a.png", 5)
    b = tmp_path / "copy.png"
    b.write_bytes((tmp_path / "a.png").read_bytes())
    df, _ = manifest.describe_images(listed([row("a", a), row("b", str(b), label="covid"),
                                             row("c", write_png(tmp_path / "c.png", 6))]))
    dup = manifest.find_duplicates(df)
    assert list(dup["image_id"]) == ["b"] and list(dup["kept_image_id"]) == ["a"]
    assert list(dup["same_label"]) == [False]


def test_conform_refuses_unknown_columns():
    with pytest.raises(ValueError, match="not in the manifest schema"):
        manifest.conform(pd.DataFrame({"image_id": ["x"], "clinical_notes": ["..."]}))


@pytest.mark.parametrize("view,expected", [("PA", "frontal"), ("ap supine", "frontal"), ("L", "lateral"),
                                           ("LL", "lateral"), (None, "unknown"), ("?", "unknown"),
                                           # lateral decubitus: a frontal projection of a patient on one side, which
                                           # was called lateral (and refused by serving): the filter decides
                                           ("LLD", "unknown"), ("RLD", "unknown")])
def test_projection_from_view(view, expected):
    assert manifest.projection_from_view(view) == expected


@pytest.mark.parametrize("view", ["AP_SUPINE", "ap_supine", "AP-SUPINE", " AP  SUPINE ", "AP_HORIZONTAL",
                                  "ap horizontal"])
def test_projection_from_view_reads_underscores_and_spaces_as_one_spelling(view):
    # real exports write AP_SUPINE for DICOM's "AP SUPINE"; it was left unknown, for the filter to guess
    assert manifest.projection_from_view(view) == "frontal"


def test_header_view_with_underscores_decides_the_projection():
    # the DICOM View Position the projection rule trusts (filter_frontal and serving) is read the same way
    called, decided_by = projection.decide(np.array([0.1, 0.1]), ["AP_SUPINE", "LL"], 0.5)
    assert list(called) == ["frontal", "lateral"] and list(decided_by) == [projection.BY_HEADER] * 2


def test_real_montgomery_shenzhen_describe(real_data):
    df = datasets.load("montgomery", real_data / "montgomery_shenzhen").head(12)
    out, rejects = manifest.describe_images(df, workers=2)
    assert rejects.empty and len(out) == 12
    assert (out["width"] == 256).all() and out["mask_path"].notna().all()


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda df: df.assign(clinical_notes="x"), r"columns not in the manifest schema: \['clinical_notes'\]"),
        (lambda df: df.assign(width="wide"), "not a readable manifest CSV"),
    ],
    ids=["unknown-column", "bad-value"],
)
def test_read_csv_errors_name_the_file(tmp_path, edit, problem):
    path = tmp_path / "manifest.csv"
    edit(listed([row("a", "a.png")])).to_csv(path, index=False)
    with pytest.raises(manifest.ManifestError, match=problem) as err:
        manifest.read_csv(path)
    assert str(path) in str(err.value)


def test_read_raw_csv_adds_no_column_and_keeps_the_dtypes(tmp_path):
    path = tmp_path / "manifest.csv"
    listed([row("a", "a.png", width=40)]).drop(columns=["modality"]).to_csv(path, index=False)
    raw = manifest.read_raw_csv(path)
    assert "modality" not in raw and raw["width"].dtype == "Int64" and raw["mask_path"].dtype == "string"
    assert raw["mask_path"].isna().all()  # an empty cell is <NA>, as in read_csv
    assert manifest.read_csv(path)["modality"].isna().all()


def test_patients_sharing_a_file_become_one_the_first_listed():
    files = [("a1", "a:1", "h1"), ("b1", "b:9", "h1"), ("b2", "b:9", "h2"), ("c1", "c:3", "h2"), ("c2", "c:3", "h3"),
             ("d1", "d:4", "h4")]
    df = listed([row(i, f"{i}.png", patient_id=patient, sha256=sha) for i, patient, sha in files])
    merged, n = manifest.merge_patients(df)
    assert n == 2  # b:9 through a shared file with a:1, c:3 through one with b:9
    assert list(merged["patient_id"]) == ["a:1"] * 5 + ["d:4"]
    assert merged.drop(columns="patient_id").equals(df.drop(columns="patient_id"))
    # later keys never win, whatever order the links are met in
    again, _ = manifest.merge_patients(df.iloc[[0, 3, 4, 1, 2, 5]].reset_index(drop=True))
    assert set(again["patient_id"]) == {"a:1", "d:4"}
    unique = df.assign(sha256=[f"h{i}" for i in range(len(df))])
    assert manifest.merge_patients(unique) == (unique, 0)


def test_decode_hints_give_each_row_its_photometric_and_bits_for_read_image(tmp_path):
    from PIL import Image

    from covidcxr import io
    from pipelines import explain

    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # MONOCHROME1: the stored 0 (left) is white
    Image.fromarray(ramp).save(tmp_path / "m1.png")
    m = pd.DataFrame({"photometric": ["MONOCHROME1", pd.NA], "bits_stored": [8, pd.NA]})
    photometric, bits = manifest.decode_hints(m)
    assert (photometric, bits) == (["MONOCHROME1", None], [8, None])
    shown = explain.original(str(tmp_path / "m1.png"), 64, photometric=photometric[0], bits_stored=bits[0])
    as_stored = explain.original(str(tmp_path / "m1.png"), 64)
    assert shown[:, 0].mean() > shown[:, -1].mean()  # inverted for display, as in the cache
    assert as_stored[:, 0].mean() < as_stored[:, -1].mean()
    assert io.read_image(str(tmp_path / "m1.png"), photometric=photometric[1], bits_stored=bits[1])[0][0, 0] == 0
