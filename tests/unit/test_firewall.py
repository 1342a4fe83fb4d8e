"""The bridge driver's nftables ruleset, compared with golden files and run on a fake nft.

Regenerate the goldens after an intended change with
``NETSTACK_UPDATE_GOLDEN=1 pytest tests/unit/test_firewall.py`` and review the diff.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from ipaddress import ip_network
from pathlib import Path

import pytest
from netstack.drivers.bridge.firewall import (
    TABLE,
    NetworkFacts,
    add_network,
    base_ruleset,
    delete_network_commands,
)

GOLDEN = Path(__file__).parent / "golden"

DUAL_STACK = NetworkFacts(
    bridge="nsbr0123456789a",
    subnets=(ip_network("10.20.0.0/24"), ip_network("fd00:1::/64")),
    internal=False,
    masquerade=True,
)
INTERNAL = NetworkFacts(
    bridge="nsbrinternal000",
    subnets=(ip_network("10.30.0.0/24"), ip_network("fd00:3::/64")),
    internal=True,
    masquerade=True,
)
NO_MASQUERADE = NetworkFacts(
    bridge="br-nomasq",
    subnets=(ip_network("10.40.0.0/16"),),
    internal=False,
    masquerade=False,
)
CASES = {"dual_stack": DUAL_STACK, "internal": INTERNAL, "no_masquerade": NO_MASQUERADE}


def check_golden(name: str, text: str) -> None:
    """Compare `text` with tests/unit/golden/<name>; rewrite it when asked to."""
    path = GOLDEN / name
    if os.environ.get("NETSTACK_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"differs from golden file {path}"


# goldens ----------------------------------------------------------------------------------


def test_base_ruleset_golden() -> None:
    check_golden("base_ruleset.nft", base_ruleset())


@pytest.mark.parametrize("case", sorted(CASES))
def test_add_network_golden(case: str) -> None:
    check_golden(f"add_network_{case}.nft", add_network(CASES[case]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_delete_network_golden(case: str) -> None:
    check_golden(
        f"delete_network_{case}.nft",
        "".join(f"{c}\n" for c in delete_network_commands(CASES[case])),
    )


# properties -------------------------------------------------------------------------------


def element_sets(commands: str) -> set[str]:
    return set(re.findall(rf"^(?:add|delete) element {TABLE} (\S+) ", commands, re.MULTILINE))


def test_internal_network_has_internal_element_and_no_masquerade() -> None:
    commands = add_network(INTERNAL)
    assert f'add element {TABLE} internal {{ "nsbrinternal000" }}\n' in commands
    assert element_sets(commands) == {"bridges", "same_bridge", "nets4", "nets6", "internal"}


def test_masquerade_false_has_no_masquerade_elements() -> None:
    assert element_sets(add_network(NO_MASQUERADE)) == {"bridges", "same_bridge", "nets4"}


def test_masquerade_elements_per_family() -> None:
    commands = add_network(DUAL_STACK)
    assert f"add element {TABLE} masq4 {{ 10.20.0.0/24 }}\n" in commands
    assert f"add element {TABLE} masq6 {{ fd00:1::/64 }}\n" in commands
    assert "internal" not in element_sets(commands)


def test_delete_commands_mirror_add() -> None:
    for facts in CASES.values():
        added = add_network(facts).splitlines()
        deleted = delete_network_commands(facts)
        assert [line.replace("add ", "delete ", 1) for line in added] == deleted


def count_rules(commands: str) -> int:
    return sum(1 for line in commands.splitlines() if line.startswith("add rule "))


def test_rule_count_is_fixed_regardless_of_networks() -> None:
    base = count_rules(base_ruleset())
    assert base == 17
    many = [
        NetworkFacts(f"nsbr{n:011x}", (ip_network(f"10.{n}.0.0/24"),), n % 3 == 0, n % 2 == 0)
        for n in range(50)
    ]
    script = base_ruleset() + "".join(add_network(f) for f in many)
    assert count_rules(script) == base
    assert all(count_rules(add_network(f)) == 0 for f in many)


def test_base_ruleset_is_idempotent_text() -> None:
    """Re-running it flushes and refills the chains: the chains are flushed before any rule."""
    lines = base_ruleset().splitlines()
    flushes = [i for i, line in enumerate(lines) if line.startswith("flush chain")]
    rules = [i for i, line in enumerate(lines) if line.startswith("add rule")]
    assert len(flushes) == 5
    assert max(flushes) < min(rules)
    assert not any(line.startswith(("delete", "flush table", "flush ruleset")) for line in lines)
    assert all(f" {TABLE} " in f" {line} " for line in lines)


# a fake nft: set elements only ----------------------------------------------------------


class FakeNft:
    """Applies `add/delete element` commands to in-memory sets, like nft would."""

    _ELEMENT = re.compile(rf"^(add|delete) element {TABLE} (\S+) \{{ (.+) \}}$")

    def __init__(self) -> None:
        self.sets: dict[str, set[str]] = defaultdict(set)

    def run(self, commands: str) -> None:
        for line in commands.splitlines():
            match = self._ELEMENT.match(line)
            if match is None:
                continue
            verb, name, value = match.groups()
            if verb == "add":
                self.sets[name].add(value)
            elif value in self.sets[name]:
                self.sets[name].remove(value)
            else:
                raise LookupError(f"Could not process rule: No such file or directory: {line}")

    def snapshot(self) -> dict[str, set[str]]:
        return {name: set(values) for name, values in self.sets.items() if values}


def test_add_then_delete_leaves_other_networks_alone() -> None:
    nft = FakeNft()
    nft.run(base_ruleset())
    for facts in CASES.values():
        nft.run(base_ruleset() + add_network(facts))
    assert nft.snapshot() == {
        "bridges": {'"nsbr0123456789a"', '"nsbrinternal000"', '"br-nomasq"'},
        "same_bridge": {
            '"nsbr0123456789a" . "nsbr0123456789a"',
            '"nsbrinternal000" . "nsbrinternal000"',
            '"br-nomasq" . "br-nomasq"',
        },
        "internal": {'"nsbrinternal000"'},
        "nets4": {"10.20.0.0/24", "10.30.0.0/24", "10.40.0.0/16"},
        "nets6": {"fd00:1::/64", "fd00:3::/64"},
        "masq4": {"10.20.0.0/24"},
        "masq6": {"fd00:1::/64"},
    }
    nft.run("\n".join(delete_network_commands(DUAL_STACK)))
    nft.run("\n".join(delete_network_commands(INTERNAL)))
    assert nft.snapshot() == {
        "bridges": {'"br-nomasq"'},
        "same_bridge": {'"br-nomasq" . "br-nomasq"'},
        "nets4": {"10.40.0.0/16"},
    }
    with pytest.raises(LookupError):
        nft.run("\n".join(delete_network_commands(INTERNAL)))
    for command in delete_network_commands(NO_MASQUERADE):  # one by one, as the driver retries
        nft.run(command)
    assert nft.snapshot() == {}
