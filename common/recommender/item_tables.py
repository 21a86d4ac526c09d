"""Which item tables DP training updates: ``item-tables = trained | frozen | tied`` (run config).

Most of the parameters a site clips and noises are the two item tables (the
input embedding and the output layer's weight): 78% of them on MovieLens-100K,
97% on Amazon Beauty. Under DP the noise's norm grows with the square root of
the number of noised parameters, while one user's gradient touches few item
rows. ``frozen`` keeps both tables out of training: they stay as the
coordinator's initial model set them (from public item content, which costs
no privacy), and only the transformer, the norms, the position embedding and
the output bias train. A frozen table is never clipped, noised or updated, so
a site sends it back exactly as it received it, and the server keeps it
exactly as it was (``server.strategy``). A frozen *random* table would be
useless, so ``frozen`` needs public content (``item-text``). ``tied`` trains
one table for both the input embedding and the output scores (half the item
parameters; ``common.recommender.model.TiedItemTable``), clipped per user
with both of its uses added (``client.tied_grad_sampler``).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from common.errors import ConfigError

ITEM_TABLES = ("trained", "frozen", "tied")
ITEM_TABLE_PARAMETERS = ("item_embedding.weight", "output.weight")
"""The state-dict names of the two item tables (``common.recommender.model.SASRec``)."""


def frozen_parameters(item_tables: str) -> tuple[str, ...]:
    """The state-dict names that ``item_tables`` keeps out of training."""
    if item_tables not in ITEM_TABLES:
        raise ConfigError(f"item-tables='{item_tables}': use one of {', '.join(ITEM_TABLES)}")
    return ITEM_TABLE_PARAMETERS if item_tables == "frozen" else ()


def apply_item_tables(model: nn.Module, item_tables: str) -> None:
    """Mark the frozen tables ``requires_grad=False``: before Opacus wraps the model, so it never sees them."""
    frozen = set(frozen_parameters(item_tables))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in frozen)


def trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """What an optimizer gets: a frozen table in it would only be skipped (it never has a gradient)."""
    return (parameter for parameter in model.parameters() if parameter.requires_grad)
