import numpy as np
import pytest
from numpy.testing import assert_allclose

from guidance.core.geometry import project
from guidance.navigation.overlay import (
    COLOURS,
    draw_instrument,
    draw_legend,
    draw_outline,
    draw_screw_path,
    draw_status,
    draw_trajectories,
    orientation_letters,
    status_bar_height,
    to_display_bgr,
    trajectory_label,
)
from guidance.core.views import carm_view
from guidance.core.volume import Volume

VIEW = carm_view(detector_size_px=(256, 256), pixel_spacing_mm=(1.0, 1.0))  # AP, iso at 0
LEFT = {"level": "L3", "label": 29, "side": "left", "entry_world": [25.0, 40.0, 5.0],
        "target_world": [8.0, -15.0, 0.0], "screw_diameter_mm": 6.5}
RIGHT = dict(LEFT, side="right", entry_world=[-25.0, 40.0, 5.0], target_world=[-8.0, -15.0, 0.0])


def black() -> np.ndarray:
    return np.zeros((VIEW.height, VIEW.width, 3), np.uint8)


def pixel(img: np.ndarray, uv: np.ndarray) -> np.ndarray:
    u, v = np.round(uv).astype(int)
    return img[v, u]


def drawn_near(img: np.ndarray, uv: np.ndarray, radius: int = 1) -> bool:
    u, v = np.round(uv).astype(int)
    return bool(img[v - radius: v + radius + 1, u - radius: u + radius + 1].any())


def box_labels(label: int = 29) -> Volume:
    data = np.zeros((64, 64, 64), np.uint8)
    data[26:38, 28:36, 24:40] = label  # k, j, i
    T = np.diag([2.0, 2.0, 2.0, 1.0])
    T[:3, 3] = -63.0
    return Volume(data, T, "label")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_to_display_bgr_line_integral_shows_bone_dark(dtype):
    img = np.zeros((40, 50), dtype)
    img[10:20, 10:20] = 200  # "bone": large line integral
    bgr = to_display_bgr(img, intensity="line_integral")
    assert bgr.shape == (40, 50, 3) and bgr.dtype == np.uint8
    assert bgr[15, 15, 0] < 10 and bgr[30, 40, 0] > 245
    assert (bgr[..., 0] == bgr[..., 2]).all()
    raw = to_display_bgr(img, intensity="raw")  # counts: high = unattenuated, stays bright
    assert raw[15, 15, 0] > 245 and raw[30, 40, 0] < 10


def test_to_display_bgr_constant_image_and_errors():
    assert to_display_bgr(np.full((8, 8), 3.0, np.float32), intensity="display").shape == (8, 8, 3)
    with pytest.raises(ValueError, match="line_integral, raw, display"):
        to_display_bgr(np.zeros((8, 8), np.uint8), intensity="log")
    with pytest.raises(ValueError, match="2-D"):
        to_display_bgr(np.zeros((8, 8, 3), np.uint8), intensity="display")


def test_trajectory_end_points_land_on_projected_pixels():
    img = black()
    out = draw_trajectories(img, VIEW, {"schema": "guidance.plan/1", "trajectories": [LEFT, RIGHT]})
    assert not img.any()  # the input is untouched
    for traj in (LEFT, RIGHT):
        colour = np.array(COLOURS[traj["side"]])
        (entry_uv, target_uv) = project(VIEW.P, np.array([traj["entry_world"],
                                                          traj["target_world"]]))
        for uv in (entry_uv, target_uv, (entry_uv + target_uv) / 2):
            assert_allclose(pixel(out, uv), colour, atol=60)
    # Nothing far from the lines (image corner).
    assert not out[:20, :20].any()


def test_trajectory_highlight_and_clipping():
    upper = dict(LEFT, level="L2", label=30, entry_world=[25.0, 40.0, 40.0], target_world=[8, -15, 35.0])
    out = draw_trajectories(black(), VIEW, [LEFT, upper], highlight_level="L3")
    entry_l3, entry_l2 = project(VIEW.P, np.array([LEFT["entry_world"], upper["entry_world"]]))
    bold = np.count_nonzero(out[int(entry_l3[1]) - 8: int(entry_l3[1]) + 9,
                                int(entry_l3[0]) - 8: int(entry_l3[0]) + 9].any(axis=2))
    thin = np.count_nonzero(out[int(entry_l2[1]) - 8: int(entry_l2[1]) + 9,
                                int(entry_l2[0]) - 8: int(entry_l2[0]) + 9].any(axis=2))
    assert bold > thin > 0
    # Far outside the image and partly behind the source: clipped, no error.
    huge = dict(LEFT, entry_world=[1e7, 0.0, 0.0], target_world=[0.0, 2000.0, 0.0])
    draw_trajectories(black(), VIEW, [huge])


def test_outline_surrounds_projected_label_centroid():
    labels = box_labels()
    out = draw_outline(black(), VIEW, labels, 29)
    kji = np.argwhere(labels.data == 29)
    centroid = labels.index_to_world(kji[:, ::-1].mean(axis=0))[0]
    cu, cv = np.round(project(VIEW.P, centroid[None])[0]).astype(int)
    drawn = out.any(axis=2)
    assert not drawn[cv, cu]
    assert drawn[cv, :cu].any() and drawn[cv, cu:].any()
    assert drawn[:cv, cu].any() and drawn[cv:, cu].any()
    # The outline follows the box's outer faces (voxel boundaries) within 2 pixels.
    half = labels.index_to_world(np.array([[23.5, 31.5, 31.5], [39.5, 31.5, 31.5]]))
    faces_u = project(VIEW.P, half)[:, 0]
    row = out[cv].max(axis=1).astype(float)  # anti-aliased line: weight by intensity
    cols = np.arange(len(row))
    left = np.average(cols[:cu], weights=row[:cu])
    right = np.average(cols[cu:], weights=row[cu:])
    assert_allclose([left, right], sorted(faces_u), atol=1.0)
    assert_allclose(out[drawn].max(axis=0), COLOURS["outline"], atol=1)


def test_outline_unknown_label_raises():
    with pytest.raises(ValueError, match="label 30"):
        draw_outline(black(), VIEW, box_labels(), 30)


def test_instrument_pixels_along_projected_shaft_and_dashed_extension():
    tip = np.array([10.0, 0.0, 0.0])
    axis = np.array([0.0, 0.0, -1.0])  # advancing towards the feet: down the image
    out = draw_instrument(black(), VIEW, tip, axis, 60.0, extension_mm=40.0)
    for d in np.linspace(-55.0, -2.0, 12):  # along the shaft, behind the tip
        uv = project(VIEW.P, (tip + d * axis)[None])[0]
        assert_allclose(pixel(out, uv), COLOURS["shaft"], atol=40)
    ext = project(VIEW.P, (tip + np.linspace(1.0, 39.0, 200)[:, None] * axis))
    strong = [pixel(out, uv)[0] > 0.8 * COLOURS["extension"][0] for uv in ext]
    assert 0.3 < np.mean(strong) < 0.8  # dashed
    beyond = project(VIEW.P, (tip + 50.0 * axis)[None])[0]
    assert not drawn_near(out, beyond, 2)


def test_instrument_with_affine_camera():
    # Orthographic axial reslice camera: u = x / 0.5 + 50, v = y / 0.5 + 50.
    P = np.array([[2.0, 0, 0, 50], [0, 2.0, 0, 50], [0, 0, 0, 1.0]])
    out = draw_instrument(np.zeros((100, 100, 3), np.uint8), P, [0.0, 0, 0], [0, -1.0, 0], 20.0,
                          extension_mm=10.0)
    assert out[60:90, 50].any(axis=1).all()  # shaft behind the tip (posterior = +y = down)
    assert out[32:48, 50].any(axis=1).any()  # dashed extension (anterior = up)
    assert not out[:26].any()  # nothing beyond the 10 mm extension


def test_status_bar_and_warning():
    img = np.full((300, 400, 3), 128, np.uint8)
    ok = draw_status(img, ["Registration OK", "1.0 mm off plan"], state="ok")
    bar = status_bar_height(2)
    assert (ok[bar:] == 128).all()  # nothing below the bar
    assert (ok[:bar] != 128).any()
    stale = draw_status(img, ["no pose for 0.8 s"], state="stale")
    bar = status_bar_height(1)
    warning = np.all(np.abs(stale.astype(int) - COLOURS["stale"]) < 30, axis=2)
    assert warning[:bar, :60].mean() > 0.3  # the state box
    assert warning[bar + 2, 10:-10].all() and warning[bar + 10:-10, -2].all()  # a frame around the picture
    assert not warning[bar + 10: -10, 10: -10].any()  # nothing written over the picture
    with pytest.raises(ValueError, match="ok, stale, invalid, waiting"):
        draw_status(img, [], state="bad")
    with pytest.raises(ValueError, match="BGR uint8"):
        draw_status(np.zeros((10, 10), np.uint8), [], state="ok")


def test_every_trajectory_is_labelled_beyond_its_entry():
    upper = dict(LEFT, level="L2", label=30, entry_world=[25.0, 40.0, 40.0], target_world=[8.0, -15.0, 35.0])
    lateral = {"approach": "lateral", "level": "L3", "label": 29, "level_below": "L4", "side": "left",
               "entry_world": [22.0, 0.0, -20.0], "target_world": [0.0, 0.0, -20.0],
               "cage": {"length_mm": 40.0, "width_mm": 18.0, "height_mm": 9.0}}
    plan = [LEFT, RIGHT, upper, lateral]
    labelled = draw_trajectories(black(), VIEW, plan, highlight_level="L3")
    bare = draw_trajectories(black(), VIEW, plan, highlight_level="L3", labels=False)
    text = np.any(labelled != bare, axis=2)
    for t in plan:
        entry, target = project(VIEW.P, np.array([t["entry_world"], t["target_world"]]))
        away = (entry - target) / np.linalg.norm(entry - target)
        centre = entry + 30.0 * away  # the label lies beyond the entry, away from the target
        u, v = np.round(centre).astype(int)
        assert text[v - 25: v + 26, u - 35: u + 36].sum() > 20, trajectory_label(t)
    assert [trajectory_label(t) for t in plan] == ["L3 left", "L3 right", "L2 left", "L3-L4 lateral"]
    # The cage (drawn alone): its outline spans its 9 mm height around the target.
    cage = draw_trajectories(black(), VIEW, [lateral], labels=False)
    top, bottom = project(VIEW.P, np.array(lateral["target_world"]) + np.array([[0, 0, 4.5], [0, 0, -4.5]]))
    u = int(round(top[0]))
    rows = np.flatnonzero(cage[:, u].any(axis=1))
    assert_allclose([rows.min(), rows.max()], sorted([top[1], bottom[1]]), atol=2.0)


@pytest.mark.parametrize("P, letters", [
    # Coronal-like orthographic camera: u along +x (patient left), v along -z (down = inferior).
    (np.array([[1.0, 0, 0, 50], [0, 0, -1.0, 50], [0, 0, 0, 1.0]]),
     {"right": "L", "left": "R", "top": "S", "bottom": "I"}),
    # Axial seen from the feet: u along +x, v along +y (posterior down).
    (np.array([[1.0, 0, 0, 50], [0, 1.0, 0, 50], [0, 0, 0, 1.0]]),
     {"right": "L", "left": "R", "top": "A", "bottom": "P"}),
    # Oblique 45 degrees between L and P on the horizontal: both score 0.71, the larger-or-equal wins.
    (np.array([[0.8, 0.6, 0, 50], [0, 0, -1.0, 50], [0, 0, 0, 1.0]]),
     {"right": "L", "left": "R", "top": "S", "bottom": "I"}),
])
def test_orientation_letters(P, letters):
    assert orientation_letters(P, np.zeros(3)) == letters


def test_orientation_letters_of_the_ap_view():
    """The AP C-arm view: patient's left on the side where +x projects, head where +z."""
    c = np.zeros(3)
    du = project(VIEW.P, np.array([[10.0, 0, 0]]))[0] - project(VIEW.P, c[None])[0]
    dz = project(VIEW.P, np.array([[0.0, 0, 10.0]]))[0] - project(VIEW.P, c[None])[0]
    got = orientation_letters(VIEW, c)
    assert got["right" if du[0] > 0 else "left"] == "L"
    assert got["bottom" if dz[1] > 0 else "top"] == "S"
    assert "A" not in got.values() and "P" not in got.values()  # seen end-on in an AP view


def test_legend_shows_each_colour():
    entries = [("plan: left pedicle screw", COLOURS["left"]), ("instrument", COLOURS["shaft"])]
    out = draw_legend(np.full((200, 300, 3), 128, np.uint8), entries)
    for _, colour in entries:
        assert np.count_nonzero(np.all(out == np.array(colour, np.uint8), axis=2)) > 20
    assert (out[:100] == 128).all()  # only the bottom corner


def test_screw_path_outline_at_its_radius():
    P = np.array([[2.0, 0, 0, 50], [0, 2.0, 0, 50], [0, 0, 0, 1.0]])  # 0.5 mm per pixel, axial
    out = draw_screw_path(np.zeros((100, 100, 3), np.uint8), P, [0.0, 10.0, 0.0], [0.0, -10.0, 0.0], 6.0,
                          COLOURS["invalid"])
    cols = np.flatnonzero(out[50].any(axis=1))
    assert_allclose([cols.min(), cols.max()], [44, 56], atol=1)  # x = -3 and +3 mm


def test_monitor_window_uses_the_anatomy_not_the_collimator_edge():
    """Raw counts: a bright unattenuated border must not squeeze the anatomy's contrast."""
    raw = np.full((100, 100), 800.0, np.float32)
    raw[40:60, 40:60] = 500.0  # bone (fewer counts)
    raw[:10] = raw[-10:] = 4095.0  # unattenuated rows at the field edge
    plain = to_display_bgr(raw, intensity="raw")[..., 0].astype(int)
    monitor = to_display_bgr(raw, intensity="raw", monitor=True)[..., 0].astype(int)
    assert monitor[50, 50] < monitor[25, 25]  # bone darker than soft tissue
    assert monitor[25, 25] - monitor[50, 50] > 2 * (plain[25, 25] - plain[50, 50])
