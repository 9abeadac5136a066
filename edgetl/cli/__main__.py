from edgetl.cli import entrypoint

entrypoint()
