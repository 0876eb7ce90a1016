"""The Docker volume plugin: control-plane volumes for containers, opened in user space.

dockerd talks HTTP+JSON to the plugin on a unix socket
(`/run/docker/plugins/trustplane.sock`): `Plugin.Activate`, then
`VolumeDriver.Create|Remove|Mount|Unmount|Path|Get|List|Capabilities`.

- `protocol`: the request and answer bodies of that protocol.
- `service`: what the plugin needs from the block-storage service (create,
  delete, look up, and the key release for this node), as a Protocol.
- `state`: which volumes are open here, for which containers, on disk, so
  a restarted plugin finds them again.
- `filesystem`: the file system a new volume gets, and the check for one.
- `driver`: the volume driver: create (with its file system), mount
  refcounted per volume (open on the first container, closed with the key
  forgotten after the last), recovery after a restart or a `kill -9`.
- `app`: the ASGI application that maps the protocol onto the driver.
"""
