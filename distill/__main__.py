"""On-policy distillation from a teacher (TRL DistillationTrainer).

    python -m distill --config recipes/tiny/distill.yaml [--field value ...]
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml --num_processes 2 -m distill --config recipes/tiny/distill.yaml

See distill/config.py for every field, distill/data.py for prompts, distill/train.py for the run.
"""

from core.infra import end_process_group

from .train import main

if __name__ == "__main__":
    main()
    end_process_group()  # every rank leaves the process group together (core/infra/__init__.py says why)
