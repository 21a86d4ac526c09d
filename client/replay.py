"""Re-sending a released update instead of training again when a round is retried.

When the server dies after a site trained round k but before it saved round k,
the resumed server asks for round k again with the same global model. Training
again would be a second release and would be charged a second time. Sending the
very update that was already released is post-processing of a past release: it
costs no privacy, needs no ledger line, and makes an interrupted run spend
exactly what an uninterrupted one does. Anything else (other run, other round,
other global weights) is trained and charged as usual.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from common.utils.files import save_torch


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode("utf-8"))
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class ReleasedUpdate:
    """The site's last released update, kept beside its ledger on the site's disk."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def find(self, run_id: str, round_number: int, global_fingerprint: str) -> dict[str, torch.Tensor] | None:
        if not self.path.exists():
            return None
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        if (saved["run_id"], saved["round"], saved["global"]) != (run_id, round_number, global_fingerprint):
            return None
        return dict(saved["state_dict"])

    def save(
        self, run_id: str, round_number: int, global_fingerprint: str, state_dict: dict[str, torch.Tensor]
    ) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"run_id": run_id, "round": round_number, "global": global_fingerprint, "state_dict": state_dict}
        save_torch(self.path, payload)
