"""Training machinery shared by the recipes: optimizer, schedule, loop, checkpoints, logs."""
