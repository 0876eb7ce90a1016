"""The control plane (`trustplane server`): identity and tokens, policy and
authorization, the KMS, the inventory of images and nodes, and the
transparency log, behind one HTTPS API.

One module per service, each with its router in routers/ and its models in
trustplane.api: secrets.py (the KMS's secret store, keys/, as the API serves
it: ACL, policy, log; its rows in secret_rows.py), key_broker.py (the
ocicrypt layer-key broker: KMS recipients, unwrap behind the policy and the
attestation gate), image_inventory.py (registered images and their file
digests), attestation.py (the verifier's state), transparency.py (the log),
commands.py (signed commands to gateways). The block-storage service
(volumes) goes beside them as volumes.py, wired in service.py like the rest.
"""
