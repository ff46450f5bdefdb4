"""The run's `sitecustomize.py`: `backend` copies it into RUN_DIR/site/ (first on PYTHONPATH).

Every Python process of the run then installs, at start-up, what the run's variables ask for:

- CLOUDTRAIN_SEED: seeding. `random` at once; numpy, TensorFlow (`tf.random.set_seed`)
  and Keras 3 / tf_keras (`keras.utils.set_random_seed`) right after each is first imported.
- CLOUDTRAIN_CHECKPOINT_DIR: checkpoint and resume. `Model.fit` of Keras 3, tf_keras and
  Keras 2.3.1 is wrapped right after each is first imported, by `_cloudtrain_checkpoint`
  (checkpoint.py, copied beside this file), however the script reaches it: `import keras`,
  `import tf_keras`, or through TensorFlow's lazy `tf.keras` (`from tensorflow import keras`).

Both go through one import hook (a meta-path finder that wraps the loader of a watched
module), so nothing heavy is imported here and `pip install` in a job's setup stays fast.
A `sitecustomize.py` that this one shadows (one later on sys.path) still runs.

Python 3.7+, standard library only. Imported under any other name it does nothing.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # no subscripted generics at run time: Python 3.7
    from collections.abc import Callable

    Hook = Callable[[Any], None]

_HOOKED = "_cloudtrain_hooks_for"


def _warn(what: str, err: BaseException) -> None:
    sys.stderr.write(f"[cloudtrain] {what}: {err}\n")


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


_SEED_HOOKS = {
    "numpy": _seed_numpy,
    "tensorflow": _seed_tensorflow,
    "keras": _seed_keras,
    "tf_keras": _seed_keras,
}


def seed_hooks(seed: int) -> dict[str, list[Hook]]:
    """The post-import hooks that seed each framework with `seed`."""

    def bind(function: Callable[[Any, int], None]) -> Hook:
        return lambda module: function(module, seed)

    return {name: [bind(function)] for name, function in _SEED_HOOKS.items()}


class _PostImportFinder:
    """A meta-path finder that wraps the loader of a watched module to run hooks once it is loaded.

    A `find_spec` call is not an import: `importlib.util.find_spec(name)` probes for a module
    and throws the spec away (TensorFlow does so for `keras` and `tf_keras` while it is being
    imported, to lay out `tf.keras`), and the import that follows asks again and gets a fresh
    loader. So every spec found for a watched module gets its loader wrapped, and a module's
    hooks are dropped only once they have run, after the module was executed.
    """

    def __init__(self, hooks: dict[str, list[Hook]]) -> None:
        self.pending = hooks
        self.searching: set[str] = set()  # names this finder is asking the others about

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.pending or fullname in self.searching:
            return None
        self.searching.add(fullname)
        try:
            spec = self._find_elsewhere(fullname, path, target)
        finally:
            self.searching.discard(fullname)
        if spec is not None and spec.loader is not None:
            self._wrap(spec.loader, fullname)
        return spec

    def _find_elsewhere(self, fullname: str, path: Any, target: Any) -> Any:
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def _wrap(self, loader: Any, name: str) -> None:
        original = getattr(loader, "exec_module", None)
        if original is None or getattr(original, _HOOKED, None) == name:
            return  # no exec_module (the import calls load_module: not watched), or wrapped already

        def exec_module(module: Any) -> None:
            original(module)
            hooks = self.pending.pop(name, None)
            if hooks is not None:  # the first time a module of this name is executed
                run_hooks(name, module, hooks)

        setattr(exec_module, _HOOKED, name)
        try:
            loader.exec_module = exec_module
        except (AttributeError, TypeError) as e:
            _warn(f"could not hook {name}", e)


def run_hooks(name: str, module: Any, hooks: list[Hook]) -> None:
    for hook in hooks:
        try:
            hook(module)
        except Exception as e:
            _warn(f"a start-up hook failed for {name}", e)


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
                    _warn(f"the shadowed {candidate} failed", e)
            return


def _seed_value() -> int | None:
    text = os.environ.get("CLOUDTRAIN_SEED", "")
    try:
        return int(text)
    except ValueError:
        return None


def _checkpoint_hooks() -> dict[str, list[Hook]]:
    if not os.environ.get("CLOUDTRAIN_CHECKPOINT_DIR"):
        return {}
    try:
        import _cloudtrain_checkpoint  # type: ignore[import-not-found]  # checkpoint.py, copied beside
    except Exception as e:
        _warn("checkpoint: not installed (_cloudtrain_checkpoint does not import)", e)
        return {}
    hooks: dict[str, list[Hook]] = _cloudtrain_checkpoint.import_hooks()
    return hooks


def install() -> None:
    hooks: dict[str, list[Hook]] = {}
    seed = _seed_value()
    if seed is not None:
        import random

        random.seed(seed)
        hooks = seed_hooks(seed)
    for name, more in _checkpoint_hooks().items():  # after seeding: a module is seeded, then wrapped
        hooks.setdefault(name, []).extend(more)
    if hooks:
        for name in list(hooks):
            module = sys.modules.get(name)
            if module is not None:  # already imported (unusual this early)
                run_hooks(name, module, hooks.pop(name))
        sys.meta_path.insert(0, _PostImportFinder(hooks))
    _chain_next_sitecustomize()


if __name__ == "sitecustomize":
    install()
