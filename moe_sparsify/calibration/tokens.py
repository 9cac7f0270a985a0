"""Turn text sources into N x L calibration token windows, seeded, with a manifest."""

from __future__ import annotations

import hashlib

import torch

from ..errors import UsageError
from .presets import PRESETS, is_preset
from .sources import SourceSpec, load_documents


def tokens_sha256(token_ids: torch.Tensor) -> str:
    return hashlib.sha256(token_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _split_counts(total: int, weights: list[float]) -> list[int]:
    """Largest-remainder rounding, so the counts always add up to `total`."""
    shares = [total * w / sum(weights) for w in weights]
    counts = [int(s) for s in shares]
    for i in sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def token_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """Documents tokenised and joined with the end-of-text token between them."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in documents:
        if doc.strip():
            ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
            if eos is not None:
                ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(
    tokenizer, sources: list[SourceSpec], samples: int, seq_len: int, seed: int
) -> tuple[torch.Tensor, dict]:
    """Non-overlapping windows drawn without replacement from each source."""
    gen = torch.Generator().manual_seed(seed)
    chunks, described = [], []
    for spec, count in zip(sources, _split_counts(samples, [s.weight for s in sources])):
        documents = load_documents(spec.source)
        stream = token_stream(tokenizer, documents)
        available = len(stream) // seq_len
        if count > available:
            raise UsageError(
                f"calibration source {spec.source!r} holds {len(stream)} tokens, enough for {available} windows of "
                f"{seq_len}, but {count} were asked for; lower --samples or --seq-len, or add text"
            )
        starts = torch.randperm(available, generator=gen)[:count].sort().values * seq_len
        chunks.append(torch.stack([stream[s : s + seq_len] for s in starts.tolist()]) if count else None)
        entry = {
            "source": spec.source,
            "weight": spec.weight,
            "samples": count,
            "source_tokens": len(stream),
            "text_sha256": hashlib.sha256("\x00".join(documents).encode()).hexdigest(),
        }
        if is_preset(spec.source):  # what the name stood for when this ran
            entry["preset"] = PRESETS[spec.source].describe()
        described.append(entry)
    token_ids = torch.cat([c for c in chunks if c is not None])
    manifest = {
        "sources": described,
        "samples": samples,
        "seq_len": seq_len,
        "seed": seed,
        "tokens": samples * seq_len,
        "token_ids_sha256": tokens_sha256(token_ids),
    }
    return token_ids, manifest
