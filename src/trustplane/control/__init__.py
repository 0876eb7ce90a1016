"""The control plane (`trustplane server`): identity and tokens, policy and
authorization, the KMS, the inventory of images and nodes, and the
transparency log, behind one HTTPS API."""
