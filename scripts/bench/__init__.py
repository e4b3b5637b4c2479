"""The subcommands of scripts/benchmark.py, one module each; `common` holds what several share."""
