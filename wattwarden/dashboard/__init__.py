"""dashboard layer of wattwarden."""
