"""exporters layer of wattwarden."""
