"""The transports: thin adapters on Tornado's public API between the network and the service.

`websocket` (a browser socket), `http` (``POST /publish``, ``GET /healthz``), `app` (the routes,
with every handler's dependencies given through ``initialize()``). Each translates bytes to calls
of the session and the service (pusherd/service.py) and back; none holds protocol logic. The
speed-ups and every touch of Tornado's internals are in pusherd/fast/.
"""
