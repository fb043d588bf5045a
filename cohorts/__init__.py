"""Cohort mining (installed as c2al.cohorts)."""
