"""What moe-sparsify needs to know about one MoE family.

An adapter finds the MoE blocks, reproduces the block's routing exactly
(`router_logits` + a `RoutingSpec`), evaluates one expert on chosen tokens,
and says how checkpoint tensors and config keys change when experts go.
Everything model-independent (scoring subsets, searching) lives elsewhere.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..routing import RoutingSpec, route
from ..skip_rules import skip_keep_mask, skipped_weights

# model_type -> adapter class, filled as adapter classes are defined (see `MoEAdapter.__init_subclass__`).
ADAPTERS: dict[str, type[MoEAdapter]] = {}

# Config keys that hold the routed-expert count in one family or another.
COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class TensorRule:
    """How one checkpoint tensor changes when a layer keeps some experts.

    kind: "expert" (one tensor per expert: drop or renumber), "stacked"
    (experts along dim 0: gather kept rows), "router" (one entry per expert along
    its first axis of that size: gather; ERNIE's correction bias is 1 x n),
    "flat" (experts as consecutive blocks of `rows` rows: DBRX).
    """

    kind: str
    layer: int
    expert: int | None = None
    # Per-expert tensors are named head + expert id + tail.
    head: str = ""
    tail: str = ""
    rows: int = 0  # "flat": rows per expert

    def renamed(self, new_expert: int) -> str:
        return f"{self.head}{new_expert}{self.tail}"


class MoEAdapter:
    """Defaults fit the transformers 5.x MoE blocks: `layer.mlp` holding a router (`gate`) and an
    `@use_experts_implementation` experts module with fused, stacked tensors, a top-k renormalised
    softmax, and shared experts (if any) at `mlp.shared_experts` added ungated; families override.

    A subclass is registered for the model types it declares itself (`model_types` in its own body)."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # Config keys that may hold the routed-expert count: the first present is read, every present
    # one is rewritten on export, and those in `always_written_keys` are written even if absent.
    expert_count_keys: ClassVar[tuple[str, ...]] = ()
    always_written_keys: ClassVar[tuple[str, ...]] = ()
    block_attr: ClassVar[str] = "mlp"  # the decoder layer's attribute holding the MoE block
    router_attr: ClassVar[str] = "gate"
    # Legacy module names on disk -> names in the 5.x modules (what transformers' conversion mapping renames).
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    # Routers that compute their logits in float32 whatever the model dtype (DeepSeek, ERNIE, Kolibri).
    router_in_float32: ClassVar[bool] = False
    # Whether a decoder layer can be read from the shards with those renames and per-expert stacking
    # alone (`--stream`); families whose loader also splits or concatenates other tensors cannot.
    streamable: ClassVar[bool] = True
    # Dynamic skipping registers an experts function with transformers' experts interface.
    supports_skipping: ClassVar[bool] = True
    # A keyword argument each decoder layer receives from the previous layer's second output.
    carried_kwarg: ClassVar[str | None] = None
    block_returns_tuple: ClassVar[bool] = False  # GPT-OSS's block returns (output, router scores)
    per_expert_pattern: ClassVar[re.Pattern] = re.compile(
        r"^(?P<head>.*\.layers\.(?P<layer>\d+)\..*\.experts\.)(?P<expert>\d+)(?P<tail>\..+)$"
    )
    # On-disk names, as save_pretrained writes them for each family (transformers' conversion mapping
    # reversed): fused experts, Granite's input/output_linear, Aria's fc1/fc2; router rows, biases and
    # correction biases wherever a family keeps them (gate.wg: Hunyuan; moe_statics: ERNIE; router.layer:
    # Granite; router.gate: HY-V3, AFMoE; experts.e_score_correction_bias: Laguna).
    stacked_pattern: ClassVar[re.Pattern] = re.compile(
        r"^.*\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe|feed_forward|mixer)\."
        r"(?:experts\.(?:gate_up_proj|up_proj|down_proj)(?:_bias)?|(?:input|output)_linear\.weight|experts\.fc[12]\.weight)$"
    )
    router_pattern: ClassVar[re.Pattern] = re.compile(
        r"^.*\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe|feed_forward|mixer)\."
        r"(?:(?:gate|router)\.(?:wg\.|layer\.|gate\.)?(?:weight|bias)"
        r"|(?:gate\.|moe_statics\.|gate\.moe_statics\.|experts\.)?(?:e_score_correction_bias|expert_bias))$"
    )

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("model_types", ())  # not the parent's: a subclass claims its own
        for model_type in declared:
            if model_type in ADAPTERS:
                raise TypeError(f"{cls.__name__} and {ADAPTERS[model_type].__name__} both claim {model_type!r}")
        ADAPTERS.update(dict.fromkeys(declared, cls))

    def __init__(self, config):
        self.config = config
        # Multimodal checkpoints: the key of config.json holding this (language) model's config.
        self.config_section: str | None = None

    # --- structure -----------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        for key in self.expert_count_keys:
            if getattr(self.config, key, None) is not None:
                return getattr(self.config, key)
        raise AttributeError(f"none of {self.expert_count_keys} in the config")

    @property
    def top_k(self) -> int:
        return self.config.num_experts_per_tok

    @property
    def routing(self) -> RoutingSpec:
        """A softmax over all experts, top-k, the k weights divided by their sum (Mixtral's rule)."""
        return RoutingSpec(top_k=self.top_k)

    @property
    def routing_groups(self) -> int:
        """Contiguous expert groups that must each keep the same share (group-limited routing), else 1."""
        spec = self.routing
        return spec.group_limit.groups if spec.grouped else 1

    def text_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack: `model.model`, or a vision-language model's `model.model.language_model`."""
        inner = model.model
        return getattr(inner, "language_model", inner)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.text_model(model).layers

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        """The layer's MoE block, or None for a dense layer (no `experts`)."""
        block = getattr(layer, self.block_attr, None)
        return block if hasattr(block, "experts") else None

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the model does after its last decoder layer."""
        return model.lm_head(self.text_model(model).norm(hidden))

    def final_log_probs(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities (float32) from hidden states after the last decoder layer: what
        the end-to-end divergences compare."""
        return torch.log_softmax(self.final_logits(model, hidden).float(), dim=-1)

    def moe_layers(self, model: nn.Module) -> list[int]:
        return [i for i, layer in enumerate(self.decoder_layers(model)) if self.moe_block(layer) is not None]

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_attr)

    def router_weight(self, block: nn.Module) -> torch.Tensor:
        return self.router(block).weight

    def router_logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        router = self.router(block)
        weight, bias = router.weight, getattr(router, "bias", None)
        if self.router_in_float32:
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return F.linear(x, weight, bias)

    def route(
        self, block: nn.Module, x: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert indices) per row of x, as the block (pruned to `keep`) routes them."""
        return route(self.router_logits(block, x), self.routing, keep, self.selection_bias(block))

    def selection_bias(self, block: nn.Module) -> torch.Tensor | None:
        """Added to the scores to choose experts, not to weight them (DeepSeek-V3)."""
        return None

    def expert_forward(self, block: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
        """One expert on rows x, honouring the experts module's layout flags (transposed weights,
        biases, custom gating such as GPT-OSS's clamped, interleaved SwiGLU)."""
        experts = block.experts
        out = F.linear(self.expert_hidden(block, x, expert), self.down_projection(block, expert))
        if experts.has_bias:
            out = out + experts.down_proj_bias[expert]
        return out

    def expert_hidden(self, block: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
        """One expert's activations on rows x, before its down projection (rows x intermediate)."""
        experts = block.experts
        gated = getattr(experts, "has_gate", True)
        up = (experts.gate_up_proj if gated else experts.up_proj)[expert]
        h = x @ up if experts.is_transposed else F.linear(x, up)
        if experts.has_bias:
            h = h + (experts.gate_up_proj_bias if gated else experts.up_proj_bias)[expert]
        return experts._apply_gate(h) if gated else experts.act_fn(h)

    def down_projection(self, block: nn.Module, expert: int) -> torch.Tensor:
        """One expert's down projection as a hidden x intermediate view of the parameter (writing into it
        changes the model), whichever way the experts module stores it."""
        down = block.experts.down_proj[expert]
        return down.T if block.experts.is_transposed else down

    @property
    def refittable(self) -> bool:
        """Whether expert outputs are the down projection of `expert_hidden` (families that compute
        experts their own way override `expert_forward`; re-fitting is refused for them)."""
        return type(self).expert_forward is MoEAdapter.expert_forward

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Experts every token uses (never pruned), added ungated; None where the block has none."""
        shared = getattr(block, "shared_experts", None)
        return None if shared is None else shared(x)

    # --- exact routed forward --------------------------------------------------------------------
    def routed_forward(
        self,
        block: nn.Module,
        hidden: torch.Tensor,
        keep: torch.Tensor | None,
        skip: tuple[float, str] | None = None,
        tally: list[int] | None = None,
    ) -> torch.Tensor:
        """The block's output with only `keep` experts present (what the pruned checkpoint computes), and
        with skip = (beta, rule) the skipped pairs' weights zeroed and the rest renormalised as the model does.
        The reference for both pruning and skipping: every routed pair is computed.
        tally: with skip, [pairs kept, pairs routed] is added to, as the skipping runtime counts them."""
        x = hidden.reshape(-1, hidden.shape[-1])
        weights, indices = self.route(block, x, keep)
        if skip is not None:
            survivors = skip_keep_mask(weights, *skip)
            weights = skipped_weights(weights, survivors, self.routing.renormalizes)
            if tally is not None:
                tally[0] += int(survivors.sum())
                tally[1] += survivors.numel()
        out = torch.zeros_like(x)
        for expert in indices.unique().tolist():
            token, slot = torch.nonzero(indices == expert, as_tuple=True)
            contribution = self.expert_forward(block, x[token], expert) * weights[token, slot, None]
            out.index_add_(0, token, contribution.to(out.dtype))
        shared = self.shared_output(block, x)
        if shared is not None:
            out = out + shared
        out = out.reshape(hidden.shape)
        return (out, None) if self.block_returns_tuple else out

    @contextmanager
    def pruned_view(
        self,
        model: nn.Module,
        kept: dict[int, list[int]],
        skip: dict[int, tuple[float, str]] | None = None,
        tallies: dict[int, list[int]] | None = None,
    ):
        """Temporarily route each listed layer as if only its kept experts existed (and, for layers in
        `skip`, with dynamic skipping applied), through the reference `routed_forward`. tallies: filled
        with [pairs kept, pairs routed] per skipping layer, for its skip fraction."""
        layers = self.decoder_layers(model)
        skip = skip or {}
        tallies = {} if tallies is None else tallies
        originals = []
        try:
            for index in sorted(set(kept) | set(skip)):
                block = self.moe_block(layers[index])
                keep = torch.zeros(self.num_experts, dtype=torch.bool)
                keep[kept.get(index, list(range(self.num_experts)))] = True
                originals.append((block, block.forward))
                tally = tallies.setdefault(index, [0, 0]) if index in skip else None
                block.forward = self._masked_forward(block, keep, skip.get(index), tally)
            yield model
        finally:
            for block, forward in reversed(originals):
                block.forward = forward

    def _masked_forward(self, block, keep, skip, tally):
        def forward(hidden_states, *args, **kwargs):
            return self.routed_forward(block, hidden_states, keep.to(hidden_states.device), skip, tally)

        return forward

    # --- checkpoint --------------------------------------------------------------------------------
    def tensor_rule(self, name: str) -> TensorRule | None:
        if m := self.per_expert_pattern.match(name):
            return TensorRule("expert", int(m["layer"]), int(m["expert"]), head=m["head"], tail=m["tail"])
        if m := self.stacked_pattern.match(name):
            return TensorRule("stacked", int(m["layer"]))
        if m := self.router_pattern.match(name):
            return TensorRule("router", int(m["layer"]))
        return None

    # One expert's projections on disk: Mixtral's per-expert w1/w3/w2, the others' gate/up/down_proj
    # (transformers 5.x fuses them as gate_up_proj = [gate; up] and down_proj, as in memory).
    gate_projection_tails: ClassVar[tuple[str, ...]] = (".w1.weight", ".gate_proj.weight")
    up_projection_tails: ClassVar[tuple[str, ...]] = (".w3.weight", ".up_proj.weight")
    down_projection_tails: ClassVar[tuple[str, ...]] = (".w2.weight", ".down_proj.weight")

    def expert_tensors(self, block: nn.Module) -> dict[str, nn.Parameter]:
        """The experts module's parameters stacked by expert along their first axis (gate_up_proj or
        up_proj, down_proj, and their biases where the family has them), by name."""
        return {
            name: p
            for name, p in block.experts.named_parameters(recurse=False)
            if p.dim() >= 2 and p.shape[0] == self.num_experts
        }

    def recovered_tensor(
        self, block: nn.Module, name: str, rule: TensorRule, whole_experts: bool = False
    ) -> torch.Tensor | None:
        """The block's current value of checkpoint tensor `name`, in the checkpoint's layout and original
        expert numbering, where it is one that recovery changes (router weight and bias, down
        projections; with whole_experts, as merging changes them, every expert tensor); None for every
        other tensor, which is copied from the source."""
        if rule.kind == "router":
            bias = getattr(self.router(block), "bias", None)
            if name.endswith(".weight"):
                return self.router_weight(block)
            if name.endswith(".bias") and isinstance(bias, nn.Parameter):
                return bias
        elif rule.kind == "stacked":
            memory_name = name
            for old, new in self.checkpoint_renames:
                memory_name = memory_name.replace(old, new)
            tensor = memory_name.rsplit(".experts.", 1)[-1]
            if tensor == "down_proj" or (whole_experts and ".experts." in memory_name):
                return self.expert_tensors(block).get(tensor)
        elif rule.kind == "expert" and rule.tail in self.down_projection_tails:
            return self.down_projection(block, rule.expert)
        elif rule.kind == "expert" and whole_experts:
            return self._gate_or_up(block, rule)
        return None

    def _gate_or_up(self, block: nn.Module, rule: TensorRule) -> torch.Tensor | None:
        """A per-expert gate or up projection on disk (intermediate x hidden): its half of gate_up_proj."""
        fused = block.experts.gate_up_proj[rule.expert]
        fused = fused.T if block.experts.is_transposed else fused
        half = fused.shape[0] // 2
        if rule.tail in self.gate_projection_tails:
            return fused[:half]
        if rule.tail in self.up_projection_tails:
            return fused[half:]
        return None

    def pruned_config(self, config: dict, keep: int) -> list[str]:
        """Rewrite the expert count in a config.json dict; returns 'key: old -> new' lines. Besides the
        family's keys, any usual count key that holds this count is rewritten too: which of a config's
        aliased names save_pretrained writes differs between families and versions."""
        changes = []
        usual = [key for key in COUNT_KEYS if config.get(key) == self.num_experts]
        for key in dict.fromkeys((*self.expert_count_keys, *usual)):
            if key in config or key in self.always_written_keys:
                changes.append(f"{key}: {config.get(key, self.num_experts)} -> {keep}")
                config[key] = keep
        return changes

    def router_fingerprint(
        self, model: nn.Module, kept: dict[int, list[int]] | None = None, weights: dict | None = None
    ) -> tuple[str, str, list[list[float]]]:
        """What recognises a model by its routers: (sha256 of the router weights in float32, their dtype as
        loaded, and per MoE layer the sum of the router rows' norms and that sum weighted by expert id),
        of `model` or of the model `kept` would export. The norms tell the same model loaded in another
        precision (they agree to rounding) from another model (the hash alone cannot: rounding changes
        it). `weights` supplies the routers per MoE layer where the model's own are not in memory."""
        digest, dtypes, norms = hashlib.sha256(), set(), []
        for index in self.moe_layers(model):
            weight = (
                weights[index] if weights else self.router_weight(self.moe_block(self.decoder_layers(model)[index]))
            )
            dtypes.add(str(weight.dtype).removeprefix("torch."))
            weight = weight.detach().float().cpu()
            if kept and index in kept:
                weight = weight[kept[index]]
            digest.update(weight.contiguous().numpy().tobytes())
            rows = weight.double().norm(dim=-1).reshape(-1)
            ids = torch.arange(1, len(rows) + 1, dtype=torch.float64)
            norms.append([rows.sum().item(), (rows * ids).sum().item()])
        return digest.hexdigest(), "/".join(sorted(dtypes)), norms
