"""`python -m vxlan_net.install_cni`: the stable name of the install step (Dockerfile label, DaemonSet init
container, systemd unit, operators' deployments). The code is in `vxlan_net.tools.install_cni`."""

import sys

from vxlan_net.tools.install_cni import main

if __name__ == "__main__":
    sys.exit(main())
