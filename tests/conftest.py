"""Tiny models for the tests: random Mixtrals built from configs, and the bundled trained one."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# torch, transformers and the package are imported where used, not here: under `pytest -n 2` the
# controlling process loads this file too, and importing them (~4 CPU-s) there delays every worker's start.
if TYPE_CHECKING:
    import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on two cores: one thread per worker, and per CLI process it starts. Two workers of
    # two OpenMP threads each, spinning on oversubscribed cores, ran some tests 30x slower than alone.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(autouse=True, scope="session")
def texts_tokenised_once_per_worker():
    """`token_stream` memoised for the session: it is a pure function of the tokenizer (its serialised
    form, end-of-text id included) and the documents, and ~170 CLI runs of the suite tokenise the whole
    bundled calibration split again (0.1 CPU-s each, a tenth of the suite's CPU time) to draw a few
    windows from it. The first call for each tokenizer and text still tokenises; a stream is returned
    as a fresh tensor, so no caller can change another's."""
    import hashlib

    from moe_sparsify import commands
    from moe_sparsify.calibration import tokens

    tokenise = tokens.token_stream
    streams = {}

    def memoised(tokenizer, documents):
        key = hashlib.sha256(f"{tokenizer.eos_token_id}\0{tokenizer.backend_tokenizer.to_str()}".encode())
        for document in documents:
            key.update(document.encode() + b"\0\1")
        digest = key.hexdigest()
        if digest not in streams:
            streams[digest] = tokenise(tokenizer, documents)
        return streams[digest].clone()

    with pytest.MonkeyPatch.context() as patch:
        for module in (tokens, commands):
            patch.setattr(module, "token_stream", memoised)
        yield


@pytest.fixture(autouse=True, scope="session")
def click_command_built_once_per_worker():
    """typer's CliRunner rebuilds the click command from the app's signatures on every invoke (~14 ms of
    typing.get_type_hints; ~500 invokes in the suite). A process builds it once; so does a test worker.
    The command is a pure function of the app, which no test changes."""
    from typer import testing

    built = {}
    build = testing._get_command

    def built_once(app):
        if id(app) not in built:
            built[id(app)] = (app, build(app))  # the app is kept alive, so its id stays its own
        return built[id(app)][1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(testing, "_get_command", built_once)
        yield


def random_mixtral(num_experts: int = 8, top_k: int = 2, layers: int = 2, hidden: int = 32, seed: int = 0):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=2048,  # the bundled tokenizer's, so the CLI can run on these models
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        sliding_window=None,
        initializer_range=0.2,  # spread router logits so routing differs between tokens
    )
    return MixtralForCausalLM(config).eval()


def save_with_tokenizer(model, directory: Path) -> Path:
    from moe_sparsify.models import bundled_model_dir

    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(bundled_model_dir("tiny") / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 8-expert, top-2 random Mixtral saved as the hub does (per-expert tensors)."""
    return save_with_tokenizer(random_mixtral(), tmp_path_factory.mktemp("random") / "model")


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from moe_sparsify.models import bundled_model_dir

    return bundled_model_dir("tiny")


@pytest.fixture
def token_ids() -> torch.Tensor:
    import torch

    return torch.randint(0, 2048, (4, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def heldout_slice(tmp_path_factory) -> Path:
    """The first 4,000 characters of the bundled held-out split: ~1,300 tokens."""
    from moe_sparsify.corpus import bundled_text

    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text(bundled_text("heldout")[:4_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def text(heldout_slice):
    """`--text` for CLI `eval` runs: enough tokens to compare perplexities (the bundled model pruned to 6
    experts scores ~70 against ~40), a fraction of the time of the whole split."""
    return ["--text", heldout_slice]


@pytest.fixture(scope="session")
def small_calibration(heldout_slice):
    """`--calibration` for runs whose few windows (8 x 32) need no more text: the bundled calibration
    split is tokenised whole on every run, for any number of windows."""
    return ["--calibration", heldout_slice]


@pytest.fixture
def lm_eval_own_tasks_cut_to_hellaswag(monkeypatch):
    """lm-eval's own task directory indexed as its `hellaswag` folder alone: the whole of it is ~15,000
    files (~8 CPU-s), for tests about what the project does with the index, not about building it.
    lm-eval's own TaskIndex.build still reads that folder; the bundled and --task-dir tasks are read whole."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[eval]')")
    from lm_eval.tasks import manager

    own = Path(manager.__file__).parent
    build = manager.TaskIndex.build

    def build_with_own_cut(paths, **options):
        return build([own / "hellaswag" if Path(root) == own else root for root in paths], **options)

    monkeypatch.setattr(manager.TaskIndex, "build", staticmethod(build_with_own_cut))


def settings_error(tmp_path: Path, yaml_text: str) -> str:
    """The message of the UsageError that settings validation gives for a run file holding `yaml_text`."""
    from moe_sparsify.config import resolve_settings
    from moe_sparsify.errors import UsageError

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(UsageError) as err:
        resolve_settings(cfg, {})
    return str(err.value)


def assert_brute_force_e2e(plan, model, adapter, keep: int, log_probs) -> None:
    """The e2e plan equals a brute-force search: layer by layer, with the earlier layers as decided,
    every subset by a masked forward, keeping the one whose `log_probs(layer)` is closest in KL to
    the unpruned model's (same kept experts, divergence within rounding)."""
    import torch

    decided = {}
    with torch.no_grad():
        for layer in range(len(plan.layers)):
            reference = log_probs(layer)
            best = None
            for subset in itertools.combinations(range(adapter.num_experts), keep):
                with adapter.pruned_view(model, {**decided, layer: list(subset)}):
                    got = log_probs(layer)
                kl = (reference.exp() * (reference - got)).sum(-1).mean().item()
                if best is None or kl < best[0] - 1e-12:
                    best = (kl, list(subset))
            decided[layer] = best[1]
            assert plan.layers[layer].kept == best[1]
            assert plan.layers[layer].divergence == pytest.approx(best[0], rel=1e-4, abs=1e-9)


def _in_child(logs: Path, target, args) -> None:
    """The forked child: stdout and stderr to files at the descriptor level, then `target(*args)`."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        log = os.open(logs / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, fd)
        os.close(log)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    target(*args)


class Forked:
    """`target(*args)` in a process of its own, forked from this one instead of started afresh: its PID,
    locks, signal handlers and file descriptors are a real process's, without a new interpreter importing
    torch and transformers (~5 CPU-s, more than the tiny runs the tests start). Its exit code is the one
    `target` exits with; its output goes to `logs`. The subset of subprocess.Popen the tests use."""

    def __init__(self, logs: Path, target, *args):
        self.logs = logs
        self._process = multiprocessing.get_context("fork").Process(target=_in_child, args=(logs, target, args))
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int | None:
        self._process.join(timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return tuple((self.logs / name).read_text() for name in ("stdout", "stderr"))
