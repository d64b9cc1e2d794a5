"""Property-based fuzzing of covidcxr.io.read_image: any bytes end in an image or a typed refusal.

Inputs are real files written here (DICOM in several encodings, PNG, JPEG) mutated by hypothesis: bit flips, byte
edits, cuts, insertions, header fields set to odd or huge values (DICOM Rows/Columns/BitsAllocated/NumberOfFrames/
PhotometricInterpretation..., PNG IHDR, JPEG SOF, JPEG 2000 SIZ), and random bytes behind a format's magic. Each read
runs in a separate worker process that reports the outcome and its peak memory, so that a crash of a C decoder, a
hang (no answer within ``TIMEOUT_S``) or a decoded bomb (peak RSS above ``MEMORY_BOUND``) fails the test instead of
the test run. Derandomized: the same cases every run.
"""

from __future__ import annotations

import io as stdio
import json
import selectors
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.uid import JPEG2000, DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit

from covidcxr import io
from tests.test_io import gray8, make_dicom, phantom, png_bytes

pytestmark = pytest.mark.fuzz  # a bounded, derandomized fuzz of read_image in worker processes

ROOT = Path(__file__).resolve().parents[1]
NAME = "fuzz.bin"
MAX_PIXELS = 1_000_000  # the worker's limit: a legitimate read stays far below MEMORY_BOUND
MEMORY_BOUND = 128 << 20  # peak RSS growth over the warmed-up worker; decoding a 6000x6000 image needs ~180 MB
TIMEOUT_S = 20.0  # per read; a valid read of these small files takes milliseconds

# The worker: length-prefixed inputs on stdin, one JSON line per input on a private copy of stdout (fd 1 itself goes
# to stderr, so that a C library printing to stdout cannot corrupt the protocol). Two max_pixels values are orders,
# not limits, so that a test can check the harness catches what it is there to catch: HANG (sleep) and DIE (SIGKILL,
# as a crashing C decoder dies).
HANG, DIE = 0, 2**64 - 1
WORKER = r"""
import json, os, resource, signal, struct, sys, time
out = os.fdopen(os.dup(1), "wb", buffering=0)
os.dup2(2, 1)
import numpy as np
from covidcxr import io
inp = sys.stdin.buffer


def peak_rss():
    # VmHWM belongs to this process's own address space; ru_maxrss is carried over from the parent across fork and
    # exec, so a large pytest process would hide any growth here.
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
while True:
    head = inp.read(12)
    if len(head) < 12:
        break
    size, max_pixels = struct.unpack("<IQ", head)
    data = inp.read(size)
    if max_pixels == HANG:
        time.sleep(3600)
    if max_pixels == DIE:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        arr, header = io.read_image(data, max_pixels=max_pixels, name=NAME_REPR)
        reply = {"kind": "image", "shape": list(arr.shape), "dtype": str(arr.dtype),
                 "finite": bool(np.isfinite(arr).all()), "declared": [header["height"], header["width"]],
                 "fields": list(header)}
    except io.ImageReadError as err:
        reply = {"kind": "refused", "type": type(err).__name__, "reason": err.reason, "source": err.source,
                 "message": str(err)}
    except BaseException as err:
        reply = {"kind": "crash", "type": type(err).__name__, "message": str(err)[:500]}
    reply["peak_rss"] = peak_rss()
    out.write((json.dumps(reply) + "\n").encode())
""".replace("NAME_REPR", repr(NAME)).replace("HANG", str(HANG)).replace("DIE", str(DIE))


class Worker:
    """One reader process, restarted after a hang, a death or a failed case (:func:`_fuzz`); ``baseline`` is its peak
    RSS once warmed up."""

    def __init__(self, warm_up: list[bytes]) -> None:
        self.warm_up = warm_up
        self.proc: subprocess.Popen | None = None
        self.baseline = 0
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        for data in self.warm_up:  # imports, decoders and numpy's first allocations before the baseline
            self.baseline = self.read(data)["peak_rss"]

    def restart(self) -> None:
        self.stop()
        self.start()

    def read(self, data: bytes, max_pixels: int = MAX_PIXELS, timeout: float = TIMEOUT_S) -> dict:
        """The worker's reply for ``data``; AssertionError (and a fresh worker) on a hang or a death."""
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(struct.pack("<IQ", len(data), max_pixels) + data)
        self.proc.stdin.flush()
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            ready = selector.select(timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            gone = self.proc  # its return code, not the restarted worker's (None)
            if ready:  # end of file: the worker exited; its pipe can close a moment before it is reaped, so wait
                try:
                    what = f"worker died ({gone.wait(timeout=5)})"
                except subprocess.TimeoutExpired:
                    what = "worker closed its output and did not exit"
            else:
                what = f"no answer within {timeout:g} s (hang)"
            self.restart()
            raise AssertionError(f"read_image: {what} on {len(data)} bytes: {data[:64]!r}...")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()


def check(reply: dict, baseline: int, data: bytes) -> None:
    """The property: a finite float32 array of the declared shape, or a typed refusal naming the input; bounded
    memory."""
    where = f"on {len(data)} bytes starting {data[:48]!r}"
    assert reply["kind"] != "crash", f"read_image raised {reply['type']}: {reply['message']} {where}"
    if reply["kind"] == "image":
        assert reply["dtype"] == "float32" and reply["finite"], (reply, where)
        assert reply["shape"] == reply["declared"], (reply, where)
        assert reply["fields"] == list(io.HEADER_FIELDS), (reply, where)
    else:
        assert reply["reason"] and reply["source"] == NAME and reply["message"].startswith(f"{NAME}: "), reply
    growth = reply["peak_rss"] - baseline
    assert growth <= MEMORY_BOUND, f"peak memory grew by {growth >> 20} MB (bound {MEMORY_BOUND >> 20} MB) {where}"


# --- seeds: small valid files of every kind the readers take -------------------------------------------------------


def _dataset(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(stdio.BytesIO(data))


def _save(ds: pydicom.Dataset) -> bytes:
    buf = stdio.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # out-of-range values are the point
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _deflated(data: bytes) -> bytes:
    ds = _dataset(data)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return _save(ds)


def _voi_lut() -> pydicom.Sequence:
    item = pydicom.Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])
    item.add_new(0x00283006, "US", (np.sqrt(np.arange(4096)) * 1000).astype(int).tolist())
    return pydicom.Sequence([item])


def _seeds() -> dict[str, bytes]:
    anatomy = phantom(16, 16)
    img8 = Image.fromarray(gray8(16, 16))
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    small8 = dict(shape=(16, 16), bits_allocated=8, bits_stored=8)
    return {
        "dicom_mono2": make_dicom(anatomy),
        "dicom_mono1_window": make_dicom(4095 - anatomy, photometric="MONOCHROME1", WindowCenter=900, WindowWidth=800),
        "dicom_mono1_voi_lut": make_dicom(4095 - anatomy, photometric="MONOCHROME1", VOILUTSequence=_voi_lut()),
        "dicom_signed": make_dicom(anatomy - 2048, signed=True, RescaleSlope=2, RescaleIntercept=-100),
        "dicom_multiframe": make_dicom(np.stack([anatomy, anatomy + 50, anatomy + 100]), n_frames=3),
        "dicom_rgb": make_dicom(rgb, photometric="RGB", bits_allocated=8, bits_stored=8),
        "dicom_jpeg": make_dicom(None, transfer_syntax=JPEGBaseline8Bit, frames=[png_bytes(img8, "JPEG")], **small8),
        "dicom_j2k": make_dicom(None, transfer_syntax=JPEG2000, frames=[png_bytes(img8, "JPEG2000", no_jp2=True)],
                                **small8),
        "dicom_deflated": _deflated(make_dicom(anatomy)),
        "png_gray": png_bytes(img8),
        "png_16": png_bytes(Image.fromarray((anatomy * 16).astype(np.uint16))),
        "png_rgb": png_bytes(Image.fromarray(rgb)),
        "png_palette": png_bytes(Image.fromarray(rgb).quantize(colors=8)),
        "jpeg_gray": png_bytes(img8, "JPEG"),
        "jpeg_rgb": png_bytes(Image.fromarray(rgb), "JPEG"),
    }


SEEDS = _seeds()
DICOM_SEEDS = sorted(k for k in SEEDS if k.startswith("dicom"))
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\0" * 128 + b"DICM", b"GIF89a", b"BM", b"II*\x00", b"\xffO\xffQ",
         b"\x02\x00\x00\x00UL\x04\x00", b"\x08\x00\x05\x00CS"]


@pytest.fixture(scope="module")
def worker():
    w = Worker([SEEDS[k] for k in sorted(SEEDS)])
    yield w
    w.stop()


def fuzz(n: int) -> settings:
    """``n`` derandomized cases, no example database, no deadline (the worker's timeout bounds each case)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def _fuzz(worker: Worker, data: bytes, max_pixels: int = MAX_PIXELS) -> None:
    """One case: the worker's answer checked (:func:`check`); after a failure, a fresh worker for the next case,
    since the peak it reports (VmHWM) never goes down: past the memory bound once, every later case and every
    shrinking step would fail on that peak, and the example reported as minimal would not be the one at fault."""
    reply = worker.read(data, max_pixels)
    try:
        check(reply, worker.baseline, data)
    except AssertionError:
        worker.restart()
        raise


# --- byte-level mutations -------------------------------------------------------------------------------------------

# Taken modulo the file's length; scrambled because hypothesis favours small numbers, which would all hit the magic.
_position = st.integers(0, 2**24).map(lambda x: x * 2654435761 % 2**32)
_edit = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(0, 7)),
    st.tuples(st.just("set"), _position, st.integers(0, 255)),
    st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), _position, st.integers(1, 64)),
    st.tuples(st.just("cut"), _position),
)


def mutate(data: bytes, edits: list[tuple]) -> bytes:
    out = bytearray(data)
    for op, where, *arg in edits:
        at = where % len(out) if out else 0
        if op == "flip" and out:
            out[at] ^= 1 << arg[0]
        elif op == "set" and out:
            out[at] = arg[0]
        elif op == "insert":
            out[at:at] = arg[0]
        elif op == "delete":
            del out[at : at + arg[0]]
        elif op == "cut":
            del out[at:]
    return bytes(out)


@fuzz(300)
@given(seed=st.sampled_from(sorted(SEEDS)), edits=st.lists(_edit, min_size=1, max_size=6))
def test_mutated_files_end_in_an_image_or_a_typed_refusal(worker, seed, edits):
    _fuzz(worker, mutate(SEEDS[seed], edits))


@fuzz(100)
@given(magic=st.sampled_from(MAGIC), tail=st.binary(max_size=2048))
def test_random_bytes_behind_a_magic_number(worker, magic, tail):
    _fuzz(worker, magic + tail)


@fuzz(40)
@given(data=st.binary(max_size=1024))
def test_random_bytes(worker, data):
    _fuzz(worker, data)


# --- header fields set to odd values --------------------------------------------------------------------------------

_US = st.sampled_from([0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 31, 32, 33, 63, 64, 255, 4096, 30000, 65535])
_DICOM_FIELDS = {
    "Rows": _US, "Columns": _US, "BitsAllocated": _US, "BitsStored": _US, "HighBit": _US,
    "PixelRepresentation": st.integers(0, 2), "SamplesPerPixel": st.integers(0, 4),
    "PlanarConfiguration": st.integers(0, 2),
    "NumberOfFrames": st.sampled_from(["0", "1", "2", "3", "-1", "1000", "65536", "2147483647", "99999999999"]),
    "PhotometricInterpretation": st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL",
                                                  "YBR_FULL_422", "MONOCHROME3", "", "ARGB"]),
    "WindowCenter": st.sampled_from(["0", "-1", "1e308", "-1e308", "2048", "1e-300"]),
    "WindowWidth": st.sampled_from(["0", "1", "-5", "1e308", "4096", "0.5"]),
    "RescaleSlope": st.sampled_from(["0", "1", "-1", "1e308", "1e-308", "3"]),
    "RescaleIntercept": st.sampled_from(["0", "-1024", "1e308", "-1e308"]),
    "VOILUTFunction": st.sampled_from(["LINEAR", "SIGMOID", "LINEAR_EXACT", "BOGUS"]),
    "PresentationLUTShape": st.sampled_from(["IDENTITY", "INVERSE", "X"]),
}  # fmt: skip
_dicom_overrides = st.sets(st.sampled_from(sorted(_DICOM_FIELDS)), min_size=1, max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: _DICOM_FIELDS[k] for k in sorted(keys)})
)


@fuzz(200)
@given(seed=st.sampled_from(DICOM_SEEDS), overrides=_dicom_overrides, drop_pixels=st.booleans(),
       edits=st.lists(_edit, max_size=2))  # fmt: skip
def test_dicom_header_overrides_end_in_an_image_or_a_typed_refusal(worker, seed, overrides, drop_pixels, edits):
    ds = _dataset(SEEDS[seed])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in overrides.items():
            setattr(ds, keyword, value)
    if drop_pixels and len(ds.PixelData) > 32 and not ds.file_meta.TransferSyntaxUID.is_encapsulated:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3 * 2]  # fewer bytes than declared, still even
    _fuzz(worker, mutate(_save(ds), edits))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


_DIMENSION = st.sampled_from([16] * 6 + [0, 1, 2, 15, 17, 999, 1000, 1001, 65535, 65536, 100_000, 2**31 - 1,
                                         2**32 - 1])  # 16: the seeds' own size, so that some cases decode


@fuzz(120)
@given(seed=st.sampled_from(["png_gray", "png_16", "png_rgb", "png_palette"]), width=_DIMENSION, height=_DIMENSION,
       depth=st.sampled_from([0, 1, 2, 4, 8, 16, 3]), colour=st.sampled_from([0, 1, 2, 3, 4, 6, 7]),
       interlace=st.integers(0, 2))  # fmt: skip
def test_png_header_overrides(worker, seed, width, height, depth, colour, interlace):
    data = SEEDS[seed]
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    _fuzz(worker, data[:8] + _png_chunk(b"IHDR", ihdr) + data[33:])  # valid CRC: the decoder takes it


@fuzz(120)
@given(seed=st.sampled_from(["jpeg_gray", "jpeg_rgb", "dicom_jpeg", "dicom_j2k"]), width=_DIMENSION,
       height=_DIMENSION, precision=st.sampled_from([0, 1, 8, 12, 16, 255]), components=st.sampled_from([0, 1, 3, 4]))
def test_codestream_size_overrides(worker, seed, width, height, precision, components):
    """JPEG SOF (raw or inside DICOM) and JPEG 2000 SIZ (inside DICOM) declaring other sizes and layouts."""
    data = bytearray(SEEDS[seed])
    if "j2k" in seed:
        at = data.index(b"\xff\x4f\xff\x51")
        struct.pack_into(">II", data, at + 8, width, height)
        struct.pack_into(">II", data, at + 24, width, height)
        struct.pack_into(">H", data, at + 40, components)  # Csiz
    else:
        at = data.index(b"\xff\xc0")
        struct.pack_into(">BHHB", data, at + 4, precision, height & 0xFFFF, width & 0xFFFF, components)
    _fuzz(worker, bytes(data))


# --- the harness itself catches what it is there to catch -----------------------------------------------------------


def _png_of_ramps(width: int, height: int) -> bytes:
    """A valid 8-bit grayscale PNG of repeated 0..255 ramps (not constant: a reader cannot stop at a zero-variance
    check before converting it), compressed to a few hundred kB, streamed (never held decoded here)."""
    packer = zlib.compressobj(9)
    row = b"\x00" + (bytes(range(256)) * (width // 256 + 1))[:width]  # filter byte + pixels
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def test_harness_catches_a_decoded_bomb_and_a_hang():
    bomb = _png_of_ramps(6000, 6000)
    assert len(bomb) < 200_000
    fresh = Worker([SEEDS["png_gray"]])
    try:
        refused = fresh.read(bomb)  # at the worker's limit: refused from the header, nothing decoded
        assert refused["reason"] == "too_large"
        check(refused, fresh.baseline, bomb)
        decoded = fresh.read(bomb, max_pixels=10**8)  # a limit that lets it through: 36 MB + 144 MB float32
        assert decoded["kind"] == "image" and decoded["shape"] == [6000, 6000]
        with pytest.raises(AssertionError, match="peak memory grew"):
            check(decoded, fresh.baseline, bomb)
        with pytest.raises(AssertionError, match="hang"):
            fresh.read(b"", max_pixels=HANG, timeout=1.0)
        assert fresh.read(SEEDS["png_gray"])["kind"] == "image"  # restarted
    finally:
        fresh.stop()


def test_a_case_past_the_memory_bound_fails_alone_and_a_death_says_how():
    """The worker's peak (VmHWM) never goes down and the worker was kept after a case past the memory bound: every
    later case, and Hypothesis's shrinking, failed on that peak. A worker's death was reported with the restarted
    worker's return code (None)."""
    fresh = Worker([SEEDS["png_gray"]])
    try:
        with pytest.raises(AssertionError, match="peak memory grew"):
            _fuzz(fresh, _png_of_ramps(6000, 6000), max_pixels=10**8)  # 36 MB + 144 MB float32 decoded
        _fuzz(fresh, SEEDS["png_gray"])  # measured on its own peak, not the bomb's
        with pytest.raises(AssertionError, match=r"worker died \(-9\)"):
            fresh.read(SEEDS["png_gray"], max_pixels=DIE)
        _fuzz(fresh, SEEDS["png_gray"])  # restarted
    finally:
        fresh.stop()
