# The model code file of every portable aqimodels model (MLflow models-from-code). MLflow copies it
# into the model directory and runs it on load, after putting the model's code/ folder (holding
# the aqi_forecast_runtime package) on sys.path. It defines no logic of its own.
try:
    from aqi_forecast_runtime.model import PortableForecastModel
except ImportError:  # MLflow also runs this file while saving, inside aqimodels
    from aqimodels.training.runtime.model import PortableForecastModel
from mlflow.models import set_model

set_model(PortableForecastModel())
