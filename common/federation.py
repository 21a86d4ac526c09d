"""The run's public settings, as both apps read them from Flower's run config.

Defaults live in ``pyproject.toml`` under ``[tool.flwr.app.config]`` (Flower
rejects overrides of keys not listed there); this module turns that flat
key/value mapping into typed settings and validates it, so that a wrong value
fails at start-up with the key's name, not deep in a round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.data.partition import SCHEMES
from common.errors import ConfigError
from common.privacy.accounting import GRAD_SAMPLE_MODES
from common.privacy.mechanisms import PLACEMENTS
from common.recommender.item_tables import ITEM_TABLES
from common.recommender.model import ModelConfig, ModelOptions

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")
"""What the server does with the averaged update (``server.strategy``); all of it is post-processing."""
USER_UPDATES = ("gradient", "delta")
"""noise=central / distributed: what each sampled user contributes to a round's sum (``client.site_round``)."""
CENTRAL_OPTIMIZERS = ("adam", "sgd")
"""noise=central: what the server does with the noisy mean gradient (``server.central_noise``)."""
MODEL_SELECTIONS = ("best-validation", "last")
"""Which round's global model the run keeps. Choosing by the server's held-out validation users is
post-processing of released models, so it costs no privacy; without an evaluator it is the last round."""


def steps_per_round(noise_placement: str, local_epochs: float, sample_rate: float) -> int:
    """One step when the noise is added once over all sites (central, distributed); else the local epochs' steps."""
    if noise_placement in ("central", "distributed"):
        return 1
    return max(1, math.ceil(local_epochs / sample_rate))


def setting(default: Any, help: str, flag: str = "", choices: tuple[str, ...] = (), cli: bool = True) -> Any:
    """One run setting, declared once: its default, its help line, and how the command line spells it.

    ``flag`` is the option when it is not the key itself (``--clip`` for
    ``max-grad-norm``); ``cli=False`` marks settings the command line sets
    another way (the dataset argument, ``--out``) or not at all (deployment only).
    """
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "cli": cli})


@dataclass(frozen=True)
class RunSettings:
    """Every setting of a federated run: Flower's run config, the ServerApp and ClientApp, and `fedtail simulate`.

    The command line's options (``simulations.cli``), the run config's keys
    (``to_run_config``) and pyproject's defaults (checked by
    tests/common/test_federation.py) all come from these declarations.
    """

    dataset: str = setting(
        "synthetic",
        "simulation: the data split into sites; deployment: the coordinator's own held-out users to evaluate on "
        "(mapped onto catalog-path), or '' when it has none",
        cli=False,
    )
    catalog_path: str = setting(
        "", "deployment: the public catalogue file the model is built on; every site holds the same file", cli=False
    )
    item_text: str = setting(
        "",
        "public item metadata to initialise item embeddings from: MovieLens folder, u.item, movies.csv or CSV "
        "item,text (needs pip install 'fedtail[content]'), or an item -> attribute-ids JSON such as "
        "Beauty_item2attributes.json (or its folder); '' for random",
    )
    item_tables: str = setting(
        "tied",
        "trained: DP training updates the item tables; frozen: the item embedding and output weight keep their "
        "public content initialisation (needs item-text) and only the rest trains: far fewer noised parameters; "
        "tied: one item table serves as the input embedding and the output layer's weight (half the item "
        "parameters)",
        choices=ITEM_TABLES,
    )
    popularity_share: float = setting(
        0.0,
        "DP: share of each site's target epsilon spent before round 1 on a Gaussian release of item popularity "
        "(the output bias's initialisation and the cold-start prior); training gets the rest; 0: off",
    )
    init_model: str = setting(
        "",
        "continue from a released model: a run folder (global_model.pt + catalog.json, a path on the coordinator); "
        "same model shape, a catalogue that extends the released one (new items get new rows)",
        flag="init-from",
    )
    kcore: int = setting(0, "keep only users and items with at least K interactions", cli=False)
    partitioning: str = setting("uniform", "how users are split into sites", flag="partition", choices=SCHEMES)
    seed: int = setting(0, "seed of the partition, the initial model and dropout (public randomness only)")
    out_dir: str = setting("runs/flwr-run", "the run folder", cli=False)
    rounds: int = setting(10, "federated rounds (noise is calibrated on all of them together)")
    evaluate_every: int = setting(
        1, "validate the global model every N rounds, and always after the last one (model selection chooses "
        "among the validated rounds)"
    )
    noise: str = setting(
        "site",
        "where the DP noise is added: site (each site noises its own update; trusts no one) or central (one step "
        "per round: sites send the sum of their users' clipped gradients un-noised and the coordinator adds one "
        "noise for the whole federation; each site must trust the coordinator: node config "
        "trust-coordinator-noise) or distributed (as central, but each site adds a share of the noise and the "
        "coordinator sees only the sum, through Flower's SecAgg+; node config trust-secure-aggregation)",
        choices=PLACEMENTS,
    )
    secure_aggregation_tolerated: int = setting(
        1,
        "noise=distributed: how many of the min-sites sites in each secure sum may drop out or collude with the "
        "coordinator (together) while the sum still carries the full noise; at least 1 (Flower's SecAgg+ needs a "
        "reconstruction threshold below the number of sites) and below min-sites / 2",
    )
    central_optimizer: str = setting(
        "adam",
        "noise=central: the server's optimizer on the noisy mean gradient: adam (DP-Adam), sgd (with "
        "server-momentum); "
        "server-lr is its learning rate, server-momentum its beta_1 or momentum",
        choices=CENTRAL_OPTIMIZERS,
    )
    user_update: str = setting(
        "gradient",
        "noise=central or distributed: what each sampled user adds to the round's sum, clipped to max-grad-norm: "
        "gradient (their gradient at the global weights: one DP-SGD step per round) or delta (the change of the "
        "weights after user-steps SGD steps on their own history at user-lr: user-level DP-FedAvg); same noise, "
        "same privacy accounting",
        choices=USER_UPDATES,
    )
    user_steps: int = setting(2, "user-update=delta: local SGD steps on each sampled user's own history")
    user_learning_rate: float = setting(
        0.5, "user-update=delta: the SGD learning rate of each user's local steps", flag="user-lr"
    )
    model_selection: str = setting(
        "best-validation", "keep the round with the best validation NDCG@10, or the last round",
        choices=MODEL_SELECTIONS,
    )
    fraction_sites: float = setting(1.0, "share of sites sampled per round")
    min_sites: int = setting(1, "at least this many sites per round")
    server_optimizer: str = setting(
        "fedavg", "applied to the averaged update: fedavg (none), fedavgm (momentum), fedadam",
        choices=SERVER_OPTIMIZERS,
    )
    server_learning_rate: float = setting(
        0.0, "server learning rate (0: the optimizer's usual default, 1.0 for fedavgm, 0.01 for fedadam)",
        flag="server-lr",
    )
    server_momentum: float = setting(0.9, "fedavgm's momentum, fedadam's beta_1")
    dp: bool = setting(True, "NON-PRIVATE federated baseline: no clipping, no noise (each site must allow it)",
                       flag="no-dp")
    epsilon: float = setting(8.0, "each site's target epsilon after ALL rounds (noise is calibrated on it)")
    delta: float = setting(1e-5, "the delta epsilon is stated at; must be below 1/users at every site")
    max_grad_norm: float = setting(1.0, "per-user gradient clipping norm C", flag="clip")
    sample_rate: float = setting(
        0.1,
        "DP: probability that a site samples a user into a step (public, the same at every site, never derived "
        "from a site's user count); a round is ceil(local-epochs / sample-rate) steps",
    )
    batch_size: int = setting(
        64,
        "DP: the public divisor of each step's noisy sum (about users x sample-rate; with noise=central the "
        "expected federation batch, all sites' users x sample-rate); without DP: users per step",
    )
    local_epochs: float = setting(1.0, "local passes over a site's users per round")
    learning_rate: float = setting(
        5e-3, "the sites' Adam learning rate (under DP noise 1e-3 learns far slower on the synthetic default)",
        flag="lr",
    )
    loss: str = setting("ce", "ce: full softmax cross-entropy; bce: one sampled negative per position",
                        choices=("ce", "bce"))
    grad_sample_mode: str = setting(
        "ghost", "how per-user gradient norms are measured (ghost: fast, catalogue-independent memory)",
        choices=GRAD_SAMPLE_MODES,
    )
    max_physical_batch_size: int = setting(
        0, "split bigger Poisson batches into pieces of this many users to bound memory (0: never)",
        flag="max-physical-batch",
    )
    # Model options, flat because Flower's run config is flat; one declaration, in ModelOptions.
    max_len: int = setting(ModelOptions.max_len, "most recent items per user")
    hidden: int = setting(ModelOptions.hidden, "hidden size of the transformer and the item embeddings")
    heads: int = setting(ModelOptions.heads, "attention heads (must divide --hidden)")
    blocks: int = setting(ModelOptions.blocks, "transformer blocks")
    dropout: float = setting(ModelOptions.dropout, "dropout rate in [0, 1)")

    def __post_init__(self) -> None:
        # Every float field, first: NaN and inf pass checks such as `epsilon <= 0` (--epsilon inf trained).
        not_finite = [f"{name.replace('_', '-')}={value}" for name, value in vars(self).items()
                      if isinstance(value, float) and not math.isfinite(value)]
        if not_finite:
            raise ConfigError(f"run config: {', '.join(not_finite)}: must be a finite number")
        problems = [
            f"item-tables='{self.item_tables}': use one of {', '.join(ITEM_TABLES)}"
            * (self.item_tables not in ITEM_TABLES),
            "item-tables=frozen needs item-text (public item content to initialise the frozen tables from; "
            "frozen random tables cannot learn)" * (self.item_tables == "frozen" and not self.item_text),
            f"popularity-share={self.popularity_share}: must be in [0, 1)" * (not 0 <= self.popularity_share < 1),
            f"partitioning='{self.partitioning}': use one of {', '.join(SCHEMES)}" * (self.partitioning not in SCHEMES),
            "dataset='' (no evaluation at the server) needs catalog-path"
            * (not self.dataset and not self.catalog_path),
            f"rounds={self.rounds}: must be at least 1" * (self.rounds < 1),
            f"evaluate-every={self.evaluate_every}: must be at least 1" * (self.evaluate_every < 1),
            f"noise='{self.noise}': use one of {', '.join(PLACEMENTS)}" * (self.noise not in PLACEMENTS),
            "noise='central' needs dp = true (the coordinator's noise is the privacy)"
            * (self.noise == "central" and not self.dp),
            "noise='distributed' needs dp = true, fraction-sites = 1 and min-sites >= 3 (every site of the "
            "federation in every secure sum)"
            * (self.noise == "distributed" and (not self.dp or self.fraction_sites != 1 or self.min_sites < 3)),
            f"secure-aggregation-tolerated={self.secure_aggregation_tolerated}: must be at least 1 (Flower's SecAgg+ "
            f"needs a reconstruction threshold below the number of sites) and below min-sites / 2 "
            f"(min-sites={self.min_sites})"
            * (self.noise == "distributed"
               and not 1 <= self.secure_aggregation_tolerated < self.min_sites - self.secure_aggregation_tolerated),
            f"central-optimizer='{self.central_optimizer}': use one of {', '.join(CENTRAL_OPTIMIZERS)}"
            * (self.central_optimizer not in CENTRAL_OPTIMIZERS),
            f"user-update='{self.user_update}': use one of {', '.join(USER_UPDATES)}"
            * (self.user_update not in USER_UPDATES),
            "user-update='delta' needs noise central or distributed (a user's clipped delta is summed across the "
            "federation before one noise)" * (self.user_update == "delta" and self.noise == "site"),
            f"user-steps={self.user_steps}: must be at least 1" * (self.user_steps < 1),
            f"user-learning-rate={self.user_learning_rate}: must be positive" * (self.user_learning_rate <= 0),
            f"model-selection='{self.model_selection}': use one of {', '.join(MODEL_SELECTIONS)}"
            * (self.model_selection not in MODEL_SELECTIONS),
            f"fraction-sites={self.fraction_sites}: must be in (0, 1]" * (not 0 < self.fraction_sites <= 1),
            f"min-sites={self.min_sites}: must be at least 1" * (self.min_sites < 1),
            f"server-optimizer='{self.server_optimizer}': use one of {', '.join(SERVER_OPTIMIZERS)}"
            * (self.server_optimizer not in SERVER_OPTIMIZERS),
            f"server-learning-rate={self.server_learning_rate}: must be 0 (default) or positive"
            * (self.server_learning_rate < 0),
            f"server-momentum={self.server_momentum}: must be in [0, 1)" * (not 0 <= self.server_momentum < 1),
            f"epsilon={self.epsilon}: must be positive" * (self.dp and self.epsilon <= 0),
            f"delta={self.delta}: must be in (0, 1)" * (self.dp and not 0 < self.delta < 1),
            f"max-grad-norm={self.max_grad_norm}: must be positive" * (self.dp and self.max_grad_norm <= 0),
            f"sample-rate={self.sample_rate}: must be in (0, 1]" * (not 0 < self.sample_rate <= 1),
            f"batch-size={self.batch_size}: must be at least 1" * (self.batch_size < 1),
            f"local-epochs={self.local_epochs}: must be positive" * (self.local_epochs <= 0),
            f"learning-rate={self.learning_rate}: must be positive" * (self.learning_rate <= 0),
            f"loss='{self.loss}': use 'ce' or 'bce'" * (self.loss not in ("ce", "bce")),
            f"grad-sample-mode='{self.grad_sample_mode}': use one of {', '.join(GRAD_SAMPLE_MODES)}"
            * (self.grad_sample_mode not in GRAD_SAMPLE_MODES),
            f"max-physical-batch-size={self.max_physical_batch_size}: must be 0 (off) or positive"
            * (self.max_physical_batch_size < 0),
        ]
        problems = [problem for problem in problems if problem]
        if problems:
            raise ConfigError("run config: " + "; ".join(problems))
        ModelOptions(self.max_len, self.hidden, self.heads, self.blocks, self.dropout)  # validates them

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunSettings:
        known = {name.replace("_", "-"): name for name in cls.__dataclass_fields__}
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ConfigError(f"unknown run config keys {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in config.items():
            declared = cls.__dataclass_fields__[known[key]]
            expected = {"int": int, "float": float, "bool": bool, "str": str}[str(declared.type)]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(f"run config {key}={value!r}: expected {expected.__name__}")
            values[known[key]] = value
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        return {name.replace("_", "-"): getattr(self, name) for name in self.__dataclass_fields__}

    def model_options(self) -> ModelOptions:
        return ModelOptions(
            self.max_len, self.hidden, self.heads, self.blocks, self.dropout, tied_items=self.item_tables == "tied"
        )

    def model_config(self, num_items: int) -> ModelConfig:
        return self.model_options().for_catalog(num_items)
