"""Data: audio decoding, shards, the training pipeline, collation, features, augmentation, packing."""
