"""covidcxr.io: every supported format decoded faithfully, every bad input refused with a typed error, no PHI out."""

from __future__ import annotations

import contextlib
import hashlib
import io as stdio
import logging
import pickle
import struct
import tracemalloc
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)

from covidcxr import io

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


# --- fixture builders -----------------------------------------------------------------------------------------------


def phantom(h: int = 48, w: int = 64, lo: int = 400, hi: int = 3000) -> np.ndarray:
    """A chest-like phantom: bright central vertical band (mediastinum), darker lung fields, a vertical ramp."""
    img = np.full((h, w), lo, dtype=np.int64) + np.arange(h)[:, None] * 7
    img[:, 2 * w // 5 : 3 * w // 5] = hi
    return img


def center_minus_sides(arr: np.ndarray) -> float:
    """Mean of the central strip minus the mean of the strips at 25% and 75% of the width (middle rows)."""
    h, w = arr.shape
    rows = slice(h // 3, 2 * h // 3)
    strip = max(1, w // 20)

    def at(frac: float) -> float:
        c = int(frac * w)
        return float(arr[rows, c - strip : c + strip].mean())

    return at(0.5) - (at(0.25) + at(0.75)) / 2


def make_dicom(
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_allocated: int = 16,
    bits_stored: int = 12,
    signed: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    modality: str = "CR",
    frames: list[bytes] | None = None,
    shape: tuple[int, int] | None = None,
    n_frames: int | None = None,
    samples: int | None = None,
    **elements: object,
) -> bytes:
    """DICOM file bytes: native ``pixels`` (stored values) or encapsulated ``frames``; extra elements by keyword."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = transfer_syntax
    meta.MediaStorageSOPClassUID = DX_STORAGE if modality == "DX" else CR_STORAGE
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    rows, cols = shape if shape is not None else pixels.shape[-2:]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = samples or (3 if photometric in ("RGB", "YBR_FULL") else 1)
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    if n_frames is not None:
        ds.NumberOfFrames = n_frames
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if frames is not None:
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    elif pixels is not None:
        dtype = {8: np.uint8, 16: np.uint16}[bits_allocated]
        if signed:
            dtype = {8: np.int8, 16: np.int16}[bits_allocated]
        ds.PixelData = np.ascontiguousarray(pixels).astype(dtype).tobytes()
    buf = stdio.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def png_bytes(img: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buf = stdio.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def tiff_bytes(stored: np.ndarray, photometric: int | None) -> bytes:
    """An uncompressed little-endian one-strip gray TIFF of ``stored`` (uint8 or uint16) exactly as given, with that
    PhotometricInterpretation (None: no tag 262), so that the test knows the bytes a reader is given."""
    height, width = stored.shape
    pixels = np.ascontiguousarray(stored).astype(stored.dtype.newbyteorder("<")).tobytes()
    entries = [(256, 3, width), (257, 3, height), (258, 3, stored.dtype.itemsize * 8), (259, 3, 1)]
    entries += [] if photometric is None else [(262, 3, photometric)]
    entries += [(273, 4, 0), (277, 3, 1), (278, 3, height), (279, 4, len(pixels))]
    offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = offset if tag == 273 else value
        packed = struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, 0)  # LONG, or SHORT left-aligned
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + pixels


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def gray8(h: int = 48, w: int = 64) -> np.ndarray:
    return (phantom(h, w) * 255 // 3400).astype(np.uint8)


# --- DICOM ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_monochrome1_and_2_give_the_same_orientation(tmp_path, transfer_syntax, modality):
    anatomy = phantom()
    mono2 = make_dicom(anatomy, transfer_syntax=transfer_syntax, modality=modality)
    extra = {"PresentationLUTShape": "INVERSE"} if modality == "DX" else {}
    mono1 = make_dicom(
        4095 - anatomy, photometric="MONOCHROME1", transfer_syntax=transfer_syntax, modality=modality, **extra
    )
    out2, h2 = io.read_image(write(tmp_path, "m2.dcm", mono2))
    out1, h1 = io.read_image(write(tmp_path, "m1.dcm", mono1))
    assert out1.dtype == np.float32 and out1.shape == anatomy.shape
    assert center_minus_sides(out2) > 1000 and center_minus_sides(out1) > 1000
    # No VOI: MONOCHROME1 is inverted over the 12-bit stored range, so both give back the anatomy exactly.
    np.testing.assert_array_equal(out2, anatomy)
    np.testing.assert_array_equal(out1, anatomy)
    assert (h1["photometric"], h2["photometric"]) == ("MONOCHROME1", "MONOCHROME2")
    assert h1["modality"] == modality and h1["transfer_syntax"] == transfer_syntax


@pytest.mark.parametrize(
    ("bits_allocated", "bits_stored", "signed", "slope", "intercept"),
    [
        (8, 8, False, None, None),
        (16, 12, False, None, None),
        (16, 15, False, None, None),
        (16, 16, False, None, None),
        (16, 12, True, 1, -1024),
        (16, 16, True, 2, 100),
    ],
)
def test_bit_depths_signed_and_rescale(tmp_path, bits_allocated, bits_stored, signed, slope, intercept):
    lo, hi = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    stored = np.linspace(lo, hi, 48 * 64).round().astype(np.int64).reshape(48, 64)
    extra = {"RescaleSlope": slope, "RescaleIntercept": intercept} if slope is not None else {}
    data = make_dicom(stored, bits_allocated=bits_allocated, bits_stored=bits_stored, signed=signed, **extra)
    out, header = io.read_image(write(tmp_path, "x.dcm", data))
    expected = stored * (slope or 1) + (intercept or 0)
    np.testing.assert_array_equal(out, expected.astype(np.float32))
    assert header["bits_allocated"] == bits_allocated and header["bits_stored"] == bits_stored
    assert header["pixel_representation"] == int(signed)


def _linear_window(x: np.ndarray, center: float, width: float, y_max: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window onto [0, y_max], written out independently of pydicom."""
    c, w = center - 0.5, width - 1
    y = ((x - c) / w + 0.5) * y_max
    return np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, y_max, y))


def test_window_center_width_is_applied(tmp_path):
    anatomy = phantom()
    data = make_dicom(anatomy, WindowCenter=1500, WindowWidth=2000)
    out, _ = io.read_image(write(tmp_path, "w.dcm", data))
    np.testing.assert_allclose(out, _linear_window(anatomy, 1500, 2000, 4095), rtol=1e-5, atol=1e-3)
    assert out.max() == 4095 and out.min() < 4095  # the 3000 band is above the window


def test_window_with_monochrome1_keeps_air_dark(tmp_path):
    anatomy = phantom()
    data = make_dicom(4095 - anatomy, photometric="MONOCHROME1", WindowCenter=4095 - 1500, WindowWidth=2000)
    out, _ = io.read_image(write(tmp_path, "w1.dcm", data))
    assert center_minus_sides(out) > 1000
    np.testing.assert_allclose(out, 4095 - _linear_window(4095 - anatomy, 4095 - 1500, 2000, 4095), atol=1e-2)


def _voi_lut_item(lut: np.ndarray) -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", [len(lut), 0, 16])  # LUT Descriptor: entries, first mapped value, bits
    item.add_new(0x00283006, "US", lut.astype(int).tolist())  # LUT Data
    return item


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_voi_lut_sequence_is_applied(tmp_path, photometric):
    anatomy = phantom()
    lut = np.round(np.sqrt(np.arange(4096)) * 1000).astype(np.int64)  # monotone, non-linear
    stored = anatomy if photometric == "MONOCHROME2" else 4095 - anatomy
    voi = DicomSequence([_voi_lut_item(lut)])
    data = make_dicom(stored, photometric=photometric, VOILUTSequence=voi, WindowCenter=5, WindowWidth=3)
    out, _ = io.read_image(write(tmp_path, "lut.dcm", data))
    expected = lut[stored] if photometric == "MONOCHROME2" else lut.min() + lut.max() - lut[stored]
    np.testing.assert_array_equal(out, expected.astype(np.float32))  # the LUT wins over the window
    assert center_minus_sides(out) > 0


def test_invalid_window_falls_back_to_modality_values_with_a_warning(tmp_path, caplog):
    anatomy = phantom()
    data = make_dicom(anatomy, WindowCenter=100, WindowWidth=0)
    with caplog.at_level(logging.WARNING, logger="covidcxr.io"):
        out, _ = io.read_image(write(tmp_path, "badwin.dcm", data))
    np.testing.assert_array_equal(out, anatomy)
    assert any("badwin.dcm" in r.getMessage() and "VOI" in r.getMessage() for r in caplog.records)


def test_jpeg_baseline_dicom(tmp_path):
    img = gray8(64, 64)
    jpeg = png_bytes(Image.fromarray(img), "JPEG", quality=95)
    data = make_dicom(
        None, shape=img.shape, bits_allocated=8, bits_stored=8, transfer_syntax=JPEGBaseline8Bit, frames=[jpeg]
    )
    out, header = io.read_image(write(tmp_path, "jpeg.dcm", data))
    reference = np.asarray(Image.open(stdio.BytesIO(jpeg)), dtype=np.float32)
    assert np.abs(out - reference).max() <= 2  # decoders may round differently
    assert center_minus_sides(out) > 100
    assert header["transfer_syntax"] == JPEGBaseline8Bit


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_jpeg2000_lossless_dicom(tmp_path, photometric):
    anatomy = phantom()
    stored = anatomy if photometric == "MONOCHROME2" else 4095 - anatomy
    ds = pydicom.dcmread(stdio.BytesIO(make_dicom(stored, photometric=photometric)))
    ds.compress(JPEG2000Lossless)
    path = tmp_path / "j2k.dcm"
    ds.save_as(path)
    out, header = io.read_image(path)
    np.testing.assert_array_equal(out, anatomy)
    assert header["transfer_syntax"] == JPEG2000Lossless


def test_jpeg2000_lossy_from_pillow_codestream(tmp_path):
    img = gray8(64, 64)
    codestream = png_bytes(Image.fromarray(img), "JPEG2000", no_jp2=True, irreversible=True, quality_layers=[20])
    data = make_dicom(
        None, shape=img.shape, bits_allocated=8, bits_stored=8, transfer_syntax=JPEG2000, frames=[codestream]
    )
    out, _ = io.read_image(data, name="j2k-bytes")
    assert np.abs(out - img).mean() < 8
    assert center_minus_sides(out) > 100


def test_multiframe_returns_frame_zero_and_counts_frames(tmp_path):
    anatomy = phantom()
    stack = np.stack([anatomy + 100 * k for k in range(3)])
    path = write(tmp_path, "mf.dcm", make_dicom(stack, n_frames=3))
    out, header = io.read_image(path)
    np.testing.assert_array_equal(out, anatomy)
    assert header["n_frames"] == 3
    with pytest.raises(io.ImageTooLargeError) as err:  # frames count toward the limit
        io.read_image(path, max_pixels=anatomy.size * 2)
    assert "3 frame" in err.value.problem


def test_bytes_and_path_inputs_agree(tmp_path):
    data = make_dicom(phantom(), photometric="MONOCHROME1")
    path = write(tmp_path, "same.dcm", data)
    from_path, h_path = io.read_image(path)
    from_bytes, h_bytes = io.read_image(data)
    np.testing.assert_array_equal(from_path, from_bytes)
    assert h_path == h_bytes
    png = png_bytes(Image.fromarray(gray8()))
    np.testing.assert_array_equal(io.read_image(png)[0], io.read_image(write(tmp_path, "same.png", png))[0])


def test_dicom_without_preamble_is_read(tmp_path):
    full = pydicom.dcmread(stdio.BytesIO(make_dicom(phantom())))
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    pydicom.filewriter.write_dataset(buf, full)
    data = buf.getvalue()
    assert data[128:132] != b"DICM"
    out, header = io.read_image(write(tmp_path, "nopreamble", data))
    np.testing.assert_array_equal(out, phantom())
    assert header["format"] == "dicom"


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # " pa ", "62" and "abc" are deliberately off-standard
@pytest.mark.parametrize(
    ("age", "years"), [("065Y", 65.0), ("018M", 1.5), ("030D", round(30 / 365.25, 4)), ("004W", round(28 / 365.25, 4)),
                       ("62", 62.0), ("abc", None), ("120Y", 120.0),
                       ("999Y", None), ("121", None)],  # absurd ages are unknown, as in the datasets' metadata
)  # fmt: skip
def test_header_fields(tmp_path, age, years):
    data = make_dicom(
        phantom(), PatientAge=age, PatientSex="F", ViewPosition=" pa ", BodyPartExamined="CHEST",
        PixelSpacing=[0.14, 0.15], BurnedInAnnotation="NO", PresentationIntentType="FOR PROCESSING",
    )  # fmt: skip
    _, header = io.read_image(write(tmp_path, "h.dcm", data))
    assert tuple(header) == io.HEADER_FIELDS
    assert header["presentation_intent"] == "FOR PROCESSING"
    assert header["age"] == years
    assert (header["sex"], header["view_position"], header["body_part"]) == ("F", "PA", "CHEST")
    assert header["pixel_spacing"] == (0.14, 0.15)
    assert header["burned_in_annotation"] is False
    assert (header["width"], header["height"], header["n_frames"]) == (64, 48, 1)


PHI = {
    "PatientName": "Zyxwvut^Qponmlk",
    "PatientID": "PID-8675309",
    "PatientBirthDate": "19310417",
    "InstitutionName": "Saint Phantasma Hospital",
    "AccessionNumber": "ACC77441122",
    "StudyDate": "20200314",
    "StudyTime": "101112",
    "OtherPatientIDs": "OTHER-5551234",
    "ReferringPhysicianName": "Quackenbush^Hieronymus",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.999111",
    "PatientAddress": "42 Wallaby Way",
    "StudyDescription": "private clinical note xqzzy",
    "AdmittingDate": "2020-03-15",  # not a valid DA: pydicom would warn with the value if anything converted it
}


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # raised by the fixture's own writing
@pytest.mark.parametrize("variant", ["ok", "ybr", "truncated", "no_pixels", "too_large"])
def test_no_phi_in_header_logs_warnings_or_errors(tmp_path, caplog, variant):
    anatomy = phantom()
    kwargs: dict = dict(PHI, PatientSex="M", PatientAge="071Y")
    if variant == "ybr":
        kwargs.update(photometric="YBR_FULL", bits_allocated=8, bits_stored=8)
        data = make_dicom(np.zeros((3, 48, 64), np.uint8).transpose(1, 2, 0).copy(), **kwargs)
    else:
        data = make_dicom(anatomy, **kwargs)
    if variant == "truncated":
        data = data[: len(data) - 1000]
    if variant == "no_pixels":
        ds = pydicom.dcmread(stdio.BytesIO(data))
        del ds.PixelData
        buf = stdio.BytesIO()
        ds.save_as(buf)
        data = buf.getvalue()
    path = write(tmp_path, f"phi_{variant}.dcm", data)
    caplog.clear()  # pydicom logged the off-standard date while the fixture was written; only reading counts
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _, header = io.read_image(path, max_pixels=100 if variant == "too_large" else io.DEFAULT_MAX_PIXELS)
            seen.append(repr(header))
            assert set(header) == set(io.HEADER_FIELDS)
            assert header["sex"] == "M" and header["age"] == 71.0
        except io.ImageReadError as err:
            assert variant != "ok"
            seen += [str(err), repr(err), err.problem]
    seen += [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    text = "\n".join(seen).lower()
    assert seen
    for value in PHI.values():
        assert value.lower() not in text
    assert "zyxwvut" not in text and "19310417" not in text


def _cut_j2k_dicom() -> bytes:
    rng = np.random.default_rng(0)
    noisy = (phantom() + rng.integers(0, 400, (48, 64))).astype(np.int64)  # noise so the codestream is long
    ds = pydicom.dcmread(stdio.BytesIO(make_dicom(noisy)))
    ds.compress(JPEG2000Lossless)
    buf = stdio.BytesIO()
    ds.save_as(buf)
    data = buf.getvalue()
    return data[: len(data) - 600]


def _fragment_overrun_dicom() -> bytes:
    """A JPEG DICOM whose frame item declares 10 bytes more than it holds before the sequence delimiter."""
    jpeg = png_bytes(Image.fromarray(gray8()), "JPEG")
    data = bytearray(make_dicom(None, shape=(48, 64), bits_allocated=8, bits_stored=8,
                                transfer_syntax=JPEGBaseline8Bit, frames=[jpeg]))  # fmt: skip
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(jpeg) + len(jpeg) % 2)
    at = bytes(data).rindex(item)
    data[at + 4 : at + 8] = struct.pack("<I", len(jpeg) + len(jpeg) % 2 + 10)
    return bytes(data)


def _huge_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@contextlib.contextmanager
def decoders_stopped() -> Iterator[list[str]]:
    """The pixel decoders read_image reaches (Pillow's ``load`` for PNG and JPEG files and baseline-JPEG DICOM frames,
    pydicom's ``pixel_array`` for the rest), each recorded and stopped there: a refusal "before decoding" leaves the
    list empty on any machine, where a time bound said so only on a fast, idle one."""
    called: list[str] = []

    def stop(name: str):
        def decoder(*args, **kwargs):
            called.append(name)
            raise RuntimeError(f"{name} reached")

        return decoder

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", stop("PIL load"))
        patch.setattr(io, "pixel_array", stop("pydicom pixel_array"))
        yield called


def _no_pixel_dicom() -> bytes:
    ds = pydicom.dcmread(stdio.BytesIO(make_dicom(phantom())))
    del ds.PixelData
    buf = stdio.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


REFUSALS = {
    "truncated_dicom": (lambda: make_dicom(phantom())[:-2000], io.TruncatedImageError, "truncated", {}),
    "truncated_dicom_header": (lambda: make_dicom(phantom())[:300], io.TruncatedImageError, "truncated", {}),
    "truncated_j2k_dicom": (_cut_j2k_dicom, io.TruncatedImageError, "truncated", {}),
    "truncated_png": (lambda: (lambda d: d[: len(d) // 2])(png_bytes(Image.fromarray(gray8()))), io.TruncatedImageError,
                      "truncated", {}),
    "truncated_jpeg": (lambda: (lambda d: d[: len(d) // 2])(png_bytes(Image.fromarray(gray8()), "JPEG")),
                       io.TruncatedImageError, "truncated", {}),
    "rows_exceed_pixel_data": (lambda: make_dicom(phantom(), shape=(96, 64)), io.TruncatedImageError, "expected", {}),
    "fragment_overrun": (_fragment_overrun_dicom, io.TruncatedImageError, "fragment", {}),
    "zero_bytes": (lambda: b"", io.NotAnImageError, "empty", {}),
    "text": (lambda: b"patient list\nnot an image at all\n" * 20, io.NotAnImageError, "not an image", {}),
    "random": (lambda: np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()[3:],
               io.NotAnImageError, "not an image", {}),
    "zip": (lambda: b"PK\x03\x04" + b"\0" * 100, io.NotAnImageError, "zip", {}),
    "git_lfs_pointer": (lambda: b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize 4096\n" % (b"0" * 64),
                        io.NotAnImageError, "git lfs pointer", {}),
    "zero_variance_png": (lambda: png_bytes(Image.new("L", (32, 32), 77)), io.ZeroVarianceImageError, "same value", {}),
    "zero_variance_dicom": (lambda: make_dicom(np.full((32, 32), 900)), io.ZeroVarianceImageError, "same value", {}),
    "too_large_png": (lambda: png_bytes(Image.fromarray(gray8())), io.ImageTooLargeError, "exceeds",
                      {"max_pixels": 1000}),
    "too_large_dicom": (lambda: make_dicom(phantom()), io.ImageTooLargeError, "exceeds", {"max_pixels": 1000}),
    "huge_dicom_declared": (lambda: make_dicom(phantom(), shape=(60000, 60000)), io.ImageTooLargeError, "60000", {}),
    "no_pixel_data": (_no_pixel_dicom, io.NoPixelDataError, "pixel data", {}),
    "ybr_full": (lambda: make_dicom(np.zeros((48, 64, 3), np.uint8), photometric="YBR_FULL", bits_allocated=8,
                                    bits_stored=8), io.UnsupportedPhotometricError, "YBR_FULL", {}),
    "palette_color": (lambda: make_dicom(gray8(), photometric="PALETTE COLOR", bits_allocated=8, bits_stored=8),
                      io.UnsupportedPhotometricError, "PALETTE COLOR", {}),
    "cmyk_jpeg": (lambda: png_bytes(Image.new("CMYK", (32, 32), (10, 20, 30, 40)), "JPEG"),
                  io.UnsupportedPhotometricError, "CMYK", {}),
    "frames_beyond_data": (lambda: make_dicom(phantom(), n_frames=40), io.TruncatedImageError, "40 frame", {}),
    "frames_huge": (lambda: make_dicom(phantom(), n_frames=2_000_000_000), io.ImageTooLargeError, "2000000000 frame",
                    {}),
    "frames_zero": (lambda: make_dicom(phantom(), n_frames=0), io.UnreadableImageError, "invalid size", {}),
    "rows_zero": (lambda: make_dicom(phantom(), shape=(0, 64)), io.UnreadableImageError, "invalid size", {}),
    "bits_allocated_12": (lambda: make_dicom(phantom(), BitsAllocated=12), io.UnreadableImageError, "BitsAllocated",
                          {}),
    "non_finite_rescale": (lambda: make_dicom(phantom(), RescaleSlope="1e308", RescaleIntercept="1e308"),
                           io.UnreadableImageError, "finite", {}),
    "corrupt_png_body": (lambda: (lambda d: d[:60] + bytes(len(d) - 60))(png_bytes(Image.fromarray(gray8()))),
                         io.UnreadableImageError, "PNG", {}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_typed_and_name_the_file(tmp_path, case):
    build, error, words, kwargs = REFUSALS[case]
    path = write(tmp_path, f"{case}.bin", build())
    with pytest.raises(io.ImageReadError) as info:
        io.read_image(path, **kwargs)
    err = info.value
    assert type(err) is error
    assert err.source == str(path)
    assert str(err) == f"{path}: {err.problem}"
    assert words.lower() in err.problem.lower()
    assert err.reason == error.reason


@pytest.mark.parametrize("size", [(100_000, 100_000), (10_000, 9_000), (9_000, 8_000)])
def test_huge_png_header_is_refused_without_decoding(tmp_path, size):
    path = write(tmp_path, "bomb.png", _huge_png(*size))
    with decoders_stopped() as decoded, pytest.raises(io.ImageTooLargeError) as info:
        io.read_image(path)
    assert decoded == []
    assert info.value.source == str(path) and info.value.reason == "too_large"


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(io.UnreadableImageError) as info:
        io.read_image(missing)
    assert type(info.value) is io.UnreadableImageError and "not found" in str(info.value)
    assert str(info.value).startswith(str(missing))
    with pytest.raises(io.UnreadableImageError, match="directory"):
        io.read_image(tmp_path)


def test_file_far_larger_than_the_pixel_limit_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.dcm"
    with open(path, "wb") as fh:
        fh.truncate(70 << 20)  # sparse: nothing is written, nothing should be read
    with pytest.raises(io.ImageTooLargeError, match="bytes"):
        io.read_image(path, max_pixels=1)


def test_bytes_errors_use_the_given_name():
    with pytest.raises(io.NotAnImageError) as info:
        io.read_image(b"hello", name="upload.png")
    assert info.value.source == "upload.png"
    with pytest.raises(io.NotAnImageError, match=r"^<bytes>: "):
        io.read_image(b"hello")


def test_load_truncated_images_is_never_left_true(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = png_bytes(Image.fromarray(gray8()))
    with pytest.raises(io.TruncatedImageError):
        io.read_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_errors_pickle_and_accept_a_custom_reason():
    err = io.ImageReadError("a.png", "mask is empty", reason="empty_mask")
    again = pickle.loads(pickle.dumps(err))
    assert (again.source, again.problem, again.reason, str(again)) == ("a.png", "mask is empty", "empty_mask", str(err))
    trunc = pickle.loads(pickle.dumps(io.TruncatedImageError("b.dcm", "cut")))
    assert type(trunc) is io.TruncatedImageError and trunc.reason == "truncated"
    assert isinstance(trunc, io.UnreadableImageError) and isinstance(trunc, ValueError)


def test_non_finite_values_are_refused(tmp_path):
    arr = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    arr[3, 4] = np.nan
    path = write(tmp_path, "nan.tif", png_bytes(Image.fromarray(arr, mode="F"), "TIFF"))
    with pytest.raises(io.UnreadableImageError, match="finite"):
        io.read_image(path)


# --- raster modes ---------------------------------------------------------------------------------------------------

RGB_PIXELS = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 200, 40]]], dtype=np.uint8)
LUMA = 0.2989 * RGB_PIXELS[..., 0] + 0.5870 * RGB_PIXELS[..., 1] + 0.1140 * RGB_PIXELS[..., 2]


def test_png_gray_8_bit(tmp_path):
    out, header = io.read_image(write(tmp_path, "l.png", png_bytes(Image.fromarray(gray8()))))
    np.testing.assert_array_equal(out, gray8())
    assert (header["format"], header["photometric"], header["bits_stored"]) == ("png", "L", 8)


def test_png_16_bit_keeps_values_above_255(tmp_path):
    img = (phantom() * 20).astype(np.uint16)  # up to 60000
    out, header = io.read_image(write(tmp_path, "i16.png", png_bytes(Image.fromarray(img))))
    np.testing.assert_array_equal(out, img)
    assert out.max() > 255 and header["photometric"].startswith("I") and header["bits_stored"] in (16, 32)


def png16_bytes(samples: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG of ``samples`` (height, width, channels), written by hand: Pillow cannot save 16-bit colour."""
    height, width = samples.shape[:2]
    rows = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("colour_type", "channels", "what"), [(2, 3, "RGB"), (6, 4, "RGBA"), (4, 2, "gray with alpha")]
)
def test_a_16_bit_colour_png_is_refused_not_cut_to_8_bits(tmp_path, colour_type, channels, what):
    """Pillow decodes a 16-bit RGB(A) or gray-with-alpha PNG to 8 bits a sample (the high byte): it was read with
    every value's low byte lost, where the README promises PNG's native 16-bit intensities."""
    gray = (phantom() * 20).astype(np.uint16)  # up to 60000, low bytes set
    path = write(tmp_path, "rgb48.png", png16_bytes(np.stack([gray] * channels, axis=-1), colour_type))
    with pytest.raises(io.UnsupportedPhotometricError, match=rf"rgb48.png: 16-bit {what} PNG is not supported"):
        io.read_image(path)
    out, header = io.read_image(png16_bytes(gray[..., None], 0))  # 16-bit gray is read whole
    np.testing.assert_array_equal(out, gray)
    assert header["photometric"].startswith("I")


def test_32_bit_integer_tiff(tmp_path):
    img = phantom().astype(np.int32) * 100
    out, header = io.read_image(write(tmp_path, "i.tif", png_bytes(Image.fromarray(img, mode="I"), "TIFF")))
    np.testing.assert_array_equal(out, img)
    assert header["format"] == "tiff"


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_rgb_uses_luminance_weights_and_ignores_alpha(tmp_path, mode):
    pixels = RGB_PIXELS
    if mode == "RGBA":
        pixels = np.concatenate([RGB_PIXELS, np.array([[[0], [255]], [[128], [7]]], np.uint8)], axis=-1)
    out, header = io.read_image(write(tmp_path, "c.png", png_bytes(Image.fromarray(pixels, mode=mode))))
    np.testing.assert_allclose(out, LUMA, rtol=1e-6)
    assert out[0, 0] == pytest.approx(0.2989 * 255) and out[0, 1] == pytest.approx(0.5870 * 255)
    assert header["photometric"] == mode


def test_palette_goes_through_rgb(tmp_path):
    img = Image.fromarray(RGB_PIXELS, mode="RGB").quantize(colors=4, method=Image.Quantize.MEDIANCUT)
    assert img.mode == "P"
    palette_rgb = np.asarray(img.convert("RGB"))
    out, header = io.read_image(write(tmp_path, "p.png", png_bytes(img)))
    expected = 0.2989 * palette_rgb[..., 0] + 0.5870 * palette_rgb[..., 1] + 0.1140 * palette_rgb[..., 2]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert header["photometric"] == "P"


def test_la_keeps_the_luminance_band(tmp_path):
    gray = gray8()
    la = Image.merge("LA", [Image.fromarray(gray), Image.new("L", gray.shape[::-1], 9)])
    out, _ = io.read_image(write(tmp_path, "la.png", png_bytes(la)))
    np.testing.assert_array_equal(out, gray)


def test_one_bit(tmp_path):
    bits = phantom() > 1000
    out, header = io.read_image(write(tmp_path, "b.png", png_bytes(Image.fromarray(bits))))
    np.testing.assert_array_equal(out, bits.astype(np.float32))
    assert header["photometric"] == "1" and header["bits_stored"] == 1


@pytest.mark.parametrize(
    ("bits_stored", "top"), [(12, 4095), (None, 65535), (8, 65535), (0, 65535)],
)  # stated and fitting; unknown, not fitting the pixels, or unusable: the 16-bit file's own range
def test_a_monochrome1_raster_is_inverted_over_its_stored_range(tmp_path, bits_stored, top):
    """A DICOM exported as PNG with its stored values (BIMCV, PadChest) keeps MONOCHROME1's air bright; what its source
    states of it inverts it as the DICOM is (over the stored range, not the image's own min/max). It was read as
    stored, air bright, whatever the source said."""
    stored = phantom().astype(np.uint16)  # up to 3000 (12 bits)
    path = write(tmp_path, "m1.png", png_bytes(Image.fromarray(stored)))
    out, header = io.read_image(path, photometric="MONOCHROME1", bits_stored=bits_stored)
    np.testing.assert_array_equal(out, top - stored.astype(np.float32))
    assert (header["photometric"], header["bits_stored"]) == ("I;16", 16)  # the file as stored
    for other in (None, "MONOCHROME2", "L", "RGB"):
        np.testing.assert_array_equal(io.read_image(path, photometric=other, bits_stored=12)[0], stored)


def test_the_monochrome1_hint_of_an_8_bit_jpeg_and_of_a_float_tiff(tmp_path):
    jpeg = write(tmp_path, "m1.jpg", png_bytes(Image.fromarray(gray8()), "JPEG"))
    np.testing.assert_array_equal(io.read_image(jpeg, photometric=" monochrome1 ")[0], 255 - io.read_image(jpeg)[0])
    floats = write(tmp_path, "m1.tif", png_bytes(Image.fromarray(phantom().astype(np.float32)), "TIFF"))
    with pytest.raises(io.UnsupportedPhotometricError, match=r"m1.tif: a floating-point image has no stored range"):
        io.read_image(floats, photometric="MONOCHROME1")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_a_white_is_zero_tiff_is_read_air_dark_at_8_and_16_bits(tmp_path, dtype):
    """TIFF PhotometricInterpretation 0 (WhiteIsZero, or no tag: Pillow's reading) stores air, black on film, as the
    highest value. Pillow inverts it only at 1 to 8 bits: the 16-bit file came out air bright while the 8-bit one came
    out air dark, and an 8-bit one with a MONOCHROME1 hint was inverted twice (air bright)."""
    top = np.iinfo(dtype).max
    stored = (gray8().astype(np.int64) * top // 255).astype(dtype)  # body bright: the band holds low stored values
    stored = (top - stored).astype(dtype)
    expected = top - stored.astype(np.float32)
    for photometric in (0, None):
        path = write(tmp_path, f"wiz_{photometric}.tif", tiff_bytes(stored, photometric))
        for hint in (None, "MONOCHROME1", "MONOCHROME2"):
            out, header = io.read_image(path, photometric=hint, bits_stored=12)
            np.testing.assert_array_equal(out, expected)
            assert center_minus_sides(out) > 0  # mediastinum brighter than the lungs: air dark
    black_is_zero = write(tmp_path, "biz.tif", tiff_bytes(stored, 1))
    np.testing.assert_array_equal(io.read_image(black_is_zero)[0], stored)  # stored as is: the hint decides
    np.testing.assert_array_equal(io.read_image(black_is_zero, photometric="MONOCHROME1")[0], expected)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_a_dicom_or_jsrt_file_ignores_the_photometric_hint(tmp_path, photometric):
    dicom = write(tmp_path, "a.dcm", make_dicom(phantom(), photometric=photometric))
    jsrt = write(tmp_path, "a.img", np.resize(phantom(), io.JSRT_SHAPE).astype(">u2").tobytes())
    for path in (dicom, jsrt):
        plain = io.read_image(path, max_pixels=io.JSRT_BYTES)[0]
        hinted = io.read_image(path, max_pixels=io.JSRT_BYTES, photometric="MONOCHROME1", bits_stored=8)[0]
        np.testing.assert_array_equal(hinted, plain)


@pytest.mark.parametrize("fmt", ["JPEG", "GIF", "BMP", "TIFF"])
def test_other_raster_formats(tmp_path, fmt):
    gray = gray8()
    out, header = io.read_image(write(tmp_path, "img.bin", png_bytes(Image.fromarray(gray), fmt)))
    tolerance = {"JPEG": 8, "GIF": 0.05}.get(fmt, 0)  # GIF reads back as a gray palette: 0.9999 * value via RGB
    assert np.abs(out - gray).max() <= tolerance
    assert header["format"] == fmt.lower() and header["sex"] == "unknown" and header["age"] is None


def test_jpeg_rgb_luminance(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = np.linspace(0, 250, 32).astype(np.uint8)[None, :]
    rgb[..., 1] = np.linspace(0, 250, 32).astype(np.uint8)[:, None]
    out, _ = io.read_image(write(tmp_path, "red.jpg", png_bytes(Image.fromarray(rgb), "JPEG", quality=100)))
    decoded = np.asarray(Image.open(tmp_path / "red.jpg"), dtype=np.float64)
    expected = decoded @ np.array([0.2989, 0.5870, 0.1140])
    np.testing.assert_allclose(out, expected, rtol=1e-5)


# --- JSRT raw -------------------------------------------------------------------------------------------------------


def _jsrt_raw() -> np.ndarray:
    """High raw value = dark film: lungs high, mediastinum low; plus a known pixel to check the byte order."""
    raw = np.full((2048, 2048), 3500, dtype=np.uint16)
    raw[:, 820:1228] = 600
    raw[0, 0] = 0x0102
    return raw


@pytest.mark.parametrize("name", ["JPCLN001.IMG", "JPCNN010.img"])
def test_jsrt_raw_is_big_endian_12_bit_and_inverted(tmp_path, name):
    raw = _jsrt_raw()
    path = write(tmp_path, name, raw.astype(">u2").tobytes())
    out, header = io.read_image(path)
    assert out.shape == (2048, 2048)
    assert out[0, 0] == 4095 - 0x0102
    np.testing.assert_array_equal(out[1:, :], 4095 - raw[1:, :].astype(np.float32))
    assert center_minus_sides(out) > 2000  # mediastinum bright, lungs dark
    assert (header["format"], header["bits_stored"], header["pixel_spacing"]) == ("jsrt", 12, (0.175, 0.175))


def test_jsrt_needs_the_suffix_the_size_and_12_bits(tmp_path):
    data = _jsrt_raw().astype(">u2").tobytes()
    with pytest.raises(io.NotAnImageError):
        io.read_image(write(tmp_path, "JPCLN001.raw", data))
    with pytest.raises(io.NotAnImageError):
        io.read_image(write(tmp_path, "short.IMG", data[:-2]))
    bad = _jsrt_raw()
    bad[5, 5] = 5000
    with pytest.raises(io.UnreadableImageError, match="12 bits"):
        io.read_image(write(tmp_path, "bad.IMG", bad.astype(">u2").tobytes()))
    assert io.read_image(data, name="JPCLN001.IMG")[1]["format"] == "jsrt"


# --- masks ----------------------------------------------------------------------------------------------------------


def _lungs(h: int = 40, w: int = 60) -> tuple[np.ndarray, np.ndarray]:
    left = np.zeros((h, w), bool)
    right = np.zeros((h, w), bool)
    left[5:35, 5:25] = True
    right[8:33, 35:55] = True
    return left, right


def test_read_mask_0_255_png(tmp_path):
    left, right = _lungs()
    both = left | right
    path = write(tmp_path, "m.png", png_bytes(Image.fromarray((both * 255).astype(np.uint8))))
    mask = io.read_mask(path)
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, both)


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_read_mask_merges_left_and_right(tmp_path, fmt):
    left, right = _lungs()
    paths = []
    for side, m in (("left", left), ("right", right)):
        img = Image.fromarray((m * 255).astype(np.uint8))
        img = img.convert("P") if fmt == "GIF" else img
        paths.append(write(tmp_path, f"{side}.{fmt.lower()}", png_bytes(img, fmt)))
    np.testing.assert_array_equal(io.read_mask(paths), left | right)
    np.testing.assert_array_equal(io.read_mask([str(paths[0])]), left)


def test_read_mask_0_1_values_and_empty(tmp_path):
    left, _ = _lungs()
    zero_one = write(tmp_path, "01.png", png_bytes(Image.fromarray(left.astype(np.uint8))))
    np.testing.assert_array_equal(io.read_mask(zero_one), left)
    empty = io.read_mask(write(tmp_path, "empty.png", png_bytes(Image.new("L", (10, 10), 0))))
    assert empty.shape == (10, 10) and not empty.any()


def test_read_mask_threshold_is_fixed_by_the_sample_range_not_the_values_held(tmp_path):
    """V7 Labs' masks mark devices 127 and lungs 255: a mask holding only 0 and 127 (devices, no lungs) was cut at its
    own midpoint, 63.5, and its devices became lungs."""
    left, right = _lungs()
    v7 = np.where(left, 255, np.where(right, 127, 0)).astype(np.uint8)
    np.testing.assert_array_equal(io.read_mask(write(tmp_path, "v7.png", png_bytes(Image.fromarray(v7)))), left)
    devices = (right * 127).astype(np.uint8)
    assert not io.read_mask(write(tmp_path, "devices.png", png_bytes(Image.fromarray(devices)))).any()
    for top in (32767, 65535):  # 16 bits: half of 65535
        path = write(tmp_path, f"m16_{top}.png", png_bytes(Image.fromarray((left * top).astype(np.uint16))))
        np.testing.assert_array_equal(io.read_mask(path), left if top > 32767 else np.zeros_like(left))
    floats = (left * 0.25 + right * 0.125).astype(np.float32)  # no sample range: the midpoint of its own values
    np.testing.assert_array_equal(io.read_mask(write(tmp_path, "f.tif", png_bytes(Image.fromarray(floats), "TIFF"))),
                                  left)


@pytest.mark.parametrize(
    ("top", "device", "expected"),
    [(255, 0, "lungs"), (65535, 0, "lungs"), (255, 127, "lungs"), (0, 127, "none"), (32767, 0, "none")],
)
def test_read_mask_16_bit_is_cut_by_the_smallest_range_holding_its_values(tmp_path, top, device, expected):
    """A 16-bit mask of 0/255 was cut at half of 65535 and read empty; it is an 8-bit mask stored wide. V7 Labs'
    devices (127, no lungs) stay outside at either width."""
    left, right = _lungs()
    stored = np.where(left, top, np.where(right, device, 0)).astype(np.uint16)
    path = write(tmp_path, "m16.png", png_bytes(Image.fromarray(stored)))
    np.testing.assert_array_equal(io.read_mask(path), left if expected == "lungs" else np.zeros_like(left))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
@pytest.mark.parametrize("bits", [10, 12, 14])
def test_read_mask_of_a_radiograph_bit_depth_stored_in_16_bits_has_its_lungs(tmp_path, fmt, bits):
    """A 12-bit mask written in 16 bits (0/4095, as exporters of 12-bit radiographs write it) was cut at half of 65535
    and read empty (ingest: empty_mask); it is cut at half its own 12-bit range, as are 10 and 14 bits. Its
    anti-aliased edge (values between) is cut there too, and half that range (a device label at 2047) stays out."""
    left, right = _lungs()
    top = 2**bits - 1
    stored = np.where(left, top, np.where(right, top // 2, 0)).astype(np.uint16)
    stored[left.any(axis=1), 4] = top // 2 + 1  # an anti-aliased column just outside the left lung, above half
    path = write(tmp_path, f"m{bits}.{fmt.lower()}", png_bytes(Image.fromarray(stored), fmt))
    with Image.open(path) as check:
        assert check.mode.startswith("I;16")
    expected = left.copy()
    expected[left.any(axis=1), 4] = True
    np.testing.assert_array_equal(io.read_mask(path), expected)


def _palette_mask(index: np.ndarray, colours: list[tuple[int, int, int]]) -> Image.Image:
    img = Image.fromarray(index.astype(np.uint8), mode="P")
    img.putpalette([c for colour in colours for c in colour])
    return img


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_read_mask_palette_of_colours_is_read_by_index(tmp_path, fmt):
    """labelme / Pascal VOC masks: background index 0 black, lung index 1 dark red (128, 0, 0). Its luminance, 38, is
    under half the 8-bit range: the mask was read empty."""
    left, right = _lungs()
    index = np.where(left, 1, np.where(right, 2, 0))
    img = _palette_mask(index, [(0, 0, 0), (128, 0, 0), (0, 128, 0)])
    path = write(tmp_path, f"voc.{fmt.lower()}", png_bytes(img, fmt))
    with Image.open(path) as check:
        assert check.mode == "P"
    np.testing.assert_array_equal(io.read_mask(path), left | right)
    one = _palette_mask(left * 1, [(0, 0, 0), (128, 0, 0)])
    lungs_only = write(tmp_path, f"one.{fmt.lower()}", png_bytes(one, fmt))
    np.testing.assert_array_equal(io.read_mask(lungs_only), left)


def test_read_mask_gray_palette_and_rgb_keep_v7_devices_out_and_colours_in(tmp_path):
    """A V7 Labs mask saved as a palette (index 2: devices 127) or as gray RGB keeps its devices out of the lungs, by
    gray value and not by index; a colour RGB mask (dark red lungs) is cut at the midpoint of the luminances it holds,
    where half the 8-bit range read it empty."""
    left, right = _lungs()
    palette = _palette_mask(np.where(left, 1, np.where(right, 2, 0)), [(0, 0, 0), (255, 255, 255), (127, 127, 127)])
    np.testing.assert_array_equal(io.read_mask(write(tmp_path, "v7p.png", png_bytes(palette))), left)
    gray = np.where(left, 255, np.where(right, 127, 0)).astype(np.uint8)
    rgb = Image.fromarray(np.stack([gray] * 3, axis=-1))
    np.testing.assert_array_equal(io.read_mask(write(tmp_path, "v7rgb.png", png_bytes(rgb))), left)
    devices = Image.fromarray(np.stack([right * 127] * 3, axis=-1).astype(np.uint8))
    assert not io.read_mask(write(tmp_path, "devices.png", png_bytes(devices))).any()
    red = np.zeros((*left.shape, 3), np.uint8)
    red[left] = (128, 0, 0)
    np.testing.assert_array_equal(io.read_mask(write(tmp_path, "red.png", png_bytes(Image.fromarray(red)))), left)


def test_read_mask_shape_mismatch_is_typed(tmp_path):
    a = write(tmp_path, "a.png", png_bytes(Image.new("L", (10, 10), 255)))
    b = write(tmp_path, "b.png", png_bytes(Image.new("L", (12, 10), 255)))
    with pytest.raises(io.ImageReadError) as info:
        io.read_mask([a, b])
    assert info.value.reason == "mask_shape" and info.value.source == str(b) and str(a) in info.value.problem
    with pytest.raises(ValueError):
        io.read_mask([])
    with pytest.raises(io.NotAnImageError):
        io.read_mask(write(tmp_path, "t.png", b"text"))


# --- pseudonymize and hashing ---------------------------------------------------------------------------------------


def test_pseudonymize():
    a = io.pseudonymize("patient-0042", "s1")
    assert a == io.pseudonymize("patient-0042", "s1")
    assert a != io.pseudonymize("patient-0042", "s2") and a != io.pseudonymize("patient-0043", "s1")
    assert len(a) == 16 and all(c in "0123456789abcdef" for c in a)
    assert "0042" not in a and "patient" not in a
    with pytest.raises(ValueError):
        io.pseudonymize("patient-0042", "")


def test_sha256_file_streams_large_files(tmp_path):
    data = np.random.default_rng(2).integers(0, 256, (5 << 20) // 2, dtype=np.uint8).tobytes()
    path = write(tmp_path, "big.bin", data)
    assert io.sha256_file(path) == hashlib.sha256(data).hexdigest()


# --- hostile inputs: decompression bombs, headers that lie, odd but valid encodings ---------------------------------


def patch_jpeg_size(jpeg: bytes, height: int, width: int) -> bytes:
    """The JPEG with its start-of-frame header declaring another size; the scan data is unchanged."""
    data = bytearray(jpeg)
    at = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, at + 5, height, width)
    return bytes(data)


def patch_j2k_size(codestream: bytes, height: int, width: int) -> bytes:
    """The JPEG 2000 codestream with its SIZ segment declaring another image (and tile) size."""
    data = bytearray(codestream)
    at = data.index(b"\xff\x4f\xff\x51")  # SOC, SIZ
    struct.pack_into(">II", data, at + 8, width, height)  # Xsiz, Ysiz
    struct.pack_into(">II", data, at + 24, width, height)  # XTsiz, YTsiz: one tile
    return bytes(data)


def codestream_dicom(kind: str, height: int, width: int) -> bytes:
    """A 64x64 8-bit DICOM whose single JPEG or JPEG 2000 frame declares ``height`` x ``width``."""
    img = Image.fromarray(gray8(64, 64))
    if kind == "jpeg":
        frame, syntax = patch_jpeg_size(png_bytes(img, "JPEG"), height, width), JPEGBaseline8Bit
    else:
        frame, syntax = patch_j2k_size(png_bytes(img, "JPEG2000", no_jp2=True), height, width), JPEG2000
    return make_dicom(None, shape=(64, 64), bits_allocated=8, bits_stored=8, transfer_syntax=syntax, frames=[frame])


@pytest.mark.parametrize("kind", ["jpeg", "j2k"])
def test_dicom_codestream_declaring_a_huge_frame_is_refused_before_decoding(tmp_path, kind):
    # Without the check the decoder allocates what the codestream declares: 2 GB and a minute for this file.
    path = write(tmp_path, f"bomb_{kind}.dcm", codestream_dicom(kind, 30_000, 30_000))
    with decoders_stopped() as decoded, pytest.raises(io.ImageTooLargeError) as info:
        io.read_image(path)
    assert decoded == []
    assert info.value.source == str(path) and "30000x30000" in info.value.problem
    with pytest.raises(io.UnreadableImageError, match="more than the header's 64x64"):
        io.read_image(codestream_dicom(kind, 128, 128))
    out, _ = io.read_image(codestream_dicom(kind, 64, 64))  # the unpatched size decodes
    assert np.abs(out - gray8(64, 64)).mean() < 8


def test_jpeg_declaring_a_huge_size_is_refused_before_decoding(tmp_path):
    path = write(tmp_path, "bomb.jpg", patch_jpeg_size(png_bytes(Image.fromarray(gray8()), "JPEG"), 60_000, 60_000))
    with decoders_stopped() as decoded, pytest.raises(io.ImageTooLargeError, match="3600000000 pixels") as info:
        io.read_image(path)
    assert decoded == [] and info.value.source == str(path)


def _deflated(ds: Dataset) -> bytes:
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = stdio.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("extra", [1, 2, 7, 8, 13])
def test_bytes_after_a_complete_dicom_are_padding_and_a_cut_pixel_data_header_is_truncation(tmp_path, extra):
    """A complete file followed by 1 to 7 bytes (a trailing newline, padding) was refused as cut inside an element
    header, while 8 or more read fine. Only a file without its pixel data was cut there."""
    data = make_dicom(phantom())
    out, _ = io.read_image(write(tmp_path, "padded.dcm", data + b"\0" * extra))
    np.testing.assert_array_equal(out, io.read_image(data)[0])
    if extra < 8:
        np.testing.assert_array_equal(io.read_image(data + b"\n" * extra)[0], out)
    header_at = data.rindex(b"\xe0\x7f\x10\x00")  # the Pixel Data element: tag, VR OW, 2 reserved, 4-byte length
    if extra < 12:
        with pytest.raises(io.TruncatedImageError, match=r"cut.dcm: truncated"):
            io.read_image(data[: header_at + extra], name="cut.dcm")


@pytest.mark.parametrize("pad", [b"\n", b"\r\n", b" ", b"\t", b"\0\n"])
@pytest.mark.parametrize("extra", [8, 13, 64, 4096])
@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit])
def test_any_length_of_whitespace_after_a_complete_dicom_is_padding(tmp_path, pad, extra, transfer_syntax):
    """8 or more trailing newlines (PACS exports, copy tools) were parsed as an element, (0A0A,0A0A) declaring 168 MB,
    and the file refused as truncated. Whitespace or NUL of any length after the last complete element is padding;
    pixel data cut short, then padded, is still refused, typed and naming the file."""
    if transfer_syntax == JPEGBaseline8Bit:
        img = phantom().astype(np.uint8)
        frame = png_bytes(Image.fromarray(img), "JPEG", quality=95)
        data = make_dicom(None, shape=img.shape, bits_allocated=8, bits_stored=8, transfer_syntax=transfer_syntax,
                          frames=[frame])
    else:
        data = make_dicom(phantom(), transfer_syntax=transfer_syntax)
    padding = (pad * extra)[:extra]
    out, header = io.read_image(write(tmp_path, "padded.dcm", data + padding))
    reference, reference_header = io.read_image(data)
    np.testing.assert_array_equal(out, reference)
    assert header == reference_header
    with pytest.raises(io.TruncatedImageError, match=r"cut.dcm: truncated"):
        io.read_image(write(tmp_path, "cut.dcm", data[:-100] + padding[:60]))


def test_deflated_dicom_reads_like_the_plain_one(tmp_path):
    plain = make_dicom(phantom(), photometric="MONOCHROME1")
    data = _deflated(pydicom.dcmread(stdio.BytesIO(plain)))
    out, header = io.read_image(write(tmp_path, "deflated.dcm", data))
    np.testing.assert_array_equal(out, io.read_image(plain)[0])
    assert header["transfer_syntax"] == DeflatedExplicitVRLittleEndian
    with pytest.raises(io.TruncatedImageError, match="deflated"):
        io.read_image(data[:-40], name="cut.dcm")
    ds = pydicom.dcmread(stdio.BytesIO(data))
    del ds.file_meta.MediaStorageSOPClassUID  # a required meta element
    buf = stdio.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    with pytest.raises(io.UnreadableImageError, match="file meta"):
        io.read_image(buf.getvalue(), name="meta.dcm")


def test_deflate_bomb_is_refused_at_the_byte_limit(tmp_path):
    fp = stdio.BytesIO(_deflated(pydicom.dcmread(stdio.BytesIO(make_dicom(phantom(8, 8))))))
    pydicom.filereader.read_preamble(fp, False)
    pydicom.filereader._read_file_meta_info(fp)  # leaves fp at the end of the file meta (deflated syntax)
    head = fp.getvalue()[: fp.tell()]
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    inflated = 200 << 20
    body = b"".join(packer.compress(bytes(1 << 20)) for _ in range(inflated >> 20)) + packer.flush()  # zeros
    path = write(tmp_path, "deflate_bomb.dcm", head + body)
    assert path.stat().st_size < 300_000
    tracemalloc.start()
    try:
        with pytest.raises(io.ImageTooLargeError, match="inflates to more than") as info:
            io.read_image(path, max_pixels=10_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.source == str(path)
    # inflated at most to the byte limit (64 MB here; about twice that while the inflater joins its output), never
    # whole as pydicom would (437 MB peak)
    assert peak < inflated, f"peak {peak >> 20} MB while reading a data set that inflates to {inflated >> 20} MB"


def test_signed_monochrome1_is_inverted_over_the_signed_range(tmp_path):
    signed = phantom() - 2048  # the anatomy as signed 12-bit values
    data = make_dicom(-1 - signed, photometric="MONOCHROME1", signed=True)  # MONOCHROME1 over [-2048, 2047]
    out, header = io.read_image(write(tmp_path, "s1.dcm", data))
    np.testing.assert_array_equal(out, signed)
    assert header["pixel_representation"] == 1 and center_minus_sides(out) > 1000
    windowed, _ = io.read_image(make_dicom(-1 - signed, photometric="MONOCHROME1", signed=True, WindowCenter=0,
                                           WindowWidth=3000))  # fmt: skip
    assert center_minus_sides(windowed) > 1000 and np.isfinite(windowed).all()


def test_monochrome1_with_a_broken_voi_lut_falls_back_and_stays_air_dark(tmp_path, caplog):
    item = Dataset()
    item.add_new(0x00283002, "US", [0, 0, 0])  # a descriptor with no entries and no bits
    item.add_new(0x00283006, "US", [1, 2, 3])
    anatomy = phantom()
    data = make_dicom(4095 - anatomy, photometric="MONOCHROME1", VOILUTSequence=DicomSequence([item]))
    with caplog.at_level(logging.WARNING, logger="covidcxr.io"):
        out, _ = io.read_image(write(tmp_path, "badlut.dcm", data))
    np.testing.assert_array_equal(out, anatomy)
    assert any("badlut.dcm" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_dicom_photograph_uses_luminance(tmp_path, planar):
    rgb = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    stored = rgb if planar == 0 else rgb.transpose(2, 0, 1).copy()
    data = make_dicom(stored, photometric="RGB", bits_allocated=8, bits_stored=8, shape=(48, 64),
                      PlanarConfiguration=planar)  # fmt: skip
    out, header = io.read_image(write(tmp_path, "photo.dcm", data))
    expected = 0.2989 * rgb[..., 0] + 0.5870 * rgb[..., 1] + 0.1140 * rgb[..., 2]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert header["photometric"] == "RGB"


def test_zero_bytes_as_bytes_or_file(tmp_path):
    for src in (b"", write(tmp_path, "empty.dcm", b"")):
        with pytest.raises(io.NotAnImageError, match="empty"):
            io.read_image(src)


# --- real data ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["RG1_J2KI.dcm", "txv_chest_pa.dcm"])
def test_real_dicom_is_oriented_air_dark(real_data, name):
    out, header = io.read_image(real_data / "dicom" / name)
    h, w = out.shape
    rows = slice(h // 3, 2 * h // 3)
    middle_third = out[rows, w // 3 : 2 * w // 3].mean()
    lungs = (out[rows, int(0.2 * w) : int(0.3 * w)].mean() + out[rows, int(0.7 * w) : int(0.8 * w)].mean()) / 2
    assert middle_third > lungs
    assert center_minus_sides(out) > 0.1 * (out.max() - out.min())
    assert (header["width"], header["height"]) == (w, h)
    assert header["modality"] == "CR" and header["view_position"] == "PA"
    if name == "RG1_J2KI.dcm":
        assert (w, h) == (1841, 1955) and header["photometric"] == "MONOCHROME1" and header["bits_stored"] == 15
    else:
        assert (w, h) == (1024, 1024) and header["photometric"] == "MONOCHROME2"


def test_real_raster_images_and_masks(real_data):
    cohen = sorted((real_data / "cohen" / "images").iterdir())
    picks = [p for p in cohen if p.suffix.lower() in (".jpg", ".jpeg")][:2]
    picks += [p for p in cohen if p.suffix.lower() == ".png"][:2]
    picks += sorted((real_data / "kermany" / "chest_xray" / "test" / "NORMAL").glob("*.jpeg"))[:1]
    for path in picks:
        out, header = io.read_image(path)
        with Image.open(path) as img:
            assert out.shape == (img.height, img.width) and header["photometric"] == img.mode
        assert out.dtype == np.float32 and out.max() > out.min()
    v7 = sorted((real_data / "cohen" / "masks_v7labs").glob("*.png"))
    image = next(p for m in v7 for p in cohen if p.stem == m.stem)
    mask = io.read_mask(real_data / "cohen" / "masks_v7labs" / f"{image.stem}.png")
    assert mask.shape == io.read_image(image)[0].shape and 0.05 < mask.mean() < 0.7
    for stem in ("MCUCXR", "CHNCXR"):
        image = sorted((real_data / "montgomery_shenzhen" / "images").glob(f"{stem}_*.png"))[0]
        out, _ = io.read_image(image)
        mask = io.read_mask(real_data / "montgomery_shenzhen" / "masks" / image.name)
        assert mask.shape == out.shape and 0.1 < mask.mean() < 0.6
        h, w = out.shape
        band = np.zeros_like(mask)
        band[h // 3 : 2 * h // 3, int(0.45 * w) : int(0.55 * w)] = True
        assert out[mask].mean() < out[band & ~mask].mean()  # lungs darker than the mediastinum


# --- the fast paths give pydicom's own numbers ------------------------------------------------------------------------


def _pydicom_reference(data: bytes) -> np.ndarray:
    """What read_image computed before its fast paths, with pydicom alone: ``pixel_array`` (frame 0), the modality and
    VOI LUTs on the image (or modality only when the VOI fails on the stored range), MONOCHROME1 inverted over what the
    LUTs give for every stored value."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    ds = pydicom.dcmread(stdio.BytesIO(data))
    arr = pixel_array(ds, index=0)
    bits, signed = ds.BitsStored, ds.PixelRepresentation == 1
    domain = np.arange(-(1 << (bits - 1)) if signed else 0, (1 << (bits - 1 if signed else bits)), dtype=np.int64)

    def luts(x: np.ndarray, voi: bool) -> np.ndarray:
        out = apply_modality_lut(x, ds)
        if voi and ds.get("VOILUTSequence") and np.issubdtype(out.dtype, np.floating):
            out = np.rint(out).astype(np.int64)
        return apply_voi_lut(out, ds, index=0) if voi else out

    try:
        domain_out, voi = luts(domain, True), True
    except Exception:  # noqa: BLE001
        domain_out, voi = luts(domain, False), False
    out = luts(arr, voi).astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = (float(domain_out.min()) + float(domain_out.max())) - out
    return out.astype(np.float32)


LUT_HEADERS = {
    "none": {},
    "window": dict(WindowCenter=1500, WindowWidth=2000),
    "rescale": dict(RescaleSlope=2, RescaleIntercept=-1024),
    "rescale and window": dict(RescaleSlope=0.5, RescaleIntercept=10, WindowCenter=600, WindowWidth=900),
    "two windows": dict(WindowCenter=[1500, 1000], WindowWidth=[2000, 500]),
    "narrow window": dict(WindowCenter=2047.5, WindowWidth=1),
    "invalid window": dict(WindowCenter=100, WindowWidth=0),
    "window centre only": dict(WindowCenter=1500),
    "sigmoid": dict(VOILUTFunction="SIGMOID", WindowCenter=1500, WindowWidth=2000),
    "linear exact": dict(VOILUTFunction="LINEAR_EXACT", WindowCenter=1500, WindowWidth=2000),
    "voi lut": dict(VOILUTSequence=DicomSequence([_voi_lut_item(np.arange(4096)[::-1] * 3)])),
}


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("bits_stored, signed", [(12, False), (16, False), (12, True), (8, False)])
@pytest.mark.parametrize("header", list(LUT_HEADERS))
def test_lut_table_and_plain_header_path_give_pydicoms_numbers_bit_for_bit(photometric, bits_stored, signed, header):
    """The LUT chain applied once per stored value and looked up (what every image large enough takes), the
    windowing of plain headers without pydicom, and the native decode: the very float32 values pydicom gives."""
    rng = np.random.default_rng(bits_stored + 2 * signed)
    lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    pixels = rng.integers(lo, hi + 1, (96, 128))
    pixels[0, :2] = lo, hi
    data = make_dicom(pixels, photometric=photometric, bits_allocated=8 if bits_stored == 8 else 16,
                      bits_stored=bits_stored, signed=signed, **LUT_HEADERS[header])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _pydicom_reference(data)
    if expected.min() == expected.max():  # e.g. 8-bit data under a 12-bit window: refused as pydicom's numbers say
        with pytest.raises(io.ZeroVarianceImageError):
            io.read_image(data)
        return
    out, _ = io.read_image(data)
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))


def test_unused_high_bits_are_ignored_as_pydicom_does(tmp_path):
    """Stored values with junk above BitsStored: cleared (unsigned) or sign-extended (signed) by the native decode
    exactly as pydicom's pixel_array, then looked up in the table."""
    rng = np.random.default_rng(5)
    for signed in (False, True):
        stored = rng.integers(0, 1 << 16, (80, 90)).astype(np.uint16)  # every bit set somewhere
        data = make_dicom(stored.view(np.int16) if signed else stored, bits_stored=12, signed=signed,
                          WindowCenter=100, WindowWidth=300)
        out, _ = io.read_image(data)
        np.testing.assert_array_equal(out, _pydicom_reference(data))


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize("keyword, value", [
    ("PixelSpacing", "0.1\\0.2"), ("PixelSpacing", "0.1"), ("PixelSpacing", " 1.5e-1\\.3 "), ("PixelSpacing", "a\\b"),
    ("PixelSpacing", ""), ("NumberOfFrames", "1"), ("NumberOfFrames", " 2 "), ("NumberOfFrames", "1.0"),
    ("NumberOfFrames", "x"), ("PatientAge", "065Y"), ("PatientSex", "F "), ("ViewPosition", "PA\\AP"),
    ("BodyPartExamined", "CHEST"), ("WindowCenter", "100\\"), ("WindowWidth", "1e400"), ("RescaleSlope", "nan"),
])
def test_header_values_read_from_the_bytes_equal_pydicoms(keyword, value):
    """The values read straight from an element's bytes are pydicom's, or pydicom is asked (odd ones)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    def element(tag: int, vr: str, data: bytes) -> bytes:  # explicit VR little endian, written by hand
        data += b" " * (len(data) % 2)
        return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode() + struct.pack("<H", len(data)) + data

    tag = tag_for_keyword(keyword)
    elements = {0x00280010: element(0x00280010, "US", struct.pack("<H", 4)),
                tag: element(tag, dictionary_VR(tag), value.encode("ascii"))}
    data = b"".join(elements[t] for t in sorted(elements))
    parsed = pydicom.dcmread(stdio.BytesIO(data), force=True)
    fast = io._plain_values(parsed, keyword)
    assert (fast is None) == (value in ("a\\b", "", "1.0", "x", "nan"))  # plain values do not go through pydicom
    try:
        reference = pydicom.dcmread(stdio.BytesIO(data), force=True).get(keyword)
    except ValueError:  # pydicom refuses the value: so must the shortcut, leaving it to pydicom
        assert fast is None
        return
    reference = tuple(reference) if isinstance(reference, pydicom.multival.MultiValue) else (reference,)
    if fast is not None:
        assert len(fast) == len(reference) and all(
            f == r or (isinstance(f, float) and np.isnan(f) and np.isnan(r)) for f, r in zip(fast, reference))
    assert io._get(parsed, "Rows") == 4 and io._plain_values(parsed, "Rows") == (4,)


# --- reduced decode for a target size -------------------------------------------------------------------------------


def test_a_jpeg_far_above_the_target_is_decoded_at_reduced_scale(tmp_path):
    big = Image.fromarray(np.tile(gray8(100, 125), (10, 8)))  # 1000 x 1000 px
    jpeg = png_bytes(big, "JPEG", quality=95)
    full, header = io.read_image(jpeg)
    assert full.shape == (1000, 1000) and not io.is_reduced(full, header)
    for target, shape in [(224, (250, 250)), (64, (125, 125)), ((400, 120), (500, 500)), (500, (500, 500)),
                          (600, (1000, 1000))]:
        arr, header = io.read_image(jpeg, target=target)
        assert arr.shape == shape and (header["width"], header["height"]) == (1000, 1000), target
        assert io.is_reduced(arr, header) == (shape != (1000, 1000))
    # the reduced decode keeps the image: its working image is the full decode's, up to the decoder's own filtering
    from covidcxr import preprocess

    reduced = preprocess.read_working_image(jpeg, 64)[0]
    assert np.abs(reduced - preprocess.working_image(full, 64)).mean() < 0.02  # hard-edged tiles: the worst case
    for fmt in ("PNG", "TIFF"):  # other formats are decoded whole
        arr, header = io.read_image(png_bytes(big, fmt), target=64)
        assert arr.shape == (1000, 1000) and not io.is_reduced(arr, header)
    dicom, header = io.read_image(make_dicom(phantom(200, 300)), target=32)
    assert dicom.shape == (200, 300) and not io.is_reduced(dicom, header)
    for bad in (0, -3, (0, 5), True):
        with pytest.raises(ValueError, match="target"):
            io.read_image(jpeg, target=bad)
    with pytest.raises(io.ImageTooLargeError):  # limits apply to the file's declared size, whatever the target
        io.read_image(jpeg, target=64, max_pixels=999_999)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_a_jpeg_dicom_far_above_the_target_is_decoded_at_reduced_scale(tmp_path, photometric):
    from covidcxr import preprocess

    anatomy = np.tile(gray8(100, 125), (8, 8)).astype(np.float32)  # 800 x 1000 px
    stored = anatomy if photometric == "MONOCHROME2" else 255 - anatomy
    jpeg = png_bytes(Image.fromarray(stored.astype(np.uint8)), "JPEG", quality=95)
    data = make_dicom(None, shape=stored.shape, bits_allocated=8, bits_stored=8, photometric=photometric,
                      transfer_syntax=JPEGBaseline8Bit, frames=[jpeg])
    full, header = io.read_image(data)
    assert full.shape == (800, 1000) and not io.is_reduced(full, header)
    for target, shape in [(224, (400, 500)), (64, (100, 125)), (500, (800, 1000))]:
        arr, header = io.read_image(data, target=target)
        assert arr.shape == shape and (header["height"], header["width"]) == (800, 1000), target
        assert io.is_reduced(arr, header) == (shape != (800, 1000))
    # the same intensities (LUTs, inversion: air dark) and the same picture as the full decode, resized
    reduced = preprocess.read_working_image(data, 64)[0]
    assert np.abs(reduced - preprocess.working_image(full, 64)).mean() < 0.02
    assert np.abs(reduced - preprocess.working_image(anatomy, 64)).mean() < 0.02  # MONOCHROME1 inverted


def test_a_reduced_decode_falls_back_to_the_full_one_where_it_does_not_apply(tmp_path):
    img = np.tile(gray8(100, 125), (4, 4))  # 400 x 500
    jpeg = png_bytes(Image.fromarray(img), "JPEG", quality=95)
    j2k = png_bytes(Image.fromarray(img), "JPEG2000", no_jp2=True)
    for syntax, frame, bits in ((JPEG2000Lossless, j2k, 8), (JPEGBaseline8Bit, jpeg, 7)):  # 7: values beyond it
        data = make_dicom(None, shape=img.shape, bits_allocated=8, bits_stored=bits, transfer_syntax=syntax,
                          frames=[frame])
        arr, header = io.read_image(data, target=64)
        assert arr.shape == (400, 500) and not io.is_reduced(arr, header), syntax
    # a frame that is no JPEG at all: the full decode reports it, typed, naming the file
    broken = make_dicom(None, shape=img.shape, bits_allocated=8, bits_stored=8, transfer_syntax=JPEGBaseline8Bit,
                        frames=[b"\xff\xd8\xff\xe0" + bytes(200)])
    with pytest.raises(io.ImageReadError, match="broken.dcm: .*JPEG"):
        io.read_image(broken, target=64, name="broken.dcm")


def test_real_compressed_dicoms_at_reduced_scale(real_data):
    from covidcxr import preprocess

    path = real_data / "dicom" / "txv_chest_pa.dcm"  # a real chest PA, 1024 x 1024, baseline JPEG
    full, _ = io.read_image(path)
    arr, header = io.read_image(path, target=224)
    assert arr.shape == (256, 256) and io.is_reduced(arr, header)
    reduced = preprocess.working_image(arr, 224)
    assert np.corrcoef(reduced.ravel(), preprocess.working_image(full, 224).ravel())[0, 1] > 0.995
    arr, header = io.read_image(real_data / "dicom" / "RG1_J2KI.dcm", target=64)  # JPEG 2000: decoded whole
    assert arr.shape == (1955, 1841) and not io.is_reduced(arr, header)
