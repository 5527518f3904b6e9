"""A/B experiments: the record of answers and their feedback, the statistics that decide, the bandit."""
