"""The HTTP surface: the BentoML service (app.py) and the transport-free data plane behind it."""
