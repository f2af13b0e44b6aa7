"""Errors the engine raises for problems the user can fix."""


class TrainingError(RuntimeError):
    """A run that cannot start or go on, with a message naming the cause and the fix."""
