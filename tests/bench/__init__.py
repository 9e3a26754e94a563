"""Benchmarks: run as modules (python -m tests.bench.NAME); never collected by pytest."""

# What every benchmark's services run with. One key sends everything in
# them: the system is measured, not its limits.
ENV = {
    "TURNSTREAM_ENV": "development",
    "RATE_LIMITS": "off",
    "MAX_ACTIVE_TURNS_PER_OWNER": "1000000",
    "MAX_RUNNING_TURNS_PER_OWNER": "1000000",
    "MAX_STREAMS_PER_OWNER": "1000000",
    "AUTH": "on",
    "OPENAI_API_KEY": "offline",
    "SECRET_KEY": "bench-" + "x" * 32,
}
