"""push_to_hub: the run's repo is created when the run starts (a missing token or a repo it cannot write fails
then, not after hours of training), each checkpoint's weights are uploaded in the background when
hub_push_checkpoints asks, and the final weights, the model card and the last validation grid at the end.

The token comes from huggingface_hub (the HF_TOKEN environment variable, or the login of `hf auth login`); it is
held by the ``HfApi`` client only: never logged, never in config.yaml, the model card or the metrics.
``HF_ENDPOINT`` points the client at another hub (the tests run a local stand-in).
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..models.folders import weight_patterns
from .hub_keys import default_hub_model_id

# The files of a run folder (or of a checkpoint-N folder) that are its weights: a LoRA, or the network folders of
# a full fine-tune (unet/ or transformer/; unet_raw/ or transformer_raw/: the trained weights beside an EMA).
WEIGHT_PATTERNS = ["pytorch_lora_weights.safetensors", *weight_patterns()]


def _first_line(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def hub_token() -> str | None:
    """The token huggingface_hub would use (HF_TOKEN, else the stored login); None when there is none."""
    env = os.environ.get("HF_TOKEN", "").strip()
    if env:
        return env
    from huggingface_hub import get_token

    return get_token()


class HubPush:
    """One run's uploads to its hub repo (main process only)."""

    def __init__(self, api, repo_id: str, log: Callable[[str], None]):
        self.api, self.repo_id, self.log = api, repo_id, log
        self._pending: list[tuple[str, Future]] = []

    @classmethod
    def start(cls, cfg, log: Callable[[str], None], *, main: bool, api=None) -> "HubPush | None":
        """Check the token on every process; on the main process create the repo (exist_ok) and record its full
        id in ``cfg.hub_model_id``. None when push_to_hub is off or on the other processes."""
        if not cfg.push_to_hub:
            return None
        token = hub_token()
        if not token:
            raise UserError("push_to_hub=true needs a hub token with write access: set HF_TOKEN or run "
                            "`hf auth login` (the token is never read from the config)")
        if not main:
            return None
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
        repo = default_hub_model_id(cfg)
        try:
            url = api.create_repo(repo, exist_ok=True, repo_type="model")
        except Exception as exc:
            raise UserError(f"push_to_hub: cannot create or open the hub repo '{repo}': {_first_line(exc)}; check "
                            "that the token can write there, or set hub_model_id") from None
        repo_id = getattr(url, "repo_id", None) or repo
        cfg.hub_model_id = repo_id  # the model card's usage snippet and config.yaml name the full id
        log(f"push_to_hub: the weights go to the hub repo {repo_id}")
        return cls(api, repo_id, log)

    def push_checkpoint(self, folder: Path) -> None:
        """Upload a checkpoint's weights to checkpoint-N/ of the repo in the background; the resume state stays
        local. A failure is reported at the end of the run, never stops training."""
        folder = Path(folder)
        try:
            future = self.api.upload_folder(repo_id=self.repo_id, folder_path=str(folder), path_in_repo=folder.name,
                                            allow_patterns=WEIGHT_PATTERNS, commit_message=f"{folder.name} weights",
                                            run_as_future=True)
        except Exception as exc:
            self.log(f"warning: push_to_hub: {folder.name} was not uploaded: {_first_line(exc)}")
            return
        self._pending.append((folder.name, future))

    def final_files(self, out: Path) -> list[str]:
        """The patterns of the final upload: the weights, the model card and the last validation grid."""
        grids = sorted((out / "validation").glob("step-*.png")) if (out / "validation").is_dir() else []
        return [*WEIGHT_PATTERNS, "README.md", *([grids[-1].relative_to(out).as_posix()] if grids else [])]

    def push_final(self, out: Path) -> None:
        """Wait for the checkpoint uploads, then upload the final files; a failure stops with what to run."""
        out = Path(out)
        for name, future in self._pending:
            try:
                future.result()
                self.log(f"push_to_hub: uploaded {name} weights")
            except Exception as exc:
                self.log(f"warning: push_to_hub: {name} was not uploaded: {_first_line(exc)}")
        self._pending.clear()
        patterns = self.final_files(out)
        try:
            info = self.api.upload_folder(repo_id=self.repo_id, folder_path=str(out), allow_patterns=patterns,
                                          commit_message="diffalign: final weights, model card, validation grid")
        except Exception as exc:
            include = " ".join(f"--include '{p}'" for p in patterns)
            raise UserError(f"the run finished and its outputs are in {out}, but the upload to the hub repo "
                            f"{self.repo_id} failed: {_first_line(exc)}; upload them with `hf upload {self.repo_id} "
                            f"{out} . {include}`") from None
        url = getattr(info, "commit_url", None) or self.repo_id
        self.log(f"push_to_hub: uploaded the weights, the model card and the validation grid ({url})")


__all__ = ["HubPush", "WEIGHT_PATTERNS", "hub_token"]
