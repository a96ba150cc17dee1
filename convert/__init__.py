"""The converter: any SigLIP checkpoint layout to a vision-only safetensors folder.

Installed as ``siglip_scratch.convert`` (see ARCHITECTURE.md).
"""
