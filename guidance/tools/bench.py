"""Benchmarks behind ``run_guidance.py bench ...``: each returns rows and prints a table.

Benchmarks measure; tests assert. Figures go to docs/benchmarks.md with the command
that produced them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from guidance.core.drr import prepare_volume, render_drr, render_drr_motion
from guidance.core.errors import GuidanceError
from guidance.core.geometry import invert_rigid
from guidance.core.machine import cpu_model
from guidance.core.views import View, carm_view
from guidance.core.volume import Volume, clinical_grid, hu_to_attenuation, load_volume

__all__ = ["DrrBenchRow", "bench_drr", "format_table", "clinical_grid", "diffdrr_geometry",
           "diffdrr_renderer"]

log = logging.getLogger(__name__)

DETECTOR_SIZES = (128, 256, 512)
DETECTOR_WIDTH_MM = 307.2
DIFFDRR_RENDERERS = ("trilinear", "siddon")
DIFFDRR_REPEATS = 3
DIFFDRR_MAX_S = 60.0  # DiffDRR render (s) not repeated when measured, skipped when extrapolated by pixel count
DIFFDRR_PATCH_PX = 128  # DiffDRR renders 128x128-ray patches in series, bounding its memory


@dataclass(frozen=True)
class DrrBenchRow:
    """Median and p90 time (ms) of one DRR of ``volume`` at ``detector_px``^2, on
    ``cpu_model`` with ``threads`` numba threads."""

    volume: str
    grid: str
    renderer: str
    detector_px: int
    median_ms: float
    p90_ms: float
    repeats: int
    ncc: float | None = None  # agreement with our DRR of the same view (DiffDRR rows)
    speedup: float | None = None  # empty-space skipping: time of every sample / time of this row
    cpu_model: str = ""
    threads: int = 0


def _ap_view(volume: Volume, detector_px: int) -> View:
    """Prone AP shot through the volume centre, 1000 mm SDD, 600 mm to the isocentre."""
    pitch = DETECTOR_WIDTH_MM / detector_px
    return carm_view(isocenter_world=volume.center_world(), patient_position="prone",
                     detector_size_px=(detector_px, detector_px), pixel_spacing_mm=(pitch, pitch))


def _time(fn, repeats: int, *, warm_up: bool = True) -> tuple[float, float]:
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(times)), float(np.percentile(times, 90))


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def diffdrr_geometry(view: View, T_dd_from_world: np.ndarray, reorient: np.ndarray) -> tuple[dict, np.ndarray]:
    """DiffDRR (0.6.1) detector arguments and pose that cast the same rays as ``view``.

    Our side (docs/conventions.md): world = LPS mm of the CT; camera = OpenCV pinhole at the
    focal spot, +z along the principal ray, +x along image columns u, +y along rows v
    (down); pixel (u, v) sees the ray K^-1 [u, v, 1].

    DiffDRR's side: its world is the frame of the subject's affine, which
    ``diffdrr.data.read`` makes RAS mm with the centre voxel at the origin;
    ``T_dd_from_world`` maps our LPS world there. Its detector frame has the source at
    the origin and the detector plane at z = sdd; with ``reverse_x_axis=True`` the pixel
    in row r, column c of an H x W image lies at x = delx ((W - 1)/2 - c) + x0,
    y = dely ((H - 1)/2 - r) + y0, so x and y run against our u and v: detector frame =
    diag(-1, -1, 1) @ camera frame, a half turn about the principal ray (a rotation, so
    the pose stays rigid). The pose P given to ``DRR.forward`` maps the detector frame to
    the world after the subject's fixed ``reorient`` (orientation "AP"):
    world_dd = P @ reorient @ detector, hence
    P = T_dd_from_world @ inv(T_cam_from_world) @ diag(-1, -1, 1, 1) @ inv(reorient).

    Only delx/sdd, dely/sdd, x0/sdd and y0/sdd fix the rays: sdd is the view's
    source-to-detector distance, or K[0][0] (a 1 mm pitch) when the view does not say.
    A skewed detector (K[0][1] != 0) has no DiffDRR equivalent.

    Returns (keyword arguments of ``diffdrr.drr.DRR``, 4x4 pose).
    """
    K = view.K
    if abs(K[0, 1]) > 1e-9:
        raise GuidanceError("DiffDRR cannot model a skewed detector (K[0][1] != 0)")
    sdd = float(K[0, 0]) if view.source_to_detector_mm is None else float(view.source_to_detector_mm)
    delx, dely = sdd / float(K[0, 0]), sdd / float(K[1, 1])  # Python floats: DiffDRR's calibration is float32
    W, H = view.image_size
    detector = dict(sdd=sdd, height=H, width=W, delx=delx, dely=dely, x0=delx * (float(K[0, 2]) - (W - 1) / 2),
                    y0=dely * (float(K[1, 2]) - (H - 1) / 2), reverse_x_axis=True)
    half_turn = np.diag([-1.0, -1.0, 1.0, 1.0])
    pose = T_dd_from_world @ invert_rigid(view.T_cam_from_world) @ half_turn @ invert_rigid(reorient)
    return detector, pose


def diffdrr_renderer(hu: Volume, view: View, renderer: str) -> Callable[[], np.ndarray] | None:
    """A callable that renders ``view`` of the CT ``hu`` with DiffDRR's ``renderer``
    ("trilinear" or "siddon") on the CPU and returns the (H, W) float32 line-integral
    image; None when torch or diffdrr cannot be imported (extra ``diffdrr``).

    The CT goes through ``diffdrr.data.read`` as a DiffDRR user loads it (RAS affine,
    centred, orientation "AP"). ``read`` maps HU to its own density (at or below -800 HU
    to the lowest soft-tissue value, then min-max normalised to [0, 1]); that density is
    replaced by our ``hu_to_attenuation`` so both renderers integrate the same
    attenuation (1/mm) and return -log(I / I0). Trilinear takes enough samples per ray
    (instead of its default 500) for our step, the finest voxel spacing, across the
    volume's depth in the view. Rays go in 128 x 128 patches to bound the memory.

    Expected differences: DiffDRR integrates over the voxel-edge box (``grid_sample``
    pads with zeros beyond the outer voxel centres), ours over the voxel-centre box, so
    rays through tissue at the volume's faces get up to half a voxel more per face;
    siddon looks up the nearest voxel (piecewise constant) where ours interpolates.
    """
    try:
        import torch
        from diffdrr.data import read
        from diffdrr.drr import DRR
        from diffdrr.pose import RigidTransform
        from torchio import ScalarImage
    except ImportError:
        return None

    def ijk(data: np.ndarray):  # our [k, j, i] arrays as torchio's [channel, i, j, k] tensors
        return torch.from_numpy(np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float32)[None])

    ras_from_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    subject = read(ScalarImage(tensor=ijk(hu.data), affine=ras_from_lps @ hu.T_world_from_index))
    subject.density.set_data(ijk(hu_to_attenuation(hu).data))
    detector, pose = diffdrr_geometry(view, subject.volume.affine @ hu.T_index_from_world,
                                      subject.reorient.numpy().astype(float))
    options = {}
    if renderer == "trilinear":
        depth = hu.corners_world() @ view.T_cam_from_world[2, :3] + view.T_cam_from_world[2, 3]
        options["n_points"] = int(np.ceil((depth.max() - depth.min()) / hu.spacing.min())) + 1
    patch = DIFFDRR_PATCH_PX if view.width * view.height > DIFFDRR_PATCH_PX ** 2 else None
    drr = DRR(subject, renderer=renderer, patch_size=patch, **detector)
    pose_dd = RigidTransform(torch.as_tensor(pose, dtype=torch.float32))

    def render() -> np.ndarray:
        with torch.inference_mode():
            return drr(pose_dd, **options)[0, 0].numpy()

    return render


def _bench_diffdrr(name: str, grid: str, hu: Volume, view: View, ours: np.ndarray,
                   s_per_ray: dict[str, float]) -> list[DrrBenchRow] | None:
    """DiffDRR rows beside ours for one volume and view, with the NCC of each image to
    ``ours``; None when DiffDRR is not installed. ``s_per_ray`` (renderer -> seconds per
    ray at the last detector, per volume) skips a detector whose render would take
    longer than ``DIFFDRR_MAX_S``; a first render longer than that is not repeated."""
    rows = []
    n = view.width
    for renderer in DIFFDRR_RENDERERS:
        label = f"DiffDRR {renderer}"
        estimate_s = s_per_ray.get(renderer, 0.0) * view.width * view.height
        if estimate_s > DIFFDRR_MAX_S:
            rows.append(DrrBenchRow(name, grid, f"{label} (skipped: ~{estimate_s:.0f} s per render)", n,
                                    float("nan"), float("nan"), 0))
            continue
        render = diffdrr_renderer(hu, view, renderer)
        if render is None:
            return None
        t0 = time.perf_counter()
        agreement = _ncc(ours, render())
        first_ms = (time.perf_counter() - t0) * 1000.0
        if first_ms > DIFFDRR_MAX_S * 1000.0:
            rows.append(DrrBenchRow(name, grid, f"{label} (1 run)", n, first_ms, first_ms, 1, agreement))
        else:
            med, p90 = _time(render, DIFFDRR_REPEATS, warm_up=False)
            rows.append(DrrBenchRow(name, grid, label, n, med, p90, DIFFDRR_REPEATS, agreement))
        s_per_ray[renderer] = rows[-1].median_ms / 1000.0 / (view.width * view.height)
    return rows


def bench_drr(*, shared_data: Path | None = None, repeats: int = 20, sizes=DETECTOR_SIZES,
              with_diffdrr: bool = True) -> list[DrrBenchRow]:
    """Time DRRs of the embedded phantom (1 mm), the phantom on a 512x512x133 clinical
    grid, and the real CTs of ``shared_data`` when present (native and clinical grid).

    On the clinical grids also the bone only (voxels at or above registration's bone
    threshold, as registration renders them), once walking every sample and once with
    empty-space skipping, with the speed-up, and with the motion derivative that the
    registration's Jacobian comes from (``render_drr_motion``). ``with_diffdrr`` adds DiffDRR's trilinear
    and siddon renderers (``DIFFDRR_REPEATS`` repeats, same volume and view) when torch
    and diffdrr are installed, with the NCC of their images to ours."""
    import numba

    from guidance.registration.register import RegistrationSettings
    from sim.phantom import make_phantom

    bone_hu = RegistrationSettings().bone_threshold_hu
    volumes: list[tuple[str, Volume, bool]] = []  # name, CT in HU, on the clinical grid
    phantom = make_phantom(seed=0).ct
    volumes.append(("phantom", phantom, False))
    volumes.append(("phantom", clinical_grid(phantom), True))
    if shared_data is not None and shared_data.is_dir():
        abdomen = shared_data / "ct_abdomen_3mm.nii.gz"
        if abdomen.exists():
            ct = load_volume(abdomen)
            volumes.append(("ct_abdomen_3mm", ct, False))
            volumes.append(("ct_abdomen_3mm", clinical_grid(ct), True))
        series = shared_data / "ct_dicom_series"
        if series.is_dir():
            volumes.append(("ct_dicom_series", load_volume(series), False))
    else:
        log.warning("real CT folder %s absent: benchmarking the phantom only", shared_data)
    machine = dict(cpu_model=cpu_model(), threads=numba.get_num_threads())
    rows = []
    for name, hu, clinical in volumes:
        grid = "x".join(str(n) for n in hu.size_ijk) + " @ " + "x".join(f"{s:.2g}" for s in hu.spacing) + " mm"
        mu = hu_to_attenuation(hu)
        dv = prepare_volume(mu)
        bone = prepare_volume(mu.with_data(np.where(hu.data >= bone_hu, mu.data, 0.0).astype(np.float32)))
        s_per_ray: dict[str, float] = {}
        for n in sizes:
            view = _ap_view(hu, n)
            out = np.empty(view.shape, np.float32)
            med, p90 = _time(lambda: render_drr(dv, view, out=out), repeats)
            rows.append(DrrBenchRow(name, grid, "guidance (numba)", n, med, p90, repeats, **machine))
            if clinical:
                every = _time(lambda: render_drr(bone, view, out=out, skip_empty=False), repeats)
                skip = _time(lambda: render_drr(bone, view, out=out), repeats)
                bone_name = f"{name} bone >= {bone_hu:g} HU"
                rows.append(DrrBenchRow(bone_name, grid, "guidance (numba), every sample", n, *every, repeats,
                                        **machine))
                rows.append(DrrBenchRow(bone_name, grid, "guidance (numba), empty-space skipping", n, *skip, repeats,
                                        speedup=every[0] / skip[0], **machine))
                with_motion = _time(lambda: render_drr_motion(bone, view, out=out), repeats)
                rows.append(DrrBenchRow(bone_name, grid, "guidance (numba), skipping, with motion derivative", n,
                                        *with_motion, repeats, **machine))
            if with_diffdrr:
                render_drr(dv, view, out=out)
                diffdrr_rows = _bench_diffdrr(name, grid, hu, view, out, s_per_ray)
                if diffdrr_rows is None:
                    log.warning("torch/diffdrr not importable (extra 'diffdrr'): benchmarking ours only")
                    with_diffdrr = False
                else:
                    rows.extend(replace(r, **machine) for r in diffdrr_rows)
    return rows


def format_table(rows: list[DrrBenchRow]) -> str:
    """Markdown table of DRR benchmark rows (each row also records its CPU and thread
    count); an NCC column when some row compares with ours, a speed-up column when some
    row skips empty space."""
    with_ncc = any(r.ncc is not None for r in rows)
    with_speedup = any(r.speedup is not None for r in rows)
    head = "| volume | grid | renderer | detector | median ms | p90 ms |" + (" NCC vs ours |" if with_ncc else "")
    head += " speed-up |" if with_speedup else ""
    lines = [head, "|---" * head.count(" |") + "|"]
    for r in rows:
        times = "| — | — |" if np.isnan(r.median_ms) else f"| {r.median_ms:.1f} | {r.p90_ms:.1f} |"
        ncc = ("" if r.ncc is None else f" {r.ncc:.4f}") + " |" if with_ncc else ""
        speedup = ("" if r.speedup is None else f" {r.speedup:.1f}x") + " |" if with_speedup else ""
        lines.append(f"| {r.volume} | {r.grid} | {r.renderer} | {r.detector_px}² {times}{ncc}{speedup}")
    return "\n".join(lines)


def bench_register3d(*, shared_data: Path | None = None, seed: int = 0) -> list[dict]:
    """3D/3D registration of a CBCT-like copy moved by a known transform (5 deg, 8 mm):
    TRE (mm) over bone voxels and time (s), for the phantom and the real CT."""
    from guidance.core.geometry import make_rigid, rotation_about_axis, transform_points
    from guidance.registration.register3d import register_volumes
    from sim.cbct import cbct_like
    from sim.phantom import make_phantom

    cases = [("phantom 1 mm", make_phantom(seed=seed).ct)]
    if shared_data is not None and (shared_data / "ct_abdomen_3mm.nii.gz").exists():
        cases.append(("ct_abdomen_3mm", load_volume(shared_data / "ct_abdomen_3mm.nii.gz")))
    rows = []
    for name, ct in cases:
        c = ct.center_world()
        R = rotation_about_axis([0.4, 1.0, 0.3], 5.0)
        T_true = make_rigid(R, c + np.array([5.0, -4.0, 5.0]) - R @ c)
        moving = cbct_like(ct, T_true, seed)
        result = register_volumes(ct, moving)
        kk, jj, ii = np.nonzero(ct.data > 200)
        pts = ct.index_to_world(np.column_stack([ii, jj, kk])[:: max(1, len(ii) // 2000)])
        err = np.linalg.norm(transform_points(result.T_moving_from_fixed, pts) - transform_points(T_true, pts), axis=1)
        rows.append({"volume": name, "grid": "x".join(map(str, ct.size_ijk)), "tre_mean_mm": float(err.mean()),
                     "tre_max_mm": float(err.max()), "time_s": result.time_s, "iterations": result.iterations})
    return rows
