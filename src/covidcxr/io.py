"""Reading radiographs and lung masks: the one place pixels enter covidcxr.

:func:`read_image` recognises the format from the file's bytes (not its name), refuses what it cannot read
faithfully with a typed :class:`ImageReadError` that names the file and the problem, and returns native
intensities (after the DICOM modality and VOI LUTs) as a float32 2-D array with air dark, plus a header
restricted to :data:`HEADER_FIELDS` so that no protected health information leaves this module.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import re
import struct
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageFile, UnidentifiedImageError
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import BytesLengthException
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS: int = 64_000_000

HEADER_FIELDS: tuple[str, ...] = (
    "format",
    "width",
    "height",
    "n_frames",
    "photometric",
    "bits_stored",
    "bits_allocated",
    "pixel_representation",
    "modality",
    "view_position",
    "body_part",
    "pixel_spacing",
    "sex",
    "age",
    "transfer_syntax",
    "burned_in_annotation",
    "presentation_intent",
)

ImageSource = str | os.PathLike | bytes


# --- errors ---------------------------------------------------------------------------------------------------------


class ImageReadError(ValueError):
    """An image that cannot be used; ``reason`` is a short machine code, ``str(err)`` is ``"<source>: <problem>"``."""

    reason: str = "error"

    def __init__(self, source: str, problem: str, *, reason: str | None = None) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem
        if reason is not None:
            self.reason = reason

    def __reduce__(self) -> tuple:
        # Keeps errors picklable across process pools despite the keyword-only constructor.
        return (_rebuild_error, (type(self), self.source, self.problem, self.reason))


def _rebuild_error(cls: type[ImageReadError], source: str, problem: str, reason: str) -> ImageReadError:
    return cls(source, problem, reason=reason)


class UnreadableImageError(ImageReadError):
    """Corrupt, undecodable or missing file."""

    reason = "unreadable"


class TruncatedImageError(UnreadableImageError):
    """The file ends before the data it declares."""

    reason = "truncated"


class NotAnImageError(ImageReadError):
    """Bytes of no known image format (text, archives, empty files...)."""

    reason = "not_an_image"


class ZeroVarianceImageError(ImageReadError):
    """Every pixel has the same value: nothing to learn from."""

    reason = "zero_variance"


class ImageTooLargeError(ImageReadError):
    """Declared width x height x frames above the limit (checked before any pixel is decoded)."""

    reason = "too_large"


class NoPixelDataError(ImageReadError):
    """A DICOM without a (7FE0,0010) Pixel Data element."""

    reason = "no_pixel_data"


class UnsupportedPhotometricError(ImageReadError):
    """A colour model this reader does not convert faithfully to grayscale."""

    reason = "unsupported_photometric"


# --- public API -----------------------------------------------------------------------------------------------------


def read_image(
    src: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    target: int | tuple[int, int] | None = None,
    photometric: str | None = None,
    bits_stored: int | None = None,
) -> tuple[np.ndarray, dict]:
    """Float32 2-D grayscale array (native intensity after LUTs, air dark) and a whitelisted header dict.

    ``src`` is a path or the file's bytes; ``name`` replaces the path (or ``"<bytes>"``) in error messages and, for
    bytes, supplies the suffix that marks a JSRT raw file. Raises an :class:`ImageReadError` subclass for anything
    that cannot be read faithfully, including images whose pixels all have one value.

    ``target`` (an int for a square, or ``(height, width)``) is the size the caller is about to resize the image to. A
    JPEG at least twice that size on both sides, file or baseline-JPEG DICOM pixel data, is then decoded at 1/2, 1/4 or
    1/8 scale in the decoder itself (Pillow's draft mode: scaled inverse DCT), keeping both sides at least ``target``;
    everything else is decoded whole. The header still gives the file's own width and height, so ``arr.shape`` differs
    from them exactly when the decode was reduced (:func:`is_reduced`). Size limits apply to the file's declared size,
    before any decode.

    ``photometric`` and ``bits_stored`` are what the file's source states of a raster file (PNG, JPEG, ...) that has no
    header to say it: a DICOM exported as a PNG with its stored values (BIMCV, PadChest) keeps MONOCHROME1's air bright,
    and ``photometric="MONOCHROME1"`` inverts it as a DICOM's would be (:func:`_invert_monochrome1`). A DICOM or JSRT
    file ignores them: its own header or format decides. The header still describes the file as stored.
    """
    arr, header, source, (lo, hi) = _decode(src, max_pixels, name, target, photometric, bits_stored)
    if lo == hi:
        raise ZeroVarianceImageError(source, f"all pixels have the same value ({lo:g})")
    return arr, header


def read_mask(paths: ImageSource | Sequence[str | os.PathLike], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Boolean lung mask; several files (left + right lung) are OR-merged and must share one shape.

    A gray pixel is inside above half the smallest 1-, 8-, 10-, 12-, 14- or 16-bit range that holds the file's largest
    value (0.5 for 0/1, 127.5 for 0/255 in 8 or 16 bits, 2047.5 for a 12-bit 0/4095 stored in 16, 32767.5 for
    0/65535), not the midpoint of the values it holds (:func:`_binarize`): V7 Labs' masks mark devices 127 and lungs
    255, so a mask holding only 0 and 127 has no lung.
    Palette and colour masks: :func:`_raster_mask`. A mask with no pixel inside comes back empty; ``ingest`` reports
    it (reason ``empty_mask``) and keeps its image without a mask.
    """
    items = [paths] if isinstance(paths, (str, bytes, os.PathLike)) else list(paths)
    if not items:
        raise ValueError("read_mask needs at least one mask file")
    merged: np.ndarray | None = None
    first = ""
    for item in items:
        arr, header, source, (lo, hi) = _decode(item, max_pixels, None, mask=True)
        mask = _binarize(arr, header, lo, hi)
        if merged is None:
            merged, first = mask, source
        elif mask.shape != merged.shape:
            raise ImageReadError(
                source, f"mask shape {mask.shape} differs from shape {merged.shape} of {first}", reason="mask_shape"
            )
        else:
            merged |= mask
    assert merged is not None
    return merged


def is_reduced(arr: np.ndarray, header: dict) -> bool:
    """Whether ``read_image(..., target=...)`` decoded this image below the file's own size (JPEG draft mode)."""
    return arr.shape != (header.get("height"), header.get("width"))


def pseudonymize(value: str, salt: str) -> str:
    """Salted SHA-256 (HMAC, hex, first 16 chars) of a patient identifier; same input and salt give the same output.

    The salt is the HMAC key, so identifiers cannot be recovered by hashing guesses without it.
    """
    if not isinstance(value, str) or not isinstance(salt, str):
        raise TypeError("pseudonymize takes a str identifier and a str salt")
    if not salt:
        raise ValueError("pseudonymize needs a non-empty salt (an unsalted hash of an id can be reversed by guessing)")
    return hmac.new(salt.encode("utf-8"), value.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- dispatch -------------------------------------------------------------------------------------------------------

# JSRT: 2048 x 2048, 12-bit, big-endian raw, no header (db.jsrt.or.jp/eng.php), 0.175 mm pixels.
JSRT_SHAPE = (2048, 2048)
JSRT_BYTES = JSRT_SHAPE[0] * JSRT_SHAPE[1] * 2
_JSRT_SPACING_MM = 0.175

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
    (b"\xffO\xffQ", "jpeg2000"),
    (b"BM", "bmp"),
)
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "tiff": "TIFF", "jpeg2000": "JPEG2000", "bmp": "BMP"}
# A DICOM without preamble starts with a little- or big-endian tag of group 0002 (meta) or 0008 (identification).
_DICOM_NO_PREAMBLE_STARTS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


def _decode(
    src: ImageSource,
    max_pixels: int,
    name: str | None,
    target: int | tuple[int, int] | None = None,
    photometric: str | None = None,
    bits_stored: int | None = None,
    *,
    mask: bool = False,
) -> tuple[np.ndarray, dict, str, tuple[float, float]]:
    """Read any supported file into (float32 2-D array, header, source name, (min, max)), without the variance check;
    ``photometric`` and ``bits_stored``: the source's word on a raster file (:func:`read_image`); ``mask``: a raster
    file's palette or colours are read as a lung mask's (:func:`_raster_mask`)."""
    if not isinstance(max_pixels, (int, np.integer)) or isinstance(max_pixels, bool) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    data, source, suffix = _load(src, name, _max_file_bytes(max_pixels))
    fmt = _sniff(data, suffix)
    if fmt is None:
        raise NotAnImageError(source, _unknown_format(data))
    if fmt == "dicom":
        arr, header = _read_dicom(data, source, max_pixels, _max_file_bytes(max_pixels), _draft_size(target))
    elif fmt == "jsrt":
        arr, header = _read_jsrt(data, source, max_pixels)
    else:
        draft = _draft_size(target) if fmt == "jpeg" else None
        arr, header, inverted = _read_raster(data, fmt, source, max_pixels, draft, mask=mask)
        if not inverted and isinstance(photometric, str) and photometric.strip().upper() == "MONOCHROME1":
            arr = _invert_monochrome1(arr, header, bits_stored, source)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.ndim != 2:
        raise UnreadableImageError(source, f"decoded to shape {arr.shape}, expected a 2-D grayscale image")
    # min and max propagate NaN and reach an infinity if there is one: two passes instead of an isfinite array
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise UnreadableImageError(source, "pixel values are not all finite (NaN or infinity)")
    logger.debug("read %s: %s %dx%d", source, header["format"], arr.shape[1], arr.shape[0])
    return arr, header, source, (lo, hi)


def _draft_size(target: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """``target`` as Pillow's (width, height), checked; None when no reduced decode is asked for."""
    if target is None:
        return None
    height, width = (target, target) if isinstance(target, (int, np.integer)) else target
    if isinstance(height, bool) or isinstance(width, bool) or int(height) < 1 or int(width) < 1:
        raise ValueError(f"target must be a positive int or (height, width), got {target!r}")
    return int(width), int(height)


def _max_file_bytes(max_pixels: int) -> int:
    """No file under the pixel limit needs more than 8 bytes a pixel (16-bit RGBA) plus room for headers."""
    return 8 * max_pixels + (64 << 20)


def _load(src: ImageSource, name: str | None, max_bytes: int) -> tuple[bytes, str, str]:
    """The file's bytes, the name used in messages, and the lower-case suffix (for JSRT raw files)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        source = name or "<bytes>"
        _check_file_size(len(src), max_bytes, source)
        return bytes(src), source, Path(name).suffix.lower() if name else ""
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"read_image takes a path or bytes, got {type(src).__name__}")
    path = Path(src)
    source = name or os.fspath(src)
    try:
        if path.is_file():
            _check_file_size(path.stat().st_size, max_bytes, source)
        return path.read_bytes(), source, path.suffix.lower()
    except FileNotFoundError:
        raise UnreadableImageError(source, "file not found") from None
    except IsADirectoryError:
        raise UnreadableImageError(source, "is a directory, not a file") from None
    except OSError as exc:
        raise UnreadableImageError(source, f"cannot read file ({exc.strerror or type(exc).__name__})") from None


def _check_file_size(size: int, max_bytes: int, source: str) -> None:
    if size > max_bytes:
        raise ImageTooLargeError(
            source, f"file of {size} bytes exceeds {max_bytes} bytes, the most the pixel limit can need"
        )


def _sniff(data: bytes, suffix: str) -> str | None:
    """Format from the content: DICOM, Pillow formats, JSRT raw (by suffix and exact size), preamble-less DICOM."""
    if data[128:132] == b"DICM":
        return "dicom"
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if suffix == ".img" and len(data) == JSRT_BYTES:
        return "jsrt"
    if data[:2] in _DICOM_NO_PREAMBLE_STARTS:
        return "dicom"
    return None


def _unknown_format(data: bytes) -> str:
    if not data:
        return "file is empty (0 bytes)"
    if data.startswith(b"PK\x03\x04"):
        return "not an image: a ZIP archive"
    if data.startswith(b"version https://git-lfs.github.com/spec/"):
        return "not an image: a Git LFS pointer (the image itself was never fetched: git lfs pull)"
    return f"not an image: unknown format ({len(data)} bytes; expected DICOM, PNG, JPEG, GIF, BMP, TIFF or JSRT raw)"


def _check_pixels(n_pixels: int, max_pixels: int, source: str, what: str) -> None:
    if n_pixels > max_pixels:
        raise ImageTooLargeError(source, f"{what} = {n_pixels} pixels exceeds the limit of {max_pixels}")


# --- DICOM ----------------------------------------------------------------------------------------------------------

_PHOTOMETRIC_OK = ("MONOCHROME1", "MONOCHROME2", "RGB")
_PIXEL_DATA_TAG_BYTES = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010), little and big endian
_UNDEFINED_LENGTH = 0xFFFFFFFF
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0, little endian


def _read_dicom(
    data: bytes, source: str, max_pixels: int, max_bytes: int, draft: tuple[int, int] | None = None
) -> tuple[np.ndarray, dict]:
    """Header checks first (truncation, pixel data, size, photometric, length), then decode frame 0 only.

    ``draft`` (width, height): baseline-JPEG grayscale pixel data is decoded at a reduced scale that keeps both sides
    at least that size (:func:`_reduced_frame`), as a JPEG file is.
    """
    inflated = _inflate_deflated(data, source, max_bytes)
    data = data if inflated is None else inflated
    ds = _parse_dicom(data, source, data[128:132] == b"DICM")
    try:
        _check_dicom_complete(ds, data, source)
        header = _dicom_header(ds)
        if inflated is not None:
            header["transfer_syntax"] = str(DeflatedExplicitVRLittleEndian)
        rows, cols, frames = _dicom_dims(ds, source)
        _check_pixels(rows * cols * frames, max_pixels, source, f"DICOM declares {cols}x{rows} x {frames} frame(s)")
        photometric = _check_photometric(ds, source)
        _ensure_transfer_syntax(ds, source)
        _check_pixel_length(ds, source, rows, cols, frames, max_pixels)
        try:
            arr = _native_frame(ds, rows, cols)
            if arr is None and frames == 1 and draft is not None:
                arr = _reduced_frame(ds, rows, cols, draft, source)
            if arr is None:
                arr = pixel_array(ds, index=0)
        except Exception as exc:  # noqa: BLE001 - every decoder failure becomes a typed refusal
            raise UnreadableImageError(source, f"cannot decode DICOM pixel data ({_describe(exc)})") from None
        return _dicom_intensity(arr, ds, photometric, source), header
    except ImageReadError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed elements; the message is not echoed (it may hold PHI)
        raise UnreadableImageError(source, f"malformed DICOM ({type(exc).__name__})") from None


_DEFLATED_UID = str(DeflatedExplicitVRLittleEndian).encode("ascii")


def _inflate_deflated(data: bytes, source: str, max_bytes: int) -> bytes | None:
    """A Deflated Explicit VR Little Endian file as the equivalent Explicit VR Little Endian file, else None.

    pydicom inflates such a data set whole, without a bound (a few kB can inflate to gigabytes); here it is inflated
    at most to ``max_bytes`` and refused beyond.
    """
    if _DEFLATED_UID not in data[:8192]:  # the UID sits in the file meta, near the start
        return None
    try:
        fp = io.BytesIO(data)
        read_preamble(fp, True)
        meta = _read_file_meta_info(fp)
        start = fp.tell()
    except Exception:  # noqa: BLE001 - a broken meta group is reported by the normal parse
        return None
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return None
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflater.decompress(data[start:], max_bytes + 1)
    except zlib.error:
        raise UnreadableImageError(source, "the deflated DICOM data set cannot be inflated (corrupt)") from None
    if len(body) > max_bytes:
        raise ImageTooLargeError(source, f"the deflated DICOM data set inflates to more than {max_bytes} bytes")
    if not inflater.eof:
        raise TruncatedImageError(source, "truncated: the deflated DICOM data set ends early")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    try:
        write_file_meta_info(out, meta, enforce_standard=True)
    except Exception as exc:  # noqa: BLE001 - e.g. required meta elements missing
        raise UnreadableImageError(source, f"malformed DICOM file meta information ({type(exc).__name__})") from None
    return out.getvalue() + body


def _parse_dicom(data: bytes, source: str, has_magic: bool) -> Dataset:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        except (EOFError, struct.error, BytesLengthException):
            if has_magic:
                raise TruncatedImageError(source, "truncated: the DICOM file ends inside a data element") from None
            raise NotAnImageError(source, _unknown_format(data)) from None
        except Exception as exc:  # noqa: BLE001
            if has_magic:
                raise UnreadableImageError(source, f"cannot parse DICOM ({type(exc).__name__})") from None
            raise NotAnImageError(source, _unknown_format(data)) from None
    if not has_magic and not any(k in ds for k in ("PixelData", "Rows", "SOPClassUID", "Modality")):
        raise NotAnImageError(source, _unknown_format(data))
    # pydicom drops an element cut by the end of the file and only warns; that is a truncated file here.
    if any("End of file" in str(w.message) for w in caught):
        raise TruncatedImageError(source, "truncated: the DICOM file ends inside a data element")
    if caught:
        logger.debug("%s: pydicom emitted %d warning(s) while parsing", source, len(caught))
    return ds


def _check_dicom_complete(ds: Dataset, data: bytes, source: str) -> None:
    """Truncation anywhere in the file (pydicom reads short values and stops at a cut silently), or no Pixel Data.

    Whitespace or NUL bytes after the last complete element past the Pixel Data are padding, of any length
    (:func:`_trailing_padding`): what pydicom read of them is dropped, not taken for a cut element.
    """
    meta_length = _int(ds.file_meta, "FileMetaInformationGroupLength")
    end = 132 + 12 + meta_length if data[128:132] == b"DICM" and meta_length is not None else None
    if end is not None and end > len(data):
        raise TruncatedImageError(source, "truncated: the file ends inside the DICOM file meta information")
    padding_at = _trailing_padding(ds, data)
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.value_tell > padding_at:
            del ds[tag]  # an "element" read from the padding (8 newlines: a tag (0A0A,0A0A) declaring 168 MB)
            continue
        if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH:
            end = None  # a sequence or encapsulated data read to its delimiter: no declared end
            if isinstance(raw, RawDataElement) and raw.tag == 0x7FE00010 and raw.value is not None:
                delimiter_at = raw.value_tell + len(raw.value)
                if data[delimiter_at : delimiter_at + 8] != _SEQUENCE_DELIMITER:
                    raise TruncatedImageError(source, "truncated: DICOM compressed pixel data has no complete end")
            continue
        end = raw.value_tell + raw.length
        if end > len(data):
            raise TruncatedImageError(
                source,
                f"truncated: DICOM element {tag} declares {raw.length} bytes, the file ends {end - len(data)} early",
            )
    if "PixelData" not in ds:
        if end is not None and 0 < len(data) - end < 8:
            # Fewer bytes than an element header after the last element, and no pixel data: the next element (the
            # Pixel Data at the latest) was cut inside its header. After the pixel data, such bytes are padding.
            raise TruncatedImageError(source, "truncated: the DICOM file ends inside an element header")
        if any(tag in data for tag in _PIXEL_DATA_TAG_BYTES):
            raise TruncatedImageError(source, "truncated: the DICOM pixel data element (7FE0,0010) is incomplete")
        hint = " (the file may be truncated)" if "Rows" in ds else ""
        raise NoPixelDataError(source, f"DICOM has no pixel data element (7FE0,0010){hint}")


_PADDING_BYTES = b" \t\n\r\x0b\x0c\x00"  # whitespace and NUL


def _trailing_padding(ds: Dataset, data: bytes) -> int:
    """Where the file's trailing padding starts: the end of the last complete top-level element at or after the
    Pixel Data when only whitespace or NUL bytes follow it (a newline or more that PACS exports and copy tools
    append); ``len(data)`` when there is none, or when the Pixel Data or an element after it has no complete end."""
    raws = [raw for raw in (ds.get_item(tag) for tag in ds.keys()) if isinstance(raw, RawDataElement)]
    pixel = next((raw for raw in raws if raw.tag == 0x7FE00010 and raw.value is not None), None)
    if pixel is None:
        return len(data)
    end = pixel.value_tell + (len(pixel.value) + len(_SEQUENCE_DELIMITER) if pixel.length == _UNDEFINED_LENGTH
                              else pixel.length)
    for raw in sorted((raw for raw in raws if raw.value_tell > pixel.value_tell), key=lambda raw: raw.value_tell):
        if end > len(data) or not data[end:].strip(_PADDING_BYTES):
            break
        if raw.length == _UNDEFINED_LENGTH:
            return len(data)
        end = raw.value_tell + raw.length
    return end if end <= len(data) and not data[end:].strip(_PADDING_BYTES) else len(data)


def _dicom_dims(ds: Dataset, source: str) -> tuple[int, int, int]:
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    frames = _int(ds, "NumberOfFrames")
    frames = 1 if frames is None else frames
    if not rows or not cols or rows < 0 or cols < 0 or frames < 1:
        raise UnreadableImageError(
            source, f"DICOM declares an invalid size (Rows={rows}, Columns={cols}, frames={frames})"
        )
    return rows, cols, frames


def _check_photometric(ds: Dataset, source: str) -> str:
    photometric = _str(ds, "PhotometricInterpretation")
    if photometric is None:
        raise UnreadableImageError(source, "DICOM has no PhotometricInterpretation")
    if photometric not in _PHOTOMETRIC_OK:
        raise UnsupportedPhotometricError(
            source, f"DICOM photometric interpretation {photometric} is not supported (MONOCHROME1, MONOCHROME2, RGB)"
        )
    samples = _int(ds, "SamplesPerPixel")
    expected = 3 if photometric == "RGB" else 1
    if samples is not None and samples != expected:
        raise UnreadableImageError(source, f"DICOM {photometric} with SamplesPerPixel={samples} (expected {expected})")
    return photometric


def _ensure_transfer_syntax(ds: Dataset, source: str) -> None:
    """Preamble-less files have no file meta: derive the transfer syntax from the encoding pydicom detected."""
    if ds.file_meta.get("TransferSyntaxUID") is not None:
        return
    raw = ds.get_item(0x7FE00010)
    if isinstance(raw, RawDataElement) and raw.length == _UNDEFINED_LENGTH:
        raise UnreadableImageError(source, "DICOM has compressed pixel data but no transfer syntax")
    implicit, little = ds.original_encoding
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _check_pixel_length(ds: Dataset, source: str, rows: int, cols: int, frames: int, max_pixels: int) -> None:
    """Native data: bytes present vs declared; encapsulated: each fragment complete, frame 0 within its size."""
    tsyntax = ds.file_meta.TransferSyntaxUID
    value = ds.PixelData
    if tsyntax.is_encapsulated:
        first = _check_fragments(value, source)
        _check_codestream_size(first, source, rows, cols, max_pixels)
        return
    bits = _int(ds, "BitsAllocated")
    if bits is None or bits not in (1, 8, 16, 32, 64):
        raise UnreadableImageError(source, f"DICOM BitsAllocated={bits} is not 1, 8, 16, 32 or 64")
    samples = _int(ds, "SamplesPerPixel") or 1
    expected = (rows * cols * frames * samples * bits + 7) // 8
    if len(value) < expected:
        raise TruncatedImageError(
            source,
            f"truncated: DICOM pixel data has {len(value)} bytes, {expected} expected for {cols}x{rows} "
            f"x {frames} frame(s) at {bits} bits",
        )


def _check_fragments(value: bytes, source: str) -> bytes:
    """Walk the (FFFE,E000) items of encapsulated pixel data (the first is the offset table); the first fragment."""
    pos, items = 0, 0
    first = b""
    while pos < len(value):
        if pos + 8 > len(value):
            raise TruncatedImageError(source, "truncated: DICOM compressed pixel data ends inside an item header")
        group, elem, length = struct.unpack_from("<HHI", value, pos)
        if (group, elem) != (0xFFFE, 0xE000):
            raise UnreadableImageError(source, "DICOM compressed pixel data is malformed (expected an item tag)")
        if pos + 8 + length > len(value):
            raise TruncatedImageError(source, "truncated: DICOM compressed pixel data ends inside a fragment")
        if items == 1:
            first = value[pos + 8 : pos + 8 + length]
        pos += 8 + length
        items += 1
    if items < 2:
        raise UnreadableImageError(source, "DICOM compressed pixel data holds no frame")
    return first


# JPEG start-of-frame markers (baseline ... lossless, arithmetic; SOF55 of JPEG-LS): height, width follow the length.
_JPEG_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})
_JPEG_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI: markers without a segment
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"


def _check_codestream_size(fragment: bytes, source: str, rows: int, cols: int, max_pixels: int) -> None:
    """Frame 0's JPEG or JPEG 2000 header must declare no more pixels than Rows x Columns.

    The decoders allocate what the codestream declares, not what the DICOM header says: a few hundred bytes can
    otherwise make them allocate gigabytes. Other encodings (RLE) are decoded at the header's size.
    """
    if fragment.startswith(b"\xff\xd8"):
        size, what = _jpeg_size(fragment), "JPEG"
    elif _J2K_SOC_SIZ in fragment[:4096]:
        size, what = _j2k_size(fragment), "JPEG 2000"
    else:
        return
    if size is None:
        raise UnreadableImageError(source, f"the DICOM {what} frame has no readable size header")
    height, width = size
    if height * width > max_pixels:
        problem = f"the DICOM {what} frame declares {width}x{height} = {height * width} pixels, above {max_pixels}"
        raise ImageTooLargeError(source, problem)
    if height * width > rows * cols:
        raise UnreadableImageError(
            source, f"the DICOM {what} frame declares {width}x{height}, more than the header's {cols}x{rows}"
        )


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the first start-of-frame segment; None if the markers end or a scan comes first."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_NO_LENGTH:
            pos += 2
            continue
        if marker in _JPEG_SOF:
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return (height, width) if height and width else None  # height 0: defined later by DNL, not supported
        if marker == 0xDA:
            return None
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return None


def _j2k_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of the image area from the SIZ segment of a JPEG 2000 codestream (raw or inside a JP2 file)."""
    at = data.find(_J2K_SOC_SIZ)
    if at < 0 or at + 24 > len(data):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", data, at + 8)
    if xsiz <= xosiz or ysiz <= yosiz:
        return None
    return ysiz - yosiz, xsiz - xosiz


_NATIVE_LITTLE_ENDIAN = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_NATIVE_DTYPES = {(8, 0): np.dtype("u1"), (8, 1): np.dtype("i1"), (16, 0): np.dtype("<u2"), (16, 1): np.dtype("<i2")}


def _native_frame(ds: Dataset, rows: int, cols: int) -> np.ndarray | None:
    """Frame 0 of uncompressed little-endian grayscale pixel data, as pydicom's ``pixel_array(ds, index=0)`` gives it.

    pydicom's decoder spends most of its time on a small radiograph setting itself up; for the common layout (8 or 16
    bits allocated, one sample) this is the same array by the same rule: the frame's values in the stored dtype, the
    bits above BitsStored cleared (unsigned) or sign-extended (signed), as pydicom's default ``correct_unused_bits``.
    None for anything else, which pydicom decodes. The data's length was checked before.
    """
    if ds.file_meta.get("TransferSyntaxUID") not in _NATIVE_LITTLE_ENDIAN or "PixelData" not in ds:
        return None
    allocated, stored = _int(ds, "BitsAllocated"), _int(ds, "BitsStored")
    dtype = _NATIVE_DTYPES.get((allocated, _int(ds, "PixelRepresentation")))
    if dtype is None or stored is None or not 1 <= stored <= allocated or _int(ds, "SamplesPerPixel") != 1:
        return None
    if not (0 < rows < 2**16 and 0 < cols < 2**16) or _str(ds, "PhotometricInterpretation") not in _MONOCHROME:
        return None
    frame = np.frombuffer(ds.PixelData, dtype=dtype, count=rows * cols).reshape(rows, cols)
    arr = frame.astype(dtype.newbyteorder("="))  # a writeable copy in native byte order
    if stored < allocated:
        shift = allocated - stored
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)
    return arr


_JPEG_BASELINE_UID = "1.2.840.10008.1.2.4.50"  # 8-bit lossy JPEG


def _reduced_frame(ds: Dataset, rows: int, cols: int, draft: tuple[int, int], source: str) -> np.ndarray | None:
    """Frame 0 of baseline-JPEG grayscale pixel data decoded at a reduced scale, the stored values as a full decode
    gives them, smaller; None where that does not apply, and the caller decodes in full.

    A radiograph of 2,000 px is otherwise decoded whole only to be resized to 64 or 224 px: here, as for a JPEG file,
    at 1/2 to 1/8 scale in the decoder (Pillow's draft mode: a scaled inverse DCT, itself a low-pass), keeping both
    sides at least ``draft``, and only when the image is at least twice that size. Unsigned 8-bit MONOCHROME, one
    sample, one frame. A decoded size or mode the header does not predict, values beyond BitsStored, or any decoder
    error fall back to the full decode, which reports what is wrong with the file. (JPEG 2000 is decoded whole: its
    reduced resolutions fail on some real codestreams, and pydicom rescales a precision that BitsStored disowns.)
    """
    width, height = draft
    if str(ds.file_meta.get("TransferSyntaxUID", "")) != _JPEG_BASELINE_UID or cols < 2 * width or rows < 2 * height:
        return None
    stored = _int(ds, "BitsStored")
    if (_int(ds, "SamplesPerPixel") or 1) != 1 or _int(ds, "PixelRepresentation") != 0 or stored is None:
        return None
    if _str(ds, "PhotometricInterpretation") not in _MONOCHROME or _int(ds, "BitsAllocated") != 8 or stored > 8:
        return None
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        with Image.open(io.BytesIO(frame), formats=["JPEG"]) as img:
            if img.size != (cols, rows) or img.mode != "L":
                return None
            img.draft("L", (width, height))
            img.load()
            arr = np.array(img)
    except Exception:  # noqa: BLE001 - the full decode reports what is wrong with the file
        logger.debug("%s: reduced decode not possible; decoding in full", source)
        return None
    if arr.ndim != 2 or arr.dtype != np.uint8 or (stored < 8 and int(arr.max()) >> stored):
        return None
    return arr


def _dicom_intensity(arr: np.ndarray, ds: Dataset, photometric: str, source: str) -> np.ndarray:
    """Modality LUT, then VOI LUT or window, then MONOCHROME1 inversion over the VOI output range."""
    if photometric == "RGB":
        return _luminance(arr)
    domain = _stored_domain(ds)
    use_voi = True
    domain_out = _plain_luts(domain, ds)
    if domain_out is None:
        try:
            domain_out = _apply_luts(domain, ds, use_voi=True)
        except Exception as exc:  # noqa: BLE001 - a broken VOI should not discard a readable image; it is logged
            logger.warning("%s: VOI LUT/window not applied (%s); using modality values", source, type(exc).__name__)
            use_voi = False
            domain_out = _apply_luts(domain, ds, use_voi=False)
    # MONOCHROME1 is inverted over the range the LUTs can produce from any stored value, not this image's own
    # min/max, so that the mapping depends on the header only.
    flip = float(domain_out.min()) + float(domain_out.max()) if photometric == "MONOCHROME1" else None
    table = _intensity_table(arr, ds, domain, domain_out, use_voi, flip)
    if table is not None:
        lo = int(domain[0])
        return np.take(table, arr if lo == 0 else arr.astype(np.int32) - lo)
    out = _apply_luts(arr, ds, use_voi=use_voi).astype(np.float64)
    return out if flip is None else flip - out


def _intensity_table(
    arr: np.ndarray, ds: Dataset, domain: np.ndarray, domain_out: np.ndarray, use_voi: bool, flip: float | None
) -> np.ndarray | None:
    """The whole LUT chain evaluated once per possible stored value, as float32, indexed by ``value - lowest``.

    Every step (modality rescale or LUT, windowing or VOI LUT, inversion) maps each pixel on its own, so looking the
    pixels up in this table gives the very numbers (bit for bit) that applying the steps to the image gives: the
    table is computed from the stored values in the image's own dtype, so that pydicom's dtype-dependent integer
    arithmetic is the same too. A 2048 x 2048 radiograph has 4M pixels and at most 65,536 stored values. None (apply
    the steps to the image) beyond 16 bits (``domain`` then holds only the two ends), for non-integer data, for images
    with fewer pixels than possible values, or when a pixel lies outside BitsStored's range.
    """
    lo, hi = int(domain[0]), int(domain[-1])
    if domain.size != hi - lo + 1 or arr.dtype.kind not in "iu" or arr.size < domain.size:
        return None
    info = np.iinfo(arr.dtype)
    if lo < info.min or hi > info.max or int(arr.min()) < lo or int(arr.max()) > hi:
        return None
    if ds.get("ModalityLUTSequence") or (use_voi and ds.get("VOILUTSequence")):
        # LUT sequences index with integer arithmetic in the input's dtype (overflow included): redo it in that dtype
        try:
            domain_out = _apply_luts(domain.astype(arr.dtype), ds, use_voi=use_voi)
        except Exception:  # noqa: BLE001 - whatever the steps do on this image, they do below, on the image itself
            return None
    # otherwise each step is the identity or float64 arithmetic on the value alone: the int64 domain's result is it
    out = np.asarray(domain_out, dtype=np.float64)
    return (out if flip is None else flip - out).astype(np.float32)


def _stored_domain(ds: Dataset) -> np.ndarray:
    """Every value the stored pixels can take (BitsStored, PixelRepresentation); the two ends beyond 16 bits."""
    bits = _int(ds, "BitsStored") or _int(ds, "BitsAllocated") or 16
    signed = _int(ds, "PixelRepresentation") == 1
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if bits <= 16:
        return np.arange(lo, hi + 1, dtype=np.int64)
    return np.array([lo, hi], dtype=np.int64)


_RESCALE_WINDOW = ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")
_LUT_SEQUENCES = tuple(Tag(tag_for_keyword(k)) for k in ("ModalityLUTSequence", "VOILUTSequence", "VOILUTFunction"))


def _plain_luts(domain: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """:func:`_apply_luts` with the VOI for the commonest header, or None (let pydicom do it, errors included).

    The commonest header has no LUT sequence, no VOI LUT Function (LINEAR), plain Rescale Slope/Intercept or none, and
    one plain Window Center/Width with a width of at least 1, or none. For it this is pydicom's own arithmetic
    (``apply_modality_lut``, then ``apply_voi_lut``'s windowing, step for step in float64), without its per-call
    attribute lookups and value parsing: with the domain as short as 4,096 values, those were most of the cost.
    """
    if any(tag in ds for tag in _LUT_SEQUENCES):
        return None
    bits, representation = _plain_values(ds, "BitsStored"), _plain_values(ds, "PixelRepresentation")
    slope, intercept, center, width = (_plain_values(ds, k) for k in _RESCALE_WINDOW)
    if None in (slope, intercept, center, width):
        return None
    present = [_PLAIN_TAG[k] in ds for k in _RESCALE_WINDOW]
    rescale, windowed = all(present[:2]), all(present[2:])  # pydicom uses each pair only when both are present
    if ((rescale and (len(slope) != 1 or len(intercept) != 1 or "" in slope + intercept))
            or (windowed and (not center or not width or "" in center[:1] + width[:1] or width[0] < 1))
            or (windowed and (bits is None or len(bits) != 1 or representation is None or len(representation) != 1))):
        return None
    out = domain
    if rescale:
        out = domain.astype(np.float64) * slope[0]
        out += intercept[0]
    if not windowed:
        return out
    if representation[0] == 0:
        y_min, y_max = 0, 2 ** bits[0] - 1
    else:
        y_min, y_max = -(2 ** (bits[0] - 1)), 2 ** (bits[0] - 1) - 1
    if rescale:
        y_min, y_max = y_min * slope[0] + intercept[0], y_max * slope[0] + intercept[0]
    y_range = y_max - y_min
    out = out.astype("float64")
    c, w = center[0] - 0.5, width[0] - 1
    below = out <= (c - w / 2)
    above = out > (c + w / 2)
    between = np.logical_and(~below, ~above)
    out[below] = y_min
    out[above] = y_max
    if between.any():
        out[between] = ((out[between] - c) / w + 0.5) * y_range + y_min
    return out


def _apply_luts(arr: np.ndarray, ds: Dataset, *, use_voi: bool) -> np.ndarray:
    out = apply_modality_lut(arr, ds)
    if not use_voi:
        return out
    if ds.get("VOILUTSequence") and np.issubdtype(out.dtype, np.floating):
        out = np.rint(out).astype(np.int64)  # a VOI LUT is indexed by integers
    return apply_voi_lut(out, ds, index=0)


def _dicom_header(ds: Dataset) -> dict:
    header = dict.fromkeys(HEADER_FIELDS)
    frames = _int(ds, "NumberOfFrames")
    header.update(
        format="dicom",
        width=_int(ds, "Columns"),
        height=_int(ds, "Rows"),
        n_frames=1 if frames is None else frames,
        photometric=_str(ds, "PhotometricInterpretation"),
        bits_stored=_int(ds, "BitsStored"),
        bits_allocated=_int(ds, "BitsAllocated"),
        pixel_representation=_int(ds, "PixelRepresentation"),
        modality=_str(ds, "Modality"),
        view_position=_str(ds, "ViewPosition"),
        body_part=_str(ds, "BodyPartExamined"),
        pixel_spacing=_spacing(ds),
        sex=_sex(_str(ds, "PatientSex")),
        age=_header_age(_str(ds, "PatientAge")),
        transfer_syntax=_transfer_syntax(ds),
        burned_in_annotation={"YES": True, "NO": False}.get(_str(ds, "BurnedInAnnotation") or ""),
        presentation_intent=_str(ds, "PresentationIntentType"),  # DX: FOR PRESENTATION, or FOR PROCESSING (raw)
    )
    return header


def _get(ds: Dataset, keyword: str) -> Any:
    """The first value of an element, or None when absent, empty or not decodable."""
    fast = _plain_values(ds, keyword)
    if fast is not None:
        value = fast[0] if fast else None
    else:
        try:
            value = ds.get(keyword)
        except Exception:  # noqa: BLE001 - a malformed optional element is treated as missing
            return None
        if isinstance(value, (MultiValue, list, tuple)):
            value = value[0] if len(value) else None
    return None if value is None or value == "" else value


# Header values read straight from the element's bytes where their encoding is plain: US and UL (unsigned integers)
# and CS, AS, IS and DS (ASCII text, backslash-separated). These are the values pydicom's conversion gives, but
# pydicom builds and validates a value object per element on first access, which is a good part of the time a small
# radiograph takes to read. Anything else (another VR than the dictionary's, odd lengths, non-ASCII bytes, a number
# that does not parse plainly, an element pydicom already converted) goes through pydicom.
_PLAIN_VR = {
    "Rows": "US", "Columns": "US", "BitsAllocated": "US", "BitsStored": "US", "PixelRepresentation": "US",
    "SamplesPerPixel": "US", "FileMetaInformationGroupLength": "UL", "NumberOfFrames": "IS",
    "PhotometricInterpretation": "CS", "Modality": "CS", "ViewPosition": "CS", "BodyPartExamined": "CS",
    "PatientSex": "CS", "BurnedInAnnotation": "CS", "PatientAge": "AS", "PixelSpacing": "DS",
    "ImagerPixelSpacing": "DS", "RescaleSlope": "DS", "RescaleIntercept": "DS", "WindowCenter": "DS",
    "WindowWidth": "DS", "PresentationIntentType": "CS",
}  # fmt: skip
_PLAIN_TAG = {keyword: Tag(tag_for_keyword(keyword)) for keyword in _PLAIN_VR}
_INTEGER = re.compile(r"\s*[+-]?\d+\s*")
_DECIMAL = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


def _plain_values(ds: Dataset, keyword: str) -> tuple | None:
    """Every value of a :data:`_PLAIN_VR` element as pydicom would give them (empty when absent or empty), or None:
    ask pydicom."""
    vr = _PLAIN_VR.get(keyword)
    if vr is None:
        return None
    try:
        raw = ds.get_item(_PLAIN_TAG[keyword], keep_deferred=True)
    except Exception:  # noqa: BLE001 - not a plain Dataset
        return None
    if raw is None:
        return ()
    if not isinstance(raw, RawDataElement) or raw.VR not in (None, vr) or raw.value is None:
        return None
    data = raw.value
    if not data:
        return ()
    if vr in ("US", "UL"):
        size = 2 if vr == "US" else 4
        if len(data) % size:
            return None
        order = "<" if raw.is_little_endian else ">"
        return struct.unpack(f"{order}{len(data) // size}{'H' if size == 2 else 'I'}", data)
    try:
        items = data.decode("ascii").rstrip(" \x00").split("\\")
    except UnicodeDecodeError:
        return None
    if vr in ("CS", "AS"):
        return tuple(items)
    pattern, number = (_INTEGER, int) if vr == "IS" else (_DECIMAL, float)
    if not all(pattern.fullmatch(item) or not item.strip() for item in items):
        return None
    return tuple(number(item) if item.strip() else "" for item in items)


def _int(ds: Dataset, keyword: str) -> int | None:
    value = _get(ds, keyword)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _str(ds: Dataset, keyword: str) -> str | None:
    value = _get(ds, keyword)
    text = None if value is None else str(value).strip().upper()
    return text or None


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm from PixelSpacing, else ImagerPixelSpacing; None unless two positive numbers."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            values = _plain_values(ds, keyword)
            if values is None or len(values) == 1:  # pydicom gives one value as a number: no pair
                value = ds.get(keyword)
                values = tuple(value) if value is not None else ()
            pair = tuple(float(v) for v in values)
        except Exception:  # noqa: BLE001
            continue
        if len(pair) == 2 and all(np.isfinite(v) and v > 0 for v in pair):
            return pair
    return None


def _sex(value: str | None) -> str:
    return value if value in ("M", "F") else "unknown"


MAX_AGE: float = 120.0  # years; an age above it is a typo or a placeholder, read as unknown
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_age(value: object) -> float | None:
    """Years from 58, "58", "058Y" (DICOM AS), "006M", "35yrs"; None when unknown or absurd (above :data:`MAX_AGE`).

    The one age rule, for DICOM headers here and the datasets' metadata alike (:func:`covidcxr.datasets.parse_age`).
    A missing value of any kind (None, NaN, pandas' NA) is no number: None.
    """
    match = _AGE.match(str(value)) if value is not None else None
    if not match:
        return None
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit in ("", "y", "yr", "yrs", "year", "years"):
        age = number
    elif unit in ("m", "mo", "month", "months"):
        age = number / 12.0
    elif unit in ("w", "week", "weeks"):
        age = number * 7.0 / 365.25
    elif unit in ("d", "day", "days"):
        age = number / 365.25
    else:
        return None
    return age if 0.0 <= age <= MAX_AGE else None


def _header_age(value: str | None) -> float | None:
    """:func:`parse_age` of a DICOM Patient's Age, to 4 decimals."""
    age = parse_age(value)
    return None if age is None else round(age, 4)


def _transfer_syntax(ds: Dataset) -> str | None:
    value = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return str(value) if value else None


# --- JSRT raw -------------------------------------------------------------------------------------------------------


def _read_jsrt(data: bytes, source: str, max_pixels: int) -> tuple[np.ndarray, dict]:
    """JSRT raw: 12-bit values stored big-endian in 16 bits, high value = dark film, so inverted for air dark.

    Inversion source: public JSRT converters invert the raw values, e.g. imlab-uiip/lung-segmentation-2d
    (``preprocess_JSRT.py``: ``1.0 - np.fromfile(path, dtype='>u2').reshape((2048, 2048)) / 4096``).
    """
    height, width = JSRT_SHAPE
    _check_pixels(height * width, max_pixels, source, f"JSRT raw image {width}x{height}")
    raw = np.frombuffer(data, dtype=">u2").reshape(JSRT_SHAPE)
    if int(raw.max()) > 4095:
        raise UnreadableImageError(source, f"values up to {int(raw.max())} do not fit JSRT's 12 bits")
    header = dict.fromkeys(HEADER_FIELDS)
    header.update(
        format="jsrt",
        width=width,
        height=height,
        n_frames=1,
        photometric="MONOCHROME1",
        bits_stored=12,
        bits_allocated=16,
        pixel_representation=0,
        pixel_spacing=(_JSRT_SPACING_MM, _JSRT_SPACING_MM),
        sex="unknown",
    )
    return 4095.0 - raw.astype(np.float32), header


# --- Pillow formats (PNG, JPEG, GIF, BMP, TIFF, JPEG 2000) ----------------------------------------------------------

_MODE_BITS = {
    "1": 1, "L": 8, "P": 8, "PA": 8, "LA": 8, "La": 8, "RGB": 8, "RGBA": 8, "RGBX": 8, "RGBa": 8, "YCbCr": 8,
    "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32,
}  # fmt: skip
_GRAY_MODES = ("1", "L", "I", "F", "I;16", "I;16B", "I;16L", "I;16N")
_RGB_MODES = ("RGB", "RGBA", "RGBX", "RGBa")
_TIFF_PHOTOMETRIC = 262  # PhotometricInterpretation; Pillow reads a TIFF without it as WhiteIsZero
_WHITE_IS_ZERO = 0
_PIL_INVERTS_WHITE_IS_ZERO = ("1", "L")  # Pillow's raw modes 1;I, L;2I, L;4I, L;I


def _read_raster(
    data: bytes, fmt: str, source: str, max_pixels: int, draft: tuple[int, int] | None = None, *, mask: bool = False
) -> tuple[np.ndarray, dict, bool]:
    """Size checked from the header before ``load()``; bombs, truncation and decoder errors become typed refusals.

    ``draft`` (width, height): a JPEG is decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale that keeps both sides at
    least that size (Pillow's draft mode; the colour model is kept, so grayscale is still taken by :func:`_luminance`).

    A TIFF whose PhotometricInterpretation (tag 262) is WhiteIsZero, or that has none (Pillow's reading), is inverted
    for air dark at every bit depth: Pillow inverts it only at 1 to 8 bits (modes 1 and L), so a 16-bit one is
    inverted here over its sample range (:func:`_invert_monochrome1`). The flag returned says the file's own header
    decided the orientation, so that no caller's MONOCHROME1 hint inverts it again. ``mask``: the pixels as a lung
    mask's (:func:`_raster_mask`: a palette by its index, colours by their own rule).
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was True; reset to False so truncated files are refused")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    label = fmt.upper()
    if fmt == "png":
        _check_png_depth(data, source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]]) as img:
                width, height = img.size
                _check_pixels(width * height, max_pixels, source, f"{label} declares {width}x{height}")
                n_frames = int(getattr(img, "n_frames", 1) or 1)
                _check_pixels(width * height * n_frames, max_pixels, source, f"{label} {width}x{height} x {n_frames}")
                mode = img.mode
                white_is_zero = fmt == "tiff" and img.tag_v2.get(_TIFF_PHOTOMETRIC, _WHITE_IS_ZERO) == _WHITE_IS_ZERO
                if draft is not None and width >= 2 * draft[0] and height >= 2 * draft[1]:
                    img.draft(mode, draft)
                img.load()
                arr = _raster_mask(img, label, source) if mask else _raster_gray(img, label, source)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(source, f"{label} declares too many pixels ({exc})") from None
    except UnidentifiedImageError:
        raise UnreadableImageError(source, f"starts like {label} but its header cannot be parsed") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder failure becomes a typed refusal
        if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
            raise TruncatedImageError(source, f"truncated: {label} data ends early ({_describe(exc)})") from None
        raise UnreadableImageError(source, f"cannot decode {label} ({_describe(exc)})") from None
    header = dict.fromkeys(HEADER_FIELDS)
    header.update(
        format=fmt, width=width, height=height, n_frames=n_frames, photometric=mode,
        bits_stored=_MODE_BITS.get(mode), sex="unknown",
    )  # fmt: skip
    if white_is_zero and mode not in _PIL_INVERTS_WHITE_IS_ZERO:
        arr = _invert_monochrome1(arr, header, None, source)
    return arr, header, white_is_zero


# PNG IHDR colour types whose 16-bit samples Pillow decodes to 8 bits (gray with alpha: to RGBA)
_PNG_CUT_TO_8_BITS = {2: "RGB", 4: "gray with alpha", 6: "RGBA"}


def _check_png_depth(data: bytes, source: str) -> None:
    """A 16-bit PNG in colour or with alpha is refused: Pillow decodes it to 8 bits a sample (the high byte), which
    would silently lose the low byte of every native intensity. 16-bit gray (I;16) is read whole."""
    if data[12:16] != b"IHDR" or len(data) < 26:
        return  # Pillow reports the malformed header
    depth, colour = data[24], data[25]
    if depth == 16 and colour in _PNG_CUT_TO_8_BITS:
        raise UnsupportedPhotometricError(
            source,
            f"16-bit {_PNG_CUT_TO_8_BITS[colour]} PNG is not supported: it would be decoded to 8 bits a "
            "sample, losing the low byte of every value (save it as 16-bit grayscale)",
        )


def _invert_monochrome1(arr: np.ndarray, header: dict, bits_stored: int | None, source: str) -> np.ndarray:
    """A raster file of a MONOCHROME1 image (high value = dark film) inverted for air dark, as a DICOM's is: over the
    range its stored values can take, not the image's own min/max, so that the mapping depends on what is known of the
    file only. That range is 0 to 2**bits_stored - 1 when the source states a ``bits_stored`` the pixels fit in, else
    the file's own sample range (8 bits for L, RGB or palette, 16 for I;16, the int32 range for I). A floating-point
    file has no such range: refused.
    """
    mode = header["photometric"]
    if mode == "F":
        raise UnsupportedPhotometricError(
            source, "a floating-point image has no stored range to invert MONOCHROME1 (white-is-zero) values over"
        )
    lo, hi = float(arr.min()), float(arr.max())
    stated = bits_stored if isinstance(bits_stored, (int, np.integer)) and not isinstance(bits_stored, bool) else None
    if stated is not None and 1 <= stated <= 32 and 0 <= lo and hi <= 2.0**stated - 1:
        flip = 2.0**stated - 1
    elif mode == "I":
        flip = -1.0  # int32: -2**31 + (2**31 - 1)
    else:
        flip = 2.0 ** header["bits_stored"] - 1
    return np.float32(flip) - np.asarray(arr, dtype=np.float32)  # exact: both are integers below 2**24 up to 16 bits


def _raster_gray(img: Image.Image, label: str, source: str) -> np.ndarray:
    """Gray as stored; colour by luminance (alpha ignored); palette through RGB; LA keeps its L band."""
    mode = img.mode
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    elif mode == "YCbCr":
        img = img.convert("RGB")
    elif mode in ("LA", "La"):
        img = img.getchannel(0)
    if img.mode in _GRAY_MODES:
        return np.asarray(img).astype(np.float32)
    if img.mode in _RGB_MODES:
        return _luminance(np.asarray(img)[..., :3])
    raise UnsupportedPhotometricError(
        source, f"{label} colour mode {mode} is not supported (grayscale, RGB(A), palette, LA, 1-bit)"
    )


def _raster_mask(img: Image.Image, label: str, source: str) -> np.ndarray:
    """A lung mask's values for :func:`_binarize`. Palette or colour masks whose colours are all gray: that gray (V7
    Labs' devices 127 stay below lungs 255 however the file was saved). Any other palette: 1 for every index but the
    background's 0 (labelme, Pascal VOC: lung index 1 is dark red, of luminance 38). Other colour masks: 1 above the
    midpoint of the luminances held (all when there is one, if it is not black). Gray modes as :func:`_raster_gray`.
    """
    mode = img.mode
    if mode in ("P", "PA"):
        index = np.asarray(img)
        index = index[..., 0] if index.ndim == 3 else index  # PA: (index, alpha)
        palette = np.zeros((256, 3), np.uint8)  # an index past a short palette is black, as Pillow converts it
        entries = np.asarray(img.getpalette() or [], np.uint8).reshape(-1, 3)[:256]
        palette[: len(entries)] = entries
        used = palette[np.bincount(index.ravel(), minlength=256) > 0]
        if (used == used[:, :1]).all():
            return palette[index, 0].astype(np.float32)
        return (index > 0).astype(np.float32)
    if mode in (*_RGB_MODES, "YCbCr"):
        rgb = np.asarray(img.convert("RGB") if mode == "YCbCr" else img)[..., :3]
        if (rgb == rgb[..., :1]).all():
            return rgb[..., 0].astype(np.float32)
        luma = _luminance(rgb)
        lo, hi = float(luma.min()), float(luma.max())
        return (luma > (lo + hi) / 2 if lo < hi else luma > 0).astype(np.float32)
    return _raster_gray(img, label, source)


# --- helpers --------------------------------------------------------------------------------------------------------


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, the weights the paper folds ImageNet filters with; float32, one channel at a time.

    Converting the whole (H, W, 3) array to float64 first would need 24 bytes a pixel on top of the image.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an RGB array of shape (H, W, 3), got {rgb.shape}")
    out = rgb[..., 0].astype(np.float32) * np.float32(0.2989)
    out += rgb[..., 1].astype(np.float32) * np.float32(0.5870)
    out += rgb[..., 2].astype(np.float32) * np.float32(0.1140)
    return out


#: The sample ranges a raster mask's largest value is placed in: 1 and 8 bits, and the 10, 12 and 14 bits a
#: radiograph's samples are stored in (DICOM Bits Stored), which exporters keep when they write a mask in 16 bits.
_MASK_BITS = (1, 8, 10, 12, 14)


def _binarize(arr: np.ndarray, header: dict, lo: float, hi: float) -> np.ndarray:
    """Inside: for a raster file of 1, 8 or 16 bits (its values as :func:`_raster_mask` reads them), above half the
    smallest of the :data:`_MASK_BITS` or the 16-bit range that holds its largest value, so that 0/255 in a 16-bit
    file is cut at 127.5, a 12-bit 0/4095 at 2047.5, and 0/127 (V7 Labs' devices) in any is empty; a file without
    such a range (floating-point or 32-bit TIFF, DICOM after its LUTs) above the midpoint of its own values, or all
    inside when they are one positive value.
    """
    if header["format"] in _PIL_FORMATS and header["bits_stored"] in (1, 8, 16):  # the raster mode's bits
        bits = next((b for b in _MASK_BITS if hi <= 2**b - 1), 16)
        return arr > (2.0**bits - 1) / 2
    if lo == hi:
        return np.full(arr.shape, hi > 0, dtype=bool)
    return arr > (lo + hi) / 2


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
