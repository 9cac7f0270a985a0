"""The names a setting or a document may take, in one place that settings, documents and the
algorithm modules all import (so validating a setting loads no algorithm)."""

STRATEGIES = ("exhaustive", "greedy", "e2e", "e2e-fast", "reap", "frequency", "random")  # search.py registers each
MODES = ("layerwise", "progressive", "compensating")
RECOVERY_METHODS = ("merge", "router", "refit")  # prune --recover, in the order they are applied
MERGE_BY = ("output", "router")  # --recover merge: join each removed expert to the kept one closest by this
DEFAULT_MERGE_BY = "output"
DEFAULT_RECOVER_HOLDOUT = 0.125  # share of calibration sequences held back to judge each recovery change
DEVICES = ("auto", "cpu", "cuda")  # or cuda:N
DTYPES = ("float32", "bfloat16", "float16")
DIVERGENCES = ("kl", "reverse_kl", "js")  # e2e: KL(original || pruned), KL(pruned || original), Jensen-Shannon
SKIP_RULES = ("ratio", "tail")  # ratio: top-2 (the paper); tail: top-k
DEFAULT_SKIP_QUANTILE = 0.5  # skip-profile's beta: the paper's median (about half the tokens drop one expert)
DEFAULT_MAX_SUBSETS = 100_000  # exhaustive search refuses above this many subsets per layer
# The end-to-end strategies and their defaults: subsets re-scored per layer, calibration sequences the
# divergence is measured on, later layers run before reading it (None: all, to the logits), the racing
# margin in standard errors (None: every subset on every sequence), the first MoE layers read at the
# logits whatever the horizon (None: none). e2e-fast's were chosen by measurement (README, "e2e at a
# fraction of its cost").
E2E_DEFAULTS = {
    "e2e": {"e2e_shortlist": 16, "e2e_samples": 64, "e2e_horizon": None, "e2e_race_z": None, "e2e_logits_layers": None},
    "e2e-fast": {
        "e2e_shortlist": 16,
        "e2e_samples": 64,
        "e2e_horizon": 1,
        "e2e_race_z": 2.0,
        "e2e_logits_layers": 1,
    },
}
STATISTICS = ("quantile", "target_skip")  # how skip-profile picks each layer's beta
