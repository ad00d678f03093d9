"""cp-relay: every node's flows in one Observer API (issue 14)."""
