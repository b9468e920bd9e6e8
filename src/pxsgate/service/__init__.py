"""The running service: the gateway's wiring and lifecycle, its HTTP API, metrics, systemd
notification and failpoints."""
