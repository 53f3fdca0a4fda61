"""Embedded RL tasks generated locally (no downloads); see :mod:`megacov.tasks.explore`."""
