"""Experiments on live traffic: feedback records, the statistics that decide, and the bandit split."""
