"""Serve the offline model: python -m offline_model --port 8400 [--token-delay 0.02]."""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402

from gevent.pywsgi import WSGIServer  # noqa: E402

from offline_model import Behaviour, create_app  # noqa: E402


class NoDelayServer(WSGIServer):
    """Sends each write at once (TCP_NODELAY), as model servers do (asyncio's,
    Go's, nginx): with Nagle's algorithm a chunk written while the last one
    is unacknowledged waits for the client's delayed ACK, 40 ms, on every
    connection the client keeps open for its next request. Counts the
    connections it accepts (`Behaviour.connections`)."""

    behaviour: Behaviour

    def handle(self, sock: socket.socket, address: tuple) -> None:
        self.behaviour.connections += 1
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle(sock, address)


def main() -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m offline_model",
        description="An OpenAI-compatible model server for tests and local use: deterministic answers derived"
        " from the conversation, configurable speed, injectable faults.",
        epilog="Per request, directives in the last message: [[tokens=N]], [[first=S]], [[delay=S]],"
        " [[fault=500]], [[fault=disconnect@K]], [[fault=stall]], [[fault=linger]], [[faults=500,429,...]],"
        " [[call=NAME {json}]], [[rounds=N]]. At run time: POST /control.",
    )
    parser.add_argument("--host", default=env("OFFLINE_MODEL_HOST", "127.0.0.1"), help="address to listen on")
    parser.add_argument("--port", type=int, default=int(env("OFFLINE_MODEL_PORT", "8400")), help="port (8400)")
    parser.add_argument(
        "--first-token-delay",
        type=float,
        default=float(env("OFFLINE_MODEL_FIRST_TOKEN_DELAY", "0.2")),
        help="seconds before the first token (0.2); [[first=S]] in a message overrides it",
    )
    parser.add_argument(
        "--token-delay",
        type=float,
        default=float(env("OFFLINE_MODEL_TOKEN_DELAY", "0.03")),
        help="seconds between tokens (0.03); [[delay=S]] in a message overrides it",
    )
    parser.add_argument(
        "--fault-rate",
        type=float,
        default=float(env("OFFLINE_MODEL_FAULT_RATE", "0")),
        help="share of requests that fail at random: HTTP 500, 429 or a disconnect mid-stream (0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random faults, for repeatable runs")
    args = parser.parse_args()
    behaviour = Behaviour(
        first_token_delay=args.first_token_delay,
        token_delay=args.token_delay,
        fault_rate=args.fault_rate,
        seed=args.seed,
    )
    logging.basicConfig(level=logging.WARNING)
    server = NoDelayServer((args.host, args.port), create_app(behaviour), log=None)
    server.behaviour = behaviour
    print(f"offline model on http://{args.host}:{args.port}/v1", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
