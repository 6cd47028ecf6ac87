"""Public checkpoints: whether the hub can be reached, reading a Hugging Face folder into a run, exporting one."""
