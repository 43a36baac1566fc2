"""Analysis of trained crosscoders (diffing metrics, recovery of planted features)."""
