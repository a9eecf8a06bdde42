"""wattwarden: GPU energy monitoring and power management for AI hosts."""

__version__ = "0.1.0"
