"""vxlan-net: a VXLAN overlay network for container clusters, driven by etcd."""

__version__ = "0.1.0"
