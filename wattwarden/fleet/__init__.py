"""Fleet layer: one power budget over many nodes, pushed to agents as leases."""
