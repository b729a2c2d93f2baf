"""Config validation and flannel-compatible defaults (pure, no root)."""

import json
from ipaddress import IPv4Address, IPv4Network

import pytest

from vxlan_net.core.config import build_config, parse_config
from vxlan_net.core.errors import InvalidConfig


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


@pytest.mark.parametrize(
    "network, message",
    [
        ("0.0.0.0/0", "overlaps 0.0.0.0/8"),
        ("0.0.0.0/1", "overlaps 0.0.0.0/8"),
        ("0.128.0.0/16", "overlaps 0.0.0.0/8"),
        ("127.0.0.0/8", "overlaps loopback 127.0.0.0/8"),
        ("126.0.0.0/7", "overlaps loopback 127.0.0.0/8"),
        ("169.254.0.0/16", "overlaps link-local 169.254.0.0/16"),
        ("169.254.128.0/20", "overlaps link-local 169.254.0.0/16"),
        ("224.0.0.0/4", "overlaps multicast 224.0.0.0/4"),
        ("239.1.0.0/16", "overlaps multicast 224.0.0.0/4"),
        ("240.0.0.0/4", "overlaps reserved 240.0.0.0/4"),
        ("255.255.255.0/28", "overlaps reserved 240.0.0.0/4"),
        ("128.0.0.0/1", "overlaps link-local 169.254.0.0/16"),
    ],
)
def test_a_network_that_cannot_carry_pods_is_refused(network, message):
    with pytest.raises(InvalidConfig, match=f"^Network {network} cannot be a pod network: it {message}"):
        build_config(network)


@pytest.mark.parametrize("network", ["198.19.0.0/29", "198.19.0.0/30", "198.19.0.0/31", "198.19.0.0/32"])
def test_a_network_too_small_for_two_subnets_is_refused_by_name(network):
    with pytest.raises(InvalidConfig, match=f"^Network {network} is too small: it must hold at least two /30"):
        build_config(network)


def test_the_smallest_and_the_usual_pod_networks_are_accepted():
    assert build_config("198.19.0.0/28").subnet_len == 30
    assert build_config("198.19.0.0/24", subnet_len=25).subnet_min == IPv4Address("198.19.0.128")
    for network in ("198.19.0.0/16", "10.244.0.0/16", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16"):
        assert str(build_config(network).network) == network


def test_an_unusable_network_in_etcd_is_invalid_config_for_the_agent():
    with pytest.raises(InvalidConfig, match="cannot be a pod network"):
        parse_config(b'{"Network": "127.0.0.0/8", "Backend": {"Type": "vxlan"}}')
    with pytest.raises(InvalidConfig, match="too small"):
        parse_config(b'{"Network": "198.19.0.0/30"}')


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


@pytest.mark.parametrize("value", ['"true"', "1", "null", "[]"])
def test_direct_routing_that_is_not_a_json_boolean_is_refused(value):
    with pytest.raises(InvalidConfig, match="DirectRouting must be true or false"):
        parse_config(f'{{"Network": "198.19.0.0/16", "Backend": {{"DirectRouting": {value}}}}}')


def test_direct_routing_is_off_by_default_and_round_trips_under_flannels_key():
    assert parse_config(b'{"Network": "198.19.0.0/16"}').direct_routing is False
    config = build_config("198.19.0.0/16", direct_routing=True)
    assert json.loads(config.to_json())["Backend"]["DirectRouting"] is True
    assert parse_config(config.to_json()) == config
    assert "DirectRouting" not in json.loads(build_config("198.19.0.0/16").to_json())["Backend"]
