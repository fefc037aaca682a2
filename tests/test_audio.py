import math

import numpy as np
import pytest

from tests.conftest import speechlike
from wdx.data.audio import AUDIO_EXTENSIONS, AudioDecodeError, decode_audio, encode_audio, resample, to_mono


@pytest.mark.parametrize("ext,rate,channels", [("wav", 44100, 2), ("flac", 16000, 1), ("mp3", 22050, 1),
                                               ("ogg", 8000, 1), ("m4a", 48000, 1), ("wav", 8000, 1)])
def test_every_format_decodes_to_mono_16k(ext, rate, channels):
    wave = speechlike(1.5, rate, channels=channels)
    frames, got_rate = decode_audio(encode_audio(wave, rate, ext), ext)
    assert got_rate == rate and frames.shape[0] == channels and frames.dtype == np.float32
    mono = resample(to_mono(frames), rate, 16000)
    n = frames.shape[1]
    assert len(mono) == math.ceil(n * 16000 / rate)
    if ext in ("wav", "flac", "ogg", "mp3"):
        assert n == wave.shape[-1]
    else:  # AAC adds encoder priming and rounds up to whole 1024-sample frames
        assert wave.shape[-1] <= n <= wave.shape[-1] + 3 * 1024


def test_lossless_round_trip_is_exact_to_16_bits():
    wave = speechlike(0.5, 16000)
    frames, _ = decode_audio(encode_audio(wave, 16000, "flac"), "flac")
    assert np.abs(frames[0] - wave).max() < 1 / 2**15


def test_stereo_is_averaged():
    frames = np.stack([np.ones(10, np.float32), np.zeros(10, np.float32)])
    assert np.allclose(to_mono(frames), 0.5)


@pytest.mark.parametrize("ext", AUDIO_EXTENSIONS)
def test_garbage_bytes_raise_one_error_type(ext):
    with pytest.raises(AudioDecodeError):
        decode_audio(b"this is not audio" * 50, ext)


def test_resample_is_identity_at_same_rate():
    wave = speechlike(0.1, 16000)
    assert resample(wave, 16000, 16000) is wave


def test_m4a_is_written_with_its_index_first_so_a_stream_can_decode_it():
    # issue 25.3: transformers' pipeline pipes a file through ffmpeg; an m4a whose moov atom
    # follows the audio cannot be read that way (1 of the demo's clips failed)
    import io

    import av

    class Stream:  # read() only: no seeking back to the audio once the index is found
        def __init__(self, data: bytes) -> None:
            self.data = io.BytesIO(data)

        def read(self, n: int = -1) -> bytes:
            return self.data.read(n)

    data = encode_audio(speechlike(20.0, 16000), 16000, "m4a")  # larger than ffmpeg's read buffer
    assert 0 < data.find(b"moov") < data.find(b"mdat")
    with av.open(Stream(data), format="mp4") as container:
        assert sum(frame.samples for frame in container.decode(audio=0)) >= 20 * 16000


def test_the_torch_free_resampler_gives_the_training_resampler_s_samples():
    # issue 34.6: the ct2 backend resamples with FFmpeg's resampler (no torch); training uses torchaudio's
    import numpy as np

    from wdx.data.audio import resample, resample_ffmpeg

    for rate, bound in ((44100, 1.1e-4), (48000, 1.1e-4), (8000, 2.5e-4)):  # README quotes the 44.1 kHz one
        tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(2 * rate) / rate)).astype(np.float32)
        ours, theirs = resample_ffmpeg(tone, rate, 16000), resample(tone, rate, 16000)
        assert ours.dtype == np.float32 and len(ours) == len(theirs) == 32000
        assert np.abs(ours[200:-200] - theirs[200:-200]).max() < bound, rate  # edges: each filter's own start
    assert resample_ffmpeg(tone, 16000, 16000) is tone
