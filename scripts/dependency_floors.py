"""Print pip constraints that pin every runtime dependency of the project, and the
OpenTelemetry packages of its `test-core` extra, to the minimum version pyproject.toml
declares, so CI can prove the floors are true (`pip install -c <(this) ...`).

A dependency declared without a `>=` floor is an error: every floor must be tested.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_FLOOR = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.\-]*)\s*>=\s*([0-9][A-Za-z0-9.]*)")


def floors(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    test_core = project["optional-dependencies"]["test-core"]
    requirements += [r for r in test_core if r.startswith("opentelemetry")]
    pins = []
    for requirement in requirements:
        match = _FLOOR.fullmatch(requirement.strip())
        if match is None:
            raise SystemExit(f"{pyproject}: cannot read a '>=' floor from {requirement!r}")
        pins.append(f"{match.group(1)}=={match.group(2)}")
    return pins


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    print("\n".join(floors(root / "pyproject.toml")))
