"""The edge gateway: an authenticating, authorizing proxy for the Docker Engine API.

request.py parses a call, actions.py names its action, host_access.py reads
its body, image_auth.py and control_link.py ask the control plane,
decide.py puts them in the seed's order, proxy.py moves the bytes, and
service.py wires them together for `trustplane gateway`.
"""
