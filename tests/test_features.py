import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from tests.conftest import speechlike
from wdx.data.features import N_FRAMES, log_mel


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(n_mels):
    clips = [speechlike(s, 16000, seed=i) for i, s in enumerate((0.7, 4.0, 11.3, 29.9))]
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    # the extractor's own numpy path, one clip at a time: an independent reference
    ref = np.stack([fe._np_extract_fbank_features(np.pad(c, (0, 480000 - len(c)))[None], "cpu")[0]
                    for c in clips])
    batch = torch.zeros(len(clips), max(len(c) for c in clips))
    for i, c in enumerate(clips):
        batch[i, : len(c)] = torch.from_numpy(c)
    ours = log_mel(batch, n_mels).numpy()
    assert ours.shape == (len(clips), n_mels, N_FRAMES) == ref.shape
    assert np.abs(ours - ref).max() < 1e-3


def test_short_batches_are_padded_to_3000_frames_and_long_audio_refused():
    assert log_mel(torch.zeros(2, 100), 80).shape == (2, 80, 3000)
    with pytest.raises(ValueError, match="longer than 30 s"):
        log_mel(torch.zeros(1, 480001), 80)
