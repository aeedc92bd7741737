"""Stages for the demo runner's tests, and (run as a script: OUT OPTIONS --worker) a demo worker that runs them, as
`diffalign demo --worker` runs the demo's stages (OUT OPTIONS NAME: that one stage, as `--only-stage NAME`).

Every stage writes, into its folder, the process id that ran it (pid.txt), the torch threads it was given
(threads.txt) and OMP_NUM_THREADS (omp.txt); appends its name to OUT/runs.txt; and prints a line naming it through
Python's stdout, straight to file descriptors 1 and 2, and through C's printf, so a test can find where each went.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from pathlib import Path

from diffalign.demo import Stage, run_stages, run_worker


def _body(name: str, out: Path, fail: bool = False, sleep: float = 0.0, after: str | None = None,
          kill: bool = False):
    """`after`: once that stage has started (in the other worker), go on; `kill`: then die as a crash would."""

    def run(folder: Path):
        folder.mkdir(parents=True)
        (folder / "pid.txt").write_text(str(os.getpid()))
        import torch

        (folder / "threads.txt").write_text(str(torch.get_num_threads()))
        (folder / "omp.txt").write_text(os.environ.get("OMP_NUM_THREADS", ""))
        with open(out / "runs.txt", "a") as runs:
            runs.write(name + "\n")
        print(f"python stdout of {name}")  # buffered: flushed when the stage ends
        os.write(1, f"fd 1 of {name}\n".encode())
        os.write(2, f"fd 2 of {name}\n".encode())
        ctypes.CDLL(None).printf(f"C printf of {name}\n".encode())  # C stdio, buffered in C
        deadline = time.monotonic() + 20
        while after is not None and not (out / after / "pid.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if kill:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(sleep)
        if fail:
            raise RuntimeError(f"stage {name} broke")
        return {"made": name}

    return run


def file_stages(out: Path, fail: str | None = None, sleep: dict | None = None) -> list[Stage]:
    """a and c need nothing, b needs a. `fail`: that stage raises once the other stage that needs nothing has
    started; `sleep`: seconds a stage waits before it ends."""
    sleep = sleep or {}
    other = {"a": "c", "c": "a"}
    return [Stage(name, title, {"n": k}, _body(name, out, name == fail, sleep.get(name, 0.0),
                                               other.get(name) if name == fail else None), needs)
            for k, (name, title, needs) in enumerate([("a", "first", ()), ("b", "second", ("a",)),
                                                      ("c", "independent", ())])]


def flat_stages(out: Path, count: int = 4) -> list[Stage]:
    """s1 .. s`count`, none needing another."""
    return [Stage(f"s{k}", f"flat {k}", {"n": k}, _body(f"s{k}", out)) for k in range(1, count + 1)]


def crash_stages(out: Path) -> list[Stage]:
    """`slow` sleeps a minute; `boom` kills its own process once `slow` has started in the other worker."""
    return [Stage("slow", "sleeps", {"n": 1}, _body("slow", out, sleep=60.0)),
            Stage("boom", "dies", {"n": 2}, _body("boom", out, after="slow", kill=True))]


def stages_of(out: Path, options: dict) -> list[Stage]:
    options = dict(options)
    kind = options.pop("kind", "file")
    return {"file": file_stages, "flat": flat_stages, "crash": crash_stages}[kind](out, **options)


def launcher(out: Path, **options) -> list[str]:
    """The command line of one worker running `stages_of(out, options)`."""
    return [sys.executable, __file__, str(out), json.dumps(options), "--worker"]


if __name__ == "__main__":
    out, options, what = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    if what == "--worker":
        run_worker(stages_of(out, options), out)
    else:
        run_stages(stages_of(out, options), out, only=what)
