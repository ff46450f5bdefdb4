"""Checkpoint and resume inside an unchanged Keras script: `Model.fit` saves and restores itself.

`backend --checkpoint-dir DIR` copies this file beside the run's sitecustomize.py (runsite.py)
as `_cloudtrain_checkpoint.py`; with CLOUDTRAIN_CHECKPOINT_DIR set, the sitecustomize installs
`import_hooks()`, which wrap `fit` of Keras 3 (`keras.Model`), tf_keras (`tf_keras.Model`,
`import keras` in a `keras: 2` job, `tf.keras` with TF_USE_LEGACY_KERAS=1) and Keras 2.3.1
(`keras.engine.training.Model`, also its `fit_generator`) right after each is first imported
(`tf.keras` of Keras 3 is `keras.Model` too). The wrapped `fit`:

- numbers itself by call order in the process (first fit = 0, ...): a checkpoint belongs to
  that fit of the script. A loop of `fit(epochs=1)` is one fit per iteration; once a later
  fit of the same model object saves, the finished fits before it keep their manifest entry
  (epochs, metrics) but no saved state of their own (`continued_by`): one state per model,
  however many iterations;
- before training, restores that fit's last complete checkpoint (model weights, optimizer
  state, the RNG states below, the epoch) when its weight shapes match the model's, and passes
  `initial_epoch` = the epochs already done: the user's `epochs` stays the total, so the
  resumed run ends with exactly the epochs asked for (a fit that had finished trains no more);
  a finished fit whose model trained on in a later fit gives the model that later fit's state
  (once for a run of such fits: the code between iterations sees trained weights), trains
  nothing, and the later fit restores and continues: a resumed loop trains from its first
  unfinished iteration. What `fit` returns (its History) holds the restored epochs' metrics
  too, as if they had been trained in this process;
- after every CLOUDTRAIN_CHECKPOINT_EVERY epochs (default 1), at the last epoch and when
  training stops early, writes a checkpoint;
- at each batch end (at most every 0.2 s) looks for CLOUDTRAIN_NOTICE_FILE (os.stat), which
  the supervisor writes when AWS schedules an interruption or recommends a rebalance. On a
  new notice it saves *at once the state of the last finished epoch*: with EVERY=1 that is
  already on disk; with EVERY>1 it is held in host memory at each epoch end for this purpose.
  The part of the current epoch done so far is not saved (resuming in the middle of an
  epoch would need the data order and the position within it; it would make the finished
  run differ from an uninterrupted one). From the notice on, every epoch is saved, and once
  a spot notice's termination time is less than CLOUDTRAIN_NOTICE_MARGIN_S (default 30 s)
  away at an epoch end, or as a fit that would train begins (the next iteration of a loop),
  training holds there, saved, until the instance is taken (or 60 s past that time, when it
  carries on): an epoch finished in the last seconds could not reach the controller, so none
  is started that could be lost. The notice is the process's: a loop's fits see it once.
- prints `[cloudtrain] checkpoint: ...` lines on stderr (restored, saved, ignored, why);
- at each epoch end appends a JSON line to CLOUDTRAIN_METRICS_FILE: `fit`, `epoch` (1-based,
  counting restored epochs: a resumed run continues the series), `epochs` (asked for),
  `epoch_s` (that epoch's seconds), `at` (UTC) and `logs` (the numbers of Keras's `logs`:
  loss, metrics, val_*); a resumed fit first writes the restored epochs' lines again from
  the checkpoint's history (`restored`: true, `epoch_s`: null), so that epochs whose lines
  were lost with an instance stay in the series. A failed write is said once and never
  stops training;
- writes where it stands to CLOUDTRAIN_PROGRESS_FILE (replaced whole, at most every
  PROGRESS_EVERY_S while batches end, at once when a call or an epoch begins or ends):
  `call` (fit, evaluate or predict: the innermost hooked call running), `active` (a hooked
  call runs), `fit`, `epoch` (1-based, the one training), `epochs`, `done` (epochs finished),
  `step` and `steps` (batches of this epoch or call; `steps` null when Keras does not know),
  `epoch_elapsed_s`, the last epoch's `epoch_s` and `logs`, and `at` (UTC). `evaluate` and
  `predict` are wrapped only for this. The controller's stall guard reads it: a step is
  progress.

The format (CLOUDTRAIN_CHECKPOINT_DIR, self-contained and relocatable: paths are relative):

    manifest.json              written last; its presence means "complete"
    fit0-epoch0003-<stamp>/    one folder per saved state, never changed once named
        weights.npz            model.get_weights(), in order
        optimizer.npz          the optimizer's variables (iterations, slots, learning rate)
        extra.npz              further state: Keras 3 seed generators, Theano's shared
                               random streams and variables of the training function
        state.json             epoch, Python's and numpy's global RNG states

A save writes the folder under a temporary name (`.tmp-...`), fsyncs each file and the
folder, renames it, fsyncs DIR, then replaces manifest.json the same way; only then are
folders that neither this manifest nor the one before names removed (a copier that read
the previous manifest still finds its files). A trainer killed at any point leaves the
previous manifest and its folders intact. A copier that may take longer than a save (the
controller's keeper) copies a `snapshot()` instead: hard links of the latest save's files,
taken in a moment, which no later prune can take away. manifest.json: `schema`, `created_at`,
`keras` {flavour, version, backend}, `fit` and `epoch` (the latest save), `fits` {"0":
{epoch, epochs, complete, reason, folder, created_at, keras, weight_shapes, history}} (a
finished fit continued by a later one has `continued_by` (that fit) instead of `folder`;
`history`: metric -> one value per epoch saved), and `files` {relative path: {size,
sha256}} for every file of every folder named.

Python 3.7+, standard library only at import time; numpy and Keras only inside `fit`.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import inspect
import io
import json
import os
import random
import shutil
import signal
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

SCHEMA = 1
MANIFEST = "manifest.json"
DIR_ENV = "CLOUDTRAIN_CHECKPOINT_DIR"
EVERY_ENV = "CLOUDTRAIN_CHECKPOINT_EVERY"
NOTICE_ENV = "CLOUDTRAIN_NOTICE_FILE"
METRICS_ENV = "CLOUDTRAIN_METRICS_FILE"
PROGRESS_ENV = "CLOUDTRAIN_PROGRESS_FILE"
PROGRESS_EVERY_S = 2.0
# Test only (with CLOUDTRAIN_TESTING=1): "STAGE:N" SIGKILLs the process during its N-th save
# (1-based) at STAGE: "file" (after the first file), "folder" (folder renamed, manifest not
# written), "manifest" (manifest written under its temporary name, not renamed) or "saved"
# (the save complete: a trainer killed between epochs).
TEST_KILL_ENV = "CLOUDTRAIN_CHECKPOINT_TEST_KILL"
NOTICE_POLL_S = 0.2
SNAPSHOT_ATTEMPTS = 100
MARGIN_ENV = "CLOUDTRAIN_NOTICE_MARGIN_S"  # seconds to copy the last checkpoint home
DEFAULT_MARGIN_S = 30.0
HOLD_PAST_DEADLINE_S = 60.0
_WRAPPED = "_cloudtrain_checkpoint_wrapped"


def log(text: str) -> None:
    try:
        sys.stderr.write(f"[cloudtrain] checkpoint: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the format -------------------------------------------------------------------------------


class Invalid(Exception):
    """A checkpoint (or one fit's part of it) that must not be restored; the message says why."""


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_durable(path: str, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _test_kill(stage: str, save_number: int) -> None:
    spec = os.environ.get(TEST_KILL_ENV, "")
    if not spec or not os.environ.get("CLOUDTRAIN_TESTING"):
        return
    want_stage, _, number = spec.partition(":")
    if want_stage == stage and number == str(save_number):
        log(f"test: killed during save {save_number} at {stage}")
        os.kill(os.getpid(), signal.SIGKILL)


def read_manifest(directory: str) -> dict[str, Any] | None:
    """The manifest of `directory`; None when there is no checkpoint at all.

    Raises Invalid for a folder with checkpoint files but no manifest, or a manifest that
    is not one this code can read.
    """
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        try:
            names = [n for n in os.listdir(directory) if not n.startswith(".")]
        except OSError:
            names = []
        if names:
            raise Invalid(f"{directory} has no {MANIFEST} (an incomplete checkpoint)") from None
        return None
    return parse_manifest(raw, path)


def parse_manifest(raw: bytes, path: str) -> dict[str, Any]:
    """A manifest's bytes as read from `path`, checked; raises Invalid."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise Invalid(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        schema = manifest.get("schema") if isinstance(manifest, dict) else None
        raise Invalid(f"{path}: unknown schema {schema!r} (this agent reads {SCHEMA})")
    if not isinstance(manifest.get("fits"), dict) or not isinstance(manifest.get("files"), dict):
        raise Invalid(f"{path} lacks `fits` or `files`")
    return manifest


def fit_entry(directory: str, manifest: dict[str, Any], fit: int) -> dict[str, Any] | None:
    """Fit `fit`'s entry in `manifest`, its files checked (size, sha256); None when it has none."""
    entry = manifest["fits"].get(str(fit))
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("epoch"), int):
        raise Invalid(f"fit {fit}: malformed entry in {MANIFEST}")
    if "folder" not in entry:  # a finished fit whose model trained on in a later fit
        if not isinstance(entry.get("continued_by"), int) or not entry.get("complete"):
            raise Invalid(f"fit {fit}: malformed entry in {MANIFEST}")
        return dict(entry)
    folder = entry["folder"]
    if not isinstance(folder, str):
        raise Invalid(f"fit {fit}: malformed entry in {MANIFEST}")
    for name in ("weights.npz", "optimizer.npz", "extra.npz", "state.json"):
        rel = f"{folder}/{name}"
        meta = manifest["files"].get(rel)
        if not isinstance(meta, dict):
            raise Invalid(f"{MANIFEST} does not list {rel}")
        path = os.path.join(directory, folder, name)
        try:
            size = os.path.getsize(path)
        except OSError:
            raise Invalid(f"{rel} is missing") from None
        if size != meta.get("size"):
            raise Invalid(f"{rel} has {size} bytes, the manifest says {meta.get('size')}")
        if sha256_file(path) != meta.get("sha256"):
            raise Invalid(f"{rel} does not match its sha256 in the manifest")
    return dict(entry)


def continuation(
    directory: str, manifest: dict[str, Any], fit: int, entry: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """The fit whose saved state `entry` (fit `fit`'s) stands for, and its checked entry:
    `fit` itself, or the later fit its model trained on in (`continued_by`)."""
    seen = {fit}
    while "folder" not in entry:
        later = int(entry["continued_by"])
        if later in seen:
            raise Invalid(f"fit {fit}: `continued_by` goes round in a circle in {MANIFEST}")
        seen.add(later)
        found = fit_entry(directory, manifest, later)
        if found is None:
            raise Invalid(f"fit {fit} continues in fit {later}, which {MANIFEST} lacks")
        fit, entry = later, found
    return fit, entry


def verify(directory: str) -> dict[str, Any] | None:
    """Check a whole checkpoint folder (for the controller, before and after copying it)."""
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    for fit in manifest["fits"]:
        entry = fit_entry(directory, manifest, int(fit))
        if entry is not None:
            continuation(directory, manifest, int(fit), entry)
    return manifest


def snapshot(directory: str, into: str) -> dict[str, Any] | None:
    """Hold the latest save of `directory` still for a copier: hard-link manifest.json's files
    into `into` (made anew; best on the same filesystem), then write the manifest that named
    them there. Returns that manifest, or None when `directory` has no checkpoint yet.

    A saved folder never changes once named, so its links are the save itself, and they
    stay whole however many newer saves prune the folder while the snapshot is copied (a
    copy may take longer than a save). The links are made within a moment of reading the
    manifest, while the trainer keeps its folders for one more save; a file gone before
    it was linked means two saves came in that moment: start again from the manifest now
    in place. Where a file cannot be hard-linked (another filesystem, or one without hard
    links), it is copied instead: an open file outlives its pruning. Raises Invalid for a
    manifest this code cannot read, or saves that never held still for a snapshot.
    """
    path = os.path.join(directory, MANIFEST)
    for _ in range(SNAPSHOT_ATTEMPTS):
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        manifest = parse_manifest(raw, path)
        shutil.rmtree(into, ignore_errors=True)
        os.makedirs(into)
        try:
            for rel in sorted(manifest["files"]):
                parts = rel.split("/")
                if len(parts) != 2 or not parts[0].startswith("fit") or parts[1] in ("", ".", ".."):
                    raise Invalid(f"{path} lists {rel!r}, not a file of a saved folder")
                os.makedirs(os.path.join(into, parts[0]), exist_ok=True)
                _link_or_copy(os.path.join(directory, rel), os.path.join(into, rel))
        except FileNotFoundError:
            continue  # pruned by a newer save: its manifest is in place already
        with open(os.path.join(into, MANIFEST), "wb") as f:
            f.write(raw)
        return manifest
    raise Invalid(f"{directory}: no save held still for {SNAPSHOT_ATTEMPTS} attempts to link it")


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except FileNotFoundError:
        raise
    except OSError:  # EXDEV, EPERM (no hard links there, or protected_hardlinks), EMLINK
        shutil.copyfile(source, target)


class Store:
    """Writes one process's checkpoints into a directory; see the module docstring for the order."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.saves = 0
        self.previous_folders: set[str] = set()

    def save(
        self,
        fit: int,
        epoch: int,
        payload: dict[str, bytes],
        entry: dict[str, Any],
        keras: dict[str, str],
        continues: tuple[int, ...] = (),
    ) -> str:
        """Save fit `fit`'s state at `epoch`. `continues`: earlier fits of the same model; those
        that had finished keep their entry (epoch, history) but no folder of their own: this
        save's state continues theirs (`continued_by`)."""
        self.saves += 1
        directory = self.directory
        os.makedirs(directory, exist_ok=True)
        try:
            manifest = read_manifest(directory)
        except Invalid:
            manifest = None  # replaced by this save
        if manifest is None:
            manifest = {"schema": SCHEMA, "fits": {}, "files": {}}
        stamp = f"{int(time.time() * 1000):x}-{os.getpid()}"
        folder = f"fit{fit}-epoch{epoch:04d}-{stamp}"
        tmp = os.path.join(directory, f".tmp-{folder}")
        os.makedirs(tmp)
        files: dict[str, Any] = {}
        for name in sorted(payload):
            files[f"{folder}/{name}"] = _write_durable(os.path.join(tmp, name), payload[name])
            _test_kill("file", self.saves)
        fsync_dir(tmp)
        os.rename(tmp, os.path.join(directory, folder))
        fsync_dir(directory)
        _test_kill("folder", self.saves)

        old_folders = {e.get("folder") for e in manifest["fits"].values() if isinstance(e, dict)}
        now = utc_now()
        fits = dict(manifest["fits"])
        fits[str(fit)] = dict(entry, folder=folder, epoch=epoch, created_at=now, keras=keras)
        for earlier in continues:
            old = fits.get(str(earlier))
            if earlier != fit and isinstance(old, dict) and old.get("complete"):
                fits[str(earlier)] = {k: v for k, v in old.items() if k != "folder"}
                fits[str(earlier)]["continued_by"] = fit
        _shorten_chains(fits)
        kept = {e["folder"] for e in fits.values() if isinstance(e, dict) and "folder" in e}
        all_files = {rel: meta for rel, meta in manifest["files"].items() if rel.split("/", 1)[0] in kept}
        all_files.update(files)
        new = {
            "schema": SCHEMA,
            "created_at": now,
            "keras": keras,
            "fit": fit,
            "epoch": epoch,
            "fits": fits,
            "files": all_files,
        }
        text = (json.dumps(new, indent=2, sort_keys=True) + "\n").encode("utf-8")
        path = os.path.join(directory, MANIFEST)
        _write_durable(path + ".tmp", text)
        _test_kill("manifest", self.saves)
        os.replace(path + ".tmp", path)
        fsync_dir(directory)

        self._prune(kept | {f for f in old_folders if isinstance(f, str)} | self.previous_folders)
        self.previous_folders = kept
        return folder

    def _prune(self, keep: set[str]) -> None:
        for name in os.listdir(self.directory):
            full = os.path.join(self.directory, name)
            stale_tmp = name.startswith(".tmp-fit")
            if (stale_tmp or name.startswith("fit")) and name not in keep and os.path.isdir(full):
                shutil.rmtree(full, ignore_errors=True)


def _shorten_chains(fits: dict[str, Any]) -> None:
    """Point each `continued_by` at the fit that holds the state (one step, never a chain)."""
    for entry in fits.values():
        if not isinstance(entry, dict) or not isinstance(entry.get("continued_by"), int):
            continue
        seen: set[int] = set()
        later = entry["continued_by"]
        while later not in seen:
            seen.add(later)
            nxt = fits.get(str(later))
            if not isinstance(nxt, dict) or not isinstance(nxt.get("continued_by"), int):
                break
            later = nxt["continued_by"]
        entry["continued_by"] = later


# --- arrays (numpy, imported lazily) ----------------------------------------------------------


def pack_arrays(arrays: list[Any]) -> bytes:
    import numpy as np  # type: ignore[import-not-found, unused-ignore]

    buffer = io.BytesIO()
    np.savez(buffer, *[np.asarray(a) for a in arrays])
    return buffer.getvalue()


def unpack_arrays(path: str) -> list[Any]:
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


def shapes(arrays: list[Any]) -> list[list[int]]:
    return [[int(d) for d in getattr(a, "shape", ())] for a in arrays]


def _global_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python_random": _jsonable(random.getstate())}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        name, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy_random"] = [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    return state


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _set_global_rng_state(state: dict[str, Any]) -> None:
    if "python_random" in state:
        random.setstate(_tuples(state["python_random"]))
    numpy_state = state.get("numpy_random")
    numpy = sys.modules.get("numpy")
    if numpy_state and numpy is not None:
        name, keys, pos, has_gauss, cached = numpy_state
        numpy.random.set_state((name, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, cached))


# --- the Keras flavours -----------------------------------------------------------------------


def _value(variable: Any) -> Any:
    import numpy as np

    if hasattr(variable, "get_value"):  # Theano shared variable
        return np.array(variable.get_value())
    return np.array(variable.numpy())


def _assign(variable: Any, value: Any) -> None:
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:
        variable.assign(value)


class Flavour:
    """What differs between Keras 3, tf_keras and Keras 2.3.1: where the state lives."""

    name = "keras"

    def __init__(self, module: Any) -> None:
        self.module = module
        self.version = str(getattr(module, "__version__", "?"))

    def describe(self) -> dict[str, str]:
        backend = "?"
        with contextlib.suppress(Exception):
            backend = str(self.module.backend.backend())
        return {"flavour": self.name, "version": self.version, "backend": backend}

    def callback_base(self) -> Any:
        return self.module.callbacks.Callback

    def scope(self, model: Any) -> Any:
        """Where the model's variables live: the scope of the tf.distribute strategy it was
        built under (MirroredStrategy ...: its optimizer's variables must be created there
        too), a no-op for a model without one (Keras 2.3.1, other backends)."""
        strategy = getattr(model, "distribute_strategy", None)  # Keras 3 on TensorFlow, tf_keras
        scope = getattr(strategy, "scope", None)
        return scope() if callable(scope) else contextlib.nullcontext()

    def prepare(self, model: Any) -> None:
        """Create the optimizer's variables before fit would (to restore into them)."""

    def optimizer_variables(self, model: Any) -> list[Any]:
        return []

    def extra_variables(self, model: Any) -> list[Any]:
        return []

    def weights(self, model: Any) -> list[Any]:
        return list(model.get_weights())

    def set_weights(self, model: Any, arrays: list[Any]) -> None:
        model.set_weights(arrays)

    def optimizer_state(self, model: Any) -> list[Any]:
        return [_value(v) for v in self.optimizer_variables(model)]

    def set_optimizer_state(self, model: Any, arrays: list[Any]) -> None:
        for variable, value in zip(self.optimizer_variables(model), arrays):
            _assign(variable, value)

    def extra_state(self, model: Any) -> list[Any]:
        return [_value(v) for v in self.extra_variables(model)]

    def set_extra_state(self, model: Any, arrays: list[Any]) -> None:
        for variable, value in zip(self.extra_variables(model), arrays):
            _assign(variable, value)


class Keras3(Flavour):
    name = "keras3"

    def prepare(self, model: Any) -> None:
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            optimizer.build(model.trainable_variables)

    def optimizer_variables(self, model: Any) -> list[Any]:
        optimizer = getattr(model, "optimizer", None)
        return list(optimizer.variables) if optimizer is not None and optimizer.built else []

    def extra_variables(self, model: Any) -> list[Any]:
        # model.variables adds what model.weights lacks: the seed generators' states (Dropout).
        weights = {id(w) for w in model.weights}
        return [v for v in model.variables if id(v) not in weights]


class TfKeras(Flavour):
    name = "tf_keras"

    def _legacy(self, optimizer: Any) -> bool:
        return not hasattr(optimizer, "_var_key") and hasattr(optimizer, "_create_all_weights")

    def prepare(self, model: Any) -> None:
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            return
        if self._legacy(optimizer):
            optimizer._create_all_weights(model.trainable_variables)
        elif not getattr(optimizer, "_built", False):
            optimizer.build(model.trainable_variables)

    def optimizer_variables(self, model: Any) -> list[Any]:
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            return []
        if self._legacy(optimizer):
            found = list(optimizer.weights)
        else:
            found = list(optimizer.variables) if getattr(optimizer, "_built", False) else []
        learning_rate = getattr(optimizer, "_learning_rate", None)
        if hasattr(learning_rate, "assign") and all(learning_rate is not v for v in found):
            found.append(learning_rate)  # a variable ReduceLROnPlateau may have changed
        return found


class Keras2(Flavour):
    name = "keras2"

    def prepare(self, model: Any) -> None:
        model._make_train_function()

    def optimizer_variables(self, model: Any) -> list[Any]:
        optimizer = getattr(model, "optimizer", None)
        return list(optimizer.weights) if optimizer is not None else []

    def extra_variables(self, model: Any) -> list[Any]:
        # Everything else the training function updates or reads: Theano's random streams
        # (Dropout), the learning rate and decay variables.
        function = getattr(getattr(model, "train_function", None), "function", None)
        if function is None or not hasattr(function, "get_shared"):
            return []
        known = {id(v) for v in model.weights} | {id(v) for v in self.optimizer_variables(model)}
        return [v for v in function.get_shared() if id(v) not in known]


# --- the wrapped fit --------------------------------------------------------------------------


class _Snapshot:
    def __init__(self, epoch: int, payload: dict[str, bytes], entry: dict[str, Any]) -> None:
        self.epoch = epoch
        self.payload = payload
        self.entry = entry


class _Loaded:
    """A saved state read from disk and checked against the model, not yet put into it."""

    def __init__(self, folder: str, weights: list[Any], optimizer: list[Any], extra: list[Any], state: Any):
        self.folder = folder
        self.weights = weights
        self.optimizer = optimizer
        self.extra = extra
        self.state = state


class FitRun:
    """One call of `fit`: restores before it, saves during it."""

    def __init__(self, flavour: Flavour, model: Any, index: int, epochs: int, store: Store) -> None:
        self.flavour = flavour
        self.model = model
        self.index = index
        self.epochs = epochs
        self.store = store
        self.every = 1 if _Notice.seen is not None else _every()
        self.next_notice_check = 0.0
        self.saved_epoch = -1
        self.snapshot: _Snapshot | None = None
        self.history: dict[str, list[float]] = {}  # as Keras's History: metric -> one value per epoch
        self.restored_epochs = 0  # the epochs whose history came from the checkpoint
        self.epoch_started = time.monotonic()

    # restore -----------------------------------------------------------------------------

    def restore(self) -> int | None:
        """Restore this fit's checkpoint into the model; the epochs it had done, or None.

        A fit that had finished, and whose model then trained on in a later fit (a loop of
        `fit(epochs=1)`), has no state of its own: the model gets that later fit's state (once
        for a run of such fits), trains nothing here, and resumes where the later fit left off.
        """
        directory = self.store.directory
        try:
            manifest = read_manifest(directory)
            if manifest is None:
                log(f"none yet in {directory}: fit {self.index} starts at epoch 1")
                return None
            entry = fit_entry(directory, manifest, self.index)
            if entry is None:
                log(f"{directory} has none for fit {self.index}: it starts at epoch 1")
                return None
            source, source_entry = continuation(directory, manifest, self.index, entry)
            if source != self.index and _State.holds_state_of(self.model, source):
                loaded = None  # a fit before this one put that state into this model already
            elif source != self.index:
                try:
                    loaded = self._load(directory, source, source_entry)
                except Invalid as e:  # recompiled or unfrozen since: finished all the same
                    log(
                        f"fit {self.index} had finished; fit {source}'s state does not fit its model "
                        f"here ({e}): it trains nothing, and fit {source} restores itself"
                    )
                    self._replayed_history(entry)
                    return max(int(entry["epoch"]), self.epochs)
            else:
                loaded = self._load(directory, source, source_entry)
        except Invalid as e:
            log(f"ignoring {directory}: {e}; fit {self.index} starts at epoch 1")
            return None
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
            log(f"ignoring {directory}: cannot read it ({why}); fit {self.index} starts at epoch 1")
            return None
        _State.forwarded = None
        if loaded is not None:
            self._apply(loaded)
        if source != self.index:
            _State.forwarded = (_ref(self.model), source)
        self._replayed_history(entry)
        epoch = int(entry["epoch"])
        self.saved_epoch = epoch
        _State.last_saved = (self.index, epoch)
        restored = f"restored epoch {source_entry['epoch']} from {loaded.folder}" if loaded else ""
        if source != self.index:
            epoch = max(epoch, self.epochs)
            if loaded:
                restored = f"restored epoch {source_entry['epoch']} of fit {source} from {loaded.folder}: "
            log(f"{restored}fit {self.index} had finished; its model trained on in fit {source}")
        elif entry.get("complete"):
            epoch = max(epoch, self.epochs)
            log(f"{restored}: fit {self.index} had finished")
        else:
            log(f"{restored}: fit {self.index} continues at epoch {epoch + 1}")
        return epoch

    def _replayed_history(self, entry: dict[str, Any]) -> None:
        """The metrics of the epochs the checkpoint holds, for the History this fit returns."""
        history = entry.get("history")
        if isinstance(history, dict) and all(isinstance(v, list) for v in history.values()):
            self.history = {str(k): list(v) for k, v in history.items()}
            self.restored_epochs = int(entry["epoch"])

    def _load(self, directory: str, fit: int, entry: dict[str, Any]) -> _Loaded:
        folder = os.path.join(directory, entry["folder"])
        weights = unpack_arrays(os.path.join(folder, "weights.npz"))
        current = self.flavour.weights(self.model)
        if not current:
            raise Invalid(f"fit {self.index}'s model has no weights before fit (not built)")
        if shapes(weights) != shapes(current):
            saved_by = f"fit {fit}'s checkpoint" if fit != self.index else "the checkpoint's"
            raise Invalid(
                f"fit {self.index}'s model does not match {saved_by} "
                f"(weight shapes {shapes(current)} here, {shapes(weights)} saved)"
            )
        with self.flavour.scope(self.model):  # a failure here is one restore() reports, and ignores
            self.flavour.prepare(self.model)
        optimizer = unpack_arrays(os.path.join(folder, "optimizer.npz"))
        extra = unpack_arrays(os.path.join(folder, "extra.npz"))
        if shapes(optimizer) != shapes(self.flavour.optimizer_state(self.model)):
            raise Invalid(f"fit {self.index}'s optimizer state does not match the checkpoint's")
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
        return _Loaded(folder, weights, optimizer, extra, state)

    def _apply(self, loaded: _Loaded) -> None:
        self.flavour.set_weights(self.model, loaded.weights)
        self.flavour.set_optimizer_state(self.model, loaded.optimizer)
        if shapes(loaded.extra) == shapes(self.flavour.extra_state(self.model)):
            self.flavour.set_extra_state(self.model, loaded.extra)
        else:
            log("the saved random-stream states do not match this model's: not restored")
        _set_global_rng_state(loaded.state.get("rng", {}))

    def merge_history(self, result: Any) -> None:
        """Put the restored epochs' metrics in front of what `fit` returns (its History)."""
        if not self.restored_epochs:
            return
        history = getattr(result, "history", None)
        if not isinstance(history, dict):
            return
        trained = {k: list(v) for k, v in history.items()}
        history.clear()
        for name, values in self.history.items():  # the restored epochs, then those trained here
            history[name] = values[: self.restored_epochs] + trained.pop(name, [])
        history.update(trained)
        epochs = getattr(result, "epoch", None)
        if isinstance(epochs, list):
            result.epoch = list(range(self.restored_epochs)) + [
                e for e in epochs if e >= self.restored_epochs
            ]

    # save --------------------------------------------------------------------------------

    def _capture(self, epoch: int, complete: bool, reason: str) -> _Snapshot:
        weights = self.flavour.weights(self.model)
        state = {"epoch": epoch, "fit": self.index, "rng": _global_rng_state()}
        payload = {
            "weights.npz": pack_arrays(weights),
            "optimizer.npz": pack_arrays(self.flavour.optimizer_state(self.model)),
            "extra.npz": pack_arrays(self.flavour.extra_state(self.model)),
            "state.json": (json.dumps(state, sort_keys=True) + "\n").encode("utf-8"),
        }
        entry = {
            "epochs": self.epochs,
            "complete": complete,
            "reason": reason,
            "weight_shapes": shapes(weights),
            "history": {name: values[:epoch] for name, values in self.history.items()},
        }
        return _Snapshot(epoch, payload, entry)

    def _write(self, snapshot: _Snapshot, why: str = "") -> None:
        try:
            keras = self.flavour.describe()
            continues = _State.earlier_fits_of(self.model, self.index)
            self.store.save(self.index, snapshot.epoch, snapshot.payload, snapshot.entry, keras, continues)
        except Exception as e:
            log(f"could not save epoch {snapshot.epoch} in {self.store.directory}: {type(e).__name__}: {e}")
            return
        self.saved_epoch = snapshot.epoch
        _State.last_saved = (self.index, snapshot.epoch)
        self.snapshot = None
        log(f"epoch {snapshot.epoch} saved{why}")
        _test_kill("saved", self.store.saves)

    def record_restored(self) -> None:
        """The restored epochs' metrics, from the checkpoint, as this instance's first lines:
        the epochs trained on a lost instance whose lines never came home stay in the series."""
        for epoch in range(1, self.restored_epochs + 1):
            logs = {name: values[epoch - 1] for name, values in self.history.items() if len(values) >= epoch}
            row = {"fit": self.index, "epoch": epoch, "epochs": self.epochs, "epoch_s": None, "at": utc_now()}
            _append_metrics(dict(row, logs=logs, restored=True))

    def epoch_begin(self, epoch: int) -> None:
        self.epoch_started = time.monotonic()
        _Progress.update(True, epoch=epoch + 1, step=0, started=self.epoch_started)

    def epoch_end(self, epoch: int, logs: Any = None) -> None:
        done = epoch + 1
        numbers = self._record(done, logs)
        epoch_s = round(time.monotonic() - self.epoch_started, 3)
        _append_metrics(
            {
                "fit": self.index,
                "epoch": done,
                "epochs": self.epochs,
                "epoch_s": epoch_s,
                "at": utc_now(),
                "logs": numbers,
            }
        )
        _Progress.update(True, done=done, epoch_s=epoch_s, logs=_finite(numbers))
        complete = done >= self.epochs or bool(getattr(self.model, "stop_training", False))
        try:
            if complete or done % self.every == 0:
                self._write(self._capture(done, complete, "epoch"))
            elif self.every > 1:
                self.snapshot = self._capture(done, False, "notice")  # for a notice before the next save
        except Exception as e:
            log(f"could not capture epoch {done}: {type(e).__name__}: {e}")
        if not complete:
            self.batch_end(force=True)  # at every epoch end, whatever the batches' throttle says
            if self.saved_epoch > 0:
                _hold_if_too_late(f"holding at epoch {self.saved_epoch} (saved)")

    def _record(self, done: int, logs: Any) -> dict[str, float]:
        """Keep epoch `done`'s metrics, as History does (numbers only; tensors become floats);
        they are returned."""
        for values in self.history.values():
            del values[done - 1 :]  # an epoch trained again after a restore replaces its values
        numbers = {}
        for name, value in dict(logs or {}).items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            numbers[str(name)] = number
            self.history.setdefault(str(name), []).append(number)
        return numbers

    def before_training(self) -> None:
        """Near the termination time, wait (saved) rather than start a fit that may be lost:
        the fit before it (a loop of `fit(epochs=1)`) saved at its end."""
        self.batch_end(force=True)
        if _State.last_saved is not None:
            fit, epoch = _State.last_saved
            _hold_if_too_late(f"holding before fit {self.index} (fit {fit}'s epoch {epoch} is saved)")

    def batch_end(self, force: bool = False) -> None:
        notice_file = os.environ.get(NOTICE_ENV, "")
        if not notice_file:
            return
        now = time.monotonic()
        if now < self.next_notice_check and not force:
            return
        self.next_notice_check = now + NOTICE_POLL_S
        try:
            st = os.stat(notice_file)
        except OSError:
            return
        seen = (st.st_mtime_ns, st.st_size)
        if seen == _Notice.seen:  # seen before, by this fit or an earlier one
            return
        _Notice.seen = seen
        self.on_notice(notice_file)

    def on_notice(self, notice_file: str) -> None:
        what = "a notice"
        with contextlib.suppress(Exception), open(notice_file, encoding="utf-8") as f:
            notice = json.load(f)
            what = "notice: {} {}".format(notice.get("kind", ""), notice.get("action", "")).strip()
            if notice.get("kind") == "spot-interruption" and notice.get("time"):
                _Notice.deadline = _epoch_seconds(str(notice["time"]))
        self.every = 1
        snapshot = self.snapshot
        if snapshot is not None and snapshot.epoch > self.saved_epoch:
            self._write(snapshot, f" at once ({what})")
        elif self.saved_epoch > 0:
            log(f"{what}: epoch {self.saved_epoch} is saved; from now on every epoch is")
        elif _State.last_saved is not None:
            fit, epoch = _State.last_saved
            log(f"{what}: fit {fit}'s epoch {epoch} is saved; from now on every epoch is")
        else:
            log(f"{what}: no epoch finished yet, nothing to save; from now on every epoch is")


class _Metrics:
    failed = False  # said once


def _finite(logs: dict[str, float]) -> dict[str, float | None]:
    """NaN and infinities as None (JSON has none)."""
    return {k: (v if v == v and abs(v) != float("inf") else None) for k, v in logs.items()}


def _append_metrics(row: dict[str, Any]) -> None:
    """One line of CLOUDTRAIN_METRICS_FILE."""
    path = os.environ.get(METRICS_ENV)
    if not path or _Metrics.failed:
        return
    row["logs"] = _finite(row["logs"])
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")  # logs in Keras's order
    except OSError as e:
        _Metrics.failed = True
        log(f"could not record metrics in {path}: {e}; training goes on")


class _Progress:
    """Where the hooked Keras calls stand, written to CLOUDTRAIN_PROGRESS_FILE."""

    state: dict[str, Any] = {}
    calls: list[dict[str, Any]] = []  # the states of the calls a nested one interrupted
    written = 0.0  # time.monotonic() of the last write
    failed = False  # said once

    @classmethod
    def begin(cls, call: str, **state: Any) -> None:
        """A hooked call starts (inside another one, e.g. fit's validation: that one resumes
        at its end)."""
        cls.calls.append(cls.state)  # a nested call keeps the outer one's fit, epoch, ...
        cls.state = dict(cls.state, call=call, active=True, step=0, steps=None, **state)
        cls.update(True)

    @classmethod
    def end(cls) -> None:
        cls.state = cls.calls.pop() if cls.calls else {}
        cls.update(True, active=bool(cls.calls))

    @classmethod
    def update(cls, force: bool = False, **changes: Any) -> None:
        """Take ``changes``; write the file when ``force``, or PROGRESS_EVERY_S after the last write."""
        cls.state.update(changes)
        now = time.monotonic()
        if not force and now - cls.written < PROGRESS_EVERY_S:
            return
        path = os.environ.get(PROGRESS_ENV)
        if not path or cls.failed:
            return
        cls.written = now
        row = {key: value for key, value in cls.state.items() if key != "started"}
        row.setdefault("active", False)
        if "started" in cls.state:
            row["epoch_elapsed_s"] = round(now - cls.state["started"], 3)
        row["at"] = utc_now()
        try:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write(json.dumps(row))
            os.replace(path + ".tmp", path)
        except (OSError, TypeError, ValueError) as e:
            cls.failed = True
            log(f"could not record progress in {path}: {e}; training goes on")


def _total_steps(params: Any) -> int | None:
    """The batches of an epoch (or of an evaluate/predict call), from a callback's params:
    Keras 3 and tf_keras give `steps`; Keras 2.3.1 with arrays `samples` and `batch_size`."""
    params = params if isinstance(params, dict) else {}
    steps = params.get("steps")
    if isinstance(steps, int) and steps > 0:
        return steps
    samples, batch = params.get("samples"), params.get("batch_size")
    if isinstance(samples, int) and isinstance(batch, int) and batch > 0:
        return -(-samples // batch)
    return None


class _Notice:
    """The interruption notice, for the whole process (a loop of fits sees it once)."""

    seen: tuple[int, int] | None = None  # the notice file's (mtime_ns, size) when last read
    deadline: float | None = None  # when the instance is taken (time.time()), from a spot notice


def _hold_if_too_late(holding: str) -> None:
    """Near the termination time, wait (saved) rather than start an epoch that may be lost."""
    if _Notice.deadline is None:
        return
    left = _Notice.deadline - time.time()
    if left > _margin():
        return
    log(f"the instance is taken in {max(0.0, left):.0f} s: {holding} so that no finished epoch is lost")
    while time.time() < _Notice.deadline + HOLD_PAST_DEADLINE_S:
        time.sleep(0.5)
    log("still here after the termination time: training carries on")
    _Notice.deadline = None


def _margin() -> float:
    try:
        return max(0.0, float(os.environ.get(MARGIN_ENV, DEFAULT_MARGIN_S)))
    except ValueError:
        return DEFAULT_MARGIN_S


def _epoch_seconds(iso_utc: str) -> float | None:
    """``2026-11-28T12:02:00Z`` as time.time() seconds (None if it is not that form)."""
    try:
        moment = datetime.datetime.strptime(iso_utc.replace("+00:00", "Z"), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


def _every() -> int:
    try:
        return max(1, int(os.environ.get(EVERY_ENV, "1")))
    except ValueError:
        return 1


def make_callback(flavour: Flavour, run: FitRun) -> Any:
    base = flavour.callback_base()

    class CloudtrainCheckpoint(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self._supports_tf_logs = True  # logs stay tensors: no device sync per batch

        def on_train_begin(self, logs: Any = None) -> None:
            _Progress.update(True, steps=_total_steps(getattr(self, "params", None)))

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            run.epoch_begin(epoch)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            run.epoch_end(epoch, logs)

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            _Progress.update(batch + 1 == _Progress.state.get("steps"), step=batch + 1)  # the last, always
            run.batch_end()

        def on_test_batch_end(self, batch: int, logs: Any = None) -> None:
            _Progress.update()  # validation inside fit is progress too

    return CloudtrainCheckpoint()


def make_step_callback(flavour: Flavour) -> Any:
    """Counts the batches of an `evaluate` or `predict` call in the progress file."""
    base = flavour.callback_base()

    class CloudtrainSteps(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self._supports_tf_logs = True

        def _begin(self, logs: Any = None) -> None:
            _Progress.update(True, steps=_total_steps(getattr(self, "params", None)))

        def _step(self, batch: int, logs: Any = None) -> None:
            _Progress.update(step=batch + 1)

        on_test_begin = on_predict_begin = _begin
        on_test_batch_end = on_predict_batch_end = _step

    return CloudtrainSteps()


def _ref(model: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(model)
    except TypeError:  # not weakly referenceable: never taken for another fit's model
        return lambda: None


class _State:
    fits = 0
    store: Store | None = None
    models: list[tuple[int, Callable[[], Any]]] = []  # (fit, its model) for each fit so far
    forwarded: tuple[Callable[[], Any], int] | None = None  # a model given a later fit's state
    last_saved: tuple[int, int] | None = None  # (fit, epoch) last saved or restored

    @classmethod
    def earlier_fits_of(cls, model: Any, fit: int) -> tuple[int, ...]:
        return tuple(i for i, ref in cls.models if i < fit and ref() is model)

    @classmethod
    def holds_state_of(cls, model: Any, fit: int) -> bool:
        return cls.forwarded is not None and cls.forwarded[1] == fit and cls.forwarded[0]() is model


def _store() -> Store:
    if _State.store is None:
        _State.store = Store(os.path.abspath(os.environ.get(DIR_ENV, "checkpoints")))
    return _State.store


def wrap_fit(cls: Any, flavour: Flavour, method: str = "fit") -> None:
    """Replace `cls.<method>` by one that restores and checkpoints (once per class)."""
    original = getattr(cls, method, None)
    if original is None or getattr(original, _WRAPPED, False):
        return
    signature = inspect.signature(original)
    if not {"epochs", "initial_epoch", "callbacks"} <= set(signature.parameters):
        log(f"{cls.__name__}.{method} has no epochs/initial_epoch/callbacks: not wrapped")
        return

    def fit(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return original(self, *args, **kwargs)  # Keras says what is wrong
        index = _State.fits
        _State.fits += 1
        _State.models.append((index, _ref(self)))
        arguments = bound.arguments
        epochs = arguments.get("epochs", signature.parameters["epochs"].default)
        initial = arguments.get("initial_epoch", signature.parameters["initial_epoch"].default) or 0
        run = FitRun(flavour, self, index, int(epochs), _store())
        done = run.restore()
        run.record_restored()
        if done is not None and done > initial:
            arguments["initial_epoch"] = initial = done
        if initial < run.epochs:
            _State.forwarded = None  # this model trains: it no longer holds a saved state
            run.before_training()
        callbacks = arguments.get("callbacks")
        callbacks = list(callbacks) if callbacks else []
        callbacks.append(make_callback(flavour, run))
        arguments["callbacks"] = callbacks
        _Progress.begin("fit", fit=index, epoch=initial + 1, epochs=run.epochs, done=initial)
        try:
            result = original(*bound.args, **bound.kwargs)
        finally:
            _Progress.end()
        run.merge_history(result)
        return result

    _install(cls, method, original, fit)


def _install(cls: Any, method: str, original: Any, wrapper: Callable[..., Any]) -> None:
    """``wrapper`` as `cls.<method>`, named and documented as ``original``, marked wrapped."""
    wrapper.__name__ = getattr(original, "__name__", method)
    wrapper.__doc__ = getattr(original, "__doc__", None)
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(wrapper, _WRAPPED, True)
    setattr(cls, method, wrapper)


def wrap_steps(cls: Any, flavour: Flavour, method: str) -> None:
    """Make `cls.<method>` (evaluate, predict) count its batches in the progress file (once
    per class). Callbacks given as a list are extended; a CallbackList (Keras 3's fit passes
    its own to evaluate for validation) is left as it is: fit's callback counts those."""
    original = getattr(cls, method, None)
    if original is None or getattr(original, _WRAPPED, False):
        return
    signature = inspect.signature(original)
    if "callbacks" not in signature.parameters:
        return

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return original(self, *args, **kwargs)  # Keras says what is wrong
        callbacks = bound.arguments.get("callbacks")
        if callbacks is None or isinstance(callbacks, (list, tuple)):
            bound.arguments["callbacks"] = [*(callbacks or ()), make_step_callback(flavour)]
        _Progress.begin(method)
        try:
            return original(*bound.args, **bound.kwargs)
        finally:
            _Progress.end()

    _install(cls, method, original, call)


def _wrap(cls: Any, flavour: Flavour, *fits: str) -> None:
    for method in fits:
        wrap_fit(cls, flavour, method)
    for method in ("evaluate", "predict"):
        wrap_steps(cls, flavour, method)


def _hook_keras(module: Any) -> None:
    keras = sys.modules.get("keras", module)
    version = str(getattr(keras, "__version__", ""))
    if version.startswith("3."):
        _wrap(keras.Model, Keras3(keras), "fit")
    elif version.startswith("2.") and hasattr(keras, "engine") and hasattr(keras.engine, "training"):
        model = keras.engine.training.Model
        if getattr(model, "__module__", "").startswith("keras."):  # multi-backend Keras 2.x
            _wrap(model, Keras2(keras), "fit", "fit_generator")
    # Otherwise `keras` is tf_keras (keras2shim.py), wrapped by its own hook.


def _hook_tf_keras(module: Any) -> None:
    _wrap(module.Model, TfKeras(module), "fit")


def import_hooks() -> dict[str, list[Callable[[Any], None]]]:
    """The post-import hooks the run's sitecustomize installs (runsite.py)."""
    return {"keras": [_hook_keras], "tf_keras": [_hook_tf_keras]}
