"""Launching fine-tuning: in this process, with torchrun, or as submitit jobs (local or SLURM)."""
