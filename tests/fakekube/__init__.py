"""A wire-level fake of the Kubernetes API server, for tests only: no kube-apiserver can run
on these machines. The unmodified official client talks real HTTP and websockets to it."""

from tests.fakekube.server import FakeKube

__all__ = ["FakeKube"]
