"""Exports of genesis-ext weights to the frameworks that fine-tune and deploy them: nnU-Net v2
(:mod:`.nnunet`) and MONAI bundles (:mod:`.monai_bundle`). Needs torch (and the framework's package to use the
result)."""
