"""`python -m vxlan_net` is `vxlan-net`."""

import sys

from .cli import main

sys.exit(main())
