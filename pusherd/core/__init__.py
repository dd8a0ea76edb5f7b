"""The pure core: the Phoenix protocol, the per-connection session and its whole join flow as
actions, tokens, topics and access rules, publish parsing, history decisions, origins, presence,
and the encode-once fan-out. No I/O: no sockets, no event loop, no clock or randomness reads
(time and random bytes come in as parameters). tests/unit/test_core_purity.py enforces it.
"""
