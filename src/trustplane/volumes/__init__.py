"""Encrypted cloud volumes, in os-brick's shape (DESIGN.md, capability 3).

- The shapes the block-storage API and the drivers share live in `api/`:
  `api.volume_spec` (a volume type's backend and encryption spec, Cinder's
  fields, and which engine opens it), `api.volume_location` (where a volume
  is, as JSON the service stores; never a secret) and
  `api.volumes.HeaderFingerprint`.
- `header`: LUKS header parsing and the fingerprint a volume record keeps,
  checked at every attach.
- `access`: how a host reaches a location (QEMU block-node options, raw
  reads for the header checks).
- `backends/`: one driver per backend behind `Backend` (file, iscsi, lvm,
  rbd): create / delete / locate raw storage.
- `encryptors/`: one driver per engine behind `Encryptor` (QEMU's LUKS,
  dm-crypt, librbd): format (new volumes only), open/close, fingerprint;
  `encryptors.base.passphrase()` derives the LUKS passphrase from a KMS
  key the way OpenStack does.
- `attachers/`: libvirt (secret + domain XML, hot-plug and persistent),
  user-space open (qemu-storage-daemon FUSE export + loop device), and the
  Docker volume plugin on top of it (`attachers.docker_plugin`).
- `verification`: prove a volume is encrypted from its raw storage (the
  header against the record and the type, sampled payload entropy).
- `volume`: the few calls the block-storage service makes (create,
  extend, key slots for a rotation, delete) on top of the drivers.
"""
