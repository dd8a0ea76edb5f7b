"""A join token's check: CPU per `Verifier.verify` of distinct Rails tokens, on the HS256 fast
path (pusherd/core/hs256.py, what it is justified by) and on PyJWT alone.

    python bench/token_verify.py              # the installed PyJWT
    taskset -c 1 python bench/token_verify.py --tokens 3000 --rounds 5

The tokens are the storm's (bench/run.py `rails_tokens`: HS256, aud "csrf", a sub object per
user, iss, exp, s_csrf, listen), one per page as Rails mints them, verified with the page's csrf
token and an explicit clock, as a join does. Best of `--rounds` passes over all of them.
"""

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (bench/run.py: rails_tokens, the secrets)

import jwt  # noqa: E402

from pusherd.core.tokens import Verifier  # noqa: E402


def per_token(verifier: Verifier, tokens: list, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        now = time.time()
        t0 = time.perf_counter()
        for token in tokens:
            verifier.verify(token, run.CSRF, now=now)
        best = min(best, time.perf_counter() - t0)
    return 1e6 * best / len(tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    opts = ap.parse_args()
    tokens = run.rails_tokens(opts.tokens)
    fast = Verifier([run.GSECRET], issuers=[run.ISSUER])
    slow = Verifier([run.GSECRET], issuers=[run.ISSUER], fast_path=False)
    assert fast.verify_all(tokens[0], run.CSRF, now=time.time())[1] == slow.verify_all(tokens[0], run.CSRF, now=time.time())[1]
    print("PyJWT %s, %d distinct Rails tokens, best of %d" % (jwt.__version__, len(tokens), opts.rounds))
    print("| path | µs per Verifier.verify |")
    print("|---|---|")
    print("| HS256 fast path | %.1f |" % per_token(fast, tokens, opts.rounds))
    print("| PyJWT | %.1f |" % per_token(slow, tokens, opts.rounds))


if __name__ == "__main__":
    main()
