"""The one interface every network driver implements."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from netstack.model import Endpoint, JoinOptions, Network, Sandbox


class NetworkDriver(Protocol):
    """Builds and tears down a network's dataplane.

    Creation methods are all-or-nothing (a failure leaves nothing behind); deletion methods
    are idempotent and best effort.
    """

    name: str

    def validate_options(self, options: Mapping[str, str], network_id: str) -> dict[str, str]:
        """Check user options strictly and return them normalised, defaults filled in.

        Raises InvalidArgument for unknown keys or bad values.
        """
        ...

    def create_network(self, network: Network) -> None:
        """Build the network's kernel objects. Undo: delete_network."""
        ...

    def delete_network(self, network: Network) -> None:
        """Remove the network's kernel objects. Idempotent."""
        ...

    def create_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        """Create the endpoint's interface on the host side. Undo: delete_endpoint."""
        ...

    def join(
        self,
        network: Network,
        endpoint: Endpoint,
        sandbox: Sandbox,
        options: JoinOptions | None = None,
    ) -> str:
        """Put the endpoint's interface into the sandbox, configured; return its name there."""
        ...

    def delete_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        """Remove the endpoint's interface wherever it is. Idempotent."""
        ...

    def program_external_connectivity(self, network: Network, endpoint: Endpoint) -> None:
        """Publish `endpoint.ports` on the host. Undo: revoke_external_connectivity."""
        ...

    def revoke_external_connectivity(self, network: Network, endpoint: Endpoint) -> None:
        """Unpublish `endpoint.ports` and forget their flows. Idempotent."""
        ...
