"""Self-contained inference code: raw hourly data in, forecasts out, for every model type.

Hand-written because no library holds our feature pipeline. This package is the single source of
the inference path. Training imports it as ``aqimodels.training.runtime``; every registered model
ships a copy of it (MLflow ``code_paths``) under the top-level name :data:`SHIPPED_NAME`, loaded by
the model's code file (MLflow models-from-code, ``mlflow_model_code.py``). Therefore every module
here uses only relative imports among themselves and third-party libraries (numpy, pandas, mlflow,
and xgboost, torch, torch-geometric where a model type needs them) — never ``aqimodels.*`` except
the optional error base class in ``errors.py`` — so that ``mlflow.pyfunc.load_model`` works in
a process where aqimodels is not installed.
"""

SHIPPED_NAME = "aqi_forecast_runtime"
"""The package name of the copy shipped inside each model (``code/aqi_forecast_runtime``)."""

FORMAT = "aqimodels-portable-v1"
"""The ``format`` value in a portable model's ``state/manifest.json``."""
