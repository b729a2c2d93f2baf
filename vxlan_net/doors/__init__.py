"""The doors to the outside: etcd (store), netlink (kernel), nftables (firewall) and files (subnet file, node state)."""
