"""OCI data model, the registry client (distribution API), the OCI image
layout on disk, and the Docker engine's save/load format."""
