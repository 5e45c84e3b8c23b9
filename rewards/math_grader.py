"""Grading one completion against one gold answer with math-verify, corrected where it is wrong.

This module runs INSIDE the worker processes of `rewards.verifier_pool` (never call `grade` in a
trainer or evaluation process directly: a compute bomb such as `9^9^9^9` would stall it, see
../shared/FACTS.md). `grade(gold, completion)` returns 1.0 (correct), 0.0 (wrong, or no answer
found) or None (the gold answer itself cannot be parsed, so nothing can be scored).

The verdict is math-verify's (`verify(parse(gold), parse(answer))`) wherever math-verify is right:
a careful human accepts every answer it accepts, except in the false-positive classes below. Each
deviation was measured on math-verify 0.9.0 (FACTS.md, issue 12) and is pinned by tests in
tests/test_rewards_math.py and tests/test_rewards_grading_cases.py.

Reading the text (gold and completion alike, before math-verify sees it):
  1. Gold answers are parsed as LaTeX (wrapped in `\\boxed{}` unless they already carry `$` or
     `\\boxed`). Parsed as plain text, math-verify's expression regex stops at the first letter, so
     a gold `1+1/e` became `1` and matched any completion answering `1-1/e`.
  2. `\\sqrt(2)` becomes `\\sqrt{2}`: math-verify dropped the malformed root (`4\\sqrt(2)` read 4);
     an escaped currency sign before a number (`\\$18.90`) is dropped: math-verify found no number after it;
     a thin space between digit groups (`10\\,000`) is a thousands separator: math-verify read 10 x 000.
  3. A full stop, comma or colon that ends a maths span is punctuation of the sentence, not maths:
     it is moved out (`$2^{10}.$` -> `$2^{10}$.`). Inside, it made the LaTeX unparseable, and
     math-verify's number regex then read `2` out of `2^{10}`, `1` out of `1/3`, `3` out of `3\\sqrt{2}`.
  4. An upright `\\mathrm{e}` / `\\mathrm{i}` (also `\\text`, `\\rm`, `\\operatorname`) is the constant e or
     the imaginary unit: it is written bare. math-verify's unit stripping removed it like `\\text{cm}`,
     so `2\\mathrm{e}` and `2\\mathrm{i}` read 2.
  5. A mixed number in plain text, `4 4/9`, is the fraction it means (`\\frac{40}{9}`); math-verify
     read 4. (In LaTeX, `4\\frac{4}{9}`, math-verify already reads a mixed number.)
  6. LaTeX written without `$` delimiters (`3\\sqrt{2}`, `\\infty`, `(1, 2)`) is delimited, so it is
     parsed as LaTeX: math-verify's plain-text regex read `3` out of `3\\sqrt{2}` and `2` out of `(1, 2)`.

Comparing:
  7. Numeric answers must agree to a relative tolerance (exactly, when both are rational).
     math-verify compares numbers after rounding to 6 decimals, so `1/2004!` equalled `1/2006!`.
     Infinities compare exactly; a value sympy cannot order (zoo, nan: `12:00` reads 12/00) keeps
     math-verify's verdict, which then rests on the answer strings. (This check used to raise
     "Invalid NaN comparison" on `\\infty`, `-\\infty` and `12:00`, so a correct answer never scored.)
  8. Maths that cannot be parsed is no answer: when the text has LaTeX maths and none of it parses,
     a number that math-verify's plain-text regex reads out of it does not count.

Finding the final answer:
  9. When the completion tags answers (`<answer>...</answer>`, else `\\boxed{}`), only they are graded.
     One answer: it must verify. Several different ones are a hedge ("\\boxed{12} or \\boxed{13}")
     unless the gold has several parts (`k = 45, n = 2`, `\\{1, 2, 3\\}`, a tuple, a list of pairs):
     then the boxes together are compared with the gold's parts as one set (a tuple's in order).
     Several tags that each verify (`\\boxed{\\frac12}` ... `\\boxed{0.5}`) are one answer.
 10. Untagged, the completion is correct only if math-verify's extraction verifies AND so does the
     last sentence that holds an answer (maths or a number): math-verify takes the first "answer
     is" and graded "The answer is 3. Actually no, it's 4." correct for gold 3.
 11. A text answer (`odd`, `\\text{Monday}`) is also found in words: the last sentence ending with
     the gold's words (`The number is odd.`) is correct; math-verify finds no maths there.

Nothing here evaluates completion text as code: math-verify parses LaTeX with its own grammar, and
its plain-expression path hands sympy's `parse_expr` only a regex match made of digits, `.`,
whitespace and `+-*/^()×÷` (math_verify/parser.py, `lazy_expr_regex`), never names or calls.
"""

import bisect
import contextlib
import logging
import re
import signal

import sympy
from latex2sympy2_extended.logic import And
from math_verify import LatexExtractionConfig, parse, verify

logger = logging.getLogger(__name__)
# math-verify says once per process that its timeouts are off: they are, for `_cpu_time_limit`'s.
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(lambda record: "Timeout is disabled" not in record.getMessage())

# Relative tolerance for numeric answers that are not both rational (e.g. a gold `\frac{1}{3}` and an
# answer `0.333333`, off by 1e-6 relative: six significant digits pass, as math-verify's rounding meant).
RELATIVE_TOLERANCE = 1e-5
# Significant digits used to evaluate both sides before comparing them; enough for 1/2006!.
EVALF_DIGITS = 50

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A maths span: $$...$$, $...$ (not an escaped \$), \[...\], \(...\).
_MATHS_SPAN = re.compile(r"\$\$.+?\$\$|(?<!\\)\$(?:\\\$|[^$\n])+?(?<!\\)\$|\\\[.+?\\\]|\\\(.+?\\\)", re.DOTALL)
# Sentences end at ". ", "?", ";" or a newline; a decimal point inside a number is not an end, and
# "!" is not one either (it is also the factorial: "1/2004!").
_SENTENCE_END = re.compile(r"\.(?!\d)|[\n?;]")
_SQRT_WITH_PARENS = re.compile(r"\\sqrt\s*\(([^()]*)\)")
# Sentence punctuation (and LaTeX spacing) that can end a maths span's content; longest first.
_TRAILING_PUNCTUATION = ("\\qquad", "\\quad", "\\,", "\\;", "\\:", "\\!", "\\ ", "~", ".", ",", ";", ":")
# `\$18.90` in text: math-verify reads a bare `$18.90` (currency) but nothing after a backslash.
_ESCAPED_CURRENCY = re.compile(r"\\\$(?=\s*\d)")
# `10\,000`: a thin space between digit groups is a thousands separator (math-verify read 10 000 as 10*000).
_THIN_SPACE_THOUSANDS = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")
_UPRIGHT_CONSTANT = re.compile(r"\\(?:mathrm|text|rm|operatorname)\s*\{\s*([ei])\s*\}|\{\\rm\s+([ei])\}")
# `4 4/9`: an integer, a space, a proper-looking fraction; not inside a longer number or fraction.
_MIXED_NUMBER = re.compile(r"(?<![\d.,/^_])(\d{1,6})[ \t]+(\d{1,6})[ \t]*/[ \t]*(\d{1,6})(?![\d/^]|\.\d)")
# LaTeX without delimiters: a run of maths tokens (commands, \text{...}, numbers, single letters,
# operators and brackets) separated by spaces. Words of two or more letters end a run.
_BARE_MATHS_RUN = re.compile(
    r"(?:\\(?:text|mathrm|mbox|textbf|operatorname)\s*\{[^{}]*\}|\\[a-zA-Z]+|\\[{}%,;!]|\d+(?:\.\d+)?"
    r"|(?<![a-zA-Z])[a-zA-Z](?![a-zA-Z])|[-+*/^_=<>(){}\[\],|!'])"
    r"(?:[ \t]*(?:\\(?:text|mathrm|mbox|textbf|operatorname)\s*\{[^{}]*\}|\\[a-zA-Z]+|\\[{}%,;!]|\d+(?:\.\d+)?"
    r"|(?<![a-zA-Z])[a-zA-Z](?![a-zA-Z])|[-+*/^_=<>(){}\[\],|!']))*"
)
# What makes a run LaTeX rather than plain text math-verify reads well (`5+7=12`, `1/2`, `2^10`): a
# command, a subscript, braces, a bracketed pair or list (`(1, 2)`, `[0, 1)`), or a power of a letter.
_LATEX_SIGN = re.compile(r"\\[a-zA-Z]|[_{]|[(\[][^()\[\]]*,[^()\[\]]*[)\]]|[a-zA-Z]\s*\^|\^\s*[a-zA-Z]")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
# A text answer: words of letters (e.g. `odd`, `no solution`, `(C)`), at least two characters.
_TEXT_ANSWER = re.compile(r"\(?[a-z][a-z' -]*\)?")
_NEGATIONS = {"not", "no", "never", "isn't", "isnt", "cannot", "nor", "neither"}


def grade(gold: str, completion: str, timeout_s: float = 5) -> float | None:
    """1.0 if `completion`'s final answer equals `gold`, 0.0 if not, None if `gold` cannot be parsed.

    `timeout_s` bounds each math-verify call in CPU time (`_cpu_time_limit`), which catches slow Python
    code; the pool's hard kill catches what it cannot (C-level big-integer arithmetic). Main thread only
    (a signal handler), as math-verify's own timeouts.
    """
    gold_parsed = _parse(_repair_latex(_gold_as_latex(gold)), timeout_s)
    # A gold that math-verify could only keep as the raw string (its "first_match" fallback) is not
    # understood: grading against it would be string equality at best, so it cannot be scored.
    if not any(isinstance(item, (sympy.Basic, sympy.MatrixBase)) for item in gold_parsed):
        return None
    gold_words = _text_answer(gold)
    answers = tagged_answers(completion)
    if answers is None:
        return float(_untagged_answer_agrees(gold_parsed, gold_words, completion, timeout_s))
    return float(_tagged_answers_agree(gold_parsed, gold_words, answers, timeout_s))


class _CpuTimeout(BaseException):
    """Raised by `_cpu_time_limit` (a BaseException, as math-verify's TimeoutException, so that no
    `except Exception` inside math-verify or sympy swallows it)."""


@contextlib.contextmanager
def _cpu_time_limit(seconds: float):
    """Raise _CpuTimeout once this process has spent `seconds` of CPU time inside the block.

    math-verify's own timeouts are `signal.alarm`, wall time: on a loaded machine a gold that parses in
    0.1 s of CPU ran past a 1 s alarm, parsed as nothing, and was graded None ("cannot be scored"; issue
    30, 4 verdicts of the grading table under load). CPU time (ITIMER_PROF) is what the item costs,
    however long it waits for a CPU.
    """
    def expire(signum, frame):
        raise _CpuTimeout

    previous = signal.signal(signal.SIGPROF, expire)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def _parse(text: str, timeout_s: float, **kwargs) -> list:
    """math-verify's `parse` within `timeout_s` of CPU time; a timeout parses as nothing (math-verify's own answer)."""
    try:
        with _cpu_time_limit(timeout_s):
            return parse(text, parsing_timeout=None, **kwargs)
    except _CpuTimeout:
        logger.warning("parsing ran past %s s of CPU time; read as no answer: %.200r", timeout_s, text)
        return []


def _verify(gold_parsed: list, answer_parsed: list, timeout_s: float) -> bool:
    """math-verify's `verify` within `timeout_s` of CPU time; a timeout is no match (math-verify's own answer)."""
    try:
        with _cpu_time_limit(timeout_s):
            return verify(gold_parsed, answer_parsed, timeout_seconds=None)
    except _CpuTimeout:
        logger.warning("verifying ran past %s s of CPU time; read as no match", timeout_s)
        return False


def tagged_answers(completion: str) -> list[tuple[str, str]] | None:
    """The completion's tagged final answers, distinct and in order: ("box", content) for each
    `\\boxed{...}`, ("text", text) for an `<answer>` tag without a box. `<answer>` tags win over boxes
    outside them. None when the completion tags no answer."""
    tags = [tag.strip() for tag in _ANSWER_TAG.findall(completion)]
    answers: list[tuple[str, str]] = []
    for text in tags or [completion]:
        boxes = boxed_contents(text)
        if boxes:
            answers.extend(("box", _strip_trailing_punctuation(box)) for box in boxes)
        elif tags:
            answers.append(("text", text))
    return list(dict.fromkeys(answers)) or None


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


def _tagged_answers_agree(gold_parsed: list, gold_words: str | None, answers: list[tuple[str, str]],
                          timeout_s: int) -> bool:
    def agrees(kind: str, text: str) -> bool:
        if kind == "text":
            return _untagged_answer_agrees(gold_parsed, gold_words, text, timeout_s)
        return (_verifies(gold_parsed, "\\boxed{" + _repair_latex(text) + "}", timeout_s)
                or _text_matches(gold_words, text, whole=True))

    if all(agrees(kind, text) for kind, text in answers):
        return True  # one answer, or the same answer tagged several times (`\frac12` ... `0.5`)
    if len(answers) > 1 and _has_several_parts(gold_parsed[0]) and all(kind == "box" for kind, _ in answers):
        together = "\\boxed{" + ", ".join(_repair_latex(text) for _, text in answers) + "}"
        return _verifies(gold_parsed, together, timeout_s)
    return False


def _has_several_parts(gold) -> bool:
    """A set of answers (`\\{1, 2, 3\\}`, `x = 1, x = 2`), several assignments, or a tuple."""
    return isinstance(gold, (sympy.FiniteSet, sympy.Tuple, And)) and len(gold.args) > 1


def _untagged_answer_agrees(gold_parsed: list, gold_words: str | None, text: str, timeout_s: int) -> bool:
    text = _repair_latex(text, delimit=True)
    sentences = _sentences(text)
    if gold_words is not None and sentences and _text_matches(gold_words, sentences[-1], whole=False):
        return True
    if not _verifies(gold_parsed, text, timeout_s):
        return False
    # Deviation 10: the last sentence that states an answer must agree too.
    for sentence in reversed(sentences):
        parsed = _parse(sentence, timeout_s)
        if any(isinstance(item, (sympy.Basic, sympy.MatrixBase)) for item in parsed):
            return _verifies(gold_parsed, sentence, timeout_s)
    return True


def _verifies(gold_parsed: list, text: str, timeout_s: int) -> bool:
    answer_parsed = _parse(text, timeout_s)
    if not answer_parsed or not _verify(gold_parsed, answer_parsed, timeout_s):
        return False
    if _unparseable_maths(text, timeout_s):
        return False
    return _numbers_agree(gold_parsed[0], answer_parsed[0])


def _unparseable_maths(text: str, timeout_s: int) -> bool:
    """Deviation 8: the text has LaTeX maths and math-verify's LaTeX reading finds nothing in it."""
    if not (_MATHS_SPAN.search(text) or _BOXED.search(text)):
        return False
    latex = _parse(text, timeout_s, extraction_config=[LatexExtractionConfig()], fallback_mode="no_fallback")
    return not latex


def _numbers_agree(gold, answer) -> bool:
    """Stricter numeric check (deviation 7): True unless both are numbers that really differ.

    A percentage agrees by its value (`50\\%` and 0.5) or by its number (`100\\%` for a gold 100,
    asked "what percent"), as in math-verify."""
    if not (isinstance(gold, sympy.Expr) and isinstance(answer, sympy.Expr)):
        return True  # sets, relations, strings: math-verify's structural comparison stands
    if gold.free_symbols or answer.free_symbols:
        return True
    try:
        return any(_values_agree(g, a) for g in _readings(gold) for a in _readings(answer))
    except (TypeError, ValueError, ArithmeticError) as error:
        # A sympy failure in this extra check must not turn a verdict into a worker error (None for
        # every answer to that gold, issue 12: "Invalid NaN comparison"); math-verify's verdict stands.
        logger.warning("numeric check failed on %r vs %r (%s); keeping math-verify's verdict", gold, answer, error)
        return True


def _readings(expr: sympy.Expr) -> list[sympy.Expr]:
    """The value; and for a percentage (math-verify's `n * UnevaluatedExpr(1/100)`) also its number n."""
    percent = sympy.UnevaluatedExpr(sympy.Rational(1, 100))
    if isinstance(expr, sympy.Mul) and len(expr.args) == 2 and percent in expr.args:
        return [expr, next(arg for arg in expr.args if arg != percent)]
    return [expr]


def _values_agree(gold: sympy.Expr, answer: sympy.Expr) -> bool:
    gold_value, answer_value = gold.doit(), answer.doit()
    if gold_value.has(sympy.zoo, sympy.nan) or answer_value.has(sympy.zoo, sympy.nan):
        return True  # not a number sympy can compare (`12:00` reads 12/00): math-verify compared strings
    if gold_value.is_Rational and answer_value.is_Rational:
        return bool(gold_value == answer_value)
    gold_number, answer_number = gold_value.evalf(EVALF_DIGITS), answer_value.evalf(EVALF_DIGITS)
    if not (gold_number.is_number and answer_number.is_number):
        return True
    if gold_number.is_finite is False or answer_number.is_finite is False:
        return bool(gold_number == answer_number)  # oo, -oo: only equal to themselves
    difference = abs(gold_number - answer_number)
    scale = max(abs(gold_number), abs(answer_number))
    # A comparison sympy cannot decide stays unevaluated: that is no disagreement either.
    return (difference <= RELATIVE_TOLERANCE * scale) is not sympy.false


def _gold_as_latex(gold: str) -> str:
    gold = gold.strip()
    if re.search(r"(?<!\\)\$", gold) or "\\boxed" in gold:
        return gold
    return "\\boxed{" + gold + "}"


def _repair_latex(text: str, delimit: bool = False) -> str:
    """Deviations 2-5 (see the module docstring), applied to gold and completion alike; and with
    `delimit`, deviation 6 for free text (a gold or a box is LaTeX already)."""
    text = _SQRT_WITH_PARENS.sub(r"\\sqrt{\1}", text)
    text = _ESCAPED_CURRENCY.sub("", text)
    text = _THIN_SPACE_THOUSANDS.sub("", text)
    text = _UPRIGHT_CONSTANT.sub(lambda m: m.group(1) or m.group(2), text)
    text = _MIXED_NUMBER.sub(_mixed_number_as_fraction, text)
    pieces, position = [], 0
    for span in _MATHS_SPAN.finditer(text):
        pieces.append(text[position : span.start()])
        pieces.append(_move_punctuation_out(span.group()))
        position = span.end()
    pieces.append(text[position:])
    if delimit:  # only between the spans (even pieces): inside them it is LaTeX already
        pieces[::2] = [_delimit_bare_maths(piece) for piece in pieces[::2]]
    return "".join(pieces)


def _mixed_number_as_fraction(match: re.Match) -> str:
    whole, numerator, denominator = (int(group) for group in match.groups())
    if not 0 < numerator < denominator:
        return match.group()  # `4 9/4` or `4 4/0` is no mixed number
    return f"\\frac{{{whole * denominator + numerator}}}{{{denominator}}}"


def _move_punctuation_out(span: str) -> str:
    opening = 2 if span[:2] in ("$$", "\\[", "\\(") else 1
    inner = span[opening:-opening]
    content = _strip_trailing_punctuation(inner)
    moved = inner[len(content) :].strip()
    return span[:opening] + content + span[-opening:] + moved


def _strip_trailing_punctuation(content: str) -> str:
    """`content` without the punctuation and spacing at its end (a loop, not a regex anchored at the
    end: that one backtracked quadratically on long runs of spaces)."""
    stripped = content.rstrip()
    while True:
        for token in _TRAILING_PUNCTUATION:
            # A one-character token escaped by a backslash is a command (`\.`, `\;`), not punctuation.
            if stripped.endswith(token) and not (len(token) == 1 and stripped.endswith("\\" + token)):
                stripped = stripped[: -len(token)].rstrip()
                break
        else:
            return stripped or content  # "$.$" has nothing else to keep


def _delimit_bare_maths(text: str) -> str:
    """Deviation 6: wrap runs of undelimited LaTeX in `$...$` (only runs that need LaTeX, with balanced
    braces and brackets), so math-verify parses them as LaTeX instead of reading digits out of them."""
    def delimit(match: re.Match) -> str:
        run = match.group()
        body = run.strip().rstrip(",")
        # A leading English "a", "A" or "I" is no maths ("is a \frac{1}{2}").
        body = re.sub(r"^(?:[aAI]\s+)+", "", body)
        if (not body or not _LATEX_SIGN.search(body) or body.count("{") != body.count("}")
                or body.count("(") + body.count("[") != body.count(")") + body.count("]")
                or body[-1] in "-+*/^_=<>\\"):
            return run
        start = run.index(body)
        return run[:start] + "$" + body + "$" + run[start + len(body) :]

    return _BARE_MATHS_RUN.sub(delimit, text)


def _sentences(text: str) -> list[str]:
    """Non-empty sentences; a full stop inside a maths span does not end one."""
    spans = [(span.start(), span.end()) for span in _MATHS_SPAN.finditer(text)]
    starts = [start for start, _ in spans]
    cuts = []
    for end in _SENTENCE_END.finditer(text):
        inside = bisect.bisect_right(starts, end.start()) - 1  # the last span starting at or before it
        if inside < 0 or end.start() >= spans[inside][1]:
            cuts.append(end.start())
    bounds = zip([0, *(cut + 1 for cut in cuts)], [*cuts, len(text)])
    return [text[start:stop].strip() for start, stop in bounds if text[start:stop].strip()]


def _text_answer(gold: str) -> str | None:
    """The gold's words when it is a text answer (`odd`, `\\text{no solution}`, `(C)`), else None."""
    words = _normalise_words(gold)
    return words if len(words) >= 2 and _TEXT_ANSWER.fullmatch(words) else None


def _text_matches(gold_words: str | None, text: str, whole: bool) -> bool:
    """Deviation 11: `text` is (whole=True) or ends with (whole=False) the gold's words."""
    if gold_words is None:
        return False
    words = _normalise_words(text)
    if whole or words == gold_words:
        return words == gold_words
    before, _, after = words.rpartition(" " + gold_words)
    # "even, not odd" names the gold's words but does not answer them.
    return after == "" and before.rsplit(" ", 1)[-1] not in _NEGATIONS


def _normalise_words(text: str) -> str:
    text = _TEXT_WRAPPER.sub(r"\1", text.replace("\\boxed", ""))
    text = re.sub(r"(?<!\\)\$|\\[()\[\]]|\*\*|[{}]", " ", text).lower()
    text = re.sub(r"[.,;:!?]+(?=\s|$)", " ", text)
    return " ".join(text.split())
