"""``--verify``: load the converted folder into our encoder and into transformers and compare."""

from __future__ import annotations

from pathlib import Path

import torch

from siglip_scratch.modeling import SiglipVisionModel


def verify_output(folder: Path, *, dtype: str = "float32") -> tuple[bool, str]:
    """(passed, text). With transformers installed, the parity harness on a batch of 2 random images;
    without it, a strict load into our encoder and a finite forward pass, and a note saying so."""
    try:
        import transformers
    except ImportError:
        model = SiglipVisionModel.from_pretrained(folder)
        cfg = model.config
        x = torch.rand(1, cfg.num_channels, cfg.image_size, cfg.image_size) * 2 - 1
        with torch.inference_mode():
            out = model(x).last_hidden_state
        ok = bool(torch.isfinite(out).all())
        return ok, (
            f"verify: loaded strictly into siglip_scratch, forward {'finite' if ok else 'NOT finite'}; "
            'transformers is not installed, so no parity check (pip install "siglip-scratch[parity]")'
        )
    from siglip_scratch.parity import compare

    transformers.utils.logging.disable_progress_bar()
    # The folder is loaded by the harness exactly as a user would load it.
    report = compare(weights=folder, dtype=dtype, batch=2, mode="propagated")
    theirs = transformers.SiglipVisionModel.from_pretrained(folder, output_loading_info=True)[1]
    bad = {k: v for k, v in theirs.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    text = f"verify: {report.verdict}"
    if bad:
        text += f"\nverify: transformers.SiglipVisionModel.from_pretrained reported {bad}"
    return report.passed and not bad, text
