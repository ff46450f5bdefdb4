"""`import keras` in a `keras: 2` job on TensorFlow: the Keras 2 API, from tf_keras.

`backend --keras 2` copies this file to RUN_DIR/keras2/keras/__init__.py, first on
the run's PYTHONPATH, so a seed-era script's `from keras.models import Sequential`
gets tf_keras (Keras 2: `input_dim=`, `save_weights('model.h5')`, `lr=`) although
the environment's own `keras` is Keras 3. Every `keras.X` is the very module
`tf_keras.X` (no second copy of a class). TF_USE_LEGACY_KERAS=1 does the same for
`tf.keras`.

Python 3.7+, standard library only (and tf_keras, which the image installs).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

import tf_keras  # type: ignore[import-not-found]


class _Existing(importlib.abc.Loader):
    """Hands out a module that is already imported, under another name."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        return self.module

    def exec_module(self, module: ModuleType) -> None:
        pass


class _KerasIsTfKeras(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if not fullname.startswith("keras."):
            return None
        real = importlib.import_module("tf_keras." + fullname[len("keras.") :])
        return importlib.util.spec_from_loader(fullname, _Existing(real))


sys.meta_path.insert(0, _KerasIsTfKeras())
sys.modules[__name__] = tf_keras
