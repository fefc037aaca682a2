"""Training: Accelerate and DeepSpeed set-up, checkpoints, run directories, tracking, the
memory plan, the encoder cache, and the one-time set-up the loop calls."""
