"""The control plane's HTTP API as data: request and response models (pydantic).

The server's routers and every client (client.py: the CLI, the node agent,
the gateway) import these, so both ends agree on each field by construction.
One module per area of the API, named like its router in control/routers/;
`fields` holds the field rules several areas share.
"""
