"""The names on the wire between a site and the coordinator: the fields of a site's reply and of the requests.

The site writes them (``client.app``) and the coordinator reads them (``server.strategy``, ``server.central_noise``,
``server.popularity``): one declaration each, here.
"""

from __future__ import annotations

import torch

WEIGHT_METRIC = "weight"
"""The reply field FedAvg weighs a site's update by (its node config's public ``fedavg-weight``)."""
REPLY_METRICS = (WEIGHT_METRIC, "epsilon", "dp", "declined", "ledger-lines")
"""The fields of a site's training reply's "metrics" record: public numbers only."""
REPLY_SITE_FIELDS = ("site-id", "reason", "ledger-hash")
"""The fields of a site's training reply's "site" record."""
NOISE_MULTIPLIER_METRIC = "noise-multiplier"
"""noise = central (and distributed): the reply field in which a site states the multiplier of the total noise its
epsilon assumes; the coordinator adds (or requires) at least that."""
POPULARITY_TASK = "popularity"
"""The value of ``POPULARITY_TASK_KEY`` in a secure sum's config that asks for the popularity release, not a round."""
POPULARITY_TASK_KEY = "fedtail-task"


def trainable_names(model: torch.nn.Module) -> list[str]:
    """The parameters a step changes, in the model's order: the arrays a site sums and sends (frozen ones,
    ``requires_grad`` False, are neither summed nor sent)."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]
