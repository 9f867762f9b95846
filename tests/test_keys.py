"""guidance.live.keys: key files per role, loading, and clear errors."""

import pytest

from guidance.live.keys import ROLES, KeysError, load_keys, make_keys


def test_make_and_load_keys(tmp_path):
    written = make_keys(tmp_path)
    assert len(written) == 2 * len(ROLES)
    assert all((tmp_path / f"{r}.key").is_file() and (tmp_path / f"{r}.key_secret").is_file() for r in ROLES)
    assert oct((tmp_path / "sim.key_secret").stat().st_mode & 0o777) == "0o600"
    sim, pipeline = load_keys(tmp_path, "sim"), load_keys(tmp_path, "pipeline")
    assert sim.public != pipeline.public and len(sim.secret) == 40
    assert sim.peers == pipeline.peers and sim.peer("pipeline") == pipeline.public
    with pytest.raises(KeysError, match="no public key for role 'teapot'"):
        sim.peer("teapot")


def test_keys_are_never_overwritten_and_missing_keys_are_named(tmp_path):
    make_keys(tmp_path, roles=("sim",))
    with pytest.raises(KeysError, match="already holds keys for sim"):
        make_keys(tmp_path)
    with pytest.raises(KeysError, match="no secret key .*display.key_secret for the display.*keys --out"):
        load_keys(tmp_path, "display")


def test_cli_makes_keys_and_refuses_to_run_without_them(tmp_path, capsys):
    import run_guidance

    assert run_guidance.main(["keys", "--out", str(tmp_path / "keys")]) == 0
    assert (tmp_path / "keys" / "pipeline.key_secret").is_file()
    assert run_guidance.main(["keys", "--out", str(tmp_path / "keys")]) == 2
    assert "already holds keys" in capsys.readouterr().err
    assert run_guidance.main(["pipeline", "--keys", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "no secret key" in err and "--plain" in err
