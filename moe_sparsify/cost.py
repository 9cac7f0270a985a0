"""What a search computes, counted in units that do not depend on machine load.

`count_search_cost` hooks the decoder layers and the output head and counts tokens through them
while a plan is made (propagation, e2e reference and re-scoring passes alike); the Gram statistics'
expert evaluations are added by the decider. A streamed model (`--stream`) loads each layer's weights
into the skeleton's own layer modules, which carry the hooks, so its searches are counted alike.
`flops` turns the counts into floating-point operations with a Mixtral-style per-token model, so
searches can be compared on one number. `exhaustive_search_cost` and `e2e_search_cost` are the same
counts in closed form, for estimating a search at shapes too large to run (`scripts/e2e_cost_on_paper.py`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from torch import nn

from .adapters import MoEAdapter


@dataclass
class SearchCost:
    layer_tokens: int = 0  # decoder-layer forwards x tokens
    head_tokens: int = 0  # output head (lm_head) x tokens
    expert_tokens: int = 0  # (token, expert) evaluations for the Gram statistics

    def flops(self, config, seq_len: int) -> float:
        per = TokenFlops.of(config, seq_len)
        return self.layer_tokens * per.layer + self.head_tokens * per.head + self.expert_tokens * per.expert

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TokenFlops:
    """Forward FLOPs per token (2 per multiply-add) of a Mixtral-style decoder: one expert (gate, up and
    down projections), one decoder layer (attention projections, causal attention at half the sequence
    on average, router, top-k experts) and the output head."""

    expert: float
    layer: float
    head: float

    @classmethod
    def of(cls, config, seq_len: int) -> TokenFlops:
        text = getattr(config, "text_config", None) or config
        hidden = text.hidden_size
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        width = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
        experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", 1)
        top_k = getattr(text, "num_experts_per_tok", 1)
        expert = 2 * 3 * hidden * width
        projections = 2 * hidden * head_dim * (2 * heads + 2 * kv_heads)
        attention = 2 * 2 * heads * head_dim * seq_len / 2
        layer = projections + attention + 2 * hidden * experts + top_k * expert
        return cls(expert=expert, layer=layer, head=2 * hidden * text.vocab_size)


def exhaustive_search_cost(layers: int, tokens: int, candidates: int) -> SearchCost:
    """The exhaustive layer-wise search on a model whose every decoder layer is an MoE layer: each layer run
    once over the calibration tokens, and each token's `candidates` experts per layer for the Gram statistics."""
    return SearchCost(layer_tokens=layers * tokens, expert_tokens=layers * candidates * tokens)


def e2e_search_cost(
    layers: int, tokens: int, rescored_tokens: int, candidates: int, stops: Sequence[int], pairs: Sequence[float]
) -> SearchCost:
    """An e2e search (progressive) on a model whose every decoder layer is an MoE layer.

    tokens: calibration tokens; rescored_tokens: those of the e2e sequences; stops[l]: the depth layer l's
    divergence is read at; pairs[l]: the (subset, token) pairs re-scored at layer l (shortlist x
    rescored_tokens without a race). Counts the propagation (each layer run, then run again pruned), the
    reference pass from the first layer with the head read again wherever the depth read changes from
    the layer before, and each re-scored pair through layers l..stops[l]-1 and the head."""
    depth_changes = sum(1 for before, after in zip([None, *stops], stops) if before != after)
    rescored_layers = sum(p * (stop - layer) for layer, (stop, p) in enumerate(zip(stops, pairs, strict=True)))
    return SearchCost(
        layer_tokens=round(2 * layers * tokens + layers * rescored_tokens + rescored_layers),
        head_tokens=round(depth_changes * rescored_tokens + sum(pairs)),
        expert_tokens=layers * candidates * tokens,
    )


def _token_count(args, kwargs) -> int:
    hidden = args[0] if args else kwargs.get("hidden_states")
    return hidden[..., 0].numel()


@contextmanager
def count_search_cost(model: nn.Module, adapter: MoEAdapter, cost: SearchCost) -> Iterator[SearchCost]:
    """Count tokens through every decoder layer and the output head of `model` while the block runs."""

    def on_layer(module, args, kwargs):
        # The pass that catches layer inputs swaps each layer's forward for a recorder that computes nothing.
        if "forward" not in module.__dict__:
            cost.layer_tokens += _token_count(args, kwargs)

    def on_head(module, args, kwargs):
        cost.head_tokens += _token_count(args, kwargs)

    handles = [layer.register_forward_pre_hook(on_layer, with_kwargs=True) for layer in adapter.decoder_layers(model)]
    head = model.get_output_embeddings()
    if head is not None:
        handles.append(head.register_forward_pre_hook(on_head, with_kwargs=True))
    try:
        yield cost
    finally:
        for handle in handles:
            handle.remove()
