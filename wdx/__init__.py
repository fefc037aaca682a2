"""wdx: the library behind train_loop.py (data, model set-up, collator, metrics, tools)."""

__version__ = "0.1.0"
