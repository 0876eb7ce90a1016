"""Per-layer encrypted snapshots: images at rest, views by tier, containers from them.

Design note
-----------
Seed 000's mechanism: every image layer is a snapshot of the layer below,
encrypted under a key of its own; the keys form the one-way chain of
`crypto/key_chain.py`, so the key of layer k opens 0..k and nothing above.

Three levels, each unaware of the one above it:

* **backend** (`backend.LayerBackend`, one driver per backend, like
  `keys/kek.py` with `kek_file.py` and `kek_kmip.py`): keyed block-level
  layers. `create(layer, parent, key, size)` makes a *prepared* layer,
  `attach(chain, writable=)` opens layers 0..k with their keys as one block
  device (writable only with a prepared top), `commit(layer)` makes it
  durable and usable as a parent, `remove`, `scratch(size)` (an ephemeral
  encrypted volume under a key only this process holds), `recover()` (undo
  a dead process's attachments). Keys are passed on every call, never kept.
  - `qcow2.Qcow2Backend`: layer k = qcow2 with LUKS under key k, backed by
    layer k-1; a chain = one qemu-storage-daemon, FUSE export, loop device.
  - `devicemapper.DeviceMapperBackend`: layer k = dm `snapshot` of layer
    k-1's device whose COW store is dm-crypt under key k over its own thin
    volume (crypt over a thin snapshot would give one key for the whole
    tree); the base is a snapshot of a `zero` device. `create` = thin
    volume + crypt COW (first chunk zeroed), `attach` = the snapshot tables
    bottom-up, `commit` = record the layer as committed, `scratch` =
    dm-crypt over a thin volume with a random key. Its commands run through
    the same `tools.Executor`, in the test guest's runner; `devices.py` is
    how its devices reach the store's process (the guest exports them).
  - `choice.py`: which one, by the host's capability or by configuration.
* **file system** (`filesystem.py`): ext4 made once on layer 0 (no
  background initialisation, so later layers hold only their own changes),
  mounted read-only (`noload`) for views, read-write to fill a layer.
* **store** (`store.LayerStore`, `importer.py`): images, made of layers.
  Import streams each blob through `reader.LayerReader` (HMAC, decrypt,
  decompress, digests) into `apply.apply_layer` (the OCI changeset rules)
  on the prepared layer, and commits only what authenticates; views of
  tier N ask the control plane for the key of layer N only
  (`keys.ChainKeys`; the top key is a KMS secret, control/layer_chains.py);
  `run` puts overlayfs over a view with the writes on a scratch volume and
  starts runc; `remove` destroys the chain's key before the files.

containerd's snapshots API maps onto the backend directly: Prepare(key,
parent) = `create` + `attach(writable=True)` returning an ext4 mount of the
device; View = `attach(writable=False)`; Commit = detach + `commit`; Remove
= detach + `remove`; Mounts = the live attachment's device; an active
snapshot's key is random and discarded with it (or a chain key for image
layers). Crash safety is the same everywhere: a prepared layer is never a
parent in use, and leases (`leases.py`, a flock per owner) tell a restarted
process what a dead one held.
"""

from trustplane.layerstore.backend import Attachment, ChainLink, LayerBackend, LayerInfo
from trustplane.layerstore.choice import BackendConfig, open_backend
from trustplane.layerstore.devicemapper import DeviceMapperBackend
from trustplane.layerstore.importer import ImportRequest
from trustplane.layerstore.keys import ChainKeys, ChainRef, ControlPlaneKeys, Measurer
from trustplane.layerstore.qcow2 import Qcow2Backend
from trustplane.layerstore.records import StoredImage
from trustplane.layerstore.store import LayerStore, View

__all__ = [
    "Attachment",
    "BackendConfig",
    "ChainKeys",
    "ChainLink",
    "ChainRef",
    "ControlPlaneKeys",
    "DeviceMapperBackend",
    "ImportRequest",
    "LayerBackend",
    "LayerInfo",
    "LayerStore",
    "Measurer",
    "Qcow2Backend",
    "StoredImage",
    "View",
    "open_backend",
]
