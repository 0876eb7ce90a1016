"""Encrypted cloud volumes, in os-brick's shape (DESIGN.md, capability 3).

- `spec`: a volume type's backend and encryption spec (Cinder's fields),
  and which engine opens it; `passphrase()` derives the LUKS passphrase
  from a KMS key the way OpenStack does.
- `location`: where a volume is (what QEMU and libvirt need), as JSON the
  block-storage service stores; never a secret.
- `header`: LUKS header parsing and the header fingerprint a volume
  record keeps, checked at every attach.
- `access`: how a host reaches a location (QEMU block-node options, raw
  reads for the header checks).
- `backends/`: one driver per backend behind `Backend` (file, iscsi, lvm,
  rbd): create / delete / locate raw storage.
- `encryptors/`: one driver per engine behind `Encryptor` (QEMU's LUKS,
  dm-crypt, librbd): format (new volumes only), open/close, fingerprint.
- `attachers/`: libvirt (secret + domain XML, hot-plug and persistent),
  user-space open (qemu-storage-daemon FUSE export + loop device).
- `volume`: the few calls the block-storage service makes (create,
  delete) on top of the drivers.
"""
