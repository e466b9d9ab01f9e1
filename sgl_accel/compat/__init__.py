"""The compatibility matrix (which sglang releases each patch applies to) and its scanner."""
