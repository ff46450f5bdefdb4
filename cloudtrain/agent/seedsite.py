"""The `sitecustomize.py` that `backend --seed` copies into RUN_DIR/seed/ (on PYTHONPATH).

Every Python process of the run then seeds itself from CLOUDTRAIN_SEED at start-up:
`random` at once; numpy, TensorFlow (`tf.random.set_seed`) and Keras 3 / tf_keras
(`keras.utils.set_random_seed`) through an import hook, right after each is first
imported. Nothing heavy is imported here, so `pip install` in a job's setup stays fast.
A `sitecustomize.py` that this one shadows (one later on sys.path) still runs.

Python 3.7+, standard library only. Imported under any other name it does nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any


def _warn(what: str, err: BaseException) -> None:
    sys.stderr.write(f"[cloudtrain] seed: could not seed {what}: {err}\n")


def _seed_numpy(module: Any, seed: int) -> None:
    module.random.seed(seed)


def _seed_tensorflow(module: Any, seed: int) -> None:
    rnd = getattr(module, "random", None)
    if rnd is not None and hasattr(rnd, "set_seed"):
        rnd.set_seed(seed)
    elif hasattr(module, "set_random_seed"):  # TensorFlow 1.x
        module.set_random_seed(seed)


def _seed_keras(module: Any, seed: int) -> None:
    utils = getattr(module, "utils", None)
    if utils is not None and hasattr(utils, "set_random_seed"):  # Keras >= 2.7, Keras 3, tf_keras
        utils.set_random_seed(seed)


_HOOKS = {
    "numpy": _seed_numpy,
    "tensorflow": _seed_tensorflow,
    "keras": _seed_keras,
    "tf_keras": _seed_keras,
}


class _SeedFinder:
    """A meta-path finder that wraps the loader of a watched module to seed it once loaded."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.pending = dict(_HOOKS)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        hook = self.pending.get(fullname)
        if hook is None:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        del self.pending[fullname]
        self._wrap(spec.loader, fullname, hook)
        return spec

    def _wrap(self, loader: Any, name: str, hook: Callable[[Any, int], None]) -> None:
        original = loader.exec_module
        seed = self.seed

        def exec_module(module: Any) -> None:
            original(module)
            try:
                hook(module, seed)
            except Exception as e:
                _warn(name, e)

        try:
            loader.exec_module = exec_module
        except (AttributeError, TypeError) as e:
            _warn(name, e)


def _chain_next_sitecustomize() -> None:
    """Run the sitecustomize.py this one shadows, if there is one later on sys.path."""
    here = os.path.dirname(os.path.abspath(__file__))
    seen_here = False
    for entry in sys.path:
        folder = os.path.abspath(entry or os.curdir)
        if folder == here:
            seen_here = True
            continue
        candidate = os.path.join(folder, "sitecustomize.py")
        if seen_here and os.path.isfile(candidate):
            import importlib.util

            spec = importlib.util.spec_from_file_location("_cloudtrain_next_sitecustomize", candidate)
            if spec is not None and spec.loader is not None:
                module = importlib.util.module_from_spec(spec)
                try:
                    spec.loader.exec_module(module)
                except Exception as e:
                    _warn(f"(the shadowed {candidate} failed)", e)
            return


def _seed_value() -> int | None:
    text = os.environ.get("CLOUDTRAIN_SEED", "")
    try:
        return int(text)
    except ValueError:
        return None


def install() -> None:
    seed = _seed_value()
    if seed is not None:
        import random

        random.seed(seed)
        finder = _SeedFinder(seed)
        for name in list(finder.pending):
            module = sys.modules.get(name)
            if module is not None:  # already imported (unusual this early)
                del finder.pending[name]
                try:
                    _HOOKS[name](module, seed)
                except Exception as e:
                    _warn(name, e)
        sys.meta_path.insert(0, finder)
    _chain_next_sitecustomize()


if __name__ == "sitecustomize":
    install()
