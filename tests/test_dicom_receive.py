"""DICOM C-STORE receive: pynetdicom's own SCU on loopback sends the real CT series; the
stored files load to the same voxels and geometry, one folder per series, never overwritten."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.testing import assert_allclose
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from pydicom.uid import JPEG2000Lossless

import run_guidance
from guidance.core.volume import load_volume
from guidance.live.dicom_receive import DicomReceiver, ct_volume_callback


SERIES_UID = "1.2.826.0.1.3680043.8.498.4242"


def as_sent(path: Path) -> pydicom.Dataset:
    """A shared-series file as a scanner would send it: the de-identified files keep their
    SOP class and instance UIDs only in the file meta and have an empty series UID."""
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = SERIES_UID
    return ds


def send_series(port: int, files: list[Path], ae_title: str = "GUIDANCE") -> list[int]:
    """C-STORE every file in one association with pynetdicom's SCU; the statuses."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, JPEG2000Lossless)  # the files are stored compressed
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(as_sent(f)).Status) for f in files]
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def series_files(shared_data) -> list[Path]:
    folder = shared_data / "ct_dicom_series"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    return sorted(p for p in folder.iterdir() if p.is_file())


def test_a_ct_series_round_trips_to_the_same_voxels_and_geometry(tmp_path, series_files, shared_data):
    received, volumes, done = [], [], threading.Event()

    def on_volume(volume, series):
        volumes.append(volume)
        done.set()

    callback = ct_volume_callback(on_volume)
    with DicomReceiver(tmp_path / "in", port=0, on_series=lambda s: (received.append(s), callback(s))) as receiver:
        assert send_series(receiver.port, series_files) == [0] * len(series_files)
        assert done.wait(30)
        assert send_series(receiver.port, series_files[:3]) == [0, 0, 0]  # sent again: never overwritten
        deadline = time.monotonic() + 10
        while len(received) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    original = load_volume(shared_data / "ct_dicom_series")
    folders = sorted((tmp_path / "in").iterdir())
    assert [f.name for f in folders] == [f"CT_{SERIES_UID}", f"CT_{SERIES_UID}-2"]
    assert len(list(folders[0].iterdir())) == len(series_files) and len(list(folders[1].iterdir())) == 3
    assert [len(s.files) for s in received] == [len(series_files), 3]
    stored = load_volume(folders[0])
    for volume in (stored, volumes[0]):
        assert volume.data.shape == original.data.shape
        assert np.array_equal(volume.data, original.data)
        assert_allclose(volume.T_world_from_index, original.T_world_from_index, atol=1e-9)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dicom_receive_cli_stores_until_terminated(tmp_path, series_files):
    port = free_port()
    statuses = []

    def sender():
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait for the receiver to listen
            assoc = ae.associate("127.0.0.1", port, ae_title="OR1")
            if assoc.is_established:
                assoc.release()
                break
            time.sleep(0.1)
        statuses.extend(send_series(port, series_files[:2], ae_title="OR1"))
        os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler ends it cleanly

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    try:
        rc = run_guidance.main(["dicom-receive", "--port", str(port), "--ae-title", "OR1", "--out",
                                str(tmp_path / "in")])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    thread.join(10)
    assert rc == 0 and statuses == [0, 0]
    (folder,) = (tmp_path / "in").iterdir()
    assert len(list(folder.glob("*.dcm"))) == 2


def test_an_invalid_ae_title_is_a_named_error_not_a_traceback(tmp_path, capsys):
    from guidance.live.dicom_receive import DicomReceiveError

    with pytest.raises(DicomReceiveError, match="AE title 'A_TITLE_LONGER_THAN_16'"):
        DicomReceiver(tmp_path, port=0, ae_title="A_TITLE_LONGER_THAN_16")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert run_guidance.main(["dicom-receive", "--port", "0", "--ae-title", "A_TITLE_LONGER_THAN_16",
                                  "--out", str(tmp_path)]) == 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert "error: AE title 'A_TITLE_LONGER_THAN_16' is not valid" in capsys.readouterr().err
