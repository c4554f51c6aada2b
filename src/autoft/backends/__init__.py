"""Search backends: each runs trials that Optuna suggests and records them in the Optuna study."""
