"""Everything one trial needs: config, data, scenarios, models, attacks, methods, metrics.

No Ray import here except in trial.py's thin adapter.
"""
