"""PhiMoE (Phi-3.5-MoE; transformers 5.x).

From models/phimoe/modeling_phimoe.py: the router (`mlp.router`, an
nn.Linear without bias) feeds `sparsemixer`, which at inference picks the
argmax logit, weights it by a softmax over the experts whose relative gap to
it, (top - l) / max(|l|, top), is within 2 x `router_jitter_noise`, then does
the same for the best remaining expert with the first excluded. It always
routes to 2 experts (`num_experts_per_tok` is not read) and never
renormalises. The selection is a plain top-2 by logit, so the exact search's
candidate bound holds; a weight depends on every kept expert in its band,
which the objective reads from all kept logits (routing.sparsemixer_weights).
Routing runs in the model dtype (no float32 upcast), so bf16 models match
the objective to bf16 rounding, float32 ones exactly. On disk the block is
`block_sparse_moe` with the router as `gate` and experts as w1/w2/w3.
"""

from __future__ import annotations

from ..routing import RoutingSpec, Scoring, Weighting
from .base import MoEAdapter


class PhimoeAdapter(MoEAdapter):
    model_types = ("phimoe",)
    expert_count_keys = ("num_local_experts",)
    router_attr = "router"
    checkpoint_renames = ((".block_sparse_moe.", ".mlp."), (".mlp.gate.", ".mlp.router."))

    @property
    def top_k(self) -> int:
        return 2  # sparsemixer's, whatever num_experts_per_tok says

    @property
    def routing(self) -> RoutingSpec:
        return RoutingSpec(2, Scoring.SPARSEMIXER, Weighting.SCORES, jitter=self.config.router_jitter_noise)
