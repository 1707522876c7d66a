"""Fine-tuning Moshi with TTT: config, loss, model building, FSDP2, DCP checkpoints, monitoring, the loop."""
