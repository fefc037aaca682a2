"""The demo, apart from the training library: Korean speech synthesised with espeak-ng
(`tts`, `data`), OpenAI Whisper base rebuilt from its PyPI copy (`offline_model`), the
driver behind `make demo` (`pipeline`) and its REPORT.md (`report`)."""
