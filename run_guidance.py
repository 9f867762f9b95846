#!/usr/bin/env python3
"""The one command line of the guidance system: parses arguments, calls the library, prints.

Run ``python run_guidance.py --help`` for the subcommands and ``... SUBCOMMAND --help``
for their options (units and defaults are shown). Bad input ends with "error: ..." and
exit status 2; ``-v`` also prints the traceback. Levels are given by name (L3) or label
id (29) everywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from guidance.core.errors import GuidanceError
from guidance.core.levels import level_label, level_name
from guidance.core.threads import configure_threads
from guidance.core.views import INTENSITY_KINDS
from guidance.evaluation.metrics import DEFAULT_BINS

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"


class UsageError(GuidanceError):
    """Options that do not fit together."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every option's help, except for unset (None) and flag defaults."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def level(text: str) -> int:
    """argparse type of a vertebral level: a name (L3) or a label id (29)."""
    return level_label(text)


def bins(text: str) -> tuple[tuple[float, float], ...]:
    """argparse type of initial-mTRE bins: "0-5,5-10" -> ((0, 5), (5, 10)) mm."""
    edges = tuple(tuple(float(x) for x in b.split("-")) for b in text.split(","))
    if any(len(e) != 2 or not e[0] < e[1] for e in edges):
        raise ValueError(text)
    return edges


def _subject(args):
    """The CT, labels and plan of --ct/--labels/--plan, or of the embedded phantom (made
    once, then read from the cache folder, --cache-dir where the command has it)."""
    from sim.subject import load_subject

    return load_subject(getattr(args, "ct", None), labels=getattr(args, "labels", None),
                        plan=getattr(args, "plan", None), phantom_seed=args.phantom_seed,
                        cache_dir=getattr(args, "cache_dir", None))


def _add_ct_arguments(p: argparse.ArgumentParser, *, labels: bool = True, plan: bool = False) -> None:
    p.add_argument("--ct", help="pre-operative CT (NIfTI, MHA, NRRD or DICOM folder), in HU; "
                   "without it: the embedded phantom")
    if labels:
        p.add_argument("--labels", help="label map on the CT grid (TotalSegmentator vertebra ids); "
                       "default: the phantom's own without --ct")
    if plan:
        p.add_argument("--plan", help="screw plan JSON (guidance.plan/1); default: the phantom's without --ct")
    p.add_argument("--phantom-seed", type=int, default=0, help="seed of the embedded phantom (without --ct)")


def _add_cache_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", help="folder of prepared CTs (default: $GUIDANCE_CACHE_DIR, else the user's "
                                       "cache folder)")


def cmd_phantom(args) -> int:
    from sim.phantom import make_phantom, write_phantom

    phantom = make_phantom(seed=args.seed, spacing_mm=args.spacing, scoliosis_deg=args.scoliosis,
                           include_sacrum=args.sacrum)
    paths = write_phantom(phantom, args.out)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _aim_world(args, subject):
    """The C-arm isocentre (world mm): --aim, else the centroid of --level, else of the
    whole labelled spine, else the CT's centre."""
    import numpy as np

    from guidance.core.volume import label_centroid_world

    if args.aim:
        try:
            aim = np.array([float(x) for x in args.aim.split(",")])
        except ValueError:
            aim = np.zeros(0)
        if aim.shape != (3,) or not np.all(np.isfinite(aim)):
            raise UsageError(f"--aim takes x,y,z in world mm (three numbers), got {args.aim!r}")
        return aim
    if args.level is not None:
        if subject.labels is None:
            raise UsageError("--level needs --labels with --ct (the vertebra's centroid is taken from the labels)")
        return label_centroid_world(subject.labels, args.level)
    if subject.labels is not None:
        return label_centroid_world(subject.labels)
    return subject.ct.center_world()


def cmd_render(args) -> int:
    from guidance.core.images import stretch_raw, write_xray
    from guidance.core.views import carm_view, read_view, view_path_for, write_view
    from sim.xray import RAW_I0, XrayParams, simulate_xray

    subject = _subject(args)
    if args.view:
        view = read_view(args.view)
    else:
        view = carm_view(lao_deg=args.lao, cranial_deg=args.cranial, source_to_detector_mm=args.sdd,
                         source_to_isocenter_mm=args.sid, detector_size_px=(args.size, args.size),
                         pixel_spacing_mm=(args.pitch, args.pitch), isocenter_world=_aim_world(args, subject),
                         patient_position=args.position)
    params = XrayParams(I0=RAW_I0, dose=args.dose, distortion_k1=args.distortion_k1, seed=args.seed,
                        noise=not args.no_noise)
    image, view = simulate_xray(subject.ct, view, params, intensity=args.intensity)
    image, view = stretch_raw(image, view)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_xray(image, out)
    view_path = view_path_for(out)
    write_view(view, view_path)
    print(f"image: {out}\nview: {view_path}")
    return 0


def _markdown_table(rows: list[dict], columns: dict[str, str]) -> str:
    """A markdown table of ``rows``: column title -> key; floats fixed-point."""
    def cell(v) -> str:
        return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[k]) for k in columns.values()) + " |" for r in rows]
    return "\n".join(lines)


def _run_bench(args) -> tuple[str, object]:
    """(table text, JSON-able result) of the benchmark ``args.what``."""
    if args.what == "instruments":
        from guidance.tools.bench_instruments import bench_instruments, format_instrument_table

        report = bench_instruments(cases=args.cases, free_frames=args.free_frames, detector_px=args.detector_px)
        return format_instrument_table(report["summary"]), report
    if args.what == "drr":
        from guidance.tools.bench import bench_drr, format_table

        rows = bench_drr(shared_data=Path(args.shared_data), repeats=args.repeats)
        return format_table(rows), [r.__dict__ for r in rows]
    if args.what == "register3d":
        from guidance.tools.bench import bench_register3d

        rows = bench_register3d(shared_data=Path(args.shared_data))
        return _markdown_table(rows, {"volume": "volume", "grid": "grid", "TRE mean mm": "tre_mean_mm",
                                      "TRE max mm": "tre_max_mm", "time s": "time_s",
                                      "iterations": "iterations"}), rows
    if args.what == "igtl":
        from guidance.tools.bench_igtl import bench_igtl, format_igtl_table

        rows = bench_igtl(duration_s=args.duration or 120.0)
        return format_igtl_table(rows), rows
    if args.what == "breach":
        from guidance.tools.bench_breach import bench_breach, format_breach_table

        result = bench_breach(seed=args.seed, phantoms=args.phantoms)
        return format_breach_table(result), result
    if args.what == "reliability":
        from guidance.tools.reliability import format_rows, run_reliability

        rows = run_reliability(args.out, duration_s=args.duration or 600.0)
        return format_rows(rows), rows
    if args.what == "latency":
        from guidance.tools.bench_latency import bench_latency
        from guidance.tools.demo import format_summary

        _ct_options_need_ct(args)
        result = bench_latency(args.out, duration_s=args.duration or 120.0, speed=args.speed,
                               single_view=args.single_view, ct=args.ct, labels=args.labels, plan=args.plan,
                               target_world=args.target)
        return format_summary(result["summary"]), result
    from calibration.bench import format_table, run_calibration_benchmark

    rows = run_calibration_benchmark(n_trials=args.trials, n_pivot_trials=4 * args.trials)
    return format_table(rows), rows


def _ct_options_need_ct(args) -> None:
    """--labels, --plan and --target describe a CT: refused without --ct."""
    given = [name for name in ("labels", "plan", "target") if getattr(args, name) is not None]
    if given and not args.ct:
        raise UsageError(f"{', '.join('--' + name for name in given)} need --ct (the phantom has its own)")


def _add_real_ct_scenario_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """--ct, --labels, --plan and --target of a simulated scenario on a real CT."""
    p.add_argument("--ct", help=f"{what}: a real CT (HU; NIfTI, MHA, NRRD or DICOM folder) instead of the phantom")
    p.add_argument("--labels", help=f"{what}: label map on the --ct grid; without --target the scenario aims at "
                   "the centroid of its level (L3 unless --level)")
    p.add_argument("--plan", help=f"{what}: screw plan JSON (guidance.plan/1) for --ct: the instrument follows its "
                   "trajectory of the level and side; without it a straight posterior path to the target")
    p.add_argument("--target", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help=f"{what}: with --ct, the point (LPS mm) the C-arm isocentre and the instrument aim at, and "
                   "where the pose error is scored; default: the --labels centroid of the level")


def _machine() -> tuple[dict, str]:
    """The CPU, numba's threads and the package versions, recorded with every benchmark
    table: the record and its line."""
    from guidance.core.machine import machine_description, machine_line

    machine = machine_description()
    return machine, machine_line(machine)


def cmd_bench(args) -> int:
    machine, line = _machine()
    table, result = _run_bench(args)
    print(line)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "result": result}, indent=2))
    return 0


def cmd_register(args) -> int:
    from guidance.core.images import preprocess, read_xray
    from guidance.core.views import read_view
    from guidance.registration.register import Registrator, register_levels

    if args.view and len(args.image) != len(args.view):
        raise UsageError("give one --view per --image (or none: DICOM images carry their geometry)")
    subject = _subject(args)
    if args.view:
        views = [read_view(v) for v in args.view]
        pixels = [read_xray(i) for i in args.image]
    else:
        from guidance.core.dicom import read_xray_dicom

        shots = [read_xray_dicom(i, isocenter_world=subject.ct.center_world()) for i in args.image]
        views, pixels = [s.views[0] for s in shots], [s.frames[0] for s in shots]
    images = [preprocess(p, v) for p, v in zip(pixels, views)]
    if args.all_levels and subject.labels is None:
        raise UsageError("--all-levels needs --labels with --ct (the vertebrae are taken from the labels)")
    registrator = Registrator(subject.ct, labels=subject.labels, cache_dir=args.cache_dir)
    if args.all_levels:
        import numpy as np

        ids = sorted(int(x) for x in np.unique(subject.labels.data) if x > 0)
        result = register_levels(registrator, images, views, {level_name(n): n for n in ids})
    else:
        result = registrator.register(images, views, level=args.level)
    Path(args.out).write_text(json.dumps(result.to_dict(), indent=2))
    print(f"{result.status}: {result.reason}; similarity {result.similarity:.3f}, confidence "
          f"{result.confidence:.2f}, +-{result.uncertainty_in_plane_mm:.2f} mm in-plane / "
          f"+-{result.uncertainty_depth_mm:.1f} mm depth, {result.time_s:.2f} s "
          f"(CT preparation {result.prepare_s:.2f} s) -> {args.out}")
    if not result.ok and len(views) > 1:
        print("hint: the views of one registration share one correction (T_world_corrected_from_world): "
              "their initial poses must be off by the same patient motion; a view file perturbed on its "
              "own, or from another acquisition, fails the gate in that view", file=sys.stderr)
    return 0 if result.ok else 1


def cmd_register3d(args) -> int:
    from guidance.core.volume import load_volume
    from guidance.registration.register3d import register_volumes

    if (args.labels is None) != (args.level is None):
        raise UsageError("--labels and --level go together: the level's voxels in the labels mask the "
                         "fixed CT; give both or neither")
    fixed = load_volume(args.fixed)
    moving = load_volume(args.moving)
    mask = None
    if args.labels:
        mask = load_volume(args.labels, units="label").data == args.level
        if not mask.any():
            raise UsageError(f"the labels have no voxels of level {level_name(args.level)} ({args.level})")
    result = register_volumes(fixed, moving, fixed_mask=mask)
    Path(args.out).write_text(json.dumps(result.to_dict(), indent=2))
    print(f"metric {result.metric:.4f} after {result.iterations} iterations, {result.time_s:.2f} s "
          f"({result.stop_reason}) -> {args.out}")
    return 0


def _benchmark_source(args):
    """The CT file a benchmark registers to, or the embedded phantom (built at 0.7 mm for
    the clinical grid)."""
    from sim.phantom import make_phantom

    return args.ct if args.ct else make_phantom(seed=args.phantom_seed, spacing_mm=0.7 if args.clinical_grid else 1.0)


def cmd_evaluate(args) -> int:
    from guidance.evaluation.benchmark import evaluate, evaluate_external

    scheduler = args.scheduler or ("processes" if args.jobs else "local")
    if args.dask_address and scheduler != "dask":
        raise UsageError("--dask-address needs --scheduler dask")
    if args.jobs and scheduler == "local":
        raise UsageError("--jobs needs --scheduler processes or dask")
    run = dict(scheduler=scheduler, jobs=args.jobs, dask_address=args.dask_address)
    if args.external:
        if not args.ct:
            raise UsageError("--external needs --ct")
        summaries = {"external": evaluate_external(args.external, args.ct, labels_path=args.labels,
                                                   out_dir=args.out, clinical=args.clinical_grid, **run)}
    else:
        summaries = evaluate(_benchmark_source(args), out_dir=args.out, labels_path=args.labels, level=args.level,
                             intensities=args.intensity, biplane=args.biplane, n_views=args.views,
                             n_starts_per_bin=args.starts, bins=args.bins, detector_px=args.detector_px,
                             seed=args.seed, clinical=args.clinical_grid, **run)
    for name, summary in summaries.items():
        print(f"\n## {name}")
        print(json.dumps({k: summary[k] for k in summary if k != "bins"}, indent=2))
    print(f"\nreports: {args.out}")
    return 0


def cmd_compare(args) -> int:
    from guidance.evaluation.benchmark import benchmark_subject, load_benchmark_set
    from guidance.evaluation.compare import compare_settings, format_comparison, settings_from_text

    if args.every < 1:
        raise UsageError("--every must be 1 or more")
    cases = load_benchmark_set(args.set)[::args.every]
    variants = {"reference": settings_from_text(args.reference)}
    for text in args.variant:
        variants[text] = settings_from_text(text)
    subject = benchmark_subject(_benchmark_source(args), args.labels, clinical=args.clinical_grid)
    comparison = compare_settings(cases, subject.ct, variants, labels=subject.labels)
    machine, line = _machine()
    print(f"{line}; {len(cases)} cases of {args.set}")
    print(format_comparison(comparison))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "result": comparison}, indent=2, default=list))
    return 0


def cmd_calibrate(args) -> int:
    from calibration.cli import calibrate_carm, calibrate_distortion, calibrate_pivot

    if not args.simulate and not args.images:
        raise UsageError("give --images (for pivot: the poses file) or --simulate")
    if args.kind == "carm":
        angles = [tuple(float(x) for x in a.split(",")) for a in args.angles] if args.angles else None
        summary = calibrate_carm(args.images, simulate=args.simulate, out=args.out, seed=args.seed, angles=angles)
    elif args.kind == "distortion":
        summary = calibrate_distortion(args.images, simulate=args.simulate, out=args.out, seed=args.seed,
                                       amplitude_px=args.amplitude_px)
    else:
        summary = calibrate_pivot(args.images[0] if args.images else None, simulate=args.simulate, out=args.out,
                                  seed=args.seed, method=args.method)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _stop_on_signals():
    """A stop request set by SIGINT/SIGTERM: signal handling belongs to the entry point."""
    import signal

    from guidance.core.stop import StopFlag

    stop = StopFlag()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _add_max_frame_argument(p: argparse.ArgumentParser) -> None:
    from guidance.live.transport import DEFAULT_MAX_FRAME_PX

    p.add_argument("--max-frame-px", type=int, default=DEFAULT_MAX_FRAME_PX,
                   help="largest frame side accepted (pixels); bigger messages are refused by the socket")


def _add_security_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", default="keys",
                   help="CURVE key folder (from `run_guidance.py keys --out DIR`); default: ./keys")
    p.add_argument("--plain", action="store_true",
                   help="no authentication or encryption on the sockets (anyone on the host can listen or inject)")


def _curve_keys(args, role: str):
    """The role's CURVE keys from --keys, or None with --plain (said loudly)."""
    if args.plain:
        logging.getLogger("run_guidance").warning("%s: plain sockets (--plain): not authenticated, not encrypted",
                                                  role)
        return None
    from guidance.live.keys import load_keys

    return load_keys(args.keys, role)


def cmd_keys(args) -> int:
    from guidance.live.keys import make_keys

    files = make_keys(args.out)
    print(f"CURVE keys: {len(files) // 2} key pairs in {args.out} (give each process its .key_secret and "
          f"the .key files)")
    return 0


def _read_calibrations(paths: list[str]) -> list:
    """The calibration files of --calibration (calibration.files and its fitting modules are
    imported only when there are some: a pipeline without them starts sooner)."""
    if not paths:
        return []
    from calibration.files import read_calibration

    return [read_calibration(path) for path in paths]


def cmd_pipeline(args) -> int:
    keys = _curve_keys(args, "pipeline")

    def build():  # unsupervised: runs while the pipeline already beats ("starting")
        import time

        t0 = time.perf_counter()
        from guidance.live.calibrations import sort_calibrations
        from guidance.live.pipeline import Pipeline, PipelineSettings
        from guidance.registration.register import Registrator

        t1 = time.perf_counter()
        calibrations = sort_calibrations(_read_calibrations(args.calibration or []))
        settings = PipelineSettings(level=args.level, overlay=args.overlay, distortion=calibrations.distortion,
                                    carm=calibrations.carm, pivots=calibrations.pivots,
                                    detect_instruments=tuple(args.detect_instruments), max_frame_px=args.max_frame_px)
        subject = _subject(args)
        t2 = time.perf_counter()
        registrator = Registrator(subject.ct, labels=subject.labels, cache_dir=args.cache_dir)
        logging.getLogger("run_guidance").info(
            "pipeline built: modules imported in %.2f s, calibrations and CT in %.2f s, prepared CT in %.2f s",
            t1 - t0, t2 - t1, time.perf_counter() - t2)
        return Pipeline(registrator, plan=subject.plan, labels=subject.labels, ct=subject.ct, settings=settings)

    stop = _stop_on_signals()
    print(f"pipeline: frames from {', '.join(args.frame_endpoints)}, results on {args.result_endpoint}", flush=True)
    if not args.supervise:
        return _serve_pipeline(args, keys, build, stop)
    from guidance.live.supervisor import supervise

    def prepare():  # in the supervisor: everything that survives fork, nothing that starts a thread or a socket
        pipeline = build()
        pipeline.warm_up(parallel=False)
        return pipeline

    def work(pipeline, generation: int) -> int:  # in each forked worker
        return _serve_pipeline(args, keys, pipeline, stop, {"supervised": True, "generation": generation})

    return supervise(prepare, work, stop=stop, name="pipeline worker")


def _serve_pipeline(args, keys, pipeline, stop, heartbeat_stats=None) -> int:
    """``run_pipeline`` of a pipeline (or of its builder) with the OpenIGTLink bridge of
    --igtl-port; prints the stats when stopped."""
    from guidance.live.serve import run_pipeline

    bridge = None
    if args.igtl_port is not None:  # the bridge needs the CT: built before serving
        from guidance.live.igtl import IgtlBridge

        pipeline = pipeline() if callable(pipeline) else pipeline
        bridge = IgtlBridge(args.igtl_port, ct=pipeline.ct, plan=pipeline.plan, host=args.igtl_host,
                            image_hz=args.igtl_image_hz)
        print(f"pipeline: OpenIGTLink on {args.igtl_host}:{bridge.port}", flush=True)
    try:
        stats = run_pipeline(pipeline, max_frame_px=args.max_frame_px, frame_endpoints=args.frame_endpoints,
                             result_endpoint=args.result_endpoint, stop=stop, record_dir=args.record, sink=bridge,
                             keys=keys, heartbeat_stats=heartbeat_stats)
    finally:
        if bridge is not None:
            bridge.close()
    print(json.dumps(stats.as_dict(), indent=2))
    return 0


def cmd_display(args) -> int:
    from guidance.live.display import HeadlessWriter, WindowSink
    from guidance.live.display_client import run_display

    keys = _curve_keys(args, "display")
    subject = _subject(args)
    sink = HeadlessWriter(args.out, every_n=args.every) if args.headless else WindowSink(fallback_dir=args.out)
    stop = _stop_on_signals()
    try:
        size = tuple(int(v) for v in args.size.lower().split("x"))
        if len(size) != 2:
            raise ValueError
    except ValueError:
        raise UsageError(f"--size must be WIDTHxHEIGHT in pixels, e.g. 1600x900; got {args.size!r}") from None
    stats = run_display(frame_endpoint=args.frame_endpoint, result_endpoint=args.result_endpoint, ct=subject.ct,
                        plan=subject.plan, labels=subject.labels, sink=sink, stop=stop, refresh_hz=args.fps,
                        size=size, keys=keys, max_frame_px=args.max_frame_px)
    print(json.dumps(stats, indent=2))
    return 0


def _angle_pairs(texts: list[str] | None) -> list[tuple[float, float]]:
    """C-arm orientations given as 'lao,cranial' (deg)."""
    return [tuple(float(x) for x in text.split(",")) for text in texts or []]


def cmd_sim(args) -> int:
    from sim.stream import replay_recording, run_sim, run_video

    keys = _curve_keys(args, "sim")
    stop = _stop_on_signals()
    if args.replay:
        stats = replay_recording(args.replay, frame_endpoint=args.frame_endpoint,
                                 speed=None if args.fast else args.speed, stop=stop, keys=keys)
    elif args.dicom:
        from sim.stream import run_dicom_cine

        stats = run_dicom_cine(args.dicom, frame_endpoint=args.frame_endpoint, stop=stop, fps=args.fps,
                               loop=args.loop, isocenter_world=args.isocenter, startup_s=args.startup, keys=keys)
    elif args.video is not None:
        if not args.view:
            raise UsageError("--video needs --view (the static geometry of the video frames)")
        source = int(args.video) if args.video.isdigit() else args.video
        stats = run_video(source, args.view, frame_endpoint=args.frame_endpoint, fps=args.fps, stop=stop,
                          loop=args.loop, keys=keys)
    else:
        from sim.phantom import make_phantom
        from sim.scenario import Scenario

        _ct_options_need_ct(args)
        scenario = Scenario(duration_s=args.duration, fps=args.fps or 15.0, mode=args.mode, intensity=args.intensity,
                            instrument=None if args.instrument == "none" else args.instrument,
                            target_level=level_name(args.level), target_side=args.side, seed=args.seed,
                            lead_shots=tuple(_angle_pairs(args.lead_shots)), shot_interval_s=args.shot_interval,
                            instrument_medial_deg=args.medial_deg, target_world=args.target)
        phantom = _subject(args) if args.ct else make_phantom(seed=args.phantom_seed)
        print(f"sim: {scenario.mode} {scenario.duration_s:.0f} s at {scenario.fps:g} fps on {args.frame_endpoint}",
              flush=True)
        stats = run_sim(scenario, phantom, frame_endpoint=args.frame_endpoint, speed=None if args.fast else args.speed,
                        stop=stop, startup_s=args.startup, prerender=args.prerender, intraop_at_s=args.intraop_at,
                        keys=keys)
    print(json.dumps(stats, indent=2))
    return 0


def cmd_screens(args) -> int:
    from guidance.tools.screens import reference_screens

    for path in reference_screens(args.out, seed=args.seed, medial_deg=args.medial_deg):
        print(path)
    return 0


def cmd_demo(args) -> int:
    from guidance.tools.demo import format_summary, run_demo

    report = run_demo(args.out, duration_s=args.duration, fps=args.fps, igtl_port=args.igtl_port,
                      intraop_at_s=0.5 if args.intraop else None, medial_deg=args.medial_deg,
                      with_display=not args.no_display, tracked=not args.no_tracker, speed=args.speed)
    print("\n" + format_summary(report.summary()))
    screens = "" if args.no_display else f"navigation screens: {args.out}/screen_*.png; "
    print(f"{screens}recording: {args.out}/recording-*")
    return 0


def cmd_dicom_receive(args) -> int:
    from guidance.live.dicom_receive import DicomReceiver

    stop = _stop_on_signals()

    def on_series(series) -> None:
        print(f"{series.modality} series {series.series_uid}: {len(series.files)} files -> {series.folder}",
              flush=True)

    with DicomReceiver(args.out, port=args.port, ae_title=args.ae_title, host=args.host,
                       on_series=on_series) as receiver:
        print(f"dicom-receive: AE {args.ae_title} on {args.host}:{receiver.port}, storing into {args.out}",
              flush=True)
        stop.wait()
    print(json.dumps({"stored": receiver.stored, "refused": receiver.refused}))
    return 0


def _old_spelling(p: argparse.ArgumentParser, option: str, dest: str, **kwargs) -> None:
    """The name an option had before (hidden from the help): scripts that start the live
    processes keep working while they move to the new name."""
    p.add_argument(option, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_guidance.py", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    p = command("phantom", "write the synthetic spine phantom: CT, labels, screw plan")
    p.add_argument("--out", required=True, help="output folder (ct.nii.gz, labels.nii.gz, plan.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantom's anatomical variation")
    p.add_argument("--spacing", type=float, default=1.0, help="voxel size (mm)")
    p.add_argument("--scoliosis", type=float, default=0.0, help="coronal Cobb angle (deg, > 0 convex to the left)")
    p.add_argument("--sacrum", action="store_true", help="include the sacrum below L5")
    p.set_defaults(func=cmd_phantom)

    p = command("render", "simulate an X-ray image and write it with its view file (<image name>.view.json)")
    _add_ct_arguments(p)
    p.add_argument("--view", help="view file; default: a C-arm view from the options below")
    p.add_argument("--lao", type=float, default=0.0, help="C-arm LAO angle (deg; RAO < 0)")
    p.add_argument("--cranial", type=float, default=0.0, help="C-arm cranial angle (deg; caudal < 0)")
    p.add_argument("--sdd", type=float, default=1000.0, help="source to detector (mm)")
    p.add_argument("--sid", type=float, default=600.0, help="source to isocentre (mm)")
    p.add_argument("--size", type=int, default=512, help="detector pixels per side")
    p.add_argument("--pitch", type=float, default=0.6, help="detector pixel pitch (mm)")
    p.add_argument("--position", choices=("prone", "supine"), default="prone", help="patient position")
    p.add_argument("--aim", help="isocentre x,y,z (world LPS mm); default: the --level's centroid, else the "
                   "labelled spine's, else the CT's centre")
    p.add_argument("--level", type=level, help="aim at this vertebra's centroid (name like L3 or label id; "
                   "needs labels)")
    p.add_argument("--intensity", choices=INTENSITY_KINDS, default="raw",
                   help="pixel kind: raw counts (16-bit, stretched to full range, raw_scale in the view), "
                   "display (8-bit) or line_integral (float .mha)")
    p.add_argument("--dose", type=float, default=1.0, help="relative dose (noise ~ 1 / sqrt(dose))")
    p.add_argument("--distortion-k1", type=float, default=0.0, help="pincushion distortion coefficient (0 = none)")
    p.add_argument("--no-noise", action="store_true", help="noise-free expected image")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--out", required=True, help="image file (.png/.tif for raw/display, .mha for line_integral)")
    p.set_defaults(func=cmd_render)

    p = command("bench", "benchmarks that print a table")
    p.add_argument("what", choices=("drr", "latency", "register3d", "calibration", "igtl", "reliability", "breach",
                                    "instruments"),
                   help="what to measure")
    p.add_argument("--duration", type=float,
                   help="latency, igtl: scenario length (s, default 120); reliability: memory phase (s, default 600)")
    p.add_argument("--out", default="out/bench_latency", help="latency, reliability: output folder")
    p.add_argument("--speed", type=float, default=1.0,
                   help="latency: simulator pace (1.0 real time; lower on a machine too loaded to keep up)")
    p.add_argument("--single-view", action="store_true",
                   help="latency: AP fluoroscopy alone, without the AP and lateral shots first (for comparison)")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument("--repeats", type=int, default=20, help="drr: renders per case")
    p.add_argument("--shared-data", default=str(SHARED_DATA), help="folder of the real CT data")
    _add_real_ct_scenario_arguments(p, "latency")
    p.add_argument("--seed", type=int, default=0, help="breach: seed of the first phantom and of the simulated paths")
    p.add_argument("--phantoms", type=int, default=2, help="breach: phantoms (seeds seed, seed + 1, ...)")
    p.add_argument("--cases", type=int, default=40, help="instruments: biplane cases")
    p.add_argument("--trials", type=int, default=5,
                   help="calibration: seeds per C-arm case (pivot: 4x as many); the table takes the worst")
    p.add_argument("--free-frames", type=int, default=100, help="instruments: instrument-free frames")
    p.add_argument("--detector-px", type=int, default=512,
                   help="instruments: detector side (pixels; 307.2 mm wide)")
    p.set_defaults(func=cmd_bench)

    p = command("register", "2D/3D registration of X-ray images to a CT")
    _add_ct_arguments(p)
    p.add_argument("--image", action="append", required=True, help="X-ray image (repeat for more views)")
    p.add_argument("--view", action="append", help="its view file with the initial guess; without --view the "
                   "images must be XA/RF DICOM (geometry from their tags, isocentre at the CT centre)")
    p.add_argument("--level", type=level, help="register this vertebra alone (name like L3 or label id)")
    p.add_argument("--all-levels", action="store_true", help="also register every labelled vertebra (needs labels)")
    _add_cache_argument(p)
    p.add_argument("--out", required=True, help="result JSON")
    p.set_defaults(func=cmd_register)

    p = command("register3d", "rigid 3D/3D registration of an intra-op CT to the pre-op CT")
    p.add_argument("--fixed", required=True, help="pre-operative CT")
    p.add_argument("--moving", required=True, help="intra-operative CT / CBCT")
    p.add_argument("--labels", help="labels on the fixed grid, to register one vertebra (with --level)")
    p.add_argument("--level", type=level, help="the vertebra to register (name like L3 or label id; with --labels)")
    p.add_argument("--out", required=True, help="result JSON (T_moving_from_fixed, metric, time)")
    p.set_defaults(func=cmd_register3d)

    p = command("evaluate", "registration benchmark: success rate, capture range, mTRE, mPD, time")
    _add_ct_arguments(p)
    p.add_argument("--level", type=level, help="register this vertebra alone (name like L3 or label id)")
    p.add_argument("--intensity", nargs="+", default=["raw", "display"], choices=INTENSITY_KINDS,
                   help="pixel kinds of the test images, one benchmark each")
    p.add_argument("--biplane", action="store_true", help="AP + lateral pairs sharing one correction")
    p.add_argument("--views", type=int, default=6, help="views (or view pairs) per set")
    p.add_argument("--starts", type=int, default=5, help="starts per initial-mTRE bin and view")
    p.add_argument("--bins", type=bins, default=",".join(f"{lo:g}-{hi:g}" for lo, hi in DEFAULT_BINS),
                   help="initial-mTRE bins lo-hi (mm), comma-separated")
    p.add_argument("--detector-px", type=int, default=256, help="detector pixels per side (307 mm wide)")
    p.add_argument("--scheduler", choices=("local", "processes", "dask"),
                   help="who registers the cases: this process, a local process pool, or a Dask cluster; "
                   "default: processes with --jobs, else local")
    p.add_argument("--jobs", type=int, help="processes (pool) or Dask workers of a new LocalCluster; "
                   "default: one per core")
    p.add_argument("--dask-address", help="scheduler address of an existing Dask cluster (tcp://HOST:PORT); "
                   "default: a new LocalCluster on this machine")
    p.add_argument("--seed", type=int, default=0, help="seed of views, starts and noise")
    p.add_argument("--external", help="score an external set folder (cases.json, images, views, targets)")
    p.add_argument("--clinical-grid", action="store_true",
                   help="resample the CT onto 512 x 512 x 133 voxels of 0.7 x 0.7 x 2.5 mm (phantom built at 0.7 mm)")
    p.add_argument("--out", required=True, help="report folder (JSON, markdown, PNG plots)")
    p.set_defaults(func=cmd_evaluate)

    p = command("compare", "registration settings against each other on a stored set, alternating per case")
    p.add_argument("--set", required=True, help="a stored benchmark set (evaluate's OUT/<kind>/set, or --external's)")
    _add_ct_arguments(p)
    p.add_argument("--clinical-grid", action="store_true",
                   help="the set was made on the clinical grid: resample the CT (or build the phantom) as evaluate did")
    p.add_argument("--variant", nargs="+", action="extend", required=True,
                   help="settings to compare with the reference, each 'name=value;name=value' "
                   "(RegistrationSettings fields, Python literals); repeat the flag or list several")
    p.add_argument("--reference", default="", help="the reference's settings (default: the defaults)")
    p.add_argument("--every", type=int, default=1, help="take every n-th case of the set")
    p.add_argument("--json", help="also write the comparison and every record as JSON to this file")
    p.set_defaults(func=cmd_compare)

    p = command("calibrate", "C-arm geometry, image-intensifier distortion or pivot calibration")
    p.add_argument("kind", choices=("carm", "distortion", "pivot"), help="what to calibrate")
    p.add_argument("--images", nargs="+", help="exposures (each with <name>.view.json), or the poses file (pivot)")
    p.add_argument("--simulate", action="store_true", help="simulate the inputs with known truth")
    p.add_argument("--angles", nargs="+", help="carm: C-arm orientations 'lao,cranial' (deg) to simulate")
    p.add_argument("--amplitude-px", type=float, default=10.0, help="distortion: simulated edge distortion (px)")
    p.add_argument("--method", choices=("linear", "sphere"), default="linear", help="pivot: solver")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated inputs")
    p.add_argument("--out", required=True, help="calibration JSON (a PNG report is written beside it)")
    p.set_defaults(func=cmd_calibrate)

    p = command("sim", "simulator: stream a scenario, replay a recording, or a video source")
    p.add_argument("--phantom-seed", type=int, default=0, help="seed of the embedded phantom")
    p.add_argument("--frame-endpoint", default="tcp://127.0.0.1:5555", help="endpoint to publish frames on (bound)")
    _old_spelling(p, "--frames", "frame_endpoint")
    p.add_argument("--duration", type=float, default=20.0, help="scenario length (s)")
    p.add_argument("--fps", type=float, help="frame rate (Hz); default 15, video: the file's own")
    p.add_argument("--mode", choices=("fluoro", "shots"), default="fluoro",
                   help="continuous fluoroscopy, or single shots every 2 s")
    p.add_argument("--intensity", choices=INTENSITY_KINDS, default="raw", help="pixel kind of the frames")
    p.add_argument("--instrument", default="kwire", help="instrument name, or 'none'")
    p.add_argument("--level", type=level, default="L3",
                   help="lumbar vertebra whose planned trajectory the instrument follows (name or label id)")
    p.add_argument("--side", choices=("left", "right"), default="left", help="side of that trajectory")
    p.add_argument("--medial-deg", type=float, default=0.0,
                   help="turn the instrument's path medially by this angle about the entry (deg; negative: laterally)")
    p.add_argument("--seed", type=int, default=0, help="seed of patient motion, tracker and image noise")
    p.add_argument("--speed", type=float, default=1.0, help="1.0 real time, 2.0 twice as fast")
    p.add_argument("--fast", action="store_true", help="as fast as possible")
    p.add_argument("--startup", type=float, default=0.5, help="time to let subscribers connect first (s)")
    p.add_argument("--prerender", action="store_true",
                   help="render all images before streaming (benchmarks: the simulated C-arm costs no CPU then)")
    p.add_argument("--lead-shots", nargs="+", metavar="LAO,CRANIAL",
                   help="fluoro: single shots at these C-arm angles first (e.g. 0,0 90,0: AP, lateral)")
    p.add_argument("--shot-interval", type=float, default=2.0, help="seconds between shots")
    p.add_argument("--intraop-at", type=float, metavar="S",
                   help="also send an intra-op CBCT-like scan of the patient at this scenario time (s)")
    p.add_argument("--replay", help="re-publish a recording folder instead of simulating")
    p.add_argument("--video", help="video file or capture device number to publish instead")
    p.add_argument("--view", help="view file of the video frames")
    p.add_argument("--loop", action="store_true", help="video, DICOM cine: start over at the end")
    p.add_argument("--dicom", help="XA/RF DICOM file (multi-frame cine) to replay as live frames, each with the "
                   "view from its tags (fps: --fps, else the file's FrameTime)")
    p.add_argument("--isocenter", type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=("X", "Y", "Z"),
                   help="--dicom: the C-arm isocentre in CT coordinates (LPS mm), the registration's first guess")
    _add_real_ct_scenario_arguments(p, "scenario")
    _add_security_arguments(p)
    p.set_defaults(func=cmd_sim)

    p = command("screens", "reference navigation screens from the simulator (no sockets), as PNG")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantom")
    p.add_argument("--medial-deg", type=float, default=8.0, help="medial drift of the K-wire's path (deg)")
    p.set_defaults(func=cmd_screens)

    p = command("demo", "sim + pipeline + display on loopback; prints pose error, latency, fps")
    p.add_argument("--out", default="out/demo", help="screens and recording (an earlier demo's are removed)")
    p.add_argument("--duration", type=float, default=20.0, help="scenario length (s)")
    p.add_argument("--fps", type=float, default=15.0, help="fluoroscopy frame rate (Hz)")
    p.add_argument("--igtl-port", type=int, help="the pipeline also serves OpenIGTLink (3D Slicer) on this port")
    p.add_argument("--no-display", action="store_true",
                   help="sim and pipeline only, no navigation display (e.g. when watching in 3D Slicer)")
    p.add_argument("--intraop", action="store_true",
                   help="the simulator also sends an intra-op CBCT-like scan, registered and used for instruments")
    p.add_argument("--medial-deg", type=float, default=8.0,
                   help="the K-wire drifts medially by this angle (deg), so the breach warning shows (0: on plan)")
    p.add_argument("--speed", type=float, default=1.0,
                   help="simulator pace (1.0 real time; lower on a machine too loaded to keep up)")
    p.add_argument("--no-tracker", action="store_true",
                   help="fluoroscopy alone: no tracker samples; the pipeline finds the K-wire in the images and the "
                   "summary scores its tip against the simulator's; the K-wire is docked on the bone at the entry and "
                   "rests for the AP and lateral shots and the first 4 s of fluoroscopy, as a surgeon does, and the "
                   "detector has 512 px")
    p.set_defaults(func=cmd_demo)

    p = command("dicom-receive", "DICOM C-STORE receiver: stores incoming CT and X-ray series, "
                "one folder per series, never overwriting")
    p.add_argument("--port", type=int, required=True, help="TCP port to listen on (104 is DICOM's, needs root)")
    p.add_argument("--ae-title", default="GUIDANCE", help="our application entity title")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--out", required=True, help="folder for the received series")
    p.set_defaults(func=cmd_dicom_receive)

    p = command("pipeline", "live registration/tracking: SUB frames + tracker, PUB poses")
    _add_ct_arguments(p, plan=True)
    p.add_argument("--level", type=level, help="register this vertebra alone (name like L3 or label id)")
    p.add_argument("--frame-endpoints", nargs="+", default=["tcp://127.0.0.1:5555"],
                   help="endpoints to subscribe to for frames and tracker samples")
    p.add_argument("--result-endpoint", default="tcp://127.0.0.1:5556", help="endpoint to publish results on (bound)")
    _old_spelling(p, "--frames", "frame_endpoints", nargs="+")
    _old_spelling(p, "--results", "result_endpoint")
    p.add_argument("--overlay", action="store_true", help="also publish an overlay picture per frame")
    p.add_argument("--record", help="record every input and output message into this folder")
    _add_cache_argument(p)
    p.add_argument("--calibration", nargs="+", metavar="FILE",
                   help="calibration files (guidance.calibration/1): C-arm (K per orientation from its angle "
                   "table), image-intensifier distortion, instrument pivots; frames of another size or device "
                   "(source id) and instruments that do not match are refused")
    p.add_argument("--igtl-port", type=int, help="also serve OpenIGTLink (3D Slicer) on this port "
                   "(Slicer's default is 18944); default: off")
    p.add_argument("--igtl-host", default="127.0.0.1", help="OpenIGTLink address to bind (default loopback only)")
    p.add_argument("--igtl-image-hz", type=float, default=2.0, help="cap on fluoro IMAGE messages per second")
    _add_max_frame_argument(p)
    p.add_argument("--detect-instruments", nargs="*", default=[], metavar="MODEL",
                   help="instrument models (e.g. kwire) to find in the images while no tracker reports one; "
                   "published as image-derived instrument states")
    p.add_argument("--supervise", action="store_true",
                   help="Linux: prepare once (modules, CT, prepared CT, one-thread DRR kernel) in a supervising "
                   "process and serve in a forked worker, forked again at once when it dies (a crash loop waits, "
                   "longer each time); SIGTERM/SIGINT stop both")
    _add_security_arguments(p)
    p.set_defaults(func=cmd_pipeline)

    p = command("display", "the navigation screen: fluoro + overlay, CT reslices at the tool tip")
    _add_ct_arguments(p, plan=True)
    p.add_argument("--frame-endpoint", default="tcp://127.0.0.1:5555", help="endpoint to subscribe to for frames")
    p.add_argument("--result-endpoint", default="tcp://127.0.0.1:5556", help="endpoint to subscribe to for poses")
    _old_spelling(p, "--frames", "frame_endpoint")
    _old_spelling(p, "--results", "result_endpoint")
    p.add_argument("--headless", action="store_true", help="write PNG screens instead of a window")
    p.add_argument("--every", type=int, default=1, help="headless: write every n-th screen")
    p.add_argument("--fps", type=float, default=10.0, help="screen refresh rate (Hz)")
    p.add_argument("--size", default="1600x900", help="screen size WIDTHxHEIGHT in pixels")
    p.add_argument("--out", default="out/screens", help="PNG folder (headless, or without a display)")
    _add_max_frame_argument(p)
    _add_security_arguments(p)
    p.set_defaults(func=cmd_display)

    p = command("keys", "make CURVE key pairs for sim, pipeline, display and monitor")
    p.add_argument("--out", required=True, help="new key folder (existing keys are never overwritten)")
    p.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's), configure threads and logging, run the
    subcommand; its exit status, or 2 after printing "error: ..." for bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_threads()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (GuidanceError, OSError) as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
