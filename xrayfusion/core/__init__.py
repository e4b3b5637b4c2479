"""Shared helpers every layer may use: errors, names, the decision rule, runtime, eval mode, the entry wrapper."""
