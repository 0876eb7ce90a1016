"""The states of a volume record, in one place for the service and its operation modules.

`creating` until the storage is formatted; `available` to attach; `deleting`
once a delete began (the key is being destroyed) and `shredded` once the key
is gone and the storage not yet; `extending`, `rotating`, `reencrypting` and
`cloning` while an operation holds a detached volume (no attach meanwhile).
api.volumes.VolumeState lists the same names for clients.
"""

from __future__ import annotations

CREATING, AVAILABLE, DELETING, SHREDDED = "creating", "available", "deleting", "shredded"
EXTENDING, ROTATING, REENCRYPTING, CLONING = "extending", "rotating", "reencrypting", "cloning"
