"""`python -m engine needle`: hide passphrases at several depths of a long real text and ask for each.

All needles go into one document; the questions are asked one after another in the same session, so
the document's KV is computed once and reused (only the question is prefilled per needle).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from engine.api import Finished, SamplingParams

HAYSTACK = Path(__file__).resolve().parent.parent / "resources" / "text" / "gpl-3.0.txt"
WORDS = [
    "amber",
    "falcon",
    "granite",
    "willow",
    "cobalt",
    "meadow",
    "lantern",
    "harbor",
    "saffron",
    "thistle",
    "quartz",
    "juniper",
    "copper",
    "violet",
    "glacier",
    "orchid",
    "ember",
    "tundra",
    "marble",
    "pepper",
]


@dataclass
class Needle:
    vault: int
    passphrase: str
    depth: float  # fraction of the document before the needle


def make_needles(count: int, seed: int) -> list[Needle]:
    rng = random.Random(seed)
    needles = []
    for i in range(count):
        phrase = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}-{rng.randint(100, 999)}"
        needles.append(Needle(vault=i + 1, passphrase=phrase, depth=(i + 0.5) / count))
    return needles


def needle_sentence(needle: Needle) -> str:
    return (
        f"The secret passphrase for vault {needle.vault} is {needle.passphrase}. "
        f"Remember it: vault {needle.vault}, passphrase {needle.passphrase}."
    )


def build_document(tokenizer, needles: list[Needle], budget_tokens: int) -> str:
    """The haystack cut so that it and the needle sentences take about budget_tokens tokens."""
    budget_tokens -= sum(len(tokenizer.encode(needle_sentence(n))) + 2 for n in needles)
    text = HAYSTACK.read_text(encoding="utf-8")
    while len(tokenizer.encode(text)) < budget_tokens:
        text += "\n\n" + HAYSTACK.read_text(encoding="utf-8")
    kept, used = [], 0
    for para in text.split("\n\n"):
        n = len(tokenizer.encode(para)) + 2
        if used + n > budget_tokens:
            break
        kept.append(para)
        used += n
    for needle in sorted(needles, key=lambda x: -x.depth):  # insert from the back so indices stay valid
        kept.insert(max(1, round(needle.depth * len(kept))), needle_sentence(needle))
    return "\n\n".join(kept)


def run_needle(session, count: int = 10, seed: int = 0, answer_tokens: int = 24) -> dict:
    """Returns {"recall", "found", "total", "trials": [...]} for one session."""
    needles = make_needles(count, seed)
    question_room = 120 + answer_tokens
    document = build_document(session.tokenizer, needles, session.max_len - question_room - 64)
    trials = []
    for needle in needles:
        question = (
            f"{document}\n\nQuestion: what is the secret passphrase for vault {needle.vault}? "
            "Answer with the passphrase only."
        )
        final = None
        for event in session.chat(
            [{"role": "user", "content": question}], SamplingParams(max_tokens=answer_tokens)
        ):
            if isinstance(event, Finished):
                final = event
        found = needle.passphrase in final.text
        trials.append(
            {
                "vault": needle.vault,
                "depth": needle.depth,
                "passphrase": needle.passphrase,
                "answer": final.text.strip(),
                "found": found,
                "prompt_tokens": final.stats.prompt_tokens,
                "cached_tokens": final.stats.cached_tokens,
            }
        )
    found = sum(t["found"] for t in trials)
    return {"recall": found / len(trials), "found": found, "total": len(trials), "trials": trials}
