"""``star-lightning tune``: the fastest Star configuration that keeps a target share of dense's accuracy.

:mod:`~star_lightning.tune.candidates` names the configurations tried and picks the winner;
:mod:`~star_lightning.tune.command` runs them through ``predict`` and ``plan`` and writes the config.
"""
