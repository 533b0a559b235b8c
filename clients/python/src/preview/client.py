"""A thin layer over the generated stubs: connect, watch, ready."""

from __future__ import annotations

from typing import Iterator, Optional

import grpc

from preview.v1 import preview_pb2, preview_pb2_grpc


def connect(target: str) -> tuple[grpc.Channel, preview_pb2_grpc.PreviewServiceStub]:
    """A plaintext (h2c) channel to previewd at ``host:port`` (or the CLI's
    ``http://host:port``) and a PreviewService stub on it."""
    target = target.removeprefix("http://")
    channel = grpc.insecure_channel(target)
    return channel, preview_pb2_grpc.PreviewServiceStub(channel)


def watch(
    stub: preview_pb2_grpc.PreviewServiceStub,
    key: str = "",
    namespace: str = "",
    timeout: Optional[float] = None,
) -> Iterator[preview_pb2.StatusEvent]:
    """Yields a snapshot, then change events, until the caller stops
    iterating (which cancels the stream) or the server ends it."""
    call = stub.Status(preview_pb2.StatusRequest(key=key, namespace=namespace, watch=True), timeout=timeout)
    try:
        yield from call
    finally:
        call.cancel()


def ready(env: preview_pb2.Environment) -> bool:
    """Every pod ready and nothing pending."""
    return not env.pending and len(env.pods) > 0 and all(p.ready for p in env.pods)
