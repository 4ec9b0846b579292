"""Where the warm farm's actors are found on a Ray cluster: light enough for a client that only asks it something
(`farm status`, `farm down`), which must not load the models' libraries to do so."""

NAMESPACE = "tilefarm"  # the farm's Ray namespace: its controller and workers are found there by name
CONTROLLER = "controller"
