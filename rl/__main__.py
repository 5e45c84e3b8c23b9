"""Online RL: GRPO (TRL GRPOTrainer) with verifiable rewards and vLLM rollouts, colocated or served.

    python -m rl --config recipes/tiny/grpo.yaml [--field value ...]
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml --num_processes 2 -m rl \\
        --config recipes/tiny/grpo.yaml                                # DDP (gloo on CPU), one engine per rank

    # served: the vLLM server in its own process (own GPUs on a GPU node), the trainer over HTTP
    python -m rl.serve --model_name_or_path out/tiny/sft --port 8000 &
    python -m rl --config recipes/tiny/grpo.yaml --vllm_mode server --vllm_server_host 127.0.0.1 \
        --vllm_server_port 8000 --output_dir out/tiny/grpo-served

Recipe knobs (rl/config.py): prompts from `suite:` or `sources:`; `reward_funcs` by name with TRL's
`reward_weights`; learned reward models next to them (`reward_models: [{path: out/tiny/reward_model,
weight: 0.5, normalize: true}]`, or `{url: ...}` for a served one: rewards/reward_model_scorer.py); every TRL loss through `loss_type` (grpo, dr_grpo, dapo, bnpo, ...) and GSPO through
`importance_sampling_level: sequence`; `beta` > 0 for a KL term to a reference model; think /
no-think prompts through `chat_template_kwargs: {enable_thinking: ...}`; `use_peft` for LoRA;
`use_liger_kernel` on GPU.

Why the DAPO overlong penalty (`soft_overlong_punishment`, weight in `reward_weights`): the Smol
Training Playbook's RL chapter reports that naive GRPO on verifiable rewards learned to hack the
reward with length: completions grew towards the limit while accuracy did not improve, and a
truncated completion is scored like any other. DAPO (Yu et al. 2025) penalises length smoothly in
the last `soft_punish_cache` tokens before `max_completion_length`, so the policy is pushed back
before it hits the cut-off. The `length_hacking` alert (rl/rollouts.py) watches for the same failure.

Every deviation from TRL is listed in rl/train.py's docstring and core/vllm/trl.py's.
"""

from core.infra import end_process_group

from .train import main

if __name__ == "__main__":
    main()
    end_process_group()  # every rank leaves the process group together (core/infra/__init__.py says why)
