"""workloads layer of wattwarden."""
