"""Real components started on loopback for the demo and the tests.

Each module starts one real program (dockerd, docker-registry, ...) on
127.0.0.1 with its own generated configuration, waits until it answers and
stops it again, so that tests exercise the real thing instead of a mock.
"""
