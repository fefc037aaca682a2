"""Scoring: evaluation inside the loop and offline, metrics, the token study, inference and
transcription (transformers or CTranslate2)."""
