"""Load, render, tokenize, compare and display chat templates.

A `ChatTemplate` is a pair of Jinja sources that render the same text: `training` (with
`{% generation %}` markers around what the model must learn to write in each assistant turn, for
transformers' `return_assistant_tokens_mask`) and `inference` (what a tokenizer ships for generation),
derived from it by removing the markers. Rendering goes through transformers' own sandboxed
environment (`render_jinja_template`, an ImmutableSandboxedEnvironment), so a render here and
`tokenizer.apply_chat_template` with the template installed are the same text by construction.

Wherever a template goes, any of these works: a shipped name ("qwen3"), Jinja source text, a path to
a .jinja file, a tokenizer (its chat_template), a tokenizer or checkpoint directory, or a ChatTemplate.

    >>> import chat_templates as ct
    >>> qwen = ct.load("qwen3")                       # or a path to a .jinja file or a checkpoint
    >>> msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    >>> print(ct.render(msgs, qwen))
    >>> print(ct.render(msgs[:1], qwen, add_generation_prompt=True, enable_thinking=False))
    >>> print(ct.diff("chatml", "qwen3", msgs))       # what changes between two templates
    >>> missing = ct.install(tokenizer, "qwen3")      # sets tokenizer.chat_template and its response parser
    >>> ids, mask = ct.assistant_mask(msgs, tokenizer)
    >>> ct.show(msgs, tokenizer)                      # tokens, trained ones highlighted
    >>> ct.show(msgs, tokenizer, ids=True)            # one token per line with its id
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from tokenizers import AddedToken
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

TEMPLATE_DIR = Path(__file__).parent / "templates"

# Control tokens each shipped template writes. They must each be ONE token of the tokenizer: a
# control token split into pieces is never learned as a unit, and an end-of-turn split that way
# cannot stop generation.
_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# Reasoning tags must be single tokens too, but ordinary ones (special=False), as in the SmolLM3 and Qwen3
# tokenizers: TRL decodes completions with skip_special_tokens=True, which deletes special tokens, so a
# reward function would never see the think block the model wrote (issue 15).
REASONING_TOKENS = ("<think>", "</think>")
_SHIPPED = {
    "chatml": dict(end_of_turn="<|im_end|>", special_tokens=_CHATML_TOKENS, response_format="chatml"),
    "smollm3": dict(
        end_of_turn="<|im_end|>",
        special_tokens=(*_CHATML_TOKENS, *REASONING_TOKENS),
        reasoning_tokens=REASONING_TOKENS,
        response_format="qwen3",  # same reply format as Qwen 3: <think> block, <tool_call> JSON, <|im_end|>
    ),
    "qwen3": dict(
        end_of_turn="<|im_end|>",
        special_tokens=(*_CHATML_TOKENS, *REASONING_TOKENS),
        reasoning_tokens=REASONING_TOKENS,
        response_format="qwen3",
    ),
    "llama3": dict(
        end_of_turn="<|eot_id|>",
        special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos_token="<|begin_of_text|>",
        response_format="llama3",
    ),
}
SHIPPED_NAMES = tuple(_SHIPPED)

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Both markers, as written in templates; removing them from a training variant gives its inference variant.
_GENERATION_MARKER = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")
# Where a template does not declare its tokens: <|...|> is unambiguously a control token; the
# end-of-turn token may also be <...> or </...> (</s>, <end_of_turn>), but such strings are often
# plain text (<tool_call>), so only the one found right after a reply is taken as a control token.
_CONTROL_TOKEN = re.compile(r"<\|[^<>|\s]+\|>")
_TOKEN_LIKE = re.compile(r"<\|[^<>|\s]+\|>|</?[A-Za-z_][A-Za-z0-9_]*>")


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template in its two variants, and the tokens it relies on."""

    name: str
    inference: str  # Jinja source for generation: what a tokenizer ships
    training: str  # the same render, with {% generation %} around each trained span
    end_of_turn: str  # the token that closes an assistant turn (the model's stop token)
    special_tokens: tuple[str, ...]  # control tokens that must be single tokens of the tokenizer
    bos_token: str | None = None  # what `bos_token` renders as (the template's own, over a tokenizer's)
    reasoning_tokens: tuple[str, ...] = ()  # tags that must be ordinary (non-special) tokens
    response_format: str | None = None  # which TRL response parser reads its replies (`response_template`)

    @property
    def control_tokens(self) -> tuple[str, ...]:
        """The tokens that frame turns (role markers, end of turn, BOS): generation stops at any of them, and
        content holding one is refused. Not the reasoning tags, which a reply writes itself (issue 30)."""
        return tuple(token for token in self.special_tokens if token not in self.reasoning_tokens)

    @property
    def has_generation_markers(self) -> bool:
        return bool(GENERATION_TAG.search(self.training))

    @property
    def response_template(self) -> dict | None:
        """The parser of a generated reply (transformers' `tokenizer.parse_response` format), which TRL's GRPO
        and distillation trainers need to read tool calls; None where the format is unknown."""
        return None if self.response_format is None else _response_template(self.response_format)


def _response_template(response_format: str) -> dict:
    # TRL's own parsers, imported here because trl takes seconds to import. TRL 1.16 recognises only its own
    # template files (add_response_schema), so `install` sets the parser itself. Qwen 3's parser reads
    # SmolLM3 replies too (the same <think>, <tool_call> and <|im_end|> framing); ChatML and our Llama 3
    # have no tool or reasoning format, so only the content field of the matching parser is kept.
    from trl.chat_template_utils import llama3_template, qwen3_template

    parser = {"qwen3": qwen3_template, "chatml": qwen3_template, "llama3": llama3_template}[response_format]
    if response_format == "qwen3":
        return parser
    return {**parser, "fields": {"content": parser["fields"]["content"]}}


def without_generation_markers(source: str) -> str:
    """The inference variant of a training template: the same Jinja without `{% generation %}` markers."""
    return _GENERATION_MARKER.sub("", source)


def load(name_or_path: str | os.PathLike, end_of_turn: str | None = None) -> ChatTemplate:
    """A shipped template by name (`chatml`, `smollm3`, `llama3`, `qwen3`), a `.jinja` file, or the
    chat template of a tokenizer or checkpoint directory.

    A shipped template is one file, `templates/<name>_training.jinja`; its inference variant is the same
    source without the generation markers. For a file `x.jinja`, `x_training.jinja` next to it is the
    training variant; without one, the file is the training variant and the inference variant is derived
    from it. The end-of-turn token of a file is the first token-like string after the assistant content of
    a one-turn render, unless given.
    """
    name = str(name_or_path)
    if name in _SHIPPED:
        training = (TEMPLATE_DIR / f"{name}_training.jinja").read_text()
        return ChatTemplate(name=name, inference=without_generation_markers(training), training=training,
                            **_SHIPPED[name])
    path = Path(name_or_path)
    if path.is_dir():
        return from_tokenizer(_load_tokenizer(path))
    if not path.is_file():
        raise FileNotFoundError(
            f"chat template {name!r} is neither a shipped template ({', '.join(SHIPPED_NAMES)}), nor a .jinja file, "
            f"nor a tokenizer directory"
        )
    training_path = path.with_name(f"{path.stem}_training{path.suffix}")
    if training_path.is_file():
        return from_source(path.read_text(), training=training_path.read_text(), name=str(path),
                           end_of_turn=end_of_turn)
    return from_source(path.read_text(), name=str(path), end_of_turn=end_of_turn)


def from_source(
    source: str,
    training: str | None = None,
    name: str = "<source>",
    end_of_turn: str | None = None,
    bos_token: str | None = None,
) -> ChatTemplate:
    """A ChatTemplate from Jinja text (a tokenizer's `chat_template`, a file's content).

    `source` is the training variant unless `training` is given; the inference variant is then `source`
    without its generation markers. A source identical to a shipped variant is that shipped template.
    Otherwise the control tokens are the <|...|> strings the template writes plus the end-of-turn token,
    which, if not given, is the first token-like string right after the assistant content of a one-turn
    render.
    """
    for shipped in map(load, SHIPPED_NAMES):
        if source in (shipped.inference, shipped.training):
            return shipped
    if training is None:
        training, source = source, without_generation_markers(source)
    if end_of_turn is None:
        end_of_turn = _infer_end_of_turn(source, name, bos_token)
    special = tuple(dict.fromkeys([*_CONTROL_TOKEN.findall(source), end_of_turn]))
    reasoning = tuple(token for token in REASONING_TOKENS if token in source)
    return ChatTemplate(name, source, training, end_of_turn, special, bos_token, reasoning)


def from_tokenizer(tokenizer) -> ChatTemplate:
    """The chat template a tokenizer carries (its `chat_template`), with the tokenizer's BOS token."""
    return from_source(tokenizer_template_source(tokenizer), name="tokenizer.chat_template",
                       bos_token=tokenizer.bos_token)


def tokenizer_template_source(tokenizer) -> str:
    """The Jinja source `tokenizer.apply_chat_template` renders with by default."""
    chat_template = tokenizer.chat_template
    if isinstance(chat_template, dict):  # named variants: transformers renders "default" unless told otherwise
        if "default" not in chat_template:
            raise ValueError(f"the tokenizer's chat_template has variants {sorted(chat_template)} and no 'default'; "
                             f"pass the one to use as a string")
        chat_template = chat_template["default"]
    if not chat_template:
        raise ValueError("the tokenizer has no chat_template; install one with chat_templates.install(tokenizer, name)")
    return chat_template


def _load_tokenizer(path: Path):
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{path} is a directory without a tokenizer (no tokenizer.json or tokenizer_config.json)")
    from transformers import AutoTokenizer  # imported here: it imports torch, seconds for `import chat_templates`

    return AutoTokenizer.from_pretrained(path)


def _infer_end_of_turn(source: str, name: str, bos_token: str | None) -> str:
    marker = "Assistant reply used to locate the end-of-turn token."
    text = render_jinja_template(
        [[{"role": "user", "content": "Hello."}, {"role": "assistant", "content": marker}]],
        chat_template=source,
        **({"bos_token": bos_token} if bos_token else {}),
    )[0][0]
    after = text[text.index(marker) + len(marker) :].lstrip()
    match = _TOKEN_LIKE.match(after)
    if not match:
        raise ValueError(
            f"chat template {name}: no control token follows the assistant content "
            f"(it is followed by {after[:40]!r}); pass end_of_turn= explicitly"
        )
    return match.group(0)


TemplateLike = ChatTemplate | PreTrainedTokenizerBase | str | os.PathLike
_TEMPLATE_FORMS = ("a shipped name (" + ", ".join(SHIPPED_NAMES) + "), Jinja source, a .jinja path, a tokenizer, "
                   "a tokenizer directory or a ChatTemplate")


def resolve(template: TemplateLike) -> ChatTemplate:
    """A ChatTemplate from any of: a ChatTemplate, a shipped name, Jinja source text, a .jinja path, a
    tokenizer (its chat_template) or a tokenizer / checkpoint directory."""
    return resolve_with_tokenizer(template)[0]


def resolve_with_tokenizer(template: TemplateLike) -> tuple[ChatTemplate, PreTrainedTokenizerBase | None]:
    """`resolve(template)`, and the tokenizer it came from when it came from one (else None)."""
    if isinstance(template, ChatTemplate):
        return template, None
    if isinstance(template, PreTrainedTokenizerBase):
        return from_tokenizer(template), template
    if isinstance(template, str) and template not in _SHIPPED and ("{%" in template or "{{" in template):
        return from_source(template), None
    if isinstance(template, (str, os.PathLike)):
        if Path(template).is_dir():
            tokenizer = _load_tokenizer(Path(template))
            return from_tokenizer(tokenizer), tokenizer
        return load(template), None
    raise TypeError(f"a chat template must be {_TEMPLATE_FORMS}; got {type(template).__name__}")


def as_tokenizer(tokenizer: PreTrainedTokenizerBase | str | os.PathLike, where: str) -> PreTrainedTokenizerBase:
    """`tokenizer`, or the tokenizer saved in a directory; a clear error for a template passed in its place."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)) and Path(tokenizer).is_dir():
        return _load_tokenizer(Path(tokenizer))
    raise TypeError(
        f"{where}: the tokenizer argument must be a tokenizer or a tokenizer directory, got "
        f"{type(tokenizer).__name__} {str(tokenizer)[:60]!r}; the template goes in the template argument"
    )


def check_enable_thinking(enable_thinking) -> None:
    """Refuse anything but True, False or None (the template's default). A string is not parsed: Jinja reads
    "false" as true, so enable_thinking="false" silently selected thinking mode (issue 13)."""
    if enable_thinking is not None and not isinstance(enable_thinking, bool):
        raise TypeError(f"enable_thinking must be True, False or None (the template's default), got "
                        f"{type(enable_thinking).__name__} {enable_thinking!r}")


def validate_messages(messages) -> None:
    """Clear errors for malformed conversations (which otherwise surface as raw Jinja errors), naming the
    message index and the field; a warning for an assistant turn with nothing to train but its end."""
    if isinstance(messages, dict):
        raise TypeError(f"messages must be a list of message dicts; got one dict (keys {sorted(messages)}): "
                        f"wrap a single message in a list")
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of message dicts; got {type(messages).__name__}")
    if not messages:
        raise ValueError("cannot render an empty conversation: give at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content'; got "
                            f"{type(message).__name__} {str(message)[:60]!r}")
        if "role" not in message:
            raise ValueError(f"messages[{i}] has no 'role' (keys: {sorted(message)}); give one of system, user, "
                             f"assistant, tool")
        if not isinstance(message["role"], str):
            raise TypeError(f"messages[{i}]['role'] must be a string; got {type(message['role']).__name__}")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or "type" not in part:
                    raise TypeError(f"messages[{i}]['content'][{j}] must be a content part "
                                    f"{{'type': 'text', 'text': ...}}; got {str(part)[:60]!r}")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise TypeError(f"messages[{i}]['content'][{j}]['text'] must be a string; got "
                                    f"{type(part.get('text')).__name__}")
        elif content is not None and not isinstance(content, str):
            raise TypeError(f"messages[{i}]['content'] must be a string, a list of content parts or None; got "
                            f"{type(content).__name__} {content!r:.60}")
        reasoning = message.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise TypeError(f"messages[{i}]['reasoning_content'] must be a string or None; got "
                            f"{type(reasoning).__name__}")
        if message["role"] == "assistant" and not message.get("tool_calls") and not (
            content_text(message).strip() or (reasoning or "").strip()
        ):
            warnings.warn(
                f"messages[{i}] is an assistant turn with empty content and no tool calls: its trained span is "
                f"only the end-of-turn token, which teaches the model to answer with nothing; drop the turn or "
                f"give it content",
                stacklevel=3,
            )


def content_text(message: dict) -> str:
    """The text of a message's content: the string, or its text parts joined."""
    content = message.get("content") or ""
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def _template_kwargs(template: ChatTemplate, enable_thinking: bool | None, extra: dict) -> dict:
    check_enable_thinking(enable_thinking)
    kwargs = {"bos_token": template.bos_token} if template.bos_token else {}
    if enable_thinking is not None:  # unset means the template's own default, as in transformers
        kwargs["enable_thinking"] = enable_thinking
    return {**kwargs, **extra}


def _tokenizer_variables(tokenizer, template: ChatTemplate) -> dict:
    """The tokenizer's special tokens as template variables, as `apply_chat_template` passes them, except that
    a template's own BOS wins: `encode`, `assistant_mask` and `show` then render the same BOS (issue 13)."""
    variables = dict(tokenizer.special_tokens_map)
    if template.bos_token:
        variables["bos_token"] = template.bos_token
    return variables


def render_spans(
    messages: list[dict],
    template: TemplateLike,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
    tools: list[dict] | None = None,
    **template_kwargs,
) -> tuple[str, list[tuple[int, int]]]:
    """The training variant's render and its trained spans as (start, end) character offsets."""
    text, spans = _render(messages, template, "training", add_generation_prompt, enable_thinking, tools,
                          template_kwargs)
    return text, [tuple(span) for span in spans]


def render(
    messages: list[dict],
    template: TemplateLike,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
    tools: list[dict] | None = None,
    **template_kwargs,
) -> str:
    """The inference variant's render of `messages` (extra keyword arguments reach the template:
    `date_string`, `bos_token`, ...). `enable_thinking` must be a bool or None: strings are refused."""
    return _render(messages, template, "inference", add_generation_prompt, enable_thinking, tools, template_kwargs)[0]


def _render(messages, template, variant: str, add_generation_prompt, enable_thinking, tools, template_kwargs):
    """(text, trained spans) of one variant; spans are only computed for the training variant."""
    template = resolve(template)
    validate_messages(messages)
    texts, spans = render_jinja_template(
        [messages],
        tools=tools,
        chat_template=getattr(template, variant),
        return_assistant_tokens_mask=variant == "training",
        add_generation_prompt=add_generation_prompt,
        **_template_kwargs(template, enable_thinking, template_kwargs),
    )
    return texts[0], spans[0] if spans else []


def encode(
    messages: list[dict],
    tokenizer,
    template: TemplateLike,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
    tools: list[dict] | None = None,
    **template_kwargs,
) -> list[int]:
    """Token ids of `render(...)`, with the tokenizer's special tokens as template variables and no
    special tokens added on encoding: exactly what `tokenizer.apply_chat_template` does."""
    tokenizer = as_tokenizer(tokenizer, "encode(messages, tokenizer, template)")
    template = resolve(template)
    variables = {**_tokenizer_variables(tokenizer, template), **template_kwargs}
    text = render(messages, template, add_generation_prompt, enable_thinking, tools, **variables)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assistant_mask(
    messages: list[dict],
    tokenizer,
    template: TemplateLike | None = None,
    enable_thinking: bool | None = None,
    tools: list[dict] | None = None,
    **template_kwargs,
) -> tuple[list[int], list[int]]:
    """(input_ids, mask) with mask[i] == 1 for tokens the model is trained on, through transformers'
    `return_assistant_tokens_mask` and the template's training variant (the tokenizer's own
    chat_template when `template` is None). An all-zero mask is returned as is: deciding that it is
    an error is the caller's job (SFT refuses such a batch). The ids equal `encode(...)`'s."""
    tokenizer = as_tokenizer(tokenizer, "assistant_mask(messages, tokenizer, template)")
    resolved = resolve(template if template is not None else tokenizer)
    chat_template = resolved.training if template is not None else tokenizer_template_source(tokenizer)
    if not GENERATION_TAG.search(chat_template):
        source = "the tokenizer's chat_template" if template is None else f"template {resolved.name}"
        raise ValueError(
            f"{source} has no {{% generation %}} markers, so no assistant mask can be computed; "
            f"install a training variant (chat_templates.install(tokenizer, name))"
        )
    validate_messages(messages)
    check_enable_thinking(enable_thinking)
    kwargs = {"enable_thinking": enable_thinking} if enable_thinking is not None else {}
    out = tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        tools=tools,
        return_dict=True,
        return_assistant_tokens_mask=True,
        **{**_tokenizer_variables(tokenizer, resolved), **kwargs, **template_kwargs},
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def missing_tokens(tokenizer, template: TemplateLike) -> list[str]:
    """The template's control tokens that are not single tokens of `tokenizer`."""
    template = resolve(template)
    return [
        token
        for token in template.special_tokens
        if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1
    ]


def special_reasoning_tokens(tokenizer, template: TemplateLike) -> list[str]:
    """The template's reasoning tags that `tokenizer` registers as special: decoding with
    skip_special_tokens=True (as TRL does before rewards see a completion) deletes them."""
    template = resolve(template)
    return [token for token in template.reasoning_tokens if token in tokenizer.all_special_tokens]


def install(
    tokenizer,
    template: TemplateLike,
    variant: str = "training",
    add_missing_tokens: bool = False,
) -> list[str]:
    """Set `tokenizer.chat_template` and its reply parser, and report the control tokens the tokenizer lacks.

    Returns the template's control tokens that are not single tokens of the tokenizer. By default
    they are only reported: adding tokens grows the vocabulary, and the model's embeddings must then
    be resized (`model.resize_token_embeddings(len(tokenizer))`), so it is the caller's explicit
    choice. With `add_missing_tokens=True` they are added (control tokens as special tokens, reasoning
    tags as ordinary ones, as the SmolLM3 and Qwen3 tokenizers have them), for a template that writes
    `bos_token` the tokenizer's bos_token is set to it, and the list says what was added.

    The training variant is installed by default: it renders exactly the same text as the inference
    variant, and a checkpoint saved with it supports `assistant_only_loss` in TRL without a swap.

    `tokenizer.response_template` is set to the parser of the template's replies (None for a template
    of unknown format): TRL's GRPO and distillation trainers read tool calls with it, and TRL's
    `add_response_schema` recognises only TRL's own template files. It is the new-style attribute that
    transformers >= 5.13 reads; TRL warns about the legacy `response_schema` there.
    """
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"install(tokenizer, template): the tokenizer argument must be a tokenizer (it is changed in "
                        f"place), got {type(tokenizer).__name__} {str(tokenizer)[:60]!r}")
    template = resolve(template)
    if variant not in ("training", "inference"):
        raise ValueError(f"variant must be 'training' or 'inference', got {variant!r}")
    missing = missing_tokens(tokenizer, template)
    bos_mismatch = template.bos_token is not None and tokenizer.bos_token != template.bos_token
    if add_missing_tokens:
        control = [token for token in missing if token not in template.reasoning_tokens]
        reasoning = [token for token in missing if token in template.reasoning_tokens]
        if control:
            tokenizer.add_special_tokens({"extra_special_tokens": control}, replace_extra_special_tokens=False)
        if reasoning:
            tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in reasoning])
        if bos_mismatch:
            tokenizer.bos_token = template.bos_token
    elif bos_mismatch:
        raise ValueError(
            f"template {template.name} writes bos_token {template.bos_token!r} but the tokenizer's bos_token is "
            f"{tokenizer.bos_token!r}; pass add_missing_tokens=True or set tokenizer.bos_token"
        )
    tokenizer.chat_template = template.training if variant == "training" else template.inference
    tokenizer.response_template = template.response_template
    return missing


def load_tokenizer(path: str | os.PathLike, template: TemplateLike | None = None, *, add_missing_tokens: bool = True,
                   pad: bool = True, fallback: str | None = None,
                   **kwargs) -> tuple[PreTrainedTokenizerBase, list[str]]:
    """A checkpoint's tokenizer for a training stage, with `template`'s training variant installed (None: the
    tokenizer keeps its own template; `fallback` is installed where it has none, e.g. a pretrained base model
    entering SFT); returns (tokenizer, the tokens added to it).

    `add_missing_tokens=False`: a template whose control tokens the tokenizer lacks is an error naming them (the
    stages whose tokenizer is shared with a vLLM engine or a teacher cannot grow it). `pad`: add a distinct
    `<|pad|>` when the tokenizer has no pad token: SFT masks padding out of loss and attention, and a pad equal to
    the end of turn would be confused with a real one; a reward model reads its score at the last non-pad token,
    which a pad equal to eos would move off a reply ending in eos. `kwargs` go to AutoTokenizer.from_pretrained
    (e.g. padding_side)."""
    from transformers import AutoTokenizer  # imported here: it imports torch, seconds for `import chat_templates`

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    added = []
    if template is None and not tokenizer.chat_template and fallback is not None:
        print(f"{path} has no chat template: installing {fallback!r} (set chat_template to choose another)", flush=True)
        template = fallback
    if template is not None:
        added = install(tokenizer, template, variant="training", add_missing_tokens=add_missing_tokens)
        if added and not add_missing_tokens:
            raise ValueError(f"chat_template {resolve(template).name!r} needs tokens the tokenizer of {path} lacks: "
                             f"{added}; this stage cannot add tokens (its vLLM engine or teacher shares the "
                             f"vocabulary): use the template the checkpoint was fine-tuned with (chat_template: null)")
    if pad and tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        added.append("<|pad|>")
    return tokenizer, added


def end_of_turn(tokenizer) -> str | None:
    """The token that ends an assistant turn in the tokenizer's chat template (None without one): what generation
    stops on first."""
    return from_tokenizer(tokenizer).end_of_turn if tokenizer.chat_template else None


def diff(
    a: TemplateLike,
    b: TemplateLike,
    messages: list[dict],
    add_generation_prompt: bool = False,
    **render_kwargs,
) -> str:
    """A unified diff of how two templates render `messages`, trained spans marked ⟦ ⟧; "" when identical.

        >>> print(ct.diff("chatml", "qwen3", messages))
        >>> print(ct.diff("qwen3", "my_checkpoint/", messages, enable_thinking=False))
    """
    renders = []
    for template in (a, b):
        template = resolve(template)
        text, spans = render_spans(messages, template, add_generation_prompt, **render_kwargs)
        renders.append((template.name, mark_spans(text, spans)))
    (name_a, text_a), (name_b, text_b) = renders
    if name_a == name_b:
        name_a, name_b = f"a: {name_a}", f"b: {name_b}"
    lines = difflib.unified_diff(
        text_a.splitlines(keepends=True), text_b.splitlines(keepends=True), fromfile=name_a, tofile=name_b
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def mark_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with ⟦ ⟧ around each trained span."""
    pieces, at = [], 0
    for start, end in spans:
        pieces += [text[at:start], TRAINED_OPEN, text[start:end], TRAINED_CLOSE]
        at = end
    return "".join(pieces) + text[at:]


# Two shades per kind, alternating per token so token boundaries stay visible.
_TRAINED_STYLES = ("\x1b[30;42m", "\x1b[30;102m")  # black on green / bright green
_PROMPT_STYLES = ("\x1b[2m", "\x1b[2;4m")  # dim / dim underlined
_RESET = "\x1b[0m"
# Plain-text markers where colours are not available (a file, a log, a notebook, NO_COLOR): ⟦ ⟧ around
# trained runs and ¦ between tokens (a newline token ends its line, which marks that boundary already).
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"
TOKEN_SEPARATOR = "¦"


def format_tokens(tokens: list[str], mask: list[int], color: bool) -> str:
    """Tokens as text with the trained ones highlighted (colour) or bracketed in ⟦ ⟧ (plain), and each
    token boundary visible: alternating shades in colour, ¦ in plain text."""
    pieces = []
    in_trained = False
    for i, (token, trained) in enumerate(zip(tokens, mask)):
        token = token.replace("\n", "↵\n")  # newlines visible, line structure kept
        if color:
            styles = _TRAINED_STYLES if trained else _PROMPT_STYLES
            pieces.append(f"{styles[i % 2]}{token}{_RESET}")
            continue
        if not trained and in_trained:
            pieces.append(TRAINED_CLOSE)
        if i and not pieces[-1].endswith("\n"):
            pieces.append(TOKEN_SEPARATOR)
        if trained and not in_trained:
            pieces.append(TRAINED_OPEN)
        in_trained = bool(trained)
        pieces.append(token)
    if in_trained and not color:
        pieces.append(TRAINED_CLOSE)
    legend = "trained: green" if color else f"trained: {TRAINED_OPEN}...{TRAINED_CLOSE}, tokens split by {TOKEN_SEPARATOR}"
    return "".join(pieces) + f"\n-- {_summary(mask)}; {legend}"


def format_token_ids(ids: list[int], tokens: list[str], mask: list[int]) -> str:
    """One token per line: position, id, T where trained, and the token's text (repr, so whitespace shows)."""
    lines = [f"{'pos':>5} {'id':>7}   token"]
    lines += [f"{i:>5} {token_id:>7} {'T' if trained else ' '} {token!r}"
              for i, (token_id, token, trained) in enumerate(zip(ids, tokens, mask))]
    return "\n".join(lines) + f"\n-- {_summary(mask)}; T: trained"


def _summary(mask: list[int]) -> str:
    n_trained = sum(mask)
    return f"{len(mask)} tokens, {n_trained} trained ({100 * n_trained / max(len(mask), 1):.0f}%)"


def show(
    messages: list[dict],
    tokenizer,
    template: TemplateLike | None = None,
    file: TextIO | None = None,
    color: bool | None = None,
    ids: bool = False,
    **render_kwargs,
) -> None:
    """Print the tokens of `messages` with the trained span highlighted and token boundaries visible.

    Colours when writing to a terminal (and NO_COLOR is unset), ⟦ ⟧ around trained tokens and ¦ between
    tokens otherwise; `color=` forces either. `ids=True` prints one token per line with its id instead.
    `tokenizer` may be a tokenizer directory; `render_kwargs` go to `assistant_mask` (enable_thinking,
    tools, ...).
    """
    tokenizer = as_tokenizer(tokenizer, "show(messages, tokenizer, template)")
    file = sys.stdout if file is None else file
    if color is None:
        color = file.isatty() and "NO_COLOR" not in os.environ
    token_ids, mask = assistant_mask(messages, tokenizer, template, **render_kwargs)
    tokens = [tokenizer.decode([token_id]) for token_id in token_ids]
    text = format_token_ids(token_ids, tokens, mask) if ids else format_tokens(tokens, mask, color)
    print(text, file=file)
