"""Reaching instances over SSH: the only layer that imports fabric or paramiko."""
