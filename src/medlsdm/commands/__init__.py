"""One module per sub-command of the `medlsdm` command line (see medlsdm.cli)."""
