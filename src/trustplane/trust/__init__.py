"""Trusted computing: measurements, attestation, and the transparency log."""
