"""PACS round trip: chest radiographs in from a PACS over DICOMweb, DICOM results back into the same study.

For every CR/DX image of a study (QIDO-RS to find them, WADO-RS to fetch them), the worker scores the file through a
:data:`covidcxr.serving.Scorer` (the registered pyfunc, in this process or on a server) and stores back (STOW-RS):

* a Comprehensive SR (TID 1500 measurement report, made with highdicom) holding the COVID-19 probability, the label,
  the operating threshold, the projection, the lung area, the model's name and version, and, for an image that was
  not scored, the reason (for a scored one with a flag, such as out of distribution under ``ood_action: flag``, the
  flag); it references the source image (evidence, image library, measurement group source);
* for a scored image, a Secondary Capture of the Grad-CAM overlay (RGB), referencing the source image.

Both carry the source's patient and study modules (so they attach to the study) and new UIDs derived from the source SOP
Instance UID and the model's name and version: a result that is already in the study is not made again, so a second run
over the same studies adds nothing. The SC is stored before the SR: an image counts as done when its SR exists, and one
whose SC was stored but not its SR gets only its SR on the next pass, numbered as its SC where the PACS lists the SC's
number (:func:`pending_sources`). An image the scorer failed on (an internal error, or out of memory) gets neither: its
refusal says nothing of the image, and the next pass sends it again. Each image's outcome is its own: one that fails a
step (retrieval, scoring request, results, storage) costs the study's other images nothing, and is counted by step and
cause. Nothing identifying leaves this module except into the PACS: the log holds counts and hashed study and image ids,
and errors name the PACS endpoint (never its credentials) and the operation, never a UID.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import io as _bytes_io
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from covidcxr import serving, sites
from covidcxr.tracking import public_uri

log = logging.getLogger(__name__)

#: Modalities of the chest radiographs the worker scores.
MODALITIES: tuple[str, ...] = ("CR", "DX")
MANUFACTURER = "covidcxr"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
#: Environment variables holding the DICOMweb basic-auth credentials (read by the CLI, never flags or logs).
USER_ENV, PASSWORD_ENV = "COVIDCXR_PACS_USER", "COVIDCXR_PACS_PASSWORD"
#: HTTP statuses a scoring server answers through its proxy when it is down or overloaded: they stop the pass, as an
#: unreachable one does, unless the scorer answers a probe right after (then they were the study's); so does a "not
#: now" (NOT_NOW) still answered after the retries; any other error answer is the study's own failure.
SCORER_DOWN = frozenset({502, 503, 504})
#: HTTP statuses that say "not now" (request timeout, too many requests): retried like a 5xx, never the study's own
#: failure. A retried answer's Retry-After (at most serving.MAX_RETRY_AFTER seconds) replaces the backoff
#: (:func:`pause`).
RETRY_LATER = frozenset({408, 429})
#: HTTP statuses that say "not now" (service unavailable, request timeout, too many requests): the request was not
#: served. Scoring requests answered one are sent again as a PACS request is; a study that failed on one before its
#: images were scored (while the PACS or the scorer answers a probe) fails the pass but does not count toward
#: GIVE_UP_AFTER: an overload is no fault of the study, and nothing of it was scored (or logged) for nothing.
NOT_NOW = frozenset({503, *RETRY_LATER})
#: What highdicom raises for a header value it refuses (the text may quote the header: only the type is reported).
BUILD_ERRORS = (ValueError, TypeError, AttributeError, KeyError)
#: A study that failed this many consecutive passes of one worker process is not tried again by it (it stays counted
#: in failed_studies, and logged, every pass): a failure after scoring would otherwise score its images again, and add
#: their prediction-log records, on every pass, forever.
GIVE_UP_AFTER = 3
#: Third-party loggers that put URLs (hence UIDs) or server text in their records: kept quiet.
CHATTY_LOGGERS: tuple[str, ...] = ("dicomweb_client", "urllib3", "highdicom")

SCHEME = "99COVIDCXR"  # private coding scheme for the concepts no standard terminology has
CODES = {
    "procedure": Code("399208008", "SCT", "Plain chest X-ray"),
    "finding": Code("840539006", "SCT", "COVID-19"),
    "covid": Code("840539006", "SCT", "COVID-19"),
    "negative": Code("260385009", "SCT", "Negative"),
    "probability": Code("covid-prob", SCHEME, "COVID-19 probability"),
    "threshold": Code("threshold", SCHEME, "Operating threshold"),
    "ood_score": Code("ood-score", SCHEME, "Out-of-distribution score"),
    "ood_threshold": Code("ood-threshold", SCHEME, "Out-of-distribution threshold"),
    "lung_area": Code("lung-area", SCHEME, "Lung area fraction"),
    "projection_probability": Code("proj-prob", SCHEME, "Projection probability"),
    "label": Code("label", SCHEME, "COVID-19 label"),
    "projection": Code("111031", "DCM", "Image View"),
    "status": Code("status", SCHEME, "Scoring status"),
    "scored": Code("scored", SCHEME, "Scored"),
    "not_scored": Code("not-scored", SCHEME, "Not scored"),
    "reason": Code("reason", SCHEME, "Reason not scored"),
    "flag": Code("flag", SCHEME, "Result flag"),  # a scored image's caveat (the served entry's reason)
}
UNITS = {"probability": Code("{probability}", "UCUM", "probability"), "fraction": Code("1", "UCUM", "no units")}
#: What the source says of the lossy compression its pixels went through, which the overlay drawn on them inherits.
LOSSY_KEYWORDS = ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod")
#: Transfer syntaxes whose pixels may have gone through lossy compression, whatever the header says: JPEG baseline
#: and extended, JPEG-LS near-lossless (.81), the JPEG 2000 ones that allow irreversible coding at the encoder's
#: choice (.91, Part 2 multi-component .93, High-Throughput .203), JPEG XL (.112) and JPEG XL JPEG recompression
#: (.111: a lossless repacking of a JPEG baseline or extended bitstream, whose pixels are lossy). The lossless-only
#: ones (JPEG lossless .57/.70, JPEG-LS .80, JPEG 2000 .90/.92, HTJ2K .201/.202, JPEG XL .110) leave it to the
#: source's own header.
LOSSY_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
                            "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203",
                            "1.2.840.10008.1.2.4.111", "1.2.840.10008.1.2.4.112"})
#: The letters of a PatientOrientation value (PS3.3 C.7.6.1.1.1): anterior, posterior, right, left, head, foot.
ORIENTATION_LETTERS = frozenset("APRLHF")


class PacsError(RuntimeError):
    """The PACS refused or failed a request; the message names the endpoint and the operation, never a UID.
    ``detail`` says what went wrong in a few words (``HTTP 404``, ``refused (failure reason 272)``), for counts by
    cause; ``status`` is the HTTP status that was answered last, if any."""

    def __init__(self, message: str, detail: str = "failed", status: int | None = None) -> None:
        super().__init__(message)
        self.detail, self.status = detail, status


class PacsUnavailable(PacsError, ConnectionError):
    """The PACS did not answer (refused, timed out or 5xx) after the bounded retries."""


class WorkerBusy(RuntimeError):
    """Another worker holds the lock of the same PACS and scorer (a cron pass still running when the next starts)."""


class ModelChanged(RuntimeError):
    """The scorer answered with another model version than the one the results' UIDs were derived from."""


class StudyFailed(RuntimeError):
    """One study could not be completed this pass (the scorer failed on its images...): the message names the step and
    the error type, never a UID or the text of an error (which may quote a header or a request). ``counts``: whether
    the failure counts toward :data:`GIVE_UP_AFTER` (not when all it met was a "not now" before scoring)."""

    def __init__(self, message: str, counts: bool = True) -> None:
        super().__init__(message)
        self.counts = counts


class Unreachable(RuntimeError):
    """The PACS or the scorer failed one of a study's requests and did not answer a probe right after: the pass stops.
    ``error`` is what the request raised."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class ModelId:
    """The model whose results are written: its registered name and the version that scores."""

    name: str
    version: str


@dataclass(frozen=True)
class Source:
    """One CR/DX image of a study in the PACS."""

    study_uid: str
    series_uid: str
    sop_uid: str
    number: int  # its results' InstanceNumber: its stored SC's, else after every number used in the result series
    sc_stored: bool = False  # its SC is in the study (a pass stored it, then failed its SR): not stored again


@dataclass
class Summary:
    """Counts of one pass (no identifiers): what was found, scored, refused, skipped and stored."""

    studies: int = 0
    images: int = 0
    already_done: int = 0
    scored: int = 0
    refused: int = 0
    stored_sr: int = 0
    stored_sc: int = 0
    deferred: int = 0  # images the scorer failed on (serving.RETRY_REASONS): no result, sent again on the next pass
    unusable: int = 0  # images whose header no result can be made from: not scored, their study failed
    failed_images: int = 0  # images a step failed on (retrieval, scoring request, results, storage): sent again
    failed_studies: int = 0
    skipped_studies: int = 0  # of failed_studies: not tried, having failed GIVE_UP_AFTER passes in a row
    reasons: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # failed_images by "step: cause" (no identifiers)

    def to_dict(self) -> dict:
        return asdict(self)


def hashed(uid: str) -> str:
    """A short one-way id of a UID, for log lines that must tell studies apart without identifying them."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


def quiet_third_party_loggers() -> None:
    """dicomweb-client logs request URLs (study and instance UIDs) at INFO/DEBUG: raise those loggers to ERROR."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


# --- DICOMweb ------------------------------------------------------------------------------------------------------


class DicomWeb:
    """A DICOMweb PACS (QIDO-RS, WADO-RS, STOW-RS) with bounded retries and errors that name only the endpoint."""

    def __init__(self, url: str, *, user: str | None = None, password: str | None = None, timeout: float = 30.0,
                 retries: int = 3, backoff: float = 1.0, page_size: int = 500, max_pages: int = 100,
                 sleep: Callable[[float], None] = time.sleep, ca_bundle: str | None = None) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        quiet_third_party_loggers()
        self.endpoint = public_uri(url).rstrip("/")
        self.retries, self.backoff, self.sleep = int(retries), float(backoff), sleep  # the scorer's requests' too
        self.page_size, self.max_pages = int(page_size), int(max_pages)
        session = requests.Session()
        session.trust_env = False  # no proxy, netrc or CA bundle picked up behind the caller's back
        if ca_bundle is not None:  # a hospital's own certificate authority (PEM), given explicitly
            if not Path(ca_bundle).is_file():
                raise PacsError(f"CA bundle {ca_bundle}: no such file")
            session.verify = str(ca_bundle)
        if user is not None:
            session.auth = (user, password or "")
        self._warnings: list[str] = []  # the Warning headers of the answers since search() last cleared it
        session.hooks["response"].append(self._note_warning)
        self.client = DICOMwebClient(self.endpoint, session=session, timeout=timeout)
        self.client.set_http_retry_params(retry=False)  # one retry loop, ours (bounded, with backoff)

    def _call(self, operation: str, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)``, retried on refused/timed-out connections and 5xx, 408 and 429 answers (after
        their Retry-After where they give one), else a typed error."""
        import requests

        problem, status, wait = "", None, None
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(pause(attempt, self.backoff, wait))
            wait = None
            try:
                return fn(*args, **kwargs)
            except requests.HTTPError as err:
                status = err.response.status_code if err.response is not None else 0
                if 0 < status < 500 and status not in RETRY_LATER:
                    hint = " (check $COVIDCXR_PACS_USER/$COVIDCXR_PACS_PASSWORD)" if status in (401, 403) else ""
                    raise PacsError(f"DICOMweb server {self.endpoint} answered HTTP {status} to {operation}{hint}",
                                    f"HTTP {status}", status) from None
                headers = err.response.headers if err.response is not None else {}
                wait = serving.retry_after(headers.get("Retry-After"))
                problem = f"HTTP {status}"
            except requests.exceptions.SSLError:  # no retry mends an untrusted certificate
                raise PacsError(f"DICOMweb server {self.endpoint}: its TLS certificate is not trusted ({operation}); "
                                "give its certificate authority as --pacs-ca-bundle", "untrusted certificate") \
                    from None
            except requests.exceptions.JSONDecodeError:  # a login or error page answered 200, a cut-off answer
                raise PacsError(f"DICOMweb server {self.endpoint} answered {operation} with no readable JSON (an "
                                "HTML page, or an answer cut off?)", "no readable JSON") from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
                problem, status = type(err).__name__, None  # an answer cut off mid-transfer (ChunkedEncodingError) too
            except requests.RequestException as err:  # too many redirects, an invalid URL...: no retry mends them
                raise PacsError(f"DICOMweb server {self.endpoint}: {operation} failed ({type(err).__name__})",
                                type(err).__name__) from None
        raise PacsUnavailable(f"DICOMweb server {self.endpoint} is unreachable or busy ({operation}): {problem} after "
                              f"{self.retries + 1} attempts", f"{problem} after {self.retries + 1} attempts", status)

    def answers(self) -> bool:
        """Whether the PACS answers a cheap QIDO-RS search now (one request, no retries): tells a failure of one
        study's request from a PACS that is down."""
        try:
            self.client.search_for_studies(limit=1, fields=["StudyInstanceUID"])
        except Exception:  # noqa: BLE001 - whatever went wrong, it did not answer
            return False
        return True

    def _note_warning(self, response, *args, **kwargs) -> None:
        """A response hook: keeps the answer's Warning header (PS3.18: 299 when results were left out)."""
        if "Warning" in response.headers:
            self._warnings.append(str(response.headers["Warning"]))

    def search(self, operation: str, fn: Callable, **kwargs) -> list[dict]:
        """A QIDO-RS search, paged with limit/offset until a page is empty or brings nothing new, at most
        ``max_pages`` requests: a server may answer fewer than ``limit`` results a page (PS3.18), so a short page is
        not the last. A full page with nothing new (a server that ignores ``offset``) and a ``Warning: 299`` answer
        (results left out) are logged: the search may be incomplete."""
        seen: dict[str, dict] = {}
        offset, warned = 0, False
        for _ in range(self.max_pages):
            self._warnings.clear()
            items = self._call(operation, fn, limit=self.page_size, offset=offset, **kwargs)
            if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
                raise PacsError(f"DICOMweb server {self.endpoint} answered {operation} with JSON that is no list of "
                                "DICOM JSON records")
            if not warned and any(w.strip().startswith("299") for w in self._warnings):
                warned = True  # its text is withheld: it may quote the request
                log.warning("%s: %s answered Warning 299 (results left out); paging on", operation, self.endpoint)
            fresh = {json.dumps(item, sort_keys=True): item for item in items}
            if not fresh.keys() - seen.keys():
                if len(items) >= self.page_size:
                    log.warning("%s: a full page of %d results brought nothing new at offset %d (does %s ignore "
                                "offset?): results may be missing", operation, len(items), offset, self.endpoint)
                break
            seen.update(fresh)
            offset += len(items)
        else:
            log.warning("%s: stopped after %d pages of up to %d results; narrow the search (--since)", operation,
                        self.max_pages, self.page_size)
        return list(seen.values())

    def find_studies(self, since: dt.date | None = None) -> list[str]:
        """Study Instance UIDs of the studies holding CR or DX series (from ``since``'s study date on)."""
        found: dict[str, None] = {}
        for modality in MODALITIES:
            filters = {"ModalitiesInStudy": modality, **({"StudyDate": f"{since:%Y%m%d}-"} if since else {})}
            for item in self.search("QIDO-RS study search", self.client.search_for_studies, search_filters=filters,
                                    fields=["StudyInstanceUID"]):
                found.setdefault(qido_value(item, "StudyInstanceUID"))
        return [uid for uid in found if uid]

    def study_instances(self, study_uid: str) -> list[dict]:
        """Every instance of a study as ``{SeriesInstanceUID, SOPInstanceUID, Modality, InstanceNumber}``."""
        keys = ("SeriesInstanceUID", "SOPInstanceUID", "Modality", "InstanceNumber")
        items = self.search("QIDO-RS instance search", self.client.search_for_instances, study_instance_uid=study_uid,
                            fields=list(keys))
        return [{k: qido_value(item, k) for k in keys} for item in items]

    def retrieve(self, source: Source) -> Dataset:
        """The instance as stored (its own transfer syntax: the PACS need not transcode); PacsError when the answer
        holds no readable instance."""
        operation = "WADO-RS instance retrieval"
        try:
            return self._call(operation, self.client.retrieve_instance, source.study_uid, source.series_uid,
                              source.sop_uid, media_types=(("application/dicom", "*"),))
        except PacsError:
            raise
        except Exception as err:  # noqa: BLE001 - a part that is not DICOM (InvalidDicomError), no part (IndexError)...
            raise PacsError(f"DICOMweb server {self.endpoint} answered {operation} with no readable DICOM instance "
                            f"({type(err).__name__})", f"no readable DICOM ({type(err).__name__})") from None

    def store(self, datasets: Sequence[Dataset], study_uid: str) -> None:
        """STOW-RS the datasets into their study; raises PacsError when the PACS refuses any of them."""
        if not datasets:
            return
        answer = self._call("STOW-RS store", self.client.store_instances, list(datasets), study_uid)
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise PacsError(f"DICOMweb server {self.endpoint} refused {len(failed)} of {len(datasets)} instances "
                            f"(failure reasons {', '.join(reasons)})", f"refused (failure reason {', '.join(reasons)})")


def pause(attempt: int, backoff: float, asked: float | None) -> float:
    """The seconds to wait before try ``attempt`` (1 for the first retry) of a PACS or scoring request: what the last
    answer's Retry-After asked (``asked``, read by :func:`covidcxr.serving.retry_after`; capped here too, whoever built
    the error), else ``backoff`` doubling from try to try."""
    return backoff * 2 ** (attempt - 1) if asked is None else min(asked, serving.MAX_RETRY_AFTER)


def qido_value(item: dict, keyword: str) -> str | None:
    """One value of a DICOM JSON (QIDO) record, as a string."""
    tag = f"{pydicom.datadict.tag_for_keyword(keyword):08X}"
    values = (item.get(tag) or {}).get("Value") or [None]
    return None if values[0] is None else str(values[0])


# --- what to do in a study ---------------------------------------------------------------------------------------


def result_uids(sop_uid: str, model: ModelId) -> dict[str, str]:
    """The SR's and the SC's SOP Instance UIDs for one source image and model (deterministic: idempotent runs)."""
    return {kind: generate_uid(entropy_srcs=["covidcxr", kind, sop_uid, model.name, model.version])
            for kind in ("sr", "sc")}


def series_uids(study_uid: str, model: ModelId) -> dict[str, str]:
    """One SR series and one overlay series per study and model version."""
    return {kind: generate_uid(entropy_srcs=["covidcxr", f"{kind}-series", study_uid, model.name, model.version])
            for kind in ("sr", "sc")}


def pending_sources(instances: Iterable[dict], study_uid: str, model: ModelId) -> tuple[list[Source], int]:
    """The CR/DX images of a study whose SR by ``model`` is not in it yet, and how many are already done. A pending
    image whose SC is in the study already (a pass stored it, then failed its SR) is marked ``sc_stored``, so that
    the SC is not stored again, and its SR takes the SC's number (as the PACS lists it), as an image's results share
    one. The others are numbered (their results' InstanceNumber, the SR's and the SC's alike) from the highest number
    already used in ``model``'s two result series of the study on: numbered by their place among the study's images,
    an image that arrived (or was retried) after others were done took a number one of theirs had. No number a stored
    result holds is given to another image's results; a number given to an image that stored nothing may be given
    again on a later pass (to it or another image), or stay unused once a higher one is stored. The numbers are the
    ones ``instances`` lists (the PACS's instance search): a result listed without one is passed over (an SC's SR is
    numbered anew, and its number may be given to another image's results), and when none is listed every pass
    numbers its images from 1."""
    instances = list(instances)
    existing = {item["SOPInstanceUID"] for item in instances}
    results = set(series_uids(study_uid, model).values())
    numbers = {i["SOPInstanceUID"]: whole_number(i.get("InstanceNumber")) for i in instances
               if i.get("SeriesInstanceUID") in results}
    last = max(numbers.values(), default=0)
    images = sorted((i["SeriesInstanceUID"], i["SOPInstanceUID"]) for i in instances
                    if (i.get("Modality") or "").upper() in MODALITIES)
    sources: list[Source] = []
    for series, sop in images:
        uids = result_uids(sop, model)
        if uids["sr"] in existing:
            continue
        number = numbers.get(uids["sc"], 0)
        if number < 1:  # no SC stored, or one whose number the PACS does not list: a new number
            last = number = last + 1
        sources.append(Source(study_uid, series, sop, number, sc_stored=uids["sc"] in existing))
    return sources, len(images) - len(sources)


def whole_number(value: str | None) -> int:
    """An InstanceNumber (IS) as QIDO-RS answers it; 0 when absent or unreadable."""
    try:
        return int(str(value).strip())
    except ValueError:
        return 0


#: The type 2 patient and study attributes highdicom copies into the results (present, and empty when unknown).
COPIED_TYPE2: tuple[str, ...] = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                                 "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")


def header_only(ds: Dataset) -> Dataset:
    """The dataset without its pixel data (what the results copy and reference), with the type 2 patient and study
    attributes that highdicom reads present even when the source left them out, and empty where the source's value is
    one highdicom refuses (a date such as '2020-01-01', a time such as '12:30:00', a sex other than M, F or O): it
    would refuse the results of every image of the study, on every pass, and a value is not guessed at. Pixels stored
    in a lossy-capable transfer syntax (:data:`LOSSY_SYNTAXES`) are marked LossyImageCompression 01 unless the header
    says 01 already, for the overlay drawn on them: a header that is silent or says 00 (often copied from the
    original before it was compressed) is not taken for proof that they are lossless."""
    pixel_tags = {0x7FE00010, 0x7FE00008, 0x7FE00009}
    header = Dataset({tag: elem for tag, elem in ds.items() if tag not in pixel_tags})
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax in LOSSY_SYNTAXES and header.get("LossyImageCompression") != "01":
        header.add_new("LossyImageCompression", "CS", "01")  # a new element: the source keeps its own
    for keyword in COPIED_TYPE2:
        if keyword not in header:
            setattr(header, keyword, None)
        elif not copyable(header[keyword]):
            header.add_new(header[keyword].tag, header[keyword].VR, None)  # a new element: the source keeps its own
    return header


def copyable(element: pydicom.DataElement) -> bool:
    """Whether highdicom takes a copied type 2 attribute's value: a DA or TM that pydicom reads, a sex of M, F or O."""
    value = element.value
    if value in (None, ""):
        return True
    if element.keyword == "PatientSex":
        return str(value) in ("M", "F", "O")
    parse = {"DA": pydicom.valuerep.DA, "TM": pydicom.valuerep.TM}.get(element.VR)
    try:
        return parse is None or parse(value) is not None
    except (TypeError, ValueError):
        return False


def file_base64(ds: Dataset) -> str:
    """The instance as the base64 DICOM file a scorer takes."""
    buffer = _bytes_io.BytesIO()
    pydicom.dcmwrite(buffer, ds)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --- the DICOM results ---------------------------------------------------------------------------------------------


def build_sr(header: Dataset, entry: dict, model: ModelId, series_uid: str, sop_uid: str, instance_number: int):
    """The Comprehensive SR (TID 1500) of one image's entry: scored with its figures, or not scored with why; with
    the two thresholds that decided (the operating one, and the out-of-distribution one the OOD score was held to) and
    whose they were (the model's, the site's or the request's: the algorithm's parameters)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    numbers = [("probability", "covid_probability", "probability"), ("threshold", "threshold", "probability"),
               ("lung_area", "lung_area_fraction", "fraction"),
               ("projection_probability", "projection_probability", "probability"),
               ("ood_score", "ood_score", "fraction"), ("ood_threshold", "ood_threshold", "fraction")]
    measurements = [hd.sr.Measurement(name=CODES[code], value=float(entry[key]), unit=UNITS[unit])
                    for code, key, unit in numbers if entry.get(key) is not None]
    evaluations = [hd.sr.QualitativeEvaluation(CODES["status"], CODES["scored" if entry["accepted"] else "not_scored"])]
    if entry.get("label"):
        evaluations.append(hd.sr.QualitativeEvaluation(CODES["label"], CODES.get(entry["label"]) or
                                                       Code(entry["label"], SCHEME, entry["label"])))
    if entry.get("projection"):
        evaluations.append(hd.sr.QualitativeEvaluation(
            CODES["projection"], Code(entry["projection"], SCHEME, entry["projection"].capitalize())))
    if not entry["accepted"]:
        reason = entry.get("reason") or "unknown"
        evaluations.append(hd.sr.QualitativeEvaluation(CODES["reason"], Code(reason, SCHEME, _meaning(reason))))
    elif entry.get("reason"):  # answered with a flag: out of distribution under ood_action flag
        reason = entry["reason"]
        evaluations.append(hd.sr.QualitativeEvaluation(CODES["flag"], Code(reason, SCHEME, _meaning(reason))))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[sop_uid, "tracking"]),
                                                     identifier="COVID-19 score"),
        finding_type=CODES["finding"],
        algorithm_id=hd.sr.AlgorithmIdentification(name=model.name, version=model.version,
                                                   parameters=[f"{key}={entry[key]}" for key in
                                                               ("threshold", "ood_threshold", "thresholds_from")
                                                               if entry.get(key) is not None]),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(header)],
        measurements=measurements or None, qualitative_evaluations=evaluations,
    )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["covidcxr", "device", model.name, model.version]),
        name=model.name, manufacturer_name=MANUFACTURER, model_name=f"{model.name} v{model.version}")
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device)),
        procedure_reported=CODES["procedure"], imaging_measurements=[group],
        referenced_images=[header] if library_describes(header) else None)
    return hd.sr.ComprehensiveSR(
        evidence=[header], content=report[0], series_instance_uid=series_uid, series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=instance_number, manufacturer=MANUFACTURER, is_complete=True,
        series_description=f"COVID-19 AI result, {model.name} v{model.version} (research use)"[:64])


def library_describes(header: Dataset) -> bool:
    """Whether the SR's image library can describe the source: for a projection radiograph highdicom reads two
    patient orientation values (type 2: often empty) and the imager pixel spacing (type 3: often absent, as in both
    real CRs of the corpus). Without them the SR leaves the library out; the measurement group and the evidence still
    reference the image."""
    return all(len(header.get(keyword) or ()) == 2 for keyword in ("PatientOrientation", "ImagerPixelSpacing"))


def build_sc(header: Dataset, overlay_png_b64: str, model: ModelId, series_uid: str, sop_uid: str,
             instance_number: int):
    """The RGB Secondary Capture of one image's Grad-CAM overlay, referencing the source image."""
    import highdicom as hd
    from PIL import Image

    rgb = np.asarray(Image.open(_bytes_io.BytesIO(base64.b64decode(overlay_png_b64))).convert("RGB"))
    orientation = [str(v) for v in (header.get("PatientOrientation") or [])]
    known = len(orientation) == 2 and all(v and set(v) <= ORIENTATION_LETTERS for v in orientation)
    sc = hd.sc.SCImage.from_ref_dataset(
        header, rgb, "RGB", 8, "PATIENT", series_uid, SC_SERIES_NUMBER, sop_uid, instance_number, MANUFACTURER,
        patient_orientation=tuple(orientation) if known else ("L", "F"),
        series_description=f"COVID-19 AI heat map, {model.name} v{model.version} (research use)"[:64])
    if not known:
        sc.PatientOrientation = None  # type 2: unknown, as the source gives none (or none highdicom takes)
    reference = Dataset()
    reference.ReferencedSOPClassUID = header.SOPClassUID
    reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    sc.DerivationDescription = f"Grad-CAM overlay of the COVID-19 classifier {model.name} v{model.version}"[:1024]
    sc.ImageType = ["DERIVED", "SECONDARY"]
    # The overlay is drawn on the source's pixels: text burned into them, and any lossy compression they went through,
    # carry into it. A source that does not say gets YES: only pixel data checked clean may say NO (PS3.15 E.3.1).
    sc.BurnedInAnnotation = str(header.get("BurnedInAnnotation") or "YES")
    for keyword in LOSSY_KEYWORDS:
        if header.get(keyword) not in (None, ""):
            setattr(sc, keyword, header.get(keyword))
    return sc


def _meaning(reason: str) -> str:
    """A reason code's human text, cut to a DICOM code meaning's 64 characters."""
    text = serving.REASONS.get(reason, reason.replace("_", " "))
    return text if len(text) <= 64 else text[:61] + "..."


# --- the worker ----------------------------------------------------------------------------------------------------


def process_study(pacs: DicomWeb, study_uid: str, score: serving.Scorer, model: ModelId, summary: Summary, *,
                  batch_size: int = 8) -> None:
    """Score every CR/DX image of the study without a result of ``model`` and store its SC (for a scored image) and
    its SR, image by image. Each image's outcome is its own: one the PACS will not deliver, whose header no result can
    be made from (:func:`header_problem`: not scored), that the scorer failed on (:data:`serving.RETRY_REASONS`, or
    its request failed), whose results cannot be made or that the PACS will not store gets no result (at most its SC)
    while the study's other images get theirs, is counted and its hashed id logged, and is tried again on the next
    pass; once the others are done, it fails the study (:class:`StudyFailed`, with the counts by step and cause). A
    PACS or scorer that fails a request and does not answer a probe right after raises :class:`Unreachable`."""
    pending, done = pending_sources(pacs.study_instances(study_uid), study_uid, model)
    summary.images += len(pending) + done
    summary.already_done += done
    series = series_uids(study_uid, model)
    deferred: dict[str, int] = {}
    unusable: dict[str, int] = {}  # images whose header no result can be made from, by the error's type
    failed: dict[str, int] = {}  # images a step failed on, by "step: cause"
    counts = False  # whether a failure counts toward GIVE_UP_AFTER: all but a "not now" before scoring

    def fail(step: str, err: Exception, sources: Sequence[Source]) -> None:
        """``sources`` get no result this pass: ``step`` failed with ``err``."""
        nonlocal counts
        if isinstance(err, (PacsUnavailable, serving.ScoringError, OSError)) and not still_answers(pacs, score, err):
            raise Unreachable(err)
        why = f"{step}: {cause(err)}"
        counts = counts or step not in ("retrieval", "scoring") or getattr(err, "status", None) not in NOT_NOW
        failed[why] = failed.get(why, 0) + len(sources)
        summary.failures[why] = summary.failures.get(why, 0) + len(sources)
        summary.failed_images += len(sources)
        for source in sources:
            log.warning("study %s: image %s gets no result this pass (%s)", hashed(study_uid), hashed(source.sop_uid),
                        why)

    for start in range(0, len(pending), batch_size):
        usable: list[tuple[Source, Dataset]] = []  # (source, header) of those to score
        files: list[str] = []
        for source in pending[start:start + batch_size]:
            try:
                dataset = pacs.retrieve(source)
                header, file = header_only(dataset), file_base64(dataset)
            except (PacsError, *BUILD_ERRORS) as err:
                fail("retrieval", err, [source])
                continue
            problem = header_problem(header, model)
            if problem is not None:
                unusable[problem] = unusable.get(problem, 0) + 1
                log.warning("study %s: image %s not scored: no result can be made from its header (%s)",
                            hashed(study_uid), hashed(source.sop_uid), problem)
                continue
            usable.append((source, header))
            files.append(file)
        if not usable:
            continue
        try:
            entries = score_files(score, files)
        except (StudyFailed, serving.ScoringError, OSError) as err:  # the request's: its images', not the study's
            fail("scoring", err, [source for source, _ in usable])
            continue
        finally:
            del files
        answered = {(str(e.get("model_name") or model.name), str(e["model_version"])) for e in entries}
        if answered != {(model.name, model.version)}:
            raise ModelChanged(f"the scorer answered with {', '.join(f'{n} v{v}' for n, v in sorted(answered))}, "
                               f"expected {model.name} v{model.version}: the served model changed during the run; "
                               "run again")
        for (source, header), entry in zip(usable, entries):
            uids, number = result_uids(source.sop_uid, model), source.number
            if not entry["accepted"] and entry.get("reason") in serving.RETRY_REASONS:  # not the image's failure
                deferred[entry["reason"]] = deferred.get(entry["reason"], 0) + 1
                continue
            if entry["accepted"]:
                summary.scored += 1
            else:
                summary.refused += 1
                reason = entry.get("reason") or "unknown"
                summary.reasons[reason] = summary.reasons.get(reason, 0) + 1
            try:
                sc = None
                if entry["accepted"] and entry.get(serving.GRADCAM_FIELD) and not source.sc_stored:
                    sc = build_sc(header, entry[serving.GRADCAM_FIELD], model, series["sc"], uids["sc"], number)
                sr = build_sr(header, entry, model, series["sr"], uids["sr"], number)
            except BUILD_ERRORS as err:  # what header_problem did not foresee; the error's text may quote the header
                fail("results", err, [source])
                continue
            try:
                if sc is not None:  # the overlay first: an image is done once its SR is stored
                    pacs.store([sc], study_uid)
                    summary.stored_sc += 1
                pacs.store([sr], study_uid)
                summary.stored_sr += 1
            except PacsError as err:
                fail("storage", err, [source])
    log.log(logging.INFO if pending else logging.DEBUG, "study %s: %d CR/DX image(s), %d already done, %d processed",
            hashed(study_uid), len(pending) + done, done, len(pending))
    summary.deferred += sum(deferred.values())
    summary.unusable += sum(unusable.values())
    why = []
    if deferred:
        why.append(f"the scorer failed on {sum(deferred.values())} image(s) "
                   f"({', '.join(f'{r} {n}' for r, n in sorted(deferred.items()))}): no result written")
    if unusable:
        why.append(f"no result can be made from the header of {sum(unusable.values())} image(s) "
                   f"({', '.join(f'{r} {n}' for r, n in sorted(unusable.items()))}), found before scoring them")
    if failed:
        why.append(f"{sum(failed.values())} image(s) got no result this pass "
                   f"({', '.join(f'{r} {n}' for r, n in sorted(failed.items()))})")
    if why:
        raise StudyFailed("; ".join(why), counts=counts or bool(deferred or unusable))


def header_problem(header: Dataset, model: ModelId) -> str | None:
    """Why no result can be made from ``header`` (the error's type: its text may quote the header), or None: an SR
    and an SC made of it with stand-in content, and thrown away. Run before its image is scored, so that such an image
    is not scored (nor logged by the prediction log) on every pass, while its study's other images are."""
    uid = generate_uid(entropy_srcs=["covidcxr", "header check"])
    entry = {**dict.fromkeys(serving.FIELDS), "accepted": False, "reason": "internal_error"}
    try:
        build_sr(header, entry, model, uid, uid, 1)
        build_sc(header, serving.probe_image(), model, uid, uid, 1)
    except BUILD_ERRORS as err:
        return type(err).__name__
    return None


def score_files(score: serving.Scorer, files: list[str]) -> list[dict]:
    """One entry per file (base64 DICOM) from the scorer, with Grad-CAM overlays. The scorer failing on them (an error
    answer, an in-process ServingError, an answer that is not one entry per file) is :class:`StudyFailed`, which
    :func:`process_study` counts against the request's images; an unreachable or overloaded scorer (OSError, a proxy's
    502/503/504, or a 408 or 429 still answered after the retries) propagates with its status: :func:`process_study`
    probes the scorer to tell whether it stops the pass, and does not count a "not now" (:data:`NOT_NOW`) toward
    giving up on the study."""
    try:
        entries = score(files, {"explain": True})
    except serving.ScoringError as err:
        if err.status in SCORER_DOWN | NOT_NOW:
            raise
        raise StudyFailed(f"the scorer answered HTTP {err.status}") from None
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - in process: ServingError (INTERNAL_ERROR...); remote: a garbled answer
        code = getattr(err, "error_code", None)
        raise StudyFailed(f"the scorer failed ({type(err).__name__}{f', {code}' if code else ''})") from None
    if not isinstance(entries, list) or len(entries) != len(files):
        raise StudyFailed(f"the scorer answered {len(entries) if isinstance(entries, list) else 'no list of'} entries "
                          f"for {len(files)} images")
    return entries


def run(pacs: DicomWeb, score: serving.Scorer, model_name: str, *, since: dt.date | None = None,
        batch_size: int = 8, site: sites.SiteThresholds | None = None,
        failures: dict[str, int] | None = None) -> Summary:
    """One pass over the PACS: every CR/DX study (from ``since`` on) gets the results it lacks, under the name and
    version the model behind ``score`` reports (``model_name``: the name of a model that does not report its own, one
    served before entries carried it).

    Requests hold at most ``batch_size`` images, and no more than the model takes (its ``max_images``); one the scorer
    answers "not now" (:data:`NOT_NOW`) is sent again as the PACS's requests are (``pacs.retries``, ``pacs.backoff``).
    Each image's outcome is its own (:func:`process_study`): a study with an image that got no result is counted in
    ``failed_studies`` once its other images' results are stored, and left for the next pass; so is one whose instance
    search the PACS did not answer (5xx, timeout) when it answers a search right after. A PACS or scorer that does not
    answer then (the error names the hashed study), a model that changed mid-pass, or a model version other than the
    one ``site`` (the thresholds ``score`` applies) was chosen on stops the pass, the last before any study.
    ``failures`` (hashed study id: consecutive failed passes) carries over from the passes before in this process, and
    is updated: a study at :data:`GIVE_UP_AFTER` is counted and logged, not tried.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    score = retried(score, pacs.retries, pacs.backoff, pacs.sleep)
    about = serving.probe(score)
    if site is not None:  # the name the model answers with, not the fallback below: unknown is refused, as in predict
        site.check_model(about["model_name"], about["model_version"])
    model = ModelId(str(about["model_name"] or model_name), str(about["model_version"]))
    batch_size = serving.request_size(about, batch_size)
    studies = pacs.find_studies(since)
    summary = Summary(studies=len(studies))
    failures = {} if failures is None else failures
    for key in set(failures) - {hashed(uid) for uid in studies}:  # out of the window now: forgotten
        del failures[key]

    def failed(key: str, why: str, counts: bool = True) -> None:
        summary.failed_studies += 1
        if not counts:  # a "not now" before scoring: no step toward giving up, nor back from it
            log.error("study %s left for the next pass (not counted toward giving up on it): %s", key, why)
            return
        failures[key] = failures.get(key, 0) + 1
        last = " (its last try by this worker: restart it to try again)" if failures[key] >= GIVE_UP_AFTER else ""
        log.error("study %s left for the next pass, failed %d pass(es) in a row%s: %s", key, failures[key], last, why)

    def stop(key: str, err: Exception) -> None:
        log.error("pass over %s stopped at study %s (%s), counts so far: %s", pacs.endpoint, key, cause(err),
                  summary.to_dict())
        if isinstance(err, PacsUnavailable):
            raise PacsUnavailable(f"{err} (at study {key})", err.detail, err.status) from None
        raise err

    for study_uid in studies:
        key = hashed(study_uid)
        if failures.get(key, 0) >= GIVE_UP_AFTER:
            summary.failed_studies += 1
            summary.skipped_studies += 1
            log.error("study %s not tried: it failed %d passes in a row; restart the worker to try it again", key,
                      failures[key])
            continue
        try:
            process_study(pacs, study_uid, score, model, summary, batch_size=batch_size)
        except Unreachable as gone:
            stop(key, gone.error)
        except PacsUnavailable as err:  # its instance search: the PACS's, or the study's?
            if not still_answers(pacs, score, err):
                stop(key, err)
            failed(key, f"{err}, while the PACS answers other requests", counts=err.status not in NOT_NOW)
        except StudyFailed as err:
            failed(key, str(err), counts=err.counts)
        except PacsError as err:
            failed(key, str(err))
        except BUILD_ERRORS as err:  # a QIDO answer the worker cannot use; its text may quote it
            failed(key, f"{type(err).__name__} (its text withheld: it may quote a header)")
        else:
            failures.pop(key, None)
    log.info("pass over %s with %s v%s: %s", pacs.endpoint, model.name, model.version, summary.to_dict())
    return summary


def retried(score: serving.Scorer, retries: int, backoff: float,
            sleep: Callable[[float], None] = time.sleep) -> serving.Scorer:
    """``score``, whose request answered "not now" (:data:`NOT_NOW`: by the server or a proxy before it, overloaded;
    nothing was scored) is sent again up to ``retries`` times, as a PACS request is (:func:`pause`): after what the
    answer's Retry-After asks where it gives one, else ``backoff`` seconds later, doubling each time. One 503 under
    load no longer fails the images of the request, and a rate limiter's 429 asking for 30 s is asked again 30 s later,
    not 1, 2 and 4 s later (all within its limit, which then stopped the pass)."""

    def score_again(images: list[str], params: dict) -> list[dict]:
        wait = None
        for attempt in range(retries + 1):
            if attempt:
                sleep(pause(attempt, backoff, wait))
            try:
                return score(images, params)
            except serving.ScoringError as err:
                if err.status not in NOT_NOW or attempt == retries:
                    raise
                wait = err.retry_after
        raise AssertionError("unreachable")  # the loop returns or raises

    return score_again


def cause(err: Exception) -> str:
    """What went wrong, in a few words and without its text (a server's may quote the request, an error's a
    header)."""
    if isinstance(err, PacsError):
        return err.detail
    if isinstance(err, serving.ScoringError):
        return f"the scorer answered HTTP {err.status}"
    if isinstance(err, StudyFailed):
        return str(err)
    return type(err).__name__


def still_answers(pacs: DicomWeb, score: serving.Scorer, err: Exception) -> bool:
    """Whether the one that failed with ``err`` (the PACS for a PacsError, else the scorer) answers a probe now."""
    return pacs.answers() if isinstance(err, PacsError) else scorer_answers(score)


def scorer_answers(score: serving.Scorer) -> bool:
    """Whether the scorer answers a probe now: tells a failure on one study's images from a scorer that is gone."""
    try:
        serving.probe(score)
    except Exception:  # noqa: BLE001 - whatever went wrong, it did not answer
        return False
    return True


@contextlib.contextmanager
def worker_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) while the block runs, or raise :class:`WorkerBusy` at
    once when another worker holds it: overlapping passes over the same studies would score their images twice (two
    prediction-log records each) and store their results twice. The kernel drops the lock when the process ends,
    however it ends; an OSError when the file cannot be opened."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkerBusy(f"another worker holds the lock {path} (a pass still running): this one does not "
                             "start") from None
        yield
    finally:
        os.close(fd)


def parse_since(text: str | None, today: dt.date | None = None) -> dt.date | None:
    """``YYYY-MM-DD``, ``YYYYMMDD`` or ``Nd`` (N days before today) as a date; None stays None."""
    if not text:
        return None
    text = text.strip()
    if text.endswith("d") and text[:-1].isdigit():
        return (today or dt.date.today()) - dt.timedelta(days=int(text[:-1]))
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ValueError(f"--since takes YYYY-MM-DD, YYYYMMDD or Nd (days back), got {text!r}")
