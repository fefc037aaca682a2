"""Korean speech from espeak-ng, through the library the `espeakng-loader` wheel ships.

No system package and no root needed: the wheel carries libespeak-ng.so and its data
(Korean dictionary included). Synthesis is synchronous, 16-bit mono at the library's rate
(22050 Hz); voices are Korean with espeak's variants (+m1, +f2, ...) for speaker variety.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE = 1, 3, 4  # espeak_PARAMETER values
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_LOCK = threading.Lock()  # espeak-ng keeps global state


class Espeak:
    """One initialised espeak-ng; `say` returns float32 audio and its sample rate."""

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                               espeakng_loader.get_data_path().encode(), 0)
        if self.rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # keep a reference: C holds only the pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def say(self, text: str, voice: str = "ko", rate: int = 160, pitch: int = 50, pitch_range: int = 50
            ) -> np.ndarray:
        """float32 samples in [-1, 1] at `self.rate`. rate: words/min; pitch, range: 0-100."""
        with _LOCK:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
                self.lib.espeak_SetParameter(param, int(value), 0)
            self._chunks = []
            data = text.encode("utf-8")
            self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            self.lib.espeak_Synchronize()
            samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return samples.astype(np.float32) / 32768.0


@functools.lru_cache(maxsize=1)
def espeak() -> Espeak:
    return Espeak()
