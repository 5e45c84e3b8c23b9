"""Preference optimisation: DPO / APO / IPO / ... (TRL DPOTrainer), KTO (TRL KTOTrainer), ORPO (TRL
experimental ORPOTrainer), one stage, the method chosen by the recipe's `method` field.

    python -m preference --config recipes/tiny/dpo.yaml [--field value ...]        # APO-zero, as SmolLM3
    python -m preference --config recipes/tiny/kto.yaml
    python -m preference --config recipes/tiny/orpo.yaml
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml --num_processes 2 -m preference \
        --config recipes/tiny/dpo.yaml                                             # DDP (gloo on CPU)

An interrupted run continues with `--resume_from_checkpoint true`. See preference/config.py for every
field, preference/data.py for data formats and checks, preference/train.py for the run.
"""

from core.infra import end_process_group

from .train import main

if __name__ == "__main__":
    main()
    end_process_group()  # every rank leaves the process group together (core/infra/__init__.py says why)
