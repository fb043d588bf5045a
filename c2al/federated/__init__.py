"""Federated C2AL: cross-device simulation, strategies in Flower's words, federated cohort mining.

`aggregate` (pure maths) <- `strategy` (configure_train / aggregate_train /
configure_evaluate / aggregate_evaluate hooks) and `client` (local steps through
`c2al.train.task`, with `optim`'s optimizers and SAM; `vectorized` runs many clients'
steps side by side) <- `rounds` (the one round body and the one early-stopping rule)
<- `simulation` (the in-process engine) / `flower` + `flower_strategy` (the same
rounds as a Flower ServerApp / ClientApp). `heterogeneity` simulates the devices
(availability, dropout, step budgets), `mining` is the federated cohort miner,
`attacks` the simulated poisoning, `losses` the two-tower hinge. train.py
--federated runs them through `c2al.jobs.federated_job`.
"""
