"""Issue 13: the shipped chat templates pass TRL 1.16's own template checks as they are, with our
pretraining tokenizer and with a tokenizer that merges "\\n\\n" the way the Qwen and Llama 3 tokenizers
do; TRL's GRPO trainer builds with tools on each template that has a tool format; each finding of the
issue is a test here (F1-F9), and each check that finds it is tested on a template broken that way.

Nothing is downloaded: both tokenizers are trained here, the model is the tiny core preset.
"""

import copy
import io
import logging
import warnings

import jinja2
import pytest
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from trl.chat_template_utils import (
    get_training_chat_template,
    is_chat_template_prefix_preserving,
    is_chat_template_stop_token_trained,
    parse_response,
    supports_tool_calling,
)

import chat_templates as ct
from core import SmolForgeConfig, SmolForgeForCausalLM
from test_chat_templates import CONVERSATIONS, TOOLS, build_tokenizer, trained_runs

TOOL_TEMPLATES = ("smollm3", "qwen3")  # the shipped templates with a tool format
# The pre-tokenizer regex of the Qwen2/Qwen3 tokenizers (Llama 3's differs only in digit grouping): runs of
# newlines are one pre-token (`\s*[\r\n]+`), so BPE merges "\n\n" into one token.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CONTROL = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def merging_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    bpe.decoder = decoders.ByteLevel()
    corpus = ["Paragraph one.\n\nParagraph two.\n\nThe capital is Fredville.\n\n\nA list:\n- one\n- two\n"] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)
    tokenizer.add_special_tokens({"extra_special_tokens": CONTROL})
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dir):
    """name -> (tokenizer with no template installed): ours from pretrain/tokenizer.py, and a merging one."""
    merging = merging_tokenizer()
    assert "ĊĊ" in merging.tokenize("assistant\n\nHi"), "the merging tokenizer must merge \\n\\n"
    return {"ours": AutoTokenizer.from_pretrained(tokenizer_dir), "merging": merging}


def installed(tokenizers, kind: str, name: str):
    tokenizer = copy.deepcopy(tokenizers[kind])
    ct.install(tokenizer, name, add_missing_tokens=True)
    return tokenizer


@pytest.mark.parametrize("kind", ["ours", "merging"])
@pytest.mark.parametrize("name", ct.SHIPPED_NAMES)
def test_trl_accepts_every_shipped_template_as_it_is(name, kind, tokenizers):
    tokenizer = installed(tokenizers, kind, name)
    assert supports_tool_calling(tokenizer) == (name in TOOL_TEMPLATES)
    if name in TOOL_TEMPLATES:
        assert is_chat_template_prefix_preserving(tokenizer)
    else:
        # TRL's prefix check renders a tool call, which chatml and llama3 refuse loudly; TRL's GRPO and
        # distillation refuse tools on them before that (supports_tool_calling), and without tools never run it.
        with pytest.raises(jinja2.TemplateError, match="no tool-call format"):
            is_chat_template_prefix_preserving(tokenizer)
    assert is_chat_template_stop_token_trained(tokenizer)
    assert get_training_chat_template(tokenizer) is None  # TRL leaves our template alone
    # The reply parser install set reads a rendered reply back (GRPO parses completions this way).
    messages = CONVERSATIONS["tool calls"][:2] if name in TOOL_TEMPLATES else CONVERSATIONS["two turns"]
    tools = TOOLS if name in TOOL_TEMPLATES else None
    prompt_ids = ct.encode(messages[:1], tokenizer, name, add_generation_prompt=True, tools=tools)
    ids = ct.encode(messages, tokenizer, name, tools=tools)
    parsed = parse_response(tokenizer, ids[len(prompt_ids) :], prefix=prompt_ids, tools=tools)
    assert parsed["content"] == messages[1]["content"]
    expected_calls = [{**call["function"], "arguments": dict(a=1, b=2) if i == 0 else dict(a=3, b=4)}
                      for i, call in enumerate(messages[1].get("tool_calls") or [])]
    assert [call["function"] for call in parsed.get("tool_calls", [])] == expected_calls
    assert ct.check(name, tokenizer) == []
    assert ct.check(tokenizer) == []


def lookup_capital(country: str) -> str:
    """Return the capital city of a country.

    Args:
        country: The country's name.
    """
    return "Fredville"


def grpo_trainer(tokenizer, tmp_path, tools):
    model = SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer)))
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=8, report_to="none", use_cpu=True, logging_steps=1)
    prompts = [[{"role": "user", "content": "What is the capital of Freedonia?"}]] * 2
    return GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                       train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer, tools=tools)


@pytest.mark.parametrize("name", TOOL_TEMPLATES)
def test_grpo_with_a_tool_builds_on_each_template_with_tools(name, tokenizers, tmp_path):
    tokenizer = installed(tokenizers, "ours", name)
    trainer = grpo_trainer(tokenizer, tmp_path, tools=[lookup_capital])
    assert trainer.chat_template is None  # prefix-preserving: TRL keeps our template
    assert tokenizer.response_template == ct.load(name).response_template  # TRL did not replace the parser
    # The tool-result suffix TRL appends after a tool call: exactly the rendered tool turn and the next header.
    suffix = trainer._get_tool_suffix_ids([{"role": "tool", "name": "lookup_capital", "content": "Fredville"}])
    assert tokenizer.decode(suffix).startswith("<|im_start|>user\n<tool_response>\nFredville\n</tool_response><|im_end|>")


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_grpo_with_a_tool_is_refused_loudly_on_templates_without_tools(name, tokenizers, tmp_path):
    tokenizer = installed(tokenizers, "ours", name)
    with pytest.raises(ValueError, match="does not support tool calling"):
        grpo_trainer(tokenizer, tmp_path, tools=[lookup_capital])


# -- each finding, and the check that finds it in a template broken that way --------------------------------

QWEN3_THINK_TURN = """            {%- generation %}
            {{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') + calls + '<|im_end|>' }}
            {%- endgeneration %}"""


def edited(source: str, old: str, new: str) -> ct.ChatTemplate:
    assert source.count(old) == 1, old
    return ct.from_source(source.replace(old, new), name="edited")


def qwen3_original_rule() -> ct.ChatTemplate:
    """Our qwen3 with Qwen 3's own rule: only the last turn (or one with reasoning) gets its think block and
    is trained; earlier turns are re-rendered without it."""
    return edited(ct.load("qwen3").training, QWEN3_THINK_TURN, """            {%- if loop.last or reasoning %}
""" + QWEN3_THINK_TURN + """
            {%- else %}
            {{- content + calls + '<|im_end|>' }}
            {%- endif %}""")


def test_f1_qwen3_is_prefix_preserving_history_keeps_its_think_block(tokenizers):
    messages = CONVERSATIONS["reasoning"]
    text = ct.render(messages, "qwen3")
    assert "<think>\nThe atlas says so.\n</think>\n\nFredville.<|im_end|>" in text
    assert text.startswith(ct.render(messages[:2], "qwen3"))
    tokenizer = copy.deepcopy(tokenizers["ours"])
    ct.install(tokenizer, qwen3_original_rule())
    assert not is_chat_template_prefix_preserving(tokenizer)
    codes = {f.code for f in ct.check(qwen3_original_rule(), tokenizers["ours"])}
    assert {"trl-not-prefix-preserving", "trl-template-replaced"} <= codes


def test_f2_install_sets_a_reply_parser_for_every_template(tokenizers):
    for name in ct.SHIPPED_NAMES:
        tokenizer = installed(tokenizers, "ours", name)
        assert tokenizer.response_template is not None, name
    no_parser = ct.from_source(ct.load("qwen3").training.replace("Qwen 3 (smolforge)", "my template"))
    assert no_parser.response_template is None
    assert "no-response-parser" in {f.code for f in ct.check(no_parser, tokenizers["ours"])}


def test_f3_every_turn_of_a_multi_step_tool_conversation_is_trained(tokenizers):
    tokenizer = installed(tokenizers, "ours", "qwen3")
    ids, mask = ct.assistant_mask(CONVERSATIONS["tool calls"], tokenizer, tools=TOOLS)
    runs = [tokenizer.decode(run) for run in trained_runs(ids, mask)]
    assert len(runs) == 2 and runs[0].startswith("<think>\n\n</think>\n\n<tool_call>")
    assert "untrained-turn" in {f.code for f in ct.check(qwen3_original_rule())}


def test_f4_sft_trainer_does_not_warn_that_the_end_of_turn_is_untrained(tokenizers, tmp_path, caplog):
    tokenizer = installed(tokenizers, "ours", "qwen3")
    model = SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer)))
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, report_to="none", use_cpu=True,
                     max_length=128)
    data = Dataset.from_dict({"messages": [CONVERSATIONS["system, multi-turn, untrimmed"]] * 2})
    with caplog.at_level(logging.WARNING):
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert trainer.chat_template is None
    assert not [r for r in caplog.records if "end-of-turn token" in r.getMessage()]
    assert "trl-stop-token-untrained" in {f.code for f in ct.check(qwen3_original_rule(), tokenizers["ours"])}


def test_f5_qwen3_refuses_reasoning_without_thinking():
    with pytest.raises(jinja2.TemplateError, match="reasoning under enable_thinking=false"):
        ct.render(CONVERSATIONS["reasoning"], "qwen3", enable_thinking=False)
    with pytest.raises(jinja2.TemplateError, match="reasoning under enable_thinking=false"):
        ct.render(CONVERSATIONS["inline think"], "qwen3", enable_thinking=False)
    trains_it = edited(ct.load("qwen3").training, """            {%- if reasoning.strip() %}
                {{- raise_exception('assistant message ' ~ loop.index0 ~ ' has reasoning under enable_thinking=false; drop its reasoning or render with enable_thinking=true') }}
            {%- endif %}
            {{- '<think>\\n\\n</think>\\n\\n' }}
            {%- generation %}
            {{- content.lstrip('\\n') + calls + '<|im_end|>' }}""", """            {{- '<think>\\n\\n</think>\\n\\n' }}
            {%- generation %}
            {{- ('<think>\\n' + reasoning + '\\n</think>\\n\\n' if reasoning else '') + content.lstrip('\\n') + calls + '<|im_end|>' }}""")
    assert "reasoning-in-no-think" in {f.code for f in ct.check(trains_it)}


CHATML_NEWLINE = "        {%- set content = content.lstrip('\\n') %}\n"


def test_f6_chatml_reply_starting_with_a_newline_keeps_generation_prompt_ids_a_prefix(tokenizers):
    tokenizer = installed(tokenizers, "merging", "chatml")
    messages = [CONVERSATIONS["two turns"][0], {"role": "assistant", "content": "\n\nFredville."}]
    prompt_ids = ct.encode(messages[:1], tokenizer, "chatml", add_generation_prompt=True)
    ids, mask = ct.assistant_mask(messages, tokenizer, "chatml")
    assert ids[: len(prompt_ids)] == prompt_ids and 1 not in mask[: len(prompt_ids)]
    assert tokenizer.decode(trained_runs(ids, mask)[0]) == "Fredville.<|im_end|>"
    keeps_newline = edited(ct.load("chatml").training, CHATML_NEWLINE, "")
    codes = {f.code for f in ct.check(keeps_newline, tokenizer)}
    assert {"header-in-span", "generation-prompt-mismatch"} <= codes
    assert ct.check(keeps_newline, tokenizers["ours"]) == []  # only a merging tokenizer shows it


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_f7_templates_without_reasoning_refuse_reasoning_content(name):
    with pytest.raises(jinja2.TemplateError, match="no reasoning format"):
        ct.render(CONVERSATIONS["reasoning"], name)
    ct.render([*CONVERSATIONS["two turns"][:1], {"role": "assistant", "content": "Hi.", "reasoning_content": ""}], name)
    source = ct.load(name).training
    refusal = source[source.index("    {%- if message.reasoning_content is string"):]
    refusal = refusal[: refusal.index("{%- endif %}\n") + len("{%- endif %}\n")]
    assert "reasoning-dropped" in {f.code for f in ct.check(edited(source, refusal, ""))}


# -- F8: the REPL ----------------------------------------------------------------------------------------

def test_f8_every_form_of_template_is_accepted(tokenizers, tmp_path):
    messages = CONVERSATIONS["two turns"]
    tokenizer = installed(tokenizers, "ours", "qwen3")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "mine.jinja").write_text(ct.load("qwen3").training)
    expected = ct.render(messages, "qwen3")
    for template in ["qwen3", ct.load("qwen3").training, tmp_path / "mine.jinja", str(tmp_path / "mine.jinja"),
                     tokenizer, tmp_path / "ckpt", str(tmp_path / "ckpt"), ct.load("qwen3")]:
        assert ct.render(messages, template) == expected, template
        assert ct.check(template) == [], template
    assert ct.check(tmp_path / "ckpt") == []  # with the directory's tokenizer: token-level and TRL checks run
    with pytest.raises(TypeError, match="the tokenizer argument must be a tokenizer"):
        ct.show(messages, "qwen3", tokenizer)  # template and tokenizer swapped
    with pytest.raises(TypeError, match="a chat template must be"):
        ct.render(messages, 42)


def test_f8_diff_between_two_templates():
    messages = CONVERSATIONS["system, multi-turn, untrimmed"]
    assert ct.diff("qwen3", ct.load("qwen3").training, messages) == ""
    text = ct.diff("chatml", "qwen3", messages)
    assert text.startswith("--- chatml\n+++ qwen3\n")
    assert "-⟦Fredville. <|im_end|>⟧\n" in text and "+⟦<think>\n" in text


def test_f8_show_token_ids_and_boundaries_outside_a_terminal(tokenizers):
    tokenizer = installed(tokenizers, "ours", "chatml")
    messages = CONVERSATIONS["two turns"]
    out = io.StringIO()
    ct.show(messages, tokenizer, file=out, ids=True)
    ids, mask = ct.assistant_mask(messages, tokenizer)
    rows = out.getvalue().splitlines()[1:-1]
    assert [int(row.split()[1]) for row in rows] == ids
    assert [row.split()[2] == "T" for row in rows] == [bool(m) for m in mask]
    plain = io.StringIO()
    ct.show(messages, tokenizer, file=plain)
    tokens = [tokenizer.decode([token_id]) for token_id in ids]
    boundaries = sum(not token.endswith("\n") for token in tokens[:-1])  # a newline token ends its line instead
    body = plain.getvalue().rsplit("\n-- ", 1)[0]  # without the legend line
    assert body.count(ct.template.TOKEN_SEPARATOR) == boundaries > 10


@pytest.mark.parametrize("messages, error, match", [
    ({"role": "user", "content": "Hi"}, TypeError, "got one dict"),
    ([{"content": "Hi"}], ValueError, r"messages\[0\] has no 'role'"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 42}], TypeError,
     r"messages\[1\]\['content'\] must be a string.*got int 42"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], TypeError, r"messages\[0\]\['content'\]\[0\]\['text'\]"),
    (["Hi"], TypeError, r"messages\[0\] must be a dict"),
])  # fmt: skip
def test_f8_malformed_messages_name_the_index_and_field(messages, error, match, tokenizers):
    for name in ct.SHIPPED_NAMES:
        with pytest.raises(error, match=match):
            ct.render(messages, name)
    with pytest.raises(error, match=match):
        ct.assistant_mask(messages, installed(tokenizers, "ours", "qwen3"))


@pytest.mark.parametrize("name", ct.SHIPPED_NAMES)
def test_f8_empty_assistant_content_warns_and_unknown_roles_are_refused_by_every_template(name):
    for empty in ("", None, "  "):
        with pytest.warns(UserWarning, match=r"messages\[1\] is an assistant turn with empty content"):
            ct.render([CONVERSATIONS["two turns"][0], {"role": "assistant", "content": empty}], name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tool-call turn with empty content is fine
        if name in TOOL_TEMPLATES:
            ct.render(CONVERSATIONS["tool calls"], name, tools=TOOLS)
    with pytest.raises(jinja2.TemplateError, match="message 1 has role narrator"):
        ct.render([CONVERSATIONS["two turns"][0], {"role": "narrator", "content": "Meanwhile."}], name)


@pytest.mark.parametrize("name", ["qwen3", "smollm3"])
def test_f8_enable_thinking_must_be_a_bool(name, tokenizers):
    user = CONVERSATIONS["two turns"][:1]
    with pytest.raises(TypeError, match="enable_thinking must be True, False or None"):
        ct.render(user, name, add_generation_prompt=True, enable_thinking="false")
    tokenizer = installed(tokenizers, "ours", name)  # the template itself refuses it on any path (SFT rows, TRL)
    with pytest.raises(jinja2.TemplateError, match="enable_thinking must be true or false"):
        tokenizer.apply_chat_template(user, add_generation_prompt=True, enable_thinking="false", tokenize=False)


def test_f8_llama3_bos_is_the_same_in_render_encode_mask_and_show():
    tokenizer = build_tokenizer(special_tokens=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                                "<|eot_id|>"])
    tokenizer.bos_token = None  # a tokenizer that does not name the template's BOS
    messages = CONVERSATIONS["two turns"]
    ids = ct.encode(messages, tokenizer, "llama3")
    assert ct.assistant_mask(messages, tokenizer, "llama3")[0] == ids
    assert tokenizer.decode(ids).startswith("<|begin_of_text|>")
    assert ct.render(messages, "llama3").startswith("<|begin_of_text|>")
    out = io.StringIO()
    ct.show(messages, tokenizer, "llama3", file=out, ids=True)
    assert [int(row.split()[1]) for row in out.getvalue().splitlines()[1:-1]] == ids


def test_f9_one_source_per_template_and_identical_renders():
    files = sorted(path.name for path in ct.template.TEMPLATE_DIR.glob("*.jinja"))
    assert files == sorted(f"{name}_training.jinja" for name in ct.SHIPPED_NAMES)
    for name in ct.SHIPPED_NAMES:
        template = ct.load(name)
        assert ct.template.GENERATION_TAG.search(template.training)
        assert "endgeneration" not in template.inference and not ct.template.GENERATION_TAG.search(template.inference)
