"""The audit's report: the guarantee it states, per site and overall, and its files (audit.json, audit.md, the plot).

Besides what was checked, the report always says what the guarantee does not
cover (``NOT_COVERED``) and what no check here can show (``LIMITS``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from common.privacy.accounting import delta_below_one_over_users
from common.utils.files import atomic_write_text, write_json
from common.utils.plot import Panel, Series, write_line_charts
from simulations.audit.accounting import ACCOUNTANTS
from simulations.audit.findings import ABSOLUTE_TOLERANCE, RELATIVE_TOLERANCE, Finding

AUDIT_JSON, AUDIT_MARKDOWN, AUDIT_PLOT = "audit.json", "audit.md", "audit-epsilon.svg"


NOT_COVERED = (
    "Releases that are not DP-SGD steps and so are not in any ledger: anything a site or the server published "
    "besides the trained weights (metrics, counts, logs). fedtail sites send only weights, public parameters and "
    "their epsilon; their FedAvg weights are declared or uniform, not user counts.",
    "Which rounds each site took part in, declined, or failed, and how long it took: visible to the server, "
    "not noised.",
    "Hyper-parameter tuning: every earlier run on the same users spends budget too. Only the runs and ledgers given "
    "to this audit are composed.",
    "A catalogue (item list) derived from private interactions. In simulation the catalogue is built from the whole "
    "dataset; a deployment should use a public catalogue.",
    "In simulation, the server's per-round validation and final test metrics are computed on held-out users' raw "
    "data: they are outside the guarantee (a deployment evaluates nothing on private data, or does it with DP).",
    "Users who appear at more than one site: the global guarantee assumes users are disjoint across sites.",
)


LIMITS = (
    "That the ledger lines describe the training that ran: epsilon is recomputed from the mechanism each line "
    "states (noise, sampling rate, steps). A site running other code than the fedtail it approved could write "
    "lines that do not match what it released.",
    "A coordinator's record is an outside witness only when the coordinator and the site are separate parties: one "
    "operator holding both (a simulation's run folder) can rewrite both consistently.",
)
"""What no check here can show, whatever is given: always listed under "Not verified"."""


@dataclass
class SiteAudit:
    site: str
    ledgers: list[str]
    runs: list[str]
    entries: int
    steps: int
    delta: float
    recorded_epsilon: float | None
    """The last line's own claim; None when several ledgers are composed (no single line claims the total)."""
    recomputed: dict[str, float | None]
    accountant: str
    """The accountant the site spends with (its last line's), of ``ACCOUNTANTS``: the stated epsilon's."""
    users: int | None
    mechanism: str
    """Noise multiplier, sampling rate and clipping norm over the site's lines (a range where they vary)."""
    epsilon_per_entry: list[float]
    """Recomputed (the site's accountant) after each entry, in ledger order: the plot."""
    trust: list[str] = field(default_factory=list)
    """Per noise placement in the site's lines, what its epsilon relies on (the lines' own words)."""

    @property
    def trusts_coordinator(self) -> bool:
        return any(text.startswith("central:") for text in self.trust)

    @property
    def trusts_secure_aggregation(self) -> bool:
        return any(text.startswith("distributed:") for text in self.trust)

    @property
    def epsilon(self) -> float:
        """The guarantee stated: what the sites' own accountant gives, never less than what was recorded."""
        recomputed = self.recomputed[self.accountant]
        candidates = [value for value in (recomputed, self.recorded_epsilon) if value is not None]
        return max(candidates, default=0.0)

    @property
    def delta_below_one_over_users(self) -> bool | None:
        return None if self.users is None else delta_below_one_over_users(self.users, self.delta)


@dataclass
class AuditReport:
    paths: list[str]
    coordinator: list[str]
    """Coordinator records given besides the paths (run folders among the paths are their own record)."""
    sites: dict[str, SiteAudit]
    findings: list[Finding]
    dp: bool
    not_covered: list[str] = field(default_factory=lambda: list(NOT_COVERED))
    not_verified: list[str] = field(default_factory=lambda: list(LIMITS))
    witnessed: bool = False
    """Every ledger was checked, through its last line, against a coordinator's record of its head."""

    @property
    def passed(self) -> bool:
        return not any(finding.severity == "error" for finding in self.findings)

    @property
    def epsilon(self) -> float | None:
        return max((site.epsilon for site in self.sites.values()), default=None)

    @property
    def delta(self) -> float | None:
        return max((site.delta for site in self.sites.values()), default=None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "dp": self.dp,
            "paths": self.paths,
            "coordinator": self.coordinator,
            "global": {
                "epsilon": self.epsilon,
                "delta": self.delta,
                "tier": tier(self.epsilon),
                "statement": global_statement(self),
            },
            "sites": {
                site_id: {
                    **asdict(site),
                    "epsilon": site.epsilon,
                    "tier": tier(site.epsilon),
                    "delta_below_one_over_users": site.delta_below_one_over_users,
                }
                for site_id, site in self.sites.items()
            },
            "findings": [asdict(finding) for finding in self.findings],
            "assumptions": assumptions(),
            "not_covered": self.not_covered,
            "not_verified": self.not_verified,
            "witnessed": self.witnessed,
            "tolerance": {"relative": RELATIVE_TOLERANCE, "absolute": ABSOLUTE_TOLERANCE},
            "versions": {name: version(name) for name in ("opacus", "dp-accounting")},
        }


def tier(epsilon: float | None) -> str:
    """Ponomareva et al. 2023 ("How to DP-fy ML"), section 5.2."""
    if epsilon is None:
        return "none: no DP guarantee"
    if epsilon <= 1:
        return "strong (epsilon <= 1)"
    if epsilon <= 10:
        return "reasonable (epsilon <= 10)"
    return "weak (epsilon > 10)"


def assumptions() -> dict[str, str]:
    return {
        "privacy unit": "one user: all of a user's interactions at a site (one training example per user)",
        "neighbouring relation": "add or remove one user (with all of their interactions) at one site",
        "mechanism": "DP-SGD: per-user gradients clipped to norm C, Gaussian noise of std noise_multiplier * C added "
        "to their sum at every step",
        "sampling": "Poisson sampling of users at each step, at the ledger's sample rate",
        "composition": "all steps of all ledger lines of a site, across rounds and the runs given, composed",
        "accountants": "each site's own accountant (dp-accounting PLD; Opacus RDP for ledgers written before fedtail "
        "spent with PLD) gives the stated epsilon; dp-accounting PLD and Opacus PRV (two code bases estimating the "
        "exact epsilon from above) cross-check each other; Opacus RDP is a looser upper bound, shown beside them",
        "global model": "users are disjoint across sites, so the global model is (max over sites of epsilon, "
        "delta)-DP for every user; FedAvg of DP updates is post-processing",
        "threat model": "the server and other sites see every update a site sends; nothing is assumed of secure "
        "aggregation or of site sampling (no amplification by site sampling is claimed)",
        "noise placement": "site: the site added the noise to its own update, and its epsilon holds against "
        "everyone, the coordinator included. central: the site sent the coordinator the un-noised sum of its "
        "sampled users' clipped gradients, or of its users' popularity vectors "
        "(one step per line); the ledger's noise multiplier is that of the noise "
        "the coordinator adds once to the sum over all sites, so the epsilon holds only against those who see the "
        "global models, and only if the coordinator added that noise; against the coordinator itself a central "
        "release is NOT private. distributed: the site added a share of that noise to its sum and sent it through "
        "Flower's secure aggregation (SecAgg+); the epsilon holds against everyone, the coordinator included, if "
        "the coordinator saw only the sum (it followed the protocol) and enough sites' shares were in it; otherwise "
        "the site's fallback epsilon (its own share alone, stated per site in the findings) is what holds",
    }


def global_statement(report: AuditReport) -> str:
    if not report.dp:
        return "NO GUARANTEE: the run was trained without differential privacy"
    if report.epsilon is None:
        return "NO GUARANTEE CAN BE STATED: no ledger lines were found"
    central = [site.site for site in report.sites.values() if site.trusts_coordinator]
    distributed = [site.site for site in report.sites.values() if site.trusts_secure_aggregation]
    return (
        f"({report.epsilon:.3f}, {report.delta:g})-DP for every user, user-level, add/remove-one-user neighbouring, "
        f"over {len(report.sites)} site(s); tier: {tier(report.epsilon)}"
        + (
            f". ASSUMES the coordinator added the noise for site(s) {', '.join(central)} (central noise): against "
            "the coordinator itself their releases are NOT private"
            if central else ""
        )
        + (
            f". ASSUMES Flower's secure aggregation showed the coordinator only the sum of the noise shares for "
            f"site(s) {', '.join(distributed)} (distributed noise): if it did not, each of their releases is "
            "protected by its own share alone (fallback epsilon in the findings)"
            if distributed else ""
        )
        + ("" if report.passed else ". THE AUDIT FAILED: see the findings; this statement cannot be relied on")
    )


def write_audit(report: AuditReport, out_dir: Path) -> list[Path]:
    """audit.json (for machines), audit.md (for a person) and the epsilon plot, side by side."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / AUDIT_JSON, report.as_dict())
    series = [
        Series(f"site {site.site}", list(range(1, len(site.epsilon_per_entry) + 1)), site.epsilon_per_entry)
        for site in report.sites.values()
    ]
    panel = Panel("epsilon per site (recomputed, the site's accountant)", "training call", series)
    write_line_charts(out_dir / AUDIT_PLOT, [panel])
    atomic_write_text(out_dir / AUDIT_MARKDOWN, format_markdown(report))
    return [out_dir / AUDIT_JSON, out_dir / AUDIT_MARKDOWN, out_dir / AUDIT_PLOT]


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _verdict(report: AuditReport) -> str:
    if not report.dp:
        return "NO GUARANTEE (trained without DP)"
    if not report.passed:
        return "FAILED"
    return "PASSED" if report.witnessed else "PASSED, NOT WITNESSED (see 'Not verified')"


def format_markdown(report: AuditReport) -> str:
    records = ", ".join(f"`{p}`" for p in report.coordinator)
    lines = [
        f"# Privacy audit: {_verdict(report)}",
        "",
        f"Audited: {', '.join(f'`{p}`' for p in report.paths)}"
        + (f", against the coordinator's record {records}" if records else "")
        + f". Recomputed from the ledgers with Opacus {version('opacus')} and dp-accounting "
        f"{version('dp-accounting')}.",
        "",
        "## Guarantee",
        "",
        f"**{global_statement(report)}.**",
        "",
    ]
    if report.sites:
        lines += [
            "| site | epsilon (stated) | recorded | Opacus RDP | Opacus PRV | dp-accounting PLD | delta "
            "| delta < 1/users | mechanism | steps | ledger lines | tier |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for site in report.sites.values():
            below = {True: "yes", False: "NO", None: "unknown"}[site.delta_below_one_over_users]
            lines.append(
                f"| {site.site} | {site.epsilon:.4f} | {_number(site.recorded_epsilon)} | "
                + " | ".join(_number(site.recomputed[name]) for name in ACCOUNTANTS)
                + f" | {site.delta:g} | {below} | {site.mechanism} | {site.steps} | {site.entries} "
                f"| {tier(site.epsilon)} |"
            )
        lines += [
            "",
            "The stated epsilon is the site's own accountant ("
            + ", ".join(sorted({site.accountant for site in report.sites.values()}))
            + ") recomputed, or the recorded value if that is higher. PRV and PLD estimate the exact epsilon from "
            "above (two code bases); RDP is a looser upper bound. An epsilon recomputed by the site's own accountant, "
            f"PRV or PLD more than {RELATIVE_TOLERANCE:.0%} above the recorded one fails the audit.",
            "",
            *[f"- site {site.site}: {'; '.join(site.trust)}" for site in report.sites.values()],
            "",
            f"![epsilon per site after each training call]({AUDIT_PLOT})",
            "",
        ]
    lines += ["## Findings", ""]
    lines += [f"- {finding}" for finding in report.findings] or [
        "- none: every hash chain is intact and every epsilon the ledgers record matches its recomputation "
        "(what these checks cannot show is listed below)"
    ]
    lines += ["", "## Not verified", ""]
    lines += [f"- {text}" for text in report.not_verified]
    lines += ["", "## Assumptions", ""]
    lines += [f"- **{name}**: {text}" for name, text in assumptions().items()]
    lines += ["", "## Not covered by this guarantee", ""]
    lines += [f"- {text}" for text in report.not_covered]
    return "\n".join(lines) + "\n"
