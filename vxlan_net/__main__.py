"""`python -m vxlan_net` is `vxlan-net`."""

import sys

from vxlan_net.tools.cli import main

sys.exit(main())
