"""Deployment: the CTranslate2 export (`export_ct2`) and faster-whisper with the domain token
(`faster_whisper`, run as `python -m wdx.deploy`). `final/` itself is written by training
(wdx.train.export).

`from wdx.deploy import DomainWhisperModel` is resolved on first use, so importing
`wdx.deploy.export_ct2` never imports faster-whisper's model code.
"""


def __getattr__(name: str):
    if name == "DomainWhisperModel":
        from wdx.deploy.faster_whisper import DomainWhisperModel

        return DomainWhisperModel
    raise AttributeError(f"module 'wdx.deploy' has no attribute {name!r}")
