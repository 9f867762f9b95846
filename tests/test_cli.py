"""The CLI through ``run_guidance.main(argv)``: every subcommand once on small inputs, the
bugs it had, help with units and defaults, errors as "error: ..." (traceback with -v)."""

import argparse
import json
import os
import signal
import threading
import time

import cv2
import numpy as np
import pytest

import run_guidance
from guidance.core.geometry import project
from guidance.core.images import preprocess, read_xray
from guidance.core.levels import level_label
from guidance.core.views import read_view
from guidance.core.volume import label_centroid_world, load_volume
from guidance.live.transport import free_tcp_endpoint
from sim.xray import RAW_I0

NO_DATA = "/nonexistent-shared-data"


def run(*argv: str) -> int:
    return run_guidance.main(list(argv))


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    assert run("phantom", "--out", str(out), "--spacing", "3") == 0
    return out


@pytest.fixture(scope="module")
def shot(phantom_dir, tmp_path_factory):
    """A raw 64 px shot of the 3 mm phantom aimed at L3, and its view file."""
    out = tmp_path_factory.mktemp("shot") / "ap.png"
    assert run("render", "--ct", str(phantom_dir / "ct.nii.gz"), "--labels", str(phantom_dir / "labels.nii.gz"),
               "--level", "L3", "--size", "64", "--pitch", "4.5", "--out", str(out)) == 0
    return out, out.with_name("ap.view.json")


def stop_when_serving(delay_s: float) -> threading.Thread:
    """SIGTERM this process once the subcommand has installed its signal handler, plus delay_s:
    the way an operator stops sim, pipeline and display."""
    original = signal.getsignal(signal.SIGTERM)

    def later():
        deadline = time.monotonic() + 120.0
        while signal.getsignal(signal.SIGTERM) is original and time.monotonic() < deadline:
            time.sleep(0.05)
        if signal.getsignal(signal.SIGTERM) is not original:  # never SIGTERM pytest itself
            time.sleep(delay_s)
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


# ------------------------------------------------------------------ help


def test_every_option_of_every_subcommand_has_help():
    parser = run_guidance.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        assert isinstance(sub.formatter_class("x"), argparse.ArgumentDefaultsHelpFormatter)


def test_help_shows_units_and_defaults(capsys):
    for argv, expected in [(("phantom", "--help"), ["--seed", "(default: 0)", "Cobb angle (deg"]),
                           (("render", "--help"), ["LAO angle (deg", "relative dose", "(default: 1.0)"]),
                           (("demo", "--help"), ["scenario length (s)", "(default: 20.0)", "frame rate (Hz)"]),
                           (("register3d", "--help"), ["name like L3 or label id"])]:
        with pytest.raises(SystemExit):
            run(*argv)
        text = " ".join(capsys.readouterr().out.split())
        for e in expected:
            assert e in text, (argv, e)


def test_levels_are_taken_by_name_or_id():
    parser = run_guidance.build_parser()
    for command in (["register", "--image", "a", "--view", "b", "--out", "c"],
                    ["register3d", "--fixed", "a", "--moving", "b", "--out", "c"],
                    ["evaluate", "--out", "c"], ["pipeline"], ["render", "--out", "c"], ["sim"]):
        assert parser.parse_args(command + ["--level", "L3"]).level == 29
        assert parser.parse_args(command + ["--level", "29"]).level == 29
    with pytest.raises(SystemExit):
        parser.parse_args(["register3d", "--fixed", "a", "--moving", "b", "--out", "c", "--level", "X9"])


# ------------------------------------------------------------------ errors


def test_domain_errors_print_error_and_verbose_adds_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing.view.json")
    assert run("register", "--image", missing, "--view", missing, "--out", str(tmp_path / "r.json")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: view file not found") and "Traceback" not in err
    assert run("-v", "register", "--image", missing, "--view", missing, "--out", str(tmp_path / "r.json")) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: view file not found" in err


def test_a_bug_is_not_reported_as_bad_input(monkeypatch):
    """Only GuidanceError and OSError become "error: ..."; anything else is a bug and propagates."""
    def broken(args):
        raise ValueError("a bug")
    monkeypatch.setattr(run_guidance, "cmd_phantom", broken)  # build_parser picks it up
    with pytest.raises(ValueError, match="a bug"):
        run("phantom", "--out", "x")


def test_calibrate_without_inputs_names_real_options(tmp_path, capsys):
    assert run("calibrate", "pivot", "--out", str(tmp_path / "c.json")) == 2
    err = capsys.readouterr().err
    assert "--images" in err and "--poses" not in err


# ------------------------------------------------------------------ phantom, render


def test_phantom_writes_ct_labels_and_plan(phantom_dir):
    for name in ("ct.nii.gz", "labels.nii.gz", "plan.json"):
        assert (phantom_dir / name).is_file()


def test_render_aims_at_the_level_and_writes_a_visible_raw_png(phantom_dir, shot):
    image_path, view_path = shot
    image, view = read_xray(image_path), read_view(view_path)
    assert image.dtype == np.uint16 and image.max() > 30000  # visible in any viewer
    scale = view.extra["raw_scale"]
    assert scale == int(scale) and np.all(image % int(scale) == 0)  # raw counts = pixels / raw_scale
    assert view.I0 == pytest.approx(RAW_I0 * scale)
    labels = load_volume(phantom_dir / "labels.nii.gz", units="label")
    centroid = label_centroid_world(labels, level_label("L3"))
    assert np.allclose(project(view.P, centroid[None])[0], [31.5, 31.5], atol=1e-6)
    line = preprocess(image, view).image
    assert 0.5 < float(np.median(line[line > 0])) < 10.0  # -log(I / I0) unchanged by the stretch


def test_render_aims_at_a_point_and_refuses_a_bad_one(phantom_dir, tmp_path, capsys):
    out = tmp_path / "lat.png"
    assert run("render", "--ct", str(phantom_dir / "ct.nii.gz"), "--aim", "10,-20,30", "--lao", "90",
               "--size", "32", "--pitch", "6", "--intensity", "display", "--out", str(out)) == 0
    view = read_view(tmp_path / "lat.view.json")
    assert np.allclose(project(view.P, np.array([[10.0, -20.0, 30.0]]))[0], [15.5, 15.5], atol=1e-6)
    assert cv2.imread(str(out), cv2.IMREAD_UNCHANGED).dtype == np.uint8
    assert run("render", "--ct", str(phantom_dir / "ct.nii.gz"), "--aim", "1,2", "--out", str(out)) == 2
    assert "--aim takes x,y,z" in capsys.readouterr().err
    assert run("render", "--ct", str(phantom_dir / "ct.nii.gz"), "--level", "L3", "--out", str(out)) == 2
    assert "--level needs --labels" in capsys.readouterr().err


# ------------------------------------------------------------------ register, register3d


def test_register_one_level_and_all_levels(phantom_dir, shot, tmp_path, capsys):
    image, view = shot
    ct, labels = str(phantom_dir / "ct.nii.gz"), str(phantom_dir / "labels.nii.gz")
    out = tmp_path / "result.json"
    code = run("register", "--ct", ct, "--labels", labels, "--image", str(image), "--view", str(view),
               "--level", "L3", "--out", str(out))
    result = json.loads(out.read_text())
    assert code == (0 if result["status"] == "ok" else 1) and result["level"] in ("29", "L3", 29)
    code = run("register", "--ct", ct, "--labels", labels, "--image", str(image), "--view", str(view),
               "--all-levels", "--out", str(out))
    assert code in (0, 1) and set(json.loads(out.read_text())["level_status"]) <= {"L1", "L2", "L3", "L4", "L5"}


def test_register_all_levels_without_labels_is_an_error(phantom_dir, shot, tmp_path, capsys):
    image, view = shot
    code = run("register", "--ct", str(phantom_dir / "ct.nii.gz"), "--image", str(image), "--view", str(view),
               "--all-levels", "--out", str(tmp_path / "r.json"))
    assert code == 2 and "--all-levels needs --labels" in capsys.readouterr().err


def test_a_failed_biplane_registration_hints_at_the_shared_correction(phantom_dir, shot, tmp_path, capsys):
    """Two view files of one image, one of them moved by 40 mm on its own: no single correction fits."""
    image, view_path = shot
    view = read_view(view_path)
    moved = view.T_cam_from_world.copy()
    moved[0, 3] += 40.0
    from guidance.core.views import write_view

    write_view(view.with_pose(moved), tmp_path / "moved.view.json")
    code = run("register", "--ct", str(phantom_dir / "ct.nii.gz"), "--image", str(image), "--view", str(view_path),
               "--image", str(image), "--view", str(tmp_path / "moved.view.json"), "--out", str(tmp_path / "r.json"))
    assert code == 1
    assert "share one correction" in capsys.readouterr().err


def test_register3d_level_and_labels_go_together(phantom_dir, tmp_path, capsys):
    ct, labels, out = str(phantom_dir / "ct.nii.gz"), str(phantom_dir / "labels.nii.gz"), str(tmp_path / "r.json")
    assert run("register3d", "--fixed", ct, "--moving", ct, "--labels", labels, "--out", out) == 2
    assert "--labels and --level go together" in capsys.readouterr().err
    assert run("register3d", "--fixed", ct, "--moving", ct, "--level", "L3", "--out", out) == 2
    assert run("register3d", "--fixed", ct, "--moving", ct, "--labels", labels, "--level", "T1", "--out", out) == 2
    assert "no voxels of level T1" in capsys.readouterr().err
    assert run("register3d", "--fixed", ct, "--moving", ct, "--labels", labels, "--level", "L3", "--out", out) == 0
    T = np.array(json.loads((tmp_path / "r.json").read_text())["T_moving_from_fixed"])
    assert np.allclose(T, np.eye(4), atol=0.05)  # a volume registered to itself


# ------------------------------------------------------------------ evaluate, calibrate, bench


def test_evaluate_on_dask_gives_the_table_of_the_process_pool(phantom_dir, tmp_path, capsys):
    """The same seeded set, registered by a spawned process pool and by a Dask cluster
    (an in-process LocalCluster given by address): the same records and summary."""
    from dask.distributed import LocalCluster

    tiny = ["evaluate", "--ct", str(phantom_dir / "ct.nii.gz"), "--labels", str(phantom_dir / "labels.nii.gz"),
            "--level", "L3", "--intensity", "raw", "--views", "1", "--starts", "2", "--bins", "3-6",
            "--detector-px", "32"]
    assert run(*tiny, "--scheduler", "processes", "--jobs", "1", "--out", str(tmp_path / "pool")) == 0
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        assert run(*tiny, "--scheduler", "dask", "--dask-address", cluster.scheduler_address,
                   "--out", str(tmp_path / "dask")) == 0
    pool, dask = (json.loads((tmp_path / name / "raw" / "records.json").read_text()) for name in ("pool", "dask"))
    assert len(pool) == 2 and [r["case_id"] for r in pool] == [r["case_id"] for r in dask]
    for a, b in zip(pool, dask):
        timings = ("time_s", "prepare_s")
        assert {k: v for k, v in a.items() if k not in timings} == {k: v for k, v in b.items() if k not in timings}
    summaries = [json.loads((tmp_path / n / "summary.json").read_text())["raw"] for n in ("pool", "dask")]
    for s in summaries:
        s.pop("time_s")
        s.pop("prepare_s")
    assert summaries[0] == summaries[1] and summaries[0]["errors"] == []
    assert summaries[0]["machine"]["packages"]["numpy"] == np.__version__  # what the figures were measured with
    assert "numpy " + np.__version__ in (tmp_path / "pool" / "raw" / "report.md").read_text()
    assert run("evaluate", "--dask-address", "tcp://127.0.0.1:1", "--out", str(tmp_path / "x")) == 2
    assert "--dask-address needs --scheduler dask" in capsys.readouterr().err


def test_calibrate_pivot_simulated(tmp_path):
    out = tmp_path / "pivot.json"
    assert run("calibrate", "pivot", "--simulate", "--out", str(out)) == 0
    assert out.is_file()


@pytest.mark.slow
def test_bench_drr_on_the_phantom(tmp_path):
    assert run("bench", "drr", "--repeats", "1", "--shared-data", NO_DATA, "--json", str(tmp_path / "d.json")) == 0
    rows = json.loads((tmp_path / "d.json").read_text())["result"]
    renderers = {r["renderer"] for r in rows if "bone" in r["volume"]}  # the phantom on the clinical grid
    assert renderers >= {"guidance (numba), empty-space skipping", "guidance (numba), skipping, with motion derivative"}


@pytest.mark.slow
def test_bench_register3d_on_the_phantom(tmp_path):
    assert run("bench", "register3d", "--shared-data", NO_DATA, "--json", str(tmp_path / "r.json")) == 0
    assert json.loads((tmp_path / "r.json").read_text())["result"][0]["volume"].startswith("phantom")


@pytest.mark.slow
def test_bench_calibration(tmp_path, capsys):
    assert run("bench", "calibration", "--trials", "1", "--json", str(tmp_path / "c.json")) == 0
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "c.json").read_text())["machine"]["cpu_model"] and "| " in out
    assert out.startswith("CPU: ")  # every benchmark table names its machine


# ------------------------------------------------------------------ live processes


def test_sim_streams_a_short_scenario(capsys):
    code = run("sim", "--frame-endpoint", free_tcp_endpoint(), "--duration", "0.4", "--fps", "5", "--fast",
               "--startup", "0", "--level", "28", "--plain")
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out[out.index("{"):])["frames"] >= 2


def test_pipeline_and_display_serve_until_stopped(tmp_path, capsys, restore_signals):
    frames, results = free_tcp_endpoint(), free_tcp_endpoint()
    stop_when_serving(0.5)
    assert run("pipeline", "--frame-endpoints", frames, "--result-endpoint", results, "--plain") == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["frames_processed"] == 0
    stop_when_serving(1.0)
    assert run("display", "--headless", "--frame-endpoint", frames, "--result-endpoint", results,
               "--out", str(tmp_path / "screens"), "--plain") == 0
    assert list((tmp_path / "screens").glob("screen_*.png"))


@pytest.mark.slow
def test_demo_cleans_its_folder_and_prints_readable_figures(tmp_path, capsys):
    (tmp_path / "screen_999999.png").write_bytes(b"old")
    (tmp_path / "recording-20000101-000000").mkdir()
    (tmp_path / "keep.txt").write_text("not the demo's")
    assert run("demo", "--out", str(tmp_path), "--duration", "4", "--fps", "5") == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "screen_999999.png").exists() and not (tmp_path / "recording-20000101-000000").exists()
    assert (tmp_path / "keep.txt").exists()
    summary = out[out.index("frames_published"):]
    assert "nan" not in summary and "e+" not in summary
    assert "stale_shown_after_stop_s" in summary and "latency_p50_ms" in summary


@pytest.mark.slow
def test_bench_latency_prints_a_summary(tmp_path, capsys):
    assert run("bench", "latency", "--duration", "3", "--out", str(tmp_path), "--json", str(tmp_path / "l.json")) == 0
    assert "latency_p50_ms" in json.loads((tmp_path / "l.json").read_text())["result"]["summary"]
