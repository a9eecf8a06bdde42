"""policies layer of wattwarden."""
