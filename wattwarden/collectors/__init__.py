"""collectors layer of wattwarden."""
