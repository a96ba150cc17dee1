"""The parity harness: compare a SigLIP vision encoder with transformers, site by site.

Installed as ``siglip_scratch.parity`` (see ARCHITECTURE.md). transformers is imported only
when a reference is built, so importing this package never needs it.
"""
