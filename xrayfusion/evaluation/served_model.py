"""The file MLflow logs as the pyfunc model (models-from-code: no pickled object in the logged model).

MLflow runs this file when it loads the model; the xrayfusion package travels with the model (code_paths).
"""

from mlflow.models import set_model

from xrayfusion.evaluation.pyfunc import EnsembleModel

set_model(EnsembleModel())
