"""Orchestrators that drive stages: sweeps, the suite of corpora, the forgetting probe."""
