"""A training run: the trainer loop and its run folder, the step (written once for every engine), its
schedules, optimizer, loss and metrics, and ``build`` (a run's models, engine and step from its config)."""
