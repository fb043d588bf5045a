"""c2al: cohort-contrastive auxiliary learning for TorchRec models.

`models/` and `cohorts/` live at the top level of the repository but install as
`c2al.models` and `c2al.cohorts`, so nothing generic lands in site-packages.
torch, fbgemm and torchrec are installed by the Makefile (pinned, torchrec with
--no-deps); see requirements.txt and requirements-nodeps.txt.
"""
from setuptools import setup

setup(
    name="c2al",
    version="0.1.0",
    description="Cohort-contrastive auxiliary learning (C2AL) for TorchRec recommendation models",
    python_requires=">=3.10",
    packages=["c2al", "c2al.data", "c2al.dist", "c2al.eval", "c2al.train", "c2al.jobs", "c2al.federated", "c2al.models", "c2al.cohorts"],
    package_dir={"c2al": "c2al", "c2al.models": "models", "c2al.cohorts": "cohorts"},
    install_requires=["numpy", "scikit-learn", "pandas", "tqdm"],
    extras_require={"parquet": ["pyarrow"], "plot": ["matplotlib"], "flower": ["flwr[simulation]==1.41.*"]},
)
