"""Cohort mining (installed as c2al.cohorts): candidate cohorts, contrast scores, selection.

Modules: `encoding` (the cohort feature space), `rules` (what a candidate's rule means),
`candidates` (clusters, axis buckets, tree conjunctions), `selection` (contrast and choice),
`describe` (traits), `persistence` (JSON + npz), `miner` (the CohortMiner estimator).
"""
from c2al.cohorts.describe import describe_cohorts
from c2al.cohorts.miner import CohortMiner

__all__ = ["CohortMiner", "describe_cohorts"]
