#!/usr/bin/env python3
"""The one command line of the guidance system: parses arguments, calls the library, prints.

Run ``python run_guidance.py --help`` for the subcommands.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from guidance.core.threads import configure_threads

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"


def _ct_and_labels(args):
    """(CT in HU, labels or None, plan or None) from --ct/--labels or the embedded phantom."""
    from guidance.core.volume import load_volume

    if getattr(args, "ct", None):
        labels = load_volume(args.labels, units="label") if getattr(args, "labels", None) else None
        return load_volume(args.ct), labels, None
    from sim.phantom import make_phantom

    phantom = make_phantom(seed=args.phantom_seed)
    return phantom.ct, phantom.labels, phantom.plan


def _add_ct_arguments(p: argparse.ArgumentParser, *, labels: bool = True) -> None:
    p.add_argument("--ct", help="pre-operative CT (NIfTI, MHA, NRRD or DICOM folder); default: embedded phantom")
    if labels:
        p.add_argument("--labels", help="label map on the CT grid (vertebra ids)")
    p.add_argument("--phantom-seed", type=int, default=0, help="seed of the embedded phantom (without --ct)")


def cmd_phantom(args) -> int:
    from sim.phantom import make_phantom, write_phantom

    phantom = make_phantom(seed=args.seed, spacing_mm=args.spacing, scoliosis_deg=args.scoliosis,
                           include_sacrum=args.sacrum)
    paths = write_phantom(phantom, args.out)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_render(args) -> int:
    from guidance.core.images import write_xray
    from guidance.core.views import carm_view, read_view, write_view
    from sim.xray import XrayParams, simulate_xray

    ct, _, _ = _ct_and_labels(args)
    if args.view:
        view = read_view(args.view)
    else:
        view = carm_view(lao_deg=args.lao, cranial_deg=args.cranial, source_to_detector_mm=args.sdd,
                         source_to_isocenter_mm=args.sid, detector_size_px=(args.size, args.size),
                         pixel_spacing_mm=(args.pitch, args.pitch), isocenter_world=ct.center_world(),
                         patient_position=args.position)
    params = XrayParams(dose=args.dose, distortion_k1=args.distortion_k1, seed=args.seed, noise=not args.no_noise)
    image, view = simulate_xray(ct, view, params, variant=args.variant)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_xray(image, out)
    view_path = out.with_name(out.name.split(".")[0] + ".view.json")
    write_view(view, view_path)
    print(f"image: {out}\nview: {view_path}")
    return 0


def cmd_bench(args) -> int:
    if args.what == "drr":
        from guidance.tools.bench import bench_drr, format_table

        rows = bench_drr(shared_data=Path(args.shared_data), repeats=args.repeats)
        print(format_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0
    if args.what == "register3d":
        from guidance.tools.bench import bench_register3d

        rows = bench_register3d(shared_data=Path(args.shared_data))
        print("| volume | grid | TRE mean mm | TRE max mm | time s | iterations |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['volume']} | {r['grid']} | {r['tre_mean_mm']:.3f} | {r['tre_max_mm']:.3f} | "
                  f"{r['time_s']:.2f} | {r['iterations']} |")
        return 0
    if args.what == "latency":
        from guidance.tools.demo import run_demo

        report = run_demo(args.out, duration_s=args.duration, with_display=False, print_rows=False, prerender=True)
        summary = report.summary()
        print("| measure | value |\n|---|---|")
        for k, v in summary.items():
            print(f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"summary": summary, "rows": report.rows}, indent=2))
        return 0
    from calibration.bench import format_table, run_calibration_benchmark

    rows = run_calibration_benchmark()
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def cmd_register(args) -> int:
    from guidance.core.images import preprocess, read_xray
    from guidance.registration.register import Registrator, register_levels
    from guidance.core.views import read_view

    if len(args.image) != len(args.view):
        print("error: give one --view per --image", file=sys.stderr)
        return 2
    ct, labels, _ = _ct_and_labels(args)
    views = [read_view(v) for v in args.view]
    images = [preprocess(read_xray(i), v) for i, v in zip(args.image, views)]
    registrator = Registrator(ct, labels=labels)
    if args.all_levels:
        levels = {str(n): n for n in sorted({int(x) for x in set(labels.data.ravel().tolist())} - {0})}
        result = register_levels(registrator, images, views, levels)
    else:
        result = registrator.register(images, views, level=args.level)
    Path(args.out).write_text(json.dumps(result.to_dict(), indent=2))
    print(f"{result.status}: {result.reason}; similarity {result.similarity:.3f}, confidence "
          f"{result.confidence:.2f}, {result.time_s:.2f} s -> {args.out}")
    return 0 if result.ok else 1


def cmd_register3d(args) -> int:
    from guidance.registration.register3d import register_volumes
    from guidance.core.volume import load_volume

    fixed = load_volume(args.fixed)
    moving = load_volume(args.moving)
    mask = None
    if args.labels:
        mask = load_volume(args.labels, units="label").data == args.level
    result = register_volumes(fixed, moving, fixed_mask=mask)
    Path(args.out).write_text(json.dumps(result.to_dict(), indent=2))
    print(f"metric {result.metric:.4f} after {result.iterations} iterations, {result.time_s:.2f} s "
          f"({result.stop_reason}) -> {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from guidance.evaluation.benchmark import evaluate, evaluate_external
    from sim.phantom import make_phantom

    if args.external:
        if not args.ct:
            print("error: --external needs --ct", file=sys.stderr)
            return 2
        summaries = {"external": evaluate_external(args.external, args.ct, labels_path=args.labels,
                                                   out_dir=args.out, jobs=args.jobs)}
    else:
        source = args.ct if args.ct else make_phantom(seed=args.phantom_seed)
        summaries = evaluate(source, out_dir=args.out, labels_path=args.labels, level=args.level,
                             variants=args.variant, biplane=args.biplane, n_views=args.views,
                             n_starts_per_bin=args.starts, detector_px=args.detector_px, jobs=args.jobs,
                             seed=args.seed)
    for name, summary in summaries.items():
        print(f"\n## {name}")
        print(json.dumps({k: summary[k] for k in summary if k != "bins"}, indent=2))
    print(f"\nreports: {args.out}")
    return 0


def cmd_calibrate(args) -> int:
    from calibration.cli import calibrate_carm, calibrate_distortion, calibrate_pivot

    if not args.simulate and not args.images:
        print("error: give --images (or --poses for pivot) or --simulate", file=sys.stderr)
        return 2
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
    """A threading.Event set by SIGINT/SIGTERM: signal handling belongs to the entry point."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_pipeline(args) -> int:
    from guidance.live.pipeline import Pipeline, PipelineSettings, run_pipeline
    from guidance.registration.register import Registrator

    ct, labels, plan = _ct_and_labels(args)
    if args.plan:
        from guidance.core.plan import read_plan

        plan = read_plan(args.plan)
    distortion = None
    if args.calibration:
        from calibration.files import read_calibration

        distortion = read_calibration(args.calibration)
    stop = _stop_on_signals()
    pipeline = Pipeline(Registrator(ct, labels=labels), plan=plan, labels=labels,
                        settings=PipelineSettings(level=args.level, overlay=args.overlay, distortion=distortion))
    print(f"pipeline: frames from {', '.join(args.frames)}, results on {args.results}", flush=True)
    stats = run_pipeline(pipeline, frame_endpoints=args.frames, result_endpoint=args.results, stop=stop,
                         record_dir=args.record)
    print(json.dumps(stats.as_dict(), indent=2))
    return 0


def cmd_display(args) -> int:
    from guidance.live.display import HeadlessWriter, WindowSink
    from guidance.live.display_client import run_display

    ct, labels, plan = _ct_and_labels(args)
    if args.plan:
        from guidance.core.plan import read_plan

        plan = read_plan(args.plan)
    sink = HeadlessWriter(args.out, every_n=args.every) if args.headless else WindowSink(fallback_dir=args.out)
    stop = _stop_on_signals()
    stats = run_display(frame_endpoint=args.frames, result_endpoint=args.results, ct=ct, plan=plan, labels=labels,
                        sink=sink, stop=stop, refresh_hz=args.fps)
    print(json.dumps(stats, indent=2))
    return 0


def cmd_sim(args) -> int:
    from sim.stream import replay_recording, run_sim, run_video

    stop = _stop_on_signals()
    if args.replay:
        stats = replay_recording(args.replay, frame_endpoint=args.frames, speed=None if args.fast else args.speed,
                                 stop=stop)
    elif args.video is not None:
        if not args.view:
            print("error: --video needs --view (the static geometry of the video frames)", file=sys.stderr)
            return 2
        source = int(args.video) if args.video.isdigit() else args.video
        stats = run_video(source, args.view, frame_endpoint=args.frames, fps=args.fps, stop=stop, loop=args.loop)
    else:
        from sim.phantom import make_phantom
        from sim.scenario import Scenario

        scenario = Scenario(duration_s=args.duration, fps=args.fps or 15.0, mode=args.mode, variant=args.variant,
                            instrument=None if args.instrument == "none" else args.instrument,
                            target_level=args.level_name, target_side=args.side, seed=args.seed)
        phantom = make_phantom(seed=args.phantom_seed)
        print(f"sim: {scenario.mode} {scenario.duration_s:.0f} s at {scenario.fps:g} fps on {args.frames}", flush=True)
        stats = run_sim(scenario, phantom, frame_endpoint=args.frames, speed=None if args.fast else args.speed,
                        stop=stop, startup_s=args.startup, prerender=args.prerender)
    print(json.dumps(stats, indent=2))
    return 0


def cmd_demo(args) -> int:
    from guidance.tools.demo import run_demo

    report = run_demo(args.out, duration_s=args.duration, fps=args.fps)
    summary = report.summary()
    lines = [f"{k:28s} {v:.3g}" if isinstance(v, float) else f"{k:28s} {v}" for k, v in summary.items()]
    print("\n" + "\n".join(lines))
    print(f"navigation screens: {args.out}/screen_*.png; recording: {args.out}/recording-*")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_guidance.py", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write the synthetic spine phantom: CT, labels, screw plan")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spacing", type=float, default=1.0, help="voxel size (mm)")
    p.add_argument("--scoliosis", type=float, default=0.0, help="coronal Cobb angle (deg)")
    p.add_argument("--sacrum", action="store_true")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("render", help="simulate an X-ray image and write it with its view file")
    _add_ct_arguments(p, labels=False)
    p.add_argument("--phantom", action="store_true", help="use the embedded phantom (the default without --ct)")
    p.add_argument("--view", help="view file; default: a C-arm view from the options below")
    p.add_argument("--lao", type=float, default=0.0)
    p.add_argument("--cranial", type=float, default=0.0)
    p.add_argument("--sdd", type=float, default=1000.0, help="source to detector (mm)")
    p.add_argument("--sid", type=float, default=600.0, help="source to isocentre (mm)")
    p.add_argument("--size", type=int, default=512, help="detector pixels per side")
    p.add_argument("--pitch", type=float, default=0.6, help="detector pixel pitch (mm)")
    p.add_argument("--position", choices=("prone", "supine"), default="prone")
    p.add_argument("--variant", choices=("raw", "display", "line_integral"), default="raw")
    p.add_argument("--dose", type=float, default=1.0)
    p.add_argument("--distortion-k1", type=float, default=0.0)
    p.add_argument("--no-noise", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="image file (.png/.tif for raw/display, .mha for line_integral)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("bench", help="benchmarks that print a table")
    p.add_argument("what", choices=("drr", "latency", "register3d", "calibration"))
    p.add_argument("--duration", type=float, default=120.0, help="latency: scenario length (s)")
    p.add_argument("--out", default="out/bench_latency", help="latency: recording folder")
    p.add_argument("--json", help="also write the rows as JSON")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--shared-data", default=str(SHARED_DATA))
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("register", help="2D/3D registration of X-ray images to a CT")
    _add_ct_arguments(p)
    p.add_argument("--image", action="append", required=True, help="X-ray image (repeat for more views)")
    p.add_argument("--view", action="append", required=True, help="its view file with the initial guess")
    p.add_argument("--level", type=int, help="register this vertebra (label id) alone")
    p.add_argument("--all-levels", action="store_true", help="also register every labelled vertebra")
    p.add_argument("--out", required=True, help="result JSON")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("register3d", help="rigid 3D/3D registration of an intra-op CT to the pre-op CT")
    p.add_argument("--fixed", required=True, help="pre-operative CT")
    p.add_argument("--moving", required=True, help="intra-operative CT / CBCT")
    p.add_argument("--labels", help="labels on the fixed grid, to register one vertebra (--level)")
    p.add_argument("--level", type=int)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_register3d)

    p = sub.add_parser("evaluate", help="registration benchmark: success rate, capture range, mTRE, mPD, time")
    _add_ct_arguments(p)
    p.add_argument("--level", help="register this vertebra alone (label id or name, e.g. L3)")
    p.add_argument("--variant", nargs="+", default=["raw", "display"], choices=("raw", "display", "line_integral"))
    p.add_argument("--biplane", action="store_true", help="AP + lateral pairs sharing one correction")
    p.add_argument("--views", type=int, default=6, help="views (or view pairs) per set")
    p.add_argument("--starts", type=int, default=5, help="starts per initial-mTRE bin and view")
    p.add_argument("--detector-px", type=int, default=256)
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--external", help="score an external set folder (cases.json, images, views, targets)")
    p.add_argument("--out", required=True, help="report folder (JSON, markdown, PNG plots)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="C-arm geometry, image-intensifier distortion or pivot calibration")
    p.add_argument("kind", choices=("carm", "distortion", "pivot"))
    p.add_argument("--images", nargs="+", help="exposures (each with <name>.view.json), or the poses file (pivot)")
    p.add_argument("--simulate", action="store_true", help="simulate the inputs with known truth")
    p.add_argument("--angles", nargs="+", help="carm: C-arm orientations 'lao,cranial' to simulate")
    p.add_argument("--amplitude-px", type=float, default=10.0, help="distortion: simulated edge distortion (px)")
    p.add_argument("--method", choices=("linear", "sphere"), default="linear", help="pivot: solver")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="calibration JSON (a PNG report is written beside it)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("sim", help="simulator: stream a scenario, replay a recording, or a video source")
    p.add_argument("--phantom-seed", type=int, default=0)
    p.add_argument("--frames", default="tcp://127.0.0.1:5555", help="endpoint to publish on (bound)")
    p.add_argument("--duration", type=float, default=20.0, help="scenario length (s)")
    p.add_argument("--fps", type=float, help="frame rate (default 15; video: the file's own)")
    p.add_argument("--mode", choices=("fluoro", "shots"), default="fluoro")
    p.add_argument("--variant", choices=("raw", "display", "line_integral"), default="raw")
    p.add_argument("--instrument", default="kwire", help="instrument name, or 'none'")
    p.add_argument("--level-name", default="L3", help="vertebra whose planned trajectory the instrument follows")
    p.add_argument("--side", choices=("left", "right"), default="left")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed", type=float, default=1.0, help="1.0 real time, 2.0 twice as fast")
    p.add_argument("--fast", action="store_true", help="as fast as possible")
    p.add_argument("--startup", type=float, default=0.5, help="seconds to let subscribers connect first")
    p.add_argument("--prerender", action="store_true",
                   help="render all images before streaming (benchmarks: the simulated C-arm costs no CPU then)")
    p.add_argument("--replay", help="re-publish a recording folder instead of simulating")
    p.add_argument("--video", help="video file or capture device number to publish instead")
    p.add_argument("--view", help="view file of the video frames")
    p.add_argument("--loop", action="store_true", help="video: start over at the end")
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser("demo", help="sim + pipeline + display on loopback; prints pose error, latency, fps")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--fps", type=float, default=15.0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pipeline", help="live registration/tracking: SUB frames + tracker, PUB poses")
    _add_ct_arguments(p)
    p.add_argument("--plan", help="screw plan JSON (guidance.plan/1); default: the phantom's")
    p.add_argument("--level", type=int, help="register this vertebra (label id) alone")
    p.add_argument("--frames", nargs="+", default=["tcp://127.0.0.1:5555"], help="frame/tracker endpoints")
    p.add_argument("--results", default="tcp://127.0.0.1:5556", help="endpoint to publish results on (bound)")
    p.add_argument("--overlay", action="store_true", help="also publish an overlay picture per frame")
    p.add_argument("--record", help="record every input and output message into this folder")
    p.add_argument("--calibration", help="image-intensifier distortion calibration (guidance.calibration/1) "
                   "applied to every frame; frames of another size or device (source id) are refused")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("display", help="the navigation screen: fluoro + overlay, CT reslices at the tool tip")
    _add_ct_arguments(p)
    p.add_argument("--plan", help="screw plan JSON (guidance.plan/1); default: the phantom's")
    p.add_argument("--frames", default="tcp://127.0.0.1:5555")
    p.add_argument("--results", default="tcp://127.0.0.1:5556")
    p.add_argument("--headless", action="store_true", help="write PNG screens instead of a window")
    p.add_argument("--every", type=int, default=1, help="headless: write every n-th screen")
    p.add_argument("--fps", type=float, default=10.0, help="screen refresh rate")
    p.add_argument("--out", default="out/screens", help="PNG folder (headless, or without a display)")
    p.set_defaults(func=cmd_display)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_threads()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
