"""Where a connect-and-join storm's server CPU goes: pusherd under cProfile while N clients connect
and join at once, the self time grouped by where the code lives, and the garbage collector's time.

    python bench/profile_storm.py                          # 5,000 clients, a Rails token each
    python bench/profile_storm.py --anonymous -n 5000      # joins of a public topic, no token
    python bench/profile_storm.py --root /work/wt/before   # pusherd from another checkout
    python bench/profile_storm.py --no-profile             # the CPU figure alone (no profiler)
    python bench/profile_storm.py --no-profile --timeline  # server and load generator CPU, per 50 ms
    python bench/profile_storm.py --callgrind -n 1000      # instructions per client, under valgrind
    python bench/profile_storm.py --callgrind --joins-only -n 1000   # ... of the connects and joins alone

The same clients as ``run.py --only storm,stormrails`` (bench/loadgen.py, two worker processes;
server pinned to CPU 0, load generator to CPU 1). cProfile slows Python code more than C code,
so its shares say where to look, not what a change will save: the figure without the profiler
(``--no-profile``) is the one to compare. Each run opens and closes the storm ``--repeat`` times
(the closes belong to a deploy storm too: the old pages' sockets go as the new ones come).
"""

import argparse
import collections
import json
import os
import pstats
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (bench/run.py: Pool, tokens, CPU time)

#: Where a function's file lives -> the row it is counted in.
AREAS = [
    ("tornado/websocket.py", "Tornado WebSocket (handshake, frames)"),
    ("tornado/iostream.py", "Tornado IOStream"),
    ("tornado/http1connection.py", "Tornado HTTP server"), ("tornado/httpserver.py", "Tornado HTTP server"),
    ("tornado/httputil.py", "Tornado HTTP server"), ("tornado/routing.py", "Tornado HTTP server"),
    ("tornado/web.py", "Tornado RequestHandler"), ("tornado/", "Tornado, other"),
    ("jwt/", "PyJWT"), ("pusherd/core/tokens.py", "pusherd tokens"),
    ("pusherd/fast/", "pusherd fast/"), ("pusherd/core/", "pusherd core (session, join)"),
    ("pusherd/transports/", "pusherd transports/"), ("pusherd/", "pusherd, other"),
    ("asyncio/", "asyncio"), ("json/", "json"), ("copy.py", "copy (Tornado's query arguments)"),
    ("uvloop", "uvloop"),
]

#: Put on the server's path as sitecustomize.py: the collector's time, written out on SIGUSR2 (before
#: and after the storms: start-up's collections are not the storm's).
GC_HOOK = '''
import gc, os, signal, time
_t = [0.0, 0.0, 0]
def _cb(phase, info):
    if phase == "start":
        _t[0] = time.perf_counter()
    else:
        _t[1] += time.perf_counter() - _t[0]; _t[2] += 1
gc.callbacks.append(_cb)
def _dump(*_):
    with open(os.environ["BENCH_GC_FILE"], "a") as f:
        f.write("%f %d\\n" % (_t[1], _t[2]))
signal.signal(signal.SIGUSR2, _dump)
'''


def area(filename: str) -> str:
    for needle, name in AREAS:
        if needle in filename:
            return name
    if filename == "~":
        return "built-ins (sockets, hashing, ...)"
    return "other"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5000, help="clients")
    ap.add_argument("--anonymous", action="store_true", help="join a public topic without a token")
    ap.add_argument("--repeat", type=int, default=2, help="storms in one server")
    ap.add_argument("--root", default=str(HERE.parent), help="the pusherd checkout to run")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--top", type=int, default=25, help="functions listed by self time")
    ap.add_argument("--timeline", action="store_true", help="print the server's and the load generator's CPU "
                    "use (%% of one core) every 50 ms of each storm, and the server's user/system split")
    ap.add_argument("--py-spy", metavar="FILE", help="also sample the server with py-spy (no cProfile): "
                    "collapsed stacks to FILE, self time by function printed (pip install py-spy)")
    ap.add_argument("--callgrind", action="store_true", help="run the server under valgrind's callgrind, "
                    "instrumented during the storms only: instructions per client, a count that does not move "
                    "with the machine's load as CPU time does (a VM without hardware counters)")
    ap.add_argument("--joins-only", action="store_true", help="with --callgrind: instrument each storm's "
                    "connects and joins only, not the closes after it (what bench/run.py's storm figure times)")
    opts = ap.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, client_cpus = ({cpus[0]}, set(cpus[1:])) if len(cpus) >= 2 else (None, None)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    run.loadgen.raise_nofile()
    tmp = tempfile.mkdtemp(prefix="pusherd-profile-storm-")
    cfg = {"guardian_secret": run.GSECRET, "publish_secret": run.PSECRET, "allowed_origins": ["http://localhost:3000"],
           "heartbeat_timeout": 3600, "issuer": [run.ISSUER], "max_connections": opts.n + 1000, "max_http_connections": opts.n + 1000,
           "log_level": "info", "access_log": False}
    path = os.path.join(tmp, "pusher.yml")
    with open(path, "w") as f:
        json.dump({"bench": cfg}, f)
    with open(os.path.join(tmp, "sitecustomize.py"), "w") as f:
        f.write(GC_HOOK)
    prof = os.path.join(tmp, "storm.prof")
    port = run.free_port()
    gc_file = os.path.join(tmp, "gc.txt")
    env = dict(os.environ, PYTHONPATH=opts.root + os.pathsep + tmp, PUSHERD_LOOP="uvloop", BENCH_GC_FILE=gc_file)
    if opts.py_spy:
        opts.no_profile = True  # one profiler at a time: a sampler sees real time, cProfile's slows Python
    if opts.callgrind:
        opts.no_profile = True
    callgrind_out = os.path.join(tmp, "callgrind.out")
    cmd = (["valgrind", "--tool=callgrind", "--instr-atstart=no", "--callgrind-out-file=" + callgrind_out]
           if opts.callgrind else [])
    cmd += [sys.executable] + ([] if opts.no_profile else ["-m", "cProfile", "-o", prof])
    cmd += ["-m", "pusherd", "--config", path, "--env", "bench", "--listen", "%s:%d" % (run.HOST, port)]
    log = open(os.path.join(tmp, "server.log"), "w+")
    # In the checkout's own directory: ``python -m`` puts the working directory first on sys.path.
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=opts.root,
                            preexec_fn=run.loadgen.raise_nofile)
    if server_cpus:
        os.sched_setaffinity(proc.pid, server_cpus)
    deadline = time.monotonic() + (180 if opts.callgrind else 20)
    while True:
        try:
            socket.create_connection((run.HOST, port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("pusherd did not start")
            time.sleep(0.05)
    time.sleep(0.5)

    class S:  # what Pool.connect reads of a server
        pass
    server = S()
    server.port = port
    pool = run.Pool(2, client_cpus, "uvloop")
    spy = None
    if opts.py_spy:
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(proc.pid), "--rate", "997", "--format", "raw",
                                "--output", opts.py_spy, "--nonblocking"], stdout=subprocess.DEVNULL)
        time.sleep(1.0)
    def instrument(on: bool) -> None:
        subprocess.run(["callgrind_control", "--instr=" + ("on" if on else "off"), str(proc.pid)], check=True,
                       stdout=subprocess.DEVNULL)

    if opts.callgrind:
        instrument(True)
    cpu0 = run.cpu_seconds(proc.pid)
    proc.send_signal(signal.SIGUSR2)
    try:
        for _ in range(opts.repeat):
            if opts.anonymous:
                topic, tokens = "public:storm", None
            else:
                topic, tokens = "deploys:web", run.rails_tokens(opts.n)
            timeline = Timeline(proc.pid, [p.pid for p in pool.procs]) if opts.timeline else None
            c = pool.connect(server, opts.n, topic, tokens=tokens, concurrency=opts.n, timeout=60, spread=True)
            if timeline is not None:
                timeline.stop()
            if opts.callgrind and opts.joins_only:
                instrument(False)
            pool.close_all()
            print("storm: %d joined, %d errors, %.2f s" % (c["joined"], c["failed"], c["seconds"]), flush=True)
            time.sleep(1.5)
            if opts.callgrind and opts.joins_only and _ < opts.repeat - 1:
                instrument(True)
    finally:
        pool.exit()
    cpu = run.cpu_seconds(proc.pid) - cpu0
    instructions = None
    if opts.callgrind and not opts.joins_only:
        instrument(False)
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
    proc.send_signal(signal.SIGUSR2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    if opts.callgrind:  # written at exit; only the storms were instrumented
        with open(callgrind_out) as f:
            instructions = sum(int(line.split()[1]) for line in f if line.startswith("totals:"))
    with open(gc_file) as f:
        (t0, n0), (t1, n1) = [map(float, line.split()) for line in f.read().split("\n")[:2]]
    gc_seconds, gc_runs = t1 - t0, int(n1 - n0)
    storms = opts.n * opts.repeat
    print("server CPU: %.0f µs per client (connect, join, close; %s)%s"
          % (cpu / storms * 1e6, "anonymous" if opts.anonymous else "a Rails token each",
             "" if opts.no_profile else ", under cProfile"))
    print("garbage collector: %.0f µs per client (%d collections)" % (gc_seconds / storms * 1e6, gc_runs))
    if instructions is not None:
        print("callgrind: %.0f instructions per client (the server's, during the storms%s)"
              % (instructions / storms, "' connects and joins" if opts.joins_only else ""))
    if opts.py_spy:
        print_samples(opts.py_spy, opts.top)
    if opts.no_profile:
        return
    stats = pstats.Stats(prof)
    by_area = collections.Counter()
    total = 0.0
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():
        by_area[area(filename)] += tottime
        total += tottime
    print("\n| where (self time under cProfile) | µs per client | share |\n|---|---|---|")
    for name, seconds in by_area.most_common():
        print("| %s | %.0f | %.0f %% |" % (name, seconds / storms * 1e6, 100 * seconds / total))
    print("| all | %.0f | 100 %% |" % (total / storms * 1e6))
    print()
    stats.sort_stats("tottime").print_stats(opts.top)


#: Leaves of a sample taken while the loop waits for events (uvloop's loop is C: its Python leaf is
#: asyncio's Runner.run), not working.
_IDLE_LEAVES = ("Runner.run ", "run_forever ", "BaseEventLoop.run_forever ", "BaseEventLoop._run_once ")


class Timeline(threading.Thread):
    """CPU use of the server and of the load generator's workers, sampled every `every` s from
    /proc while a storm runs; printed by stop(), with the server's user and system time."""

    def __init__(self, server_pid: int, worker_pids, every: float = 0.05):
        super().__init__(daemon=True)
        self.server_pid, self.worker_pids, self.every = server_pid, worker_pids, every
        self.samples = []
        self.user_system = self._ticks()
        self._done = threading.Event()
        self.start()

    def _ticks(self):
        fields = open("/proc/%d/stat" % self.server_pid).read().rsplit(")", 1)[1].split()
        return int(fields[11]), int(fields[12])  # utime, stime (clock ticks)

    def run(self):
        while not self._done.is_set():
            self.samples.append((time.monotonic(), run.cpu_seconds(self.server_pid),
                                 sum(run.cpu_seconds(pid) for pid in self.worker_pids)))
            time.sleep(self.every)

    def stop(self):
        self._done.set()
        self.join()
        pairs = list(zip(self.samples, self.samples[1:]))
        for name, i in (("server   ", 1), ("load gen ", 2)):
            print(name + " ".join("%3.0f" % (100 * (b[i] - a[i]) / (b[0] - a[0])) for a, b in pairs))
        user, system = self._ticks()
        user, system = user - self.user_system[0], system - self.user_system[1]
        print("server user/system time: %.0f %% / %.0f %%" % (100 * user / max(1, user + system),
                                                             100 * system / max(1, user + system)))


def print_samples(path: str, top: int) -> None:
    """Shares of the busy samples in py-spy's collapsed stacks (the loop's idle samples left out),
    by function with line numbers merged: self time by area and by function, and inclusive time
    by function (what bench/README.md's py-spy table quotes)."""
    by_function, inclusive, by_area, total = collections.Counter(), collections.Counter(), collections.Counter(), 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
            leaf = frames[-1]
            if leaf.startswith(_IDLE_LEAVES) or "select" in leaf or "epoll" in leaf:
                continue
            n = int(count)
            total += n
            by_function[leaf] += n
            by_area[area(leaf.rpartition("(")[2])] += n
            for frame in set(frames):
                inclusive[frame] += n
    share = lambda n: 100 * n / max(total, 1)  # noqa: E731
    print("\n| where (py-spy self samples) | share |\n|---|---|")
    for name, n in by_area.most_common():
        print("| %s | %.1f %% |" % (name, share(n)))
    print("\nself:")
    for name, n in by_function.most_common(top):
        print("%5.1f %%  %s" % (share(n), name))
    print("\ninclusive:")
    for name, n in inclusive.most_common(top):
        print("%5.1f %%  %s" % (share(n), name))


if __name__ == "__main__":
    main()
