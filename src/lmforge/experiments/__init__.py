"""Many runs at once: sweeps (Hydra, Optuna, W&B), benchmark suites and their reports, reproducing a run."""
