"""Build the bundled offline lm-eval task `pydoc_cloze` from the held-out split of the bundled corpus.

    python scripts/make_pydoc_cloze.py      # rewrites moe_sparsify/assets/tasks/pydoc_cloze.jsonl

Each item is a sentence from the held-out split (which neither the bundled
model's training nor calibration saw) with its last word removed; the choices
are that word and three distractors drawn, seeded, from words of the split
with a similar frequency. Zero-shot multiple choice scored by log-likelihood,
like LAMBADA or HellaSwag.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_sparsify.corpus import bundled_text  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "moe_sparsify" / "assets" / "tasks" / "pydoc_cloze.jsonl"
WORD = re.compile(r"^[a-z]{3,}$")


def main(items: int = 400, seed: int = 0) -> None:
    text = bundled_text("heldout")
    sentences = [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text)]
    counts = Counter(w for s in sentences for w in re.findall(r"[a-z]+", s.lower()))
    by_rank = [w for w, _ in counts.most_common() if WORD.match(w)]
    rank = {w: i for i, w in enumerate(by_rank)}
    rng = random.Random(seed)
    rows = []
    for sentence in sentences:
        words = sentence.rstrip(".!?").split(" ")
        last = words[-1]
        if len(words) < 8 or not WORD.match(last) or last not in rank:
            continue
        near = [w for w in by_rank[max(0, rank[last] - 40) : rank[last] + 40] if w != last]
        if len(near) < 3:
            continue
        choices = rng.sample(near, 3) + [last]
        rng.shuffle(choices)
        rows.append(
            {"context": " ".join(words[:-1]), "choices": [" " + c for c in choices], "label": choices.index(last)}
        )
    rng.shuffle(rows)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows[:items]))
    print(f"wrote {min(items, len(rows))} items to {OUT}")


if __name__ == "__main__":
    main()
