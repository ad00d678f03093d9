"""A kvstore-backed control plane for container networking."""
