"""A thin layer over the generated stubs: connect, watch, ready."""

from __future__ import annotations

from typing import Iterator, Optional

import grpc

from preview.v1 import preview_pb2, preview_pb2_grpc


def connect(
    target: str,
    *,
    ca: Optional[bytes] = None,
    token: Optional[str] = None,
    cert: Optional[bytes] = None,
    key: Optional[bytes] = None,
    server_name: Optional[str] = None,
) -> tuple[grpc.Channel, preview_pb2_grpc.PreviewServiceStub]:
    """A channel to previewd at ``host:port`` (or ``https://host:port``) and a
    PreviewService stub on it.

    With ``ca`` (PEM: the ConfigMap ``previewd-ca``, key ``ca.crt``, in
    previewd's namespace) the channel is TLS, and carries ``token`` as a
    bearer token, or presents ``cert``/``key``, a client certificate the
    cluster's CA signed. Without it the channel is plaintext h2c, which only
    a previewd run with ``--auth none`` on loopback serves."""
    if ca is None:
        channel = grpc.insecure_channel(target.removeprefix("http://"))
        return channel, preview_pb2_grpc.PreviewServiceStub(channel)
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    channel = grpc.secure_channel(target.removeprefix("https://"), creds, options=options)
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
