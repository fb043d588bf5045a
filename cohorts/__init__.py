"""Cohort mining (installed as c2al.cohorts): candidate cohorts, contrast scores, selection."""
from c2al.cohorts.miner import CohortMiner, describe_cohorts

__all__ = ["CohortMiner", "describe_cohorts"]
