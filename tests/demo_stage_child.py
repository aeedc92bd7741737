"""Stages for the demo runner's tests, and (run as a script: OUT NAME) one of them in a process of its own, as
`diffalign demo --only-stage NAME` runs a demo stage."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from diffalign.demo import Stage, run_stages


def file_stages(fail: str | None = None) -> list[Stage]:
    """a and c need nothing, b needs a; each writes the process id that ran it. `fail`: that stage raises."""

    def body(name):
        def run(folder: Path):
            if name == fail:
                raise RuntimeError(f"stage {name} broke")
            folder.mkdir(parents=True)
            (folder / "pid.txt").write_text(str(os.getpid()))
            return {"made": name}

        return run

    return [Stage("a", "first", {"x": 1}, body("a")), Stage("b", "second", {"y": 1}, body("b"), ("a",)),
            Stage("c", "independent", {"z": 1}, body("c"))]


def launcher(out: Path, fail: str | None = None):
    return lambda name: [sys.executable, __file__, str(out), name, fail or ""]


if __name__ == "__main__":
    run_stages(file_stages(sys.argv[3] or None), Path(sys.argv[1]), only=sys.argv[2])
