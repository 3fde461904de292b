"""Shipping an adapted model: merged weights (ours and MONAI bundles), and several organs' runs in one label map."""
