"""Stream a job's outputs to stdout, for pull-back (runs on the instance).

    python3 -m cloudtrain_agent.pack --root WORKDIR --paths P1 [P2 ...] [--max-bytes N]

Writes the stream format of ``receive`` (put records, each file's sha256 in the
trailer after its bytes, read once), with paths relative to WORKDIR. Folders are
walked (symlinks are not followed into folders). Left out, each with a ``skip``
record saying why: paths with ``..`` or absolute ones, missing paths, symlinks that
point outside WORKDIR (a symlink to a file inside it is sent as that file's content),
symlinks to folders, devices, pipes and sockets, and files past ``--max-bytes`` (the
total size cap). The last record is ``end`` with the totals.

``--checkpoint``: each path is a checkpoint folder (checkpoint.py's format), and what is
sent is its latest save alone, whole: a hard-link snapshot (``checkpoint.snapshot``) taken
at the start into ``ROOT/.pack-snapshot-<pid>/<path>`` and streamed under the same paths,
then removed. However often the trainer saves and prunes meanwhile, the copy is one
complete save (streaming the live folder, a copy slower than two saves found the folders
its manifest named already pruned). A snapshot left by a pack that was killed goes at the
next one's start.

Standard library only, Python 3.7+.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
from typing import Iterator

from .checkpoint import Invalid, snapshot
from .wire import MAGIC, READ_SIZE, FileReader, PathRefused, check_relpath, end_header, skip_header

DEFAULT_MAX_BYTES = 16 << 30
FLUSH_AT = 1 << 18
SNAPSHOT_PREFIX = ".pack-snapshot-"


class Packer:
    """Walks the requested paths under ``root`` and yields the stream's chunks."""

    def __init__(self, root: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = os.path.abspath(root)
        self.real_root = os.path.realpath(self.root)
        self.max_bytes = max_bytes
        self.files = 0
        self.bytes = 0
        self.skipped = 0
        self.buffer = bytearray(READ_SIZE)

    def _inside(self, real: str) -> bool:
        return real == self.real_root or real.startswith(self.real_root.rstrip("/") + "/")

    def stream(self, paths: list[str]) -> Iterator[bytes | memoryview]:
        yield MAGIC
        seen: set[str] = set()
        for raw in paths:
            path = raw.rstrip("/")
            try:
                check_relpath(path)
            except PathRefused as e:
                self.skipped += 1
                yield skip_header(raw, f"refused: {e}")
                continue
            full = os.path.join(self.root, path)
            if not self._inside(os.path.realpath(os.path.dirname(full))):
                self.skipped += 1
                yield skip_header(path, "a parent folder is a symlink pointing outside the workdir")
                continue
            try:
                st = os.lstat(full)
            except OSError:
                self.skipped += 1
                yield skip_header(path, "missing")
                continue
            if stat.S_ISDIR(st.st_mode):
                for rel, entry_st in self._walk(path):
                    yield from self._entry(rel, entry_st, seen)
            else:
                yield from self._entry(path, st, seen)
        yield end_header(files=self.files, bytes=self.bytes, skipped=self.skipped)

    def _walk(self, top: str) -> Iterator[tuple[str, os.stat_result]]:
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(os.path.join(self.root, folder)) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError:
                continue
            subfolders = []
            for entry in entries:
                rel = folder + "/" + entry.name
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    subfolders.append(rel)
                else:
                    yield rel, st
            stack.extend(reversed(subfolders))

    def _entry(self, rel: str, st: os.stat_result, seen: set[str]) -> Iterator[bytes | memoryview]:
        if rel in seen:
            return
        seen.add(rel)
        full = os.path.join(self.root, rel)
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(full)
            if not self._inside(real):
                self.skipped += 1
                yield skip_header(rel, "a symlink pointing outside the workdir")
                return
            try:
                st = os.stat(full)
            except OSError:
                self.skipped += 1
                yield skip_header(rel, "a dangling symlink")
                return
            if stat.S_ISDIR(st.st_mode):
                self.skipped += 1
                yield skip_header(rel, "a symlink to a folder")
                return
        if not stat.S_ISREG(st.st_mode):
            self.skipped += 1
            yield skip_header(rel, "not a regular file (device, pipe or socket)")
            return
        if self.bytes + st.st_size > self.max_bytes:
            self.skipped += 1
            yield skip_header(rel, f"over the size cap of {self.max_bytes} bytes")
            return
        reader = FileReader(full, st.st_size, st.st_mtime_ns, self.buffer)
        yield from reader.record(rel, stat.S_IMODE(st.st_mode))
        self.files += 1
        self.bytes += st.st_size


def write_all(fd: int, chunks: Iterator[bytes | memoryview]) -> None:
    """Write the chunks to ``fd``, small ones gathered into larger writes."""
    pending = bytearray()
    for chunk in chunks:
        if len(chunk) >= FLUSH_AT:
            if pending:
                _write(fd, pending)
                del pending[:]
            _write(fd, chunk)
        else:
            pending += chunk
            if len(pending) >= FLUSH_AT:
                _write(fd, pending)
                del pending[:]
    if pending:
        _write(fd, pending)


def _write(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def take_snapshots(root: str, paths: list[str]) -> str:
    """--checkpoint: a snapshot of each checkpoint folder's latest save, under the folder
    returned (streamed as the root); a path with no checkpoint yet is left out (missing)."""
    remove_stale_snapshots(root)
    stage = os.path.join(root, f"{SNAPSHOT_PREFIX}{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    for raw in paths:
        path = check_relpath(raw.rstrip("/"))
        snapshot(os.path.join(root, path), os.path.join(stage, path))
    return stage


def remove_stale_snapshots(root: str) -> None:
    """Snapshots of packs that are gone (killed with their SSH session, say)."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        pid = name[len(SNAPSHOT_PREFIX) :]
        if name.startswith(SNAPSHOT_PREFIX) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloudtrain_agent.pack", description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="the workdir the paths are relative to")
    parser.add_argument("--paths", nargs="+", required=True, help="files or folders under the root")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="cap on the total size")
    parser.add_argument(
        "--checkpoint",
        action="store_true",
        help="the paths are checkpoint folders: send a snapshot of each one's latest save",
    )
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        sys.stderr.write(f"cloudtrain pack: {args.root} is not a folder\n")
        return 1
    root, stage = args.root, ""
    try:
        if args.checkpoint:
            try:
                root = stage = take_snapshots(args.root, args.paths)
            except (Invalid, PathRefused, OSError) as e:
                sys.stderr.write(f"cloudtrain pack: no snapshot of the checkpoint: {e}\n")
                return 1
        packer = Packer(root, args.max_bytes)
        write_all(sys.stdout.fileno(), packer.stream(args.paths))
    except BrokenPipeError:
        return 1
    finally:
        if stage:
            shutil.rmtree(stage, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
