"""Evaluation: the one inference path, metrics, evaluate, compare, predict on files, Grad-CAM, plots, the test report,
the served pyfunc model; imports models, fusion, data, tracking and core."""
