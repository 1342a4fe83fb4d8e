"""Every plugin method through `app.handle`, with netstack's real controller and store and a
bridge driver whose kernel side is faked: the IPAM hand-over, the endpoint steps, error
shapes (`Err` from the NetworkDriver, `Error` from the IpamDriver) and malformed calls."""

from __future__ import annotations

import json
from collections.abc import Sequence
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from netstack.drivers.bridge import BridgeDriver
from netstack.drivers.bridge.driver import peer_veth_name
from netstack.ipam import AddressAllocator, make_pool_spec

from netstack.controller import Controller, NetworkRequest
from netstack.dockerplugin import app, network
from netstack.model import Endpoint, JoinOptions, Network, Sandbox
from netstack.store import Store

NID = "1" * 64
NID2 = "2" * 64
EID = "e" * 64
EID2 = "f" * 64
KEY = "/var/run/docker/netns/0123456789ab"


class FakeBridge(BridgeDriver):
    """The bridge driver's option handling, with the kernel replaced by a call log."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.prepared: list[str | None] = []

    def create_network(self, network: Network) -> None:
        self.calls.append(("create_network", network.id))

    def delete_network(self, network: Network) -> None:
        self.calls.append(("delete_network", network.id))

    def join(
        self,
        network: Network,
        endpoint: Endpoint,
        sandbox: Sandbox,
        options: JoinOptions | None = None,
    ) -> str:
        assert options is not None and options.peer_in_host
        self.calls.append(("join", endpoint.id))
        self.prepared.append(options.prepared)
        return peer_veth_name(endpoint.id)

    def delete_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        self.calls.append(("delete_endpoint", endpoint.id))

    def program_external_connectivity(self, network: Network, endpoint: Endpoint) -> None:
        self.calls.append(("publish", ",".join(str(p) for p in endpoint.ports)))

    def revoke_external_connectivity(self, network: Network, endpoint: Endpoint) -> None:
        if endpoint.ports:
            self.calls.append(("unpublish", ",".join(str(p) for p in endpoint.ports)))


class Plugin:
    def __init__(self, directory: Path) -> None:
        self.driver = FakeBridge()
        self.controller = Controller(
            Store(directory), {"bridge": self.driver}, host_routes=lambda: []
        )

    def raw(self, method: str, body: bytes) -> app.Reply:
        return app.handle(f"/{method}", body, lambda: self.controller)

    def call(self, method: str, document: Any = None, status: int = 200) -> dict[str, Any]:
        reply = self.raw(method, json.dumps(document).encode())
        assert reply.status == status, reply.document
        return reply.document

    def addresses(self) -> dict[str, str]:
        """Every taken address -> owner."""
        rows = self.controller.store.conn.execute(
            "SELECT p.subnet, a.address, a.owner FROM ipam_addresses a "
            "JOIN ipam_pools p ON p.id = a.pool_id"
        ).fetchall()
        return {f"{int.from_bytes(addr, 'big')}@{subnet}": owner for subnet, addr, owner in rows}

    def pools(self) -> dict[str, str]:
        rows = self.controller.store.conn.execute("SELECT subnet, network_id FROM ipam_pools")
        return {subnet: network_id for subnet, network_id in rows}


@pytest.fixture
def plugin(tmp_path: Path) -> Plugin:
    return Plugin(tmp_path)


def create_network(plugin: Plugin, **options: str) -> None:
    pool = plugin.call("IpamDriver.RequestPool", {"Pool": "10.9.0.0/24", "V6": False})
    gateway = plugin.call(
        "IpamDriver.RequestAddress",
        {"PoolID": pool["PoolID"], "Address": "",
         "Options": {"RequestAddressType": "com.docker.network.gateway"}},
    )  # fmt: skip
    plugin.call(
        "NetworkDriver.CreateNetwork",
        {"NetworkID": NID, "Options": {"com.docker.network.generic": options},
         "IPv4Data": [{"AddressSpace": "netstack-local", "Pool": pool["Pool"],
                       "Gateway": gateway["Address"]}], "IPv6Data": []},
    )  # fmt: skip


def test_activate_and_capabilities(plugin: Plugin) -> None:
    reply = plugin.raw("Plugin.Activate", b"")
    assert (reply.status, reply.document) == (200, {"Implements": ["NetworkDriver", "IpamDriver"]})
    assert plugin.call("NetworkDriver.GetCapabilities") == {
        "Scope": "local",
        "ConnectivityScope": "local",
    }
    assert plugin.call("IpamDriver.GetCapabilities") == {
        "RequiresMACAddress": False,
        "RequiresRequestReplay": False,
    }
    spaces = plugin.call("IpamDriver.GetDefaultAddressSpaces")
    assert set(spaces) == {"LocalDefaultAddressSpace", "GlobalDefaultAddressSpace"}
    assert plugin.call("NetworkDriver.AllocateNetwork", {"NetworkID": NID}) == {"Options": {}}
    for method in ("FreeNetwork", "DiscoverNew", "DiscoverDelete"):
        assert plugin.call(f"NetworkDriver.{method}", {"DiscoveryType": 1}) == {}


def test_netstack_ipam_hand_over_allocates_nothing_twice(plugin: Plugin) -> None:
    pool = plugin.call("IpamDriver.RequestPool", {"Pool": "10.9.0.0/24", "V6": False})
    assert pool == {"PoolID": "netstack/10.9.0.0/24", "Pool": "10.9.0.0/24", "Data": {}}
    assert plugin.pools() == {"10.9.0.0/24": "pending"}
    gateway = plugin.call(
        "IpamDriver.RequestAddress",
        {"PoolID": pool["PoolID"], "Options": {"RequestAddressType": "com.docker.network.gateway"}},
    )
    assert gateway["Address"] == "10.9.0.1/24"
    # netctl sees the subnet taken before Docker creates the network
    with pytest.raises(Exception, match="handed out to Docker"):
        plugin.controller.create_network(NetworkRequest(name="x", subnets=["10.9.0.128/25"]))
    plugin.call(
        "NetworkDriver.CreateNetwork",
        {"NetworkID": NID, "Options": {"com.docker.network.generic": {"mtu": "1400"}},
         "IPv4Data": [{"Pool": "10.9.0.0/24", "Gateway": "10.9.0.1/24"}]},
    )  # fmt: skip
    assert plugin.pools() == {"10.9.0.0/24": NID}
    network = plugin.controller.network(NID)
    assert network.name == f"docker-{NID[:12]}"
    assert network.options["mtu"] == "1400" and network.labels == {"netstack.origin": "docker"}
    assert str(network.pools[0].gateway) == "10.9.0.1"

    address = plugin.call("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})
    assert address["Address"] == "10.9.0.2/24"
    assert "pending" in plugin.addresses().values()
    created = plugin.call(
        "NetworkDriver.CreateEndpoint",
        {"NetworkID": NID, "EndpointID": EID, "Interface": {"Address": "10.9.0.2/24"}},
    )
    mac = created["Interface"]["MacAddress"]
    assert set(created["Interface"]) == {"MacAddress"}  # Docker refuses changes to addresses
    owners = sorted(plugin.addresses().values())
    assert owners == sorted(["gateway", EID])  # claimed, not allocated again
    # Docker releases the address after DeleteEndpoint: the endpoint's is freed already
    plugin.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID})
    assert sorted(plugin.addresses().values()) == ["gateway"]
    plugin.call("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": "10.9.0.2"})
    endpoint = plugin.controller.store.endpoint_by_id(EID)
    assert endpoint is None and mac
    plugin.call("NetworkDriver.DeleteNetwork", {"NetworkID": NID})
    plugin.call("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": "10.9.0.1"})
    plugin.call("IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]})
    assert plugin.pools() == {} and plugin.addresses() == {}
    assert plugin.controller.store.networks() == []


def test_released_before_claim_and_failed_create_leave_nothing(plugin: Plugin) -> None:
    pool = plugin.call("IpamDriver.RequestPool", {"Pool": "10.9.0.0/24"})
    plugin.call(
        "IpamDriver.RequestAddress",
        {"PoolID": pool["PoolID"], "Options": {"RequestAddressType": "com.docker.network.gateway"}},
    )
    reply = plugin.raw(
        "NetworkDriver.CreateNetwork",
        json.dumps(
            {"NetworkID": NID, "Options": {"com.docker.network.generic": {"bogus": "1"}},
             "IPv4Data": [{"Pool": "10.9.0.0/24", "Gateway": "10.9.0.1/24"}]}
        ).encode(),
    )  # fmt: skip
    assert reply.status == 400 and "bogus" in reply.document["Err"]
    assert plugin.pools() == {"10.9.0.0/24": "pending"}  # still Docker's to release
    plugin.call("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": "10.9.0.1"})
    plugin.call("IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]})
    plugin.call("IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]})  # idempotent
    assert plugin.pools() == {} and plugin.addresses() == {}


def test_default_pool_avoids_every_netstack_pool(plugin: Plugin) -> None:
    plugin.controller.create_network(NetworkRequest(name="cni", subnets=["172.17.5.0/24"]))
    first = plugin.call("IpamDriver.RequestPool", {"Pool": ""})
    second = plugin.call("IpamDriver.RequestPool", {"Pool": ""})
    assert (first["Pool"], second["Pool"]) == ("172.18.0.0/16", "172.19.0.0/16")
    v6 = plugin.call("IpamDriver.RequestPool", {"Pool": "", "V6": True})
    assert v6["Pool"].startswith("fd") and v6["Pool"].endswith("/64")
    address = plugin.call("IpamDriver.RequestAddress", {"PoolID": v6["PoolID"]})
    assert address["Address"].endswith("::1/64")


def test_ipam_errors_use_error_and_name_the_clash(plugin: Plugin) -> None:
    plugin.controller.create_network(NetworkRequest(name="backend", subnets=["10.1.0.0/16"]))
    reply = plugin.raw("IpamDriver.RequestPool", b'{"Pool": "10.1.2.0/24"}')
    assert reply.status == 409
    message = reply.document["Error"]
    assert message == (
        "subnet 10.1.2.0/24 overlaps network 'backend' (10.1.0.0/16); choose another --subnet"
    )
    assert reply.document["Err"] == message  # what moby's plugin client reads
    unknown = plugin.raw("IpamDriver.RequestAddress", b'{"PoolID": "netstack/10.50.0.0/24"}')
    assert unknown.status == 400 and "not known" in unknown.document["Error"]
    foreign = plugin.raw("IpamDriver.RequestAddress", b'{"PoolID": "LocalDefault/10.0.0.0/8"}')
    assert "not handed out by netstack" in foreign.document["Error"]


def test_docker_default_ipam_and_endpoint_steps(plugin: Plugin) -> None:
    plugin.call(
        "NetworkDriver.CreateNetwork",
        {"NetworkID": NID, "Options": {"com.docker.network.enable_ipv6": False},
         "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "172.20.0.0/16",
                       "Gateway": "172.20.0.1/16", "AuxAddresses": {"r": "172.20.0.9/16"}}]},
    )  # fmt: skip
    network = plugin.controller.network(NID)
    assert str(network.pools[0].gateway) == "172.20.0.1"
    plugin.call("NetworkDriver.CreateNetwork", {"NetworkID": NID})  # replayed: no change
    plugin.call(
        "NetworkDriver.CreateEndpoint",
        {"NetworkID": NID, "EndpointID": EID,
         "Interface": {"Address": "172.20.0.9/16", "MacAddress": ""}},
        status=409,
    )  # fmt: skip
    created = plugin.call(
        "NetworkDriver.CreateEndpoint",
        {"NetworkID": NID, "EndpointID": EID,
         "Interface": {"Address": "172.20.0.5/16", "MacAddress": "02:42:ac:14:00:05"}},
    )  # fmt: skip
    assert created == {"Interface": {}}
    endpoint = plugin.controller.endpoint(EID)
    assert endpoint.sandbox == f"docker/endpoint-{EID[:12]}" and endpoint.mac == "02:42:ac:14:00:05"

    joined = plugin.call(
        "NetworkDriver.Join",
        {"NetworkID": NID, "EndpointID": EID, "SandboxKey": KEY, "Options": {}},
    )
    assert joined == {
        "InterfaceName": {"SrcName": f"nsp{EID[:12]}", "DstPrefix": "eth"},
        "StaticRoutes": [],
        "DisableGatewayService": True,
        "Gateway": "172.20.0.1",
    }
    sandbox = plugin.controller.sandbox("docker/0123456789ab")
    assert sandbox.path == KEY and sandbox.external
    assert plugin.controller.endpoint(EID).sandbox == "docker/0123456789ab"

    plugin.call(
        "NetworkDriver.ProgramExternalConnectivity",
        {"NetworkID": NID, "EndpointID": EID, "Options": {"com.docker.network.portmap": [
            {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080,
             "HostPortEnd": 8080}]}},
    )  # fmt: skip
    info = plugin.call("NetworkDriver.EndpointOperInfo", {"NetworkID": NID, "EndpointID": EID})
    assert info["Value"]["com.docker.network.portmap"] == [
        {"Proto": 6, "IP": "172.20.0.5", "Port": 80, "HostIP": "", "HostPort": 8080,
         "HostPortEnd": 8080}
    ]  # fmt: skip
    assert info["Value"]["com.docker.network.endpoint.macaddress"] == "02:42:ac:14:00:05"
    plugin.call("NetworkDriver.RevokeExternalConnectivity", {"NetworkID": NID, "EndpointID": EID})
    assert plugin.controller.endpoint(EID).ports == []
    plugin.call("NetworkDriver.Leave", {"NetworkID": NID, "EndpointID": EID})
    assert plugin.controller.store.find_sandbox("docker/0123456789ab") is None
    plugin.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID})
    plugin.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID})
    plugin.call("NetworkDriver.Leave", {"NetworkID": NID, "EndpointID": EID})
    assert plugin.driver.calls == [
        ("create_network", NID),
        ("join", EID),
        ("publish", "*:8080->80/tcp"),
        ("unpublish", "*:8080->80/tcp"),
        ("delete_endpoint", EID),
    ]
    plugin.call("NetworkDriver.DeleteNetwork", {"NetworkID": NID})
    plugin.call("NetworkDriver.DeleteNetwork", {"NetworkID": NID})
    assert plugin.controller.store.networks() == []


def test_two_networks_share_one_container_sandbox(plugin: Plugin) -> None:
    for network_id, subnet in ((NID, "10.7.0.0/24"), (NID2, "10.8.0.0/24")):
        plugin.call(
            "NetworkDriver.CreateNetwork",
            {"NetworkID": network_id, "IPv4Data": [{"Pool": subnet}]},
        )
    for network_id, endpoint_id in ((NID, EID), (NID2, EID2)):
        plugin.call("NetworkDriver.CreateEndpoint", {"NetworkID": network_id,
                                                     "EndpointID": endpoint_id})  # fmt: skip
        plugin.call(
            "NetworkDriver.Join",
            {"NetworkID": network_id, "EndpointID": endpoint_id, "SandboxKey": KEY},
        )
    endpoints = plugin.controller.store.endpoints(sandbox="docker/0123456789ab")
    assert [e.id for e in endpoints] == [EID, EID2]
    # Docker sent no address: netstack's are answered
    plugin.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID})
    assert plugin.controller.store.find_sandbox("docker/0123456789ab") is not None
    plugin.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NID2, "EndpointID": EID2})
    assert plugin.controller.store.find_sandbox("docker/0123456789ab") is None


def test_internal_network_join_has_no_gateway(plugin: Plugin) -> None:
    plugin.call(
        "NetworkDriver.CreateNetwork",
        {"NetworkID": NID, "Options": {"com.docker.network.internal": True},
         "IPv4Data": [{"Pool": "10.7.0.0/24", "Gateway": "10.7.0.1/24"}]},
    )  # fmt: skip
    created = plugin.call("NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID})
    assert created["Interface"]["Address"] == "10.7.0.2/24"
    joined = plugin.call(
        "NetworkDriver.Join", {"NetworkID": NID, "EndpointID": EID, "SandboxKey": KEY}
    )
    assert "Gateway" not in joined
    reply = plugin.raw(
        "NetworkDriver.ProgramExternalConnectivity",
        json.dumps({"NetworkID": NID, "EndpointID": EID, "Options": {
            "com.docker.network.portmap": [{"Proto": 6, "Port": 80, "HostPort": 80}]}}).encode(),
    )  # fmt: skip
    assert reply.status == 400 and "internal" in reply.document["Err"]


def test_network_driver_errors_use_err(plugin: Plugin) -> None:
    create_network(plugin)
    reply = plugin.raw(
        "NetworkDriver.Join",
        json.dumps({"NetworkID": NID, "EndpointID": EID, "SandboxKey": KEY}).encode(),
    )
    assert reply.status == 400  # NotFound, but moby reads a 404 as "not implemented"
    assert set(reply.document) == {"Err"} and "not found" in reply.document["Err"]
    other = plugin.raw(
        "NetworkDriver.CreateNetwork",
        json.dumps({"NetworkID": NID2, "IPv4Data": [{"Pool": "10.9.0.0/25"}]}).encode(),
    )
    assert other.status == 409 and "overlaps network" in other.document["Err"]


@pytest.mark.parametrize(
    ("path", "body", "status", "key"),
    [
        ("/NetworkDriver.CreateNetwork", b"{not json", 400, "Err"),
        ("/NetworkDriver.CreateNetwork", b"[]", 400, "Err"),
        ("/NetworkDriver.Join", b'{"NetworkID": 1}', 400, "Err"),
        ("/IpamDriver.RequestPool", b'{"Pool": 5}', 400, "Error"),
        ("/IpamDriver.ReleasePool", b"{}", 400, "Error"),
        ("/NetworkDriver.Nope", b"{}", 404, "Err"),
        ("/VolumeDriver.Create", b"{}", 404, "Err"),
        ("/", b"", 404, "Err"),
    ],
)
def test_malformed_calls_are_answered(
    plugin: Plugin, path: str, body: bytes, status: int, key: str
) -> None:
    reply = app.handle(path, body, lambda: plugin.controller)
    assert reply.status == status
    assert isinstance(reply.document[key], str) and reply.document[key]


def test_a_bug_is_an_internal_error_not_a_crash(plugin: Plugin) -> None:
    def broken() -> Controller:
        raise RuntimeError("boom")

    reply = app.handle("/NetworkDriver.DeleteNetwork", json.dumps({"NetworkID": NID}).encode(),
                       broken)  # fmt: skip
    assert reply.status == 500 and "internal error" in reply.document["Err"]


def test_allocator_claim_rules(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.transaction() as conn:
        allocator = AddressAllocator(conn)
        pool = allocator.add_pending_pool(make_pool_spec(ip_network("10.3.0.0/24")))
        first = allocator.request(pool, "pending")
        allocator.claim(pool.id, first, "ep1")
        allocator.claim(pool.id, first, "ep1")  # idempotent
        with pytest.raises(Exception, match="already in use"):
            allocator.claim(pool.id, first, "ep2")
        allocator.claim(pool.id, ip_address("10.3.0.9"), "ep3")  # free: reserved
        assert allocator.owner_of(pool.id, ip_address("10.3.0.9")) == "ep3"
        assert allocator.claim_pool(ip_network("10.3.0.0/24"), NID) is not None
        assert allocator.claim_pool(ip_network("10.3.0.0/24"), NID2) is None


def test_one_sandbox_joins_a_network_once(plugin: Plugin) -> None:
    plugin.call(
        "NetworkDriver.CreateNetwork", {"NetworkID": NID, "IPv4Data": [{"Pool": "10.7.0.0/24"}]}
    )
    for endpoint_id in (EID, EID2):
        plugin.call("NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": endpoint_id})
    plugin.call("NetworkDriver.Join", {"NetworkID": NID, "EndpointID": EID, "SandboxKey": KEY})
    reply = plugin.raw(
        "NetworkDriver.Join",
        json.dumps({"NetworkID": NID, "EndpointID": EID2, "SandboxKey": KEY}).encode(),
    )
    assert reply.status == 409
    assert "is already connected to network" in reply.document["Err"]
    assert plugin.controller.endpoint(EID2).sandbox == f"docker/endpoint-{EID2[:12]}"


def test_join_records_sandbox_and_endpoint_in_one_transaction(
    plugin: Plugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Docker waits on its Join: the adopted sandbox and the endpoint are one commit."""
    plugin.call(
        "NetworkDriver.CreateNetwork", {"NetworkID": NID, "IPv4Data": [{"Pool": "10.7.0.0/24"}]}
    )
    plugin.call("NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID})
    store = plugin.controller.store
    opened: list[None] = []
    transaction = store.transaction

    def counted() -> Any:
        opened.append(None)
        return transaction()

    monkeypatch.setattr(store, "transaction", counted)
    plugin.call("NetworkDriver.Join", {"NetworkID": NID, "EndpointID": EID, "SandboxKey": KEY})
    assert len(opened) == 1
    adopted = store.find_sandbox("docker/0123456789ab")
    assert adopted is not None and adopted.path == KEY
    assert plugin.controller.endpoint(EID).sandbox == "docker/0123456789ab"


def test_join_into_a_name_recorded_for_another_namespace_leaves_nothing(plugin: Plugin) -> None:
    """Refused before the kernel is touched; and when another adoption of the name commits
    while the interface is being made, the interface is deleted again."""
    plugin.call(
        "NetworkDriver.CreateNetwork", {"NetworkID": NID, "IPv4Data": [{"Pool": "10.7.0.0/24"}]}
    )
    plugin.call("NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID})
    controller, placeholder = plugin.controller, f"docker/endpoint-{EID[:12]}"
    controller.adopt_sandbox("docker/0123456789ab", "/run/elsewhere/0123456789ab")
    plugin.driver.calls.clear()
    reply = plugin.raw(
        "NetworkDriver.Join",
        json.dumps({"NetworkID": NID, "EndpointID": EID, "SandboxKey": KEY}).encode(),
    )
    assert reply.status == 409 and "already recorded with namespace" in reply.document["Err"]
    assert plugin.driver.calls == [] and controller.endpoint(EID).sandbox == placeholder

    controller.forget_sandbox("docker/0123456789ab")
    join = plugin.driver.join

    def join_while_another_adopts(*args: Any, **kwargs: Any) -> str:
        controller.adopt_sandbox("docker/0123456789ab", "/run/elsewhere/0123456789ab")
        return join(*args, **kwargs)

    plugin.driver.join = join_while_another_adopts  # type: ignore[method-assign]
    reply = plugin.raw(
        "NetworkDriver.Join",
        json.dumps({"NetworkID": NID, "EndpointID": EID, "SandboxKey": KEY}).encode(),
    )
    assert reply.status == 409
    assert plugin.driver.calls == [("join", EID), ("delete_endpoint", EID)]
    assert controller.endpoint(EID).sandbox == placeholder


def test_delete_network_takes_leftover_endpoints_and_their_sandboxes(plugin: Plugin) -> None:
    create_network(plugin)
    plugin.call("NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID})
    plugin.call("NetworkDriver.Join", {"NetworkID": NID, "EndpointID": EID, "SandboxKey": KEY})
    plugin.call("NetworkDriver.DeleteNetwork", {"NetworkID": NID})
    assert plugin.controller.store.endpoints() == []
    assert plugin.controller.store.sandboxes() == []
    assert plugin.pools() == {} and plugin.addresses() == {}


def test_create_endpoint_makes_the_interface_after_replying(plugin: Plugin) -> None:
    create_network(plugin)
    reply = plugin.raw(
        "NetworkDriver.CreateEndpoint",
        json.dumps({"NetworkID": NID, "EndpointID": EID}).encode(),
    )
    assert reply.status == 200 and reply.after is not None
    assert ("join", EID) not in plugin.driver.calls  # not before the reply
    app.run_after(reply.after, lambda: plugin.controller)
    assert ("join", EID) in plugin.driver.calls
    plugin.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID})
    calls = len(plugin.driver.calls)
    app.run_after(reply.after, lambda: plugin.controller)  # late: the endpoint is gone
    assert len(plugin.driver.calls) == calls

    def broken() -> Controller:
        raise RuntimeError("boom")

    app.run_after(reply.after, broken)  # logged, not raised


def test_join_after_the_interface_was_made_ahead_only_names_it(plugin: Plugin) -> None:
    create_network(plugin)
    for endpoint_id in (EID, EID2):
        reply = plugin.raw(
            "NetworkDriver.CreateEndpoint",
            json.dumps({"NetworkID": NID, "EndpointID": endpoint_id}).encode(),
        )
        if endpoint_id == EID:  # EID2's work after the reply never ran (a restart, say)
            assert reply.after is not None
            app.run_after(reply.after, lambda: plugin.controller)
    for number, endpoint_id in enumerate((EID, EID2)):
        joined = plugin.call(
            "NetworkDriver.Join",
            {"NetworkID": NID, "EndpointID": endpoint_id, "SandboxKey": f"{KEY}{number}"},
        )
        assert joined["InterfaceName"]["SrcName"] == f"nsp{endpoint_id[:12]}"
    # made ahead (not prepared), joined (prepared), joined without preparation
    assert plugin.driver.prepared == [None, f"nsp{EID[:12]}", None]


def test_bridge_driver_names_a_prepared_pair_without_the_kernel() -> None:
    network = Network(id=NID, name="n", driver="bridge", pools=[])
    endpoint = Endpoint(id=EID, network_id=NID, sandbox="docker/x", mac="02:00:00:00:00:01")
    name = BridgeDriver().join(
        network, endpoint, Sandbox("docker/x", ""), JoinOptions(peer_in_host=True, prepared="nsyab")
    )
    assert name == "nsyab"


def test_quick_calls_are_those_without_kernel_work_or_waiting() -> None:
    """netstackd answers these on its event loop (no worker thread handoff); a Join only
    when its veth pair was made ahead, the rest always in a worker thread."""
    for path in (
        "/Plugin.Activate",
        "/NetworkDriver.GetCapabilities",
        "/NetworkDriver.EndpointOperInfo",
        "/NetworkDriver.CreateEndpoint",
        "/IpamDriver.RequestAddress",
        "/Nope.Method",  # answered 404 at once
    ):
        assert app.quick(path), path
    for path in (
        "/NetworkDriver.CreateNetwork",
        "/NetworkDriver.DeleteEndpoint",
        "/NetworkDriver.ProgramExternalConnectivity",
        "/IpamDriver.RequestPool",
    ):
        assert not app.quick(path), path
    join = b'{"NetworkID": "n", "EndpointID": "e1", "SandboxKey": "/x"}'
    assert not app.quick("/NetworkDriver.Join", join)
    network.ENDPOINT_LOCKS.prepared["e1"] = "nsy0"
    try:
        assert app.quick("/NetworkDriver.Join", join)
    finally:
        network.ENDPOINT_LOCKS.forget("e1")
    assert app.quick("/NetworkDriver.Join", b"not json")


def test_port_clash_check_asks_the_busy_ports_it_was_given(tmp_path: Path) -> None:
    """The controller asks its `busy_on_host` which host ports processes hold (netstackd
    gives one that leaves out its own relay listeners), not the kernel directly."""
    asked: list[tuple[str, list[int] | None]] = []

    def busy(protocol: str, among: Sequence[int] | None) -> set[int]:
        asked.append((protocol, None if among is None else list(among)))
        return {8080}

    plugin = Plugin(tmp_path)
    plugin.controller = Controller(
        Store(tmp_path), {"bridge": plugin.driver}, host_routes=lambda: [], busy_on_host=busy
    )
    create_network(plugin)
    plugin.call(
        "NetworkDriver.CreateEndpoint",
        {"NetworkID": NID, "EndpointID": EID, "Interface": {"Address": "10.9.0.5/24"}},
    )
    for host_port, status in ((8080, 409), (8081, 200)):
        mapping = {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": host_port,
                   "HostPortEnd": host_port}  # fmt: skip
        reply = plugin.raw(
            "NetworkDriver.ProgramExternalConnectivity",
            json.dumps(
                {"NetworkID": NID, "EndpointID": EID,
                 "Options": {"com.docker.network.portmap": [mapping]}}
            ).encode(),
        )  # fmt: skip
        assert reply.status == status, reply.document
    assert asked == [("tcp", [8080]), ("tcp", [8081])]
