"""The running agent: its loop, the reconciler, the lease keeper, the CNI socket service, health and fault retries."""
