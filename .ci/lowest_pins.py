"""Print one `name==X` pin for every lower bound pyproject.toml declares (the project's
dependencies and its `test` and `fast` extras), for CI's lowest-versions run.

A dependency without a `>=` lower bound is an error: every bound CI does not run is a guess."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

EXTRAS = ("test", "fast")
# name[extras] specifiers ; marker
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")


def pins(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = list(project.get("dependencies", []))
    for extra in EXTRAS:
        declared += project.get("optional-dependencies", {})[extra]
    out = []
    for req in declared:
        m = REQUIREMENT.match(req)
        if m is None:
            sys.exit(f"lowest_pins: cannot read the requirement {req!r}")
        name, extras, specs, marker = m.groups()
        lows = [s.strip()[2:].strip() for s in specs.split(",") if s.strip().startswith(">=")]
        if len(lows) != 1:
            sys.exit(f"lowest_pins: {req!r} declares no single '>=' lower bound")
        out.append(f"{name}{extras or ''}=={lows[0]}{' ' + marker if marker else ''}")
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    print("\n".join(pins(root / "pyproject.toml")))
