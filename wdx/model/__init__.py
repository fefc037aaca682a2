"""The model: Whisper set-up and freeze, the domain-token rows, the domain list, tiny test models."""
