"""The pure core: network config, leases, allocation, the lease book, desired entries and the plan. No I/O; standard library only."""
