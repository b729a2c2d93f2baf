"""`python -m vxlan_net.cni_service --socket PATH`: the agent's CNI socket service alone, under the name it had
before the layers became packages (scripts and benchmarks that run it keep working). The code is in
`vxlan_net.agent.cni_service`."""

from vxlan_net.agent.cni_service import main

if __name__ == "__main__":
    raise SystemExit(main())
