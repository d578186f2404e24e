"""Wait until a virtlet gRPC socket answers; exit 0 when it does, 1 with the reason when it does not.

Why a script: a socket file can exist while the server behind it is not serving yet (or is gone and left the
file behind).  This asks the standard gRPC health service; a server without that service (the CRI proxy)
still proves it is up by answering UNIMPLEMENTED.  The roles' handlers call it after every (re)start.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check_once(socket: str, timeout: float) -> str | None:
    """None when the server answers as serving, else the reason it does not."""
    if not os.path.exists(socket):
        return f"{socket} does not exist yet"
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            return f"{socket}: {exc.code().name}: {exc.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{socket}: health status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("socket", help="path of the unix socket")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to keep trying")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.wait
    while True:
        reason = check_once(args.socket, timeout=5.0)
        if reason is None:
            print(f"{args.socket} is serving")
            return 0
        if time.monotonic() >= deadline:
            print(f"not ready after {args.wait:g}s: {reason}", file=sys.stderr)
            return 1
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
