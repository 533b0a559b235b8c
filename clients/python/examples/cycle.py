"""Runs one environment through its life against a previewd:

    python examples/cycle.py 127.0.0.1:7443 default preview.local/echo:v2
"""

import os
import sys
import time

from preview.client import connect, ready, watch
from preview.v1 import preview_pb2 as pb


def cycle(stub, key: str, namespace: str, image: str, say=print) -> int:
    """Start with one targetless pod, add another, wait for both, clean.
    Returns how many objects clean removed."""
    def pod(name):
        return pb.PodRequest(target="targetless", image=image, namespace=namespace, name=name)

    started = stub.Start(pb.StartRequest(key=key, ttl="10m", pods=[pod("web")]), timeout=30)
    say(f"started {started.key}")
    stub.AddPod(pb.AddPodRequest(key=key, pod=pod("worker")), timeout=30)
    say("added worker")
    for ev in watch(stub, key=key, timeout=120):
        envs = [e for e in ev.environments if e.key == key]
        say(f"{pb.EventKind.Name(ev.kind)}: " + ", ".join(f"{len(e.pods)} pods ready={ready(e)}" for e in envs))
        if any(len(e.pods) == 2 and ready(e) for e in envs):
            break
    else:
        raise RuntimeError(f"watch ended before {key} was ready")
    removed = stub.Clean(pb.CleanRequest(key=key), timeout=60).removed
    if [r.key for r in removed] != [key]:
        raise RuntimeError(f"clean removed {removed}")
    say(f"cleaned {key} ({len(removed[0].objects)} objects)")
    return len(removed[0].objects)


if __name__ == "__main__":
    defaults = ["127.0.0.1:7443", "default", "preview.local/echo:v2"]
    args = sys.argv[1:4]
    server, namespace, image = args + defaults[len(args):]
    # With PREVIEW_CA_FILE: TLS, and PREVIEW_TOKEN as a bearer token.
    ca_file = os.environ.get("PREVIEW_CA_FILE")
    ca = open(ca_file, "rb").read() if ca_file else None
    channel, stub = connect(server, ca=ca, token=os.environ.get("PREVIEW_TOKEN"))
    with channel:
        cycle(stub, f"py-example-{int(time.time()) % 100000}", namespace, image)
