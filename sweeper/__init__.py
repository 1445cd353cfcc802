"""Everything across trials: search spaces, Ray Tune sweeps, MLflow tracking, analysis, CLI."""
