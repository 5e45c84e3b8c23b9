"""The arithmetic task family every tiny recipe shares: single-digit `a+b` and `a*b` facts.

Pretraining text, SFT conversations and the built-in reward suite are all drawn from these 200
facts, so each stage of the tiny pipeline measures what the previous one taught. Chosen because a
0.8M-parameter model really learns them (100% exact after 400 steps on these CPUs), while 2-digit
addition in normal digit order stays near 0% at that budget (shared/FACTS.md).
"""

import random

Fact = tuple[int, str, int]
FACTS: list[Fact] = [(a, op, b) for op in "+*" for a in range(10) for b in range(10)]


def answer(fact: Fact) -> int:
    a, op, b = fact
    return a + b if op == "+" else a * b


def expression(fact: Fact) -> str:
    """"7+5" / "7*5", the way every stage writes a fact."""
    a, op, b = fact
    return f"{a}{op}{b}"


def split_facts(seed: int = 0, test_size: int = 40) -> tuple[list[Fact], list[Fact]]:
    """(train, test): a fixed shuffle of the 200 facts, the last `test_size` held out for evaluation."""
    facts = list(FACTS)
    random.Random(seed).shuffle(facts)
    return facts[:-test_size], facts[-test_size:]


def sample_fact(rng: random.Random) -> Fact:
    return rng.choice(FACTS)
