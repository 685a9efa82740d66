"""Loopback playground: a FLIP hub emulator and the trust's internal services on 127.0.0.1.

Used by the demo command and the end-to-end tests; nothing here is imported by the daemon.
`LoopbackHub` lives in `loopback_hub.py`, `LoopbackServices` in `loopback_services.py`,
and the HTTP server both are built on in `http_server.py`.
"""
