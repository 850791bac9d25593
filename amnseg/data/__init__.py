"""Datasets (VOC, COCO, the user's own folder, the built-in demo) and transforms."""
