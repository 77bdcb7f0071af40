"""A run's checkpoints: where the files are and what they hold (``files``), writing one that
is complete or invisible (``save``), checking one against the run that will load it
(``verify``), loading one on another layout (``relayout``), which experts a rank's tensors hold
(``shards``), and exporting one as a plain model (``export``)."""
