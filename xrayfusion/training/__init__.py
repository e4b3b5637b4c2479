"""Training: the one trainer recipe (main run and folds), the run's phases, callbacks, fine-tuning, resume,
checkpoints, sweeps; imports evaluation, models, fusion, data, tracking and core."""
