"""api layer of wattwarden."""
