"""DICOM network receive: a C-STORE SCP (pynetdicom) that files incoming CT and X-ray
series, one folder per series, never overwriting, and tells the caller when a series
has arrived (e.g. to hand an intra-op CT to the pipeline).

Files: ``<out>/<Modality>_<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, written as
received (DICOM file format, the sender's transfer syntax). An instance whose SOP
Instance UID is already in that folder (the series sent again) goes to the next folder
``..._<SeriesInstanceUID>-2``, ``-3``, ... that does not hold it yet, so every folder stays
one consistent series and nothing is ever overwritten.

When an association closes, ``on_series(ReceivedSeries)`` is called (on the receiver's
thread) once per series folder that received instances in it. ``ct_volume_callback``
wraps a function that wants loaded CT volumes instead (``guidance.core.volume.Volume``
in HU): the hook for intra-op CT in the live pipeline.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from guidance.core.dicom import DicomError, instance_of
from guidance.core.errors import GuidanceError
from guidance.core.volume import Volume, load_volume

__all__ = ["DicomReceiveError", "ReceivedSeries", "DicomReceiver", "ct_volume_callback"]

log = logging.getLogger(__name__)

_SUCCESS = 0x0000
_CANNOT_UNDERSTAND = 0xC000
_OUT_OF_RESOURCES = 0xA700


class DicomReceiveError(GuidanceError):
    """A receiver that cannot be set up as asked (e.g. an invalid AE title)."""


@dataclass
class ReceivedSeries:
    """A series folder that received ``files`` in one association."""

    folder: Path
    modality: str
    series_uid: str
    files: list[Path] = field(default_factory=list)


def ct_volume_callback(on_volume: Callable[[Volume, ReceivedSeries], None]) -> Callable[[ReceivedSeries], None]:
    """An ``on_series`` callback that loads each received CT series (HU) and calls
    ``on_volume(volume, series)``; other modalities are ignored, unreadable series logged."""

    def on_series(series: ReceivedSeries) -> None:
        if series.modality != "CT":
            return
        try:
            volume = load_volume(series.folder)
        except ValueError as exc:
            log.warning("received CT series %s cannot be loaded: %s", series.folder, exc)
            return
        on_volume(volume, series)

    return on_series


class DicomReceiver:
    """A C-STORE (and C-ECHO) SCP on ``host:port`` (127.0.0.1 unless told otherwise; port
    0 picks a free one, see ``port``) with AE title ``ae_title``, storing into ``out_dir``.
    Runs on pynetdicom's server threads until ``close``."""

    def __init__(self, out_dir: str | Path, *, port: int, ae_title: str = "GUIDANCE", host: str = "127.0.0.1",
                 on_series: Callable[[ReceivedSeries], None] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.on_series = on_series
        self.stored = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._pending: dict[int, dict[Path, ReceivedSeries]] = {}
        try:
            ae = AE(ae_title=ae_title)
        except ValueError as exc:  # pynetdicom's word on the title: length, characters
            raise DicomReceiveError(f"AE title {ae_title!r} is not valid: {exc}") from None
        for context in AllStoragePresentationContexts:  # stored as sent: compressed syntaxes too
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_CLOSE, self._on_close)]
        self._server = ae.start_server((host, port), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        self.host = host

    def close(self) -> None:
        self._server.shutdown()

    def __enter__(self) -> "DicomReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_store(self, event) -> int:
        try:
            ds = event.dataset
            instance = instance_of(ds)
            data = event.encoded_dataset(include_meta=True)
        except (DicomError, ValueError, AttributeError) as exc:  # ValueError: pydicom's, on a bad dataset
            self.refused += 1
            log.warning("refused a C-STORE: %s", exc)
            return _CANNOT_UNDERSTAND
        try:
            with self._lock:
                path = self._new_file(instance.modality, instance.series_uid, instance.sop_uid)
                with open(path, "xb") as f:
                    f.write(data)
                series = self._pending.setdefault(id(event.assoc), {}).setdefault(
                    path.parent, ReceivedSeries(path.parent, instance.modality, instance.series_uid))
                series.files.append(path)
                self.stored += 1
        except OSError as exc:
            self.refused += 1
            log.error("cannot store %s: %s", instance.sop_uid, exc)
            return _OUT_OF_RESOURCES
        return _SUCCESS

    def _new_file(self, modality: str, series_uid: str, sop_uid: str) -> Path:
        """The first series folder that does not hold this SOP instance yet, and its file."""
        base = f"{_safe(modality)}_{_safe(series_uid)}"
        copy = 1
        while True:
            folder = self.out_dir / (base if copy == 1 else f"{base}-{copy}")
            path = folder / f"{_safe(sop_uid)}.dcm"
            if not path.exists():
                folder.mkdir(parents=True, exist_ok=True)
                return path
            copy += 1

    def _on_close(self, event) -> None:
        with self._lock:
            received = self._pending.pop(id(event.assoc), {})
        for series in received.values():
            log.info("received %d %s files into %s", len(series.files), series.modality, series.folder)
            if self.on_series is not None:
                try:
                    self.on_series(series)
                except Exception:  # the receiver goes on serving; the failure is logged with its traceback
                    log.exception("on_series callback failed for %s", series.folder)


def _safe(text: str) -> str:
    """A file-name-safe form of a UID or code string (digits, letters, '.', '-')."""
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text.strip()) or "unknown"
