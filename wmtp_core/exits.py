"""Every exit status of ``python -m wmtp_core.run`` and ``wmtp``, in one table (README.md,
"Exit status", says what each means to a user)."""

EXIT_OK = 0
"""Finished (or stopped early) and the final model is stored; a command that did what it says."""
EXIT_FAILED = 1
"""The run failed (a diverged loss, a save or storage that failed, a bug), or a command found
a problem (a checkpoint that does not verify)."""
EXIT_USAGE = 2
"""Something the user can fix: every error of the ``WmtpError`` family, one line on stderr."""
EXIT_NOT_REGISTERED = 3
"""Training finished and its resume state is committed, but the final model was not stored."""
EXIT_PREEMPTED = 4
"""Stopped by a signal after committing its last step: resumable."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT, unless it preempts): committed checkpoints are intact."""

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_NOT_REGISTERED", "EXIT_OK", "EXIT_PREEMPTED", "EXIT_USAGE"]
