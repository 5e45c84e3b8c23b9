"""Supervised fine-tuning on chat data (TRL SFTTrainer).

    python -m sft --config recipes/tiny/sft.yaml [--field value ...]
    accelerate launch --multi_gpu --num_processes 2 -m sft --config recipes/tiny/sft.yaml   # DDP (gloo on CPU)
    accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml -m sft --config recipes/tiny/sft.yaml

See sft/config.py for every field, sft/data.py for data formats and checks, sft/train.py for the run.
"""

from core.infra import end_process_group

from .train import main

if __name__ == "__main__":
    main()
    end_process_group()  # every rank leaves the process group together (core/infra/__init__.py says why)
