"""wdx: the library behind train_loop.py, by stage: data/, model/, scoring/, train/, deploy/
(demo/ apart); wdx.config holds every setting, and wdx.{evaluate,transcribe,pack,inspect,
export_ct2,study} are the `python -m wdx.X` commands."""

__version__ = "0.1.0"
