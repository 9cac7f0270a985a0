"""Train the bundled test-bed MoE: a ~2 M parameter Mixtral on Python's own docs.

    python scripts/train_tiny_moe.py                       # the committed model (~12 min, 2 CPU cores)
    python scripts/train_tiny_moe.py --steps 20 --out /tmp/t  # smoke run
    # another test bed (other size, other text), e.g. to check a method was not tuned to the bundled one:
    python scripts/train_tiny_moe.py --documents docstrings --hidden 96 --intermediate 192 --layers 3 \
        --steps 600 --out /tmp/other --corpus-out /tmp/other-corpus
    # any local text file (cut into ~2,000-character documents), on a GPU:
    python scripts/train_tiny_moe.py --text plays.txt --hidden 160 --intermediate 320 --device cuda \
        --out /tmp/plays --corpus-out /tmp/plays-corpus

Writes, in `save_pretrained` layout, `moe_sparsify/assets/tiny/` (config, fp32
safetensors, tokenizer, generation config) and the frozen calib/heldout text
splits `moe_sparsify/assets/corpus/{calib,heldout}.txt.gz`. Seeded: the same
Python and torch reproduce it.

Why a load-balancing loss of our own: transformers' `load_balancing_loss_func`
concatenates the router logits of all layers before balancing, so one layer
can keep dead experts while another over-uses them; on such a model frequency
pruning is trivially good. Balancing each layer separately, weakly, keeps every
expert alive while leaving routing frequencies non-uniform, which is the case
where choosing experts is hard.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_sparsify.corpus import SPLITS, build_documents, split_text  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "moe_sparsify" / "assets"
EOS = "<|endoftext|>"


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text[i : i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)


def text_documents(path: Path, size: int = 2000) -> list[tuple[str, str]]:
    """A plain text file as documents of about `size` characters, cut at blank lines, so the
    calib / heldout / train split (by document name) keeps whole passages apart."""
    # A blank line may hold spaces (WikiText's do).
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8")) if p.strip()]
    documents, current = [], []
    for paragraph in paragraphs:
        current.append(paragraph)
        if sum(len(p) for p in current) >= size:
            documents.append((f"{path.stem}:{len(documents)}", "\n\n".join(current)))
            current = []
    if current:
        documents.append((f"{path.stem}:{len(documents)}", "\n\n".join(current)))
    return documents


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-transformer balance loss computed for each layer on its own, then averaged."""
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        n = probs.shape[-1]
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, n).sum(1).float()
        losses.append(n * (chosen.mean(0) / top_k * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--balance-coef", type=float, default=0.01)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu (the committed model) or cuda (other test beds, faster)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument(
        "--documents",
        choices=("all", "topics", "docstrings"),
        default="all",
        help="train (and split calib/heldout) on pydoc topics, stdlib docstrings, or both",
    )
    ap.add_argument("--text", type=Path, help="train on this local text file instead of Python's documentation")
    ap.add_argument("--out", type=Path, default=ASSETS / "tiny")
    ap.add_argument("--corpus-out", type=Path, default=ASSETS / "corpus")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(2)

    documents = text_documents(args.text) if args.text else build_documents()
    if args.documents != "all" and not args.text:
        documents = [
            (name, text) for name, text in documents if name.startswith("topic:") == (args.documents == "topics")
        ]
    texts = {split: split_text(documents, split) for split in SPLITS}
    print({k: len(v) for k, v in texts.items()}, "characters per split", file=sys.stderr)

    tokenizer = train_tokenizer(texts["train"], args.vocab)
    ids = tokenizer(texts["train"].replace("\n\n", f"\n\n{EOS}"))["input_ids"]
    data = torch.tensor(ids, dtype=torch.long)
    print(f"{len(data)} training tokens", file=sys.stderr)

    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        router_aux_loss_coef=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        sliding_window=None,
    )
    model = MixtralForCausalLM(config)
    device = torch.device(args.device)
    if device.type == "cuda":
        # The eager expert loop trains in float32 everywhere; the fused kernels may not.
        model.set_experts_implementation("eager")
    model.to(device)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", file=sys.stderr)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    start = time.time()
    for step in range(args.steps):
        offsets = torch.randint(0, len(data) - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[o : o + args.seq_len] for o in offsets.tolist()]).to(device)
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        balance = per_layer_balance_loss(out.router_logits, config.num_experts_per_tok)
        loss = out.loss + args.balance_coef * balance
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(
                f"step {step} lm {out.loss.item():.3f} balance {balance.item():.3f} "
                f"{(time.time() - start) / (step + 1):.2f} s/step",
                file=sys.stderr,
                flush=True,
            )

    model.eval().to("cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "training.json").write_text(
        json.dumps({k: v for k, v in vars(args).items() if k not in ("out", "corpus_out")}, indent=2, default=str)
        + "\n"
    )
    args.corpus_out.mkdir(parents=True, exist_ok=True)
    for split in ("calib", "heldout"):
        # mtime=0 keeps the gzip bytes reproducible.
        (args.corpus_out / f"{split}.txt.gz").write_bytes(gzip.compress(texts[split].encode(), mtime=0))
    print(f"saved to {args.out} in {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
