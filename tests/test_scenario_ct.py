"""sim.scenario on a real CT (``sim.subject.Subject``): the site (aim point, posterior path),
frames whose ground-truth pose puts the instrument tip on the target, and a short stream
through ``run_guidance.py sim --ct``. Uses the 30-slice real CT of ../shared/data."""

import json

import numpy as np
import pytest

import run_guidance
from guidance.core.geometry import project
from guidance.core.levels import level_label
from guidance.live.transport import free_tcp_endpoint
from sim.phantom import make_phantom
from sim.scenario import POSTERIOR_PATH_MM, START_OUTSIDE_MM, Scenario, ScenarioPlayer, scenario_site
from sim.subject import Subject, load_subject

SMALL = dict(detector_px=128, pixel_spacing_mm=2.4, target_level="L1")


@pytest.fixture(scope="module")
def files(shared_data):
    return shared_data / "ct_abdomen_3mm_small.nii.gz", shared_data / "ct_abdomen_3mm_small_labels.nii.gz"


@pytest.fixture(scope="module")
def subject(files):
    return load_subject(files[0], labels=files[1])


def _centroid_world(labels_path, label: int) -> np.ndarray:
    """Slow reference: the label's voxel-index mean mapped to LPS mm through the NIfTI
    header as SimpleITK reports it (origin + direction @ (spacing * index))."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(labels_path))
    kk, jj, ii = np.nonzero(sitk.GetArrayFromImage(image) == label)
    index = np.array([ii.mean(), jj.mean(), kk.mean()])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + direction @ (np.array(image.GetSpacing()) * index)


def test_site_on_a_real_ct(files, subject):
    """With labels the scenario aims at the level's label centroid; without a plan the
    instrument comes straight from behind; a point given replaces the centroid; a CT with
    nothing to aim at and a point given for the phantom are refused."""
    site = scenario_site(Scenario(**SMALL), subject)
    aim = _centroid_world(files[1], level_label("L1"))
    np.testing.assert_allclose(site.T_world_from_vertebra[:3, 3], aim, atol=1e-6)
    np.testing.assert_allclose(site.target_world, aim, atol=1e-6)
    np.testing.assert_allclose(site.entry_world - site.target_world, [0.0, POSTERIOR_PATH_MM, 0.0], atol=1e-9)
    given = scenario_site(Scenario(target_world=(1.0, -100.0, 150.0), **SMALL), subject)
    np.testing.assert_allclose(given.target_world, [1.0, -100.0, 150.0])
    with pytest.raises(ValueError, match="a CT without labels or plan needs target_world"):
        scenario_site(Scenario(**SMALL), Subject(ct=subject.ct, labels=None, plan=None))
    with pytest.raises(ValueError, match="no target point for L3"):
        scenario_site(Scenario(**dict(SMALL, target_level="L3")), subject)
    with pytest.raises(ValueError, match="target_world is for a CT subject"):
        scenario_site(Scenario(target_world=(0.0, 0.0, 0.0), **SMALL), make_phantom(seed=0, spacing_mm=4.0))
    with pytest.raises(ValueError, match="target_world must be None or three finite numbers"):
        Scenario(target_world=(0.0, np.nan, 1.0))


def test_real_ct_frames_put_the_instrument_tip_on_the_target(subject):
    """A lateral shot once the K-wire has reached the target (patient misplaced by 8 mm and
    3 deg, breathing): the wire, found as the difference to the same shot without it, ends
    where the ground-truth pose projects the target (the nominal pose puts it 20 px away)."""
    fine = dict(SMALL, detector_px=256, pixel_spacing_mm=0.6, dose=20.0, intensity="line_integral")
    scenario = Scenario(**fine)
    with_wire = ScenarioPlayer(scenario, subject)
    without = ScenarioPlayer(Scenario(instrument=None, **fine), subject)
    t_s = (START_OUTSIDE_MM + POSTERIOR_PATH_MM) / scenario.advance_mm_per_s + 1.0  # tip at the target
    frame, view = with_wire.shot_at(t_s, 90.0, 0.0)
    bare, _ = without.shot_at(t_s, 90.0, 0.0)
    wire = (frame.pixels - bare.pixels) > 0.5
    assert 100 < wire.sum() < 2000
    vv, uu = np.nonzero(wire)
    target_px = project(view.P, with_wire.target_world[None])[0]
    entry_px = project(view.P, with_wire.entry_world[None])[0]
    nominal_px = project(with_wire.nominal_view(90.0, 0.0).P, with_wire.target_world[None])[0]
    assert np.linalg.norm(nominal_px - target_px) > 10.0
    along = (entry_px - target_px) / np.linalg.norm(entry_px - target_px)  # towards the handle
    offsets = np.column_stack([uu, vv]) - target_px
    assert np.abs(offsets @ [-along[1], along[0]]).max() < 3.0  # on the projected path (4 px wide)
    assert abs((offsets @ along).min()) < 1.5  # and the wire's tip end at the target


def test_sim_streams_a_real_ct(files, capsys):
    """``sim --ct --labels --level`` plays a short fluoroscopy on the real CT (unpaced)."""
    argv = ["sim", "--ct", str(files[0]), "--labels", str(files[1]), "--level", "L1", "--duration", "0.4",
            "--fps", "5", "--fast", "--startup", "0", "--plain", "--frame-endpoint", free_tcp_endpoint()]
    capsys.readouterr()
    assert run_guidance.main(argv) == 0
    out = capsys.readouterr().out
    stats = json.loads(out[out.index("{"):])
    assert stats["frames"] == 2 and stats["tracker_samples"] == 2 * 3
    assert run_guidance.main(argv[:1] + ["--ct", str(files[0]), "--plain"]) == 2
    assert "needs target_world" in capsys.readouterr().err  # nothing to aim at


@pytest.mark.parametrize("argv", [["sim", "--target", "0", "0", "0", "--plain"],
                                  ["bench", "latency", "--labels", "l.nii.gz", "--target", "0", "0", "0"]])
def test_real_ct_options_need_a_ct(argv, capsys):
    assert run_guidance.main(argv) == 2
    assert "need --ct" in capsys.readouterr().err
