"""The CNI plugin ``cp-cni`` (spec 1.0): veth pairs into pod namespaces, addressed by the agent."""
