"""The presence join storm: N phoenix.js 1.8 sockets (real, unmodified, under Node: tests/interop/
presence_storm.js) join one topic as fast as `--rate` lets them, on a topic with presence and on
one without, each with a fresh pusherd. Figures: seconds until every socket's list holds the N
members (without presence: until every socket joined), frames and bytes the sockets received,
the server's CPU seconds (user + system, /proc/<pid>/stat) and RSS growth, the client's CPU.
Prints a table; asserts nothing but that every list is the server's.

    python bench/presence_join_storm.py [--sizes 1000,5000] [--rate 1000] [--interval 0.1] [--json FILE]

pusherd runs pinned to CPU 0, Node to the others (`os.sched_setaffinity`), with `log_level: info`,
`access_log: false`, `max_outbox_bytes: 16MiB` (a 5,000-member list is a 450 KB frame: see
docs/presence.md, "Windows and scale"), otherwise defaults.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from presence_storm import run_storm  # noqa: E402
from pusherd_testing import GUARDIAN_SECRET, PUBLISH_SECRET, Pusherd  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> float:
    return int(Path("/proc/%d/statm" % pid).read_text().split()[1]) * PAGE / 1e6


def one_run(n: int, presence: bool, rate: int, interval: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="pusherd-presence-bench-"))
    topic = "private:storm" if presence else "room:storm"
    daemon = Pusherd(tmp, {"presence": [{"topics": "private:*", "key": "id", "meta": ["name"], "limit": n}],
                           "presence_interval": interval, "log_level": "info", "access_log": False,
                           "max_outbox_bytes": 16 * 1024 * 1024, "max_connections": n + 100})
    daemon.start()
    try:
        pid = daemon.proc.pid
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) > 1:
            os.sched_setaffinity(pid, {cpus[0]})
            os.sched_setaffinity(0, set(cpus[1:]))   # Node inherits it
        time.sleep(0.5)
        cpu0, rss0 = cpu_seconds(pid), rss_mb(pid)

        def server_list():
            status, body, _ = daemon.request("GET", "/presence?topic=" + topic,
                                             headers={"Authorization": "Bearer " + PUBLISH_SECRET}, timeout=60)
            return body if status == 200 else {}

        summary = run_storm(daemon.ws_url, topic, n, GUARDIAN_SECRET, presence=presence,
                            server_list=server_list if presence else None, rate=rate, timeout=600)
        summary["server_cpu"] = cpu_seconds(pid) - cpu0
        summary["server_rss_mb"] = rss_mb(pid) - rss0
        if presence:
            summary["lists_match"] = summary["lists"] == {summary["server"]["digest"]: n}
        summary["evicted"] = sum("slow consumer" in line for line in daemon.lines)
        return summary
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        daemon.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,5000")
    p.add_argument("--rate", type=int, default=1000, help="sockets opened per second (default 1000)")
    p.add_argument("--interval", type=float, default=0.1, help="presence_interval (default 0.1 s)")
    p.add_argument("--json", help="write the runs here")
    args = p.parse_args()
    runs = []
    for n in [int(x) for x in args.sizes.split(",")]:
        for presence in (True, False):
            run = one_run(n, presence, args.rate, args.interval)
            run["n"], run["presence"] = n, presence
            runs.append(run)
            print("%5d %-11s complete=%s in %.1fs (all joined %.1fs), %d frames, %.1f MB, server CPU %.2fs, "
                  "RSS +%.0f MB, client CPU %.1fs%s" % (
                      n, "presence" if presence else "no presence", run["complete"], run["seconds"],
                      run["joined_seconds"] or -1, run["frames"], run["bytes"] / 1e6, run["server_cpu"],
                      run["server_rss_mb"], run["cpu_seconds"],
                      "" if not presence else ", lists match the server's: %s" % run["lists_match"]), flush=True)
    print()
    print("| members | topic | every list complete (s) | all joined (s) | frames received | frames ÷ N² | MB received "
          "| server CPU (s) | server RSS growth (MB) | client CPU (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print("| %d | %s | %s | %.1f | %d | %.4f | %.1f | %.2f | %.0f | %.1f |" % (
            r["n"], "presence" if r["presence"] else "no presence",
            "%.1f" % r["seconds"] if r["presence"] and r["complete"] else ("—" if not r["presence"] else "incomplete"),
            r["joined_seconds"] or -1, r["frames"], r["frames"] / r["n"] ** 2, r["bytes"] / 1e6, r["server_cpu"],
            r["server_rss_mb"], r["cpu_seconds"]))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
