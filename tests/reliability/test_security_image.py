"""The Docker image runs as a non-root user, and docker-compose.yml does not undo it.

No container engine runs here (no docker, no podman), so this reads the files: the final stage of
``deploy/Dockerfile`` must switch to a user other than root before its CMD/ENTRYPOINT, and no
breastcad service in ``docker-compose.yml`` may set ``user:``. The checker is itself tested on
Dockerfiles that get it wrong.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROOT_USERS = {"root", "0"}


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, rest = full.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def runtime_user(dockerfile: str) -> str | None:
    """The user the final stage's CMD/ENTRYPOINT runs as; None if no USER is set (root)."""
    steps = instructions(dockerfile)
    starts = [i for i, (keyword, _) in enumerate(steps) if keyword == "FROM"]
    if not starts:
        raise ValueError("no FROM instruction")
    final = steps[starts[-1] :]
    run_at = [i for i, (keyword, _) in enumerate(final) if keyword in ("CMD", "ENTRYPOINT")]
    if not run_at:
        raise ValueError("the final stage has no CMD or ENTRYPOINT")
    user: str | None = None
    for keyword, args in final[: max(run_at)]:
        if keyword == "USER":
            user = args
    return user


def is_root(user: str | None) -> bool:
    if user is None:
        return True
    name = re.split(r"[:]", user.strip())[0]
    return name in ROOT_USERS or name.startswith("$")  # a variable could be anything


def test_checker_catches_root_images() -> None:
    assert is_root(runtime_user('FROM x\nCMD ["a"]\n'))
    assert is_root(runtime_user('FROM x\nUSER app\nUSER root\nCMD ["a"]\n'))
    assert is_root(runtime_user('FROM x\nUSER 0:0\nENTRYPOINT ["a"]\n'))
    # a USER in an earlier build stage does not carry over
    assert is_root(runtime_user('FROM x AS build\nUSER app\nFROM y\nCMD ["a"]\n'))
    assert not is_root(runtime_user('FROM x\nRUN a \\\n  && b\nUSER 10001\nCMD ["a"]\n'))
    with pytest.raises(ValueError, match="CMD"):
        runtime_user("FROM x\nUSER app\n")


def test_dockerfile_runs_as_non_root_user() -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    user = runtime_user(dockerfile)
    assert not is_root(user), f"the image's CMD runs as {user or 'root (no USER)'}"
    assert user is not None
    # the user is created in the image with a non-zero uid
    name = user.split(":")[0]
    created = re.search(rf"useradd[^\n]*--uid\s+(\d+)[^\n]*\s{re.escape(name)}\b", dockerfile)
    if not name.isdigit():
        assert created, f"user {name} is not created by useradd in the Dockerfile"
        assert int(created.group(1)) != 0


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = compose.get("services")
    assert isinstance(services, dict)
    return services


def test_compose_does_not_override_the_user() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    breastcad = {
        name: service
        for name, service in _services(compose).items()
        if "breastcad" in str(service.get("image", "")) or "build" in service
    }
    assert {"node", "worker"} <= set(breastcad), sorted(breastcad)
    for name, service in breastcad.items():
        assert "user" not in service, f"service {name} overrides the image's USER"
        assert not service.get("privileged", False), f"service {name} is privileged"
