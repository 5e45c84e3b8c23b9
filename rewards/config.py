"""EvaluateConfig: the options of `python -m rewards.evaluate` (parsed by core.recipe.parse_recipe).

Every field is a command-line flag of the same name and a key of an optional `--config` YAML.
Fields left as None take the suite's value (rewards/suites.py).
"""

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class EvaluateConfig:
    model_name_or_path: list[str] = field(metadata={
        "help": "Checkpoint directories (or hub ids) to evaluate, side by side: `--model_name_or_path A B` or "
                "`--model_name_or_path A --model_name_or_path B`."})
    output_dir: str = field(metadata={"help": "Where results.json and results.png are written (required: no "
                                              "default relative to the current directory)."})
    suite: str = field(default="arithmetic", metadata={"help": "Reward suite: arithmetic, gsm8k or math."})
    data_path: str | None = field(default=None, metadata={"help": "Local jsonl file for the gsm8k / math suites."})
    split: Literal["train", "test"] = field(default="test", metadata={
        "help": "Split of the built-in suite; `test` is held out from training."})
    max_examples: int | None = field(default=None, metadata={"help": "Evaluate only the first N rows."})
    num_samples: int | None = field(default=None, metadata={
        "help": "Samples per prompt (the k of pass@k). Default: the suite's. Must be 1 when temperature is 0."})
    temperature: float | None = field(default=None, metadata={
        "help": "Sampling temperature; 0 is greedy decoding. Default: the suite's."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (1.0: off)."})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "Completion length limit; a completion that reaches it without EOS counts as truncated."})
    backend: Literal["auto", "vllm", "transformers"] = field(default="auto", metadata={
        "help": "Generation backend: auto = vLLM when installed (colocated, in this process), else transformers."})
    use_chat_template: bool = field(default=True, metadata={
        "help": "Wrap each prompt as a user message in the tokenizer's chat template when it has one "
                "(a tokenizer without a template always gets the raw prompt)."})
    dtype: str = field(default="auto", metadata={
        "help": "Weights dtype for both backends: auto (as saved), float32, bfloat16 or float16."})
    seed: int = field(default=0, metadata={"help": "Sampling seed (both backends)."})
    batch_size: int = field(default=32, metadata={"help": "Prompts per transformers generate call."})
    vllm_kv_cache_memory_bytes: int = field(default=256 << 20, metadata={
        "help": "KV-cache size for vLLM. Explicit because on CPU vLLM's default reserves a fraction of host RAM "
                "(shared/FACTS.md: the default 0.92 fails)."})
    item_timeout_s: float = field(default=5.0, metadata={
        "help": "Hard wall-clock limit per graded answer (math-verify in worker processes)."})
