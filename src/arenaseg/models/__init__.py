"""Networks (MONAI Swin-UNETR) and checkpoint loading."""
