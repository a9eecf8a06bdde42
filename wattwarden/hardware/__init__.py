"""hardware layer of wattwarden."""
