"""How long this machine takes to wake a process that waited on a socket, by how long it waited.

Two processes ping-pong one byte over a socket pair; the answering side first busy-works W ms (as a server
works on a request while its client waits). The table gives the round trip minus W: the cost of the two
wake-ups. On a machine whose idle cores halt (a VM without guest halt-polling), it grows with W, and every
served request pays it where an in-process loop does not; docs/benchmarks.md uses it to explain part of the
one-client gap of ``bench_serve.py``.

    python benchmarks/bench_wakeup.py
    python benchmarks/bench_wakeup.py --work-ms 0,1,5,25 --markdown
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import format_table, machine_info, percentile  # noqa: E402


def _answer(sock: socket.socket) -> None:
    """The answering process: busy-work the asked number of seconds, then reply."""
    while True:
        message = sock.recv(32)
        if not message:
            return
        until = time.perf_counter() + float(message.decode())
        while time.perf_counter() < until:
            pass
        sock.sendall(b"k")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--work-ms", default="0,0.5,2,5,20",
                        help="comma list of work times (default 0,0.5,2,5,20)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="measured seconds per work time (default 2)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    works = [float(x) / 1000.0 for x in args.work_ms.split(",") if x.strip()]

    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the answering process
        ours.close()
        try:
            _answer(theirs)
        finally:
            os._exit(0)
    theirs.close()
    rows = []
    try:
        for work in works:
            request = f"{work:.6f}".encode()
            overheads: list[float] = []
            until = time.perf_counter() + args.seconds
            while time.perf_counter() < until or len(overheads) < 20:
                t0 = time.perf_counter()
                ours.sendall(request)
                ours.recv(1)
                overheads.append(time.perf_counter() - t0 - work)
            rows.append(
                [
                    f"{work * 1e3:g}",
                    len(overheads),
                    f"{statistics.median(overheads) * 1e6:.1f}",
                    f"{percentile(overheads, 90) * 1e6:.1f}",
                ]
            )
    finally:
        ours.close()
        os.waitpid(pid, 0)
    info = machine_info()
    print("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + "\n")
    headers = ["work ms", "round trips", "wake-up cost µs (median)", "p90 µs"]
    print(format_table(headers, rows, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
