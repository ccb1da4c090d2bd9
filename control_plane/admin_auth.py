"""The admin token check in front of every ControlPlane RPC but ResolveAdapter: the
check engines put in front of EngineAdmin too (`loraplex.admin_token`), bound to this
service."""

from __future__ import annotations

from loraplex import admin_token
from loraplex.v1 import control_plane_pb2

SERVICE_NAME = control_plane_pb2.DESCRIPTOR.services_by_name["ControlPlane"].full_name
# Checked by the servicer itself: it also accepts a tenant's API key.
OPEN_METHODS = frozenset({"ResolveAdapter"})


class AdminTokenInterceptor(admin_token.AdminTokenInterceptor):
    def __init__(self, token: str) -> None:
        super().__init__(
            SERVICE_NAME,
            token,
            rpcs="the ControlPlane admin RPCs",
            server="control plane",
            open_methods=OPEN_METHODS,
        )
