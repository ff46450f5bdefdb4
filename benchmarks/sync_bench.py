"""Benchmark: cloudtrain's sync against rsync and tar over the same ssh, side by side.

    python benchmarks/sync_bench.py [--files 10000] [--big-mib 1024] [--reps 3] [--tmp /tmp]

Starts a real OpenSSH sshd on loopback (as in the tests), then, in this one run:

(a) first sync of FILES 4-KiB files in 100 folders: cloudtrain (``sync_workdir``: collect + push)
    vs ``rsync -a -e 'ssh ...'`` vs ``tar c | ssh tar x``;
(b) first sync of one BIG-MiB file, the same three ways;
(c) a no-op re-sync of (a): cloudtrain vs rsync;
(d) one changed file in (a): what cloudtrain sends, and cloudtrain vs rsync.

All three use the same ssh client command line (cloudtrain's: its cipher order and
options, the pinned host key). rsync and tar pay their own ssh handshake, as they
would. cloudtrain is timed twice where the handshake weighs: with its SSH session
already connected (``ct``: as during a run, where it was opened to provision the
instance) and connecting inside the timing (``ct+connect``: the fair comparison with
rsync, which pays its own). Each measurement runs REPS times, the tools interleaved
in rotating order, every destination removed and the disk synced first. The last
line gives the ratios of the medians: other/cloudtrain, above 1 means cloudtrain
was faster (on a busy machine single repetitions vary several-fold); the line before
it, the ratios of the best times.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sshd import SshServer, missing_reason, start_sshd  # noqa: E402

from cloudtrain.remote.session import Session  # noqa: E402
from cloudtrain.remote.sync import OpenSSH, SyncReport, sync_workdir, upload_tree  # noqa: E402


def make_small(folder: Path, count: int, size: int = 4096) -> None:
    for i in range(count):
        sub = folder / f"d{i % 100:03d}"
        if i < 100:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:06d}.bin").write_bytes(os.urandom(size))


def make_big(path: Path, mib: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(block[:-8] + i.to_bytes(8, "little"))


class Bench:
    def __init__(self, server: SshServer, session: Session, work: Path, agent: Path) -> None:
        self.server = server
        self.session = session
        self.work = work
        self.agent = agent
        self.ssh = OpenSSH(session)
        self.ssh_cmd = shlex.join(self.ssh.client_argv())
        self.host = server.host
        self.last_report: SyncReport | None = None

    def fresh(self, dest: Path) -> None:
        shutil.rmtree(dest, ignore_errors=True)
        os.sync()
        time.sleep(0.5)

    def cloudtrain(self, src: Path, dest: Path, cache: Path) -> float:
        start = time.perf_counter()
        self.last_report = sync_workdir(
            self.session,
            src,
            str(dest),
            cache_dir=cache,
            remote_python=sys.executable,
            remote_agent_path=str(self.agent),
        )
        return time.perf_counter() - start

    def cloudtrain_connecting(self, src: Path, dest: Path, cache: Path) -> float:
        """As ``cloudtrain``, on a new SSH session connected inside the timing."""
        start = time.perf_counter()
        with Session(self.server.endpoint()) as session:
            self.last_report = sync_workdir(
                session,
                src,
                str(dest),
                cache_dir=cache,
                remote_python=sys.executable,
                remote_agent_path=str(self.agent),
            )
        return time.perf_counter() - start

    def rsync(self, src: Path, dest: Path) -> float:
        start = time.perf_counter()
        subprocess.run(
            ["rsync", "-a", "-e", self.ssh_cmd, f"{src}/", f"{self.host}:{dest}/"],
            check=True,
            stdin=subprocess.DEVNULL,
        )
        return time.perf_counter() - start

    def tar(self, src: Path, dest: Path) -> float:
        remote = f"mkdir -p {shlex.quote(str(dest))} && tar xf - -C {shlex.quote(str(dest))}"
        start = time.perf_counter()
        subprocess.run(
            f"tar cf - -C {shlex.quote(str(src))} . | {self.ssh_cmd} {self.host} {shlex.quote(remote)}",
            shell=True,
            check=True,
            stdin=subprocess.DEVNULL,
        )
        return time.perf_counter() - start


def first_sync(bench: Bench, name: str, src: Path, reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"cloudtrain": [], "rsync": [], "tar": []}
    order = list(times)
    for rep in range(reps):
        for tool in order[rep % 3 :] + order[: rep % 3]:
            dest = bench.work / f"dst-{name}-{tool}"
            bench.fresh(dest)
            if tool == "cloudtrain":
                cache = bench.work / f"cache-{name}-{rep}"
                t = bench.cloudtrain(src, dest, cache)
                assert bench.last_report is not None and bench.last_report.files_sent > 0
            elif tool == "rsync":
                t = bench.rsync(src, dest)
            else:
                t = bench.tar(src, dest)
            times[tool].append(t)
            print(f"  {name} {tool:10s} rep {rep + 1}: {t:7.3f} s", flush=True)
    return times


def best(values: list[float]) -> float:
    return min(values)


def describe(name: str, times: dict[str, list[float]], size_bytes: int) -> None:
    for tool, values in times.items():
        rate = size_bytes / best(values) / 1e6
        print(
            f"{name} {tool:10s} best {best(values):7.3f} s  median {statistics.median(values):7.3f} s"
            f"  ({rate:6.1f} MB/s)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="a folder on the local disk")
    args = parser.parse_args()
    reason = missing_reason() or (None if shutil.which("rsync") else "rsync is missing")
    if reason:
        print(f"sync_bench: skipped: {reason}")
        return 0
    with tempfile.TemporaryDirectory(prefix="sync-bench-", dir=args.tmp) as tmp:
        work = Path(tmp)
        server = start_sshd(work / "sshd")
        try:
            return run(server, work, args)
        finally:
            server.stop()


def run(server: SshServer, work: Path, args: argparse.Namespace) -> int:
    small, big = work / "src-small", work / "src-big"
    print(f"making {args.files} files of 4 KiB and a {args.big_mib} MiB file in {work} ...", flush=True)
    make_small(small, args.files)
    make_big(big / "big.bin", args.big_mib)
    time.sleep(2.1)  # older than the hash cache's racy window, as a user's files are
    session = Session(server.endpoint()).connect()
    agent = work / "agent"
    upload_tree(session, ROOT / "cloudtrain" / "agent", str(agent / "cloudtrain_agent"))
    bench = Bench(server, session, work, agent)
    try:
        print("(a) first sync, small files", flush=True)
        small_times = first_sync(bench, "small", small, args.reps)
        print("(b) first sync, one big file", flush=True)
        big_times = first_sync(bench, "big", big, args.reps)

        print("(c) no-op re-sync of the small files", flush=True)
        ct_dest, rs_dest = work / "dst-small-cloudtrain", work / "dst-small-rsync"
        cache = work / "cache-noop"
        bench.fresh(ct_dest)
        bench.cloudtrain(small, ct_dest, cache)  # a full sync fills the hash cache
        bench.rsync(small, rs_dest)
        runs: dict[str, Callable[[], float]] = {
            "cloudtrain": lambda: bench.cloudtrain(small, ct_dest, cache),
            "ct+connect": lambda: bench.cloudtrain_connecting(small, ct_dest, cache),
            "rsync": lambda: bench.rsync(small, rs_dest),
        }
        noop = interleaved(bench, runs, max(args.reps, 3), "noop", sent=0)

        print("(d) one changed file", flush=True)
        changed = sorted((small / "d042").iterdir())[0]

        def change(run: Callable[[], float]) -> Callable[[], float]:
            def changed_then_run() -> float:
                changed.write_bytes(os.urandom(4096))  # a new change for each tool and rep
                return run()

            return changed_then_run

        one = interleaved(
            bench, {tool: change(run) for tool, run in runs.items()}, max(args.reps, 3), "one", sent=1
        )
        report = bench.last_report
        assert report is not None
        print(
            f"  one change: cloudtrain sent {report.files_sent} file(s), {report.bytes_sent} bytes: "
            + ", ".join(report.sent)
        )
    finally:
        bench.ssh.close()
        session.close()

    small_bytes, big_bytes = args.files * 4096, args.big_mib << 20
    print()
    describe(f"small x{args.files}", small_times, small_bytes)
    describe(f"big {args.big_mib} MiB", big_times, big_bytes)
    for name, times in (("noop", noop), ("one change", one)):
        for tool, values in times.items():
            print(f"{name} {tool:10s} best {best(values):7.3f} s  median {statistics.median(values):7.3f} s")

    def ratios(pick: Callable[[list[float]], float]) -> str:
        def r(times: dict[str, list[float]], other: str, base: str = "cloudtrain") -> str:
            return f"{pick(times[other]) / pick(times[base]):.2f}"

        return (
            f"small files rsync/ct={r(small_times, 'rsync')} tar/ct={r(small_times, 'tar')}; "
            f"{args.big_mib}MiB rsync/ct={r(big_times, 'rsync')} tar/ct={r(big_times, 'tar')}; "
            f"noop rsync/ct={r(noop, 'rsync')} rsync/ct+connect={r(noop, 'rsync', 'ct+connect')}; "
            f"one-change rsync/ct={r(one, 'rsync')} rsync/ct+connect={r(one, 'rsync', 'ct+connect')}"
        )

    print(f"best times: {ratios(best)}")
    print(
        f"sync_bench (medians): {ratios(statistics.median)}; "
        f"one-change sent={report.files_sent} file ({report.bytes_sent} bytes)"
    )
    return 0


def interleaved(
    bench: Bench, runs: dict[str, Callable[[], float]], reps: int, name: str, *, sent: int
) -> dict[str, list[float]]:
    """Each tool ``reps`` times, in rotating order; cloudtrain must have sent ``sent`` files."""
    times: dict[str, list[float]] = {tool: [] for tool in runs}
    order = list(runs)
    for rep in range(reps):
        for tool in order[rep % len(order) :] + order[: rep % len(order)]:
            t = runs[tool]()
            if tool != "rsync":
                assert bench.last_report is not None and bench.last_report.files_sent == sent
            times[tool].append(t)
            print(f"  {name} {tool:10s} rep {rep + 1}: {t:7.3f} s", flush=True)
    return times


if __name__ == "__main__":
    sys.exit(main())
