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


# --- the chat form, shared by SFT data, reward suites and evaluation -------------------------------
# One definition: evaluation scores a model on the questions it was trained to answer, so the
# SFT data and the reward suite must ask them identically (issue 10).

def question(fact: Fact) -> str:
    """"What is 7+5?": how every chat stage and the reward suite ask a fact."""
    return f"What is {expression(fact)}?"


def reasoning(fact: Fact) -> str:
    # The sentence form of the pretraining `builtin:math` source, so the base model has seen it.
    a, op, b = fact
    return f"The {'sum' if op == '+' else 'product'} of {a} and {b} is {answer(fact)}."


def reply(fact: Fact, think: bool) -> str:
    """The assistant's answer: "12", or a think block with the reasoning sentence first."""
    return f"<think>\n{reasoning(fact)}\n</think>\n{answer(fact)}" if think else str(answer(fact))


def split_of(split: str, seed: int = 0) -> list[Fact]:
    if split not in ("train", "test"):
        raise ValueError(f"the arithmetic facts have splits 'train' and 'test', not {split!r}")
    train, test = split_facts(seed)
    return train if split == "train" else test


def conversations(split: str = "train", seed: int = 0) -> list[dict]:
    """Chat rows: every fact of the split once per reasoning mode (one turn), plus as many two-turn
    conversations (random pairs, alternating modes), in a fixed shuffled order.

    `split: train` uses only the training facts of `split_facts()`; `test` holds the 40 held-out
    facts, for evaluation only."""
    facts = split_of(split)
    rng = random.Random(seed)
    rows = []
    for think in (True, False):
        for fact in facts:
            rows.append({"messages": [{"role": "user", "content": question(fact)},
                                      {"role": "assistant", "content": reply(fact, think)}]})
    for i in range(len(facts)):
        first, second = rng.choice(facts), rng.choice(facts)
        think = i % 2 == 0
        rows.append({"messages": [{"role": "user", "content": question(first)},
                                  {"role": "assistant", "content": reply(first, think)},
                                  {"role": "user", "content": question(second)},
                                  {"role": "assistant", "content": reply(second, think)}]})
    rng.shuffle(rows)
    return rows
