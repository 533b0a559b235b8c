"""Against a live previewd: the Rust suite (tests/install.rs) runs this with
previewd installed in the local cluster from deploy/previewd."""

import os
import sys
import time

import grpc
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

from cycle import cycle  # noqa: E402
from preview.client import connect, watch  # noqa: E402
from preview.v1 import preview_pb2 as pb  # noqa: E402

SERVER = os.environ.get("PREVIEW_SERVER")
NAMESPACE = os.environ.get("PREVIEW_TEST_NAMESPACE")
IMAGE = os.environ.get("PREVIEW_TEST_IMAGE")
pytestmark = pytest.mark.skipif(
    not (SERVER and NAMESPACE and IMAGE),
    reason="needs a live previewd: PREVIEW_SERVER, PREVIEW_TEST_NAMESPACE and PREVIEW_TEST_IMAGE",
)


@pytest.fixture
def stub():
    # With PREVIEW_CA_FILE: TLS (checking PREVIEW_SERVER_NAME, as the address
    # is the Service's IP), and PREVIEW_TOKEN as a bearer token.
    ca_file = os.environ.get("PREVIEW_CA_FILE")
    ca = open(ca_file, "rb").read() if ca_file else None
    channel, stub = connect(
        SERVER, ca=ca, token=os.environ.get("PREVIEW_TOKEN"), server_name=os.environ.get("PREVIEW_SERVER_NAME")
    )
    with channel:
        yield stub


def test_cycle(stub):
    key = f"py-{time.time_ns() % 1_000_000}"
    steps = []
    objects = cycle(stub, key, NAMESPACE, IMAGE, say=steps.append)
    # Two pods and the environment's PreviewEnvironment.
    assert objects == 3, steps
    snapshot = next(watch(stub, key=key, timeout=10))
    assert snapshot.kind == pb.EVENT_KIND_SNAPSHOT
    assert list(snapshot.environments) == []


def test_bad_input_names_the_field(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.Start(pb.StartRequest(key="Not A Label", pods=[pb.PodRequest(target="targetless", image="x", namespace=NAMESPACE)]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "key" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.AddPod(pb.AddPodRequest(key="no-such-key", pod=pb.PodRequest(target="targetless", image="x", namespace=NAMESPACE)), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
