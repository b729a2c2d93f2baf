"""The operator tools: the CLI, status, doctor, inspect and install-cni."""
