"""One Poisson-sampled step's sum of per-user clipped gradients, without noise: a site's part of a shared noise.

Under ``noise = central`` (and any placement where the noise is added to the
sum over all sites) a site's contribution to one DP step is the sum, over the
users it sampled, of each user's gradient clipped to norm C. The sampling and
the clipping are the project's own (``client.dp_sgd.make_private`` with noise
multiplier 0: Opacus' Poisson loader, ghost clipping or per-sample hooks,
length-sorted pieces, a user with a non-finite loss or norm adding exactly 0),
so the sum is exactly what DP-SGD would have noised at the site. It takes no
step: its one forward pass runs on the coordinator's weights, which the site
checked against its box on arrival (``client.policy.incoming_weights_problem``),
so every pass runs on bounded weights here too.

The sum is NOT private on its own: whoever adds the noise must see it (the
coordinator, trusted by the site's node config) or must see it only inside a
secure sum with the other sites'.
"""

from __future__ import annotations

import torch

from client.dp_sgd import PIECE_USERS, backward_clipped, make_private
from common.data.split import TrainingExamples
from common.privacy.mechanisms.gaussian import secret_generator
from common.protocol.round_plan import LocalTraining, PrivacyPlan, RoundPlan
from common.recommender.model import SASRec


def clipped_sum(
    model: SASRec,
    examples: TrainingExamples,
    training: LocalTraining,
    max_grad_norm: float,
    device: torch.device,
    piece_users: int = PIECE_USERS,
) -> dict[str, torch.Tensor]:
    """Sum over one Poisson sample (rate ``training.sample_rate``) of each user's gradient clipped to ``max_grad_norm``.

    Returns one tensor per trainable parameter, on the CPU; an empty sample
    gives zeros. The model's weights are left as they were. The sampling
    generator is seeded from the operating system (``secret_generator``).
    """
    if len(examples) == 0:  # nobody to sample (Opacus' sampler refuses an empty dataset): the sum is zero
        return {name: torch.zeros_like(p).cpu() for name, p in model.named_parameters() if p.requires_grad}
    model.to(device).train()
    plan = RoundPlan(training.sample_rate, steps=1, noise_multiplier=0.0)
    privacy = PrivacyPlan(max_grad_norm=max_grad_norm, planned_rounds=1, noise_placement="central")
    unsplit = LocalTraining(**{**training.__dict__, "max_physical_batch_size": 0})  # one draw is one sum
    private = make_private(
        model, examples, unsplit, privacy, plan, secret_generator(torch.device("cpu")), secret_generator(device)
    )
    private.optimizer.expected_batch_size = 1  # Opacus divides the clipped sum by it: keep the sum itself
    try:
        inputs, targets = next(iter(private.loader))
        backward_clipped(private, inputs.to(device), targets.to(device), piece_users)
        private.optimizer.pre_step()  # clip (hooks mode), add noise of std 0, scale by 1; no weight update
        return {
            name: (torch.zeros_like(p) if p.grad is None else p.grad).detach().cpu().clone()
            for name, p in model.named_parameters()
            if p.requires_grad
        }
    finally:
        private.model.cleanup()
