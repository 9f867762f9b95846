"""CURVE key files of the guidance bus: one key pair per process role.

``make_keys(DIR)`` writes, per role, ``DIR/<role>.key`` (public) and
``DIR/<role>.key_secret`` (public + secret) in ZeroMQ's certificate format
(``zmq.auth``). A process loads its own secret key and the public keys of its peers
with ``load_keys(DIR, role)``; in an installation each machine receives only its own
secret file and the public files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from guidance.core.errors import GuidanceError

__all__ = ["ROLES", "KeysError", "CurveKeys", "make_keys", "load_keys"]

ROLES = ("sim", "pipeline", "display", "monitor")
"""Process roles with a key pair: the frame source, the pipeline, the display, and
tools that watch the bus (demo and benchmark monitors)."""


class KeysError(GuidanceError):
    """Key files missing, unreadable or of the wrong kind."""


@dataclass(frozen=True)
class CurveKeys:
    """One process's CURVE identity: ``role``, its Z85 ``public`` and ``secret`` keys, and
    ``peers``: role -> Z85 public key of every role in the key folder (itself included).
    Servers (binding sockets) accept exactly the clients whose key is in ``peers``."""

    role: str
    public: bytes
    secret: bytes
    peers: dict[str, bytes]

    def peer(self, role: str) -> bytes:
        """The public key of ``role``; KeysError when the key folder has none."""
        if role not in self.peers:
            raise KeysError(f"no public key for role {role!r}; known: {', '.join(sorted(self.peers))}")
        return self.peers[role]


def _check_curve() -> None:
    if not zmq.has("curve"):
        raise KeysError("this libzmq has no CURVE support; use plain mode explicitly")


def make_keys(out_dir: str | Path, roles: tuple[str, ...] = ROLES) -> list[Path]:
    """Write a new key pair for each role into ``out_dir``; never overwrites a key.

    Returns the files written (public and secret)."""
    _check_curve()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = [r for r in roles if (out / f"{r}.key").exists() or (out / f"{r}.key_secret").exists()]
    if existing:
        raise KeysError(f"{out} already holds keys for {', '.join(existing)}; choose another folder")
    written = []
    for role in roles:
        public, secret = zmq.auth.create_certificates(str(out), role)
        Path(secret).chmod(0o600)
        written += [Path(public), Path(secret)]
    return written


def load_keys(directory: str | Path, role: str) -> CurveKeys:
    """``role``'s key pair from ``directory/<role>.key_secret`` and every peer's public key
    from ``directory/*.key``."""
    _check_curve()
    folder = Path(directory)
    secret_file = folder / f"{role}.key_secret"
    if not secret_file.is_file():
        raise KeysError(f"no secret key {secret_file} for the {role}; make keys with "
                        f"`run_guidance.py keys --out {folder}` or run in plain mode explicitly (--plain)")
    try:
        public, secret = zmq.auth.load_certificate(str(secret_file))
        peers = {p.name[: -len(".key")]: zmq.auth.load_certificate(str(p))[0] for p in sorted(folder.glob("*.key"))}
    except (OSError, ValueError) as exc:
        raise KeysError(f"cannot read the keys in {folder}: {exc}") from None
    if secret is None:
        raise KeysError(f"{secret_file} holds no secret key")
    return CurveKeys(role=role, public=public, secret=secret, peers=peers)
