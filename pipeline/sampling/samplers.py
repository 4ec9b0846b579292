"""The samplers a spec may name, by model family (pipeline.sampling.schedule makes them): names only, so a spec is
checked without loading diffusers."""

AUTO = "auto"
FAMILY_SAMPLERS = {"sdxl": ("dpmpp_2m_karras", "euler"), "flux": ("flow_euler",)}
SAMPLERS = (AUTO, *(name for names in FAMILY_SAMPLERS.values() for name in names))
