"""Evaluation: error rates (phonemes and words), bootstrap intervals, score tables, submission CSV.

- :mod:`b2txt.evaluation.error_rates` — edit distance, per-trial tables and aggregate rates;
- :mod:`b2txt.evaluation.reports` — the score files of a split and the competition CSV.
"""
