"""Stage eval: metrics of the adapted model, the base model and TF-IDF on one test split; report and verdicts."""
