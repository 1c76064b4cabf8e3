"""cafm_core: flow matching and Continuous Adversarial Flow Model post-training.

Pure torch/numpy; knows nothing of orchestration, tracking or storage services.
"""

__version__ = "0.1.0"
