"""Config validation and flannel-compatible defaults (pure, no root)."""

import json
from ipaddress import IPv4Address, IPv4Network

import pytest

from vxlan_net.config import build_config, parse_config
from vxlan_net.errors import InvalidConfig


def test_defaults_follow_flannel_for_a_large_network():
    config = build_config("198.19.0.0/16")
    assert config.subnet_len == 24
    assert config.subnet_min == IPv4Address("198.19.1.0")
    assert config.subnet_max == IPv4Address("198.19.255.0")
    assert (config.vni, config.port, config.mtu) == (1, 8472, None)


def test_small_network_gets_two_more_bits():
    config = build_config("198.19.0.0/26")
    assert config.subnet_len == 28
    assert config.subnet_min == IPv4Address("198.19.0.16")
    assert config.subnet_max == IPv4Address("198.19.0.48")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"network": "198.19.0.1/16"}, "host bits"),
        ({"network": "not-a-net"}, "not a valid"),
        ({"network": "198.19.0.0/16", "subnet_len": 31}, "at most /30"),
        ({"network": "198.19.0.0/16", "subnet_len": 16}, "longer than"),
        ({"network": "198.19.0.0/16", "subnet_min": "198.19.1.128"}, "not aligned"),
        ({"network": "198.19.0.0/16", "subnet_max": "198.20.0.0"}, "outside the network"),
        ({"network": "198.19.0.0/16", "subnet_min": "198.19.9.0", "subnet_max": "198.19.2.0"}, "above"),
        ({"network": "198.19.0.0/16", "vni": 0}, "VNI 0"),
        ({"network": "198.19.0.0/16", "vni": 16_777_216}, "VNI"),
        ({"network": "198.19.0.0/16", "port": 70000}, "Port"),
    ],
)
def test_invalid_values_are_rejected_with_a_reason(kwargs, message):
    with pytest.raises(InvalidConfig, match=message):
        build_config(**kwargs)


def test_json_round_trip_uses_flannel_names():
    config = build_config("198.19.0.0/16", subnet_len=26, vni=42, port=4789, mtu=1400)
    doc = json.loads(config.to_json())
    assert doc["Network"] == "198.19.0.0/16" and doc["SubnetLen"] == 26
    assert doc["Backend"] == {"Type": "vxlan", "VNI": 42, "Port": 4789, "MTU": 1400}
    assert parse_config(config.to_json()) == config


def test_flannel_config_without_optional_fields_parses():
    config = parse_config(b'{"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan"}}')
    assert config.network == IPv4Network("198.19.0.0/16") and config.vni == 1


@pytest.mark.parametrize(
    "raw", [b"{", b"[]", b'{"Backend": {}}', b'{"Network": "198.19.0.0/16", "Backend": {"Type": "udp"}}',
            b'{"Network": "198.19.0.0/16", "SubnetLen": "24"}', b'{"Network": 5}']
)
def test_garbage_config_is_invalid_not_a_crash(raw):
    with pytest.raises(InvalidConfig):
        parse_config(raw)
