"""SFT through TRL's SFTTrainer, in process on tiny random models: packing isolation, gradient
accumulation invariance, the empty-mask guard, LoRA, added chat tokens, and transformers' own
Llama / Qwen3. The end-to-end stage (CLI, learning, resume, 2 processes, bad data) is in
tests/test_sft_stage.py."""

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          Qwen3Config, Qwen3ForCausalLM, TrainerCallback)

import chat_templates
from core import SmolForgeConfig, SmolForgeForCausalLM
from sft.config import SFTConfig
from core.arithmetic import reply
from sft.data import tag_reasoning_mode
from core.trainer_defaults import lora_config
from sft.train import EmptyMaskError, SFTTrainer, run


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert chat_templates.install(tok, "smollm3") == []  # the pretraining tokenizer reserves the chat tokens
    return tok


def core_model(vocab_size: int, seed: int = 0) -> SmolForgeForCausalLM:
    torch.manual_seed(seed)
    return SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=vocab_size))


def chats(lengths: list[int]) -> list[dict]:
    """One conversation per entry; the assistant reply has `n` reasoning sentences, so the trained
    spans have very different lengths (the case where per-micro-batch averaging is wrong)."""
    rows = []
    for i, n in enumerate(lengths):
        fact = (i % 10, "+", (3 * i) % 10)
        text = reply(fact, think=True).replace("<think>\n", "<think>\n" + "Add the digits. " * n)
        rows.append(tag_reasoning_mode({"messages": [{"role": "user", "content": f"What is {i % 10}+{(3 * i) % 10}?"},
                                                     {"role": "assistant", "content": text}]}))
    return rows


def config(tmp_path, **overrides) -> SFTConfig:
    args = dict(output_dir=str(tmp_path / "run"), max_length=512, per_device_train_batch_size=1, max_steps=1,
                learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                max_grad_norm=0.0, dataloader_drop_last=False)
    return SFTConfig(**{**args, **overrides})


def test_packed_document_logits_equal_the_document_alone(tmp_path, tokenizer):
    """Through the SFT data path: TRL's bfd packing, padding-free per-document position_ids."""
    rows = chats([6, 0])
    trainer = SFTTrainer(model=core_model(len(tokenizer)), args=config(tmp_path), processing_class=tokenizer,
                         train_dataset=Dataset.from_list(rows))
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # one packed row
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 2 and starts[0] == 0, "bfd should pack both conversations into one row"
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        for begin, end in zip(starts, starts[1:] + [batch["input_ids"].shape[1]]):
            alone = model(input_ids=batch["input_ids"][:, begin:end]).logits[0]
            torch.testing.assert_close(packed[begin:end], alone, rtol=1e-5, atol=1e-5)


class GradientGrab(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_batch_4_equals_batch_1_times_accumulation_4(tmp_path, tokenizer, packing):
    rows = chats([0, 9, 1, 5])  # uneven trained lengths
    lengths = [len(tokenizer.apply_chat_template(r["messages"], enable_thinking=True)["input_ids"]) for r in rows]
    # Packed: max_length fits the longest conversation but no two, so there are 4 rows either way.
    assert sorted(lengths)[0] + sorted(lengths)[1] > max(lengths)
    max_length = max(lengths) if packing else 512
    results = []
    for batch_size, accumulation in ((4, 1), (1, 4)):
        grab = GradientGrab()
        cfg = config(tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                     packing=packing, max_length=max_length, truncation=False)
        trainer = SFTTrainer(model=core_model(len(tokenizer)), args=cfg, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(rows), callbacks=[grab])
        assert len(trainer.train_dataset) == 4
        trainer.train()
        results.append((trainer.state.log_history[0]["loss"], grab.grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-7, msg=name)


def test_a_batch_with_an_empty_mask_is_an_error(tmp_path, tokenizer):
    trainer = SFTTrainer(model=core_model(len(tokenizer)), args=config(tmp_path), processing_class=tokenizer,
                         train_dataset=Dataset.from_list(chats([0])))
    batch = next(iter(trainer.get_train_dataloader()))
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(EmptyMaskError, match="no trainable token"):
        trainer.compute_loss(trainer.model, batch)


def test_lora_trains_only_adapters_and_merges(tmp_path, tokenizer):
    cfg = config(tmp_path, use_peft=True, lora_r=4, lora_alpha=8, max_steps=2, learning_rate=1e-2)
    model = core_model(len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SFTTrainer(model=model, args=cfg, processing_class=tokenizer, train_dataset=Dataset.from_list(chats([2, 3])),
                         peft_config=lora_config(cfg))
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    merged = trainer.model.merge_and_unload()
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, before[n])]
    assert any("q_proj" in n for n in changed) and not any("norm" in n for n in changed)


def plain_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE that knows text and <|endoftext|> only: no chat tokens, no pad."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"What is {a}+{b}? The sum of {a} and {b} is {a + b}." for a in range(10) for b in range(10)],
                            trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


HF_MODELS = {
    "llama": lambda vocab: LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                                        num_hidden_layers=2, num_attention_heads=2,
                                                        num_key_value_heads=1, max_position_embeddings=512)),
    "qwen3": lambda vocab: Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                                        num_hidden_layers=2, num_attention_heads=2, head_dim=32,
                                                        num_key_value_heads=1, max_position_embeddings=512)),
}


@pytest.mark.parametrize("arch", sorted(HF_MODELS))
def test_stage_on_transformers_architecture_adds_chat_tokens(tmp_path, arch):
    """The whole stage (sft.train.run) on a tiny random Llama / Qwen3 whose tokenizer lacks the chat
    tokens: they are added, the embeddings resized, and the tokenizer saved with its template."""
    tok = plain_tokenizer()
    torch.manual_seed(0)
    model = HF_MODELS[arch](len(tok))
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    cfg = config(tmp_path, model_name_or_path=str(tmp_path / "base"), chat_template="smollm3", max_steps=2,
                 per_device_train_batch_size=2, sources=[{"path": "builtin:arithmetic_chat", "max_rows": 8}])
    run(cfg)

    out = tmp_path / "run"
    saved_tok = AutoTokenizer.from_pretrained(out)
    assert saved_tok.chat_template == chat_templates.load("smollm3").training
    assert chat_templates.missing_tokens(saved_tok, "smollm3") == []
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert type(saved) is type(model)
    assert saved.get_input_embeddings().num_embeddings == len(saved_tok) == len(tok) + 5  # 4 chat tokens + pad
    assert saved.generation_config.eos_token_id[0] == saved_tok.convert_tokens_to_ids("<|im_end|>")
    original = model.state_dict()
    changed = [k for k, v in saved.state_dict().items() if k in original and v.shape == original[k].shape
               and not torch.equal(v, original[k])]
    assert len(changed) > len(original) // 2, "most weights should have been trained"
