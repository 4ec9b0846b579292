"""The semantic detailer: concepts, detections (SAM3) and the refine of each detail crop."""
