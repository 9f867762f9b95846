"""Evaluation harness: benchmark sets (simulated or on disk), summaries and reports.

Standard 2D/3D methodology (docs/conventions.md, "Accuracy metrics"; the metrics are
in ``guidance.evaluation.metrics``, the runners in ``guidance.evaluation.runners``): a
benchmark case is one registration problem (one view, or a biplane pair) with a
ground-truth pose per view, an initial guess per view and target points X_k (world LPS
mm) inside the anatomy of interest.

Test images come from the project's one X-ray model, ``sim.xray`` (full CT with soft
tissue at its energy and sampling, Poisson noise, detector blur, the intensity kind),
so they differ from what registration renders (bone only, another energy, a one-voxel
step: no "inverse crime").

A benchmark set on disk is a folder: ``cases.json`` lists the cases; each case names,
per view, its image (raw: 16-bit PNG, display: 8-bit PNG, line integral: float .mha),
its ground-truth view file and its initial-guess view file (``*.view.json``), and a
targets file (JSON list of [x, y, z] world points). Researchers can score their own
data by writing that layout by hand (see ``load_benchmark_set``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.optimize

from guidance.core.geometry import make_rigid, rotation_about_axis
from guidance.core.images import POLARITIES, read_xray, write_xray
from guidance.core.jsonfile import read_json
from guidance.core.levels import level_label
from guidance.core.machine import machine_description, machine_line
from guidance.core.views import View, check_intensity, carm_view, read_view, write_view
from guidance.core.volume import Volume, clinical_grid
from guidance.evaluation.metrics import (
    CAPTURE_MIN_RATE,
    DEFAULT_BINS,
    SUCCESS_MM,
    EvaluationError,
    capture_range_of_rates,
    mtre,
    success_rates,
    target_array,
    target_points,
)
from guidance.evaluation.runners import run_benchmark
from guidance.registration.register import RegistrationSettings
from sim.phantom import Phantom
from sim.subject import Subject, load_subject
from sim.xray import AEC_PHOTONS, RAW_I0, XrayParams, acquire, auto_exposure, labelled_view, prepare_anatomy

__all__ = [
    "BENCHMARK_SCHEMA",
    "BenchmarkCase",
    "perturbation",
    "make_benchmark_set",
    "write_benchmark_set",
    "load_benchmark_set",
    "summarize",
    "quantile",
    "benchmark_subject",
    "write_report",
    "evaluate",
    "evaluate_external",
]

log = logging.getLogger(__name__)

BENCHMARK_SCHEMA = "guidance.benchmark/1"

DETECTOR_MM = 307.2  # detector side: 256 px at 1.2 mm, the lumbar spine fills it at ~1.7x
# C-arm angles of successive views (LAO deg): AP, lateral, obliques; each jittered.
_LAO_ANCHORS = (0.0, 90.0, -45.0, 45.0, -90.0, 20.0, -20.0, 65.0, -65.0)


# ------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class BenchmarkCase:
    """One registration problem with its answer (picklable, for process pools).

    ``images[i]`` is the pixel array seen in view i (as stored: uint16 raw, uint8
    display or float32 line integral); ``views_init[i]`` carries the initial guess and
    ``views_gt[i]`` the ground truth ``T_cam_from_world``; ``view_ids[i]`` names the
    acquisition (cases that share an image share its id). ``targets_world`` (N, 3) mm.
    ``level``: label id registered alone, None for the whole CT. ``bin_mm``: the
    initial-mTRE bin the start was drawn for (None for external sets).
    """

    case_id: str
    view_ids: tuple[str, ...]
    images: tuple[np.ndarray, ...]
    views_init: tuple[View, ...]
    views_gt: tuple[View, ...]
    targets_world: np.ndarray
    level: int | None = None
    bin_mm: tuple[float, float] | None = None
    polarity: str = "bone_dark"

    def __post_init__(self) -> None:
        n = len(self.images)
        if n == 0 or not len(self.view_ids) == len(self.views_init) == len(self.views_gt) == n:
            raise EvaluationError(f"case {self.case_id}: need one id, image, initial and true view per view")
        for img, v_init, v_gt in zip(self.images, self.views_init, self.views_gt):
            if not img.shape == v_init.shape == v_gt.shape:
                raise EvaluationError(f"case {self.case_id}: image {img.shape} does not fit its views "
                                      f"{v_init.shape} (initial), {v_gt.shape} (ground truth)")
        if self.polarity not in POLARITIES:
            raise EvaluationError(f"polarity must be one of {', '.join(POLARITIES)}; got {self.polarity!r}")
        object.__setattr__(self, "targets_world", target_array(self.targets_world))

    def initial_mtre(self) -> float:
        """mTRE (mm) of the initial guess, mean over the views."""
        return float(np.mean([mtre(vi.T_cam_from_world, vg.T_cam_from_world, self.targets_world)
                              for vi, vg in zip(self.views_init, self.views_gt)]))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def perturbation(
    targets_world: np.ndarray,
    centre_world: np.ndarray,
    mtre_mm: float,
    *,
    rng: np.random.Generator,
    max_rotation_deg: float = 15.0,
) -> np.ndarray:
    """A random rigid motion ``P`` of the world about ``centre_world`` (mm) whose mTRE on
    the targets, mean ||P X_k - X_k||, equals ``mtre_mm``.

    Rotation axis and translation direction are uniform on the sphere; a random share
    of the error comes from the rotation (angle at most ``max_rotation_deg``), the
    rest from the translation. A start is ``T_cam_init = T_cam_gt @ P`` for every view
    of a case, so the correction registration should find is ``P`` itself
    (docs/conventions.md) and the initial mTRE is ``mtre_mm`` in every view.
    """
    X = target_array(targets_world)
    c = np.asarray(centre_world, dtype=float).reshape(3)
    axis, direction = _unit(rng.normal(size=3)), _unit(rng.normal(size=3))
    rel = X - c
    radius = float(np.mean(np.linalg.norm(np.cross(axis, rel), axis=1)))
    share = rng.uniform()
    half_chord = min(1.0, share * mtre_mm / (2.0 * max(radius, 1e-9)))
    angle = min(np.rad2deg(2.0 * np.arcsin(half_chord)), max_rotation_deg)
    R = rotation_about_axis(axis, angle)
    moved = rel @ (R - np.eye(3)).T

    def excess(tau: float) -> float:
        return float(np.mean(np.linalg.norm(moved + tau * direction, axis=1))) - mtre_mm

    tau = 0.0 if excess(0.0) >= 0 else scipy.optimize.brentq(excess, 0.0, 2.0 * mtre_mm, xtol=1e-9)
    return make_rigid(R, c - R @ c + tau * direction)


def _acquisitions(
    centre: np.ndarray, rng: np.random.Generator, *, n_views: int, detector_px: int, biplane: bool
) -> list[tuple[View, ...]]:
    """C-arm geometries (line-integral views): single views spread over AP, lateral and
    obliques, or biplane pairs (AP-ish + lateral-ish, ~90 deg apart, one isocentre)."""
    pitch = DETECTOR_MM / detector_px
    out = []
    for i in range(n_views):
        iso = centre + np.clip(rng.normal(0.0, 5.0, 3), -10.0, 10.0)
        if biplane:
            lao_a = rng.uniform(-10.0, 10.0)
            angles = [(lao_a, rng.uniform(-10.0, 10.0)),
                      (lao_a - 90.0 if lao_a > 0 else lao_a + 90.0, rng.uniform(-10.0, 10.0))]
        else:
            anchor = _LAO_ANCHORS[i] if i < len(_LAO_ANCHORS) else rng.uniform(-90.0, 90.0)
            angles = [(float(np.clip(anchor + rng.uniform(-5.0, 5.0), -90.0, 90.0)), rng.uniform(-20.0, 20.0))]
        out.append(tuple(
            carm_view(lao_deg=lao, cranial_deg=cranial, source_to_detector_mm=rng.uniform(1000.0, 1200.0),
                      source_to_isocenter_mm=rng.uniform(600.0, 700.0), detector_size_px=(detector_px,) * 2,
                      pixel_spacing_mm=(pitch, pitch), isocenter_world=iso, patient_position="prone")
            for lao, cranial in angles
        ))
    return out


def make_benchmark_set(
    ct: Volume,
    *,
    labels: Volume | None = None,
    level: int | None = None,
    n_views: int = 6,
    n_starts_per_bin: int = 5,
    bins: Sequence[tuple[float, float]] = DEFAULT_BINS,
    intensity: str = "raw",
    seed: int = 0,
    detector_px: int = 256,
    biplane: bool = False,
    xray: XrayParams | None = None,
    max_rotation_deg: float = 15.0,
    n_targets: int = 500,
) -> list[BenchmarkCase]:
    """Simulated benchmark cases of a CT (HU): ``n_views`` acquisitions (biplane: pairs)
    x ``len(bins)`` x ``n_starts_per_bin`` starts, deterministic from ``seed``.

    Views: prone patient, C-arm LAO in [-90, 90] (AP, lateral, obliques), cranial in
    [-20, 20] deg, SDD 1000-1200 mm, source-isocentre 600-700 mm, isocentre at the
    targets' centre plus a few mm; a square detector of ``detector_px`` pixels
    covering ``DETECTOR_MM`` (1.2 mm pitch at 256 px). Images: ``sim.xray`` of the full CT
    (and the body beyond its box, ``sim.body``), acquired
    with ``xray`` (default: Poisson noise, 0.7 px blur; raw at I0 = ``RAW_I0``) at the dose
    of an exposure control (``AEC_PHOTONS``) in the ``intensity`` kind ("raw", "display"
    or "line_integral"). Starts: ``perturbation`` with
    the initial mTRE uniform in each bin [lo, hi) mm. Targets: ``target_points`` of
    ``labels`` / ``level``; ``level`` cases register that label alone.
    """
    check_intensity(intensity)
    if n_views < 1 or n_starts_per_bin < 1 or detector_px < 8:
        raise EvaluationError("need n_views >= 1, n_starts_per_bin >= 1 and detector_px >= 8")
    rng = np.random.default_rng(seed)
    targets = target_points(ct, labels=labels, level=level, max_points=n_targets, seed=seed)
    centre = targets.mean(axis=0)
    anatomy = prepare_anatomy(ct)
    xray = XrayParams(I0=RAW_I0) if xray is None else xray
    cases = []
    for a, views in enumerate(_acquisitions(centre, rng, n_views=n_views, detector_px=detector_px,
                                            biplane=biplane)):
        views = tuple(labelled_view(v, intensity, xray) for v in views)
        ids = tuple(f"view_{a:03d}" + (f"_{'ab'[k]}" if biplane else "") for k in range(len(views)))
        lines = [anatomy.line_integral(v) for v in views]
        images = tuple(acquire(L, v, replace(auto_exposure(L, xray, AEC_PHOTONS), seed=int(rng.integers(2**31))),
                               intensity=intensity)[0] for L, v in zip(lines, views))
        for lo, hi in bins:
            for s in range(n_starts_per_bin):
                P = perturbation(targets, centre, rng.uniform(lo, hi), rng=rng, max_rotation_deg=max_rotation_deg)
                cases.append(BenchmarkCase(
                    case_id=f"a{a:03d}_bin{lo:g}-{hi:g}_s{s:02d}",
                    view_ids=ids,
                    images=images,
                    views_init=tuple(v.with_pose(v.T_cam_from_world @ P) for v in views),
                    views_gt=views,
                    targets_world=targets,
                    level=level,
                    bin_mm=(float(lo), float(hi)),
                ))
    return cases


# ---------------------------------------------------------------------------- files


def _image_suffix(image: np.ndarray) -> str:
    return ".png" if image.dtype in (np.uint8, np.uint16) else ".mha"


def write_benchmark_set(cases: Sequence[BenchmarkCase], folder: str | Path) -> Path:
    """Write cases as a benchmark folder; returns the path of its ``cases.json``.

    Layout: ``images/<view id>.png|.mha`` and ``views/<view id>.view.json`` (ground
    truth) once per acquisition, ``starts/<case id>.<k>.view.json`` (initial guesses),
    ``targets.json`` (``targets_<n>.json`` for further distinct target sets).
    """
    folder = Path(folder)
    for sub in ("images", "views", "starts"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    written: dict[str, tuple[str, str]] = {}
    target_files: dict[bytes, str] = {}
    entries = []
    for case in cases:
        key = hashlib.sha1(case.targets_world.tobytes()).digest()
        if key not in target_files:
            name = "targets.json" if not target_files else f"targets_{len(target_files)}.json"
            (folder / name).write_text(json.dumps(case.targets_world.tolist()) + "\n")
            target_files[key] = name
        views = []
        acquisition = zip(case.view_ids, case.images, case.views_init, case.views_gt)
        for k, (vid, image, v_init, v_gt) in enumerate(acquisition):
            if vid not in written:
                written[vid] = (f"images/{vid}{_image_suffix(image)}", f"views/{vid}.view.json")
                write_xray(image, folder / written[vid][0])
                write_view(v_gt, folder / written[vid][1])
            start = f"starts/{case.case_id}.{k}.view.json"
            write_view(v_init, folder / start)
            views.append({"id": vid, "image": written[vid][0], "ground_truth": written[vid][1], "initial": start})
        entry = {"id": case.case_id, "views": views, "targets": target_files[key], "level": case.level,
                 "polarity": case.polarity}
        if case.bin_mm is not None:
            entry["bin_mm"] = list(case.bin_mm)
        entries.append(entry)
    path = folder / "cases.json"
    path.write_text(json.dumps({"schema": BENCHMARK_SCHEMA, "cases": entries}, indent=1) + "\n")
    return path


def load_benchmark_set(folder: str | Path) -> list[BenchmarkCase]:
    """Read a benchmark folder (``write_benchmark_set``'s, or one written by hand).

    ``cases.json``: ``{"schema": "guidance.benchmark/1", "targets": "targets.json",
    "cases": [{"id": ..., "views": [{"image": ..., "ground_truth": ..., "initial": ...,
    "id": optional}], "targets": optional (else the top-level file), "level": optional
    label id, "polarity": optional ("bone_dark" | "bone_bright", display images),
    "bin_mm": optional [lo, hi]}]}``. Paths are relative to the folder; images in any
    format ``read_xray`` reads, views as guidance.view/1 files, targets a JSON list of
    [x, y, z] world points (mm).
    """
    folder = Path(folder)
    index = read_json(folder / "cases.json", what="benchmark index", error=EvaluationError)
    if not isinstance(index, dict) or index.get("schema") != BENCHMARK_SCHEMA:
        raise EvaluationError(f"{folder / 'cases.json'}: expected schema {BENCHMARK_SCHEMA!r}")
    cache: dict[str, object] = {}

    def cached(name: str, reader):
        if name not in cache:
            cache[name] = reader(folder / name)
        return cache[name]

    def targets(path: Path) -> np.ndarray:
        return target_array(read_json(path, what="targets", error=EvaluationError))

    cases = []
    for i, entry in enumerate(index.get("cases", [])):
        where = f"{folder / 'cases.json'}: cases[{i}]"
        try:
            views = entry["views"]
            target_file = entry.get("targets", index.get("targets"))
            if target_file is None:
                raise KeyError("targets")
            cases.append(BenchmarkCase(
                case_id=str(entry["id"]),
                view_ids=tuple(str(v.get("id", Path(v["image"]).stem)) for v in views),
                images=tuple(cached(v["image"], read_xray) for v in views),
                views_init=tuple(read_view(folder / v["initial"]) for v in views),
                views_gt=tuple(cached(v["ground_truth"], read_view) for v in views),
                targets_world=cached(target_file, targets),
                level=entry.get("level"),
                bin_mm=tuple(entry["bin_mm"]) if entry.get("bin_mm") is not None else None,
                polarity=entry.get("polarity", "bone_dark"),
            ))
        except KeyError as exc:
            raise EvaluationError(f"{where} is missing {exc}") from None
        except (TypeError, ValueError) as exc:
            raise EvaluationError(f"{where}: {exc}") from None
    if not cases:
        raise EvaluationError(f"{folder / 'cases.json'} lists no cases")
    return cases


# ---------------------------------------------------------------------------- report


def quantile(values: Sequence[float] | np.ndarray, q: float) -> float | None:
    """The q-quantile of ``values`` (None when there are none)."""
    return float(np.quantile(values, q)) if len(values) else None


def summarize(
    records: Sequence[dict],
    *,
    bins: Sequence[tuple[float, float]] | None = None,
    success_mm: float = SUCCESS_MM,
) -> dict:
    """Aggregate records: success rate overall and per initial-mTRE bin (with counts),
    capture range (mm), median and 95th percentile of the final mTRE (mm), median mPD at
    the isocentre (mm), median and 95th percentile time (s) of the registrations and of
    the CT preparation (``prepare_s``: built or loaded from the cache, once per
    registrator), and the quality gate: how often it said ``failed`` and its confusion
    counts against real failure (wrong: mTRE >= ``success_mm``): ok & correct, ok &
    wrong (silent failures), failed & correct, failed & wrong, with the share of ok
    results that are wrong and the share of correct results reported ok; and how honest
    the reported uncertainty is: the share of results whose rotation-centre error lies
    within 2 sigma, in-plane and in depth (results with a finite sigma). ``bins``
    defaults to the records' own bins (else DEFAULT_BINS).
    Error records (tasks that failed, ``runners.error_record``) are listed by case id in
    ``errors`` and left out of every measure."""
    errors = [r["case_id"] for r in records if r["status"] == "error"]
    records = [r for r in records if r["status"] != "error"]
    if bins is None:
        bins = sorted({tuple(r["bin_mm"]) for r in records if r.get("bin_mm") is not None}) or DEFAULT_BINS
    initial = np.array([r["initial_mtre_mm"] for r in records], dtype=float)
    final = np.array([r["final_mtre_mm"] for r in records], dtype=float)
    mpd_iso = np.array([r["mpd_isocenter_mm"] for r in records], dtype=float)
    times = np.array([r["time_s"] for r in records], dtype=float)
    prepare = np.array([r["prepare_s"] for r in records if r.get("prepare_s") is not None], dtype=float)
    flagged = np.array([r["status"] != "ok" for r in records], dtype=bool)
    wrong = final >= success_mm
    rates = success_rates(initial, final, bins=bins, success_mm=success_mm)
    return {
        "n_cases": len(records),
        "errors": errors,
        "success_mm": success_mm,
        "success_rate": float(np.mean(~wrong)) if len(records) else None,
        "bins": rates,
        "capture_range_mm": capture_range_of_rates(rates, CAPTURE_MIN_RATE),
        "final_mtre_mm": {"median": quantile(final, 0.5), "p95": quantile(final, 0.95)},
        "mpd_isocenter_mm": {"median": quantile(mpd_iso, 0.5)},
        "time_s": {"median": quantile(times, 0.5), "p95": quantile(times, 0.95)},
        "prepare_s": {"median": quantile(prepare, 0.5), "max": float(prepare.max()) if len(prepare) else None},
        "quality_gate": {
            "failed_rate": float(np.mean(flagged)) if len(records) else None,
            "ok_correct": int(np.sum(~flagged & ~wrong)),
            "ok_wrong": int(np.sum(~flagged & wrong)),
            "failed_correct": int(np.sum(flagged & ~wrong)),
            "failed_wrong": int(np.sum(flagged & wrong)),
            "wrong_among_ok": float(np.mean(wrong[~flagged])) if np.any(~flagged) else None,
            "ok_among_correct": float(np.mean(~flagged[~wrong])) if np.any(~wrong) else None,
        },
        "uncertainty_coverage": {axis: _within_2_sigma(records, axis) for axis in ("in_plane", "depth")},
    }


def _within_2_sigma(records: Sequence[dict], axis: str) -> dict:
    """How many results (with a finite sigma and a measured error on ``axis``) have their
    rotation centre's error within twice the reported 1-sigma uncertainty."""
    pairs = [(r[f"centre_error_{axis}_mm"], r[f"uncertainty_{axis}_mm"]) for r in records
             if r.get(f"centre_error_{axis}_mm") is not None and r.get(f"uncertainty_{axis}_mm") is not None]
    within = sum(error <= 2.0 * sd for error, sd in pairs)
    return {"n": len(pairs), "within_2_sigma": within, "rate": within / len(pairs) if pairs else None}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _markdown(summary: dict, title: str) -> str:
    gate = summary["quality_gate"]
    lines = [
        f"# {title}",
        "",
        f"{summary['n_cases']} cases; success = final mTRE < {summary['success_mm']:g} mm."
        + (f" {len(summary['errors'])} failed tasks: {', '.join(summary['errors'])}." if summary["errors"] else ""),
        "",
        *([machine_line(summary["machine"]), ""] if "machine" in summary else []),
        "| initial mTRE (mm) | starts | successes | success rate |",
        "|---|---|---|---|",
    ]
    for b in summary["bins"]:
        rate = "n/a" if b["rate"] is None else f"{100 * b['rate']:.0f}%"
        lines.append(f"| {b['bin_mm'][0]:g}-{b['bin_mm'][1]:g} | {b['n']} | {b['n_success']} | {rate} |")
    lines += [
        "",
        "| measure | value |",
        "|---|---|",
        f"| success rate (all starts) | {_fmt(summary['success_rate'], 3)} |",
        f"| capture range (mm, bins >= {100 * CAPTURE_MIN_RATE:.0f}%) | {summary['capture_range_mm']:g} |",
        f"| final mTRE median / p95 (mm) | {_fmt(summary['final_mtre_mm']['median'])} / "
        f"{_fmt(summary['final_mtre_mm']['p95'])} |",
        f"| mPD at isocentre, median (mm) | {_fmt(summary['mpd_isocenter_mm']['median'])} |",
        f"| time median / p95 (s) | {_fmt(summary['time_s']['median'])} / {_fmt(summary['time_s']['p95'])} |",
        f"| CT preparation median / max (s) | {_fmt(summary['prepare_s']['median'])} / "
        f"{_fmt(summary['prepare_s']['max'])} |",
        f"| quality gate: failed rate | {_fmt(gate['failed_rate'], 3)} |",
        f"| gate ok & correct / ok & wrong (silent) | {gate['ok_correct']} / {gate['ok_wrong']} |",
        f"| gate failed & correct / failed & wrong | {gate['failed_correct']} / {gate['failed_wrong']} |",
        f"| wrong among ok / ok among correct | {_fmt(gate['wrong_among_ok'], 3)} / "
        f"{_fmt(gate['ok_among_correct'], 3)} |",
        *(f"| centre error within 2 sigma, {axis.replace('_', '-')} | {c['within_2_sigma']} of {c['n']} |"
          for axis, c in summary["uncertainty_coverage"].items()),
        "",
    ]
    return "\n".join(lines)


def _plots(summary: dict, records: Sequence[dict], out_dir: Path, title: str) -> list[Path]:
    """success_rate.png (per initial-mTRE bin) and final_mtre.png (histogram, log x)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: report plots skipped")
        return []
    labels = [f"{b['bin_mm'][0]:g}-{b['bin_mm'][1]:g}" for b in summary["bins"]]
    rates = [np.nan if b["rate"] is None else 100 * b["rate"] for b in summary["bins"]]
    fig = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(labels, rates, color="tab:blue")
    ax.bar_label(bars, labels=[f"n={b['n']}" for b in summary["bins"]], fontsize=8)
    ax.axhline(100 * CAPTURE_MIN_RATE, color="tab:red", ls="--", lw=1, label=f"{100 * CAPTURE_MIN_RATE:.0f}%")
    ax.set(xlabel="initial mTRE (mm)", ylabel="success rate (%)", ylim=(0, 110), title=title)
    ax.legend(loc="lower left", fontsize=8)
    paths = [out_dir / "success_rate.png", out_dir / "final_mtre.png"]
    fig.savefig(paths[0], dpi=120)
    final = np.array([r["final_mtre_mm"] for r in records], dtype=float)
    fig = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = fig.subplots()
    if len(final):
        lo, hi = max(final.min(), 1e-2), max(final.max(), summary["success_mm"] * 2)
        ax.hist(np.clip(final, lo, None), bins=np.geomspace(lo, hi * 1.01, 30), color="tab:gray")
    ax.axvline(summary["success_mm"], color="tab:red", ls="--", lw=1, label="success threshold")
    ax.set(xscale="log", xlabel="final mTRE (mm)", ylabel="starts", title=title)
    ax.legend(fontsize=8)
    fig.savefig(paths[1], dpi=120)
    return paths


def write_report(summary: dict, records: Sequence[dict], out_dir: str | Path, *, title: str) -> dict[str, Path]:
    """Write ``summary.json``, ``records.json``, ``report.md`` and (with matplotlib) the
    PNG plots ``success_rate.png`` and ``final_mtre.png`` into ``out_dir``; returns
    name -> path of what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "summary.json", "records": out / "records.json", "report": out / "report.md"}
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    paths["records"].write_text(json.dumps(list(records), indent=1) + "\n")
    paths["report"].write_text(_markdown(summary, title))
    paths.update({p.stem: p for p in _plots(summary, records, out, title)})
    return paths


# ---------------------------------------------------------------------------- entry points


def benchmark_subject(ct_path_or_phantom: str | Path | Phantom, labels_path: str | Path | None = None, *,
                      clinical: bool = False) -> Subject:
    """The CT (and labels) a benchmark registers to; ``clinical``: resampled onto the
    clinical grid of 512 x 512 x 133 voxels of 0.7 x 0.7 x 2.5 mm (``clinical_grid``), as the
    set was made when ``evaluate`` ran with it."""
    subject = load_subject(ct_path_or_phantom, labels=labels_path)
    if not clinical:
        return subject
    return replace(subject, ct=clinical_grid(subject.ct),
                   labels=None if subject.labels is None else clinical_grid(subject.labels, interpolation="nearest"))


def evaluate(
    ct_path_or_phantom: str | Path | Phantom,
    *,
    out_dir: str | Path,
    labels_path: str | Path | None = None,
    level: int | str | None = None,
    intensities: Sequence[str] = ("raw", "display"),
    biplane: bool = False,
    n_views: int = 6,
    n_starts_per_bin: int = 5,
    bins: Sequence[tuple[float, float]] = DEFAULT_BINS,
    detector_px: int = 256,
    settings: RegistrationSettings | None = None,
    scheduler: str = "local",
    jobs: int | None = None,
    dask_address: str | None = None,
    seed: int = 0,
    progress: bool = True,
    clinical: bool = False,
) -> dict[str, dict]:
    """Simulate, register and report one benchmark per intensity kind.

    For each kind: the set is written to ``out_dir/<kind>/set`` (re-usable with
    ``evaluate_external``) and the report to ``out_dir/<kind>``; ``out_dir/summary.json``
    holds every kind's summary. ``level``: label id or level name ("L3") registered
    alone. ``scheduler`` / ``jobs`` / ``dask_address``: see ``runners.run_benchmark``.
    ``clinical``: resample the CT (and labels) onto the clinical grid of 512 x 512 x 133
    voxels of 0.7 x 0.7 x 2.5 mm first (``clinical_grid``). Returns kind -> summary
    (``summarize``).
    """
    for kind in intensities:
        check_intensity(kind)
    subject = benchmark_subject(ct_path_or_phantom, labels_path, clinical=clinical)
    level_id = None if level is None else level_label(level)
    out = Path(out_dir)
    summaries = {}
    for kind in intensities:
        cases = make_benchmark_set(subject.ct, labels=subject.labels, level=level_id, n_views=n_views,
                                   n_starts_per_bin=n_starts_per_bin, bins=bins, intensity=kind, seed=seed,
                                   detector_px=detector_px, biplane=biplane)
        write_benchmark_set(cases, out / kind / "set")
        records = run_benchmark(cases, subject.ct, labels=subject.labels, settings=settings, scheduler=scheduler,
                                jobs=jobs, dask_address=dask_address, progress=progress)
        summaries[kind] = {**summarize(records, bins=bins), "machine": machine_description()}
        geometry = "biplane" if biplane else "single view"
        where = ("whole CT" if level_id is None else f"label {level_id}") + (", clinical grid" if clinical else "")
        write_report(summaries[kind], records, out / kind, title=f"{kind}, {geometry}, {where}")
    (out / "summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    return summaries


def evaluate_external(
    folder: str | Path,
    ct_path: str | Path,
    *,
    labels_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    settings: RegistrationSettings | None = None,
    scheduler: str = "local",
    jobs: int | None = None,
    dask_address: str | None = None,
    progress: bool = True,
    title: str | None = None,
    clinical: bool = False,
) -> dict:
    """Register and score a benchmark folder (``load_benchmark_set``) against a CT
    (``clinical``: on the clinical grid, ``benchmark_subject``); the report goes to
    ``out_dir`` (default ``<folder>/report``). Returns the summary."""
    cases = load_benchmark_set(folder)
    subject = benchmark_subject(ct_path, labels_path, clinical=clinical)
    records = run_benchmark(cases, subject.ct, labels=subject.labels, settings=settings, scheduler=scheduler,
                            jobs=jobs, dask_address=dask_address, progress=progress)
    summary = {**summarize(records), "machine": machine_description()}
    write_report(summary, records, Path(folder) / "report" if out_dir is None else out_dir,
                 title=title or f"benchmark {Path(folder).name}")
    return summary
