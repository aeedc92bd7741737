"""The recipes that ship inside the package (`src/diffalign/configs/`, also `configs/` in a clone), by name.

`diffalign train toy_mapo` and `diffalign pairs pairs/toy_ranked` find them without a clone; `diffalign configs`
lists them. A path that exists is always used as it is: a user's own file wins over a shipped name.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from .errors import UserError

CONFIGS = Path(__file__).parent / "configs"


def shipped_configs() -> dict[str, Path]:
    """{name: file}: the name is the path under the configs folder without `.yaml` (`toy_mapo`, `pairs/toy_ranked`)."""
    return {p.relative_to(CONFIGS).with_suffix("").as_posix(): p for p in sorted(CONFIGS.rglob("*.yaml"))}


def describe(path: Path) -> str:
    """The first comment line of a config file (what the recipe is), without the `#`."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def resolve_config(name_or_path: str | None) -> str | None:
    """A config argument as a file path: an existing file as given, else a shipped config's name (with or
    without `.yaml`); otherwise a UserError naming the closest shipped names."""
    if name_or_path is None or Path(name_or_path).is_file():
        return name_or_path
    shipped = shipped_configs()
    name = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    name = name[len("configs/"):] if name.startswith("configs/") else name
    if name in shipped:
        return str(shipped[name])
    close = difflib.get_close_matches(name, list(shipped), n=3, cutoff=0.5)
    hint = f"; shipped configs with a close name: {', '.join(close)}" if close else ""
    raise UserError(f"config '{name_or_path}' is neither a file nor a shipped config{hint} "
                    "(`diffalign configs` lists them)")
