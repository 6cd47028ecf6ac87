"""Run directories: making one, sharing it between the ranks and attempts of a job, its checkpoints."""
