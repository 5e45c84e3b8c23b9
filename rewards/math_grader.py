"""Grading one completion against one gold answer with math-verify, made stricter where it is wrong.

This module runs INSIDE the worker processes of `rewards.verifier_pool` (never call `grade` in a
trainer or evaluation process directly: a compute bomb such as `9^9^9^9` would stall it, see
../shared/FACTS.md). `grade(gold, completion)` returns 1.0 (correct), 0.0 (wrong, or no answer
found) or None (the gold answer itself cannot be parsed, so nothing can be scored).

Where we deviate from plain `math_verify.verify(parse(gold), parse(completion))`, each case is
measured on math-verify 0.9.0 (FACTS.md) and pinned by a test in tests/test_rewards_math.py:

  1. Gold answers are parsed as LaTeX (wrapped in `\\boxed{}` unless they already carry `$` or
     `\\boxed`). Parsed as plain text, math-verify's expression regex stops at the first letter, so
     a gold `1+1/e` became `1` and matched any completion answering `1-1/e`.
  2. Numeric answers must agree to a relative tolerance (exactly, when both are rational).
     math-verify compares numbers after rounding to 6 decimals, so `1/2004!` equalled `1/2006!`
     and `1/2^99` equalled `1/2^98`.
  3. `\\sqrt(2)` (parentheses instead of braces) is rewritten to `\\sqrt{2}` before parsing:
     math-verify dropped the malformed root, so `4\\sqrt(2)` matched a gold `4`.
  4. A completion that hedges ("The answer is 3. Actually no, it's 4.") is only correct if its last
     sentence that contains a number verifies too: math-verify takes the first "answer is" and
     graded that completion correct for gold 3. When a completion has a `\\boxed{}` or
     `<answer>` tag, only that tag is graded, and several different ones are wrong.

Nothing here evaluates completion text as code: math-verify parses LaTeX with its own grammar, and
its plain-expression path hands sympy's `parse_expr` only a regex match made of digits, `.`,
whitespace and `+-*/^()×÷` (math_verify/parser.py, `lazy_expr_regex`), never names or calls.
"""

import re

import sympy
from math_verify import parse, verify

# Relative tolerance for numeric answers that are not both rational (e.g. a gold `\frac{1}{3}` and an
# answer `0.333333`, off by 1e-6 relative: six significant digits pass, as math-verify's rounding meant).
RELATIVE_TOLERANCE = 1e-5
# Significant digits used to evaluate both sides before comparing them; enough for 1/2006!.
EVALF_DIGITS = 50

_SQRT_WITH_PARENS = re.compile(r"\\sqrt\s*\(([^()]*)\)")
_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# Sentences end at ". ", "?", ";" or a newline; a decimal point inside a number is not an end, and
# "!" is not one either (it is also the factorial: "1/2004!").
_SENTENCE_END = re.compile(r"\.(?!\d)|[\n?;]")


def grade(gold: str, completion: str, timeout_s: int = 5) -> float | None:
    """1.0 if `completion`'s final answer equals `gold`, 0.0 if not, None if `gold` cannot be parsed.

    `timeout_s` is passed to math-verify's own (signal-based) timeouts, which catch slow Python
    code; the pool's hard kill catches what they cannot (C-level big-integer arithmetic).
    """
    gold_parsed = parse(_gold_as_latex(gold), parsing_timeout=timeout_s)
    # A gold that math-verify could only keep as the raw string (its "first_match" fallback) is not
    # understood: grading against it would be string equality at best, so it cannot be scored.
    if not any(isinstance(item, (sympy.Basic, sympy.MatrixBase)) for item in gold_parsed):
        return None
    region = final_answer_region(completion)
    candidates = [region] if region is not None else [completion, _last_sentence_with_number(completion)]
    for text in candidates:
        if not text or not _verifies(gold_parsed, _repair_latex(text), timeout_s):
            return 0.0
    return 1.0


def final_answer_region(completion: str) -> str | None:
    """The completion's tagged final answer: the last `<answer>...</answer>` tag, else `\\boxed{...}`.

    Returns None when the completion tags no answer, and "" when it tags several different ones
    (hedging: "\\boxed{12} or \\boxed{13}" answers nothing), so that grading fails.
    """
    tags = [tag.strip() for tag in _ANSWER_TAG.findall(completion)]
    if tags:
        if len(set(tags)) > 1:
            return ""
        inner = final_answer_region(tags[-1])  # a boxed answer inside the tag
        return inner if inner is not None else tags[-1]
    boxes = set(boxed_contents(completion))
    if len(boxes) > 1:
        return ""
    return "\\boxed{" + boxes.pop() + "}" if boxes else None


def boxed_contents(text: str) -> list[str]:
    """The contents of every balanced `\\boxed{...}` (an unclosed box is no answer)."""
    contents = []
    for match in _BOXED.finditer(text):
        depth = 1
        for index in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth == 0:
                contents.append(text[match.end() : index].strip())
                break
    return contents


def _gold_as_latex(gold: str) -> str:
    gold = gold.strip()
    if "$" in gold or "\\boxed" in gold:
        return gold
    return "\\boxed{" + gold + "}"


def _repair_latex(text: str) -> str:
    return _SQRT_WITH_PARENS.sub(r"\\sqrt{\1}", text)


def _last_sentence_with_number(completion: str) -> str | None:
    sentences = [s for s in _SENTENCE_END.split(completion) if re.search(r"\d", s)]
    return sentences[-1] if sentences else None


def _verifies(gold_parsed: list, text: str, timeout_s: int) -> bool:
    answer_parsed = parse(text, parsing_timeout=timeout_s)
    if not answer_parsed or not verify(gold_parsed, answer_parsed, timeout_seconds=timeout_s):
        return False
    return _numbers_agree(gold_parsed[0], answer_parsed[0])


def _numbers_agree(gold, answer) -> bool:
    """Stricter numeric check (deviation 2): True unless both are numbers that really differ."""
    if not (isinstance(gold, sympy.Expr) and isinstance(answer, sympy.Expr)):
        return True  # sets, relations, strings: math-verify's structural comparison stands
    if gold.free_symbols or answer.free_symbols:
        return True
    gold_value, answer_value = gold.doit(), answer.doit()
    if gold_value.is_Rational and answer_value.is_Rational:
        return bool(gold_value == answer_value)
    gold_number, answer_number = gold_value.evalf(EVALF_DIGITS), answer_value.evalf(EVALF_DIGITS)
    if not (gold_number.is_number and answer_number.is_number):
        return True
    difference = abs(gold_number - answer_number)
    scale = max(abs(gold_number), abs(answer_number))
    return bool(difference <= RELATIVE_TOLERANCE * scale)
