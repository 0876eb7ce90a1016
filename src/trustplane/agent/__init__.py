"""The node agent: the TPM attester and its wiring on one node."""
