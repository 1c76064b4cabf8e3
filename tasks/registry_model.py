"""MLflow pyfunc wrapper for a CAFM/FM generator, logged as "model from code" (no pickle).

Loaded with ``mlflow.pyfunc.load_model(uri)`` or served with ``mlflow models serve``;
``predict`` takes a table with columns ``label`` (int, optional: else the classes in turn)
and ``seed`` (int, optional; the first row's seeds the whole request) and optional params
``nfe``, ``method``, ``cfg_scale``, and returns one flattened sample per row (values in
[-1, 1]). The project itself never loads this file to evaluate or generate: it reads the
weights from the logged checkpoint (``tasks.registry_evaluation.load_registered_generator``).
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class CAFMGenerator(PythonModel):
    def load_context(self, context) -> None:
        from cafm_core.checkpoint import load_model

        self.model = load_model(context.artifacts["checkpoint"])
        self.model.eval()

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        from cafm_core.samplers import generate

        params = params or {}
        count = len(model_input)
        labels = None
        if getattr(self.model, "null_class", None) is not None:
            if "label" in model_input and not model_input["label"].isna().any():
                labels = torch.as_tensor(np.asarray(model_input["label"], dtype=np.int64))
            else:  # no labels given: cycle through the classes
                labels = torch.arange(count) % self.model.config.num_classes
        seed = int(model_input["seed"].iloc[0]) if "seed" in model_input and not model_input["seed"].isna().any() else 0
        samples = generate(
            self.model,
            num_samples=count,
            sample_shape=tuple(self.model.config.sample_shape),
            labels=labels,
            nfe=int(params.get("nfe", 32)),
            method=str(params.get("method", "heun")),
            cfg_scale=float(params.get("cfg_scale", 1.0)),
            null_class=getattr(self.model, "null_class", None),
            seed=seed,
        )
        return samples.reshape(count, -1).numpy()


mlflow.models.set_model(CAFMGenerator())
