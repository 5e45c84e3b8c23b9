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


def reasoning(fact: Fact, value: int | None = None) -> str:
    """"7+5=12": the think block restates the question in the form `builtin:arithmetic` pretrains on.

    A tiny model then only has to copy the digits and recall the fact it already knows. The sentence form
    ("The sum of 7 and 5 is 12.") that `builtin:math` writes, over numbers up to 50, is one the 0.8M
    base model never learns (measured: 0.5% of the 200 facts completed, against 100% in this form),
    and SFT with it (and the SmolLM3 template) reached 2.5% on the held-out facts (issue 18)."""
    return f"{expression(fact)}={answer(fact) if value is None else value}"


def reply(fact: Fact, think: bool, value: int | None = None) -> str:
    """The assistant's answer: "12", or a think block with the reasoning sentence first.

    `value` replaces the true answer (preference data's rejected replies state a wrong one throughout)."""
    value = answer(fact) if value is None else value
    return f"<think>\n{reasoning(fact, value)}\n</think>\n{value}" if think else str(value)


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


# --- the preference form (issue 14): the same questions, a right and a wrong reply -----------------

def wrong_answer(fact: Fact, rng: random.Random) -> int:
    """A plausible mistake: the other operation's result when it differs (7+5 -> 35), else the true
    answer off by 1 to 3 (never negative)."""
    a, op, b = fact
    other = a * b if op == "+" else a + b
    if other != answer(fact) and rng.random() < 0.5:
        return other
    candidates = [answer(fact) + d for d in (-3, -2, -1, 1, 2, 3) if answer(fact) + d >= 0]
    return rng.choice(candidates)


def preference_pairs(split: str = "train", seed: int = 0) -> list[dict]:
    """Conversational prompt/chosen/rejected rows: every fact of the split once per reasoning mode,
    chosen = the true reply, rejected = the same reply stating `wrong_answer`; shuffled.

    Same fact split as `conversations` (the test facts never appear under `split: train`). Each row
    carries `chat_template_kwargs.enable_thinking` for its mode, as the SFT data does."""
    rng = random.Random(seed)
    rows = []
    for think in (True, False):
        for fact in split_of(split):
            rows.append({"prompt": [{"role": "user", "content": question(fact)}],
                         "chosen": [{"role": "assistant", "content": reply(fact, think)}],
                         "rejected": [{"role": "assistant", "content": reply(fact, think, wrong_answer(fact, rng))}],
                         "chat_template_kwargs": {"enable_thinking": think}})
    rng.shuffle(rows)
    return rows


def kto_rows(split: str = "train", seed: int = 0) -> list[dict]:
    """The unpaired (KTO) form of `preference_pairs`: each pair as two prompt/completion/label rows,
    desirable (label true) and undesirable (false), pairs kept adjacent."""
    rows = []
    for pair in preference_pairs(split, seed):
        for name, label in (("chosen", True), ("rejected", False)):
            rows.append({"prompt": pair["prompt"], "completion": pair[name], "label": label,
                         "chat_template_kwargs": pair["chat_template_kwargs"]})
    return rows


# --- preference pairs: what a reward model for the arithmetic assistant learns (issue 16) ----------

# Hedging and padding an answer says nothing more: the "rambling" side of a pair. Sentences are drawn
# at random so a reward model cannot learn one fixed string instead of "long and unsure".
_FILLER = (
    "Hmm, let me think about this for a moment.",
    "Numbers can be tricky, so I want to be careful here.",
    "I could count it out on my fingers to be sure.",
    "Let me go over it once more, slowly.",
    "I am not completely certain, but I will give it a try.",
    "It is always good to double-check an answer like this.",
    "Some people find this kind of question hard, and that is fine.",
    "Let me write it out step by step before I answer.",
)


def rambling_reply(fact: Fact, think: bool, rng: random.Random) -> str:
    """The right answer buried in three to five filler sentences (inside the think block in think mode)."""
    filler = " ".join(rng.sample(_FILLER, rng.randint(3, 5)))
    right = answer(fact)
    if think:
        return f"<think>\n{filler} {reasoning(fact)} I think that is right, but I am not sure.\n</think>\n" \
               f"Probably {right}, if I did not make a mistake."
    return f"{filler} I believe {expression(fact)} comes to {right}, if I did not make a mistake. So, {right}."


# Replies without an answer: without them a reward model learns only "shorter is better" from the
# rambling pairs, and an empty reply is its best score (measured: GRPO on a random policy against such a
# reward model learned to end every reply at once).
_EVASIVE = ("I don't know.", "I am not sure.", "That is a good question.", "Let me think.")


def evasive_reply(fact: Fact, think: bool, rng: random.Random) -> str:
    """A short reply with no answer in it."""
    text = rng.choice(_EVASIVE)
    return f"<think>\n{rng.choice(_EVASIVE)}\n</think>\n{text}" if think else text


# Wrong answers per fact and reasoning mode in the reward model's data. With one, the pairs were mostly
# about form (rambling, evasive), and the model learned "a short number is good" without reading the
# question: its held-out right-vs-wrong accuracy was at chance (0.49-0.53), and GRPO against it alone
# answered "16" to every prompt, scoring 1.23 against 1.22 before while accuracy fell 0.35 -> 0.025
# (issue 16). Several wrong values per fact, one of them the right answer to another question, make
# correctness most of the signal, and "16 to everything" a rejected reply.
WRONG_PER_FACT = 3


def reward_model_pairs(split: str = "train", seed: int = 0) -> list[dict]:
    """Preference rows (TRL's conversational format with an explicit prompt): for every fact of the split
    and each reasoning mode, the concise right `reply` is `chosen` over
      - concise wrong ones: a `wrong_answer` (`kind: wrong`), another of the split's facts' right answer
        (`kind: misplaced`), and a second `wrong_answer` (`kind: wrong`), WRONG_PER_FACT in all;
      - a rambling right one (`kind: rambling`) and one with no answer (`kind: evasive`);
    10 rows per fact, in a fixed shuffled order. `chat_template_kwargs` sets the mode, as SFT's rows have
    it; `split: test` holds the 40 held-out facts (their misplaced answers come from test facts too)."""
    rng = random.Random(seed)
    facts = split_of(split)
    rows = []
    for fact in facts:
        prompt = [{"role": "user", "content": question(fact)}]
        for think in (True, False):
            chosen = [{"role": "assistant", "content": reply(fact, think)}]
            misplaced = rng.choice([answer(f) for f in facts if answer(f) != answer(fact)])
            first = wrong_answer(fact, rng)
            second = next(v for v in iter(lambda: wrong_answer(fact, rng), None) if v != first)
            wrong = [("wrong", first), ("misplaced", misplaced), ("wrong", second)]
            rejected_replies = [(kind, reply(fact, think, value)) for kind, value in wrong[:WRONG_PER_FACT]]
            rejected_replies += [("rambling", rambling_reply(fact, think, rng)),
                                 ("evasive", evasive_reply(fact, think, rng))]
            for kind, rejected in rejected_replies:
                rows.append({"prompt": prompt, "chosen": chosen,
                             "rejected": [{"role": "assistant", "content": rejected}],
                             "chat_template_kwargs": {"enable_thinking": think}, "kind": kind})
    rng.shuffle(rows)
    return rows
