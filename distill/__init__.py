"""On-policy distillation: a student learns from a teacher's next-token distributions on its own samples
(TRL's DistillationTrainer, with GKD's on-policy fraction and an off-policy baseline). See distill/train.py."""
