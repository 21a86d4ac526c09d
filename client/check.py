"""What a site operator runs before joining a federation: ``fedtail deploy check``.

It reads exactly what the SuperNode's ClientApp will read (the node config's
data file, catalogue, ledger folder and budget), so that a problem shows up
here, with its file named, rather than as a failed round at the coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch

from common.data.catalog import Catalog
from common.data.datasets import load_dataset
from common.data.split import training_examples
from common.errors import ConfigError, FedtailError
from common.privacy.accounting import check_delta
from common.privacy.ledger import Ledger
from common.run_files import site_ledger


@dataclass
class SiteCheck:
    facts: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"  ok       {fact}" for fact in self.facts] + [f"  PROBLEM  {problem}" for problem in self.problems]
        verdict = "ready to join" if self.ready else f"NOT ready: {len(self.problems)} problem(s)"
        return "\n".join(["fedtail site check", *lines, verdict])


def check_site(
    data_path: Path, catalog_path: Path, ledger_dir: Path, max_epsilon: float, delta: float, max_len: int,
    site_id: str | None = None,
) -> SiteCheck:
    """Everything the ClientApp will need, checked without training or writing anything."""
    check = SiteCheck()
    site_id = site_id or data_path.stem
    check.facts.append(f"site id '{site_id}' (node config site-id; its ledger is site-{site_id}.jsonl)")
    catalog = None
    try:
        catalog = Catalog.load(catalog_path)
        check.facts.append(
            f"catalogue {catalog_path}: {catalog.num_items} items, fingerprint {catalog.fingerprint()[:16]} (the "
            "sha256 of its item ids, not of the file: must begin the fingerprint the coordinator published with "
            "`fedtail deploy catalog`)"
        )
    except FedtailError as error:
        check.problems.append(str(error))
    if catalog is not None:
        _check_data(check, data_path, catalog, delta, max_len)
    _check_budget(check, ledger_dir, site_id, max_epsilon, delta)
    device = f"CUDA GPU seen: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU seen: CPU"
    check.facts.append(f"{device}; flwr {version('flwr')}, torch {torch.__version__}, opacus {version('opacus')} "
                       "(the coordinator must run the same flwr)")
    return check


def _check_data(check: SiteCheck, data_path: Path, catalog: Catalog, delta: float, max_len: int) -> None:
    try:
        dataset = load_dataset(str(data_path))
        total = len(dataset.frame)
        known, unknown = dataset.restricted_to(catalog)
    except FedtailError as error:
        check.problems.append(str(error))
        return
    _, sequences = known.sequences(catalog)
    users = len(training_examples(sequences, max_len))
    check.facts.append(
        f"data {data_path}: {total} interactions, {len(sequences)} users; {users} with a training pair"
    )
    if unknown:
        check.facts.append(f"{unknown} of {total} interactions name items outside the catalogue; they will be ignored")
    if users == 0:
        check.problems.append(f"{data_path}: no user has two or more interactions with catalogue items")
        return
    try:
        check_delta(users, delta)  # the rule the site applies before every DP round
    except ConfigError as error:
        check.problems.append(f"{error}: this site would refuse DP rounds")
        return
    check.facts.append(f"delta {delta:g} < 1/users = 1/{users}: holds")


def _check_budget(check: SiteCheck, ledger_dir: Path, site_id: str, max_epsilon: float, delta: float) -> None:
    if max_epsilon <= 0:
        check.problems.append(f"max-epsilon={max_epsilon}: the site's budget must be positive")
        return
    path = site_ledger(ledger_dir, site_id)
    try:
        spent = Ledger(path).epsilon(delta) if path.exists() else 0.0
    except FedtailError as error:
        check.problems.append(f"ledger {path}: {error}")
        return
    if not ledger_dir.exists():
        check.facts.append(f"ledger folder {ledger_dir} will be created on the first round")
    elif not _writable(ledger_dir):
        check.problems.append(f"ledger folder {ledger_dir} is not writable")
    left = max_epsilon - spent
    note = f"epsilon spent {spent:.3f} of max-epsilon {max_epsilon:g} at delta {delta:g}; {max(left, 0):.3f} left"
    (check.facts if left > 0 else check.problems).append(f"ledger {path}: {note}")


def _writable(folder: Path) -> bool:
    probe = folder / ".fedtail-write-check"
    try:
        probe.write_text("", encoding="utf-8")
        probe.unlink()
        return True
    except OSError:
        return False
