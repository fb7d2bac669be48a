"""Built-in tasks: modules that trainer.task loads by name."""
