"""The sparsely-gated Mixture-of-Experts layer (Shazeer et al., 2017), usable on its own.

    from sparse_moe.moe import MoE, MoEConfig
    moe = MoE(MoEConfig(d_model=512, d_hidden=1024, num_experts=64, k=4))
    out = moe(x)        # out.y, out.aux_loss, out.importance, out.load, out.counts
"""

from sparse_moe.moe.config import MoEConfig
from sparse_moe.moe.dispatcher import DispatchedTokens, LocalDispatcher, TokenDispatcher
from sparse_moe.moe.experts import GroupedFFNExperts, grouped_matmul
from sparse_moe.moe.layer import HierarchicalMoE, MoE, MoEOutput
from sparse_moe.moe.router import (
    NoisyTopKRouter,
    RouterOutput,
    Routing,
    StrictlyBalancedRouter,
    build_router,
    cv_squared,
    noisy_top_k,
    prob_in_top_k,
)


def build_moe(config: MoEConfig, dispatcher: TokenDispatcher | None = None,
              init_seed: int | None = None) -> MoE | HierarchicalMoE:
    """The flat or hierarchical layer, whichever the config describes.

    ``dispatcher`` decides which experts this process holds (all, by default); ``init_seed``
    seeds their initial weights expert by expert (see ``GroupedFFNExperts``).
    """
    layer = HierarchicalMoE if config.hierarchical else MoE
    return layer(config, dispatcher, init_seed)


__all__ = [
    "MoEConfig", "MoE", "HierarchicalMoE", "MoEOutput", "build_moe", "TokenDispatcher",
    "LocalDispatcher", "DispatchedTokens", "GroupedFFNExperts", "grouped_matmul",
    "NoisyTopKRouter", "StrictlyBalancedRouter", "Routing", "RouterOutput", "build_router",
    "cv_squared", "noisy_top_k",
    "prob_in_top_k",
]
