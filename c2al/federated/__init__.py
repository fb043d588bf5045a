"""Federated C2AL: cross-device simulation, Flower-shaped strategies, federated cohort mining.

`aggregate` (pure maths) <- `strategy` (configure/aggregate hooks) and
`client` (local steps through `c2al.train.task`) <- `simulation` (the in-process
engine) / `flower` (the same logic as a Flower ClientApp/ServerApp) <- `run`
(train.py --federated). `heterogeneity` models device tiers, `mining` the
federated cohort miner.
"""
