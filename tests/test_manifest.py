import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from covidcxr import datasets, manifest, phantoms, projection


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


@pytest.mark.parametrize("order", [("covid", "unknown"), ("unknown", "covid")])
def test_an_unknown_label_conflicts_with_none_whichever_copy_is_listed_first(order):
    """A film listed unknown and covid by its source counted as a label conflict only when the labelled copy was
    listed first (the unknown one kept took the label and agreed): the same film, two reports. Now neither order is a
    conflict, and the manifest holds covid either way."""
    df = listed([row("a", "a.png", sha256="h1", pixel_sha256="p1", label=order[0]),
                 row("b", "b.png", sha256="h2", pixel_sha256="p1", label=order[1])])
    assert list(manifest.find_duplicates(df)["same_label"]) == [True]
    assert list(manifest.fill_from_copies(df)["label"])[0] == "covid"


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


def film(seed: int, size: int = 192) -> np.ndarray:
    """An 8-bit chest radiograph phantom: one film."""
    image, _ = phantoms.chest_phantom(np.random.default_rng(seed), size, projection="frontal", covid=False,
                                      site=phantoms.SiteStyle())
    return np.round(image * 255).astype(np.uint8)


def write_dicom_of(path, pixels: np.ndarray, photometric: str = "MONOCHROME2") -> str:
    """An 8-bit DICOM of ``pixels`` as displayed (air dark): MONOCHROME1 stores them inverted."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.5"
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = SecondaryCaptureImageStorage, "1.2.3.5", "CR"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *pixels.shape, 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = (255 - pixels if photometric == "MONOCHROME1" else pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def test_one_film_in_files_of_other_bytes_is_one_image_of_one_patient(tmp_path):
    """Cohen holds one radiograph as two JPEGs of different bytes under two patient ids: the byte hash saw two films,
    so the patients stayed two and the split could put one copy in train and the other in test. The decoded pixels'
    digest makes a PNG saved twice (other compression), and a DICOM of the same pixels, one image."""
    pixels = film(3)
    Image.fromarray(pixels).save(tmp_path / "a.png", compress_level=1)
    Image.fromarray(pixels).save(tmp_path / "b.png", compress_level=9)
    df = listed([row("a", str(tmp_path / "a.png"), patient_id="t:1"),
                 row("b", str(tmp_path / "b.png"), patient_id="t:2", label="covid"),
                 row("c", write_dicom_of(tmp_path / "c.dcm", pixels, "MONOCHROME1"), patient_id="t:3"),
                 row("d", write_png(tmp_path / "d.png", 9), patient_id="t:4"),
                 row("e", write_dicom_of(tmp_path / "e.dcm", pixels), patient_id="t:5")])
    described, rejects = manifest.describe_images(df)
    assert rejects.empty
    assert described["sha256"].is_unique  # five files, no two of the same bytes
    assert described["pixel_sha256"].str.fullmatch("[0-9a-f]{64}").all()
    assert described["pixel_sha256"].nunique() == 2  # a, b, c and e: one film, after MONOCHROME1's inversion

    merged, n = manifest.merge_patients(described)
    assert n == 3 and list(merged["patient_id"]) == ["t:1", "t:1", "t:1", "t:4", "t:1"]
    dup = manifest.find_duplicates(merged)
    assert list(dup.columns) == manifest.DUPLICATE_COLUMNS
    assert list(dup["image_id"]) == ["b", "c", "e"] and set(dup["kept_image_id"]) == {"a"}
    assert list(dup["match"]) == ["pixels"] * 3 and list(dup["same_label"]) == [False, True, True]


def test_byte_and_pixel_copies_are_linked_through_each_other():
    # a and b: one file; b and c: one film in two files; so a, b and c are one radiograph, kept as a
    df = listed([row(i, f"{i}.png", patient_id=f"t:{i}", sha256=sha, pixel_sha256=pix)
                 for i, sha, pix in [("a", "h1", "p1"), ("b", "h1", "p2"), ("c", "h3", "p2"), ("d", "h4", pd.NA),
                                     ("e", "h5", pd.NA)]])
    merged, n = manifest.merge_patients(df)
    assert n == 2 and list(merged["patient_id"]) == ["t:a"] * 3 + ["t:d", "t:e"]  # no digest links nothing
    dup = manifest.find_duplicates(df)
    assert list(zip(dup["image_id"], dup["kept_image_id"], dup["match"])) == [("b", "a", "bytes"),
                                                                              ("c", "a", "pixels")]


def test_a_dropped_copy_gives_the_kept_copy_what_it_lacks_and_never_replaces_a_value():
    """Ingest kept the first copy of a radiograph and dropped the others whole: a lung mask only a later copy held (a
    mask dataset's lossless re-save of a film another source lists first) was lost for the U-Net, and duplicates.csv
    said nothing of it. The earliest copy holding a field now fills it where the kept copy has none; a value the kept
    copy has stays, and a copy's other value is reported as conflicting."""
    df = listed([
        row("a", "a.png", sha256="h1", pixel_sha256="p1"),  # kept: no mask, view, sex or age
        row("b", "b.png", sha256="h2", pixel_sha256="p1", mask_path="m/b.png", age=40.0, sex="F",
            view_position="PA", projection="frontal"),
        row("c", "c.png", sha256="h3", pixel_sha256="p1", mask_path="m/c.png", age=41.0, sex="F"),  # after b's
        row("d", "d.png", sha256="h4", pixel_sha256="p4", mask_path="m/d.png", sex="M", projection="frontal"),
        row("e", "e.png", sha256="h4", pixel_sha256="p5", sex="F", view_position="LL", projection="lateral"),
        row("f", "f.png", sha256="h4", pixel_sha256="p6", view_position="AP", projection="frontal"),
        row("x", "x.png", sha256="h7", pixel_sha256="p7", view_position="LLD"),  # decubitus: the filter decides
        row("y", "y.png", sha256="h8", pixel_sha256="p7", projection="frontal"),  # frontal with LLD: not a view pair
        row("z", "z.png", sha256="h9", pixel_sha256="p9", mask_path="m/z.png"),
    ])
    filled = manifest.fill_from_copies(df)
    assert filled.dtypes.equals(df.dtypes)
    a = filled.set_index("image_id").loc["a"]
    assert (a["mask_path"], a["age"], a["sex"], a["view_position"], a["projection"]) == (
        "m/b.png", 40.0, "F", "PA", "frontal")
    d = filled.set_index("image_id").loc["d"]  # its mask, sex and projection stay; the view that fits them fills in
    assert (d["mask_path"], d["sex"], d["view_position"], d["projection"]) == ("m/d.png", "M", "AP", "frontal")
    others = ~filled["image_id"].isin(["a", "d"])
    assert filled[others].equals(df[others])

    dup = manifest.find_duplicates(df)
    assert list(dup.columns) == manifest.DUPLICATE_COLUMNS
    assert {i: (c, x) for i, c, x in zip(dup["image_id"], dup["carried"], dup["conflicting"], strict=True)} == {
        "b": ("mask_path;view;sex;age", ""), "c": ("", "mask_path;age"), "e": ("", "view;sex"), "f": ("view", ""),
        "y": ("", "view")}
    unique = df[df["image_id"].isin(["a", "z"])].reset_index(drop=True)
    assert manifest.fill_from_copies(unique).equals(unique)
    assert manifest.find_duplicates(unique).empty


def test_only_a_copy_of_the_kept_copys_source_and_site_carries_and_an_unknown_label_takes_its_label():
    """A mask carried from a copy of another source sat under the kept copy's source: with segmentation_external
    [jsrt], JSRT's masks of films another source listed first went to the U-Net's train/val split (and the split could
    find JSRT without masks). Only a copy of the kept copy's source and site carries now; another source's value the
    kept copy lacks is reported (other_source). A kept copy labelled unknown left the covid task although a copy of its
    source was labelled, reported as a label conflict: it now takes that copy's label with its finding."""
    df = listed([
        row("a", "a.png", source="cohen", site="Italy", sha256="h1", pixel_sha256="p1", label="unknown",
            finding="todo"),
        row("b", "b.png", source="jsrt", site="jsrt", sha256="h2", pixel_sha256="p1", mask_path="m/b.png", age=50.0,
            label="negative", finding="No Finding"),  # another source, listed before a's own other copy
        row("c", "c.png", source="cohen", site="Italy", sha256="h3", pixel_sha256="p1", mask_path="m/c.png",
            label="covid", finding="COVID-19"),
        row("d", "d.png", source="cohen", site="Spain", sha256="h4", pixel_sha256="p1", sex="F"),  # another site
        row("e", "e.png", source="cohen", site="Italy", sha256="h5", pixel_sha256="p5", label="negative",
            finding="No Finding"),  # labelled: never relabelled
        row("f", "f.png", source="cohen", site="Italy", sha256="h6", pixel_sha256="p5", label="covid",
            finding="COVID-19"),
    ])
    filled = manifest.fill_from_copies(df).set_index("image_id")
    assert tuple(filled.loc["a", ["mask_path", "label", "finding", "sex"]]) == ("m/c.png", "covid", "COVID-19",
                                                                               "unknown")
    assert pd.isna(filled.loc["a", "age"])  # jsrt's age stays with jsrt's copy
    assert tuple(filled.loc["e", ["label", "finding"]]) == ("negative", "No Finding")

    dup = manifest.find_duplicates(df).set_index("image_id")
    assert list(dup.columns) == manifest.DUPLICATE_COLUMNS[1:]
    assert dup[["carried", "conflicting", "other_source", "same_label"]].to_dict("index") == {
        "b": {"carried": "", "conflicting": "mask_path", "other_source": "age", "same_label": False},
        "c": {"carried": "mask_path;label", "conflicting": "", "other_source": "", "same_label": True},
        "d": {"carried": "", "conflicting": "", "other_source": "sex", "same_label": False},
        "f": {"carried": "", "conflicting": "", "other_source": "", "same_label": False}}  # a real label conflict

    alone = df[df["image_id"].isin(["a", "b"])].reset_index(drop=True)  # only another source's copy: nothing moves
    assert manifest.fill_from_copies(alone).equals(alone)
    dup = manifest.find_duplicates(alone)
    assert (list(dup["carried"]), list(dup["other_source"])) == ([""], ["mask_path;age;label"])


def test_a_lossy_or_rescaled_copy_under_another_patient_is_listed_not_merged(tmp_path):
    pixels, other = film(3), film(4)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "lossy.jpg", quality=40)
    Image.fromarray(pixels).resize((120, 120), Image.Resampling.BICUBIC).save(tmp_path / "small.jpg", quality=75)
    Image.fromarray(other).save(tmp_path / "other.png")
    df = listed([row("a", str(tmp_path / "a.png"), patient_id="t:1"),
                 row("lossy", str(tmp_path / "lossy.jpg"), patient_id="t:2", label="covid"),
                 row("small", str(tmp_path / "small.jpg"), patient_id="t:1"),  # the same patient: no leak
                 row("other", str(tmp_path / "other.png"), patient_id="t:3")])
    described, rejects, thumbnails = manifest.describe_images(df, thumbnails=True)
    assert rejects.empty and thumbnails.shape == (4, manifest.THUMBNAIL_SIZE, manifest.THUMBNAIL_SIZE)
    assert described["pixel_sha256"].is_unique  # not the same pixels: no merge
    assert manifest.merge_patients(described) == (described, 0)

    near = manifest.near_duplicates(described, thumbnails)
    assert list(near.columns) == manifest.NEAR_DUPLICATE_COLUMNS
    assert list(zip(near["image_id"], near["other_image_id"])) == [("a", "lossy"), ("lossy", "small")]
    assert (near["distance"] < manifest.NEAR_DUPLICATE_DISTANCE).all() and list(near["same_label"]) == [False, False]
    # two different films stay far apart: the other patient's is in no pair, even at twice the distance
    wide = manifest.near_duplicates(described, thumbnails, max_distance=2 * manifest.NEAR_DUPLICATE_DISTANCE)
    assert "other" not in set(wide["image_id"]) | set(wide["other_image_id"])


@pytest.mark.parametrize(("side", "old_threshold_missed_it"), [(192, False), (48, True)],
                         ids=["quality-20", "quarter-size-quality-20"])
def test_a_heavy_lossy_re_encode_under_another_patient_is_listed(tmp_path, side, old_threshold_missed_it):
    """Near duplicates were listed up to 0.025, just above the heaviest re-encode measured on the real corpus (JPEG
    quality 30: 0.022): a heavier one, such as a quarter-size copy at quality 20, went unlisted. 0.04 lists it (the
    closest films of two patients on the real corpus are 0.059 apart)."""
    pixels = film(3)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).resize((side, side), Image.Resampling.BICUBIC).save(tmp_path / "copy.jpg", quality=20)
    df = listed([row("a", str(tmp_path / "a.png"), patient_id="t:1"),
                 row("copy", str(tmp_path / "copy.jpg"), patient_id="t:2")])
    described, _, thumbnails = manifest.describe_images(df, thumbnails=True)
    near = manifest.near_duplicates(described, thumbnails)
    assert list(zip(near["image_id"], near["other_image_id"])) == [("a", "copy")]
    assert (near["distance"].iloc[0] > 0.025) == old_threshold_missed_it


def test_near_duplicates_sweep_finds_what_comparing_every_pair_finds():
    rng = np.random.default_rng(0)
    n = 700  # several blocks of the sweep
    thumbs = rng.random((n, 8, 8), dtype=np.float32)
    for i in range(0, 200, 2):  # planted pairs at distances around the threshold
        thumbs[i + 1] = np.clip(thumbs[i] + rng.normal(0, 0.02 + i / 200 * 0.02, (8, 8)), 0, 1)
    patients = [f"t:{i}" for i in range(n)]
    patients[1] = patients[0]  # one planted pair of one patient: not listed
    df = listed([row(f"i{i:03d}", f"{i}.png", patient_id=patients[i]) for i in range(n)])
    flat = thumbs.reshape(n, -1).astype(np.float64)
    every = np.sqrt(((flat[:, None] - flat[None]) ** 2).mean(axis=2))
    expected = {(f"i{i:03d}", f"i{j:03d}") for i in range(n) for j in range(i + 1, n)
                if every[i, j] <= 0.03 and patients[i] != patients[j]}
    assert every[0, 1] <= 0.03 and 0 < len(expected) < 99  # some planted pairs are closer, some farther
    found = manifest.near_duplicates(df, thumbs, max_distance=0.03)
    assert expected and set(zip(found["image_id"], found["other_image_id"])) == expected
    assert found["distance"].is_monotonic_increasing
    assert manifest.near_duplicates(df.head(0), thumbs[:0]).empty


def test_real_cohen_film_under_two_patient_ids_is_merged(real_data):
    """Two Cohen patient ids (one copy listed PA, the other AP Supine) hold one film as two JPEGs of other bytes."""
    cohen = datasets.load("cohen", real_data / "cohen")
    names = ["353889E0-A1E8-4F9E-A0B8-F24F36BCFBFB.jpeg", "case_72_RX-TORACE1.jpg"]
    both = cohen[cohen["path"].map(lambda p: p.rsplit("/", 1)[-1]).isin(names)].reset_index(drop=True)
    assert both["patient_id"].nunique() == 2
    described, _ = manifest.describe_images(both)
    assert described["sha256"].nunique() == 2 and described["pixel_sha256"].nunique() == 1
    merged, n = manifest.merge_patients(described)
    assert n == 1 and merged["patient_id"].nunique() == 1
    dup = manifest.find_duplicates(merged)
    assert list(dup["match"]) == ["pixels"]
    # the copy kept (listed PA, no age) takes the other's age; the other's own mask and AP Supine view are reported
    assert (list(dup["carried"]), list(dup["conflicting"])) == (["age"], ["mask_path;view"])
