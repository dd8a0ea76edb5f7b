"""One fan-out run with the server's user and system CPU apart, and optionally a profile of it.

    python bench/profile_fanout.py                      # pusherd, 5000 sockets, 6 s
    python bench/profile_fanout.py --kind floor -n 10000
    python bench/profile_fanout.py --perf /tmp/perf.data        # then: perf report -i /tmp/perf.data
    python bench/profile_fanout.py --py-spy /tmp/spy.txt        # collapsed stacks (py-spy record -f raw)

The same scenario as ``run.py --only fanout`` (same servers, pinning and load generator), for the
question run.py's table cannot answer: where a contender's CPU per message goes. The profiler
attaches after ``--delay`` seconds, once the sockets have joined, and stops before the end.
"""

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (bench/run.py: Pool, Server, fanout)


def user_system(pid: int):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / run.CLK, int(fields[12]) / run.CLK


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="pusherd", choices=["pusherd", "baseline", "floor"])
    ap.add_argument("-n", type=int, default=5000, help="joined sockets")
    ap.add_argument("--seconds", type=float, default=6.0, help="publishing phase")
    ap.add_argument("--delay", type=float, default=2.0, help="seconds before the profiler attaches")
    ap.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    ap.add_argument("--perf", metavar="FILE", help="record with perf (call graphs) into FILE")
    ap.add_argument("--py-spy", metavar="FILE", help="record with py-spy (raw collapsed stacks) into FILE")
    opts = ap.parse_args(argv)
    opts.fast = None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        opts.server_cpus, opts.client_cpus = {cpus[0]}, set(cpus[1:])
        os.sched_setaffinity(0, opts.client_cpus)
    else:
        opts.server_cpus = opts.client_cpus = None
    run.loadgen.raise_nofile()
    pool = run.Pool(2, opts.client_cpus, opts.loop)
    server = run.Server(opts.kind, opts)
    profiler = []
    try:
        length = str(max(1, int(opts.seconds - opts.delay - 1)))
        if opts.perf:
            cmd = ["perf", "record", "-F", "999", "-g", "-p", str(server.proc.pid), "-o", opts.perf, "--", "sleep", length]
        elif opts.py_spy:
            cmd = ["py-spy", "record", "-p", str(server.proc.pid), "-r", "250", "-d", length, "-f", "raw",
                   "-o", opts.py_spy]
        else:
            cmd = None

        def attach():
            time.sleep(opts.delay)
            profiler.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        marks = []
        cpu = server.cpu

        def marking_cpu():  # run.fanout reads the server's CPU at the start and the end of the phase
            marks.append(user_system(server.proc.pid))
            return cpu()

        server.cpu = marking_cpu
        if cmd:
            threading.Thread(target=attach, daemon=True).start()
        result = run.fanout(pool, server, opts.n, opts.seconds)
        for p in profiler:
            p.wait()
        (u0, s0), (u1, s1) = marks[0], marks[-1]
        n = max(1, result["delivered"])
        print(run._fmt(result))
        print("%s: user %.2f µs + system %.2f µs per delivered message" % (opts.kind, 1e6 * (u1 - u0) / n,
                                                                            1e6 * (s1 - s0) / n))
    finally:
        server.stop()
        pool.exit()


if __name__ == "__main__":
    main()
